"""Loading images: every mode and format, the checks on the folder, duplicates, the validation split."""

import numpy as np
import pytest
from conftest import SAMPLE_DATA, SHARED_DATA, make_image_folder, noise_image
from PIL import Image

from clip_adapt.base import UserError
from clip_adapt.data import DEFAULT_DATA, is_study_data, load_data, open_rgb, stratified_val_indices
from clip_adapt.models import DEFAULT_MODEL, is_study_model, tiny_clip, weights_of
from clip_adapt.runner import METRICS, aggregate


@pytest.fixture(scope="module")
def image_processor():
    return tiny_clip()[1]


def test_loads_every_mode_and_format_including_pngs_named_jpg(image_folder, image_processor):
    data = load_data(str(image_folder), image_processor, val_fraction=0.25, seed=0)
    assert data.class_names == ["glioma", "meningioma", "no tumor", "pituitary"]
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 12)
    assert data.train.inputs.shape[1:] == (3, 32, 32)
    assert data.test.files[0].startswith("test/")
    # The fixture really has a PNG behind a .jpg name, and greyscale, RGBA and palette images.
    assert (image_folder / "train" / "glioma" / "glioma_2.jpg").read_bytes()[:4] == b"\x89PNG"
    modes = {Image.open(f).mode for f in image_folder.glob("*/*/*")}
    assert {"L", "RGB", "RGBA", "P"} <= modes


def test_transparent_pixels_become_black_not_hidden_colour(tmp_path):
    array = np.asarray(noise_image(1, mode="RGBA")).copy()
    array[..., 3] = 0   # fully transparent, random colour underneath
    Image.fromarray(array).save(tmp_path / "clear.png")
    assert np.asarray(open_rgb({"path": str(tmp_path / "clear.png")})).max() == 0


def test_validation_split_is_stratified_seeded_and_disjoint(image_processor):
    labels = np.repeat(np.arange(4), 25)
    train, val = stratified_val_indices(labels, 0.2, seed=3)
    assert len(val) == 20 and set(train).isdisjoint(val) and len(train) + len(val) == 100
    assert np.bincount(labels[val]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(val, stratified_val_indices(labels, 0.2, seed=3)[1])
    assert not np.array_equal(val, stratified_val_indices(labels, 0.2, seed=4)[1])


def test_duplicates_across_and_within_splits_are_found_and_can_be_dropped(image_folder, image_processor):
    original = image_folder / "test" / "glioma" / "glioma_2.jpg"   # a PNG: lossless copies keep its pixels
    with Image.open(original) as image:
        image.convert("RGB").save(image_folder / "train" / "glioma" / "copy_of_test.bmp")   # other name and format
        image.save(image_folder / "test" / "glioma" / "second_copy.png")
    data = load_data(str(image_folder), image_processor, val_fraction=0.3, seed=0)
    cross = data.report["train_test_duplicates"]
    assert len(cross) == 1 and cross[0]["train"] == ["train/glioma/copy_of_test.bmp"]
    assert sorted(cross[0]["test"]) == ["test/glioma/glioma_2.jpg", "test/glioma/second_copy.png"]
    assert [sorted(g) for g in data.report["within_split_duplicates"]["test"]] == [sorted(cross[0]["test"])]
    assert data.report["within_split_duplicates"]["train"] == []

    dropped = load_data(str(image_folder), image_processor, val_fraction=0.3, seed=0, drop_test_duplicates=True)
    assert dropped.report["dropped_train_duplicates"] == ["train/glioma/copy_of_test.bmp"]
    assert len(dropped.train) + len(dropped.val) == len(data.train) + len(data.val) - 1
    assert "train/glioma/copy_of_test.bmp" not in dropped.train.files + dropped.val.files


def test_unreadable_image_is_named_or_skipped(image_folder, image_processor):
    bad = image_folder / "train" / "meningioma" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="broken.jpg.*--skip-bad-images"):
        load_data(str(image_folder), image_processor, val_fraction=0.25)
    data = load_data(str(image_folder), image_processor, val_fraction=0.25, skip_bad_images=True)
    assert data.report["skipped_images"] == ["train/meningioma/broken.jpg"]


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("class_mismatch", "different class folders"),
    ("empty_class", "holds no images"),
    ("no_test", "test is missing"),
])
def test_bad_folders_get_one_clear_message(image_folder, image_processor, breakage, message):
    import shutil
    root = image_folder
    if breakage == "missing":
        root = image_folder / "nope"
    elif breakage == "class_mismatch":
        (image_folder / "test" / "pituitary").rename(image_folder / "test" / "pituitary_tumour")
    elif breakage == "empty_class":
        for f in (image_folder / "train" / "glioma").iterdir():
            f.unlink()
    elif breakage == "no_test":
        shutil.rmtree(image_folder / "test")
    with pytest.raises(UserError, match=message) as error:
        load_data(str(root), image_processor)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data/brain_mri")
def test_project_data_has_no_pixel_copies_across_splits(image_processor):
    data = load_data(str(SHARED_DATA), image_processor, val_fraction=0.15, seed=0, duplicates="exact")
    assert (len(data.train), len(data.val), len(data.test)) == (408, 72, 320)
    assert data.report["train_test_duplicates"] == []
    assert data.report["within_split_duplicates"] == {"train": [], "test": []}


def test_the_study_column_is_for_the_study_data_only(tmp_path):
    """The study's reported accuracies stand beside ours only on its data: its hub id, or a folder of its four
    classes at its size (480 / 320), not the 40-image sample or any other four-class folder."""
    assert is_study_data(DEFAULT_DATA)
    if SHARED_DATA.exists():   # the project's 800-image copy: the study's classes and split sizes
        assert is_study_data(str(SHARED_DATA))
    assert not is_study_data(str(SAMPLE_DATA))
    assert not is_study_data(str(make_image_folder(tmp_path / "copy")))
    shapes = make_image_folder(tmp_path / "shapes", per_class=1, classes=("circle", "square"))
    assert not is_study_data(str(shapes)) and not is_study_data("cifar100") and not is_study_data("someone/mri")


def summary_metrics(name: str, solver: str | None = None) -> dict:
    return {"experiment": name, "trainable_params": 2052, "total_params": 10, "trainable_share": 0.5,
            **{metric: 0.5 for metric in METRICS}, "test_accuracy_ci95": [0.4, 0.6], "robustness": {"0.0": 0.5},
            "settings": {"solver": solver} if solver else {}, "converged": True, "convergence_reason": ""}


@pytest.mark.parametrize("model, data, shown", [(DEFAULT_MODEL, DEFAULT_DATA, True),
                                                (DEFAULT_MODEL, str(SAMPLE_DATA), False),
                                                ("random:vit-b16", DEFAULT_DATA, False),
                                                ("openai/clip-vit-large-patch14", DEFAULT_DATA, False)])
def test_the_study_column_needs_the_study_model_on_the_study_data_and_marks_another_recipe(model, data, shown):
    import run_all_experiments as run_all
    metrics = {"E1_zero_shot_clip": summary_metrics("E1_zero_shot_clip"),
               "E2_linear_probe": summary_metrics("E2_linear_probe", "lbfgs")}
    rows = [aggregate(name, [m]) for name, m in metrics.items()]
    run = {"model": model, "data": data, "weights": weights_of(model), "study_data": is_study_data(data),
           "study_model": is_study_model(model), "split_seed": 0}
    differs = {name: d for name, m in metrics.items() if (d := run_all.SCRIPTS[name].differs_from_study(m["settings"]))}
    assert differs == {"E2_linear_probe": {"solver": ("lbfgs", "adamw")}}
    text = run_all.markdown(rows, {}, [0], "python run_all_experiments.py", run, differs)
    assert ("| study |" in text) == shown
    assert ("| E2_linear_probe | 0.500 [0.400, 0.600] | 0.910 † |" in text) == shown
    assert ("† Not the study's recipe: E2_linear_probe ran with --solver lbfgs (the study: adamw)." in text) == shown
