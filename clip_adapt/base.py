"""The ground floor every other module may import, and which imports none of them: the one-line user error,
files written atomically, and the one way to ask whether this is the main process."""

import csv
import io
import json
import os
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, never as a traceback."""


def atomic_save(path: Path, save) -> None:
    """save(temporary_path), then rename: a reader never finds a half-written file, even after a kill."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save(temporary)
    os.replace(temporary, path)


def write_text(path: Path, text: str) -> None:
    atomic_save(path, lambda p: Path(p).write_text(text))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def is_main_process() -> bool:
    """False in the second and later processes of an `accelerate launch` (the launcher sets RANK for each).
    The one question every module asks before printing or writing a file: under accelerate the state's
    process index equals RANK, so the scripts, the training loop and the runners agree without an accelerator
    in hand."""
    return process_index() == 0


def process_index() -> int:
    """This process's rank in an `accelerate launch` (0 when run plainly)."""
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes an `accelerate launch` started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
