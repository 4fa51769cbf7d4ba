"""Finding the experiment scripts and running them, for the tools that run several (run_all_experiments.py,
tools/ablate_prompts.py, tools/bench.py) and for the tests.

An experiment is a script at the repository's root named E<number>_<name>.py that declares LEARNING_RATE (None
when it trains nothing), STUDY_ACCURACY (the study's reported accuracy, or None), add_flags(parser) and
build_model(clip, tokenizer, class_names, args). Nothing lists them: a new script is found by its name. A script
may declare TASK (default "classification"); E8 is "captioning", and the tools that run classifiers on
classification data take only classification_scripts(). STUDY_RECIPE (optional): settings in which the study's
run differed from this script's defaults (E2: {"solver": "adamw"}), so that the summary marks the study's figure
when a run's settings are not the study's. MODEL_VARIANTS (optional): other command lines whose models the part
contract checks too (tests/test_part_contract.py).

A script may bring its own backbone instead of CLIP: it declares BACKBONE (e.g. "resnet"; default "clip") and
load_backbone(args, device), which returns (backbone, image processor, None), and its build_model takes that
backbone in CLIP's place (E14_resnet18.py). The tools pass such a script none of CLIP_ONLY_FLAGS
(ExperimentScript.forwarded) and say so in one line (clip_only_note).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import runpy
import sys
import time
import traceback
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch

from clip_adapt.base import is_main_process, process_count, process_index
from clip_adapt.reporting import FITTED_ONCE

REPO = Path(__file__).resolve().parent.parent
SCRIPT_NAME = re.compile(r"E(\d+)_\w+")
METRICS = ["test_accuracy", "train_accuracy", "test_macro_f1", "test_balanced_accuracy", "test_ece", "test_auroc",
           "best_epoch", "epochs_run", "wall_time_s"]
COUNTS = {"best_epoch", "epochs_run"}   # whole numbers, unless a mean over seeds


@dataclass(frozen=True)
class ExperimentScript:
    name: str   # the script's file name without .py, e.g. E4_deep_vpt; also its output folder's name
    path: Path

    @cached_property
    def module(self):
        """The script imported as a module (its main() does not run)."""
        spec = importlib.util.spec_from_file_location(f"experiment_{self.name}", self.path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @property
    def short_name(self) -> str:
        return self.name.split("_")[0]

    @property
    def learning_rate(self) -> float | None:
        return self.module.LEARNING_RATE

    @property
    def trains(self) -> bool:
        return self.module.LEARNING_RATE is not None

    @property
    def task(self) -> str:
        return getattr(self.module, "TASK", "classification")

    @property
    def backbone(self) -> str:
        """"clip", or what the script brings in its place (BACKBONE, with load_backbone)."""
        return getattr(self.module, "BACKBONE", "clip")

    @property
    def takes_clip(self) -> bool:
        return self.backbone == "clip"

    def load_backbone(self, args: argparse.Namespace | None = None, device=None):
        """(backbone, image processor, None) of a script that brings its own, for its default flags or args."""
        return self.module.load_backbone(args or self.default_args(), device)

    def forwarded(self, argv: list[str]) -> list[str]:
        """argv as a tool passes it to this script: without CLIP's flags where it brings its own backbone."""
        return argv if self.takes_clip else without_clip_flags(argv)[0]

    @property
    def study_accuracy(self) -> float | None:
        return self.module.STUDY_ACCURACY

    def differs_from_study(self, settings: dict) -> dict:
        """{setting: (this run's, the study's)} where a run's settings are not the study's recipe."""
        recipe = getattr(self.module, "STUDY_RECIPE", {})
        return {key: (settings.get(key), value) for key, value in recipe.items() if settings.get(key) != value}

    def parser(self) -> argparse.ArgumentParser:
        """The script's own command line, as its main() builds it."""
        import common
        return self.module.add_flags(common.parser(self.module.__doc__, self.module.LEARNING_RATE))

    def default_args(self, *argv: str) -> argparse.Namespace:
        import common
        return common.resolve_defaults(self.parser().parse_args(list(argv)))

    def build_model(self, clip, tokenizer, class_names: list[str], args: argparse.Namespace | None = None):
        return self.module.build_model(clip, tokenizer, class_names, args or self.default_args())


# The flags that name or shape CLIP (each takes one value): a script with a backbone of its own gets none of them.
CLIP_ONLY_FLAGS = ("--model", "--templates", "--image-processor")


def without_clip_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without CLIP_ONLY_FLAGS and their values, the flags taken out), for `--flag value` and `--flag=value`."""
    kept, dropped, skip = [], [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in CLIP_ONLY_FLAGS:
            dropped.append(arg)
            skip = True
        elif arg.split("=", 1)[0] in CLIP_ONLY_FLAGS:
            dropped.append(arg.split("=", 1)[0])
        else:
            kept.append(arg)
    return kept, dropped


def clip_only_note(scripts: list[ExperimentScript], argv: list[str]) -> str | None:
    """The one line a tool prints when it keeps CLIP's flags from scripts that bring their own backbone."""
    dropped = without_clip_flags(argv)[1]
    own = [script.short_name for script in scripts if not script.takes_clip]
    if not dropped or not own:
        return None
    return (f"note: {', '.join(own)} bring{'s' * (len(own) == 1)} {'its' if len(own) == 1 else 'their'} own "
            f"backbone: {', '.join(dict.fromkeys(dropped))} (CLIP's) passed to the CLIP scripts only")


def experiment_scripts(root: Path = REPO) -> list[ExperimentScript]:
    """Every E<number>_<name>.py in root, in the order of their numbers."""
    found = [path for path in Path(root).glob("E*.py") if SCRIPT_NAME.fullmatch(path.stem)]
    found.sort(key=lambda path: (int(SCRIPT_NAME.fullmatch(path.stem).group(1)), path.stem))
    return [ExperimentScript(path.stem, path) for path in found]


@cache
def script_named(name: str, root: Path = REPO) -> ExperimentScript:
    """The experiment script a run of `name` (its file name without .py) comes from, one per process, so that its
    module is imported once however often a run asks for it."""
    return ExperimentScript(name, Path(root) / f"{name}.py")


def classification_scripts(root: Path = REPO) -> list[ExperimentScript]:
    """The experiments that classify images (all but E8's captioning)."""
    return [script for script in experiment_scripts(root) if script.task == "classification"]


def experiment_names(root: Path = REPO) -> list[str]:
    return [script.name for script in experiment_scripts(root)]


def run_experiment(name: str, argv: list[str], root: Path = REPO) -> int:
    """Runs one script in this process (its imports are already paid for). With one process a crash is
    reported, not fatal: the next experiment runs. Under `accelerate launch` with several processes, a crash on
    any of them ends the whole launch (fail_together)."""
    saved_argv, sys.argv = sys.argv, [f"{name}.py", *argv]
    # torch.compile's caches and recompile limit are per process: the experiments before must not use them up.
    torch._dynamo.reset()
    try:
        runpy.run_path(str(Path(root) / f"{name}.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if exit_.code in (130, 143):   # Ctrl-C or SIGTERM stops the whole run, not just this experiment
            sys.exit(exit_.code)
        code = exit_.code or 0
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        sys.argv = saved_argv
    if code and process_count() > 1:
        fail_together(name, code)
    return code


def fail_together(name: str, code: int) -> None:
    """Ends this process at once, so that `accelerate launch` (torch's elastic agent, which watches every
    process) stops the others within a second and exits non-zero. Going on to the next experiment instead
    would leave the other processes waiting in this one's collectives, or pair them with the next
    experiment's (a hang until the collective timeout, or the wrong tensors averaged). os._exit, not
    sys.exit: nothing at interpreter exit (leaving the process group) may wait on the other processes."""
    print(f"error: {name} failed on process {process_index()} of {process_count()}: stopping every process of "
          f"this launch (exit code {code})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run_for_metrics(name: str, argv: list[str], out_dir: Path, label: str) -> dict | None:
    """Runs one experiment into out_dir/<name>/ and returns the metrics.json this run wrote, or None if it failed.
    Under `accelerate launch` only the main process writes metrics: the others get None and report nothing."""
    if is_main_process():
        print(f"\n=== {label} ===", flush=True)
    started = time.time()
    code = run_experiment(name, [*argv, "--output-dir", str(out_dir)])
    if not is_main_process() or code != 0:
        return None
    return read_metrics(out_dir / name / "metrics.json", started)


def read_metrics(path: Path, started: float) -> dict | None:
    """The metrics.json a run started at `started` wrote; None if it wrote none (an older run's are not its)."""
    path = Path(path)
    if not path.exists() or path.stat().st_mtime < started:
        return None
    return json.loads(path.read_text())


class _Tee:
    """A stream that writes through and keeps what was written."""

    def __init__(self, stream):
        self.stream, self.kept = stream, []

    def write(self, text: str) -> int:
        self.kept.append(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def error_line():
    """Yields a list that, afterwards, holds why a run failed: the last 'error: ...' line it wrote to stderr (a
    user's mistake), else a traceback's last line, else nothing. stderr still shows everything."""
    tee, saved = _Tee(sys.stderr), sys.stderr
    found = []
    sys.stderr = tee
    try:
        yield found
    finally:
        sys.stderr = saved
        lines = [line.strip() for line in re.split(r"[\r\n]", "".join(tee.kept)) if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")] or \
                 [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
        found.extend(errors[-1:])


def aggregate(name: str, runs: list[dict]) -> dict:
    """One summary row from the metrics of one experiment's runs (one per seed): mean and std of each metric."""
    row = {"experiment": name, "runs": len(runs), "trainable_params": runs[0]["trainable_params"],
           "total_params": runs[0]["total_params"], "trainable_share": runs[0]["trainable_share"],
           "not_converged": sum(not r.get("converged", True) for r in runs),
           # A solver's single fit (E2's L-BFGS, E9's search) has no epochs: the summary shows none.
           "fitted_once": all(r.get("solver") in FITTED_ONCE for r in runs),
           "convergence_reasons": " | ".join(sorted({r["convergence_reason"] for r in runs
                                                     if not r.get("converged", True)}))}
    for metric in METRICS:
        values = np.array([r[metric] for r in runs], dtype=float)   # None (no AUROC): nan
        row[f"{metric}_mean"] = float(values.mean())
        row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else ""
    row["test_accuracy_ci95_low"], row["test_accuracy_ci95_high"] = (runs[0]["test_accuracy_ci95"]
                                                                     if len(runs) == 1 else ("", ""))
    tuned = [r["tune"] for r in runs if "tune" in r]
    row["tune_choice"] = " | ".join(dict.fromkeys(", ".join(f"{k} {v:g}" for k, v in t["choice"].items())
                                                  for t in tuned))
    row["tune_grid_points"] = tuned[0].get("points", len(tuned[0]["grid"])) if tuned else ""
    row["tune_seconds"] = float(np.mean([t["seconds"] for t in tuned])) if tuned else ""
    for sigma in runs[0]["robustness"]:
        row[f"test_accuracy_noise_{sigma}"] = float(np.mean([r["robustness"][sigma] for r in runs]))
    return row


def spread(row: dict, metric: str, digits: int = 3) -> str:
    """mean ± std over seeds; for a single run's test accuracy, the value and its bootstrap interval."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if std != "":
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    if metric == "test_accuracy":
        low, high = row["test_accuracy_ci95_low"], row["test_accuracy_ci95_high"]
        return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{mean:.0f}" if metric in COUNTS and float(mean).is_integer() else f"{mean:.{digits}f}"
