"""The loop itself: the resume state is written on a time interval and on signals, a run stopped anywhere,
mid-epoch included, resumes to the same result, and the head gets its own rate. When training stops and what
its verdict says: tests/test_convergence.py."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from clip_adapt import training
from clip_adapt.base import UserError
from clip_adapt.data import Split
from clip_adapt.training import TrainConfig, TrainingInterrupted, train


def noisy_task(n: int = 48, seed: int = 0) -> tuple[Split, Split]:
    """Two classes a linear model half-separates: validation loss improves, then stalls."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 6, generator=g)
    y = ((x[:, 0] + 1.5 * torch.randn(2 * n, generator=g)) > 0).long()
    return Split(x[:n], y[:n], []), Split(x[n:], y[n:], [])


class Head(torch.nn.Module):
    """A small model with dropout, so that resume must restore the random state as well as the weights."""

    def __init__(self, interrupt_at_step: int | None = None, interrupt_at_evaluation_batch: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(16, 2))
        self.interrupt_at_step, self.steps = interrupt_at_step, 0
        self.interrupt_at_evaluation_batch, self.evaluation_batches = interrupt_at_evaluation_batch, 0

    def forward(self, x):
        if self.training:
            self.steps += 1
            if self.steps == self.interrupt_at_step:   # as if the user pressed Ctrl-C or the scheduler sent SIGTERM
                signal.raise_signal(signal.SIGTERM)
        else:
            self.evaluation_batches += 1
            if self.evaluation_batches == self.interrupt_at_evaluation_batch:
                signal.raise_signal(signal.SIGTERM)
        return self.net(x)


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(epochs=60, patience=54, batch_size=8, lr=0.05, weight_decay=0.0, warmup_epochs=2, seed=0,
                  device=torch.device("cpu"), checkpoint_dir=tmp_path, augment=False)
    return TrainConfig(**{**values, **overrides})


def test_a_run_stopped_by_the_epoch_cap_while_improving_says_it_did_not_converge(tmp_path):
    train_split, val = noisy_task()
    result = train(Head(), train_split, val, val, config(tmp_path, epochs=3, lr=1e-3))
    assert result.epochs_run == 3 and not result.converged
    assert result.verdict == "still-falling" and "reached the epoch cap (3)" in result.convergence_reason


def test_no_early_stop_before_the_minimum_number_of_steps(tmp_path):
    train_split, val = noisy_task()
    free = train(Head(), train_split, val, val, config(tmp_path / "free", patience=6, epochs=200))
    held = train(Head(), train_split, val, val, config(tmp_path / "held", patience=6, epochs=200,
                                                       min_steps=(free.epochs_run + 20) * 6))
    assert free.epochs_run < 200 and held.epochs_run >= free.epochs_run + 20


def test_resume_state_is_written_on_the_interval_not_every_epoch(tmp_path, monkeypatch):
    writes = []
    real_save = training.atomic_save
    monkeypatch.setattr(training, "atomic_save", lambda path, save: (writes.append(path.name), real_save(path, save)))
    train_split, val = noisy_task()
    train(Head(), train_split, val, val, config(tmp_path, epochs=6, patience=6, checkpoint_every=3600))
    assert writes == ["last.pt", "best.safetensors"]   # once at the end, and the best weights once
    writes.clear()
    train(Head(), train_split, val, val, config(tmp_path / "often", epochs=3, patience=3, checkpoint_every=0))
    assert writes.count("last.pt") == 3 * 6 + 3   # after every step and every epoch


def test_resume_state_holds_the_best_weights_once(tmp_path):
    train_split, val = noisy_task()
    result = train(Head(), train_split, val, val, config(tmp_path, epochs=2, patience=2))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    best = load_file(tmp_path / "best.safetensors")
    if result.best_epoch == 2:   # the last epoch was the best: last.pt's weights are the best ones
        assert state["progress"]["best_state"] is None
    for name, value in best.items():
        assert torch.equal(value, state["model"][name] if state["progress"]["best_state"] is None
                           else state["progress"]["best_state"][name])


# Mid-epoch, the last step of an epoch, a later epoch; and in epoch 1's validation pass (3 batches of 16, after
# epoch 0's 9 over train, validation and test), which stops before its next batch rather than after both
# evaluation passes.
@pytest.mark.parametrize("step, evaluation_batch", [(3, None), (6, None), (14, None), (None, 11)])
def test_sigterm_mid_epoch_writes_a_resume_state_that_continues_exactly(tmp_path, step, evaluation_batch):
    train_split, val = noisy_task()
    torch.manual_seed(0)
    whole = train(Head(), train_split, val, val, config(tmp_path / "whole", epochs=8, patience=8))

    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped in epoch .* --resume") as stopped:
        train(Head(step, evaluation_batch), train_split, val, val,
              config(tmp_path / "parts", epochs=8, patience=8, checkpoint_every=3600))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers are given back
    state = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"] - 1) * 6 + state["progress"]["batch"] == (step or 6)
    assert len(state["progress"]["history"]) == state["progress"]["epoch"]   # epoch 0 on, no row for the stopped one
    assert ("during its evaluation" in str(stopped.value)) == bool(evaluation_batch)

    torch.manual_seed(123)   # whatever the process did in between
    model = Head()
    resumed = train(model, train_split, val, val, config(tmp_path / "parts", epochs=8, patience=8, resume=True))
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    assert (resumed.converged, resumed.convergence_reason) == (whole.converged, whole.convergence_reason)


def test_an_old_resume_state_is_refused_with_a_message(tmp_path):
    torch.save({"epoch": 3, "model": {}}, tmp_path / "last.pt")
    train_split, val = noisy_task()
    with pytest.raises(UserError, match="older version.*without --resume"):
        train(Head(), train_split, val, val, config(tmp_path, resume=True))


class Prompted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_head_lr_gives_the_head_its_own_rate(tmp_path):
    train_split, val = noisy_task()
    model = Prompted()
    head, body = model.head.weight.detach().clone(), model.body.weight.detach().clone()
    train(model, train_split, val, val, config(tmp_path, epochs=2, head_lr=0.0, weight_decay=0.01))
    assert torch.equal(model.head.weight, head)   # a rate of 0: not one step, weight decay included
    assert not torch.equal(model.body.weight, body)
