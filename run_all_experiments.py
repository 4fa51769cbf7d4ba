"""Runs every experiment script (E<number>_<name>.py, in number order) with the same flags, keeps going when one
fails, and writes the comparison: <output-dir>/summary.md, summary.csv, summary.png (test accuracy against
trainable parameters) and summary_robustness.png (test accuracy against pixel noise), with every figure linked
from summary.md, and report.html (the whole run on one self-contained page, see clip_adapt/report_page.py).
With --seeds, every experiment runs once per seed (into <output-dir>/seed_<s>/) and the summary reports
mean ± std; a single run gets a 95% bootstrap interval on test accuracy instead. Exits non-zero, naming them,
if any experiment failed.
"""

import argparse
import sys
from pathlib import Path

import common
from clip_adapt.base import UserError, is_main_process, write_csv, write_text
from clip_adapt.report_page import RUN_FIGURES, SUMMARY_FIGURES, write_html_report
from clip_adapt.reporting import plt, save_figure
from clip_adapt.runner import aggregate, experiment_scripts, run_for_metrics, spread

SCRIPTS = {script.name: script for script in experiment_scripts()}


def add_own_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of this script alone; every other flag goes on to the experiments."""
    group = p.add_argument_group("this run")
    group.add_argument("--seeds", type=int, nargs="+", help="run every experiment once per training seed (--seed: "
                                                            "initialisation and batch order; the validation split "
                                                            "stays --split-seed's); summary: mean ± std")
    group.add_argument("--experiments", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS),
                       help="a subset to run, in number order")
    return p


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


def study_accuracy(name: str) -> str:
    reported = SCRIPTS[name].study_accuracy
    return "–" if reported is None else f"{reported:.2f}"


def converged(row: dict) -> str:
    if not row["not_converged"]:
        return "yes"
    return "**no**" if row["runs"] == 1 else f"**no** in {row['not_converged']} of {row['runs']}"


def markdown(rows: list[dict], failed: list[str], seeds: list[int], command: str, split_seed: int = 0) -> str:
    noise = [k for k in rows[0] if k.startswith("test_accuracy_noise_")] if rows else []
    interval = (f"mean ± std over training seeds {seeds} (initialisation and batch order; one validation split, "
                f"--split-seed {split_seed})" if len(seeds) > 1 else "[95% bootstrap interval over test images]")
    lines = ["# Summary\n", f"`{command}`\n",
             f"Test accuracy: {interval}. Best epoch: the epoch of lowest validation loss, whose weights are "
             f"reported (convergence speed). 'Study' is the accuracy the reproduced study reported, not measured "
             f"here.\n",
             "| experiment | test accuracy | study | macro-F1 | balanced acc. | ECE | train acc. | best epoch | "
             "epochs run | converged | trainable params | share of total | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {spread(r, 'test_accuracy')} | {study_accuracy(r['experiment'])} | "
                     f"{spread(r, 'test_macro_f1')} | {spread(r, 'test_balanced_accuracy')} | "
                     f"{spread(r, 'test_ece')} | "
                     f"{spread(r, 'train_accuracy')} | {spread(r, 'best_epoch', 1)} | {spread(r, 'epochs_run', 1)} | "
                     f"{converged(r)} | {r['trainable_params']:,} | {100 * r['trainable_share']:.4g}% | {spread(r, 'wall_time_s', 1)} |")
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
        lines.append(f"\n**Failed:** {', '.join(failed)} (see the console output).")
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
    lines += [image(out_dir / name, caption) for name, caption in SUMMARY_FIGURES if (out_dir / name).exists()]
    in_summary = ("loss_curves.png", "accuracy_curves.png", "confusion_matrix.png")
    for run in runs:
        shown = [image(run / name, f"{run.name} {caption}") for name, caption in RUN_FIGURES
                 if name in in_summary and (run / name).exists()]
        if shown:
            lines += [f"\n### {run.relative_to(out_dir).as_posix()}\n", " ".join(shown)]
    lines.append("\nEvery figure, the reliability diagrams and the classification reports: `report.html`.")
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        std = r["test_accuracy_std"] or 0.0
        ax.errorbar(r["trainable_params"], r["test_accuracy_mean"], yerr=std, fmt="o", capsize=3)
        ax.annotate(r["experiment"].split("_")[0], (r["trainable_params"], r["test_accuracy_mean"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("symlog", linthresh=1)   # E1 trains nothing: 0 must still show on a log axis
    ax.set(xlabel="trainable parameters (log scale; 0 = zero-shot)", ylabel="test accuracy", ylim=(0, 1.02),
           title="Test accuracy against trainable parameters")
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir / "summary.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        keys = [k for k in r if k.startswith("test_accuracy_noise_")]
        ax.plot([float(k.rsplit("_", 1)[1]) for k in keys], [r[k] for k in keys], marker="o", label=r["experiment"])
    ax.set(xlabel="Gaussian noise sigma (pixels in [0, 1])", ylabel="test accuracy", ylim=(0, 1.02),
           title="Robustness to pixel noise")
    ax.legend(fontsize="small")
    save_figure(fig, out_dir / "summary_robustness.png")


def main():
    args = add_own_flags(common.parser(__doc__, lr=None)).parse_args()   # validates every flag; --help
    own = add_own_flags(argparse.ArgumentParser(add_help=False, allow_abbrev=False))   # --seed is not --seeds
    _, forwarded = own.parse_known_args()
    seeds = args.seeds or [args.seed]
    check_one_learning_rate(args.lr, args.experiments)
    out_dir = Path(args.output_dir)
    common.check_writable(out_dir)

    runs, failed, finished = {name: [] for name in args.experiments}, [], []
    for seed in seeds:
        seed_dir = out_dir if len(seeds) == 1 else out_dir / f"seed_{seed}"
        for name in args.experiments:
            metrics = run_for_metrics(name, [*forwarded, "--seed", str(seed)], seed_dir, f"{name} (seed {seed})")
            if metrics is not None:
                runs[name].append(metrics)
                finished.append(seed_dir / name)
            else:
                failed.append(f"{name} (seed {seed})" if len(seeds) > 1 else name)

    if not is_main_process():
        return
    rows = [aggregate(name, r) for name, r in runs.items() if r]
    if rows:
        write_csv(out_dir / "summary.csv", rows)
        plot_summary(rows, out_dir)
    command = " ".join(["python", *sys.argv])
    write_text(out_dir / "summary.md", markdown(rows, failed, seeds, command, args.split_seed) + figure_links(out_dir, finished))
    print(f"\nsummary written to {out_dir / 'summary.md'}")
    print(f"report written to {write_html_report(out_dir, finished, command)}")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
