"""The ground floor every other module may import, and which imports none of them: the one-line user error,
files written atomically, the one way to ask whether this is the main process, and how a model names its
trainable parts."""

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, never as a traceback."""


def atomic_save(path: Path, save) -> None:
    """save(temporary_path), then rename: a reader never finds a half-written file, even after a kill. The
    temporary name is the process's own: runs side by side (--max-parallel) may write one shared file (the output
    folder's contact sheet), the last rename winning, never one process's rename taking the other's file."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
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


@dataclass
class Part:
    """One trainable part of a method's model, as its model class names it in parts(): the prompts, the text
    context, an adapter, a prefix, LoRA, a head, the backbone. tests/test_part_contract.py checks every part of
    every experiment script's model by this description: each of its tensors gets gradients, perturbing it
    changes the output, and, where declared, it starts as the identity and its removal gives the base model back.

    tensors: the part's trainable tensors by name. removed: for a part that can be taken out, a function giving
    a context manager in which the model computes exactly as if the part had never been added (its hooks pass
    through, peft's adapter is disabled), not with the part zeroed. identity_start: the part, as built, leaves
    the model's output what it is without the part (LoRA's zero B, the bottleneck adapter's zero
    up-projection)."""
    name: str
    tensors: dict
    removed: Callable | None = None
    identity_start: bool = False
