"""Base-to-new generalisation (CoCoOp's protocol: Zhou et al., CVPR 2022; MaPLe's and BiomedCoOp's too): a method
trains on the first half of the classes (the base classes) and is then tested twice, on the base classes' test
images among the base classes, and on the other half's (the new classes, never seen in training) among the new
classes, by the same trained parts rebuilt around the new class names. The harmonic mean of the two accuracies
is the protocol's single figure.

As in the reference (Dassl's DatasetBase.subsample_classes, used by CoOp's and CoCoOp's base2new scripts): the
classes in label order, the first ceil(n / 2) base, the rest new. Only methods that classify by class text can
name a class they never trained on; a script declares OPEN_VOCABULARY = True when every part it trains carries
over to other class names (open_vocabulary_scripts). On this project's 4 classes the table is 2 classes against 2:
a small table, whose new-class accuracy rests on one pair of names.
"""

import argparse
import dataclasses
import math

import numpy as np
import torch

from clip_adapt.base import UserError, is_main_process
from clip_adapt.data import MRIData, Split


@dataclasses.dataclass
class NewClasses:
    """What the new-class half of the test is scored on: the names, and their test images with labels 0..n-1."""
    class_names: list[str]
    test: Split
    base_class_names: list[str]


def split_classes(class_names: list[str]) -> tuple[list[int], list[int]]:
    """(base, new) class indices: the first ceil(n / 2) classes in label order, then the rest."""
    if len(class_names) < 2:
        raise UserError(f"--base-to-new needs at least 2 classes to split into base and new, not {len(class_names)}")
    base = math.ceil(len(class_names) / 2)
    return list(range(base)), list(range(base, len(class_names)))


def only_classes(split: Split, classes: list[int]) -> Split:
    """The split's images of `classes`, relabelled by their place in `classes`."""
    labels = split.labels.cpu()
    keep = torch.nonzero(torch.isin(labels, torch.tensor(classes)), as_tuple=True)[0]
    kept = split.subset(keep)
    renumber = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    renumber[torch.tensor(classes)] = torch.arange(len(classes))
    return dataclasses.replace(kept, labels=renumber[kept.labels.cpu()].to(kept.labels.device))


def split_data(data: MRIData) -> tuple[MRIData, NewClasses]:
    """The data a base-to-new run trains and is first tested on (the base classes only: train, validation and
    test), and the new classes' test images."""
    base, new = split_classes(data.class_names)
    groups = None
    if data.copy_groups is not None:
        train_and_val = torch.cat([data.train.labels.cpu(), data.val.labels.cpu()]).numpy()
        groups = data.copy_groups[np.isin(train_and_val, base)]
    base_data = dataclasses.replace(data, class_names=[data.class_names[i] for i in base],
                                    train=only_classes(data.train, base), val=only_classes(data.val, base),
                                    test=only_classes(data.test, base), copy_groups=groups)
    return base_data, NewClasses([data.class_names[i] for i in new], only_classes(data.test, new),
                                 base_data.class_names)


def check_open_vocabulary(script_name: str, module) -> None:
    """Before anything loads: a method whose head is tied to the training classes cannot be tested on new ones."""
    if not getattr(module, "OPEN_VOCABULARY", False):
        raise UserError(f"{script_name} classifies with parts tied to its training classes (a linear head or a "
                        f"cache of labels), so it cannot name a new class: --base-to-new needs a method that "
                        f"classifies by class text: {', '.join(s.name for s in open_vocabulary_scripts())}")


def open_vocabulary_scripts():
    """The classification scripts that declare OPEN_VOCABULARY, from the registry."""
    from clip_adapt.runner import classification_scripts
    return [s for s in classification_scripts() if getattr(s.module, "OPEN_VOCABULARY", False)]


def choose_experiments(experiments: list[str], chosen: bool) -> list[str]:
    """run_all_experiments.py --base-to-new: of every experiment, those that can name a new class (saying which
    are left out); of experiments named with --experiments, all, or one line naming those that cannot."""
    able = {s.name for s in open_vocabulary_scripts()}
    unable = [name for name in experiments if name not in able]
    if chosen and unable:
        raise UserError(f"--base-to-new: {', '.join(unable)} cannot name a class it did not train on (a head or a "
                        f"cache tied to the training classes); choose from {', '.join(sorted(able))}")
    if unable and is_main_process():   # under accelerate launch every process chooses; one says so
        print(f"--base-to-new: running {', '.join(n for n in experiments if n in able)}; leaving out "
              f"{', '.join(unable)} (their heads or caches are tied to the training classes)")
    return [name for name in experiments if name in able]


def carried_over(trained: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    """`fresh` (the same method built for the new classes) with every trained tensor of `trained` copied in: the
    same names and shapes, or the method does not carry over."""
    learned = {name: p for name, p in trained.named_parameters() if p.requires_grad}
    target = dict(fresh.named_parameters())
    for name, tensor in learned.items():
        if name not in target or target[name].shape != tensor.shape:
            raise UserError(f"--base-to-new: the trained '{name}' {tuple(tensor.shape)} has no place of that shape "
                            f"in the model built for the new classes, so it cannot carry over")
        with torch.no_grad():
            target[name].copy_(tensor)
    return fresh


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def record(base_accuracy: float, new_accuracy: float, new: NewClasses, base_test_images: int) -> dict:
    """What metrics.json records under base_to_new."""
    return {"base_classes": new.base_class_names, "new_classes": new.class_names,
            "base_accuracy": base_accuracy, "new_accuracy": new_accuracy,
            "harmonic_mean": harmonic_mean(base_accuracy, new_accuracy),
            "base_test_images": base_test_images, "new_test_images": len(new.test),
            "note": f"{len(new.base_class_names)} base classes against {len(new.class_names)} new: a small table"}


def describe(scores: dict) -> str:
    return (f"base-to-new: base {scores['base_accuracy']:.4f} ({', '.join(scores['base_classes'])}), new "
            f"{scores['new_accuracy']:.4f} ({', '.join(scores['new_classes'])}), harmonic mean "
            f"{scores['harmonic_mean']:.4f} ({scores['note']})")


def add_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--base-to-new", action="store_true",
                       help="CoCoOp's base-to-new protocol: train on the first half of the classes, test on them and "
                            "on the other half (never trained on), report both and their harmonic mean "
                            "(methods that classify by class text only)")


def summary_section(runs: dict[str, list[dict]]) -> str:
    """summary.md's base-to-new table: per experiment, the mean over its runs of each accuracy and of the harmonic
    mean; "" when no run used --base-to-new."""
    rows = {name: [m["base_to_new"] for m in metrics if "base_to_new" in m] for name, metrics in runs.items()}
    rows = {name: scores for name, scores in rows.items() if scores}
    if not rows:
        return ""
    first = next(iter(rows.values()))[0]
    lines = ["\n## Base-to-new (CoCoOp's protocol)\n",
             f"Trained on {', '.join(first['base_classes'])}; tested on them, and on {', '.join(first['new_classes'])} "
             f"(never trained on) by the same trained parts; {first['note']}, whose new-class figure rests on "
             f"one set of names. Means over runs.\n",
             "| experiment | base accuracy | new accuracy | harmonic mean | runs |", "|---|---|---|---|---|"]
    for name, scores in rows.items():
        mean = {key: float(np.mean([s[key] for s in scores])) for key in ("base_accuracy", "new_accuracy",
                                                                         "harmonic_mean")}
        lines.append(f"| {name} | {mean['base_accuracy']:.3f} | {mean['new_accuracy']:.3f} | "
                     f"{mean['harmonic_mean']:.3f} | {len(scores)} |")
    return "\n".join(lines) + "\n"
