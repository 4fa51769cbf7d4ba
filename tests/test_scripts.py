"""The scripts as a user runs them: complete outputs, one-line errors, exact resume, same seed same result."""

import csv
import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (CLASSES, METRIC_KEYS, OUTPUT_FILES, REPO, SHARED_DATA, make_image_folder, run_process,
                      run_script)

from transformers import BertConfig

from safetensors.torch import load_file

from clip_adapt.base import UserError
from clip_adapt.data import Split
from clip_adapt.models import is_random
from clip_adapt.reporting import FITTED_ONCE, LIBRARIES
from clip_adapt.timing import PHASES
from clip_adapt.training import TrainConfig, train

from clip_adapt.runner import classification_scripts, experiment_scripts

# Every experiment script, found as run_all_experiments.py finds them: a new one is tested without an edit here.
SCRIPTS = [script.path.name for script in classification_scripts()]
TRAINED = [script.path.name for script in classification_scripts() if script.trains]
ZERO_SHOT = [script.path.name for script in classification_scripts() if not script.trains]
CLIP_SCRIPTS = [script.path.name for script in classification_scripts() if script.takes_clip]   # not E14's ResNet
# The project's 800 images of mixed sizes and modes go through the data path every script shares: one script of
# each kind runs on them (one that trains nothing, the first two that train, and each that brings its own
# backbone and preprocessing); every script runs end to end on the sample (test_run_all_smoke_writes_the_complete_tree).
ON_PROJECT_DATA = list(dict.fromkeys([*ZERO_SHOT[:1], *TRAINED[:2], *(s.path.name for s in classification_scripts()
                                                                       if not s.takes_clip)]))


def metrics_of(out_dir, script) -> dict:
    return json.loads((out_dir / script.removesuffix(".py") / "metrics.json").read_text())


SCORES = ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy")


def assert_one_process_trains_alike(several: dict, flags, out_dir, tolerance: float = 1e-4) -> dict:
    """E6 run again in this one process with the same flags: the same epochs and, to `tolerance`, the same losses
    and accuracies as `several` (the metrics of a run in several processes). Returns the one-process metrics."""
    run_script("E6_full_finetune.py", *flags, "--output-dir", out_dir, expect_exit=0)
    one = metrics_of(out_dir, "E6_full_finetune.py")
    assert one["num_processes"] == 1 and several["num_processes"] > 1
    assert several["epochs_run"] == one["epochs_run"] and several["best_epoch"] == one["best_epoch"]
    for key in SCORES:
        assert several[key] == pytest.approx(one[key], abs=tolerance), key
    return one


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "timings", "settings")}


def assert_complete_outputs(folder, trained: bool):
    metrics = json.loads((folder / "metrics.json").read_text())
    # Curves for what trains by epochs; none for zero-shot (nothing trained) or a solver's single fit (E2's
    # L-BFGS shows its C sweep instead, E9 its search table).
    looped = trained and metrics.get("solver") not in FITTED_ONCE
    curves = {"loss_curves.png", "accuracy_curves.png"}
    files = {p.name for p in folder.iterdir()}
    assert (OUTPUT_FILES if looped else OUTPUT_FILES - curves) <= files
    assert looped or not curves & files
    assert ("c_sweep.png" in files) == (metrics.get("solver") == "lbfgs")
    # The data's contact sheet: once, in the output folder, named by each experiment's data report.
    assert "closest_pairs.png" not in files
    sheet = json.loads((folder / "data_report.json").read_text()).get("contact_sheet")
    assert sheet is None or ((folder / sheet).resolve() == (folder.parent / "closest_pairs.png").resolve()
                             and (folder / sheet).is_file())
    assert METRIC_KEYS <= set(metrics)
    assert set(metrics["model_dims"]) == ({"vision_hidden", "vision_layers", "projection_dim", "text_hidden"}
                                          if metrics.get("backbone", "clip") == "clip" else
                                          {"embedding_size", "hidden_sizes", "depths", "layer_type"})
    # What a result is traced by: the libraries' versions, the code's commit and dirty flag, the weights loaded.
    assert set(metrics["versions"]) == set(LIBRARIES) and metrics["versions"]["torch"] == torch.__version__
    assert metrics["code"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", metrics["code"]["commit"])
    assert metrics["code"]["dirty"] in (True, False, None)
    assert len(metrics["model_weights"]) == 1 and set(metrics["model_weights"]) <= {"revision", "weights_fingerprint"}
    assert metrics["weights"] == ("random" if is_random(metrics["model"]) else "pretrained")
    # The run's time split into phases (clip_adapt/timing.py) adds up to its whole wall time.
    timings = metrics["timings"]
    assert set(timings) == {*PHASES, "other", "total"} and all(v >= 0 for v in timings.values())
    assert sum(v for k, v in timings.items() if k != "total") == pytest.approx(timings["total"], abs=0.01)
    assert timings["copy_check"] > 0 and timings["reports"] > 0 and (timings["training"] > 0) == trained
    history = list(csv.DictReader((folder / "history.csv").read_text().splitlines()))
    # One row per trained epoch and epoch 0, the model as built; one row for what trains nothing, or is fitted once
    # (E2's L-BFGS probe, E9's training-free cache with its search).
    assert len(history) == (metrics["epochs_run"] + 1 if looped else 1)
    # The verdict on the training (convergence) and the choice of the reported epoch (selection), apart.
    assert metrics["convergence"] in ("converged", "still-falling", "below-min-steps", "diverging", "under-fitted",
                                      "nothing trained")
    assert metrics["converged"] == (metrics["convergence"] in ("converged", "nothing trained"))
    if looped and metrics["selection"]["metric"] == "val_accuracy":   # LP++: its reference's rule, the last best
        assert metrics["selection"]["epoch"] == metrics["best_epoch"]     # of the trained epochs (epoch 0 is not one)
        trained_epochs = [row for row in history if int(row["epoch"]) > 0]
        best = max(reversed(trained_epochs), key=lambda row: float(row["val_accuracy"]))
        assert int(best["epoch"]) == metrics["best_epoch"]
    elif looped:
        assert metrics["selection"]["metric"] == "val_loss" and metrics["selection"]["epoch"] == metrics["best_epoch"]
        best = min(history, key=lambda row: float(row["val_loss"]))
        assert int(best["epoch"]) == metrics["best_epoch"]
    assert {"train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy"} <= set(history[0])
    assert (folder / "checkpoint" / "best.safetensors").exists() == trained
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    return metrics


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data/brain_mri")
@pytest.mark.parametrize("script", ON_PROJECT_DATA)
def test_each_kind_of_script_writes_every_output_on_the_project_data(script, tmp_path):
    run_script(script, "--smoke", "--data", SHARED_DATA, "--epochs", 2, "--output-dir", tmp_path, expect_exit=0)
    metrics = assert_complete_outputs(tmp_path / script.removesuffix(".py"), trained=script in TRAINED)
    # Near copies (tests/test_duplicates.py): 9 test images have a re-contrasted copy in train, and train's
    # clusters go whole to one side of the validation split.
    assert metrics["num_images"] == {"train": 409, "val": 71, "test": 320}
    assert metrics["train_test_duplicates"] == 9
    # E2's default solver fits the probe exactly, E9's cache is searched once: one row, not epochs.
    assert metrics["epochs_run"] == (0 if script in ZERO_SHOT else 1 if metrics.get("solver") in FITTED_ONCE else 2)
    assert metrics["converged"] in (True, False) and metrics["convergence_reason"]
    # E9's training-free cache is fitted (searched) with no trainable parameter
    assert 0 < metrics["trainable_params"] <= metrics["total_params"] or script in ZERO_SHOT or \
        metrics.get("solver") == "search"
    if script in ("E3_shallow_vpt.py", "E4_deep_vpt.py", "E5_clip_vpt.py"):
        assert metrics["num_prompts"] == 1


def test_run_all_smoke_writes_the_complete_tree(tmp_path):
    result = run_process("run_all_experiments.py", "--smoke", "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for script in SCRIPTS:
        assert_complete_outputs(tmp_path / script.removesuffix(".py"), trained=script in TRAINED)
    rows = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert [r["experiment"] for r in rows] == [s.removesuffix(".py") for s in SCRIPTS]
    shares = {r["experiment"]: float(r["trainable_share"]) for r in rows}
    assert shares["E1_zero_shot_clip"] == 0 and shares["E6_full_finetune"] < 1
    assert shares["E2_linear_probe"] < shares["E7_lora"] < shares["E6_full_finetune"]
    # One total for every share: all of CLIP (both towers), plus what the method adds to it. E1 adds nothing;
    # E5's prompts and E6's head (E2's size) are added; E6 trains the vision tower but not the text tower.
    totals = {r["experiment"]: int(r["total_params"]) for r in rows}
    trained = {r["experiment"]: int(r["trainable_params"]) for r in rows}
    assert totals["E5_clip_vpt"] == totals["E1_zero_shot_clip"] + trained["E5_clip_vpt"]
    assert totals["E6_full_finetune"] == totals["E1_zero_shot_clip"] + trained["E2_linear_probe"]
    assert totals["E6_full_finetune"] > trained["E6_full_finetune"]
    assert len(list(tmp_path.rglob("closest_pairs.png"))) == 1   # the data's contact sheet: one copy per run
    assert "](closest_pairs.png)" in (tmp_path / "summary.md").read_text()   # linked
    summary = (tmp_path / "summary.md").read_text()
    assert "| E7_lora |" in summary and "Failed" not in summary
    for png in ("summary.png", "summary_robustness.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_run_all_with_seeds_reports_mean_and_std_and_refuses_bad_data_before_any_run(tmp_path, monkeypatch):
    args = ["--smoke", "--output-dir", tmp_path, "--seeds", 0, 1, "--experiments", "E1_zero_shot_clip",
            "E2_linear_probe"]
    run_script("run_all_experiments.py", *args, expect_exit=0)
    row = next(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert row["runs"] == "2" and row["test_accuracy_std"] != ""
    assert (tmp_path / "seed_1" / "E2_linear_probe" / "metrics.json").exists()
    assert "±" in (tmp_path / "summary.md").read_text()

    code = run_script("run_all_experiments.py", "--smoke", "--output-dir", tmp_path / "bad", "--data", tmp_path / "no",
                      "--experiments", "E1_zero_shot_clip", "E2_linear_probe")
    assert code == 2 and not (tmp_path / "bad" / "summary.md").exists()   # refused before any experiment ran


# --------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_on_stderr_without_traceback(tmp_path):
    result = run_process("E2_linear_probe.py", "--smoke", "--data", tmp_path / "missing", "--output-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def broken_folder(kind, root):
    folder = make_image_folder(root / "data", per_class=3)
    if kind == "mismatch":
        (folder / "test" / "glioma").rename(folder / "test" / "astrocytoma")
    elif kind == "empty":
        for f in (folder / "test" / "notumor").iterdir():
            f.unlink()
    elif kind == "unreadable":
        (folder / "train" / "glioma" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    elif kind == "one class":
        for split in ("train", "test"):
            for name in CLASSES[1:]:
                shutil.rmtree(folder / split / name)
    return folder


@pytest.mark.parametrize("case, flags, message", [
    ("missing data", ["--data", "{tmp}/nowhere"], "does not exist"),
    ("another model type", ["--model", "{tmp}/bert"], "holds a 'bert' model, not CLIP"),
    ("zero learning rate", ["--lr", "0"], "--lr must be positive"),
    ("val fraction too big", ["--val-fraction", "0.9"], "too few images"),
    ("class mismatch", ["--data", "mismatch"], "different class folders"),
    ("empty class", ["--data", "empty"], "holds no images"),
    ("one class", ["--data", "one class"], "at least 2 classes are needed"),
    ("unreadable image", ["--data", "unreadable"], "cannot read image train/glioma/bad.jpg"),
    ("model path missing", ["--model", "{tmp}/no_model"], "model directory .* does not exist"),
    ("not a model", ["--model", "{tmp}"], "is not a CLIP model directory"),
    ("hub offline", ["--model", "openai/clip-vit-base-patch16"],
     "not in the local cache, and offline mode is on .* check the name for a typo; .* or --model random:vit-b16"),
    ("dataset hub offline", ["--data", "aggr8/brain_mri_train_test_split"], "could not load dataset"),
    ("output not writable", ["--output-dir", "{tmp}/file/sub"], "cannot write to output folder"),
    ("bad epochs", ["--epochs", "0"], "--epochs must be at least 1"),
    pytest.param("no torchvision", ["--image-processor", "fast"], "--image-processor fast needs torchvision built for",
                 marks=pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                          reason="torchvision is installed here")),
])
def test_each_bad_input_gets_a_clear_message(case, flags, message, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    flags = [str(broken_folder(f, tmp_path)) if f in ("mismatch", "empty", "unreadable", "one class") else f.format(tmp=tmp_path)
             for f in flags]
    if "--output-dir" not in flags:
        flags += ["--output-dir", tmp_path / "out"]
    run_script("E2_linear_probe.py", "--smoke", *flags, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert "(ConnectionError)" not in err[0]   # offline is the reason, not an exception's name
    assert not (tmp_path / "out").exists()   # a refused run leaves no empty output folder behind


@pytest.mark.parametrize("script, flags, message", [
    ("E3_shallow_vpt.py", ["--num-prompts", "-1"], "--num-prompts must not be negative"),
    ("E4_deep_vpt.py", ["--prompt-layers", "7"], "prompt layers must be between 0 and 2"),
    ("E5_clip_vpt.py", ["--num-text-prompts", "70"], "lower --num-text-prompts"),
    ("E5_clip_vpt.py", ["--prompt-dropout", "1"], "--prompt-dropout must be in"),
    ("E3_shallow_vpt.py", ["--num-prompts", "0", "--head", "clip"], "nothing to train"),
])
def test_bad_prompt_flags_get_a_clear_message(script, flags, message, tmp_path, capsys):
    run_script(script, "--smoke", *flags, "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --------------------------------------------------------------------------- --help

def every_parser():
    """Every experiment script's command line, as the registry builds it, and run_all_experiments.py's."""
    import common
    import run_all_experiments
    parsers = [(script.name, script.parser()) for script in experiment_scripts()]
    return parsers + [("run_all_experiments", run_all_experiments.add_own_flags(
        common.parser(run_all_experiments.__doc__, lr=None, sweep=True)))]


def help_of(parser, action) -> str:
    """The flag's entry in --help, on one line."""
    formatter = parser.formatter_class(parser.prog, width=100_000)   # unwrapped: no line breaks inside a value
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("name, parser", every_parser(), ids=lambda value: value if isinstance(value, str) else "")
def test_help_gives_every_flag_a_text_and_one_correct_default(name, parser):
    import common
    resolved = {smoke: common.resolve_defaults(parser.parse_args(["--smoke"] if smoke else [])) for smoke in (0, 1)}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = help_of(parser, action)
        assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help text"
        assert "(default:" not in text and text.count("[default") <= 1, text
        if action.default not in (None, False, "", []) and "[default" not in action.help:   # argparse's, as it is
            shown = (" ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default))
            assert f"[default: {shown}]" in text, text
        # A default decided after parsing, stated in the help: what resolve_defaults gives, with --smoke too.
        stated = re.search(r"\[default: ([\w./-]+)(?:; with --smoke: ([\w./-]+))?\]", text)
        if action.default is None and stated and action.dest in vars(resolved[0]):
            for smoke, value in ((0, stated.group(1)), (1, stated.group(2) or stated.group(1))):
                got = getattr(resolved[smoke], action.dest)
                if re.fullmatch(r"[\d.e-]+", value) or got == value or str(got).endswith(value):
                    assert str(got) == value or str(got).endswith(value) or float(got) == float(value), \
                        (name, action.dest, smoke, got, value)


# --------------------------------------------------------------------------- determinism and resume

# Pinned to the CPU: on a GPU, bf16 autocast and fused attention use non-deterministic kernels.
RESUME_FLAGS = ["--smoke", "--device", "cpu", "--epochs", 8, "--patience", 8, "--lr", 3e-3]


def test_same_seed_same_metrics(tmp_path):
    for run in ("a", "b"):
        run_script("E4_deep_vpt.py", *RESUME_FLAGS, "--output-dir", tmp_path / run, expect_exit=0)
    assert comparable(metrics_of(tmp_path / "a", "E4_deep_vpt.py")) == \
        comparable(metrics_of(tmp_path / "b", "E4_deep_vpt.py"))
    assert (tmp_path / "a/E4_deep_vpt/history.csv").read_text() == (tmp_path / "b/E4_deep_vpt/history.csv").read_text()


@pytest.mark.parametrize("script", ["E3_shallow_vpt.py", "E5_clip_vpt.py"])
def test_stopped_run_resumes_to_exactly_the_uninterrupted_result(script, tmp_path):
    flags = [*RESUME_FLAGS, "--prompt-dropout", 0.2]
    run_script(script, *flags, "--output-dir", tmp_path / "whole", expect_exit=0)
    run_script(script, *flags, "--output-dir", tmp_path / "parts", "--stop-after-epochs", 3, expect_exit=0)
    assert not (tmp_path / "parts" / script.removesuffix(".py") / "metrics.json").exists()
    run_script(script, *flags, "--output-dir", tmp_path / "parts", "--resume", expect_exit=0)
    whole, parts = metrics_of(tmp_path / "whole", script), metrics_of(tmp_path / "parts", script)
    assert comparable(whole) == comparable(parts)
    assert whole["epochs_run"] == 8


def test_killed_process_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    flags = ["--smoke", "--device", "cpu", "--epochs", 150, "--patience", 150, "--lr", 1e-3, "--checkpoint-every", 0]
    process = subprocess.Popen([sys.executable, "E3_shallow_vpt.py", *map(str, flags), "--output-dir",
                                str(tmp_path / "parts")], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "parts" / "E3_shallow_vpt" / "checkpoint" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)   # no chance to clean up: only atomic writes save the run
    process.wait()
    assert not (tmp_path / "parts" / "E3_shallow_vpt" / "metrics.json").exists(), "killed too late to test resume"
    run_script("E3_shallow_vpt.py", *flags, "--output-dir", tmp_path / "parts", "--resume", expect_exit=0)
    run_script("E3_shallow_vpt.py", *flags, "--output-dir", tmp_path / "whole", expect_exit=0)
    assert comparable(metrics_of(tmp_path / "parts", "E3_shallow_vpt.py")) == \
        comparable(metrics_of(tmp_path / "whole", "E3_shallow_vpt.py"))


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    gradient = ("--smoke", "--solver", "adamw", "--output-dir", tmp_path)   # L-BFGS has no resume state
    run_script("E2_linear_probe.py", *gradient, "--stop-after-epochs", 1, expect_exit=0)
    run_script("E2_linear_probe.py", *gradient, "--resume", "--lr", 0.5, expect_exit=2)
    assert "different lr" in capsys.readouterr().err


class TurnsNaN(torch.nn.Module):
    """A head that works for two epochs, then produces NaN."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        return self.linear(x) * (float("nan") if self.calls > 2 else 1.0)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    split = Split(torch.randn(8, 3), torch.arange(8) % 2, [])
    config = TrainConfig(epochs=10, patience=10, batch_size=8, lr=0.1, weight_decay=0, warmup_epochs=0, seed=0,
                         device=torch.device("cpu"), checkpoint_dir=tmp_path, augment=False, checkpoint_every=0)
    with pytest.raises(UserError, match="loss became nan in epoch 3.*epoch 2.*--lr"):
        train(TurnsNaN(), split, split, split, config)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 3 and len(state["progress"]["history"]) == 3   # 0-2 done, 3 not begun
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "best.safetensors").values())


def test_skipped_bad_images_are_listed_in_the_outputs(tmp_path):
    folder = broken_folder("unreadable", tmp_path)
    run_script("E1_zero_shot_clip.py", "--smoke", "--data", folder, "--skip-bad-images", "--output-dir", tmp_path,
               expect_exit=0)
    report = json.loads((tmp_path / "E1_zero_shot_clip" / "data_report.json").read_text())
    assert report["skipped_images"] == ["train/glioma/bad.jpg"]
    assert metrics_of(tmp_path, "E1_zero_shot_clip.py")["skipped_images"] == 1


# --------------------------------------------------------------------------- cheap checks first, odd folders

def test_data_is_checked_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    from clip_adapt import models
    monkeypatch.setattr(models, "load_clip", lambda name: pytest.fail("the model was loaded before the data check"))
    run_script("E2_linear_probe.py", "--data", tmp_path / "wrong", "--model", "openai/clip-vit-base-patch16",
               "--output-dir", tmp_path, expect_exit=2)
    assert "data folder" in capsys.readouterr().err


def test_symlinked_split_folders_are_followed(tmp_path):
    real = make_image_folder(tmp_path / "storage", per_class=3)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / split).symlink_to(real / split, target_is_directory=True)
    run_script("E1_zero_shot_clip.py", "--smoke", "--data", data, "--output-dir", tmp_path / "out", expect_exit=0)
    metrics = metrics_of(tmp_path / "out", "E1_zero_shot_clip.py")
    assert sum(metrics["num_images"].values()) == 2 * 4 * 3


def test_curves_have_whole_epochs_on_their_axis(monkeypatch, tmp_path):
    from clip_adapt import reporting
    figures = []
    monkeypatch.setattr(reporting, "save_figure", lambda fig, path: figures.append(fig))
    history = [{"epoch": e, **{f"{s}_loss": 1 / e for s in ("train", "val", "test")}} for e in (1, 2, 3)]
    reporting.plot_curves(history, "loss", "loss", tmp_path / "curves.png")
    ticks = [t for t in figures[0].axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_bit_for_bit_tests_are_pinned_to_the_cpu():
    """On a GPU, bf16 autocast and fused attention kernels are not deterministic: --device auto would make
    the same-seed and resume tests flaky there."""
    assert RESUME_FLAGS[RESUME_FLAGS.index("--device") + 1] == "cpu"


# --------------------------------------------------------------------------- run_all_experiments.py

def test_run_all_refuses_one_learning_rate_for_experiments_with_different_defaults(tmp_path, capsys):
    run_script("run_all_experiments.py", "--smoke", "--lr", 1e-3, "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err
    assert "E6 1e-05" in err and "E2 0.001" in err and err.count("\n") == 1
    import run_all_experiments
    run_all_experiments.check_one_learning_rate(1e-2, ["E1_zero_shot_clip", "E2_linear_probe", "E3_shallow_vpt"])


def test_run_all_resets_torch_compile_between_experiments(tmp_path, monkeypatch):
    import torch._dynamo
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    run_script("run_all_experiments.py", "--smoke", "--experiments", "E1_zero_shot_clip", "E2_linear_probe",
               "--output-dir", tmp_path, expect_exit=0)
    assert len(resets) == 2


# --------------------------------------------------------------------------- run_all: one check before any experiment

@pytest.mark.parametrize("flags, messages", [
    # No network, no cache: both missing pieces in this one run, each with its fix.
    ([], ["could not load dataset 'aggr8/brain_mri_train_test_split': it is not in the local cache, and offline mode "
          "is on (HF_HUB_OFFLINE=1), so the hub was not asked; check the name for a typo; pass --data a local folder "
          "with train/<class>/* and test/<class>/* instead (the 40-image sample: --data sample_data/brain_mri)",
          "could not load model 'openai/clip-vit-base-patch16': it is not in the local cache, and offline mode is on "
          "(HF_HUB_OFFLINE=1), so the hub was not asked; check the name for a typo; pass --model a local directory "
          "saved with save_pretrained, or --model random:vit-b16 for the same architecture with random weights "
          "(tests the pipeline, no download)"]),
    (["--model", "{tiny_clip}"], ["could not load dataset 'aggr8/brain_mri_train_test_split'"]),
    (["--smoke", "--model", "openai/clip-vit-base-patch16"], ["could not load model 'openai/clip-vit-base-patch16'"]),
    (["--smoke", "--epochs", "0"], ["--epochs must be at least 1"]),
    (["--smoke", "--experiments", "E2", "E99"], ["unknown experiment 'E99': choose from E1_zero_shot_clip, "]),
    (["--smoke", "--experiments", "E8"], ["E8_caption_peft is captioning, not classification, and runs on its own "
                                          "data: python E8_caption_peft.py"]),
])
def test_run_all_checks_settings_model_and_data_once_before_any_experiment(flags, messages, tiny_clip_dir, tmp_path,
                                                                           capsys):
    flags = [f.format(tiny_clip=tiny_clip_dir) for f in flags]
    run_script("run_all_experiments.py", *flags, "--output-dir", tmp_path / "out", expect_exit=2)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == len(messages), err   # one line per problem: no usage text, no traceback
    assert all(line.startswith(f"error: {message}") for line, message in zip(lines, messages)), err
    assert "===" not in out   # no experiment started
    assert not (tmp_path / "out").exists()   # and no empty output folder left behind


def test_a_single_script_offline_says_every_missing_piece_in_one_run(tmp_path, capsys):
    run_script("E4_deep_vpt.py", "--output-dir", tmp_path / "out", expect_exit=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == [" could not load dataset 'aggr8/brain_mri_train_test_split'",
                                                     " could not load model 'openai/clip-vit-base-patch16'"], lines
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_ends_the_run_at_once_without_retries(monkeypatch, tmp_path, capsys):
    """Without HF_HUB_OFFLINE: one quick probe finds the hub out of reach, and the run goes offline (no retries)."""
    import datasets.config
    import huggingface_hub.constants

    from clip_adapt import hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    monkeypatch.setattr(hub, "_switched_off", False)
    run_script("run_all_experiments.py", "--output-dir", tmp_path, expect_exit=2)
    out, err = capsys.readouterr()
    assert out.count("the Hugging Face hub cannot be reached") == 1 and "===" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(")") for line in lines)
    assert lines[0].startswith(
        "error: could not load dataset 'aggr8/brain_mri_train_test_split': it is not in the local cache, and the "
        "Hugging Face hub cannot be reached to fetch it or to check the name (a typo looks the same); pass --data a "
        "local folder")
    assert lines[1].startswith("error: could not load model 'openai/clip-vit-base-patch16': it is not in the local "
                               "cache, and the Hugging Face hub cannot be reached")
    assert huggingface_hub.constants.HF_HUB_OFFLINE   # switched to offline: the cache only, no hub retries


def test_split_seed_draws_the_validation_split_and_seed_the_training(tmp_path, monkeypatch):
    import common
    seeds_seen, real_load = [], common.load_data
    monkeypatch.setattr(common, "load_data", lambda *a, **k: (seeds_seen.append(a[3]), real_load(*a, **k))[1])
    run_script("E3_shallow_vpt.py", "--smoke", "--split-seed", 0, "--seed", 1, "--epochs", 1, "--output-dir",
               tmp_path, expect_exit=0)
    metrics = metrics_of(tmp_path, "E3_shallow_vpt.py")
    assert (metrics["seed"], metrics["split_seed"]) == (1, 0) and seeds_seen == [0]


def test_run_all_smoke_tune_records_each_methods_grid_and_choice(tmp_path):
    """Three of the methods (every one passed this once, 144 s on a loaded 2-core machine): the probe, whose C
    sweep is its grid, prompts with a linear head, and prompts in both towers."""
    tuned = ["E2_linear_probe.py", "E3_shallow_vpt.py", "E5_clip_vpt.py"]
    run_script("run_all_experiments.py", "--smoke", "--tune", "--quiet", "--noise-levels", 0, "--output-dir",
               tmp_path, "--experiments", *(name.removesuffix(".py") for name in tuned), expect_exit=0)
    summary = (tmp_path / "summary.md").read_text()
    for script in tuned:
        metrics = metrics_of(tmp_path, script)
        tune = metrics["tune"]
        assert tune["grid"] and tune["seconds"] >= 0, script
        if script == "E2_linear_probe.py":
            assert tune["choice"] == {"l2_c": metrics["l2_c"]}
        else:   # the best of the last rung of successive halving, the one trained longest
            last = [row for row in tune["grid"] if row["epochs"] == max(r["epochs"] for r in tune["grid"])]
            best = min((row for row in last if not row["diverged"]), key=lambda row: row["val_loss"])
            assert tune["choice"] == {"lr": best["lr"], "weight_decay": best["weight_decay"]}
            assert metrics["settings"]["lr"] == best["lr"]
        assert f"| {script.removesuffix('.py')} | " in summary.split("## Tuned on the validation split")[1]


def test_a_tuned_run_equals_a_plain_run_with_the_chosen_values(tmp_path):
    """--tune re-seeds after its grid: the run that follows is the plain run given the chosen --lr and
    --weight-decay, history and all."""
    run_script("E3_shallow_vpt.py", "--smoke", "--tune", "--quiet", "--noise-levels", 0, "--output-dir",
               tmp_path / "tuned", expect_exit=0)
    choice = metrics_of(tmp_path / "tuned", "E3_shallow_vpt.py")["tune"]["choice"]
    run_script("E3_shallow_vpt.py", "--smoke", "--quiet", "--noise-levels", 0, "--lr", choice["lr"],
               "--weight-decay", choice["weight_decay"], "--output-dir", tmp_path / "plain", expect_exit=0)
    tuned, plain = ((tmp_path / run / "E3_shallow_vpt" / "history.csv").read_text() for run in ("tuned", "plain"))
    assert tuned == plain


def test_tuning_halves_its_grid_and_drops_diverging_points(tmp_path, monkeypatch):
    """Successive halving: every point at the first budget, the better half at twice it; a rate far too high
    (a factor of 10^30 on E3's default, which overflows on any CPU) is recorded as diverged and never chosen."""
    import common
    monkeypatch.setattr(common, "TUNE_LR_FACTORS", (1.0, 3.0, 1e30))
    monkeypatch.setattr(common, "TUNE_WEIGHT_DECAYS", (0.0, 0.01))
    monkeypatch.setattr(common, "TUNE_FIRST_EPOCHS", 2)
    run_script("E3_shallow_vpt.py", "--smoke", "--tune", "--quiet", "--noise-levels", 0, "--epochs", 4,
               "--output-dir", tmp_path, expect_exit=0)
    tune = metrics_of(tmp_path, "E3_shallow_vpt.py")["tune"]
    first = [row for row in tune["grid"] if row["epochs"] == 2]
    second = [row for row in tune["grid"] if row["epochs"] == 4]
    assert len(first) == 6 and tune["points"] == 6
    kept = sorted((row for row in first if not row["diverged"]), key=lambda row: row["val_loss"])
    assert [(r["lr"], r["weight_decay"]) for r in second] == [(r["lr"], r["weight_decay"]) for r in
                                                               kept[:-(-len(kept) // 2)]]
    assert all(row["diverged"] for row in first if row["lr"] >= 1e3) and tune["choice"]["lr"] < 1e3


def test_e2_on_pooled_features_counts_the_towers_width(tmp_path):
    """--features pooled: the head reads the tower's pooled output (32 wide in the smoke CLIP), not the
    16-wide projection; metrics.json says which, with the probe's fit and its selection."""
    run_script("E2_linear_probe.py", "--smoke", "--features", "pooled", "--quiet", "--noise-levels", 0,
               "--output-dir", tmp_path, expect_exit=0)
    metrics = metrics_of(tmp_path, "E2_linear_probe.py")
    assert metrics["features"] == "pooled" and metrics["trainable_params"] == 32 * 4 + 4
    assert metrics["refit_on_val"] and metrics["c_selection"] == "cross-validation"
    assert metrics["selection"]["metric"] == "C" and "cross-validation" in metrics["selection"]["rule"]
