"""Any CLIP, any image dataset: column mapping, a dataset's own validation split, save_to_disk directories,
CLIPs of other shapes through every script, and parameter counts of the published CLIPs."""

import copy
import csv
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from conftest import noise_image, run_process, run_script
from safetensors.torch import load_file
from test_scripts import (CLIP_SCRIPTS, SCRIPTS, TRAINED, assert_complete_outputs, assert_one_process_trains_alike,
                          metrics_of)
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from clip_adapt import models
from clip_adapt.base import UserError
from clip_adapt.data import PREPROCESS_CHUNK, Split, check_data_early, load_data, preprocess
from clip_adapt.models import ImageClassifier, PromptedCLIP, clip_config, count_params, tiny_tokenizer

FINE = ["apple", "aquarium_fish", "baby", "bear"]
COARSE = ["fruit", "animal"]


def cifar_like(per_class: dict[str, int], integer_labels: bool = False, coarse: bool = True) -> datasets.DatasetDict:
    """CIFAR-100's layout: 'img', 'fine_label' and 'coarse_label' (ClassLabel), small RGB images."""
    features = {"img": datasets.Image(),
                "fine_label": datasets.Value("int64") if integer_labels else datasets.ClassLabel(names=FINE)}
    if coarse:
        features["coarse_label"] = datasets.ClassLabel(names=COARSE)
    splits, seed = {}, 0
    for split, count in per_class.items():
        rows = {name: [] for name in features}
        for label in range(len(FINE)):
            for _ in range(count):
                seed += 1
                rows["img"].append(noise_image(1000 + seed, size=(32, 32)))
                rows["fine_label"].append(label)
                if coarse:
                    rows["coarse_label"].append(label // 2)
        splits[split] = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    return datasets.DatasetDict(splits)


@pytest.fixture(scope="session")
def image_processor():
    return models.tiny_clip()[1]


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cifar100_like")
    cifar_like({"train": 4, "test": 2}).save_to_disk(directory)
    return directory


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
    """One Image and one ClassLabel column: nothing to choose, so nothing needs naming."""
    directory = tmp_path_factory.mktemp("cifar10_like")
    cifar_like({"train": 4, "test": 2}, coarse=False).save_to_disk(directory)
    return directory


# --------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("script", SCRIPTS)
def test_saved_cifar100_layout_runs_through_every_script(script, cifar100_dir, tmp_path):
    run_script(script, "--smoke", "--data", cifar100_dir, "--image-column", "img", "--label-column", "fine_label",
               "--epochs", 1, "--output-dir", tmp_path, expect_exit=0)
    metrics = assert_complete_outputs(tmp_path / script.removesuffix(".py"), trained=script in TRAINED)
    assert metrics["class_names"] == ["apple", "aquarium fish", "baby", "bear"]
    assert metrics["num_images"] == {"train": 12, "val": 4, "test": 8}


@pytest.mark.parametrize("script", ["E1_zero_shot_clip.py", "E6_full_finetune.py"])
def test_unambiguous_columns_are_detected(script, cifar10_dir, tmp_path):
    run_script(script, "--smoke", "--data", cifar10_dir, "--epochs", 1, "--output-dir", tmp_path, expect_exit=0)
    assert metrics_of(tmp_path, script)["class_names"] == ["apple", "aquarium fish", "baby", "bear"]


def test_ambiguous_or_wrong_columns_get_one_line_listing_the_columns(cifar100_dir, image_processor):
    with pytest.raises(UserError, match=r"2 ClassLabel columns: pass --label-column; its columns are "
                                        r"img \(Image\), fine_label \(ClassLabel\), coarse_label \(ClassLabel\)"):
        load_data(str(cifar100_dir), image_processor)
    with pytest.raises(UserError, match="no column 'label'; its columns are img"):
        load_data(str(cifar100_dir), image_processor, label_column="label")
    with pytest.raises(UserError, match="column 'fine_label' does not hold images"):
        load_data(str(cifar100_dir), image_processor, image_column="fine_label", label_column="coarse_label")
    with pytest.raises(UserError, match="no exam split .*pass --test-split"):
        load_data(str(cifar100_dir), image_processor, label_column="fine_label", test_split="exam")


def test_coarse_labels_are_a_flag_away(cifar100_dir, image_processor):
    data = load_data(str(cifar100_dir), image_processor, label_column="coarse_label")
    assert data.class_names == COARSE
    assert sorted(torch.cat([data.train.labels, data.val.labels]).unique().tolist()) == [0, 1]


def test_own_validation_split_is_used_and_test_split_can_be_renamed(tmp_path, image_processor):
    cifar_like({"train": 3, "validation": 2, "holdout": 1}, coarse=False).save_to_disk(tmp_path / "d")
    data = load_data(str(tmp_path / "d"), image_processor, test_split="holdout", val_fraction=0.5)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 8, 4)
    assert data.report["validation"] == "the dataset's own split"
    assert data.val.files[0] == "validation[0]" and data.test.files[0] == "holdout[0]"
    # Without its own validation split, one is carved from train as before.
    carved = load_data(str(tmp_path / "d"), image_processor, test_split="validation", val_fraction=0.25)
    assert (len(carved.train), len(carved.val), len(carved.test)) == (8, 4, 8)


@pytest.mark.parametrize("duplicates", ["exact", "near"])
def test_a_train_copy_of_an_own_validation_image_moves_to_validation(tmp_path, image_processor, duplicates):
    """Copies are grouped with a dataset's own validation split as with a carved one: the whole cluster on one
    side. The given validation images stay where they are; the train image that copies one joins them."""
    source = cifar_like({"train": 3, "validation": 2, "test": 1}, coarse=False)
    train = source["train"].to_dict()
    val = source["validation"].to_dict()
    val["img"][0], val["fine_label"][0] = train["img"][5], train["fine_label"][5]   # val 0 is train 5's copy
    features = source["train"].features
    datasets.DatasetDict({"train": source["train"], "validation": datasets.Dataset.from_dict(val, features=features),
                          "test": source["test"]}).save_to_disk(tmp_path / "d")
    data = load_data(str(tmp_path / "d"), image_processor, duplicates=duplicates)
    assert data.report["train_copies_moved_to_val"] == ["train[5]"]
    assert "train[5]" in data.val.files and "train[5]" not in data.train.files
    assert (len(data.train), len(data.val), len(data.test)) == (11, 9, 4)
    assert set(data.val.files) >= {f"validation[{i}]" for i in range(8)}


def test_integer_labels_need_names_from_a_flag(tmp_path, image_processor):
    cifar_like({"train": 3, "test": 1}, integer_labels=True).save_to_disk(tmp_path / "d")
    with pytest.raises(UserError, match="integer labels without class names: pass --class-names"):
        load_data(str(tmp_path / "d"), image_processor, label_column="fine_label")
    with pytest.raises(UserError, match="labels 0..3 but --class-names gives 2 names"):
        load_data(str(tmp_path / "d"), image_processor, label_column="fine_label", class_names=["a", "b"])
    with pytest.raises(UserError, match="has a name twice"):
        load_data(str(tmp_path / "d"), image_processor, label_column="fine_label", class_names=["a", "b", "a", "c"])
    data = load_data(str(tmp_path / "d"), image_processor, label_column="fine_label",
                     class_names=["red apple", "fish", "baby", "bear"])
    assert data.class_names == ["red apple", "fish", "baby", "bear"]


def test_saved_dataset_passes_the_early_check(cifar100_dir, tmp_path):
    check_data_early(str(cifar100_dir))
    with pytest.raises(UserError, match="does not exist"):
        check_data_early(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- any size

def test_uint8_pixels_normalised_per_batch_equal_the_processors_floats(image_processor):
    """Images are kept as uint8 after resize and crop (a quarter of fp32) and normalised when a batch is used;
    the model sees the numbers CLIP's processor would have given it. Chunks run in parallel threads."""
    images = [noise_image(seed, size=(30 + seed % 5, 41)) for seed in range(PREPROCESS_CHUNK + 7)]
    pixels = preprocess(images, image_processor, workers=2)
    assert pixels.dtype == torch.uint8
    split = Split(pixels, torch.zeros(len(images)), [], tuple(image_processor.image_mean),
                  tuple(image_processor.image_std))
    expected = image_processor(images, return_tensors="pt")["pixel_values"]
    index = torch.tensor([0, 5, PREPROCESS_CHUNK + 6])
    torch.testing.assert_close(split.model_inputs(index), expected[index], rtol=0, atol=1e-6)
    torch.testing.assert_close(split.model_inputs(), expected, rtol=0, atol=1e-6)


def test_bench_data_smoke_writes_its_figures(tmp_path):
    import json
    run_script("tools/bench_data.py", "--smoke", "--output-dir", tmp_path, expect_exit=0)
    result = json.loads((tmp_path / "bench_data.json").read_text())
    assert result["images"] == 300 and result["preprocess_images_per_s"] > 0
    assert result["uint8_bytes"] == 300 * 3 * 64 * 64 and result["fp32_would_be_bytes"] == 4 * 300 * 3 * 64 * 64


def test_loaded_splits_hold_uint8_pixels(cifar10_dir, image_processor):
    data = load_data(str(cifar10_dir), image_processor)
    for split in data.splits().values():
        assert split.inputs.dtype == torch.uint8 and split.model_inputs(torch.tensor([0])).dtype == torch.float32


# --------------------------------------------------------------------------- CLIPs of any shape

def vision_tower_params(width: int, layers: int, patch: int, image_size: int) -> int:
    """CLIP's vision transformer: class token, patch convolution (no bias), positions, pre- and post-layernorm,
    and per layer attention (4 biased w×w maps), two layernorms and a 4w-wide MLP."""
    grid = image_size // patch
    per_layer = 4 * (width * width + width) + 4 * width + 2 * width * 4 * width + 4 * width + width
    return width + 3 * patch * patch * width + (grid * grid + 1) * width + 4 * width + layers * per_layer


@pytest.mark.parametrize("name", ["vit-b32", "vit-b16", "vit-l14"])
def test_parameter_counts_of_published_clips_on_meta_device(name):
    config = clip_config(name)
    with torch.device("meta"):
        clip = CLIPModel(config)
    v = config.vision_config
    width, layers, projection, text_width = v.hidden_size, v.num_hidden_layers, config.projection_dim, \
        config.text_config.hidden_size
    classes, prompts, context = 10, 2, 4
    head = projection * classes + classes
    cases = {
        "E2": (ImageClassifier(copy.deepcopy(clip), classes), head),
        "E2 pooled": (ImageClassifier(copy.deepcopy(clip), classes, features="pooled"), width * classes + classes),
        "E3": (ImageClassifier(copy.deepcopy(clip), classes, num_prompts=prompts), head + width * prompts),
        "E4": (ImageClassifier(copy.deepcopy(clip), classes, num_prompts=prompts, prompt_layers=range(layers)),
               head + layers * width * prompts),
        "E5": (PromptedCLIP(copy.deepcopy(clip), tiny_tokenizer(), FINE, prompts, context),
               width * prompts + text_width * context),
        "E6": (ImageClassifier(copy.deepcopy(clip), classes, train_backbone=True),
               vision_tower_params(width, layers, v.patch_size, v.image_size) + width * projection + head),
    }
    for experiment, (model, expected) in cases.items():
        assert count_params(model)[0] == expected, experiment
    if name == "vit-b16":   # the README's figures for 4 classes
        assert vision_tower_params(768, 12, 16, 224) + 768 * 512 + 512 * 4 + 4 == 86_194_692
        assert count_params(ImageClassifier(copy.deepcopy(clip), 4, features="pooled"))[0] == 768 * 4 + 4 == 3_076


def test_unknown_architecture_is_named():
    with pytest.raises(UserError, match="choose one of vit-b32, vit-b16, vit-l14, vit-l14-336"):
        clip_config("vit-h14")


SHAPES = {   # patch, image size, vision width, depth, text width, projection
    "patch4-24px-deep": (4, 24, 16, 4, 32, 8),
    "patch16-48px-wide-projection": (16, 48, 48, 1, 16, 40),
}


@pytest.fixture(scope="session", params=list(SHAPES))
def shaped_clip_dir(request, tmp_path_factory):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    patch, image_size, width, depth, text_width, projection = SHAPES[request.param]
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                           num_attention_heads=2, image_size=image_size, patch_size=patch),
        projection_dim=projection)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(request.param)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory, (width, depth, projection, text_width)


@pytest.mark.parametrize("script", CLIP_SCRIPTS)   # every CLIP script; E14 brings its own backbone
def test_clips_of_other_shapes_run_through_every_script(script, shaped_clip_dir, cifar10_dir, tmp_path):
    directory, (width, depth, projection, text_width) = shaped_clip_dir
    run_script(script, "--smoke", "--model", directory, "--data", cifar10_dir, "--epochs", 1,
               "--output-dir", tmp_path, expect_exit=0)
    metrics = assert_complete_outputs(tmp_path / script.removesuffix(".py"), trained=script in TRAINED)
    assert metrics["model_dims"] == {"vision_hidden": width, "vision_layers": depth, "projection_dim": projection,
                                     "text_hidden": text_width}


# --------------------------------------------------------------------------- several processes

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_failure(result) -> str:
    """A failed launch's own lines: the launcher's traceback would hide the child's error."""
    lines = [l for l in (result.stdout + result.stderr).splitlines() if "torch/distributed" not in l]
    return "\n".join(lines[:60] + ["..."] + lines[-20:])


def launch(*args, processes: int = 2) -> list:
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU starts two gloo processes."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", processes, "--num_machines", 1,
            "--dynamo_backend", "no", "--main_process_port", free_port(), *args]


def repeated_lines(result) -> list[str]:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return sorted({line for line in lines if lines.count(line) > 1})


@pytest.mark.slow
def test_two_process_accelerate_launch_resumes_and_matches_one_process(tmp_path):
    """Two gloo processes on a global batch of 7 (slices of 4 and 3; 15 train images, so the last batch of 1
    leaves one process an empty slice), launched with accelerate's bf16 mixed precision but --precision fp32,
    stopped after an epoch and resumed: one complete set of outputs, no line printed twice, and the numbers
    of one process on the same global batch, to 1e-5: the trained weights, every loss and accuracy, and the
    robustness table (its noise follows the image, not the process)."""
    flags = ["--smoke", "--lr", 1e-3, "--batch-size", 7, "--val-fraction", 0.25, "--precision", "fp32"]
    two_processes = launch("--mixed_precision", "bf16", "E6_full_finetune.py", *flags,
                           "--output-dir", tmp_path / "two")
    first = run_process(*two_processes, "--stop-after-epochs", 1)
    assert first.returncode == 0, launch_failure(first)
    folder = tmp_path / "two" / "E6_full_finetune"
    assert not (folder / "metrics.json").exists() and (folder / "checkpoint" / "last.pt").exists()
    own_states = [state["torch_rng"] for state in
                  torch.load(folder / "checkpoint" / "last.pt", weights_only=True)["rank_rng"]]
    assert len(own_states) == 2 and not torch.equal(*own_states)   # dropout is seeded per process
    resumed = run_process(*two_processes, "--resume")
    assert resumed.returncode == 0, launch_failure(resumed)
    assert "resuming at epoch 2" in resumed.stdout
    assert repeated_lines(first) == [] and repeated_lines(resumed) == []   # only the main process prints
    two = assert_complete_outputs(folder, trained=True)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []   # no leftover temporaries
    assert two["num_processes"] == 2 and two["precision"] == "fp32"

    one_folder = tmp_path / "one" / "E6_full_finetune"
    assert_one_process_trains_alike(two, flags, tmp_path / "one", tolerance=1e-5)
    two_weights, one_weights = (load_file(f / "checkpoint" / "best.safetensors") for f in (folder, one_folder))
    for name, weights in one_weights.items():
        if name.endswith("k_proj.bias"):   # its gradient is 0 up to rounding (softmax ignores a shift shared by all
            continue                       # keys), and Adam turns rounding noise into steps of the learning rate
        torch.testing.assert_close(two_weights[name], weights, rtol=0, atol=1e-5, msg=name)
    two_robustness, one_robustness = (list(csv.DictReader((f / "robustness.csv").read_text().splitlines())) for f in (folder, one_folder))
    assert [row.keys() for row in two_robustness] == [row.keys() for row in one_robustness]
    for two_row, one_row in zip(two_robustness, one_robustness):
        assert {k: float(v) for k, v in two_row.items()} == pytest.approx(
            {k: float(v) for k, v in one_row.items()}, abs=1e-5)


PLANTED_FAILURE = """# A test's wrapper around run_all_experiments.py: the first training step on process 1 fails.
import os, pathlib, runpy, sys, time
sys.path.insert(0, {repo!r})
import clip_adapt.training
if os.environ["RANK"] == "1":
    def planted_failure(*args, **kwargs):
        pathlib.Path({failed_at!r}).write_text(str(time.time()))
        raise RuntimeError("planted failure on process 1")
    clip_adapt.training.training_step = planted_failure
sys.argv = ["run_all_experiments.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_failure_on_one_process_ends_the_whole_launch_at_once(tmp_path):
    """run_all_experiments.py under two processes, the first experiment failing on process 1 only (process 0 is
    then waiting in the gradient all-reduce): the launch ends non-zero within 60 s of the failure (measured:
    about 1 s), naming the experiment and the process, and the second experiment never starts on either."""
    from conftest import REPO
    wrapper = tmp_path / "planted_failure.py"
    failed_at = tmp_path / "failed_at"
    wrapper.write_text(PLANTED_FAILURE.format(repo=str(REPO), script=str(REPO / "run_all_experiments.py"),
                                              failed_at=str(failed_at)))
    command = [sys.executable, *map(str, launch(wrapper, "--smoke", "--experiments", "E3_shallow_vpt",
                                                "E6_full_finetune", "--output-dir", tmp_path / "out"))]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)   # the launcher and both processes: a hang must not outlive the test
        raise AssertionError("the launch hung after a failure on one process")
    seconds = time.time() - float(failed_at.read_text())
    assert process.returncode != 0
    assert "error: E3_shallow_vpt failed on process 1 of 2" in stderr, stderr[-3000:]
    assert "planted failure on process 1" in stderr
    assert "=== E6_full_finetune" not in stdout and not (tmp_path / "out" / "E6_full_finetune").exists()
    assert seconds < 60, seconds
