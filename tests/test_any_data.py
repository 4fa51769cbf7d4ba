"""Any CLIP, any image dataset: column mapping, a dataset's own validation split, save_to_disk directories,
CLIPs of other shapes through every script, and parameter counts of the published CLIPs."""

import copy

import datasets
import pytest
import torch
from conftest import noise_image, run_process, run_script
from test_scripts import SCRIPTS, TRAINED, assert_complete_outputs, metrics_of
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
    if name == "vit-b16":   # the README's figure for 4 classes
        assert vision_tower_params(768, 12, 16, 224) + 768 * 512 + 512 * 4 + 4 == 86_194_692


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


@pytest.mark.parametrize("script", SCRIPTS)
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


def test_two_process_accelerate_launch_resumes_and_matches_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU starts two gloo processes. Stopped after an
    epoch and resumed, the run ends with one complete set of outputs, and its numbers are those of one process
    with the same global batch (6 images: 3 per process), up to float summation order."""
    flags = ["--smoke", "--lr", 1e-2, "--batch-size", 6]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
              "E6_full_finetune.py", *flags, "--output-dir", tmp_path / "two"]
    first = run_process(*launch, "--stop-after-epochs", 1)
    assert first.returncode == 0, launch_failure(first)
    folder = tmp_path / "two" / "E6_full_finetune"
    assert not (folder / "metrics.json").exists() and (folder / "checkpoint" / "last.pt").exists()
    resumed = run_process(*launch, "--resume")
    assert resumed.returncode == 0, launch_failure(resumed)
    assert "resuming at epoch 2" in resumed.stdout
    two = assert_complete_outputs(folder, trained=True)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []   # no leftover temporaries
    assert two["num_processes"] == 2

    run_script("E6_full_finetune.py", *flags, "--output-dir", tmp_path / "one", expect_exit=0)
    one = metrics_of(tmp_path / "one", "E6_full_finetune.py")
    assert one["num_processes"] == 1
    assert two["epochs_run"] == one["epochs_run"] and two["best_epoch"] == one["best_epoch"]
    for key in ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
