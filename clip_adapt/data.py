"""Loading an image-classification dataset (the MRI images by default): from an image folder, a save_to_disk
directory or the Hugging Face hub, checked, de-duplicated, preprocessed once by CLIP's own image processor
and split into train / validation / test."""

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from clip_adapt import timing
from clip_adapt.base import UserError
from clip_adapt.copies import NEAR_COPY_SCORE, find_duplicates, near_copy_report, pixel_hash
from clip_adapt.progress import progress_bar

DEFAULT_DATA = "aggr8/brain_mri_train_test_split"
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data" / "brain_mri"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
READABLE_NAMES = {"notumor": "no tumor"}
DEVICE_SHARE = 0.5   # of the GPU's free memory the images may take; the rest is for the model and activations
PREPROCESS_CHUNK = 256   # images per call of the processor; chunks run in parallel threads
VALIDATION_SPLIT = "validation"   # used as such when a dataset has one
CONTACT_PAIRS = 8   # closest cross-split pairs kept for the contact sheet


def readable(class_name: str) -> str:
    return READABLE_NAMES.get(class_name, class_name.replace("_", " "))


def looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")


@dataclass
class Split:
    """One split's model inputs and labels. Inputs are images resized and cropped by CLIP's processor but kept
    as uint8 (a quarter of fp32), normalised with the processor's `mean` and `std` batch by batch on the
    device (model_inputs); or any float tensor the model takes as it is (E2's cached embeddings)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    mean: tuple[float, ...] | None = None   # set for uint8 pixels
    std: tuple[float, ...] | None = None

    def __len__(self):
        return len(self.labels)

    def with_inputs(self, inputs: torch.Tensor) -> "Split":
        return Split(inputs, self.labels, self.files)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.inputs[index.to(self.inputs.device)], self.labels[index.to(self.labels.device)],
                     [self.files[i] for i in index.tolist()], self.mean, self.std)

    def to(self, device) -> "Split":
        """Pinned host inputs stay on the host (they did not fit the device); batches move as they are used."""
        inputs = self.inputs if self.inputs.is_pinned() else self.inputs.to(device)
        return Split(inputs, self.labels.to(device), self.files, self.mean, self.std)

    def model_inputs(self, index=None, device=None) -> torch.Tensor:
        """The inputs the model takes, for `index` (all when None), on `device`: uint8 pixels become
        CLIP-normalised floats there, after the copy, so the copy moves a quarter of the bytes."""
        inputs = self.inputs
        if index is not None:
            inputs = inputs[index.to(inputs.device) if isinstance(index, torch.Tensor) else index]
            if self.inputs.is_pinned():
                inputs = inputs.pin_memory()   # gathered rows are pageable; pinned ones copy asynchronously
        inputs = inputs.to(device or inputs.device, non_blocking=True)
        if inputs.dtype != torch.uint8:
            return inputs
        mean = torch.tensor(self.mean, device=inputs.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=inputs.device).view(1, -1, 1, 1)
        return (inputs.float() / 255 - mean) / std


@dataclass
class MRIData:
    class_names: list[str]          # readable: "no tumor", not "notumor"
    train: Split
    val: Split
    test: Split
    report: dict = field(default_factory=dict)   # duplicates and skipped files, written to outputs
    closest_pairs: list = field(default_factory=list)   # (score, test name, test image, train name, train image)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to(self, device) -> "MRIData":
        """All images on the device once when they fit (800 at 224 px are 120 MB as uint8): no per-batch copies,
        no loader workers. When they would take more than DEVICE_SHARE of the GPU's free memory, they stay in
        pinned host memory instead and each batch is copied as it is used."""
        device = torch.device(device)
        splits = [self.train, self.val, self.test]
        if device.type == "cuda":
            size = sum(s.inputs.numel() * s.inputs.element_size() for s in splits)
            free, _ = torch.cuda.mem_get_info(device)
            if size > DEVICE_SHARE * free:
                print(f"data: {size / 2**30:.1f} GB of images do not fit in {DEVICE_SHARE:.0%} of the GPU's free "
                      f"{free / 2**30:.1f} GB: kept in pinned host memory, copied batch by batch")
                splits = [Split(s.inputs.pin_memory(), s.labels, s.files, s.mean, s.std) for s in splits]
        return MRIData(self.class_names, *(s.to(device) for s in splits), self.report,
                       self.closest_pairs)


# --------------------------------------------------------------------------- reading the source

def check_image_folder(root: Path) -> None:
    """ImageFolder layout checks that `datasets` would otherwise pass over silently."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: pass --data a folder holding "
                        f"train/<class>/* and test/<class>/*, or a Hugging Face dataset id")
    classes = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} is missing: the data folder needs train/<class>/* and test/<class>/*")
        classes[split] = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not classes[split]:
            raise UserError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
        for name in classes[split]:
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (split_dir / name).iterdir()):
                raise UserError(f"class folder {split_dir / name} holds no images: add some or remove the folder")
    if classes["train"] != classes["test"]:
        raise UserError(f"train and test have different class folders ({', '.join(classes['train'])} vs "
                        f"{', '.join(classes['test'])}): both splits need the same classes")


def is_local(data: str) -> bool:
    return Path(data).expanduser().exists() or not looks_like_hub_id(data)


def check_data_early(data: str) -> None:
    """The cheap checks of --data, made before any model is loaded: a wrong path fails at once with a message
    about the data, not after the model hub's retries."""
    if is_local(data) and not is_saved_dataset(Path(data).expanduser()):
        check_image_folder(Path(data).expanduser())


def is_saved_dataset(root: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a DatasetDict, or a single Dataset)."""
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def image_files(root: Path) -> dict[str, list[str]]:
    """Every image under train/ and test/, following symbolic links (data on shared storage), which the
    `datasets` folder search does not."""
    return {split: sorted(os.path.join(folder, name)
                          for folder, _, names in os.walk(root / split, followlinks=True) for name in names
                          if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."))
            for split in ("train", "test")}


def load_source(data: str, image_column: str | None = None, label_column: str | None = None,
                test_split: str = "test", class_names: list[str] | None = None):
    """Returns the `datasets` DatasetDict with undecoded images in an 'image' column and integer labels in a
    'label' column, so that we decode (and name bad files) ourselves, and the class names."""
    import datasets
    datasets.disable_progress_bars()
    if is_local(data) and is_saved_dataset(Path(data).expanduser()):
        source = datasets.load_from_disk(str(Path(data).expanduser()))
        if not isinstance(source, datasets.DatasetDict):
            raise UserError(f"{data} holds a single dataset saved with save_to_disk; it needs train and "
                            f"{test_split} splits: save a DatasetDict")
    elif is_local(data):
        root = Path(data).expanduser()
        check_image_folder(root)
        source = datasets.load_dataset("imagefolder", data_files=image_files(root))
    else:
        try:
            source = datasets.load_dataset(data)
        except Exception as error:   # the hub raises many types: offline, not found, gated, ...
            raise UserError(f"could not load dataset '{data}' from the Hugging Face hub "
                            f"({type(error).__name__}); pass --data a local folder with train/<class>/* "
                            f"and test/<class>/* instead") from None
    missing = {"train", test_split} - set(source)
    if missing:
        raise UserError(f"dataset '{data}' has no {' or '.join(sorted(missing))} split (it has "
                        f"{', '.join(source)}); pass --test-split to name its held-out split")
    kept = ["train", test_split] + ([VALIDATION_SPLIT] if VALIDATION_SPLIT in source else [])
    source = datasets.DatasetDict({name: source[name] for name in kept})
    features = source["train"].features
    image_column = pick_column(features, image_column, datasets.Image, "image", data)
    label_column = pick_column(features, label_column, datasets.ClassLabel, "label", data)
    label = features[label_column]
    if class_names and len(set(class_names)) != len(class_names):
        raise UserError("--class-names has a name twice: every class needs its own name")
    if isinstance(label, datasets.ClassLabel):
        names = label.names
        if class_names and len(class_names) != len(names):
            raise UserError(f"--class-names gives {len(class_names)} names but column '{label_column}' has "
                            f"{len(names)} classes")
        names = class_names or names
    elif getattr(label, "dtype", "").startswith(("int", "uint")):
        if not class_names:
            raise UserError(f"column '{label_column}' holds integer labels without class names: pass "
                            f"--class-names with one name per label, in label order")
        largest = max(max(source[name][label_column]) for name in source)
        if largest >= len(class_names) or min(min(source[name][label_column]) for name in source) < 0:
            raise UserError(f"column '{label_column}' has labels 0..{largest} but --class-names gives "
                            f"{len(class_names)} names")
        names = class_names
    else:
        raise UserError(f"column '{label_column}' is of type {label}, not a class label: pass --label-column "
                        f"a ClassLabel or integer column")
    source = source.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    if renames:
        source = source.rename_columns(renames)
    return source.cast_column("image", datasets.Image(decode=False)), list(names)


def pick_column(features, asked: str | None, kind, what: str, data: str) -> str:
    """The column the user named, or the only column of the right type."""
    def kind_of(feature) -> str:
        return feature.dtype if type(feature).__name__ == "Value" else type(feature).__name__
    described = ", ".join(f"{name} ({kind_of(feature)})" for name, feature in features.items())
    if asked is not None:
        if asked not in features:
            raise UserError(f"dataset '{data}' has no column '{asked}'; its columns are {described}")
        if kind.__name__ == "Image" and not isinstance(features[asked], kind):
            raise UserError(f"column '{asked}' does not hold images; the columns are {described}")
        return asked
    candidates = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(candidates) != 1:
        kind_name = "Image" if what == "image" else "ClassLabel"
        raise UserError(f"dataset '{data}' has {len(candidates) or 'no'} {kind_name} columns: pass "
                        f"--{what}-column; its columns are {described}")
    return candidates[0]


def open_rgb(image: dict) -> Image.Image:
    """Any mode (L, RGBA, P, ...) and any format whatever the file name says, as RGB."""
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(source) as img:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent areas become black, the background of an MRI slice, not the colour hidden behind alpha.
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


# --------------------------------------------------------------------------- the whole pipeline

def preprocess(images: list[Image.Image], image_processor, workers: int | None = None) -> torch.Tensor:
    """CLIP's resize and crop, in parallel threads (PIL releases the GIL while it resamples), into one
    preallocated uint8 tensor: no fp32 copy of the whole set ever exists. Rescaling and normalisation, the
    processor's other two steps, are done per batch on the device (Split.model_inputs)."""
    from concurrent.futures import ThreadPoolExecutor

    def chunk(start: int) -> torch.Tensor:
        return image_processor(images[start:start + PREPROCESS_CHUNK], do_rescale=False, do_normalize=False,
                               return_tensors="pt")["pixel_values"]

    starts = range(0, len(images), PREPROCESS_CHUNK)
    first = chunk(0)
    if first.dtype != torch.uint8:
        raise UserError(f"the image processor returned {first.dtype} pixels before normalisation, not uint8: "
                        f"use a CLIP image processor")
    pixels = torch.empty((len(images), *first.shape[1:]), dtype=torch.uint8)
    pixels[:len(first)] = first
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        results = progress_bar(pool.map(chunk, starts[1:]), "preprocessing images", total=len(starts),
                               unit="chunk", initial=1)   # of PREPROCESS_CHUNK images
        for result, start in zip(results, starts[1:]):   # results first: the bar sees its end
            pixels[start:start + len(result)] = result
    return pixels



def stratified_val_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    num_classes = len(np.unique(labels))
    num_val = max(round(fraction * len(labels)), num_classes)   # at least one image of every class
    if np.bincount(labels).min() < 2 or len(labels) - num_val < num_classes:
        raise UserError(f"train has too few images ({len(labels)}) to carve a stratified validation split "
                        f"with one image per class: add images or lower --val-fraction")
    indices = np.arange(len(labels))
    train, val = train_test_split(indices, test_size=num_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def grouped_val_indices(labels: np.ndarray, groups: list[list[int]], fraction: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified validation split in which each group (a cluster of copies) goes wholly to one side: the
    stratified split is drawn over units, a unit being a cluster (labelled by its most common label) or a
    single image. With no groups it is stratified_val_indices exactly."""
    in_group = {i for g in groups for i in g}
    units = [list(g) for g in groups] + [[i] for i in range(len(labels)) if i not in in_group]
    if len(units) == len(labels):
        return stratified_val_indices(labels, fraction, seed)
    units.sort(key=min)
    unit_labels = np.array([np.bincount(labels[u]).argmax() for u in units])
    unit_train, unit_val = stratified_val_indices(unit_labels, fraction, seed)
    return (np.sort(np.concatenate([units[u] for u in unit_train])),
            np.sort(np.concatenate([units[u] for u in unit_val])))


def load_data(data: str, image_processor, val_fraction: float = 0.15, seed: int = 0,
              skip_bad_images: bool = False, drop_test_duplicates: bool = False, image_column: str | None = None,
              label_column: str | None = None, test_split: str = "test",
              class_names: list[str] | None = None, duplicates: str = "near") -> MRIData:
    """A dataset's own `validation` split is used as the validation set; without one, a stratified share of
    train is carved out. `test_split` names the held-out split (some datasets call it 'validation' or 'val')."""
    source, class_names = load_source(data, image_column, label_column, test_split, class_names)
    images, labels, splits, files, skipped = [], [], [], [], []
    own_validation = VALIDATION_SPLIT in source and test_split != VALIDATION_SPLIT
    for split, source_split in (("train", "train"), *((("val", VALIDATION_SPLIT),) if own_validation else ()),
                                ("test", test_split)):
        rows = source[source_split]
        for index, row in enumerate(progress_bar(rows, f"reading {source_split} images", total=len(rows),
                                                 unit="image")):
            path = row["image"].get("path")
            name = relative_name(path) if path else f"{source_split}[{index}]"
            try:
                images.append(open_rgb(row["image"]))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                if not skip_bad_images:
                    raise UserError(f"cannot read image {name} ({error}); fix or remove it, "
                                    f"or pass --skip-bad-images to leave it out") from None
                skipped.append(name)
                continue
            labels.append(row["label"])
            splits.append(split)
            files.append(name)

    if duplicates not in ("exact", "near"):
        raise UserError(f"--duplicates must be exact or near, not {duplicates}")
    mode = duplicates
    with timing.phase("copy_check"):
        hashes = [pixel_hash(img) for img in images]
        duplicates = near_copy_report(images, hashes, splits, files) if mode == "near" else find_duplicates(
            hashes, splits, files)
    clusters = duplicates.pop("clusters")
    keep = np.ones(len(images), dtype=bool)
    if drop_test_duplicates:   # the train members of every cluster that reaches into test, however it got there
        leaked = [i for members in clusters if any(splits[j] == "test" for j in members)
                  for i in members if splits[i] == "train"]
        keep[leaked] = False
    dropped = [files[i] for i in np.flatnonzero(~keep)]

    closest = []
    if mode == "near":
        nearest = duplicates["nearest_train_of_test"]
        # The closest pairs, and the closest that are not copies: the near misses show what the threshold rejects.
        shown = nearest[:CONTACT_PAIRS] + [p for p in nearest[CONTACT_PAIRS:] if p["score"] < NEAR_COPY_SCORE][:4]
        closest = [(p["score"], p["test"], images[p["test_index"]].copy(), p["train"],
                    images[p["train_index"]].copy()) for p in shown]
    pixels = preprocess([img for img, k in zip(images, keep) if k], image_processor)
    labels = np.array(labels)[keep]
    splits_before = splits
    splits = np.array(splits)[keep]
    files = [f for f, k in zip(files, keep) if k]

    train_all = np.flatnonzero(splits == "train")
    test = np.flatnonzero(splits == "test")
    if own_validation:
        train, val = train_all, np.flatnonzero(splits == "val")
    else:
        position = {old: new for new, old in enumerate(np.flatnonzero(keep))}
        train_position = {i: p for p, i in enumerate(train_all)}
        train_groups = [[train_position[position[i]] for i in members
                         if i in position and splits_before[i] == "train"] for members in clusters]
        train_pos, val_pos = grouped_val_indices(labels[train_all], [g for g in train_groups if len(g) > 1],
                                                 val_fraction, seed)
        train, val = train_all[train_pos], train_all[val_pos]

    def subset(indices):
        return Split(pixels[indices], torch.as_tensor(labels[indices]), [files[i] for i in indices],
                     tuple(image_processor.image_mean), tuple(image_processor.image_std))

    report = {"duplicate_check": mode, **duplicates, "dropped_train_duplicates": dropped, "skipped_images": skipped,
              "source": data, "num_images": {"train": len(train), "val": len(val), "test": len(test)},
              "validation": "the dataset's own split" if own_validation else f"{val_fraction:g} of train"}
    return MRIData([readable(c) for c in class_names], subset(train), subset(val), subset(test), report, closest)


def relative_name(path: str) -> str:
    """File names in outputs read as split/class/file rather than as absolute paths of one machine."""
    parts = Path(path).parts
    return os.path.join(*parts[-3:]) if len(parts) >= 3 else path
