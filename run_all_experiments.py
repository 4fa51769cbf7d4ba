"""Runs every experiment script (E<number>_<name>.py, in number order) with the same flags, keeps going when one
fails, and writes the comparison: <output-dir>/summary.md, summary.csv, summary.png (test accuracy against
trainable parameters) and summary_robustness.png (test accuracy against pixel noise), with every figure linked
from summary.md, and report.html (the whole run on one self-contained page, see clip_adapt/report_page.py).
With --seeds, every experiment runs once per seed (into <output-dir>/seed_<s>/) and the summary reports
mean ± std; a single run gets a 95% bootstrap interval on test accuracy instead. Exits non-zero, naming them,
if any experiment failed. Under `accelerate launch` with several processes, a failure on any process ends the
whole launch at once, naming the experiment and the process (docs/several-gpus.md). --launcher runs the
experiments N at a time or as SLURM jobs (docs/past-one-machine.md).

Every setting, the model and the data are checked once before the first experiment starts. A new run into a
used --output-dir first removes the folders of the experiments it runs and the previous summary files (not with
--resume), and run.json lists the experiments of this run: the summary and report.html never mix two runs.
"""

import argparse
import shutil
import sys
from pathlib import Path

import common
from clip_adapt import base_to_new
from clip_adapt.base import UserError, is_main_process, write_csv, write_json, write_text
from clip_adapt.launch import Run, add_launcher_flags, check_launcher_flags, launch
from clip_adapt.data import is_study_data
from clip_adapt.models import is_random, is_study_model, weights_of
from clip_adapt.report_page import CONTACT_SHEET, RUN_FIGURES, SUMMARY_FIGURES, write_html_report
from clip_adapt.reporting import mark_random_weights, plot_robustness, plt, save_figure
from clip_adapt.runner import aggregate, classification_scripts, clip_only_note, experiment_scripts, spread
from clip_adapt.sweep import (copy_warnings, paired_section, plot_shots, shots_folder, shots_rows, shots_section)

SCRIPTS = {script.name: script for script in classification_scripts()}
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png", "summary_robustness.png", "summary_shots.png",
                 "report.html", "run.json", common.CONTACT_SHEET)


def experiment_name(name: str) -> str:
    """A script's name, or its number alone (E4). A script of another task (E8's captioning) is named with how to
    run it; an unknown name is one line with the known ones (not argparse's usage, then the error)."""
    short = {script.short_name: script.name for script in SCRIPTS.values()}
    if name in SCRIPTS or name in short:
        return short.get(name, name)
    other = {key: script for script in experiment_scripts() if script.task != "classification"
             for key in (script.name, script.short_name)}
    if name in other:
        raise UserError(f"{other[name].name} is {other[name].task}, not classification, and runs on its own data: "
                        f"python {other[name].path.name} (--smoke to try it; docs/captioning.md)")
    raise UserError(f"unknown experiment '{name}': choose from {', '.join(SCRIPTS)} (or their numbers: "
                    f"{', '.join(short)})")


def other_tasks_line() -> str:
    """Said after a run of every classification experiment: which scripts it does not run, and how to run them."""
    others = [script for script in experiment_scripts() if script.task != "classification"]
    return "; ".join(f"{script.name} ({script.task}) runs on its own: python {script.path.name}"
                     for script in others)


def add_own_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of this script alone; every other flag goes on to the experiments."""
    group = p.add_argument_group("this run")
    group.add_argument("--seeds", type=int, nargs="+", help="run every experiment once per training seed (--seed: "
                                                            "initialisation and batch order; the validation split "
                                                            "stays --split-seed's); summary: mean ± std")
    common.add_shots_flag(group, nargs="+")
    group.add_argument("--experiments", nargs="+", default=list(SCRIPTS), metavar="NAME",
                       help=f"a subset to run, by name or number (E4): {', '.join(SCRIPTS)} [default: all of "
                            f"them]; {other_tasks_line() or 'every script is one of them'}")
    return add_launcher_flags(p)


def check_one_learning_rate(lr: float | None, experiments: list[str]) -> None:
    """--lr gives every experiment the same rate; refuse it where their defaults differ (E6 fine-tunes 86M
    weights at 1e-5, the prompts and heads train at 1e-3), rather than run E6 at a prompt's rate."""
    if lr is None:
        return
    defaults = {name: SCRIPTS[name].learning_rate for name in experiments if SCRIPTS[name].trains}
    if len(set(defaults.values())) > 1:
        listed = ", ".join(f"{name.split('_')[0]} {rate:g}" for name, rate in defaults.items())
        raise UserError(f"--lr would give every experiment the same rate, but their defaults differ ({listed}): "
                        f"pass --lr with --experiments that share a default, or run a script on its own")


def study_accuracy(name: str, not_the_recipe: dict) -> str:
    reported = SCRIPTS[name].study_accuracy
    return "–" if reported is None else f"{reported:.3f}" + (" †" if name in not_the_recipe else "")


def random_weights_banner(model: str) -> str:
    return (f"**Random weights** (`{model}`): these accuracies test the pipeline, not the methods; they say "
            f"nothing about CLIP.\n")


def converged(row: dict) -> str:
    if not row["not_converged"]:
        return "yes"
    return "**no**" if row["runs"] == 1 else f"**no** in {row['not_converged']} of {row['runs']}"


def markdown(rows: list[dict], failed: dict[str, str], seeds: list[int], command: str, run: dict,
             not_the_recipe: dict | None = None) -> str:
    """run: what run.json records (model, data, weights, study_data, study_model, split_seed). not_the_recipe:
    {experiment: {setting: (this run's, the study's)}} where a run's settings differ from the study's (marked †)."""
    not_the_recipe = not_the_recipe or {}
    noise = [k for k in rows[0] if k.startswith("test_accuracy_noise_")] if rows else []
    interval = (f"mean ± std over training seeds {seeds} (initialisation and batch order; one validation split, "
                f"--split-seed {run['split_seed']})" if len(seeds) > 1
                else "[95% bootstrap interval over test images]")
    study = run["study_data"] and run["study_model"] and run["weights"] != "random"
    lines = [f"# Summary: `{run['model']}` on `{run['data']}`\n", f"`{command}`\n"]
    if run["weights"] == "random":
        lines.append(random_weights_banner(run["model"]))
    lines += [f"Test accuracy: {interval}. Best epoch: the epoch of lowest validation loss, whose weights are "
              f"reported (convergence speed); none for a method fitted once by a solver (E2's L-BFGS: its C "
              f"sweep instead). AUROC: macro one-vs-rest from the softmax (per class and its "
              f"interval: `auroc` in each metrics.json). Share of total: of CLIP's parameters (both towers) "
              f"and what the method adds to it." + (" 'Study' is the accuracy the reproduced study reported, not "
                                                   "measured here." if study else "") + "\n",
              "| experiment | test accuracy | " + ("study | " if study else "") + "macro-F1 | AUROC | balanced acc. | ECE | "
              "train acc. | best epoch | epochs run | converged | trainable params | share of total | "
              "wall time (s) |",
              "|---|" + "---|" * (13 if study else 12)]
    for r in rows:
        lines.append(f"| {r['experiment']} | {spread(r, 'test_accuracy')} | " +
                     (f"{study_accuracy(r['experiment'], not_the_recipe)} | " if study else "") +
                     f"{spread(r, 'test_macro_f1')} | {spread(r, 'test_auroc')} | "
                     f"{spread(r, 'test_balanced_accuracy')} | "
                     f"{spread(r, 'test_ece')} | "
                     f"{spread(r, 'train_accuracy')} | " +
                     ("– | – | " if r.get("fitted_once") else
                      f"{spread(r, 'best_epoch', 1)} | {spread(r, 'epochs_run', 1)} | ") +
                     f"{converged(r)} | {r['trainable_params']:,} | {100 * r['trainable_share']:.3g}% | "
                     f"{spread(r, 'wall_time_s', 1)} |")
    marked = [(name, differs) for name, differs in not_the_recipe.items()
              if study and SCRIPTS[name].study_accuracy is not None]
    if marked:
        lines.append("\n† Not the study's recipe: " + "; ".join(
            f"{name} ran with " + ", ".join(f"--{key.replace('_', '-')} {ours} (the study: {theirs})"
                                            for key, (ours, theirs) in differs.items())
            for name, differs in marked) + ".")
    tuned = [r for r in rows if r["tune_choice"]]
    if tuned:
        lines += ["\n## Tuned on the validation split (--tune)\n",
                  "Each method's grid point of lowest validation loss, chosen before its full run; the tuning "
                  "time is part of the wall time above. Every grid point: `tune` in each metrics.json.\n",
                  "| experiment | choice | grid points | tuning (s) | wall time in all (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['experiment']} | {r['tune_choice']} | {r['tune_grid_points']} | {r['tune_seconds']:.1f} | "
                  f"{spread(r, 'wall_time_s', 1)} |" for r in tuned]
    unconverged = [r for r in rows if r["not_converged"]]
    if unconverged:
        lines.append("\n**Not converged** (compare these with care; more --epochs, or see the reason):")
        lines += [f"- {r['experiment']}: {r['convergence_reasons']}" for r in unconverged]
    if noise:
        lines += ["\n## Test accuracy under Gaussian pixel noise (sigma on [0, 1] pixels)\n",
                  "| experiment | " + " | ".join(f"sigma {k.rsplit('_', 1)[1]}" for k in noise) + " |",
                  "|---|" + "---|" * len(noise)]
        lines += [f"| {r['experiment']} | " + " | ".join(f"{r[k]:.3f}" for k in noise) + " |" for r in rows]
    if failed:
        lines.append(f"\n**Failed:** {', '.join(failed)}.\n")
        lines += [f"- {name}: `{reason or 'no error line; see the console output'}`" for name, reason in failed.items()]
    return "\n".join(lines) + "\n"


def figure_links(out_dir: Path, runs: list[Path]) -> str:
    """summary.md's figures, linked relative to it so that it reads as a report in any Markdown viewer:
    the summary plots and each finished experiment's curves and confusion matrix, where the file exists.
    No finished run: no figures, not even a summary plot an earlier run left in the folder."""
    if not runs:
        return ""
    def image(path: Path, caption: str) -> str:
        return f"![{caption}]({path.relative_to(out_dir).as_posix()})"
    lines = ["\n## Figures\n"]
    lines += [image(out_dir / name, caption) for name, caption in [*SUMMARY_FIGURES, CONTACT_SHEET]
              if (out_dir / name).exists()]
    in_summary = ("loss_curves.png", "accuracy_curves.png", "confusion_matrix.png")
    for run in runs:
        shown = [image(run / name, f"{run.name} {caption}") for name, caption in RUN_FIGURES
                 if name in in_summary and (run / name).exists()]
        if shown:
            lines += [f"\n### {run.relative_to(out_dir).as_posix()}\n", " ".join(shown)]
    lines.append("\nEvery figure, the reliability diagrams and the classification reports: `report.html`.")
    return "\n".join(lines) + "\n"


def accuracy_interval(row: dict) -> tuple[float, float]:
    """How far below and above the mean test accuracy its interval reaches: ± std over seeds, or the bootstrap
    interval of a single run."""
    mean, std = row["test_accuracy_mean"], row["test_accuracy_std"]
    if std != "":
        return std, std
    return mean - row["test_accuracy_ci95_low"], row["test_accuracy_ci95_high"] - mean


def plot_summary(rows: list[dict], out_dir: Path, chance: float) -> None:
    """summary.png: each experiment a marker of its own, named in the legend rather than beside the point (labels
    of points close together overprint), with its interval and the chance level; summary_robustness.png."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*Xhp<>"
    for i, r in enumerate(rows):
        low, high = accuracy_interval(r)
        ax.errorbar(r["trainable_params"], r["test_accuracy_mean"], yerr=[[low], [high]], fmt=markers[i % 12],
                    capsize=4, markersize=7, alpha=0.85, label=r["experiment"])
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.set_xscale("symlog", linthresh=1)   # E1 trains nothing: 0 must still show on a log axis
    ax.set_xlim(-0.5, 3 * max(max(r["trainable_params"] for r in rows), 1))   # room for the markers at both ends
    interval = "± std over seeds" if rows[0]["test_accuracy_std"] != "" else "95% bootstrap interval"
    ax.set(xlabel="trainable parameters (log scale; 0 = zero-shot)", ylabel=f"test accuracy ({interval})",
           ylim=(0, 1.02), title="Test accuracy against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, out_dir / "summary.png")

    plot_robustness({r["experiment"]: [(float(k.rsplit("_", 1)[1]), r[k]) for k in r
                                       if k.startswith("test_accuracy_noise_")] for r in rows},
                    "Robustness to pixel noise", out_dir / "summary_robustness.png", chance)


def clear_previous_run(out_dir: Path, experiments: list[str], seeds: list[int], shots: list[int] = ()) -> None:
    """A new run into a used folder: the folders of the experiments it runs and the previous summary files go
    first, so that nothing there is left from an earlier run. Other experiments' folders stay, outside this run's
    summary and report (run.json lists this run's)."""
    seed_dirs = [out_dir] if len(seeds) == 1 else [out_dir / f"seed_{seed}" for seed in seeds]
    seed_dirs += [shots_folder(out_dir, k, seed) for k in shots for seed in seeds]
    for folder in (seed_dir / name for seed_dir in seed_dirs for name in experiments):
        shutil.rmtree(folder, ignore_errors=True)
    for name in SUMMARY_FILES:
        (out_dir / name).unlink(missing_ok=True)


def main():
    args = add_own_flags(common.parser(__doc__, lr=None, sweep=True)).parse_args()   # validates every flag; --help
    own = add_own_flags(argparse.ArgumentParser(add_help=False, allow_abbrev=False))   # --seed is not --seeds
    _, forwarded = own.parse_known_args()
    seeds = args.seeds or [args.seed]
    shots = list(dict.fromkeys(args.shots or []))
    experiments = list(dict.fromkeys(experiment_name(name) for name in args.experiments))
    if args.base_to_new:
        experiments = base_to_new.choose_experiments(experiments, chosen=experiments != list(SCRIPTS))
    check_one_learning_rate(args.lr, experiments)
    common.resolve_defaults(args)   # every setting checked once, not once per experiment
    mark_random_weights(is_random(args.model))   # the summary's figures say so, as the experiments' do
    check_launcher_flags(args)
    out_dir = Path(args.output_dir)
    common.check_writable(out_dir)
    common.check_sources(args)   # the data and the model, once, before any experiment starts
    if is_main_process() and not args.resume:
        clear_previous_run(out_dir, experiments, seeds, shots)

    # CoOp's schedule is defined per K: the full-data runs of a sweep with it converge as every other run.
    full_data = ["--schedule", "converge"] if args.schedule == "coop" else []
    note = clip_only_note([SCRIPTS[name] for name in experiments], forwarded)
    if note and is_main_process():
        print(note)
    planned = [Run(name, [*SCRIPTS[name].forwarded(forwarded), "--seed", str(seed), *full_data], out_dir if len(seeds) == 1 else out_dir / f"seed_{seed}",
                   f"{name} (seed {seed})") for seed in seeds for name in experiments]
    # The sweep over K: seed s draws its own shots (--split-seed s) and seeds the training; what trains nothing
    # (E1) sees no shots and runs on the full data only.
    planned += [Run(name, [*SCRIPTS[name].forwarded(forwarded), "--seed", str(seed), "--shots", str(k),
                           "--split-seed", str(seed)],
                    shots_folder(out_dir, k, seed), f"{name} ({k} shots, seed {seed})")
                for k in shots for seed in seeds for name in experiments if SCRIPTS[name].trains]
    runs, failed, finished = {name: [] for name in experiments}, {}, []
    by_shots = {}   # (K, experiment) -> [(metrics, folder)], one per seed
    for run, (metrics, reason) in zip(planned, launch(planned, args)):
        k = run.argv[run.argv.index("--shots") + 1] if "--shots" in run.argv else None
        if metrics is not None:
            if k is None:
                runs[run.script].append(metrics)
            else:
                by_shots.setdefault((int(k), run.script), []).append((metrics, run.out_dir / run.script))
            finished.append(run.out_dir / run.script)
        else:
            failed[run.label if len(seeds) > 1 or k is not None else run.script] = reason

    if not is_main_process():
        return
    rows = [aggregate(name, r) for name, r in runs.items() if r]
    done = [r[0] for r in runs.values() if r]
    command = " ".join(["python", *sys.argv])
    run = {"command": command, "model": args.model, "data": args.data,
           "weights": weights_of(args.model),
           "study_data": is_study_data(args.data), "study_model": is_study_model(args.model),
           "split_seed": args.split_seed,
           "experiments": [folder.relative_to(out_dir).as_posix() for folder in finished], "failed": failed}
    full = {name: [out_dir / name if len(seeds) == 1 else out_dir / f"seed_{m['seed']}" / name for m in r]
            for name, r in runs.items() if r}
    k_rows = shots_rows(by_shots)
    if rows:
        write_csv(out_dir / "summary.csv", [{"shots": "all", **r} for r in rows] + k_rows if shots else rows)
        plot_summary(rows, out_dir, chance=1 / len(done[0]["class_names"]))
    if k_rows:
        plot_shots(k_rows, rows, out_dir / "summary_shots.png", chance=1 / len(done[0]["class_names"])
                   if done else None)
    extra = (copy_warnings([m for r in runs.values() for m in r] + [m for v in by_shots.values() for m, _ in v])
             + (shots_section(k_rows, rows, seeds, args.schedule) if shots else "")
             + paired_section(full, by_shots, SCRIPTS, seed=args.seed) + base_to_new.summary_section(runs))
    not_the_recipe = {name: differs for name, r in runs.items() if r
                      and (differs := SCRIPTS[name].differs_from_study(r[0]["settings"]))}
    write_text(out_dir / "summary.md", markdown(rows, failed, seeds, command, run, not_the_recipe) + extra
               + figure_links(out_dir, finished))
    write_json(out_dir / "run.json", run)
    print(f"\nsummary written to {out_dir / 'summary.md'}")
    print(f"report written to {write_html_report(out_dir, finished, command)}")
    if set(experiments) == set(SCRIPTS) and other_tasks_line():
        print(f"not in this run: {other_tasks_line()}")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
