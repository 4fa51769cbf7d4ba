"""The field's protocol (docs/k-shot.md): K-shot splits, CoOp-format split files, AUROC."""

import json
import re

import numpy as np
import pytest
from conftest import SAMPLE_DATA, run_script

from clip_adapt.base import UserError
from clip_adapt.reporting import auroc
from clip_adapt.shots import draw_shots, read_split_file


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())


# --------------------------------------------------------------------------- drawing K shots

def test_shots_are_k_per_class_with_min_k_4_validation_images_and_no_copy_straddles_them():
    labels = np.repeat(np.arange(3), 16)   # 16 training images per class, then 6 test images
    labels = np.r_[labels, [0, 0, 1, 1, 2, 2]]
    train_pool, test = np.arange(48), np.arange(48, 54)
    # Image 0 is a copy of test image 48; 1, 2 and 3 are copies of one another; 16 and 17 too.
    clusters = [[0, 48], [1, 2, 3], [16, 17]]
    for seed in range(20):
        shots, val = draw_shots(labels, train_pool, None, clusters, test, 8, seed, ["a", "b", "c"])
        assert np.bincount(labels[shots]).tolist() == [8, 8, 8]
        assert np.bincount(labels[val]).tolist() == [4, 4, 4]   # min(8, 4)
        assert not set(shots) & set(val) and 0 not in shots and 0 not in val   # 0 has a copy in test
        for members in clusters[1:]:   # a cluster gives one image at most, to the shots or to validation
            assert len(set(members) & set(np.r_[shots, val])) <= 1
    first, val = draw_shots(labels, train_pool, None, [], test, 2, 0, ["a", "b", "c"])
    assert np.bincount(labels[val]).tolist() == [2, 2, 2]   # min(2, 4)
    assert any(not np.array_equal(first, draw_shots(labels, train_pool, None, [], test, 2, s, ["a", "b", "c"])[0])
               for s in range(1, 5)), "the seed redraws the shots"
    assert np.array_equal(first, draw_shots(labels, train_pool, None, [], test, 2, 0, ["a", "b", "c"])[0])


def test_a_dataset_validation_split_is_the_validation_pool():
    labels = np.r_[np.repeat([0, 1], 5), np.repeat([0, 1], 3), [0, 1]]   # 5 train, 3 val per class, 2 test
    train_pool, val_pool, test = np.arange(10), np.arange(10, 16), np.arange(16, 18)
    for seed in range(10):
        shots, val = draw_shots(labels, train_pool, val_pool, [[0, 10]], test, 2, seed, ["a", "b"])
        assert set(shots) <= set(train_pool) and set(val) <= set(val_pool)
        assert np.bincount(labels[shots]).tolist() == [2, 2] and np.bincount(labels[val]).tolist() == [2, 2]
        assert not {0, 10} <= set(np.r_[shots, val])   # copies of one another: one of them at most


def test_validation_pool_too_small_for_min_k_4_is_one_line_naming_the_class():
    labels = np.r_[np.repeat([0, 1], 5), np.repeat([0, 1], 3), [0, 1]]
    with pytest.raises(UserError, match=r"class 'a' has 3 validation images to draw 4 from"):
        draw_shots(labels, np.arange(10), np.arange(10, 16), [], np.arange(16, 18), 4, 0, ["a", "b"])


def test_a_class_with_fewer_than_k_images_is_one_line_naming_class_and_count():
    labels = np.r_[np.zeros(9, int), np.ones(3, int), [0, 1]]
    with pytest.raises(UserError, match=r"--shots 4: class 'b' has 3 training images to draw 4 from"):
        draw_shots(labels, np.arange(12), None, [], np.arange(12, 14), 4, 0, ["a", "b"])


def test_k4_on_the_sample_is_one_line_before_anything_loads(tmp_path, capsys):
    run_script("E2_linear_probe.py", "--smoke", "--shots", 4, "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"--shots 4: class 'glioma' has 5 training images, fewer than the 8", err[0])
    assert not (tmp_path / "E2_linear_probe").exists() or not any((tmp_path / "E2_linear_probe").iterdir())


# --------------------------------------------------------------------------- split files

def test_a_k_shot_run_writes_its_split_and_the_split_file_reproduces_its_predictions(tmp_path):
    run_script("E2_linear_probe.py", "--smoke", "--shots", 2, "--output-dir", tmp_path / "drawn", "--quiet",
               expect_exit=0)
    drawn = tmp_path / "drawn" / "E2_linear_probe"
    split = json.loads((drawn / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [8, 8, 20]   # 2 + 2 per class; test whole
    assert all((SAMPLE_DATA / path).is_file() and name == metrics_of(drawn)["class_names"][label]
               for key in split for path, label, name in split[key])
    run_script("E2_linear_probe.py", "--smoke", "--split-file", drawn / "split.json", "--output-dir",
               tmp_path / "again", "--quiet", expect_exit=0)
    again = tmp_path / "again" / "E2_linear_probe"
    assert (again / "split.json").read_text() == (drawn / "split.json").read_text()
    assert (again / "predictions.csv").read_text() == (drawn / "predictions.csv").read_text()
    assert metrics_of(again)["test_accuracy"] == metrics_of(drawn)["test_accuracy"]
    assert metrics_of(drawn)["shots"] == 2 and metrics_of(drawn)["num_images"] == \
        {"train": 8, "val": 8, "test": 20}


def coop_entry(path: str) -> list:
    name = path.split("/")[1]
    return [path, ["glioma", "meningioma", "notumor", "pituitary"].index(name), name]


def test_a_hand_written_coop_split_file_is_trained_on_exactly_its_files(tmp_path):
    files = sorted(p.relative_to(SAMPLE_DATA).as_posix() for p in SAMPLE_DATA.rglob("*.jpg"))
    train = [f for f in files if f.startswith("train/")]
    test = [f for f in files if f.startswith("test/")]
    # Test images in train and a train image in test: a split file decides, not the folders.
    split = {"train": [coop_entry(f) for f in train[::2] + test[:1]],
             "val": [coop_entry(f) for f in train[1::2]],
             "test": [coop_entry(f) for f in test[1:] + train[-1:]]}
    split["val"] = [e for e in split["val"] if e[0] not in {t[0] for t in split["test"]}]
    (tmp_path / "split_sample.json").write_text(json.dumps(split))
    run_script("E3_shallow_vpt.py", "--smoke", "--epochs", 1, "--split-file", tmp_path / "split_sample.json",
               "--output-dir", tmp_path / "out", "--quiet", expect_exit=0)
    used = json.loads((tmp_path / "out" / "E3_shallow_vpt" / "split.json").read_text())
    for key in ("train", "val", "test"):
        assert [e[0] for e in used[key]] == [e[0] for e in split[key]]
        assert [e[1] for e in used[key]] == [e[1] for e in split[key]]
    metrics = metrics_of(tmp_path / "out" / "E3_shallow_vpt")
    assert metrics["num_images"] == {k: len(split[k]) for k in ("train", "val", "test")}
    assert metrics["class_names"] == ["glioma", "meningioma", "no tumor", "pituitary"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["train"].append(["train/glioma/nowhere.jpg", 0, "glioma"]), r"nowhere.jpg does not exist"),
    (lambda s: s["val"].__setitem__(0, [s["val"][0][0], 0, "meningioma"]), r"label 0 is named 'meningioma' here"),
    (lambda s: s.pop("val"), r"needs non-empty lists 'train', 'val' and 'test'"),
    (lambda s: s["test"].append(s["train"][0]), r"is listed twice"),
    (lambda s: s["train"].__setitem__(0, ["train/glioma/x.jpg", "0"]), r"not \[relative path, integer label"),
])
def test_a_bad_split_file_is_one_line(change, message, tmp_path, capsys):
    files = sorted(p.relative_to(SAMPLE_DATA).as_posix() for p in SAMPLE_DATA.rglob("*.jpg"))
    split = {"train": [coop_entry(f) for f in files if f.startswith("train/")][::2],
             "val": [coop_entry(f) for f in files if f.startswith("train/")][1::2],
             "test": [coop_entry(f) for f in files if f.startswith("test/")]}
    change(split)
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match=message):
        read_split_file(str(tmp_path / "split.json"), str(SAMPLE_DATA))
    run_script("E2_linear_probe.py", "--smoke", "--split-file", tmp_path / "split.json", "--output-dir",
               tmp_path / "out", expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out" / "E2_linear_probe" / "metrics.json").exists()


# --------------------------------------------------------------------------- AUROC

def test_auroc_is_scikit_learns_one_vs_rest_with_a_bootstrap_interval():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[np.arange(300), labels] += 0.4
    probs /= probs.sum(1, keepdims=True)
    scores = auroc(probs, labels, list("abcd"), seed=0)
    assert scores["macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert [scores["per_class"][c] for c in "abcd"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average=None).tolist())
    low, high = scores["macro_ci95"]
    assert low < scores["macro"] < high and high - low < 0.1
    # The resamples' rank form agrees with scikit-learn on ties too: a constant score is 0.5 for every class.
    flat = auroc(np.full((300, 4), 0.25), labels, list("abcd"), seed=0)
    assert flat["macro"] == pytest.approx(0.5) and flat["macro_ci95"] == pytest.approx([0.5, 0.5])
    # A class absent from test has no AUROC and stays out of the macro.
    three = auroc(probs[labels != 3], labels[labels != 3], list("abcd"), seed=0)
    assert three["per_class"]["d"] is None
    assert three["macro"] == pytest.approx(np.mean([three["per_class"][c] for c in "abc"]))


def test_metrics_json_has_auroc_macro_and_per_class(tmp_path):
    run_script("E1_zero_shot_clip.py", "--smoke", "--output-dir", tmp_path, "--quiet", expect_exit=0)
    metrics = metrics_of(tmp_path / "E1_zero_shot_clip")
    assert set(metrics["auroc"]["per_class"]) == set(metrics["class_names"])
    assert metrics["test_auroc"] == metrics["auroc"]["macro"]
    import csv
    from sklearn.metrics import roc_auc_score
    rows = list(csv.DictReader(open(tmp_path / "E1_zero_shot_clip" / "predictions.csv")))
    names = metrics["class_names"]
    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows])
    labels = np.array([names.index(r["label"]) for r in rows])
    assert metrics["test_auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-4)


# --------------------------------------------------------------------------- paired comparisons

def test_a_planted_real_difference_is_found_and_identical_predictors_are_not():
    from scipy.stats import binomtest
    from clip_adapt.paired import compare_all, paired_difference
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.7
    better = base.copy()
    better[np.flatnonzero(~base)[:60]] = True   # right on 60 more images, wrong on none more
    worse_somewhere = better.copy()
    worse_somewhere[np.flatnonzero(base)[:5]] = False   # wrong on 5 that the base gets right
    pairs = {p["a"]: p for p in compare_all({"E1": base, "E2": base.copy(), "E4": worse_somewhere}, seed=0)}
    planted = next(p for p in compare_all({"E1": base, "E4": worse_somewhere}) if p["a"] == "E4")
    assert planted["difference"] == pytest.approx((60 - 5) / 400)
    assert planted["ci95"][0] > 0 and planted["significant"]
    assert planted["p"] == pytest.approx(binomtest(5, 65, 0.5).pvalue)   # McNemar's exact test is this binomial
    same = paired_difference(base, base.copy())
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["p"] == 1.0
    assert not pairs["E2"]["significant"]   # E2 - E1: identical predictors
    # Seeds are resampled too: two seeds of equal predictors stay at 0, a planted gap in both stays found.
    two = paired_difference(np.stack([worse_somewhere, worse_somewhere]), np.stack([base, base]))
    assert two["seeds"] == 2 and two["ci95"][0] > 0 and two["only_a"] == 120


def test_holm_correction_is_statsmodels_across_the_pairs_of_one_table(monkeypatch):
    from clip_adapt import paired
    ps = iter([0.01, 0.04, 0.03])
    monkeypatch.setattr(paired, "paired_difference", lambda a, b, seed: {"p": next(ps)})
    pairs = paired.compare_all({"E1": None, "E2": None, "E3": None})
    assert [p["p_holm"] for p in pairs] == pytest.approx([0.03, 0.06, 0.06])
    assert [p["significant"] for p in pairs] == [True, False, False]


# --------------------------------------------------------------------------- the sweep in one command

def fake_run(folder, name: str, seed: int, right: list[bool], shots: int | None = None) -> tuple[dict, object]:
    """A finished run's metrics and folder with its predictions.csv, nothing trained."""
    folder.mkdir(parents=True)
    with open(folder / "predictions.csv", "w") as f:
        f.write("file,label,prediction\n" + "".join(f"test/a/{i}.jpg,a,{'a' if ok else 'b'}\n"
                                                     for i, ok in enumerate(right)))
    accuracy = float(np.mean(right))
    metrics = {"experiment": name, "seed": seed, "shots": shots, "trainable_params": 10, "total_params": 100,
               "trainable_share": 0.1, "converged": True, "convergence_reason": "", "robustness": {"0.0": accuracy},
               "test_accuracy_ci95": [accuracy - 0.1, accuracy + 0.1],
               **{m: accuracy for m in ("test_accuracy", "train_accuracy", "test_macro_f1", "test_balanced_accuracy",
                                        "test_ece", "test_auroc")}, "best_epoch": 1, "epochs_run": 2,
               "wall_time_s": 1.5 * (shots or 8)}
    return metrics, folder


def test_the_sweeps_summary_has_the_k_table_its_cost_the_curve_and_a_paired_table_per_k(tmp_path):
    from clip_adapt.runner import aggregate, classification_scripts
    from clip_adapt.sweep import paired_section, plot_shots, shots_rows, shots_section
    scripts = {s.name: s for s in classification_scripts()}
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.5
    by_shots, full = {}, {}
    for seed in (1, 2):
        for k in (1, 2):
            right = base | (rng.random(200) < 0.2 * k)
            by_shots.setdefault((k, "E2_linear_probe"), []).append(
                fake_run(tmp_path / f"shots_{k}" / f"seed_{seed}" / "E2_linear_probe", "E2_linear_probe", seed,
                         list(right), k))
        full.setdefault("E1_zero_shot_clip", []).append(
            fake_run(tmp_path / f"seed_{seed}" / "E1_zero_shot_clip", "E1_zero_shot_clip", seed, list(base)))
        full.setdefault("E2_linear_probe", []).append(
            fake_run(tmp_path / f"seed_{seed}" / "E2_linear_probe", "E2_linear_probe", seed, list(base | True)))
    k_rows = shots_rows(by_shots)
    rows = [aggregate(name, [m for m, _ in runs]) for name, runs in full.items()]
    text = shots_section(k_rows, rows, [1, 2])
    assert "| experiment | K = 1 | K = 2 | all |" in text and "Seed s draws its own K-shot split" in text
    e2 = [r for r in k_rows if r["experiment"] == "E2_linear_probe"]
    assert [r["shots"] for r in e2] == [1, 2] and e2[0]["runs"] == 2
    assert re.search(r"\| E2_linear_probe \| \d\.\d{3} ± \d\.\d{3} \| \d\.\d{3} ± \d\.\d{3} \| 1\.000 ± 0\.000 \|",
                     text)
    assert "No labelled images (shown as a horizontal line in the figure): E1_zero_shot_clip" in text
    assert "| 1 | 2 | 1.5 | 3.0 |" in text and "| 2 | 2 | 3.0 | 6.0 |" in text   # the cost of each K
    plot_shots(k_rows, rows, tmp_path / "summary_shots.png", chance=0.5)
    assert (tmp_path / "summary_shots.png").read_bytes()[:4] == b"\x89PNG"
    paired = paired_section({n: [f for _, f in runs] for n, runs in full.items()}, by_shots, scripts)
    for title in ("full training data", "K = 1 shots", "K = 2 shots"):   # E1 joins every K's table
        assert f"## Paired comparisons, {title}" in paired
    lines = re.findall(r"^- E2 − E1: .*$", paired, re.MULTILINE)
    assert len(lines) == 3 and all("**significant**" in line for line in lines), lines
    assert "| row − column | E1 | E2 |" in paired


@pytest.mark.slow
def test_run_all_sweeps_k_with_seeds_into_a_table_a_curve_and_paired_lines(tmp_path):
    """The issue's command, every experiment."""
    out = tmp_path / "sweep"
    run_script("run_all_experiments.py", "--smoke", "--shots", 1, 2, "--seeds", 1, 2, "--output-dir", out, "--quiet",
               expect_exit=0)
    summary = (out / "summary.md").read_text()
    assert "| experiment | K = 1 | K = 2 | all |" in summary
    assert re.search(r"\| E2_linear_probe \| \d\.\d{3} ± \d\.\d{3} \| \d\.\d{3} ± \d\.\d{3} \| \d\.\d{3} ± ", summary)
    assert "Seed s draws its own K-shot split" in summary and "## Cost of each K" in summary
    for title in ("full training data", "K = 1 shots", "K = 2 shots"):
        assert f"## Paired comparisons, {title}" in summary
    assert re.search(r"^- E2 − E1: [+-]\d+\.\d points \[-?\d+\.\d, -?\d+\.\d\], p = [\d.e-]+ \(Holm [\d.e-]+\), "
                     r"(not significant|\*\*significant\*\*)$", summary, re.MULTILINE)
    assert (out / "summary_shots.png").read_bytes()[:4] == b"\x89PNG"
    # Each K's runs drew their own shots per seed (--split-seed s), on the same whole test split.
    splits = {(k, s): json.loads((out / f"shots_{k}" / f"seed_{s}" / "E2_linear_probe" / "split.json").read_text())
              for k in (1, 2) for s in (1, 2)}
    assert [len(splits[(k, 1)]["train"]) for k in (1, 2)] == [4, 8]
    assert splits[(2, 1)]["train"] != splits[(2, 2)]["train"]
    assert len({json.dumps(split["test"]) for split in splits.values()}) == 1
    page = (out / "report.html").read_text()
    assert "K = 1" in page and "Paired comparisons" in page and "row − column" in page
    assert 'alt="Test accuracy against labelled images per class (K shots)"' in page
    import csv
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["shots"], r["experiment"]) for r in rows} >= {("1", "E2_linear_probe"), ("2", "E2_linear_probe"),
                                                            ("all", "E2_linear_probe"), ("all", "E1_zero_shot_clip")}


def test_run_all_refuses_k_the_sample_cannot_hold_before_any_run(tmp_path, capsys):
    run_script("run_all_experiments.py", "--smoke", "--shots", 1, 4, "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots 4: class 'glioma' has 5 training images" in err[0]
    assert not list(tmp_path.glob("**/metrics.json"))


def test_a_split_file_whose_test_has_copies_in_train_gets_the_warning(tmp_path):
    import shutil
    from clip_adapt.sweep import copy_warnings
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    train = [f for f in files if f.startswith("train/")]
    shutil.copy(data / train[0], data / "test" / "glioma" / "planted_copy.jpg")   # an exact copy of a train image
    split = {"train": [coop_entry(f) for f in train[::2]], "val": [coop_entry(f) for f in train[1::2]],
             "test": [coop_entry(f) for f in files if f.startswith("test/")] + [coop_entry("test/glioma/planted_copy.jpg")]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    run_script("run_all_experiments.py", "--smoke", "--experiments", "E1", "--data", data, "--split-file",
               tmp_path / "split.json", "--output-dir", tmp_path / "out", "--quiet", expect_exit=0)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "**Warning: copies across the split file's splits.** 1 test images" in summary
    metrics = json.loads((tmp_path / "out" / "E1_zero_shot_clip" / "metrics.json").read_text())
    assert metrics["train_test_duplicates"] == 1
    # Without a copy, or without a split file (the folder's own splits), no warning.
    assert copy_warnings([{**metrics, "train_test_duplicates": 0}]) == ""
    assert copy_warnings([{**metrics, "split_file": None}]) == ""


# --------------------------------------------------------------------------- CoOp's fixed schedule

def test_coop_schedule_is_its_epochs_per_k_a_cosine_rate_and_the_last_epoch(tmp_path):
    import csv
    import math
    from clip_adapt.shots import coop_epochs
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]   # CoOp's COOP.md
    run_script("E3_shallow_vpt.py", "--smoke", "--shots", 1, "--schedule", "coop", "--epochs", 6, "--output-dir",
               tmp_path, "--quiet", expect_exit=0)
    metrics = metrics_of(tmp_path / "E3_shallow_vpt")
    assert metrics["epochs_run"] == 6 and metrics["best_epoch"] == 6   # every epoch run, the last one reported
    assert metrics["convergence"] == "fixed-schedule" and "not applied" in metrics["convergence_reason"]
    assert metrics["selection"]["metric"] == "last epoch (fixed schedule)"
    # 4 training images, one step an epoch, no warm-up: the rate after epoch e is the peak x (1 + cos(pi e / 6)) / 2.
    rates = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "E3_shallow_vpt" / "history.csv"))][1:]
    peak = metrics["settings"]["lr"]
    assert rates == pytest.approx([peak * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(1, 7)], abs=1e-12)


def test_coop_schedule_without_shots_is_one_line(tmp_path, capsys):
    run_script("E3_shallow_vpt.py", "--smoke", "--schedule", "coop", "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --schedule coop is CoOp's schedule per number of shots: pass --shots K"]


def test_the_captioning_script_refuses_the_classification_protocol_flags(tmp_path, capsys):
    run_script("E8_caption_peft.py", "--smoke", "--shots", 2, "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots, --split-file and --schedule are the classification scripts'" in err[0]
