"""The convergence verdict, case by case (clip_adapt/convergence.py): on synthetic loss histories, where the answer
is known by construction, and on real runs of the loop where it is cheap. Selection (which epoch is reported) is
the validation split's; convergence is the training loss's; neither may pass for the other."""

import math

import numpy as np
import pytest
import torch

from clip_adapt import convergence
from clip_adapt.convergence import TrainingLoss, after_epoch, judge
from clip_adapt.data import Split
from clip_adapt.models import Fp32Linear
from clip_adapt.training import TrainConfig, train

WINDOW = 10   # epochs per window in the synthetic histories
PATIENCE = 50


def replay(losses, min_steps: int = 0, steps_per_epoch: int = 5, at_start: float | None = None):
    """Feeds per-epoch training losses to the loop's rule as train() does: (TrainingLoss, decisions, steps)."""
    watch = TrainingLoss(at_start=losses[0] if at_start is None else at_start, window_epochs=WINDOW)
    decisions, steps = [], 0
    for loss in losses:
        steps += steps_per_epoch
        watch.losses.append(loss)
        decisions.append(after_epoch(watch, steps, min_steps))
        if decisions[-1] == "stop":
            break
    return watch, decisions, steps


def history_of(losses, val_losses=None):
    val_losses = val_losses if val_losses is not None else losses
    return [{"epoch": 0, "train_loss": losses[0], "val_loss": val_losses[0]}] + [
        {"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(losses, val_losses))]


def verdict_of(losses, val_losses=None, min_steps=0, epochs=None, **kwargs):
    watch, decisions, steps = replay(losses, min_steps, at_start=kwargs.pop("at_start", None))
    history = history_of(losses[:len(decisions)], None if val_losses is None else val_losses[:len(decisions)])
    selected = min(history, key=lambda row: row["val_loss"])["epoch"]
    return judge(watch, steps, epochs or len(losses), PATIENCE, min_steps, history, selected, **kwargs), decisions


def noisy(values, scale=0.01, seed=0):
    return list(np.asarray(values) + np.random.default_rng(seed).normal(0, scale, len(values)))


def test_a_loss_that_flattens_is_converged_after_every_rate_cut():
    losses = noisy(0.2 + 1.2 * np.exp(-np.arange(400) / 15))
    verdict, decisions = verdict_of(losses)
    assert decisions.count("cut") == convergence.RATE_CUTS and decisions[-1] == "stop"
    assert verdict.converged and verdict.verdict == "converged", verdict.reason
    assert len(decisions) < 400


def test_noise_alone_does_not_keep_a_flat_loss_going():
    """A flat but noisy loss keeps making new record lows; means over windows do not mistake that for falling."""
    losses = [1.0] * 5 + noisy([0.3] * 400, scale=0.05, seed=1)
    _, decisions = verdict_of(losses)
    assert decisions[-1] == "stop" and len(decisions) <= 10 * WINDOW   # two windows at each of three rates, and some


def test_a_loss_still_falling_at_the_cap_says_more_epochs():
    losses = list(np.linspace(1.4, 0.2, 40))   # a steady fall: never a plateau
    verdict, decisions = verdict_of(losses)
    assert "stop" not in decisions
    assert not verdict.converged and verdict.verdict == "still-falling" and "more --epochs" in verdict.reason


def test_a_rising_loss_is_diverging_not_converged():
    """It may be cut first (a lower rate can mend a slow rise), and is stopped once it has risen clearly."""
    losses = list(np.linspace(1.0, 1.6, 100))
    verdict, decisions = verdict_of(losses)
    assert decisions[-1] == "stop"
    assert not verdict.converged and verdict.verdict == "diverging" and "lower --lr" in verdict.reason


def test_a_loss_well_above_the_start_is_diverging_even_if_flat():
    """Jumped up in its first steps, then flat: a plateau, but far above where the model started."""
    verdict, _ = verdict_of([5.0] * 100, at_start=1.4)
    assert verdict.verdict == "diverging"


def test_over_fitting_is_converged_and_says_that_selection_kept_the_better_epoch():
    losses = noisy(0.1 + 1.2 * np.exp(-np.arange(400) / 15), seed=2)
    val = list(np.r_[np.linspace(1.2, 0.6, 30), np.linspace(0.6, 1.5, 370)])
    verdict, decisions = verdict_of(losses, val)
    assert verdict.converged and verdict.notes and "over-fitting" in verdict.notes[0]
    assert "epoch 30" in verdict.notes[0]


def test_a_run_that_settled_but_ended_below_min_steps_is_not_converged():
    losses = noisy(0.2 + 1.2 * np.exp(-np.arange(200) / 5))
    verdict, decisions = verdict_of(losses, min_steps=10_000)
    assert "stop" not in decisions
    assert not verdict.converged and verdict.verdict == "below-min-steps" and "--min-steps 10000" in verdict.reason


def test_a_plateau_far_above_the_heads_reachable_fit_is_under_fitted():
    losses = noisy([1.0] * 5 + [0.9] * 400)
    verdict, _ = verdict_of(losses, final_train_loss=0.9, reachable_train_loss=0.2, classes=4)
    assert not verdict.converged and verdict.verdict == "under-fitted"
    verdict, _ = verdict_of(losses, final_train_loss=0.22, reachable_train_loss=0.2, classes=4)
    assert verdict.converged


def test_a_loss_crawling_far_above_the_reachable_fit_at_the_cap_is_under_fitted():
    losses = list(np.linspace(1.386, 1.38, 200))
    verdict, _ = verdict_of(losses, final_train_loss=1.38, reachable_train_loss=0.1, classes=4)
    assert verdict.verdict == "under-fitted" and "crawled" in verdict.reason


# --------------------------------------------------------------------------- real runs of the loop

def separable_task(n: int = 64, seed: int = 0):
    """Four classes in 8 dimensions that a linear head separates well, features far from zero-mean."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(4, 8, generator=g)
    y = torch.arange(2 * n) % 4
    x = 20 + centres[y] + torch.randn(2 * n, 8, generator=g)
    return Split(x[:n], y[:n], []), Split(x[n:], y[n:], [])


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(epochs=400, patience=20, batch_size=16, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                  device=torch.device("cpu"), checkpoint_dir=tmp_path, augment=False)
    return TrainConfig(**{**values, **overrides})


def head(seed: int = 0) -> Fp32Linear:
    torch.manual_seed(seed)
    return Fp32Linear(8, 4)


@pytest.mark.parametrize("start", ["probe", "standardise"])
def test_a_task_its_head_fits_converges(start, tmp_path):
    train_split, val = separable_task()
    result = train(head(), train_split, val, val, config(tmp_path, head_start=start))
    assert result.converged and result.verdict == "converged", result.convergence_reason
    assert result.history[-1]["train_accuracy"] > 0.9
    assert result.head_start["reachable_train_loss"] < 0.5


def test_a_rate_far_too_small_is_under_fitted(tmp_path):
    train_split, val = separable_task()
    result = train(head(), train_split, val, val, config(tmp_path, lr=1e-7, head_start="standardise"))
    assert not result.converged and result.verdict == "under-fitted", result.convergence_reason


def test_a_rate_far_too_high_is_diverging(tmp_path):
    """Raw features far from zero and AdamW at a rate of 30: the loss leaps far above where it started."""
    train_split, val = separable_task()
    result = train(head(), train_split, val, val, config(tmp_path, lr=30.0, head_start="none"))
    assert not result.converged and result.verdict == "diverging", result.convergence_reason


def test_a_run_capped_at_a_few_epochs_is_still_falling(tmp_path):
    train_split, val = separable_task()
    result = train(head(), train_split, val, val, config(tmp_path, epochs=3, head_start="standardise"))
    assert result.epochs_run == 3 and not result.converged and result.verdict == "still-falling"


def test_selection_is_by_validation_and_may_keep_the_start(tmp_path):
    """Validation labels shuffled: nothing trained helps on them, and selection may keep epoch 0, the model as
    built; the verdict is about the training loss, which converges all the same."""
    train_split, val = separable_task()
    shuffled = Split(val.inputs, val.labels[torch.randperm(len(val), generator=torch.Generator().manual_seed(1))], [])
    result = train(head(), train_split, shuffled, shuffled, config(tmp_path, head_start="probe"))
    assert result.selection["metric"] == "val_loss"
    best = min(result.history, key=lambda row: row["val_loss"])
    assert result.best_epoch == best["epoch"] and result.selection["value"] == pytest.approx(best["val_loss"])
    assert result.converged


def test_the_rate_is_cut_only_at_training_loss_plateaus_and_not_by_the_cap(tmp_path):
    train_split, val = separable_task()
    results = {cap: train(head(), train_split, val, val, config(tmp_path / str(cap), epochs=cap,
                                                                   head_start="standardise"))
               for cap in (300, 3000)}
    assert results[300].history == results[3000].history and results[300].converged
    rates = [row["lr"] for row in results[300].history[1:]]
    cuts = [i for i in range(1, len(rates)) if rates[i] < rates[i - 1]]
    assert len(cuts) == convergence.RATE_CUTS
    assert all(rates[i] == pytest.approx(rates[i - 1] * convergence.CUT_FACTOR) for i in cuts)
    assert math.isclose(rates[-1], 1e-2 * convergence.CUT_FACTOR ** convergence.RATE_CUTS, rel_tol=1e-9)
