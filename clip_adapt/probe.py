"""E2's linear probe by the CLIP paper's protocol (Radford et al., 2021, appendix A.3): multinomial logistic
regression fitted exactly with scikit-learn's L-BFGS (at most 1,000 iterations) on the frozen embeddings, its L2
strength chosen on the validation split from a log grid.

Where this differs: the paper searched 10^-6 to 10^6 by a parametric binary search over 96 log steps; a grid of
half-decades over the same range costs 25 fits of well under a second each on a few thousand embeddings and
needs no search code. Ties in validation accuracy, frequent on a small validation split, go to the lower
validation loss: among equally accurate C, the best-calibrated (by accuracy alone, the smallest C of a tie
can be a near-uniform model whose argmax rests on rounding).
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from safetensors.torch import save_file
from sklearn.metrics import log_loss

from clip_adapt.base import atomic_save, is_main_process
from clip_adapt.data import Split
from clip_adapt.training import TrainResult, loss_and_accuracy, trainable_state

C_GRID = tuple(float(c) for c in np.logspace(-6, 6, 25))   # C = 1/λ, half-decades from 1e-6 to 1e6
MAX_ITERATIONS = 1000


@dataclass
class ProbeFit:
    weight: torch.Tensor      # (classes, features), for an nn.Linear head
    bias: torch.Tensor
    chosen_c: float
    sweep: list[dict]         # one row per C: validation accuracy and loss, iterations, converged
    converged: bool           # L-BFGS stopped on its tolerance, not on MAX_ITERATIONS


def fit(c: float, features: np.ndarray, labels: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings(record=True):   # a fit that hits MAX_ITERATIONS is reported in the sweep
        warnings.simplefilter("always", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=MAX_ITERATIONS).fit(features, labels)


def fit_logistic_probe(train: Split, val: Split, grid=C_GRID) -> ProbeFit:
    """Fits one model per C on train, keeps the C of best validation accuracy; test plays no part."""
    x, y = train.inputs.double().cpu().numpy(), train.labels.cpu().numpy()
    val_x, val_y = val.inputs.double().cpu().numpy(), val.labels.cpu().numpy()
    classes = int(max(y.max(), val_y.max())) + 1
    sweep, models = [], []
    for c in sorted(grid):
        model = fit(c, x, y)
        probabilities = model.predict_proba(val_x)
        sweep.append({"C": c, "val_accuracy": float((model.classes_[probabilities.argmax(1)] == val_y).mean()),
                      "val_loss": float(log_loss(val_y, probabilities, labels=model.classes_)),
                      "iterations": int(model.n_iter_.max()), "converged": bool(model.n_iter_.max() < MAX_ITERATIONS)})
        models.append(model)
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_accuracy"], -sweep[i]["val_loss"]))
    model = models[best]
    if len(model.classes_) != classes:
        raise ValueError(f"the training split holds {len(model.classes_)} of {classes} classes")
    weight, bias = model.coef_, model.intercept_
    if classes == 2:   # scikit-learn's binary model is one logit for class 1: as two logits, the same softmax
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return ProbeFit(torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32),
                    sweep[best]["C"], sweep, sweep[best]["converged"])


def fit_probe_head(head: torch.nn.Linear, embeddings: dict[str, Split], checkpoint_dir) -> tuple[TrainResult, dict]:
    """Fits `head` (an nn.Linear on the embeddings) by fit_logistic_probe and writes its weights to
    checkpoint_dir/best.safetensors as train() does; returns train()'s result (one history row: the fitted
    model's losses and accuracies) and what metrics.json records about the fit."""
    probe = fit_logistic_probe(embeddings["train"], embeddings["val"])
    with torch.no_grad():
        head.weight.copy_(probe.weight.to(head.weight.device))
        head.bias.copy_(probe.bias.to(head.bias.device))
    row = {"epoch": 1}
    for name, split in embeddings.items():
        head.eval()
        with torch.no_grad():
            logits = head(split.inputs.to(head.weight.device)).float().cpu()
        row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(logits, split.labels)
    row["lr"] = 0.0
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_save(folder / "best.safetensors", lambda p: save_file(trainable_state(head), p,
                                                                       metadata={"C": str(probe.chosen_c)}))
    chosen = next(r for r in probe.sweep if r["C"] == probe.chosen_c)
    reason = (f"L-BFGS met its tolerance in {chosen['iterations']} iterations" if probe.converged else
              f"L-BFGS stopped at its cap of {MAX_ITERATIONS} iterations")
    result = TrainResult([row], best_epoch=1, epochs_run=1, converged=probe.converged, convergence_reason=reason)
    return result, {"solver": "lbfgs", "l2_c": probe.chosen_c, "c_sweep": probe.sweep}
