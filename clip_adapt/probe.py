"""Linear probes by the CLIP paper's protocol (Radford et al., 2021, appendix A.3): multinomial logistic regression
fitted with scikit-learn's L-BFGS on frozen features, its L2 strength C chosen on held-out data from a log grid.
E2 is this probe; every other method with a linear head starts its head here (start_head).

What it does, and where it differs from A.3:
- The features are standardised with the fitted data's per-feature mean and standard deviation first (kept in
  the head, Fp32Linear's input_shift and input_scale). A.3 fits raw features. Measured on the known-answer task
  family (docs/known-answer.md): on raw features L-BFGS hit its 1,000-iteration cap for up to 4 of the 25 C,
  and a tight embedding cluster made C's choice erratic; standardised, no C hits the cap.
- C is chosen by cross-validation by default (`selection="cross-validation"`: CV_FOLDS stratified folds, near
  copies kept inside one fold, the C of lowest mean held-out log-loss), over the data that is then refitted
  with it. A.3 chose C on a validation split. On the study's small splits (24 to 72 validation images) the
  validation split's choice was up to 0.07 below the cross-validated reference on the task family, the folds'
  at most 0.025 (docs/known-answer.md). `selection="validation"` is A.3's rule: the C of best validation
  accuracy, ties to the lower validation loss.
- A.3 searched 10^-6 to 10^6 by a parametric binary search over 96 log steps; this grid has the 25 half-decades of
  the same range, each fit from a cold start as scikit-learn's own grid search fits it. A choice at either end
  of the grid is flagged (`at_grid_edge`): the best C may lie beyond it. Warm starts along the C path were
  measured and dropped: on nearly separable features the large-C fits stopped on L-BFGS's tolerance a few steps
  from the small-C solution they started at, so their held-out loss fell again past the true minimum and the
  choice jumped to C = 1e5 (known-answer task in bf16; cold starts: a U-shaped curve with its minimum at 31.6 in
  both precisions, in the same 4 s).
- E2 refits on train + validation with the chosen C, as A.3 does (`refit_on_val`); train()'s head start fits the
  training split alone, so that validation stays untouched for selecting the epoch.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold

from clip_adapt.base import atomic_save, is_main_process
from clip_adapt.data import Split
from clip_adapt.training import TrainResult, loss_and_accuracy, tensor_hash, trainable_state

C_GRID = tuple(float(c) for c in np.logspace(-6, 6, 25))   # C = 1/λ, half-decades from 1e-6 to 1e6
MAX_ITERATIONS = 1000
SELECTIONS = ("cross-validation", "validation")
CV_FOLDS = 5


@dataclass
class ProbeFit:
    weight: torch.Tensor      # (classes, features), on standardised features
    bias: torch.Tensor
    shift: torch.Tensor       # the standardisation: (x - shift) / scale
    scale: torch.Tensor
    chosen_c: float
    sweep: list[dict]         # one row per C: held-out accuracy and loss, iterations
    converged: bool           # the final fit stopped on L-BFGS's tolerance, not on MAX_ITERATIONS
    iterations: int
    selection: dict           # how C was chosen: {"rule", "folds" or "images", "value"}
    at_grid_edge: bool


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.maximum(x.std(0), 1e-6)


def fit_path(grid, x: np.ndarray, y: np.ndarray):
    """One L-BFGS fit per C in ascending order, each from a cold start: (C, model, iterations)."""
    for c in sorted(grid):
        model = LogisticRegression(C=c, max_iter=MAX_ITERATIONS)
        with warnings.catch_warnings():   # a fit that hits MAX_ITERATIONS is reported in the sweep, not warned of
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        yield c, model, int(model.n_iter_.max())


def held_out_scores(model: LogisticRegression, x: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    probabilities = model.predict_proba(x)
    return (float((model.classes_[probabilities.argmax(1)] == y).mean()),
            float(log_loss(y, probabilities, labels=classes)))


def cross_validated_sweep(grid, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int) -> list[dict]:
    """Mean held-out accuracy and log-loss per C over stratified folds that keep each copy group whole."""
    groups = np.arange(len(y)) if groups is None else groups
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    classes = np.unique(y)
    scores = {c: [] for c in grid}
    for fitted, held_out in splitter.split(x, y, groups):
        shift, scale = standardisation(x[fitted])
        for c, model, _ in fit_path(grid, (x[fitted] - shift) / scale, y[fitted]):
            scores[c].append(held_out_scores(model, (x[held_out] - shift) / scale, y[held_out], classes))
    return [{"C": c, "cv_accuracy": float(np.mean([a for a, _ in scores[c]])),
             "cv_loss": float(np.mean([l for _, l in scores[c]]))} for c in sorted(grid)]


def fit_logistic_probe(train: Split, val: Split, selection: str = "cross-validation", refit_on_val: bool = False,
                       groups: np.ndarray | None = None, grid=C_GRID) -> ProbeFit:
    """Chooses C (selection: "cross-validation" over the data to be fitted, or "validation": fitted on train,
    scored on val), then fits it on train, or on train + val with refit_on_val. groups: a copy-group id per
    image of train followed by val, so that no fold holds one copy of an image while another holds its twin.
    Test plays no part."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    x, y = train.inputs.double().cpu().numpy(), train.labels.cpu().numpy()
    val_x, val_y = val.inputs.double().cpu().numpy(), val.labels.cpu().numpy()
    classes = np.unique(np.r_[y, val_y])
    fit_x, fit_y = (np.r_[x, val_x], np.r_[y, val_y]) if refit_on_val else (x, y)
    fit_groups = None if groups is None else np.asarray(groups)[:len(fit_y)]
    folds = min(CV_FOLDS, int(np.bincount(fit_y).min()))
    if selection == "cross-validation" and folds >= 2:
        sweep = cross_validated_sweep(grid, fit_x, fit_y, fit_groups, folds)
        best = min(range(len(sweep)), key=lambda i: sweep[i]["cv_loss"])
        chosen = {"rule": f"lowest mean held-out log-loss over {folds} cross-validation folds", "folds": folds,
                  "value": sweep[best]["cv_loss"]}
    else:   # A.3's rule, or too few images of a class for folds
        shift, scale = standardisation(x)
        sweep = [{"C": c, **dict(zip(("val_accuracy", "val_loss"),
                                     held_out_scores(model, (val_x - shift) / scale, val_y, classes))),
                  "iterations": iterations}
                 for c, model, iterations in fit_path(grid, (x - shift) / scale, y)]
        best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_accuracy"], -sweep[i]["val_loss"]))
        chosen = {"rule": "best validation accuracy, ties to the lower validation loss", "images": len(val_y),
                  "value": sweep[best]["val_accuracy"]}
    c = sweep[best]["C"]
    shift, scale = standardisation(fit_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # reported as `converged`
        model = LogisticRegression(C=c, max_iter=MAX_ITERATIONS).fit((fit_x - shift) / scale, fit_y)
    if len(model.classes_) != len(classes):
        raise ValueError(f"the fitted images hold {len(model.classes_)} of {len(classes)} classes")
    weight, bias = model.coef_, model.intercept_
    if len(classes) == 2:   # scikit-learn's binary model is one logit for class 1: as two logits, the same softmax
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    iterations = int(model.n_iter_.max())
    as_tensor = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)   # noqa: E731
    return ProbeFit(as_tensor(weight), as_tensor(bias), as_tensor(shift), as_tensor(scale), c, sweep,
                    iterations < MAX_ITERATIONS, iterations, chosen, best in (0, len(sweep) - 1))


def load_probe(head: torch.nn.Linear, probe: ProbeFit) -> None:
    """The fit into an Fp32Linear head: its standardisation and weights."""
    device = head.weight.device
    with torch.no_grad():
        head.input_shift.copy_(probe.shift.to(device))
        head.input_scale.copy_(probe.scale.to(device))
        head.weight.copy_(probe.weight.to(device))
        head.bias.copy_(probe.bias.to(device))


def fit_probe_head(head: torch.nn.Linear, embeddings: dict[str, Split], checkpoint_dir, selection: str,
                   refit_on_val: bool, groups: np.ndarray | None = None) -> tuple[TrainResult, dict]:
    """E2 by L-BFGS: fits `head` (an Fp32Linear on the embeddings) by fit_logistic_probe and writes its weights to
    checkpoint_dir/best.safetensors as train() does; returns train()'s result (one history row: the fitted
    model's losses and accuracies) and what metrics.json records about the fit."""
    probe = fit_logistic_probe(embeddings["train"], embeddings["val"], selection, refit_on_val, groups)
    load_probe(head, probe)
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
    reason = (f"L-BFGS met its tolerance in {probe.iterations} iterations at the chosen C" if probe.converged else
              f"L-BFGS stopped at its cap of {MAX_ITERATIONS} iterations at the chosen C, short of its tolerance")
    notes = [f"C = {probe.chosen_c:g} is at the edge of the grid ({C_GRID[0]:g} to {C_GRID[-1]:g}): the best C may "
             f"lie beyond it"] if probe.at_grid_edge else []
    result = TrainResult([row], best_epoch=1, epochs_run=1, converged=probe.converged, convergence_reason=reason,
                         verdict="converged" if probe.converged else "still-falling",
                         selection={"epoch": 1, "metric": "C", **probe.selection}, notes=notes)
    return result, {"solver": "lbfgs", "l2_c": probe.chosen_c, "c_sweep": probe.sweep, "c_selection": selection,
                    "refit_on_val": refit_on_val, "lbfgs_iterations": probe.iterations,
                    "c_at_grid_edge": probe.at_grid_edge}


# --------------------------------------------------------------------------- a linear head's start in train()

HEAD_STARTS = ("probe", "standardise", "none")
_FITS: dict[str, ProbeFit] = {}   # by the features' digest: --tune's grid points share their initial features


def fitted_once(train: Split, val: Split) -> ProbeFit:
    """fit_logistic_probe on the training split alone (C by cross-validation inside it), remembered for the same
    features and labels within one process."""
    key = "|".join(tensor_hash(t) for t in (train.inputs, train.labels, val.inputs, val.labels))
    if key not in _FITS:
        _FITS[key] = fit_logistic_probe(train, val)
    return _FITS[key]


def linear_head(model: torch.nn.Module):
    """(head, embed) for a model whose logits are a linear head (Fp32Linear) on an embedding: the head itself
    trained on cached embeddings (E2 by gradient steps; embed None, the inputs are the features), or a
    classifier with `head` and `embed` (E3, E4, E6, E7 with a linear head). None for any other model."""
    from clip_adapt.models import Fp32Linear
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, Fp32Linear):
        return model, None
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    return (head, embed) if isinstance(head, Fp32Linear) and callable(embed) else None


def start_head(model: torch.nn.Module, train: Split, val: Split, config) -> dict:
    """Before the first step, for a model with a linear head (linear_head): the initial features of the training
    split, and the convex fit of the head alone on them (fit_logistic_probe on the training split, C by
    cross-validation inside it), whose training loss is what the head reaches without anything else training:
    the verdict's bar for "under-fitted". config.head_start "standardise" gives the head the fit's input
    standardisation (the training split's statistics; MAE's linear probe standardises its input by a BatchNorm
    without affine parameters for the same reason); "probe" also starts its weights at the fit: linear
    probing, then fine-tuning (Kumar et al., ICLR 2022). Returns what metrics.json records ({} for a model
    without a linear head)."""
    from clip_adapt.training import batched
    found = linear_head(model)
    if found is None:
        return {}
    head, embed = found
    model.eval()
    batch = 2 * config.batch_size
    features = {name: (split.inputs.float() if embed is None else
                       batched(embed, split, batch, config.device, config.precision, desc=f"initial features ({name})",
                               transient=True))
                for name, split in (("train", train), ("val", val))}
    probe = fitted_once(train.with_inputs(features["train"]), val.with_inputs(features["val"]))
    standardised = (features["train"] - probe.shift) / probe.scale
    reachable = torch.nn.functional.cross_entropy(standardised @ probe.weight.T + probe.bias, train.labels.cpu()).item()
    if config.head_start == "probe":
        load_probe(head, probe)
    elif config.head_start == "standardise":
        with torch.no_grad():
            head.input_shift.copy_(probe.shift.to(head.weight.device))
            head.input_scale.copy_(probe.scale.to(head.weight.device))
    return {"head_start": config.head_start, "reachable_train_loss": reachable, "classes": len(probe.bias),
            "probe_l2_c": probe.chosen_c, "probe_converged": probe.converged}
