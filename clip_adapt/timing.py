"""Where a run's time goes: wall-clock seconds per phase, written to metrics.json as `timings`.

Phases nest, and each second counts once, in the innermost phase open: an evaluation pass inside the training
loop counts as evaluation, not training. common.start resets the tally and finish reads it. On a GPU the
clock is read on the host, so a phase ends when the host has queued its work; the phases here each end on a
read-back (a loss, the logits, a file), which waits for the device.
"""

import contextlib
import time

PHASES = ("startup", "loading", "copy_check", "training", "evaluation", "checkpoints", "reports")

_seconds: dict[str, float] = {}
_open: list[str] = []
_since = 0.0


def reset() -> None:
    _seconds.clear()
    _open.clear()


def _charge_open_phase(now: float) -> None:
    global _since
    if _open:
        _seconds[_open[-1]] = _seconds.get(_open[-1], 0.0) + now - _since
    _since = now


@contextlib.contextmanager
def phase(name: str):
    _charge_open_phase(time.perf_counter())
    _open.append(name)
    try:
        yield
    finally:
        _charge_open_phase(time.perf_counter())
        _open.pop()


def seconds() -> dict[str, float]:
    """Seconds per phase so far, rounded to milliseconds, in PHASES order."""
    return {name: round(_seconds.get(name, 0.0), 3) for name in PHASES}


def current() -> str | None:
    """The innermost phase open now, or None outside every phase."""
    return _open[-1] if _open else None
