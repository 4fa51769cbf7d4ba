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

def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


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
    """Test accuracy per noise level: lines over several levels (each with its own hollow marker, size and dash,
    so that equal lines still show), bars for a single level (a line of one point is a dot on an empty axis)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    levels = sorted({sigma for points in curves.values() for sigma, _ in points})
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
                   labels, predictions, labels=range(len(class_names)), target_names=class_names, digits=4,
                   zero_division=0))
    write_csv(out_dir / "history.csv", history)
    write_csv(out_dir / "predictions.csv", [
        {"file": f, "label": class_names[y], "prediction": class_names[p],
         **{f"p_{c}": round(float(q), 6) for c, q in zip(class_names, row)}}
        for f, y, p, row in zip(test_files, labels, predictions, probs)])
    write_csv(out_dir / "robustness.csv", robustness)
    write_json(out_dir / "data_report.json", data_report)
    if metrics["epochs_run"]:   # nothing trained (zero-shot): no curves, rather than one dot each
        for metric in ("loss", "accuracy"):
            plot_curves(history, metric, f"{name}: {metric}", out_dir / f"{metric}_curves.png", metrics["best_epoch"])
    plot_confusion_matrix(labels, predictions, class_names, f"{name}: test confusion matrix",
                          out_dir / "confusion_matrix.png")
    plot_reliability(probs, labels, f"{name}: reliability (test)", out_dir / "reliability_diagram.png")
    plot_robustness({name: [(r["sigma"], r["test_accuracy"]) for r in robustness]},
                    f"{name}: accuracy under noise", out_dir / "robustness.png", 1 / len(class_names))
    write_json(out_dir / "metrics.json", metrics)
