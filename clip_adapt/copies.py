"""Near-copy detection: the same scan saved twice, whether byte for byte or re-encoded, resized, re-contrasted,
cropped, shifted or turned from greyscale to RGB.

Each image becomes two 128 px greyscale views (grey_views): the whole frame, and a box around the head taken
from the mean and spread of its mask (pixels brighter than FOREGROUND of the way from the 1st to the 99.5th
percentile), which undoes shifts, margins and crops of the background. Grey levels are equalised over the head:
monotone changes of brightness, contrast and gamma cancel out.

Three stages, so that the check costs little next to loading the images:
1. candidates: pairs whose pHash (imagehash, 64 bits) of either view differs in at most CANDIDATE_BITS bits,
   and each test image's NEAREST_CANDIDATES nearest train images by 32 px thumbnail (so that every test image
   has a nearest train image, with its score, in the report);
2. screening: candidates whose 32 px thumbnails correlate below COARSE_FLOOR are dropped;
3. score: Pearson's correlation of the 128 px views, the better view counting, and for whole frames scoring
   SEARCH_FLOOR or more also the best shift within MAX_SHIFT of the side (crops into a head that fills the
   frame, which the head box does not undo). A pair scoring NEAR_COPY_SCORE or more is a copy.

Where this differs from the previous, lost implementation (bounding box of the non-background pixels, plain
correlation, threshold 0.94): a bounding box jumps when JPEG noise or a new contrast flips a few edge pixels
(measured: a quality-30 re-encode then scored as low as 0.43), and without equalisation a gamma of 0.7 did too;
with equalisation distinct slices at the same level look more alike, hence the higher threshold.

Threshold, measured on ../shared/data/brain_mri (README, "Near copies"): the weakest copy found by eye scores
0.960, the closest distinct pair 0.956. Measured limits are in the README and tests/test_duplicates.py.
"""

import hashlib
from collections import defaultdict

import imagehash
import numpy as np
from PIL import Image

ALIGNED_SIZE = 128
THUMB_SIZE = 32
NEAR_COPY_SCORE = 0.958
CANDIDATE_BITS = 12
NEAREST_CANDIDATES = 3
FOREGROUND = 0.15
SPREADS = 2.0
COARSE_FLOOR = 0.8   # 32 px correlation below which a candidate pair is not scored at 128 px
WORKING_SIZE = 384   # images are reduced to about this side before the views are cut
SEARCH_FLOOR = 0.8   # 128 px score below which no shift is tried
MAX_SHIFT = 0.05   # of the side, in the shift search


def equalising_table(histogram: list[int]) -> list[int]:
    """The grey-level table of PIL's ImageOps.equalize for this histogram (so that it can be computed on a
    reduced image and applied to the full one)."""
    used = [count for count in histogram if count]
    step = (sum(used) - used[-1]) // 255 if used else 0
    if not step:
        return list(range(256))
    table, total = [], step // 2
    for count in histogram:
        table.append(min(255, total // step))
        total += count
    return table


def grey_views(img: Image.Image, size: int = ALIGNED_SIZE) -> list[Image.Image]:
    """Two greyscale size² views of an image: the whole frame, and the box around the head found from the
    moments of its mask. Grey levels are equalised over the head, so that any monotone change of brightness,
    contrast or gamma cancels out."""
    grey = img.convert("L")
    # The head is found on a copy about WORKING_SIZE px across (the costly part, and just as good there); the
    # views are cut from the full image, so that their sharpness does not depend on how large the file was.
    scale = min(1.0, WORKING_SIZE / min(grey.size))
    small = grey if scale == 1 else grey.resize((max(1, round(grey.width * scale)),
                                                 max(1, round(grey.height * scale))), Image.Resampling.BOX)
    array = np.asarray(small)
    share = np.cumsum(small.histogram()) / array.size   # percentiles from the histogram: no sort
    low, high = np.searchsorted(share, 0.01), np.searchsorted(share, 0.995)
    head = array > low + FOREGROUND * (high - low)
    table = equalising_table(small.histogram(Image.fromarray(head))) if head.any() else list(range(256))
    views = [small]   # the whole frame: at 128 px the reduced copy is as good
    if head.sum() > 16:
        # The box from the moments of the head's mask, not from its outermost pixels: an average over many
        # pixels barely moves when JPEG noise or a new contrast flips a few at the edge.
        centre, spread = np.zeros(2), np.zeros(2)
        for axis, profile in enumerate((head.sum(0), head.sum(1))):   # x from the columns, y from the rows
            where = np.arange(len(profile))
            centre[axis] = (where * profile).sum() / profile.sum()
            spread[axis] = max(np.sqrt(((where - centre[axis]) ** 2 * profile).sum() / profile.sum()), 1.0)
        left, top = np.floor((centre - SPREADS * spread) / scale).astype(int)
        right, bottom = np.ceil((centre + SPREADS * spread) / scale).astype(int)
        views.append(grey.crop((left, top, right, bottom)))   # beyond the image edge PIL fills black
    else:
        views.append(grey)
    return [view.point(table).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0) for view in views]


def standardised(arrays: np.ndarray) -> np.ndarray:
    """Rows of zero mean and unit norm, so that a dot product is Pearson's correlation."""
    rows = arrays.reshape(len(arrays), -1).astype(np.float32)
    rows -= rows.mean(1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


class Fingerprints:
    """What the check keeps of each image, per view (whole frame, head box): its pHash, its 128 px pixels
    (uint8, standardised when a pair is scored) and a standardised 32 px thumbnail."""

    def __init__(self, images: list[Image.Image]):
        views = list(zip(*[grey_views(img) for img in images])) if images else [[], []]
        self.hashes = [np.array([int(str(imagehash.phash(v)), 16) for v in view], dtype=np.uint64) for view in views]
        self.fine = [np.stack([np.asarray(v) for v in view]) if images else np.zeros((0, 1), np.uint8)
                     for view in views]
        whole = self.fine[0]
        self.half_size = (whole.reshape(len(whole), ALIGNED_SIZE // 2, 2, ALIGNED_SIZE // 2, 2).mean(
            (2, 4), dtype=np.float32) if images else whole)   # 64 px whole frames, for the shift search
        # Standardised once per image, in float16 (half the memory; a correlation needs no more precision),
        # rather than once per pair: an image is in many pairs.
        self.standard = [np.concatenate([standardised(fine[s:s + 1024]).astype(np.float16)
                                         for s in range(0, len(fine), 1024)]) if images else fine
                         for fine in self.fine]
        self.thumbs = [standardised(np.stack([np.asarray(v.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX))
                                              for v in view])) if images else np.zeros((0, 1)) for view in views]
        self.coarse = self.thumbs[0]

    def coarse_score(self, pairs: np.ndarray) -> np.ndarray:
        """Correlation of the 32 px thumbnails, the better of the two views: a cheap first look."""
        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float32)
        return np.max([np.einsum("ij,ij->i", t[pairs[:, 0]], t[pairs[:, 1]]) for t in self.thumbs], axis=0)

    def score(self, pairs: np.ndarray, block: int = 1024) -> np.ndarray:
        """Correlation of the 128 px images of each (i, j) pair: the best of the two views, and of the whole
        frames shifted against each other by up to MAX_SHIFT of their side (a crop or a shift that the head
        box did not undo: heads that fill the frame)."""
        scores = np.zeros(len(pairs), dtype=np.float32)
        for start in range(0, len(pairs), block):
            i, j = pairs[start:start + block, 0], pairs[start:start + block, 1]
            best = correlation(self.standard[0], i, j)
            other = np.flatnonzero(best < NEAR_COPY_SCORE)   # the head box only where the whole frame is no copy
            best[other] = np.maximum(best[other], correlation(self.standard[1], i[other], j[other]))
            search = np.flatnonzero((best < NEAR_COPY_SCORE) & (best >= SEARCH_FLOOR))
            if len(search):
                best[search] = np.maximum(best[search], self.shifted_score(i[search], j[search]))
            scores[start:start + block] = best
        return scores

    def shifted_score(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Best shift found at 64 px (every whole-pixel shift), then scored at 128 px."""
        whole, half = self.fine[0], self.half_size
        size = whole.shape[1]
        reach = max(1, round(MAX_SHIFT * size / 2))
        shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
        at_half = np.stack([window_correlation(half[i], half[j], dy, dx) for dy, dx in shifts], 1)
        chosen = at_half.argmax(1)
        result = np.zeros(len(i), dtype=np.float32)
        for k in np.unique(chosen):
            rows = np.flatnonzero(chosen == k)
            dy, dx = shifts[k]
            result[rows] = window_correlation(whole[i[rows]], whole[j[rows]], 2 * dy, 2 * dx)
        return result


def correlation(standard: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", standard[i].astype(np.float32), standard[j].astype(np.float32))


def window_correlation(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Correlation of the overlap of image stacks a and b, b moved by (dy, dx) pixels."""
    h, w = a.shape[1:]
    a = a[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    b = b[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return np.einsum("ij,ij->i", standardised(a), standardised(b))


def hash_candidates(hashes: np.ndarray, max_bits: int = CANDIDATE_BITS, block: int = 1024) -> np.ndarray:
    """All pairs i < j whose pHashes differ in at most max_bits bits, in blocks to bound memory."""
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        distance = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        i, j = np.nonzero(distance <= max_bits)
        i = i + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def nearest_candidates(coarse: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int = NEAREST_CANDIDATES):
    """For each query image, its k most correlated pool images by 32 px thumbnail, as (query, pool) pairs."""
    if len(queries) == 0 or len(pool) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    k = min(k, len(pool))
    similarity = coarse[queries] @ coarse[pool].T
    best = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return np.stack([np.repeat(queries, k), pool[best.ravel()]], 1)


def clusters_of(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more images) of the copy graph: a copy of a copy is in the cluster too."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    groups = defaultdict(list)
    for i in range(n):
        groups[root(i)].append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def find_near_copies(images: list[Image.Image], splits: list[str], exact_hashes: list[str],
                     threshold: float = NEAR_COPY_SCORE) -> dict:
    """Every pair of copies (exact, or near with score >= threshold), their clusters, and each test image's
    nearest train image. Indices refer to the lists given."""
    fingerprints = Fingerprints(images)
    splits_array = np.array(splits)
    test, train = np.flatnonzero(splits_array == "test"), np.flatnonzero(splits_array == "train")
    nearest = nearest_candidates(fingerprints.coarse, test, train)
    candidates = np.concatenate([hash_candidates(h) for h in fingerprints.hashes] + [np.sort(nearest, axis=1)])
    candidates = np.unique(candidates, axis=0) if len(candidates) else candidates.reshape(0, 2)
    # Only pairs whose thumbnails already look alike are scored at 128 px: most candidates stop here.
    candidates = candidates[fingerprints.coarse_score(candidates) >= COARSE_FLOOR]
    candidates = np.unique(np.concatenate([candidates, np.sort(nearest, axis=1)]), axis=0)
    scores = fingerprints.score(candidates)

    score_of = {(int(i), int(j)): float(s) for (i, j), s in zip(candidates, scores)}
    exact = defaultdict(list)
    for i, h in enumerate(exact_hashes):
        exact[h].append(i)
    exact_pairs = {(a, b) for group in exact.values() for x, a in enumerate(group) for b in group[x + 1:]}
    copies = sorted(exact_pairs | {p for p, s in score_of.items() if s >= threshold})
    pairs = [{"i": i, "j": j, "score": round(score_of.get((i, j), 1.0), 4), "exact": (i, j) in exact_pairs}
             for i, j in copies]

    nearest_train = {}
    for i, j in nearest:
        s = score_of[(min(i, j), max(i, j))]
        if int(i) not in nearest_train or s > nearest_train[int(i)][1]:
            nearest_train[int(i)] = (int(j), s)
    return {"pairs": pairs, "clusters": clusters_of(len(images), copies), "nearest_train": nearest_train,
            "candidates": len(candidates)}


def pixel_hash(img: Image.Image) -> str:
    """Same decoded pixels, same hash, whatever the file's name, format or original mode."""
    return hashlib.blake2b(np.asarray(img).tobytes() + str(img.size).encode(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------- reporting the copies

def clusters_by_split(clusters, splits: list[str], files: list[str]) -> tuple[list[dict], dict]:
    """Clusters of image indices as the report lists them: those reaching across splits (their files per
    split) and, per split, the files of each cluster with more than one member there."""
    cross, within = [], {"train": [], "test": []}   # and "val", for a dataset's own validation split
    for members in clusters:
        in_split = defaultdict(list)
        for i in members:
            in_split[splits[i]].append(files[i])
        if len(in_split) > 1:
            cross.append({"train": in_split["train"], "test": in_split["test"],
                          **({"val": in_split["val"]} if "val" in in_split else {})})
        for split, names in in_split.items():
            if len(names) > 1:
                within.setdefault(split, []).append(names)
    return cross, within


def find_duplicates(hashes: list[str], splits: list[str], files: list[str]) -> dict:
    """Exact copies: clusters of identical decoded pixels, in the layout of near_copy_report."""
    groups = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    clusters = [members for members in groups.values() if len(members) > 1]
    cross, within = clusters_by_split(clusters, splits, files)
    return {"train_test_duplicates": cross, "within_split_duplicates": within, "clusters": clusters}


def describe_duplicates(report: dict) -> str:
    cross = report["train_test_duplicates"]
    within = report["within_split_duplicates"]
    return (f"duplicates: {sum(len(g['test']) for g in cross)} test images are pixel copies of a train image, "
            f"{sum(len(g) - 1 for g in within['train'])} extra copies inside train, "
            f"{sum(len(g) - 1 for g in within['test'])} inside test")


def near_copy_report(images: list[Image.Image], hashes: list[str], splits: list[str], files: list[str]) -> dict:
    """Exact and near copies (find_near_copies): clusters across and within splits, every pair with its score and
    splits, and every test image's nearest train image. Same cluster layout as find_duplicates; indices (in
    "clusters" and the nearest pairs) are positions in the loaded order, since names need not be unique."""
    found = find_near_copies(images, splits, hashes)
    cross, within = clusters_by_split(found["clusters"], splits, files)
    nearest = sorted(((score, test, train) for test, (train, score) in found["nearest_train"].items()),
                     reverse=True)
    return {"train_test_duplicates": cross, "within_split_duplicates": within,
            "near_copy_threshold": NEAR_COPY_SCORE,
            "copy_pairs": [{"a": files[p["i"]], "b": files[p["j"]], "split_a": splits[p["i"]],
                            "split_b": splits[p["j"]], "score": p["score"], "exact": p["exact"]}
                           for p in found["pairs"]],
            "nearest_train_of_test": [{"test": files[test], "train": files[train], "score": round(score, 4),
                                       "test_index": test, "train_index": train} for score, test, train in nearest],
            "clusters": found["clusters"]}


def describe_near_copies(report: dict) -> str:
    counts = defaultdict(int)
    for p in report["copy_pairs"]:
        where = "–".join(sorted({p["split_a"], p["split_b"]}, key=["train", "val", "test"].index))
        counts[(where, "exact" if p["exact"] else "near")] += 1
    cross = report["train_test_duplicates"]
    line = (f"copies (correlation >= {report['near_copy_threshold']}): {sum(len(g['test']) for g in cross)} test "
            f"images have a copy in train ({counts['train–test', 'exact']} exact, {counts['train–test', 'near']} "
            f"near pairs); inside train {counts['train', 'exact']} exact, {counts['train', 'near']} near pairs; "
            f"inside test {counts['test', 'exact']} exact, {counts['test', 'near']} near pairs")
    others = sorted({where for where, _ in counts} - {"train–test", "train", "test"})
    return line + "".join(f"; {where} {counts[where, 'exact']} exact, {counts[where, 'near']} near pairs"
                          for where in others)


def describe_copies(report: dict) -> str:
    """The one line printed before training and shown in report.html, in the words of the check that ran."""
    return describe_near_copies(report) if report.get("duplicate_check") == "near" else describe_duplicates(report)
