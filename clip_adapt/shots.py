"""K-shot splits and split files: the protocol of the field's few-shot tables (CoOp, CoCoOp, MaPLe, Tip-Adapter,
BiomedCoOp), docs/k-shot.md.

--shots K draws K training images per class with the split seed, as CoOp's generate_fewshot_dataset does, and
min(K, 4) validation images per class from the validation pool (the dataset's own validation split, or else the
training images not drawn as shots); the test split stays whole. Copies (exact and near, clip_adapt/copies.py)
are kept whole: no shot has a copy in test or among the validation images, and no two shots (nor two validation
images) are copies of one another.

--split-file reads a split in CoOp's JSON format ({"train": [[relative path, label, class name], ...], "val": [...],
"test": [...]}, paths relative to --data, as BiomedCoOp's split_BTMRI.json); every run writes the split it used in
that format (split.json in its output folder), and a run given that file trains and tests on the same images in
the same order.
"""

import json
import os
from pathlib import Path

import numpy as np

from clip_adapt.base import UserError

MAX_VALIDATION_SHOTS = 4   # CoOp: min(K, 4) validation images per class
# CoOp's epochs per K (its COOP.md: the *_ep50 config at 1 shot, *_ep100 at 2 and 4, the 200-epoch one at 8 and 16;
# cosine rate, the last epoch kept). K between the table's: the next table entry up.
COOP_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
SPLIT_KEYS = ("train", "val", "test")


def validation_shots(shots: int) -> int:
    return min(shots, MAX_VALIDATION_SHOTS)


def coop_epochs(shots: int) -> int:
    return next((epochs for k, epochs in COOP_EPOCHS.items() if shots <= k), COOP_EPOCHS[16])


def check_shots(shots: int | list[int] | None) -> None:
    """--shots K, or run_all_experiments.py's several K."""
    if any(k < 1 for k in ([shots] if isinstance(shots, int) else shots or [])):
        raise UserError("--shots must be at least 1 (images per class)")


def check_shots_early(counts: dict[str, int], shots: int | None, own_validation: bool = False) -> None:
    """The cheap check, before any model or image is loaded: each class's training images (counts, by class
    name) hold K shots, and min(K, 4) validation images too where validation is drawn from train."""
    if not shots:
        return
    needed = shots + (0 if own_validation else validation_shots(shots))
    for name, count in counts.items():
        if count < needed:
            raise UserError(f"--shots {shots}: class '{name}' has {count} training images, fewer than the "
                            f"{needed} a {shots}-shot split draws from it ({shots} shots"
                            + ("" if own_validation else f" and {validation_shots(shots)} validation images")
                            + "): pass a smaller --shots")


def draw_shots(labels: np.ndarray, train_pool: np.ndarray, val_pool: np.ndarray | None, clusters: list[list[int]],
               test_images: np.ndarray, shots: int, seed: int, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(shots, validation images), indices into the loaded images, each sorted. train_pool: the images shots are
    drawn from; val_pool: the dataset's own validation images, or None to draw validation from the training
    images left after the shots. clusters: the copy clusters (lists of loaded indices); test_images: the test
    split's indices. Draws with numpy's generator seeded by `seed`, class by class in label order."""
    rng = np.random.default_rng(seed)
    cluster_of = {i: number for number, members in enumerate(clusters) for i in members}
    in_test = set(int(i) for i in test_images)
    reaches_test = {number for number, members in enumerate(clusters) if any(i in in_test for i in members)}

    def unit(i: int):   # copies of one another count as one image
        return ("cluster", cluster_of[i]) if i in cluster_of else ("image", i)

    def draw(pool: np.ndarray, count: int, used: set, what: str, name: str, total: int) -> list[int]:
        eligible = [int(i) for i in pool if cluster_of.get(int(i)) not in reaches_test and unit(int(i)) not in used]
        chosen, units = [], set()
        for i in rng.permutation(np.array(eligible, dtype=np.int64)).tolist() if eligible else []:
            if unit(i) not in units:
                chosen.append(i)
                units.add(unit(i))
            if len(chosen) == count:
                break
        if len(chosen) < count:
            raise UserError(f"--shots {shots}: class '{name}' has {len(units)} {what} to draw {count} from "
                            f"({total} in its pool; a copy of a test image, of a shot or of another drawn image "
                            f"cannot be drawn): pass a smaller --shots")
        used.update(units)
        return chosen

    shot_index, val_index, used = [], [], set()
    for label, name in enumerate(class_names):
        pool = train_pool[labels[train_pool] == label]
        picked = draw(pool, shots, used, "training images", name, len(pool))
        shot_index += picked
        rest = np.setdiff1d(pool, picked) if val_pool is None else val_pool[labels[val_pool] == label]
        val_index += draw(rest, validation_shots(shots), used,
                          "images left for validation" if val_pool is None else "validation images", name, len(rest))
    return np.sort(np.array(shot_index, dtype=np.int64)), np.sort(np.array(val_index, dtype=np.int64))


# --------------------------------------------------------------------------- CoOp-format split files

def read_split_file(path: str, data: str) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """The split file's {"train"|"val"|"test": [(absolute path, label), ...]} and its class names in label
    order, checked: three non-empty lists of [path, label, class name], every file under --data, each label one
    name and each name one label, labels 0..C-1, no file listed twice. One line on the first problem."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"split file {path} does not exist: pass --split-file a JSON file with train, val and "
                        f"test lists of [relative path, label, class name]")
    try:
        split = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"split file {path} is not JSON ({error}): it needs train, val and test lists of "
                        f"[relative path, label, class name]") from None
    if not isinstance(split, dict) or any(not isinstance(split.get(key), list) or not split[key]
                                          for key in SPLIT_KEYS):
        raise UserError(f"split file {path} needs non-empty lists 'train', 'val' and 'test' (CoOp's format); "
                        f"it has {', '.join(split) if isinstance(split, dict) else type(split).__name__}")
    root = Path(data).expanduser()
    names, entries, seen = {}, {}, set()
    for key in SPLIT_KEYS:
        entries[key] = []
        for position, item in enumerate(split[key]):
            where = f"split file {path}, {key}[{position}]"
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or not isinstance(item[2], str)):
                raise UserError(f"{where} is {item!r}, not [relative path, integer label, class name]")
            relative, label, name = item
            if names.setdefault(label, name) != name:
                raise UserError(f"{where}: label {label} is named '{name}' here but '{names[label]}' before: "
                                f"each label needs one class name")
            if relative in seen:
                raise UserError(f"{where}: {relative} is listed twice: each image belongs to one split, once")
            seen.add(relative)
            full = root / relative
            if not full.is_file():
                raise UserError(f"{where}: {full} does not exist: the paths must be relative to --data ({data})")
            entries[key].append((str(full), label))
    by_name = {}
    for label, name in names.items():
        if by_name.setdefault(name, label) != label:
            raise UserError(f"split file {path}: class name '{name}' has labels {by_name[name]} and {label}: "
                            f"each class needs one label")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"split file {path}: the labels are {sorted(names)}, not 0 to {len(names) - 1}: number "
                        f"the classes from 0 without gaps")
    if len(names) < 2:
        raise UserError(f"split file {path} has one class: at least 2 classes are needed")
    return entries, [names[label] for label in range(len(names))]


def split_file_source(path: str, data: str):
    """The split file as the `datasets` DatasetDict load_source returns (undecoded images, integer labels), with
    its own validation split, and the class names."""
    import datasets
    entries, class_names = read_split_file(path, data)
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=class_names)})
    source = datasets.DatasetDict({
        {"val": "validation"}.get(key, key): datasets.Dataset.from_dict(
            {"image": [file for file, _ in rows], "label": [label for _, label in rows]}, features=features)
        for key, rows in entries.items()})
    return source, class_names


def split_record(splits: dict, class_names: list[str]) -> dict:
    """The split a run used, in CoOp's format: {"train"|"val"|"test": [[file, label, class name], ...]}, the file
    names relative to --data (as Split.files holds them)."""
    return {key: [[file, int(label), class_names[int(label)]] for file, label in
                  zip(splits[name].files, splits[name].labels.tolist())]
            for key, name in zip(SPLIT_KEYS, ("train", "val", "test"))}


def relative_to(path: str, root: str | None) -> str | None:
    """path relative to root when it lies under it (file names in outputs and split files), else None."""
    if root is None:
        return None
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(os.path.expanduser(root)))
    return None if relative.startswith("..") else relative
