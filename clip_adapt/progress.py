"""Progress of long steps, in one place: a tqdm bar on a terminal, one line per step when the output goes to a
file or a pipe (a log, CI), nothing under --quiet."""

import sys
import time

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def on_terminal() -> bool:
    return sys.stderr.isatty()   # where tqdm draws its bars


def say(message: str) -> None:
    """A line of progress (an epoch's result): printed unless quiet, without breaking a bar under way."""
    if not _quiet:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress_bar(iterable, desc: str, total: int | None = None, unit: str = "batch", initial: int = 0,
                 transient: bool = False):
    """Iterates over `iterable` showing where a long step stands.

    On a terminal: a tqdm bar. Elsewhere: no bar per batch but one line when the step ends, with its count and
    time. `transient` steps (the evaluation passes of every epoch) vanish from a terminal when done and print no
    line elsewhere: the epoch's own line follows them at once. Under --quiet: nothing."""
    if _quiet or (transient and not on_terminal()):
        return iter(iterable)
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=not transient)
    return _one_line(iterable, desc, total, unit, initial)


def _one_line(iterable, desc: str, total: int | None, unit: str, initial: int):
    started, done = time.monotonic(), initial
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    for item in iterable:
        yield item
        done += 1
    of = f"/{total}" if total is not None and total != done else ""
    units = unit if done == 1 else unit + ("es" if unit.endswith("ch") else "s")
    # stdout, like the run's other news: stderr stays for errors, one line each.
    print(f"{desc}: {done}{of} {units} in {time.monotonic() - started:.1f} s", flush=True)
