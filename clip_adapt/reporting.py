"""Metrics, plots and the files in outputs/: everything written atomically, so a kill never leaves half a report."""

import functools
import subprocess
from importlib import metadata
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")   # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clip_adapt.base import atomic_save, write_csv, write_json, write_text  # noqa: E402

NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2)
ECE_BINS = 15
FITTED_ONCE = ("lbfgs", "search")   # metrics.json's "solver" of a method fitted in one pass, not by epochs
RANDOM_WEIGHTS_MARK = "random weights: tests the pipeline, says nothing about CLIP"


# --------------------------------------------------------------------------- numbers

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "scikit-learn", "datasets")
REPO = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries whose numbers a run depends on (None: not installed); torch's with
    its build (e.g. 2.14.1+cu130), as torch.__version__ gives it."""
    def version(name):
        if name == "torch":
            return torch.__version__
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {name: version(name) for name in LIBRARIES}


def code_version(root: Path = REPO) -> dict:
    """The git commit the code ran from and whether the checkout had changes not committed (dirty), so that a
    result can be traced to its code; both None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Gap between confidence and accuracy, averaged over equal-width confidence bins weighted by size."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def bootstrap_interval(correct: np.ndarray, seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of accuracy over test images."""
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), (resamples, len(correct)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


AUROC_WORK = 5e7   # resampled scores the AUROC interval ranks at most (resamples x images x classes)


def auroc(probs: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int,
          resamples: int = 2000) -> dict:
    """One-vs-rest AUROC of each class from the softmax probabilities (scikit-learn), their mean (macro: as
    roc_auc_score(multi_class="ovr", average="macro")), and a 95% percentile bootstrap interval of the macro over
    test images. A class without test images (or the only one present) has no AUROC: None, left out of the macro;
    a resample without a positive or a negative of a class is drawn again. The resamples' AUROCs come from the
    rank (Mann-Whitney) form, tested equal to scikit-learn's; fewer resamples (at least 200) where images x
    classes is large, so that the interval stays a few seconds' work."""
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    per_class = {name: float(roc_auc_score(labels == c, probs[:, c])) if 0 < (labels == c).sum() < len(labels)
                 else None for c, name in enumerate(class_names)}
    present = [c for c, name in enumerate(class_names) if per_class[name] is not None]
    if not present:
        return {"macro": None, "per_class": per_class, "macro_ci95": None, "resamples": 0}
    resamples = int(np.clip(AUROC_WORK / (len(labels) * len(present)), 200, resamples))
    rng, macros = np.random.default_rng(seed), []
    for _ in range(10 * resamples // 200 + 10):   # bounded: a class of one test image is missing from 37% of draws
        if len(macros) >= resamples:
            break
        rows = rng.integers(0, len(labels), (min(200, resamples - len(macros)), len(labels)))
        aucs = []
        for c in present:
            positive = labels[rows] == c
            ranks = rankdata(probs[rows, c], axis=1)
            n_pos = positive.sum(1)
            n_neg = len(labels) - n_pos
            with np.errstate(divide="ignore", invalid="ignore"):   # a resample without positives: dropped below
                aucs.append(((ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        aucs = np.array(aucs)
        macros += aucs[:, np.isfinite(aucs).all(0)].mean(0).tolist()
    macro = float(np.mean([per_class[class_names[c]] for c in present]))
    macros = macros[:resamples]
    return {"macro": macro, "per_class": per_class,
            "macro_ci95": [float(np.percentile(macros, 2.5)), float(np.percentile(macros, 97.5))] if macros else None,
            "resamples": len(macros)}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    from sklearn.metrics import balanced_accuracy_score, f1_score   # scikit-learn and seaborn are imported where
    probs = logits.softmax(1).numpy()
    labels = labels.cpu().numpy()
    predictions = probs.argmax(1)
    return {"accuracy": float((predictions == labels).mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels))),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
            "ece": expected_calibration_error(probs, labels)}


def noise_seed(seed: int, image_index: int) -> int:
    """The seed of one image's noise: a function of the run's seed and the image's place in the test set."""
    return seed * 1_000_003 + image_index


@functools.lru_cache(maxsize=None)
def normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """CLIP's normalisation constants as (1, C, 1, 1) tensors, made once per device, not copied there per batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def add_pixel_noise(pixels: torch.Tensor, sigma: float, mean, std, seeds) -> torch.Tensor:
    """Gaussian noise of std sigma on [0, 1] pixels: undo CLIP's normalisation, add, clip, redo. Image k's noise
    is drawn on the pixels' device from a generator seeded with seeds[k]: it depends on the image alone, not on
    the batch or the process it lands in. (CPU and CUDA generators draw different numbers for one seed, so the
    noise, and the robustness figures, differ slightly between a CPU and a GPU run.)"""
    mean, std = normalisation(tuple(mean), tuple(std), pixels.device)
    raw = pixels * std + mean
    noise, generator = torch.empty_like(raw), torch.Generator(pixels.device)
    for image_noise, seed in zip(noise, seeds):
        image_noise.normal_(generator=generator.manual_seed(int(seed)))
    return ((raw + sigma * noise).clamp(0, 1) - mean) / std


class WithPixelNoise(torch.nn.Module):
    """The model, seeing its CLIP-normalised pixels with noise added batch by batch: no noisy fp32 copy of the
    whole test split is ever made (10,000 CIFAR-sized images at 224 px would be 6 GB of it). Called with each
    image's index in the test set (predict_everywhere(..., by_index=True)), which seeds that image's noise: the
    same noise however the set is batched or shared among processes, and at every sigma."""

    def __init__(self, model: torch.nn.Module, sigma: float, mean, std, seed: int):
        super().__init__()
        self.model, self.sigma, self.mean, self.std, self.seed = model, sigma, tuple(mean), tuple(std), seed

    def forward(self, pixels: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
        seeds = [noise_seed(self.seed, i) for i in image_indices.tolist()]
        return self.model(add_pixel_noise(pixels, self.sigma, self.mean, self.std, seeds))


# --------------------------------------------------------------------------- files

_random_weights = False   # this process's run has random weights: every figure it saves says so


def mark_random_weights(random: bool) -> None:
    """Set once a run knows its model (common.open_run, run_all_experiments.py): from then on every figure this
    process saves carries the random-weights mark, as the page and summary.md carry their banner."""
    global _random_weights
    _random_weights = random


def save_png(fig, path: Path, dpi: int = 120) -> None:
    """Saves and closes a laid-out figure; with random weights, a red line along its foot and the PNG's metadata
    ("Weights": "random") say so, so that a figure looked at on its own cannot pass for a result. (A translucent
    mark across the plot would grow every PNG by half: blended colours compress badly.)"""
    metadata = {"Software": "clip_adapt"}
    if _random_weights:
        fig.text(0.005, 0.005, f"RANDOM WEIGHTS: {RANDOM_WEIGHTS_MARK.split(': ', 1)[1]}", ha="left", va="bottom",
                 fontsize=8, color="#c00000", weight="bold", zorder=1000)
        metadata["Weights"] = "random"
    atomic_save(path, lambda p: fig.savefig(p, dpi=dpi, format="png", metadata=metadata))
    plt.close(fig)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout(rect=(0, 0.04, 1, 1) if _random_weights else None)   # room for the mark's line
    save_png(fig, path)


def learning_rate_cuts(history: list[dict]) -> list[int]:
    """The epochs whose learning rate is below the one before, after the peak (warm-up raises it)."""
    if not history or "lr" not in history[0]:   # a history without rates: nothing to mark
        return []
    rates = [row["lr"] for row in history]
    peak = int(np.argmax(rates)) if rates else 0
    return [history[i]["epoch"] for i in range(peak + 1, len(rates)) if rates[i] < rates[i - 1] * (1 - 1e-6)]


def plot_curves(history: list[dict], metric: str, title: str, path: Path, best_epoch: int | None = None) -> None:
    """Train, val and test per epoch, with the best epoch (whose weights are reported) and each cut of the
    learning rate marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for split in ("train", "val", "test"):
        ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o" if len(epochs) < 30 else None,
                markersize=3, label=split)
    if best_epoch:
        ax.axvline(best_epoch, color="black", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
    for i, epoch in enumerate(learning_rate_cuts(history)):
        ax.axvline(epoch, color="tab:red", linestyle=":", linewidth=1, label="learning rate cut" if i == 0 else None)
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))   # no epoch 2.5
    if metric == "accuracy":
        ax.set_ylim(0, 1.02)   # a fixed scale: small differences should look small
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_top_k(pixels: torch.Tensor, probs: np.ndarray, labels, class_names: list[str], path: Path,
               samples: int = 6) -> None:
    """Sample images (evenly spaced through the split), each beside its k = min(5, classes) most probable
    classes: the study's zero-shot figure."""
    k = min(5, len(class_names))
    picks = np.linspace(0, len(pixels) - 1, min(samples, len(pixels))).round().astype(int)
    fig, axes = plt.subplots(len(picks), 2, figsize=(7, 1.9 * len(picks)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]})
    for row, i in enumerate(picks):
        axes[row][0].imshow(pixels[i].permute(1, 2, 0).cpu().numpy())
        axes[row][0].axis("off")
        axes[row][0].set_title(f"true: {class_names[int(labels[i])]}", fontsize=8)
        top = np.argsort(-probs[i], kind="stable")[:k]
        axes[row][1].barh(range(k), probs[i][top][::-1], color=["tab:green" if c == int(labels[i]) else "tab:gray"
                                                               for c in top[::-1]])
        axes[row][1].set_yticks(range(k), [class_names[c] for c in top[::-1]], fontsize=8)
        axes[row][1].set_xlim(0, 1)
    axes[-1][1].set_xlabel(f"probability (top {k}; green: the true class)")
    save_figure(fig, path)


def plot_confusion_matrix(labels, predictions, class_names, title: str, path: Path) -> None:
    import seaborn as sns
    from sklearn.metrics import confusion_matrix   # used, as they are slow to import: --help needs neither
    matrix = confusion_matrix(labels, predictions, labels=range(len(class_names)))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", xticklabels=class_names, yticklabels=class_names, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_figure(fig, path)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, title: str, path: Path, bins: int = ECE_BINS) -> None:
    """Accuracy per confidence bin against the diagonal, each bar labelled with its image count (a bin of 2
    images is no evidence), and the ECE in the title."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    centres = (np.arange(bins) + 0.5) / bins
    counts = np.bincount(which, minlength=bins)
    accuracy = [correct[which == b].mean() if counts[b] else 0 for b in range(bins)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bars = ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", label="accuracy")
    ax.bar_label(bars, labels=[str(n) if n else "" for n in counts], fontsize=6, padding=1)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ece = expected_calibration_error(probs, labels, bins)
    ax.set(xlabel="confidence (bar labels: images per bin)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.08),
           title=f"{title}\nECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize="small")
    save_figure(fig, path)


def plot_robustness(curves: dict[str, list[tuple[float, float]]], title: str, path: Path,
                    chance: float | None = None) -> None:
    """Test accuracy per noise level: one line over several levels; several methods, one small panel each on a
    shared scale (lines of equal accuracies would lie on top of one another in one panel, and the chance line
    on them), each panel with the others faint behind it for comparison; bars for a single level (a line of one
    point is a dot on an empty axis)."""
    levels = sorted({sigma for points in curves.values() for sigma, _ in points})
    if len(levels) > 1 and len(curves) > 1:
        plot_robustness_panels(curves, title, path, chance)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len(levels) == 1:
        names = list(curves)
        bars = ax.bar(range(len(names)), [curves[n][0][1] for n in names], color="tab:blue")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(len(names)), [n.split("_")[0] if len(names) > 1 else n for n in names])
        ax.set_xlabel(f"Gaussian noise sigma {levels[0]:g} (pixels in [0, 1])")
    else:
        for i, (name, points) in enumerate(curves.items()):
            ax.plot(*zip(*points), marker="osD^vP*Xhp"[i % 10], markersize=5 + 2 * (i % 5), fillstyle="none",
                    linestyle=["-", "--", "-.", ":"][i % 4], label=name)
        ax.set_xlabel("Gaussian noise sigma (pixels in [0, 1])")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.set(ylabel="test accuracy", ylim=(0, 1.08), title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_robustness_panels(curves: dict[str, list[tuple[float, float]]], title: str, path: Path,
                           chance: float | None) -> None:
    columns = min(4, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.2 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, points) in zip(axes.flat, curves.items()):
        for other, others in curves.items():
            if other != name:
                ax.plot(*zip(*others), color="lightgrey", linewidth=1, zorder=1)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, zorder=2)
        ax.plot(*zip(*points), marker="o", markersize=4, color="tab:blue", zorder=3)
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("noise sigma", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy", fontsize=8)
    fig.suptitle(f"{title} (blue: the method; grey: the others" + (f"; dotted: chance, {chance:.2f})" if chance
                                                                     is not None else ")"), fontsize=9)
    save_figure(fig, path)


def plot_c_sweep(sweep: list[dict], chosen: float, title: str, path: Path) -> None:
    """E2's L-BFGS probe in place of training curves: held-out accuracy and log-loss against the L2 strength C
    (cross-validated, or on the validation split), the chosen C marked. A solver has no epochs to plot."""
    held_out = "cv" if "cv_loss" in sweep[0] else "val"
    what = "mean over cross-validation folds" if held_out == "cv" else "validation split"
    c = [row["C"] for row in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(c, [row[f"{held_out}_{metric}"] for row in sweep], marker="o", markersize=3)
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"chosen C ({chosen:.3g})")
        ax.set(xscale="log", xlabel="C (inverse L2 strength, log scale)",
               ylabel=f"held-out {'log-loss' if metric == 'loss' else metric}")
        if metric == "accuracy":
            ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}\nheld out: {what}", fontsize=10)
    save_figure(fig, path)


def plot_closest_pairs(pairs: list[tuple], threshold: float | None, path: Path) -> None:
    """Contact sheet: each test image beside its nearest train image, closest pairs first, with the score, so
    that a person can judge by eye whether the detector's copies (and near misses) are the same scan."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(5.2, 2.9 * len(pairs)), squeeze=False)
    for row, (score, test_name, test_image, train_name, train_image) in zip(axes, pairs):
        verdict = "copy" if threshold is not None and score >= threshold else "distinct"
        for ax, name, image in ((row[0], test_name, test_image), (row[1], train_name, train_image)):
            ax.imshow(image.convert("L"), cmap="gray", vmin=0, vmax=255)
            ax.set_title(name, fontsize=7)
            ax.axis("off")
        row[0].text(1.02, 1.2, f"correlation {score:.4f}: {verdict}", transform=row[0].transAxes, ha="center",
                    fontsize=8, weight="bold")
    save_figure(fig, path)


def write_report(out_dir: Path, name: str, class_names: list[str], test_logits: torch.Tensor,
                 test_labels: torch.Tensor, test_files: list[str], history: list[dict], metrics: dict,
                 robustness: list[dict], data_report: dict) -> None:
    """Every per-experiment output file; metrics.json last, so that its presence means a complete set."""
    from sklearn.metrics import classification_report
    probs = test_logits.softmax(1).numpy()
    labels, predictions = test_labels.numpy(), probs.argmax(1)
    write_text(out_dir / "classification_report.txt",
               f"{name}: test set, {len(labels)} images\n\n" + classification_report(
                   labels, predictions, labels=range(len(class_names)), target_names=class_names, digits=3,
                   zero_division=0))
    write_csv(out_dir / "history.csv", history)
    write_csv(out_dir / "predictions.csv", [
        {"file": f, "label": class_names[y], "prediction": class_names[p],
         **{f"p_{c}": round(float(q), 6) for c, q in zip(class_names, row)}}
        for f, y, p, row in zip(test_files, labels, predictions, probs)])
    write_csv(out_dir / "robustness.csv", robustness)
    write_json(out_dir / "data_report.json", data_report)
    if metrics.get("c_sweep"):   # E2's L-BFGS: its C sweep, not one dot per curve
        plot_c_sweep(metrics["c_sweep"], metrics["l2_c"], f"{name}: held-out scores against C (L-BFGS)",
                     out_dir / "c_sweep.png")
    elif metrics["epochs_run"] and metrics.get("solver") not in FITTED_ONCE:   # nothing trained or fitted once:
        for metric in ("loss", "accuracy"):                                     # no curves of one dot each
            plot_curves(history, metric, f"{name}: {metric}", out_dir / f"{metric}_curves.png", metrics["best_epoch"])
    plot_confusion_matrix(labels, predictions, class_names, f"{name}: test confusion matrix",
                          out_dir / "confusion_matrix.png")
    plot_reliability(probs, labels, f"{name}: reliability (test)", out_dir / "reliability_diagram.png")
    plot_robustness({name: [(r["sigma"], r["test_accuracy"]) for r in robustness]},
                    f"{name}: accuracy under noise", out_dir / "robustness.png", 1 / len(class_names))
    write_json(out_dir / "metrics.json", metrics)
