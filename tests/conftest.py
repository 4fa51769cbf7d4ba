"""Fixtures: a tiny random CLIP saved to disk, small image folders, and ways to run the scripts. Offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"        # nothing in the tests may touch the network; set before
os.environ["HF_DATASETS_OFFLINE"] = "1"   # huggingface_hub reads it, at import
# One torch thread per process (read at torch's import; subprocesses inherit it): the tiny models gain nothing
# from more, and on a 2-core machine the multi-process tests' threads would contend, many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import runpy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPProcessor  # noqa: E402

from clip_adapt import models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "brain_mri"
SAMPLE_DATA = REPO / "sample_data" / "brain_mri"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
METRIC_KEYS = {"experiment", "train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "test_loss",
               "best_epoch", "epochs_run", "trainable_params", "total_params", "wall_time_s", "device", "model",
               "data", "seed", "model_dims"}
OUTPUT_FILES = {"classification_report.txt", "metrics.json", "history.csv", "loss_curves.png",
                "accuracy_curves.png", "confusion_matrix.png", "reliability_diagram.png", "robustness.csv",
                "robustness.png", "data_report.json", "predictions.csv"}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP, tokenizer and image processor saved with save_pretrained, as a user would pass one."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    clip, image_processor, tokenizer = models.tiny_clip()
    clip.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_biomedclip_dir(tmp_path_factory) -> Path:
    """BiomedCLIP's architecture, small and random, as a local open_clip folder (tools/open_clip_models.py):
    a timm ViT trunk, a tiny BERT text tower with CLS pooling and an MLP projection, a 256-token context."""
    from tools.open_clip_models import tiny_biomedclip
    return tiny_biomedclip(tmp_path_factory.mktemp("tiny-biomedclip"))


def known_answer_cache() -> Path:
    """Where the known-answer CLIP is kept between runs: a folder per version of the code and libraries that make
    it (tools/known_answer.py, the image processor in clip_adapt/models.py, torch, transformers), so that a change
    to any of them builds it anew. CLIP_ADAPT_CACHE moves it (default ~/.cache/clip_adapt)."""
    import hashlib
    import transformers
    digest = hashlib.blake2b(digest_size=8)
    for source in ("tools/known_answer.py", "clip_adapt/models.py"):
        digest.update((REPO / source).read_bytes())
    digest.update(f"{torch.__version__}|{transformers.__version__}".encode())
    root = Path(os.environ.get("CLIP_ADAPT_CACHE", Path.home() / ".cache" / "clip_adapt")).expanduser()
    return root / f"known_answer-{digest.hexdigest()}"


@pytest.fixture(scope="session")
def known_answer_dir() -> tuple[Path, dict]:
    """(folder, what its build measured): the known-answer CLIP, shapes task and templates of
    tools/known_answer.py, for the classification and the captioning known-answer tests. Built once per machine
    and version (known_answer_cache): the first process to ask builds it under a file lock (filelock, a
    dependency of transformers) while the others, xdist workers or later runs, wait and then read it. The build
    writes into a temporary folder renamed into place, so an interrupted build leaves nothing half-made."""
    import json
    import shutil
    from filelock import FileLock
    from tools import known_answer
    directory = known_answer_cache()
    measured = directory / "measured.json"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not measured.exists():
            building = directory.with_name(directory.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            (building / "measured.json").write_text(json.dumps(known_answer.build(building, verbose=False)))
            shutil.rmtree(directory, ignore_errors=True)
            building.rename(directory)
    return directory, json.loads(measured.read_text())


@pytest.fixture
def clip_parts(tiny_clip_dir):
    """A fresh (CLIPModel, image processor, tokenizer) loaded from the saved fixture, through the project's loader."""
    return models.load_clip(str(tiny_clip_dir))


def noise_image(seed: int, size=(40, 48), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode if mode != "P" else "RGB"]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array)
    return image.convert("P") if mode == "P" else image


def make_image_folder(root: Path, per_class: int = 3, classes=CLASSES) -> Path:
    """train/<class>/ and test/<class>/ of small random images in varied sizes, modes and formats."""
    modes = ["RGB", "L", "RGBA", "P"]
    seed = 0
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                image = noise_image(seed, size=(30 + 7 * i, 40 + 5 * seed % 17), mode=modes[seed % 4])
                # A PNG behind a .jpg name, as in the public release.
                image.save(folder / f"{c}_{i}.jpg", format="PNG" if image.mode in ("RGBA", "P") or i == 2 else "JPEG")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def run_script(script: str, *args, expect_exit: int | None = None):
    """Runs an experiment script in this process (imports are the slow part of a fresh one)."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = argv
    if expect_exit is not None:
        assert code == expect_exit
    return code


def run_process(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def tiny_batch(image_processor, n: int = 4) -> torch.Tensor:
    images = [noise_image(100 + i) for i in range(n)]
    return image_processor(images, return_tensors="pt")["pixel_values"]
