"""Loading an image-classification dataset (the MRI images by default): from an image folder, a save_to_disk
directory or the Hugging Face hub, checked, de-duplicated, preprocessed once by CLIP's own image processor
and split into train / validation / test."""

import io
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip_adapt import timing
from clip_adapt.base import UserError, is_main_process
from clip_adapt.copies import (NEAR_COPY_SCORE, Fingerprints, find_duplicates, fingerprint, near_copy_report,
                              pixel_hash)
from clip_adapt.progress import progress_bar
from clip_adapt.shots import check_shots_early, draw_shots, relative_to, split_file_source

DEFAULT_DATA = "aggr8/brain_mri_train_test_split"
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data" / "brain_mri"
STUDY_CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]   # the reproduced study's four, as folders
STUDY_SIZES = {"train": 480, "test": 320}   # its images per split
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
READABLE_NAMES = {"notumor": "no tumor"}
DEVICE_SHARE = 0.5   # of the GPU's free memory the images may take; the rest is for the model and activations
PREPROCESS_CHUNK = 256   # images per call of the processor; chunks run in parallel threads
STREAM_CHUNK = 32   # images decoded at a time per thread while loading: a bounded working set
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
    on_host: bool = False   # kept in host memory (pinned where CUDA is) because they did not fit the device
    constants: dict = field(default_factory=dict, repr=False, compare=False)   # device -> (mean, std) tensors

    def __len__(self):
        return len(self.labels)

    def with_inputs(self, inputs: torch.Tensor) -> "Split":
        return Split(inputs, self.labels, self.files)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.inputs[index.to(self.inputs.device)], self.labels[index.to(self.labels.device)],
                     [self.files[i] for i in index.tolist()], self.mean, self.std)

    def to(self, device) -> "Split":
        """Inputs kept on the host stay there (they did not fit the device); batches move as they are used."""
        inputs = self.inputs if self.on_host else self.inputs.to(device)
        return Split(inputs, self.labels.to(device), self.files, self.mean, self.std, self.on_host)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The order train() visits the examples in for one epoch: a random permutation."""
        return torch.randperm(len(self), generator=generator)

    def kept_on_host(self) -> "Split":
        return Split(host_copy(self.inputs), self.labels, self.files, self.mean, self.std, on_host=True)

    @property
    def host_indices(self) -> bool:
        """Whether batches() wants its indices on the host: inputs kept there are gathered there."""
        return self.on_host

    def model_inputs(self, index=None, device=None) -> torch.Tensor:
        """The inputs the model takes, for `index` (all when None), on `device`: uint8 pixels become
        CLIP-normalised floats there, after the copy, so the copy moves a quarter of the bytes."""
        inputs = self.inputs
        if index is not None:
            inputs = inputs[index.to(inputs.device) if isinstance(index, torch.Tensor) else index]
            if self.inputs.is_pinned():
                inputs = inputs.pin_memory()   # gathered rows are pageable; pinned ones copy asynchronously
        return self.normalised(inputs.to(device or inputs.device, non_blocking=True))

    def normalised(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype != torch.uint8:
            return inputs
        mean, std = self.normalisation(inputs.device)
        return (inputs.float() / 255 - mean) / std

    def batches(self, indices: list[torch.Tensor | None], device,
                prefetch: bool | None = None) -> "Iterator[torch.Tensor | None]":
        """model_inputs(index, device) for each index (None: yields None), in order. Inputs held in pinned host
        memory are gathered by a background thread into one of two preallocated pinned buffers, the next batch
        while the current one is used; the indices stay on the host, so no step waits for the device to send
        them back. Inputs anywhere else are gathered on their device as each batch is asked for (prefetch=True
        takes the first way anyway, with pageable buffers where nothing can be pinned: how it is tested)."""
        if not (self.on_host if prefetch is None else prefetch):
            yield from (None if index is None else self.model_inputs(index, device) for index in indices)
            return
        from concurrent.futures import ThreadPoolExecutor
        largest = max((len(index) for index in indices if index is not None), default=0)
        buffers = [torch.empty((largest, *self.inputs.shape[1:]), dtype=self.inputs.dtype,
                               pin_memory=torch.cuda.is_available())
                   for _ in range(2)]
        copied = [None, None]   # the event after each buffer's last copy to the device: wait before refilling

        def gather(k: int, index: torch.Tensor | None) -> torch.Tensor | None:
            if index is None:
                return None
            if copied[k % 2] is not None:
                copied[k % 2].synchronize()
            return torch.index_select(self.inputs, 0, index.cpu(), out=buffers[k % 2][:len(index)])

        with ThreadPoolExecutor(1) as pool:
            upcoming = pool.submit(gather, 0, indices[0]) if indices else None
            for k in range(len(indices)):
                rows = upcoming.result()
                if k + 1 < len(indices):
                    upcoming = pool.submit(gather, k + 1, indices[k + 1])
                if rows is None:
                    yield None
                    continue
                on_device = rows.to(device, non_blocking=True)
                if on_device.is_cuda:
                    copied[k % 2] = torch.cuda.Event()
                    copied[k % 2].record()
                yield self.normalised(on_device)

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's mean and std as tensors on `device`, made once per device: a tensor made from a tuple
        is a blocking host-to-device copy, which on every step would keep the host from queuing the next one."""
        if device not in self.constants:
            self.constants[device] = tuple(torch.tensor(values, device=device).view(1, -1, 1, 1)
                                           for values in (self.mean, self.std))
        return self.constants[device]


@dataclass
class MRIData:
    class_names: list[str]          # readable: "no tumor", not "notumor"
    train: Split
    val: Split
    test: Split
    report: dict = field(default_factory=dict)   # duplicates and skipped files, written to outputs
    closest_pairs: list = field(default_factory=list)   # (score, test name, test image, train name, train image)
    # A copy-group id per image of train followed by val: copies (exact or near) share one, so that
    # cross-validation folds keep them together (clip_adapt/probe.py). None: every image its own group.
    copy_groups: np.ndarray | None = None

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to(self, device) -> "MRIData":
        """All images on the device once when they fit (800 at 224 px are 120 MB as uint8): no per-batch copies,
        no loader workers. When they would take more than DEVICE_SHARE of the GPU's free memory, they stay in
        pinned host memory instead and each batch is copied as it is used."""
        splits = placed([self.train, self.val, self.test], device)
        return MRIData(self.class_names, *(s.to(device) for s in splits), self.report, self.closest_pairs,
                       self.copy_groups)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes the device has free for new tensors; None for the host itself (no limit that placement could
    choose by). PyTorch's cached blocks count as free for its own tensors: without them the choice could flip
    between the experiments of one run_all, as the cache grows."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def placed(splits: list[Split], device) -> list[Split]:
    """The rule for every data set's images (classification and captions): on the device once when they fit in
    DEVICE_SHARE of its free memory (no per-batch copies, no loader workers); otherwise kept in host memory
    (pinned where CUDA is), each batch gathered there and copied as it is used. Only the main process says so."""
    size = sum(s.inputs.numel() * s.inputs.element_size() for s in splits)
    free = free_device_memory(device)
    if free is None or size <= DEVICE_SHARE * free:
        return splits
    if is_main_process():
        print(f"data: {size / 2**30:.2f} GB of images do not fit in {DEVICE_SHARE:.0%} of the device's free "
              f"{free / 2**30:.2f} GB: kept in host memory, copied batch by batch")
    return [s.kept_on_host() for s in splits]


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in pinned memory where CUDA is (copies to the GPU then run asynchronously), else a plain one."""
    return pinned_copy(tensor) if torch.cuda.is_available() else tensor.clone()


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """One pinned allocation of exactly the tensor's size, then a copy: Tensor.pin_memory() goes through the
    caching host allocator, which rounds up to a power of two (9 GB of images would pin 16 GB)."""
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return pinned.copy_(tensor)


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
    if len(classes["train"]) < 2:
        raise UserError(f"{root / 'train'} has one class folder ({classes['train'][0]}): at least 2 classes are "
                        f"needed, one folder each, in train/ and test/")
    if classes["train"] != classes["test"]:
        raise UserError(f"train and test have different class folders ({', '.join(classes['train'])} vs "
                        f"{', '.join(classes['test'])}): both splits need the same classes")


def is_local(data: str) -> bool:
    return Path(data).expanduser().exists() or not looks_like_hub_id(data)


def check_data_early(data: str, shots: int | None = None, split_file: str | None = None) -> None:
    """The cheap checks of --data (and --shots, --split-file), made before any model is loaded: a wrong path
    fails at once with a message about the data, not after the model hub's retries."""
    if split_file:
        if not is_local(data) or is_saved_dataset(Path(data).expanduser()) or not Path(data).expanduser().is_dir():
            raise UserError(f"--split-file lists image files relative to --data, which must be a local folder "
                            f"(not {data})")
        from clip_adapt.shots import read_split_file
        entries, names = read_split_file(split_file, data)
        labels = np.array([label for _, label in entries["train"]])
        check_shots_early({name: int((labels == c).sum()) for c, name in enumerate(names)}, shots, True)
        return
    if is_local(data) and not is_saved_dataset(Path(data).expanduser()):
        root = Path(data).expanduser()
        check_image_folder(root)
        if shots:
            files = image_files(root)["train"]
            check_shots_early({name: sum(Path(f).parent.name == name for f in files)
                               for name in sorted(d.name for d in (root / "train").iterdir() if d.is_dir())}, shots)


def is_study_data(data: str) -> bool:
    """Whether --data is the reproduced study's: its hub dataset, or a local image folder of the study's four
    classes and its size (480 train, 320 test images: a copy of it, or a same-size draw of the same release such
    as shared/data/brain_mri). Not the 40-image sample ("not for results") nor any other four-class folder.
    Only then do the study's reported accuracies stand beside ours."""
    if data == DEFAULT_DATA:
        return True
    root = Path(data).expanduser()
    if not all((root / split).is_dir() and sorted(d.name for d in (root / split).iterdir() if d.is_dir())
               == STUDY_CLASSES for split in ("train", "test")):
        return False
    return {split: len(files) for split, files in image_files(root).items()} == STUDY_SIZES


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
            from clip_adapt import hub
            raise UserError(f"could not load dataset '{data}': {hub.unavailable('it', error)}; pass --data a local "
                            f"folder with train/<class>/* and test/<class>/* instead (the 40-image sample: "
                            f"--data {SAMPLE_DATA.relative_to(SAMPLE_DATA.parents[1])})") from None
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
    if len(names) < 2:
        raise UserError(f"dataset '{data}' has {len(names)} class: at least 2 classes are needed")
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
    pixels = None
    chunks = [images[start:start + PREPROCESS_CHUNK] for start in range(0, len(images), PREPROCESS_CHUNK)]
    for start, chunk in zip(range(0, len(images), PREPROCESS_CHUNK),
                            in_threads(lambda chunk: uint8_pixels(chunk, image_processor), chunks, workers,
                                       "preprocessing images", len(chunks), "chunk")):   # of PREPROCESS_CHUNK
        if pixels is None:
            pixels = torch.empty((len(images), *chunk.shape[1:]), dtype=torch.uint8)
        pixels[start:start + len(chunk)] = chunk
    return pixels


def uint8_pixels(images: list[Image.Image], image_processor) -> torch.Tensor:
    pixels = image_processor(images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    if pixels.dtype != torch.uint8:
        raise UserError(f"the image processor returned {pixels.dtype} pixels before normalisation, not uint8: "
                        f"use a CLIP image processor")
    return pixels


def in_threads(work, items, workers: int | None, desc: str, total: int, unit: str):
    """work(item) for each item, in parallel threads, results in order, with at most two per thread under way
    or waiting: what the work holds (decoded images) never piles up, however many items there are."""
    from concurrent.futures import ThreadPoolExecutor
    workers = workers or min(8, os.cpu_count() or 1)

    def results():
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    return progress_bar(results(), desc, total=total, unit=unit)


@dataclass
class Loaded:
    """What the stream keeps of each readable image, in source order: its preprocessed pixels, and the few
    bytes the copy checks need (exact hash, near-copy fingerprint), never the decoded image."""
    pixels: torch.Tensor
    labels: list[int]
    splits: list[str]
    files: list[str]
    rows: list[tuple[str, int]]   # (source split, row): where to decode an image again (the contact sheet)
    hashes: list[str]
    fingerprints: Fingerprints | None
    skipped: list[str]


def stream_images(source, parts, image_processor, skip_bad_images: bool, fingerprint_them: bool,
                  workers: int | None = None, root: str | None = None) -> Loaded:
    """Decodes, hashes, fingerprints (when fingerprint_them) and preprocesses the images STREAM_CHUNK at a time
    in threads, into one uint8 tensor allocated once: peak memory is that tensor plus a few chunks of decoded
    images, not every decoded image at once. root: a local --data folder, which the files are named relative to
    (as a split file names them)."""
    total = sum(len(source[source_split]) for _, source_split in parts)

    def chunks():
        for split, source_split in parts:
            rows = source[source_split]
            for start in range(0, len(rows), STREAM_CHUNK):
                batch = rows[start:start + STREAM_CHUNK]
                yield split, source_split, start, batch["image"], batch["label"]

    def work(chunk):
        split, source_split, start, images, labels = chunk
        kept = []
        for index, (image, label) in enumerate(zip(images, labels), start):
            path = image.get("path")
            name = (relative_to(path, root) or relative_name(path)) if path else f"{source_split}[{index}]"
            try:
                img = open_rgb(image)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                if not skip_bad_images:
                    raise UserError(f"cannot read image {name} ({error}); fix or remove it, "
                                    f"or pass --skip-bad-images to leave it out") from None
                kept.append((name, None))
                continue
            kept.append((name, (img, label, split, (source_split, index), pixel_hash(img),
                                fingerprint(img) if fingerprint_them else None)))
        readable = [item for _, item in kept if item is not None]
        pixels = uint8_pixels([item[0] for item in readable], image_processor) if readable else None
        return kept, pixels

    loaded = Loaded(None, [], [], [], [], [], Fingerprints(total) if fingerprint_them else None, [])
    count = 0
    for kept, pixels in in_threads(work, chunks(), workers, "reading images", -(-total // STREAM_CHUNK) or 1,
                                   "chunk"):   # of STREAM_CHUNK images
        for name, item in kept:
            if item is None:
                loaded.skipped.append(name)
                continue
            _, label, split, row, hash_, parts_ = item
            loaded.files.append(name)
            loaded.labels.append(label)
            loaded.splits.append(split)
            loaded.rows.append(row)
            loaded.hashes.append(hash_)
            if fingerprint_them:
                loaded.fingerprints.add(parts_)
        if pixels is not None:
            if loaded.pixels is None:
                loaded.pixels = torch.empty((total, *pixels.shape[1:]), dtype=torch.uint8)
            loaded.pixels[count:count + len(pixels)] = pixels
            count += len(pixels)
    if loaded.pixels is None:
        raise UserError("no readable image in the dataset: check --data")
    loaded.pixels = loaded.pixels[:count]
    return loaded


def arrange(pixels: torch.Tensor, order: np.ndarray) -> None:
    """pixels[:] = pixels[order] in place, one image at a time along each cycle of the permutation: the splits
    become slices of one tensor, without a second copy of the dataset."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        saved, position = pixels[start].clone(), start
        while True:
            done[position] = True
            source = order[position]
            if source == start:
                pixels[position] = saved
                break
            pixels[position] = pixels[source]
            position = source


def checked_once(check):
    """check() on the main process only, its result sent to the others (torch.distributed, when several
    processes run): under `accelerate launch` the copy check runs once, not once per process. A failure on
    the main process is raised on every process, so that none waits for a result that will not come."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return check()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("result", check())]
        except UserError as error:
            box = [("error", str(error))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def runs_checks_here() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def stratified_val_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    num_classes = len(np.unique(labels))
    num_val = max(round(fraction * len(labels)), num_classes)   # at least one image of every class
    if np.bincount(labels).min() < 2 or len(labels) - num_val < num_classes:
        raise UserError(f"train has too few images ({len(labels)}) to carve a stratified validation split "
                        f"with one image per class: add images or lower --val-fraction")
    indices = np.arange(len(labels))
    from sklearn.model_selection import train_test_split   # here: scikit-learn is slow to import, --help needs none
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
              class_names: list[str] | None = None, duplicates: str = "near", shots: int | None = None,
              split_file: str | None = None) -> MRIData:
    """A dataset's own `validation` split is used as the validation set; without one, a stratified share of
    train is carved out. `test_split` names the held-out split (some datasets call it 'validation' or 'val').
    shots: K training images per class and min(K, 4) validation images, drawn with `seed` (clip_adapt/shots.py);
    split_file: a CoOp-format split of the images under `data`, which replaces the folder's own splits."""
    if duplicates not in ("exact", "near"):
        raise UserError(f"--duplicates must be exact or near, not {duplicates}")
    if split_file:
        check_data_early(data, shots, split_file)
        source, names = split_file_source(split_file, data)
        class_names, test_split = class_names or names, "test"
    else:
        source, class_names = load_source(data, image_column, label_column, test_split, class_names)
    own_validation = VALIDATION_SPLIT in source and test_split != VALIDATION_SPLIT
    parts = [("train", "train"), *([("val", VALIDATION_SPLIT)] if own_validation else []), ("test", test_split)]
    mode = duplicates
    loaded = stream_images(source, parts, image_processor, skip_bad_images, mode == "near" and runs_checks_here(),
                           root=data if is_local(data) else None)
    files, splits = loaded.files, loaded.splits
    with timing.phase("copy_check"):
        duplicates = checked_once(lambda: near_copy_report(loaded.fingerprints, loaded.hashes, splits, files)
                                  if mode == "near" else find_duplicates(loaded.hashes, splits, files))
    loaded.fingerprints = None   # no longer needed: their memory goes back before training
    clusters = duplicates.pop("clusters")
    keep = np.ones(len(files), dtype=bool)
    if drop_test_duplicates:   # the train members of every cluster that reaches into test, however it got there
        leaked = [i for members in clusters if any(splits[j] == "test" for j in members)
                  for i in members if splits[i] == "train"]
        keep[leaked] = False
    dropped = [files[i] for i in np.flatnonzero(~keep)]

    closest = []
    if mode == "near" and is_main_process():   # for the contact sheet, which the main process draws
        nearest = duplicates["nearest_train_of_test"]
        # The closest pairs, and the closest that are not copies: the near misses show what the threshold rejects.
        shown = nearest[:CONTACT_PAIRS] + [p for p in nearest[CONTACT_PAIRS:] if p["score"] < NEAR_COPY_SCORE][:4]

        def decoded(i):   # decoded again from the source: the stream kept no decoded image
            source_split, row = loaded.rows[i]
            return open_rgb(source[source_split][row]["image"])
        closest = [(p["score"], p["test"], decoded(p["test_index"]), p["train"], decoded(p["train_index"]))
                   for p in shown]
    labels = np.array(loaded.labels)
    split_of = np.array(splits)
    kept = np.flatnonzero(keep)
    train_all = kept[split_of[kept] == "train"]
    test = kept[split_of[kept] == "test"]
    moved = []
    if own_validation:
        train, val = train_all, kept[split_of[kept] == "val"]
        if not (split_file or shots):
            # As a carved split keeps every cluster of copies on one side, a cluster reaching from train into the
            # dataset's own validation split goes wholly to validation: its train members move there (the given
            # validation images stay, and no copy of one is trained on). Not for a split file, which is the split
            # as given (its copies are counted in the report), nor for K shots, which draw around copies.
            moved = sorted({i for members in clusters if any(split_of[j] == "val" for j in members)
                            for i in members if split_of[i] == "train" and keep[i]})
            train = np.setdiff1d(train_all, moved)
            val = np.sort(np.concatenate([kept[split_of[kept] == "val"], np.array(moved, dtype=kept.dtype)]))
    elif shots:   # the shots, and their validation images after them, are drawn from the whole of train below
        train, val = train_all, None
    else:
        train_position = {i: p for p, i in enumerate(train_all)}
        train_groups = [[train_position[i] for i in members if i in train_position] for members in clusters]
        train_pos, val_pos = grouped_val_indices(labels[train_all], [g for g in train_groups if len(g) > 1],
                                                 val_fraction, seed)
        train, val = train_all[train_pos], train_all[val_pos]
    if shots:
        train, val = draw_shots(labels, train, val, clusters, test, shots, seed, [readable(c) for c in class_names])

    # Each split a slice of the one tensor, rearranged in place: train, val, test, then the dropped images.
    unused = np.setdiff1d(np.arange(len(files)), np.concatenate([train, val, test]))   # dropped, or not drawn
    order = np.concatenate([train, val, test, unused]).astype(np.int64)
    arrange(loaded.pixels, order)
    bounds = np.cumsum([0, len(train), len(val), len(test)])

    def subset(number, indices):
        return Split(loaded.pixels[bounds[number]:bounds[number + 1]], torch.as_tensor(labels[indices]),
                     [files[i] for i in indices], tuple(image_processor.image_mean), tuple(image_processor.image_std))

    report = {"duplicate_check": mode, **duplicates, "dropped_train_duplicates": dropped,
              "skipped_images": loaded.skipped, "source": data,
              "train_copies_moved_to_val": [files[i] for i in moved],
              "num_images": {"train": len(train), "val": len(val), "test": len(test)},
              "validation": ("the split file's" if split_file else "the dataset's own split" if own_validation
                             else f"{val_fraction:g} of train"),
              **({"shots": shots, "validation_shots": len(val) // len(class_names)} if shots else {}),
              **({"split_file": str(split_file)} if split_file else {})}
    return MRIData([readable(c) for c in class_names], subset(0, train), subset(1, val), subset(2, test), report,
                   closest, copy_group_ids(np.concatenate([train, val]), clusters))


def copy_group_ids(images: np.ndarray, clusters: list[list[int]]) -> np.ndarray:
    """A group id per image (indices into the loaded files): the cluster's for members of a cluster of copies,
    else one of its own; numbered in the order the images come, so that the same images in the same order get
    the same ids however many more were loaded (a run given its own split.json forms the same folds)."""
    group_of = {i: number for number, members in enumerate(clusters) for i in members}
    raw = np.array([group_of.get(int(i), len(clusters) + int(i)) for i in images])
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def relative_name(path: str) -> str:
    """File names in outputs read as split/class/file rather than as absolute paths of one machine."""
    parts = Path(path).parts
    return os.path.join(*parts[-3:]) if len(parts) >= 3 else path
