"""--base-to-new (CoCoOp's protocol, clip_adapt/base_to_new.py): the class split, the data each half sees, the
trained parts carried to the new classes, and the refusal of methods tied to their training classes."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CLASSES, SAMPLE_DATA, run_script

from clip_adapt import base_to_new
from clip_adapt.base import UserError
from clip_adapt.data import MRIData, Split
from clip_adapt.models import tiny_clip
from clip_adapt.runner import classification_scripts

OPEN = [s for s in classification_scripts() if getattr(s.module, "OPEN_VOCABULARY", False)]
TIED = [s for s in classification_scripts() if not getattr(s.module, "OPEN_VOCABULARY", False)]
NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]


def test_the_first_half_of_the_classes_rounded_up_is_base_as_in_dassl():
    assert base_to_new.split_classes(NAMES) == ([0, 1], [2, 3])
    assert base_to_new.split_classes(["a", "b", "c", "d", "e"]) == ([0, 1, 2], [3, 4])
    with pytest.raises(UserError, match="at least 2 classes"):
        base_to_new.split_classes(["a"])


def split(labels: list[int], name: str) -> Split:
    return Split(torch.arange(len(labels), dtype=torch.float32)[:, None], torch.tensor(labels),
                 [f"{name}{i}" for i in range(len(labels))])


def test_base_classes_train_and_the_new_ones_are_only_tested_relabelled_from_zero():
    data = MRIData(NAMES, split([0, 1, 2, 3, 2, 0], "train"), split([3, 1], "val"), split([2, 0, 3, 1, 1], "test"),
                   copy_groups=np.array([7, 8, 9, 10, 9, 7, 11, 12]))
    base, new = base_to_new.split_data(data)
    assert base.class_names == ["glioma", "meningioma"] and new.class_names == ["no tumor", "pituitary"]
    assert base.train.files == ["train0", "train1", "train5"] and base.train.labels.tolist() == [0, 1, 0]
    assert base.val.files == ["val1"] and base.val.labels.tolist() == [1]
    assert base.test.files == ["test1", "test3", "test4"] and base.test.labels.tolist() == [0, 1, 1]
    assert new.test.files == ["test0", "test2"] and new.test.labels.tolist() == [0, 1]
    assert base.train.inputs[:, 0].tolist() == [0, 1, 5]   # the images go with their labels
    # The copy groups of the kept train and validation images, in their order: folds keep copies together.
    assert base.copy_groups.tolist() == [7, 8, 7, 12]


@pytest.mark.parametrize("script", [s for s in OPEN if s.trains], ids=lambda s: s.name)
def test_every_trained_part_carries_over_to_the_model_built_for_the_new_classes(script):
    clip, _, tokenizer = tiny_clip()
    torch.manual_seed(0)
    trained = script.build_model(clip, tokenizer, NAMES[:2]).eval()
    learned = {name: p for name, p in trained.named_parameters() if p.requires_grad}
    assert learned
    with torch.no_grad():   # as if trained: every part away from its start
        for p in learned.values():
            p.add_(0.5 * torch.randn_like(p))
    untouched = script.build_model(clip, tokenizer, NAMES[2:]).eval()
    carried = base_to_new.carried_over(trained, script.build_model(clip, tokenizer, NAMES[2:])).eval()
    # torch's own loading of the same tensors is the reference for what the new-class model computes.
    reference = script.build_model(clip, tokenizer, NAMES[2:]).eval()
    reference.load_state_dict({name: p.detach() for name, p in learned.items()}, strict=False)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(carried(pixels), reference(pixels), rtol=0, atol=0)
        assert (carried(pixels) - untouched(pixels)).abs().max() > 1e-4   # the trained parts act there
    for name, p in learned.items():
        assert torch.equal(dict(carried.named_parameters())[name], p), name


@pytest.mark.parametrize("script", TIED, ids=lambda s: s.name)
def test_a_method_tied_to_its_training_classes_is_refused_before_anything_loads(script):
    with pytest.raises(UserError, match="cannot name a new class"):
        base_to_new.check_open_vocabulary(script.name, script.module)


def test_a_refused_script_says_so_in_one_line(tmp_path, capsys):
    run_script(TIED[0].path.name, "--smoke", "--base-to-new", "--output-dir", tmp_path, expect_exit=2)
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--base-to-new needs a method that classifies by class text" in error
    assert all(s.name in error for s in OPEN)
    assert not (tmp_path / TIED[0].name / "metrics.json").exists()


def folder_of(classes: tuple[str, ...], root):
    for part in ("train", "test"):
        for name in classes:
            shutil.copytree(SAMPLE_DATA / part / name, root / part / name)
    return root


def test_run_all_tabulates_what_can_name_new_classes_and_e1_halves_equal_runs_on_those_classes_alone(tmp_path,
                                                                                                     capsys):
    """E1 trains nothing, so each half of its base-to-new figure must equal E1 run on a folder holding only that
    half's classes: the same images, the same class texts."""
    flags = ("--smoke", "--quiet", "--noise-levels", "0")
    trained_open = next(s for s in OPEN if s.trains)
    run_script("run_all_experiments.py", *flags, "--base-to-new", "--experiments", "E1", trained_open.short_name,
               "--output-dir", tmp_path / "b2n", expect_exit=0)
    summary = (tmp_path / "b2n" / "summary.md").read_text()
    table = summary[summary.index("## Base-to-new"):]
    assert "Base-to-new (CoCoOp&#x27;s protocol)" in (tmp_path / "b2n" / "report.html").read_text()
    for name in ("E1_zero_shot_clip", trained_open.name):
        scores = json.loads((tmp_path / "b2n" / name / "metrics.json").read_text())["base_to_new"]
        assert (f"| {name} | {scores['base_accuracy']:.3f} | {scores['new_accuracy']:.3f} | "
                f"{scores['harmonic_mean']:.3f} | 1 |") in table
    scores = json.loads((tmp_path / "b2n" / "E1_zero_shot_clip" / "metrics.json").read_text())["base_to_new"]
    assert scores["base_classes"] == ["glioma", "meningioma"] and scores["new_classes"] == ["no tumor", "pituitary"]
    for half, key in ((CLASSES[:2], "base_accuracy"), (CLASSES[2:], "new_accuracy")):
        data = folder_of(half, tmp_path / key)
        run_script("E1_zero_shot_clip.py", *flags, "--data", data, "--output-dir", tmp_path / f"{key}_run",
                   expect_exit=0)
        alone = json.loads((tmp_path / f"{key}_run" / "E1_zero_shot_clip" / "metrics.json").read_text())
        assert scores[key] == pytest.approx(alone["test_accuracy"], abs=1e-12), key
    assert scores["harmonic_mean"] == pytest.approx(
        2 * scores["base_accuracy"] * scores["new_accuracy"] / (scores["base_accuracy"] + scores["new_accuracy"]))
    assert scores["new_test_images"] == sum(len(list((SAMPLE_DATA / "test" / c).iterdir())) for c in CLASSES[2:])
    capsys.readouterr()
    run_script("run_all_experiments.py", "--smoke", "--base-to-new", "--experiments", TIED[0].short_name,
               "--output-dir", tmp_path / "refused", expect_exit=2)
    assert "cannot name a class it did not train on" in capsys.readouterr().err
