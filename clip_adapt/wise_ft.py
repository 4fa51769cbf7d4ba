"""WiSE-FT (Wortsman et al., CVPR 2022; mlfoundations/wise-ft src/wise_ft.py): after fine-tuning, the weights
θ_α = (1 − α) θ_zero-shot + α θ_fine-tuned, for α on a grid, each evaluated; E6 --wise-ft. The fine-tuned model's
head starts at CLIP's zero-shot classifier (ZeroShotLinear), so that θ_0 is E1 itself and every θ_α is a model
of the same form. α is chosen on the validation split (the reference evaluates every α and leaves the choice to
the reader); the whole curve, validation, test and noise robustness per α, is reported.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_adapt.models import exact_fp32
from clip_adapt.reporting import classification_metrics, save_figure

ALPHAS = tuple(round(i / 10, 1) for i in range(11))   # 0, 0.1, ..., 1


class ZeroShotLinear(nn.Linear):
    """WiSE-FT's head (its ClassificationHead with normalize=True, from get_zeroshot_classifier): a linear layer on
    the unit image embedding, its weight CLIP's logit scale times the class text embeddings, its bias 0, so that
    as built it gives E1's logits. Computed in fp32 (no autocast, no TF32), as the project's other heads are."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: torch.Tensor):
        classes, width = class_embeddings.shape
        super().__init__(width, classes)
        with torch.no_grad():
            self.weight.copy_(logit_scale.detach().float() * class_embeddings.float())
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with exact_fp32(x.device.type):
            return F.linear(F.normalize(x.float(), dim=-1), self.weight, self.bias)


def interpolate(theta_0: dict, theta_1: dict, alpha: float) -> dict:
    """(1 − α) θ_0 + α θ_1 for every floating-point tensor (the reference's _merge without Fisher weights); a tensor
    of another type (an index buffer) is the same in both and kept."""
    if set(theta_0) != set(theta_1):
        raise ValueError("the two checkpoints hold different tensors")
    return {key: (1 - alpha) * theta_0[key] + alpha * theta_1[key] if theta_0[key].is_floating_point()
            else theta_1[key] for key in theta_0}


def state_of(model: nn.Module) -> dict:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def alpha_curve(model: nn.Module, theta_0: dict, theta_1: dict, evaluate, labels: dict, alphas=ALPHAS) -> list[dict]:
    """One row per α: the model loaded with θ_α and evaluate(model) -> (logits per split, robustness rows as
    common.evaluate gives them); validation and test accuracy and loss, and test accuracy per noise level."""
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(theta_0, theta_1, alpha))
        logits, robustness = evaluate(model)
        scores = {split: classification_metrics(logits[split], labels[split]) for split in ("val", "test")}
        rows.append({"alpha": alpha, **{f"{split}_{metric}": scores[split][metric] for split in scores
                                        for metric in ("accuracy", "loss")},
                     "noise": {str(r["sigma"]): r["test_accuracy"] for r in robustness}})
    return rows


def chosen(rows: list[dict]) -> dict:
    """The row of best validation accuracy, ties to the lower validation loss, then to the smaller α."""
    return min(rows, key=lambda row: (-row["val_accuracy"], row["val_loss"], row["alpha"]))


def plot_alpha_curve(rows: list[dict], choice: float, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    alphas = [row["alpha"] for row in rows]
    ax.plot(alphas, [row["val_accuracy"] for row in rows], marker="o", label="validation")
    ax.plot(alphas, [row["test_accuracy"] for row in rows], marker="s", label="test")
    for i, sigma in enumerate(rows[0]["noise"]):
        if float(sigma) > 0:
            ax.plot(alphas, [row["noise"][sigma] for row in rows], marker="^v<>"[i % 4], fillstyle="none",
                    linestyle=":", label=f"test, noise sigma {sigma}")
    ax.axvline(choice, color="black", linestyle="--", linewidth=1, label=f"chosen on validation (alpha {choice:g})")
    ax.set(xlabel="alpha (0: zero-shot, 1: fine-tuned)", ylabel="accuracy", ylim=(0, 1.08),
           title="WiSE-FT: weights interpolated between zero-shot and fine-tuned")
    ax.legend(fontsize="small")
    save_figure(fig, path)
