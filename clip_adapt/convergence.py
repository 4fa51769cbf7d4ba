"""Whether a run converged, and which of its epochs it reports: two questions, answered apart.

**Convergence** is a property of the training objective. The loop records the training loss of every epoch
(over the whole training split) and compares the mean of the last `patience` optimiser steps' epochs with the
mean of the window before: the loss has reached a plateau when the later window is lower by less than NEW_LOW of
the loss's whole fall so far (from the run's first window to the later one). Means over windows, not
record lows: a noisy per-epoch loss keeps setting new records long after it has stopped falling, and a fixed
threshold would depend on the loss's scale. At a plateau the learning rate is cut (by CUT_FACTOR, at most
RATE_CUTS times, each followed by two fresh windows): the rate falls only after the loss stopped falling at
the rate it had, never on a noisy validation split. The plateau after the last cut, past `min_steps`, ends the
run, converged. A plateau whose later window is above RISE times the first window, or above DIVERGED times the
loss at epoch 0 (the model as built, measured without the dropout and augmentation that the trained windows
have, hence the wider factor), either plus RISE_NATS, ends it too, diverging.

**Selection** picks which epoch's weights are reported, by the validation split alone: the epoch of lowest
validation loss, epoch 0 (the model as built, before any step) included. Validation never cuts the rate or
ends a run. A validation loss that rises while the training loss falls is over-fitting, which selection
handles; the verdict says so and stays "converged".

Why a plateau schedule on the training loss rather than a cosine: the cosine needs a horizon, and with a
budget extended until the loss converges there is none; the rate cuts here come when the loss asks for them,
and a run that converged at one --epochs converges the same at a larger one.

Verdicts (TrainResult.verdict), each with its reason and the advice that follows from it:
- converged: the training loss stopped falling at the final rate (over-fitting, if any, is noted);
- still-falling: the epoch cap came first ("more --epochs");
- below-min-steps: the loss settled, but the cap came before --min-steps optimiser steps;
- diverging: the training loss ended above where it started ("lower --lr");
- under-fitted: the loss stopped falling (or crawled to the cap at a pace that would need CRAWL_WINDOWS more
  windows), clearly above what the linear head alone reaches on the initial features (a convex fit,
  clip_adapt/probe.py): the optimiser stalled short of a known reachable point.
"""

import math
from dataclasses import dataclass, field

NEW_LOW = 0.01        # a window must beat the one before by more than this share of the fall so far
RISE = 1.1            # a last window above this times the first, plus RISE_NATS: the loss is rising (the nats keep
RISE_NATS = 0.05      # a loss near zero, where a tenth is noise, from reading as rising)
DIVERGED = 1.5        # a last window above this times epoch 0's loss (plus RISE_NATS): training made it worse
CUT_FACTOR = 0.3      # the learning rate is multiplied by this at each plateau...
RATE_CUTS = 2         # ...at most this many times (the final rate: 0.09 of the peak)
UNDER_FITTED = 1.25   # final training loss above this times the head's reachable loss, plus UNDER_FITTED_CHANCE
UNDER_FITTED_CHANCE = 0.1   # times the loss of chance, ln(classes): near zero, both losses mean a perfect fit
CRAWL_WINDOWS = 100   # at the cap, a gap to the reachable loss that the last window's pace needs this many more for
OVER_FITTED = 1.1     # the last epoch's validation loss above this times the selected epoch's: over-fitting


@dataclass
class TrainingLoss:
    """The training loss per epoch, and where the current rate's windows start: what stopping and the verdict
    read. Plain numbers, so that the resume state holds it as it is."""
    at_start: float | None = None         # epoch 0's loss: the model as built, before any step
    losses: list = field(default_factory=list)   # one per trained epoch
    window_epochs: int = 1                # epochs per window: `patience` optimiser steps' worth
    since: int = 0                        # the first epoch (index into losses) at the current rate
    cuts: int = 0                         # learning-rate cuts so far
    ended: str = ""                       # "plateau" or "diverging" once the run has ended on its own

    def windows(self) -> tuple[float, float] | None:
        """(mean of the window before, mean of the last window) at the current rate, once both are complete."""
        current = self.losses[self.since:]
        w = self.window_epochs
        if len(current) < 2 * w:
            return None
        return sum(current[-2 * w:-w]) / w, sum(current[-w:]) / w

    @property
    def start(self) -> float | None:
        """The mean of the run's first window."""
        w = self.window_epochs
        return sum(self.losses[:w]) / w if len(self.losses) >= w else None

    def fell(self) -> tuple[float, float] | None:
        """(the last window's fall from the one before, the whole fall so far), once there are two windows."""
        pair = self.windows()
        if pair is None:
            return None
        before, last = pair
        return before - last, self.start - last

    def at_plateau(self) -> bool:
        fell = self.fell()
        return fell is not None and fell[0] <= NEW_LOW * max(fell[1], 0.0)

    def rising(self) -> bool:
        pair = self.windows()
        return pair is not None and (pair[1] > RISE * self.start + RISE_NATS or
                                     (self.at_start is not None and pair[1] > DIVERGED * self.at_start + RISE_NATS))


def after_epoch(loss: TrainingLoss, steps: int, min_steps: int) -> str:
    """What the loop does after an epoch: "go on", "cut" (the rate, then go on) or "stop"."""
    if not loss.at_plateau():
        return "go on"
    if loss.rising():
        loss.ended = "diverging"
        return "stop"
    if loss.cuts < RATE_CUTS:
        loss.cuts += 1
        loss.since = len(loss.losses)   # two fresh windows at the new rate
        return "cut"
    if steps < min_steps:
        return "go on"
    loss.ended = "plateau"
    return "stop"


@dataclass
class Verdict:
    converged: bool
    verdict: str        # converged, still-falling, below-min-steps, diverging, under-fitted
    reason: str
    notes: list = field(default_factory=list)


def judge(loss: TrainingLoss, steps: int, epochs: int, patience: int, min_steps: int, history: list[dict],
          selected_epoch: int, final_train_loss: float | None = None, reachable_train_loss: float | None = None,
          classes: int | None = None) -> Verdict:
    """The verdict on a finished run. final_train_loss: the last weights' loss over the training split in eval
    mode; reachable_train_loss: the linear head's convex fit on the initial features (None where the method has
    no linear head), over `classes` classes."""
    fell = loss.fell()
    window = f"a window of {patience} optimiser steps"
    if loss.ended == "diverging":
        return Verdict(False, "diverging", f"the training loss rose to {loss.windows()[1]:.4g} over {window}, from "
                       f"{loss.start:.4g} over its first ({loss.at_start:.4g} before any step): lower --lr")
    if reachable_train_loss is not None and final_train_loss is not None and classes:
        gap = final_train_loss - reachable_train_loss
        above = final_train_loss > UNDER_FITTED * reachable_train_loss + UNDER_FITTED_CHANCE * math.log(classes)
        crawling = loss.ended != "plateau" and fell is not None and fell[0] * CRAWL_WINDOWS < gap
        if above and (loss.ended == "plateau" or crawling):
            how = "stopped falling" if loss.ended == "plateau" else "crawled to the epoch cap"
            return Verdict(False, "under-fitted", f"the training loss {how} at {final_train_loss:.4g}, well above "
                           f"the {reachable_train_loss:.4g} that the linear head alone reaches on the initial "
                           f"features: the optimiser stalled short of it; try another --lr or --head-lr (a rate too "
                           f"low crawls, one too high bounces), or --head-start probe")
    if steps < min_steps and loss.cuts == RATE_CUTS and loss.at_plateau():   # it settled, and waited for them
        return Verdict(False, "below-min-steps", f"ran {steps} optimiser steps, fewer than --min-steps {min_steps}: "
                       f"more --epochs")
    if loss.ended != "plateau":
        still = (f"its last window fell {fell[0]:.3g}, {fell[0] / fell[1]:.1%} of its fall so far" if fell and fell[1] > 0
                 else "too few epochs at its rate to tell")
        return Verdict(False, "still-falling", f"reached the epoch cap ({epochs}) before the training loss settled "
                       f"({still}; {loss.cuts} of {RATE_CUTS} rate cuts taken): more --epochs")
    verdict = Verdict(True, "converged", f"the training loss fell by less than {NEW_LOW:.0%} of its fall so far over "
                      f"{window} after {loss.cuts} rate cuts (from {loss.start:.4g} over the first window to "
                      f"{loss.windows()[1]:.4g})")
    trained = [row for row in history if row["epoch"] > 0]
    if trained:
        best = next(row for row in history if row["epoch"] == selected_epoch)
        last = trained[-1]
        if last["epoch"] != selected_epoch and last["val_loss"] > OVER_FITTED * best["val_loss"]:
            verdict.notes.append(f"over-fitting: the validation loss rose from {best['val_loss']:.4g} at epoch "
                                 f"{selected_epoch} to {last['val_loss']:.4g} at epoch {last['epoch']} while the "
                                 f"training loss fell; selection reports epoch {selected_epoch}")
    return verdict
