"""run_all_experiments.py's K-shot sweep and paired comparisons in the summary (docs/k-shot.md): the table of mean ±
std per method and K with the cost of each K, the data-efficiency curve, one line per pair of methods with its
paired interval and tests (clip_adapt/paired.py) and their matrix, and the warning for a split file that leaks."""

import csv
from pathlib import Path

import numpy as np

from clip_adapt.paired import compare_all, pair_line, pair_matrix
from clip_adapt.reporting import plt, save_figure
from clip_adapt.runner import aggregate, spread


def shots_folder(out_dir: Path, shots: int, seed: int) -> Path:
    """Where the K-shot run of one seed writes: <output-dir>/shots_<K>/seed_<s>/<experiment>/."""
    return Path(out_dir) / f"shots_{shots}" / f"seed_{seed}"


def shots_rows(by_shots: dict) -> list[dict]:
    """One summary row per (K, experiment), as aggregate() makes them, with its K first; K in increasing order."""
    return [{"shots": k, **aggregate(name, [m for m, _ in runs])} for (k, name), runs in sorted(by_shots.items())]


def shots_section(k_rows: list[dict], full_rows: list[dict], seeds: list[int], schedule: str = "converge") -> str:
    """summary.md's K table: test accuracy mean ± std over seeds per method and K, the full-data result beside
    it, and the cost of each K. schedule: the K-shot runs' --schedule, said in the text."""
    if not k_rows:
        return ""
    shots = sorted({r["shots"] for r in k_rows})
    names = list(dict.fromkeys(r["experiment"] for r in k_rows))
    cell = {(r["shots"], r["experiment"]): r for r in k_rows}
    full = {r["experiment"]: r for r in full_rows}
    spread_of = "mean ± std over seeds" if len(seeds) > 1 else "one seed: [95% bootstrap interval]"
    lines = ["\n## Data efficiency: test accuracy against labelled images per class (K shots)\n",
             f"Test accuracy, {spread_of} {seeds}. Seed s draws its own K-shot split (--split-seed s: K training "
             f"and min(K, 4) validation images per class) and seeds the training, as CoOp's seed s draws its split "
             f"s: the spread covers both. The test split is whole and the same for every K. "
             + ("Schedule: CoOp's fixed one (--schedule coop: 50 epochs at K = 1, 100 at 2 and 4, 200 at 8 and 16, "
                "a cosine rate, the last epoch reported; E2's L-BFGS fit has no epochs); the full-data runs converge "
                "as every other run. " if schedule == "coop" else
                "Schedule: every run follows the project's convergence and selection rules "
                "(docs/how-a-run-works.md); selection sees only min(K, 4) validation images per class. ")
             + "'all': the full training data.\n",
             "| experiment | " + " | ".join(f"K = {k}" for k in shots) + " | all |",
             "|---|" + "---|" * (len(shots) + 1)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(spread(cell[(k, name)], "test_accuracy") if (k, name) in cell
                                                 else "–" for k in shots)
                     + f" | {spread(full[name], 'test_accuracy') if name in full else '–'} |")
    untrained = [r for r in full_rows if r["experiment"] not in names]
    if untrained:
        lines.append("\nNo labelled images (shown as a horizontal line in the figure): " + "; ".join(
            f"{r['experiment']} {spread(r, 'test_accuracy')}" for r in untrained) + ".")
    lines += ["\n## Cost of each K\n", "| K | runs | wall time per run (s), mean | wall time in all (s) |",
              "|---|---|---|---|"]
    for k in shots:
        at_k = [cell[(k, name)] for name in names if (k, name) in cell]
        runs = sum(r["runs"] for r in at_k)
        total = sum(r["wall_time_s_mean"] * r["runs"] for r in at_k)
        lines.append(f"| {k} | {runs} | {total / runs:.1f} | {total:.1f} |")
    if full_rows:
        runs = sum(r["runs"] for r in full_rows if r["experiment"] in names)
        total = sum(r["wall_time_s_mean"] * r["runs"] for r in full_rows if r["experiment"] in names)
        if runs:
            lines.append(f"| all | {runs} | {total / runs:.1f} | {total:.1f} |")
    not_converged = [r for r in k_rows if r["not_converged"]]
    if not_converged:
        lines.append("\n**Not converged** at some K: " + "; ".join(
            f"{r['experiment']} at K = {r['shots']} ({r['not_converged']} of {r['runs']})" for r in not_converged))
    return "\n".join(lines) + "\n"


def plot_shots(k_rows: list[dict], full_rows: list[dict], path: Path, chance: float | None = None) -> None:
    """Accuracy against K on a log2 axis, one line per method with a band of ± std over seeds, what trains
    nothing (E1) as a horizontal line, and the full-data result at the right ('all')."""
    shots = sorted({r["shots"] for r in k_rows})
    at_all = shots[-1] * 4   # two octaves right of the largest K, labelled 'all'
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(r["experiment"] for r in k_rows))
    full = {r["experiment"]: r for r in full_rows}
    for i, name in enumerate(names):
        points = sorted((r["shots"], r["test_accuracy_mean"], r["test_accuracy_std"] or 0.0)
                        for r in k_rows if r["experiment"] == name)
        ks, means, stds = (np.array(v, dtype=float) for v in zip(*points))
        line, = ax.plot(ks, means, marker="osD^vP*Xhp"[i % 10], label=name)
        ax.fill_between(ks, means - stds, means + stds, color=line.get_color(), alpha=0.15)
        if name in full:
            r = full[name]
            ax.errorbar([at_all], [r["test_accuracy_mean"]], yerr=[[r["test_accuracy_std"] or 0.0]] * 2,
                        marker="osD^vP*Xhp"[i % 10], color=line.get_color(), capsize=4)
            ax.plot([ks[-1], at_all], [means[-1], r["test_accuracy_mean"]], color=line.get_color(), linestyle=":",
                    linewidth=1)
    for r in full_rows:
        if r["experiment"] not in names:
            ax.axhline(r["test_accuracy_mean"], color="black", linestyle="--", linewidth=1,
                       label=f"{r['experiment']} (no labels)")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.set_xscale("log", base=2)
    ticks = [*shots, at_all]
    ax.set_xticks(ticks, [str(k) for k in shots] + ["all"])
    ax.minorticks_off()
    ax.set(xlabel="labelled training images per class (K, log2 scale)", ylabel="test accuracy (± std over seeds)",
           ylim=(0, 1.02), title="Data efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def correct_on_test(folder: Path) -> tuple[list[str], np.ndarray]:
    """A run's test files and whether each was classified right, from its predictions.csv."""
    with open(Path(folder) / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["file"] for r in rows], np.array([r["label"] == r["prediction"] for r in rows])


def paired_table(folders: dict[str, list[Path]], seed: int) -> tuple[list[dict], list[str], str]:
    """compare_all over the methods whose runs (one folder per seed, in seed order) saw the same test images with
    as many seeds as the first; (pairs, methods, why any were left out)."""
    loaded = {name: [correct_on_test(f) for f in paths] for name, paths in folders.items()
              if all((Path(f) / "predictions.csv").exists() for f in paths)}
    if not loaded:
        return [], [], ""
    first = next(iter(loaded.values()))
    same = {name: np.stack([c for _, c in runs]) for name, runs in loaded.items()
            if len(runs) == len(first) and all(files == first[0][0] for files, _ in runs)}
    left_out = [name for name in loaded if name not in same]
    return compare_all(same, seed), list(same), (f" Left out (other test images or seeds): {', '.join(left_out)}."
                                                  if left_out else "")


def paired_section(full: dict[str, list[Path]], by_shots: dict, scripts: dict, seed: int = 0) -> str:
    """summary.md's paired comparisons: one table per K (and one for the full data), a line per pair and the
    matrix. What trains nothing (E1) joins every K's table with its full-data runs (its test predictions do not
    depend on the training images)."""
    tables = [("full training data", full)]
    untrained = {name: paths for name, paths in full.items() if not scripts[name].trains}
    for k in sorted({k for k, _ in by_shots}):
        tables.append((f"K = {k} shots", {**untrained, **{name: [folder for _, folder in runs]
                                                          for (kk, name), runs in sorted(by_shots.items())
                                                          if kk == k}}))
    lines = []
    for title, folders in tables:
        pairs, names, left_out = paired_table(folders, seed)
        if not pairs:
            continue
        seeds = pairs[0]["seeds"]
        lines += [f"\n## Paired comparisons, {title}\n",
                  f"Accuracy difference in points on the same {pairs[0]['images']} test images, with a paired "
                  f"bootstrap 95% interval (test images{' and seeds' if seeds > 1 else ''} resampled); McNemar's "
                  f"exact p on the images one method gets right and the other wrong"
                  + (f" (pooled over {seeds} seeds)" if seeds > 1 else "")
                  + f"; Holm's correction across the {len(pairs)} pairs of this table (significant: Holm p < "
                    f"0.05).{left_out}\n"]
        lines += [f"- {pair_line(pair)}" for pair in pairs]
        lines += ["", *pair_matrix(pairs, names),
                  "\nMatrix: row − column in points (Holm's p; * significant)."]
    return "\n".join(lines) + ("\n" if lines else "")


def copy_warnings(metrics: list[dict]) -> str:
    """A warning for runs on a --split-file whose test images have copies (exact or near) in its train split:
    a peer's table on a leaky split is inflated alike."""
    leaky = {}
    for m in metrics:
        if m.get("split_file") and m.get("train_test_duplicates"):
            leaky.setdefault(m["split_file"], m["train_test_duplicates"])
    return "".join(f"\n**Warning: copies across the split file's splits.** {count} test images of `{file}` have a "
                   f"copy (exact or near) in its train split: its test accuracies are inflated, and so is any "
                   f"peer's table on this split (data_report.json lists the pairs).\n"
                   for file, count in leaky.items())
