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
2. screening: candidates whose 8 px thumbnails correlate below MINI_FLOOR, then those whose 32 px thumbnails
   correlate below COARSE_FLOOR, are dropped (on 60,000 images 7.3 million pHash candidates, 20,000 left);
3. score: Pearson's correlation of the 128 px views, the better view counting, and for whole frames scoring
   SEARCH_FLOOR or more also the best shift within MAX_SHIFT of the side (crops into a head that fills the
   frame, which the head box does not undo). A pair scoring NEAR_COPY_SCORE or more is a copy.

At any size: fingerprints are made one image at a time as loading streams the images (clip_adapt.data), and
kept small (about 26 KB an image, Fingerprints); the nearest train images are found a block of test images at a
time, candidates are screened and scored in blocks, and hash candidates come from a multi-index search beyond
about 100,000 images (hash_candidates): memory grows with the number of images, never with their pairs.

Where this differs from the previous, lost implementation (bounding box of the non-background pixels, plain
correlation, threshold 0.94): a bounding box jumps when JPEG noise or a new contrast flips a few edge pixels
(measured: a quality-30 re-encode then scored as low as 0.43), and without equalisation a gamma of 0.7 did too;
with equalisation distinct slices at the same level look more alike, hence the higher threshold.

Threshold, measured on ../shared/data/brain_mri (README, "Near copies"): the weakest copy found by eye scores
0.960, the closest distinct pair 0.956. Measured limits are in the README and tests/test_duplicates.py.
"""

import hashlib
from collections import defaultdict
from itertools import combinations
from math import comb

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
MINI_SIZE = 8
MINI_FLOOR = 0.93    # 8 px correlation below which a candidate pair is dropped (weakest copy in the tests: 0.963)
COARSE_FLOOR = 0.85  # 32 px correlation below which a candidate pair is not scored at 128 px (weakest copy: 0.935)
WORKING_SIZE = 384   # images are reduced to about this side before the views are cut
SEARCH_FLOOR = 0.8   # 128 px score below which no shift is tried
MAX_SHIFT = 0.05   # of the side, in the shift search
HASH_CHUNKS = 4   # substrings of the pHash in the multi-index search (hash_candidates)


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


def fingerprint(img: Image.Image) -> tuple:
    """What the check keeps of one image, per view (whole frame, head box): its pHash, its 128 px pixels
    (uint8, packed: see packed) and its 32 px thumbnail (uint8). Small enough to keep for every image of a large
    set, and made one image at a time, so that loading can compute it as each image goes by."""
    views = grey_views(img)
    hashes = [int.from_bytes(np.packbits(imagehash.phash(v).hash.ravel()).tobytes(), "big") for v in views]
    fine = [packed(np.asarray(v)) for v in views]
    thumbs = [np.asarray(v.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)).ravel() for v in views]
    return hashes, fine, thumbs


def packed(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A grey image as a bit per pixel for where it is not black, and the values there: about 3/4 of its
    bytes on MRI scans (black around the head) at a sixth of the time of zlib's fastest level."""
    return np.packbits(pixels.ravel() != 0), pixels.ravel()[pixels.ravel() != 0]


BITS_BYTES = ALIGNED_SIZE ** 2 // 8   # the mask of a packed view
PAGE_BYTES = 1 << 26   # Fingerprints keeps the packed views in pages of 64 MiB


class Fingerprints:
    """The fingerprints of a set of images, about 26 KB an image (MRI scans): pHashes, packed 128 px views
    (about 3/4 of their 32 KB) and uint8 thumbnails. Pixels are standardised block by block as pairs
    are scored, never for the whole set at once. add() one image at a time, or of() a list.

    The packed views are copied into large pages, one after another, rather than kept as the small arrays
    fingerprint() made: those were allocated by the loading threads between decoded images, and kept alive
    there they held on to much more memory than their own (measured: 1.10 GiB added at 28,000 images, of which
    0.68 GiB were the fingerprints)."""

    def __init__(self, capacity: int = 0):
        self.count = 0
        self.hash_rows = np.zeros((2, capacity), dtype=np.uint64)
        self.thumb_rows = np.zeros((2, capacity, THUMB_SIZE ** 2), dtype=np.uint8)
        self.pages: list[np.ndarray] = []
        self.page_used = 0
        self.fine_at = np.zeros((2, capacity, 3), dtype=np.int64)   # page, offset, number of non-black pixels

    @classmethod
    def of(cls, images: list[Image.Image]) -> "Fingerprints":
        fingerprints = cls(len(images))
        for img in images:
            fingerprints.add(fingerprint(img))
        return fingerprints

    def add(self, parts: tuple) -> None:
        hashes, fine, thumbs = parts
        for view in range(2):
            self.hash_rows[view, self.count] = hashes[view]
            self.thumb_rows[view, self.count] = thumbs[view]
            bits, values = fine[view]
            size = BITS_BYTES + len(values)
            if not self.pages or self.page_used + size > len(self.pages[-1]):
                self.pages.append(np.empty(max(PAGE_BYTES, size), dtype=np.uint8))   # untouched: no memory yet
                self.page_used = 0
            page = self.pages[-1]
            page[self.page_used:self.page_used + BITS_BYTES] = bits
            page[self.page_used + BITS_BYTES:self.page_used + size] = values
            self.fine_at[view, self.count] = (len(self.pages) - 1, self.page_used, len(values))
            self.page_used += size
        self.count += 1

    @property
    def hashes(self) -> np.ndarray:
        return self.hash_rows[:, :self.count]

    @property
    def thumbs(self) -> np.ndarray:
        """(view, image, pixel) uint8 32 px thumbnails; standardised() where a correlation is wanted."""
        return self.thumb_rows[:, :self.count]

    def pixels(self, view: int, images: np.ndarray) -> np.ndarray:
        """The 128 px views of these images, unpacked: (len(images), 128, 128) uint8."""
        pixels = np.zeros((len(images), ALIGNED_SIZE ** 2), dtype=np.uint8)
        for row, image in zip(pixels, images):
            page, offset, count = self.fine_at[view, image]
            stored = self.pages[page][offset:offset + BITS_BYTES + count]
            row[np.unpackbits(stored[:BITS_BYTES]).astype(bool)] = stored[BITS_BYTES:]
        return pixels.reshape(len(images), ALIGNED_SIZE, ALIGNED_SIZE)

    def minis(self, block: int = 8192) -> np.ndarray:
        """(view, image, MINI_SIZE²) standardised MINI_SIZE px thumbnails, box means of the 32 px ones: 256 bytes
        an image and view, so that they can be made for the whole set at once."""
        k = THUMB_SIZE // MINI_SIZE
        out = np.zeros((2, self.count, MINI_SIZE ** 2), dtype=np.float32)
        for view in range(2):
            for start in range(0, self.count, block):
                thumbs = self.thumbs[view, start:start + block].reshape(-1, MINI_SIZE, k, MINI_SIZE, k)
                out[view, start:start + block] = standardised(thumbs.mean((2, 4), dtype=np.float32))
        return out

    def mini_score(self, pairs: np.ndarray, minis: np.ndarray | None = None, block: int = 1 << 16) -> np.ndarray:
        """Correlation of the MINI_SIZE px thumbnails (minis(), or made here), the better of the two views: the
        cheapest look, for the many pairs whose pHashes alone made them candidates."""
        minis = self.minis() if minis is None else minis
        scores = np.zeros(len(pairs), dtype=np.float32)
        for start in range(0, len(pairs), block):
            i, j = pairs[start:start + block, 0], pairs[start:start + block, 1]
            scores[start:start + block] = np.max([np.einsum("ij,ij->i", m[i], m[j]) for m in minis], axis=0)
        return scores

    def coarse_score(self, pairs: np.ndarray, block: int = 8192) -> np.ndarray:
        """Correlation of the 32 px thumbnails, the better of the two views: a cheap first look."""
        scores = np.zeros(len(pairs), dtype=np.float32)
        for start in range(0, len(pairs), block):
            i, j = pairs[start:start + block, 0], pairs[start:start + block, 1]
            scores[start:start + block] = np.max([np.einsum("ij,ij->i", standardised(t[i]), standardised(t[j]))
                                                  for t in self.thumbs], axis=0)
        return scores

    def score(self, pairs: np.ndarray, block: int = 512) -> np.ndarray:
        """Correlation of the 128 px images of each (i, j) pair: the best of the two views, and of the whole
        frames shifted against each other by up to MAX_SHIFT of their side (a crop or a shift that the head
        box did not undo: heads that fill the frame). In blocks of pairs: each block's images are unpacked
        and standardised once."""
        scores = np.zeros(len(pairs), dtype=np.float32)
        for start in range(0, len(pairs), block):
            members, where = np.unique(pairs[start:start + block], return_inverse=True)
            i, j = where.reshape(-1, 2).T
            whole = self.pixels(0, members)
            best = correlation(standardised(whole), i, j)
            other = np.flatnonzero(best < NEAR_COPY_SCORE)   # the head box only where the whole frame is no copy
            if len(other):
                head = standardised(self.pixels(1, members))
                best[other] = np.maximum(best[other], correlation(head, i[other], j[other]))
            search = np.flatnonzero((best < NEAR_COPY_SCORE) & (best >= SEARCH_FLOOR))
            if len(search):
                best[search] = np.maximum(best[search], shifted_score(whole[i[search]], whole[j[search]]))
            scores[start:start + block] = best
        return scores


def shifted_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Best shift of whole frames b against a, found at 64 px (every whole-pixel shift), then scored at 128 px."""
    size = a.shape[1]
    half_a, half_b = (x.reshape(len(x), size // 2, 2, size // 2, 2).mean((2, 4), dtype=np.float32) for x in (a, b))
    reach = max(1, round(MAX_SHIFT * size / 2))
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    at_half = np.stack([window_correlation(half_a, half_b, dy, dx) for dy, dx in shifts], 1)
    chosen = at_half.argmax(1)
    result = np.zeros(len(a), dtype=np.float32)
    for k in np.unique(chosen):
        rows = np.flatnonzero(chosen == k)
        dy, dx = shifts[k]
        result[rows] = window_correlation(a[rows], b[rows], 2 * dy, 2 * dx)
    return result


def correlation(standard: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", standard[i], standard[j])


def window_correlation(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Correlation of the overlap of image stacks a and b, b moved by (dy, dx) pixels."""
    h, w = a.shape[1:]
    a = a[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    b = b[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return np.einsum("ij,ij->i", standardised(a), standardised(b))


def hash_candidates(hashes: np.ndarray, max_bits: int = CANDIDATE_BITS) -> np.ndarray:
    """All pairs i < j whose 64-bit pHashes differ in at most max_bits bits: by multi-index hashing for a
    large set, by comparing all pairs (in blocks) for a smaller one, where that is cheaper. Measured with numpy
    on 60,000 clustered hashes (2-core AMD EPYC, shared): all pairs 39 s, multi-index 63 s; the first grows
    with the square of the set, the second about linearly, so they cross near 100,000 images."""
    if len(hashes) <= 36 * HASH_CHUNKS * lookups_per_chunk(max_bits, HASH_CHUNKS):
        return all_pairs_candidates(hashes, max_bits)
    return multi_index_candidates(hashes, max_bits)


def lookups_per_chunk(max_bits: int, chunks: int) -> int:
    return sum(comb(64 // chunks, r) for r in range(max_bits // chunks + 1))


def all_pairs_candidates(hashes: np.ndarray, max_bits: int = CANDIDATE_BITS, block: int = 256) -> np.ndarray:
    """All pairs i < j whose pHashes differ in at most max_bits bits, every pair compared, in blocks."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, len(hashes), block):
        distance = np.bitwise_count(hashes[start:start + block, None] ^ hashes[None, start:])
        i, j = np.nonzero(distance <= max_bits)
        keep = i < j
        found.append(np.stack([i[keep] + start, j[keep] + start], 1))
    return np.concatenate(found)


def multi_index_candidates(hashes: np.ndarray, max_bits: int = CANDIDATE_BITS, chunks: int = HASH_CHUNKS,
                           most_at_once: int = 1 << 22) -> np.ndarray:
    """All pairs i < j whose 64-bit pHashes differ in at most max_bits bits, without comparing all pairs:
    multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012). The hash is cut into `chunks` substrings; by
    pigeonhole a pair within max_bits differs in at most max_bits // chunks bits in one of them. So for every
    substring and every way of flipping that many bits, each image looks up the images whose substring equals
    its own flipped one (a table of where each value starts in the sorted order), and each such candidate is
    checked on the whole hash. At most most_at_once lookups or candidates are held at a time.

    Four 16-bit substrings (3 bits flipped: 697 lookups each), not 13 of 4-5 bits compared whole: a 5-bit
    substring has only 32 values, so each bucket would hold 1/32 of the set and the candidates would be
    13/32 of all pairs, more work than comparing them all."""
    width = 64 // chunks
    flips = np.array([sum(1 << bit for bit in bits) for r in range(max_bits // chunks + 1)
                      for bits in combinations(range(width), r)], dtype=np.int64)
    queries_at_once = max(1, most_at_once // len(flips))
    found = [np.zeros((0, 2), dtype=np.int64)]
    for chunk in range(chunks):
        keys = ((hashes >> np.uint64(chunk * width)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=1 << width))])
        for first in range(0, len(hashes), queries_at_once):
            query = np.repeat(np.arange(first, min(first + queries_at_once, len(hashes))), len(flips))
            target = keys[query] ^ np.tile(flips, len(query) // len(flips))
            low, counts = starts[target], starts[target + 1] - starts[target]
            ends = np.cumsum(counts)
            cut = 0
            while cut < len(query):   # lookups in slices of at most most_at_once candidates
                stop = max(cut + 1, int(np.searchsorted(ends, (ends[cut - 1] if cut else 0) + most_at_once)))
                sliced = counts[cut:stop]
                i = np.repeat(query[cut:stop], sliced)
                offset = np.arange(len(i)) - np.repeat(np.cumsum(sliced) - sliced, sliced)
                j = order[np.repeat(low[cut:stop], sliced) + offset]
                keep = (i < j) & (np.bitwise_count(hashes[i] ^ hashes[j]) <= max_bits)
                found.append(np.stack([i[keep], j[keep]], 1))
                cut = stop
    return np.unique(np.concatenate(found), axis=0)


def nearest_candidates(thumbs: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int = NEAREST_CANDIDATES,
                       block: int = 256) -> np.ndarray:
    """For each query image, its k most correlated pool images by 32 px thumbnail, as (query, pool) pairs.
    Queries go in blocks: a block × pool similarity matrix at a time, never queries × pool. (torch's topk:
    six times faster than np.argpartition here; a search at 16 px would be faster still, but picked another
    nearest image for 7% of the queries on the 28,000-image benchmark set.)"""
    if len(queries) == 0 or len(pool) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    import torch
    k = min(k, len(pool))
    pool_rows = torch.empty((len(pool), thumbs.shape[1]), dtype=torch.float32)
    for start in range(0, len(pool), 8192):   # in blocks: no uint8 copy and float temporaries of the whole pool
        pool_rows[start:start + 8192] = torch.from_numpy(standardised(thumbs[pool[start:start + 8192]]))
    best = []
    for start in range(0, len(queries), block):
        similarity = torch.from_numpy(standardised(thumbs[queries[start:start + block]])) @ pool_rows.T
        best.append(similarity.topk(k, dim=1).indices.numpy())
    return np.stack([np.repeat(queries, k), pool[np.concatenate(best).ravel()]], 1)


def unique_pairs(pair_lists: list[np.ndarray], n: int) -> np.ndarray:
    """The distinct (i, j) rows of the lists, sorted. As one int64 key per pair, sorted and compared with its
    neighbour: on 7.3 million pairs 0.3 s, where np.unique(axis=0) took 17 s and np.unique of the keys 11 s
    (numpy 2.4)."""
    keys = np.sort(np.concatenate([pairs[:, 0].astype(np.int64) * n + pairs[:, 1] for pairs in pair_lists]))
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
    return np.stack([keys // n, keys % n], 1)


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


def find_near_copies(images: "list[Image.Image] | Fingerprints", splits: list[str], exact_hashes: list[str],
                     threshold: float = NEAR_COPY_SCORE) -> dict:
    """Every pair of copies (exact, or near with score >= threshold), their clusters, and each test image's
    nearest train image. Indices refer to the lists given; images may be given as their Fingerprints."""
    fingerprints = images if isinstance(images, Fingerprints) else Fingerprints.of(images)
    splits_array = np.array(splits)
    test, train = np.flatnonzero(splits_array == "test"), np.flatnonzero(splits_array == "train")
    nearest = nearest_candidates(fingerprints.thumbs[0], test, train)   # (test image, train image)
    ordered = np.sort(nearest, axis=1)

    minis = fingerprints.minis()

    def alike(pairs):   # at 8 px, then at 32 px
        pairs = pairs[fingerprints.mini_score(pairs, minis) >= MINI_FLOOR]
        return pairs[fingerprints.coarse_score(pairs) >= COARSE_FLOOR]
    # Only pairs that already look alike at 8 px, then at 32 px, are scored at 128 px: on a large set most pHash
    # candidates are lookalikes (heads framed alike), and most stop at the first, cheapest look. Each view's
    # candidates are screened as they come, so that millions of them are never held together.
    candidates = unique_pairs([alike(hash_candidates(h)) for h in fingerprints.hashes] + [ordered],
                              fingerprints.count)
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
    return {"pairs": pairs, "clusters": clusters_of(len(exact_hashes), copies), "nearest_train": nearest_train,
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


def near_copy_report(images: "list[Image.Image] | Fingerprints", hashes: list[str], splits: list[str], files: list[str]) -> dict:
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
