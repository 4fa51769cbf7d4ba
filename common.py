"""What every experiment script shares: the command line, starting a run, and finishing it with its outputs.

The library lives in the package clip_adapt/, one module per subject: base (errors, atomic writes), data (images
in), copies (exact and near copies), models (CLIP and the classifiers), prompts, adapters (E7's peft adapters),
training (the loop), reporting (files out), report_page (report.html), progress (bars), runner (finding and
running the experiment scripts).

An experiment script (E<number>_<name>.py at the root) declares LEARNING_RATE, STUDY_ACCURACY, add_flags(parser)
and build_model(clip, tokenizer, class_names, args); its main() parses with
add_flags(common.parser(__doc__, LEARNING_RATE)), then start(), build_model, train and finish().
"""

import argparse
import atexit
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip_adapt import timing
from clip_adapt.backbone import backbone
from clip_adapt.base import UserError, is_main_process, write_json
from clip_adapt.copies import describe_copies
from clip_adapt import base_to_new, hub, report_page
from clip_adapt.data import DEFAULT_DATA, SAMPLE_DATA, MRIData, check_data_early, is_local, load_data, load_source
from clip_adapt.models import (DEFAULT_MODEL, IMAGE_PROCESSORS, TINY_CLIP, ZERO_SHOT_TEMPLATES, TextHead,
                               check_model, check_torchvision, count_params, fingerprint, is_random, load_clip,
                               load_templates, model_dims, weights_identity, weights_of)
from clip_adapt.progress import set_quiet
from clip_adapt.probe import HEAD_STARTS
from clip_adapt.prompts import PROMPT_ENTRIES, PROMPT_INITS, PROMPT_POSITIONS
from clip_adapt.reporting import (NOISE_LEVELS, WithPixelNoise, auroc, bootstrap_interval, classification_metrics,
                                  code_version, library_versions, mark_random_weights, plot_closest_pairs,
                                  write_report)
from clip_adapt.shots import check_shots, coop_epochs, split_record
from clip_adapt.training import (DEFAULT_EPOCHS, EPOCH_CAP_WINDOWS, PRECISIONS, TrainConfig, TrainingInterrupted, TrainingStopped, TrainResult,
                                 cached_embeddings, precision_used, predict_everywhere, summary_writer_class, train)

SMOKE_EPOCHS, SMOKE_PATIENCE = 3, 3
PROCESS_STARTED = time.time()   # a contact sheet older than this is an earlier process's (write_contact_sheet)
CONTACT_SHEET = report_page.CONTACT_SHEET[0]   # in <output-dir>/, the data's: one per folder
# The convergence test's window counts optimiser steps, not epochs: an epoch of a small data set is a few steps.
# 100 and 200 steps gave the same accuracies and verdicts on the known-answer task family, 100 in half the time
# (docs/known-answer.md).
PATIENCE_STEPS, MIN_STEPS = 100, 300
# --tune: VPT searched 10 rates x 4 weight decays per task on validation; here the rates span three decades
# around each method's own default (AdamW's scale, not VPT's SGD one), narrowed by successive halving from
# TUNE_FIRST_EPOCHS up to TUNE_EPOCHS (never more than --epochs).
TUNE_LR_FACTORS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TUNE_WEIGHT_DECAYS = (0.01, 0.001, 0.0001, 0.0)
TUNE_FIRST_EPOCHS, TUNE_EPOCHS = 5, 40
# Flags that change where or how fast a run goes, or only what its final evaluation adds, not what it trains:
# a resumed run may differ in them.
NOT_SETTINGS = {"resume", "stop_after_epochs", "output_dir", "device", "compile", "checkpoint_every", "quiet",
                "report_to", "save_merged", "noise_levels", "threads"}   # noise levels: the final evaluation only


class HelpFormatter(argparse.HelpFormatter):
    """--help states each flag's default once: argparse's value, appended, where it is the default; a flag whose
    default is decided later (None, resolved by resolve_defaults) says it in its own help as "[default: …]"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("[default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default in ("", [], argparse.SUPPRESS)):   # 0 is a default; False: a switch left off
            return text
        value = (" ".join(map(str, action.default)) if isinstance(action.default, (list, tuple))
                 else str(action.default))
        return f"{text} [default: {value.replace('%', '%%')}]"


def parser(description: str, lr: float | None, warmup_epochs: float = 0.0, sweep: bool = False
           ) -> argparse.ArgumentParser:
    """The flags every experiment takes, in groups as --help shows them; a script adds its own (add_flags).
    sweep: for run_all_experiments.py, whose --shots takes several K (its own flag)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", help=f"Hugging Face dataset id or local folder with train/<class>/* and "
                                     f"test/<class>/* [default: {DEFAULT_DATA}; with --smoke: the 40-image sample in "
                                     f"{SAMPLE_DATA.relative_to(SAMPLE_DATA.parents[1]).as_posix()}]")
    data.add_argument("--image-column", help="the dataset's image column [default: its only Image column]")
    data.add_argument("--label-column", help="the dataset's label column [default: its only ClassLabel column]")
    data.add_argument("--test-split", default="test", help="the dataset's held-out split; a split named "
                                                           "'validation' is used for validation when present")
    data.add_argument("--class-names", nargs="+", help="readable class names in label order: for integer labels "
                                                       "without names, or to replace the dataset's")
    data.add_argument("--val-fraction", type=float, default=0.15, help="share of train held out for validation")
    data.add_argument("--split-seed", type=int, default=0, help="draws the validation split; fixed by default, so "
                                                                "that --seed varies only initialisation and order")
    data.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images and list them")
    data.add_argument("--duplicates", default="near", choices=["exact", "near"],
                      help="exact: identical decoded pixels only; near: also re-encoded, resized, re-contrasted, "
                           "cropped or shifted copies (clip_adapt/copies.py)")
    if not sweep:
        add_shots_flag(data, nargs=None)
    data.add_argument("--split-file", metavar="FILE",
                      help="train, val and test lists of [relative path, label, class name] in CoOp's JSON format "
                           "(e.g. BiomedCoOp's split_BTMRI.json), the paths relative to --data; replaces the "
                           "folder's own splits. Every run writes the split it used as split.json in this format")
    base_to_new.add_flag(data)
    data.add_argument("--drop-test-duplicates", action="store_true",
                      help="remove the train members of every cluster of copies that reaches into test")

    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"hub id or local directory saved with save_pretrained, or random:vit-b16 "
                                       f"(also random:vit-b32, random:vit-l14, random:vit-l14-336): that "
                                       f"architecture with random weights, the real cost without a download; "
                                       f"or an open_clip model: hf-hub:<repo> (BiomedCLIP: hf-hub:microsoft/"
                                       f"BiomedCLIP-PubMedBERT_256-vit_base_patch16_224), open_clip:<arch>/<tag>, "
                                       f"or a folder with open_clip_config.json (docs/any-clip.md) "
                                       f"[default: {DEFAULT_MODEL}; with --smoke: a tiny random CLIP]")
    model.add_argument("--image-processor", default="pil", choices=IMAGE_PROCESSORS,
                       help="CLIP's preprocessing by PIL, or by torchvision (needs a torchvision built for your "
                            "torch; measured in docs/speed-and-memory.md)")
    model.add_argument("--templates", metavar="FILE", help="class-text templates, one per line with {} for the "
                       "class name, or 'study' for the built-in template study: E1's zero-shot classifier and the "
                       "--head clip of E3, E4 and E7 (the other scripts use no class text) [default: the MRI "
                       "templates]")

    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, help=f"most epochs to train: a cap, reported as such; training "
                              f"ends when its loss converges [default: the larger of {DEFAULT_EPOCHS} and "
                              f"{EPOCH_CAP_WINDOWS} patience windows; with --smoke: {SMOKE_EPOCHS}]")
    optimisation.add_argument("--patience", type=int, help="optimiser steps per window of the convergence test: "
                              "the training loss has converged when a window's mean falls by less than 1%% of its "
                              "fall so far, after two rate cuts (docs/how-a-run-works.md) "
                              f"[default: {PATIENCE_STEPS}; with --smoke: {SMOKE_PATIENCE}]")
    optimisation.add_argument("--min-steps", type=int, help=f"never stop early before this many optimiser steps "
                                                            f"[default: {MIN_STEPS}; with --smoke: 0]")
    optimisation.add_argument("--schedule", default="converge", choices=["converge", "coop"],
                              help="converge: train until the loss converges, report the epoch of lowest validation "
                                   "loss (docs/how-a-run-works.md); coop: CoOp's fixed schedule for --shots K (50 "
                                   "epochs at 1 shot, 100 at 2 and 4, 200 at 8 and 16, a cosine rate, the last epoch "
                                   "reported), for comparison with its tables; --epochs overrides its epochs")
    optimisation.add_argument("--batch-size", type=int, default=32,
                              help="images per optimiser step (with several processes: in all, split between them); "
                                   "evaluation runs twice as many at once")
    optimisation.add_argument("--lr", type=float, default=lr,
                              help="peak learning rate (AdamW; warm-up, then cut when the training loss stops "
                                   "falling)" + ("" if lr is not None else " [default: each experiment's own]" if sweep
                                                 else " [default: none, nothing is trained]"))
    optimisation.add_argument("--head-lr", type=float, help="the linear head's own peak learning rate where a "
                              "method trains a head and prompts or adapters (E3, E4, E7) [default: --lr]")
    optimisation.add_argument("--head-start", choices=HEAD_STARTS, default="probe",
                              help="a linear head's start: probe: standardised input and the convex fit of the head "
                                   "alone on the initial features (linear probing, then fine-tuning); standardise: "
                                   "standardised input, the head from its usual random start; none: neither")
    optimisation.add_argument("--weight-decay", type=float, default=0.01,
                              help="AdamW's decoupled weight decay on the trained parameters")
    optimisation.add_argument("--warmup-epochs", type=float, default=warmup_epochs,
                              help="epochs (fractions allowed) of linear warm-up to the peak rate; 0: none")
    optimisation.add_argument("--tune", action="store_true",
                              help="first choose --lr and --weight-decay on the validation split: a grid of "
                                   f"{len(TUNE_LR_FACTORS)} rates (the default x {TUNE_LR_FACTORS[0]:g} to "
                                   f"{TUNE_LR_FACTORS[-1]:g}) x {len(TUNE_WEIGHT_DECAYS)} weight decays "
                                   f"{TUNE_WEIGHT_DECAYS}, narrowed by successive halving from {TUNE_FIRST_EPOCHS} "
                                   f"to {TUNE_EPOCHS} epochs; the lowest validation loss wins")
    optimisation.add_argument("--seed", type=int, default=0, help="initial weights, batch order and augmentation "
                                                                  "(the validation split: --split-seed)")
    optimisation.add_argument("--precision", default="auto", choices=PRECISIONS,
                              help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU runs the GPU's precision "
                                   "path")

    control = p.add_argument_group("run control")
    control.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="auto: the GPU when PyTorch sees one, else the CPU")
    control.add_argument("--smoke", action="store_true", help="tiny random CLIP and the shipped image sample: "
                                                              "the whole pipeline in seconds on a CPU, no download")
    control.add_argument("--resume", action="store_true",
                         help="continue an interrupted run from where it stopped (mid-epoch included)")
    control.add_argument("--stop-after-epochs", type=int, help="stop after this many epochs of this invocation "
                                                               "(for job time limits); --resume continues")
    control.add_argument("--checkpoint-every", type=float, default=300, metavar="SECONDS",
                         help="write the resume state this often (also on --stop-after-epochs, Ctrl-C, SIGTERM and "
                              "at the end); 0: after every step")
    control.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    control.add_argument("--threads", type=int, help="CPU threads torch may use [default: torch's, one per core]; "
                                                     "on a busy or shared machine, fewer (even 1) can be many "
                                                     "times faster")

    outputs = p.add_argument_group("outputs")
    outputs.add_argument("--output-dir", default="outputs", help="each experiment writes to "
                                                                 "<output-dir>/<script name>/")
    outputs.add_argument("--noise-levels", type=float, nargs="+", default=list(NOISE_LEVELS),
                         help="Gaussian noise sigmas (pixels in [0, 1]) for the robustness check")
    outputs.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines; results and "
                                                              "errors only")
    outputs.add_argument("--report-to", default="none", choices=["none", "tensorboard"],
                         help="also log per-epoch losses, accuracies and learning rate for TensorBoard, in "
                              "<output-dir>/<script name>/tensorboard (needs the optional tensorboard package)")
    return p


def describe_default(parser: argparse.ArgumentParser, dest: str, default: str) -> None:
    """A flag whose default a script decides after parsing (set to None) says in --help what it will be."""
    action = next(a for a in parser._actions if a.dest == dest)
    action.help = f"{action.help.split(' [default:')[0]} [default: {default}]"


def add_shots_flag(group, nargs: str | None) -> None:
    """--shots K for a script; run_all_experiments.py's takes several (nargs "+"), a sweep over K."""
    group.add_argument("--shots", type=int, metavar="K", nargs=nargs,
                       help="K training images per class, drawn with --split-seed as CoOp draws its few-shot sets, "
                            "and min(K, 4) validation images per class from the dataset's validation split or else "
                            "from the training images left; the test split stays whole; copies never straddle "
                            "them (docs/k-shot.md). --val-fraction is then unused" + (
                                "; several K: the data-efficiency sweep, each K and seed a run, seed s drawing "
                                "its own shots (--split-seed s)" if nargs else ""))


def add_prompt_flags(parser: argparse.ArgumentParser, num_prompts_help: str = "N, learnable prompt tokens"
                     ) -> argparse._ArgumentGroup:
    """The token-prompt flags E3, E4 and E5 share (see clip_adapt.prompts.VisualPrompts for what each does), in a
    "prompts" group that the script may add its own prompt flags to."""
    p = parser.add_argument_group("prompts")
    p.add_argument("--num-prompts", type=int, default=1, help=num_prompts_help)
    p.add_argument("--prompt-position", default="front", choices=PROMPT_POSITIONS,
                   help="front: right after the class token (VPT); back: after the last patch token (MaPLe). "
                        "The same function, up to float rounding")
    p.add_argument("--prompt-entry", default="pre-ln", choices=PROMPT_ENTRIES,
                   help="layer 0's prompts go in before CLIP's pre-layernorm (MaPLe, IVLP) or after it, at the "
                        "encoder input; deeper layers' prompts always enter at the layer input")
    p.add_argument("--prompt-init", default="normal", choices=PROMPT_INITS,
                   help="normal: N(0, 0.02) as MaPLe and IVLP; xavier: VPT's uniform bound")
    p.add_argument("--prompt-dropout", type=float, default=0.0,
                   help="dropout on the prompt tokens, a fresh mask per image (VPT); in [0, 1)")
    return p


def add_head_flag(group: argparse._ArgumentGroup, default: str = "linear") -> None:
    group.add_argument("--head", choices=["clip", "linear"],
                       help=f"clip: CLIP's frozen text classifier from E1's templates (--templates), which learns "
                            f"nothing, so that only what the method adds is credited; linear: a trained linear "
                            f"head [default: {default}]")


def text_head(clip, tokenizer, class_names: list[str], args: argparse.Namespace, head: str) -> TextHead | None:
    """CLIP's text classifier as a frozen head (--head clip), from the templates E1 uses; None for a linear head."""
    if head != "clip":
        return None
    return TextHead(clip, tokenizer, class_names, class_templates(args, clip))


def class_templates(args: argparse.Namespace, clip=None) -> tuple[str, ...]:
    """The class-text templates of E1's zero-shot classifier (--templates, else the model's own where it has some,
    BiomedCLIP's, else the MRI templates), for the methods that classify by CLIP's text embeddings."""
    if args.templates:
        return load_templates(args.templates)
    return (backbone(clip).templates if clip is not None else None) or ZERO_SHOT_TEMPLATES


def prompt_options(args: argparse.Namespace) -> dict:
    """The VisualPrompts keyword arguments chosen on the command line."""
    return {"position": args.prompt_position, "entry": args.prompt_entry, "init": args.prompt_init}


@dataclass
class Experiment:
    name: str
    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    clip: torch.nn.Module
    image_processor: object
    tokenizer: object
    data: MRIData
    started: float
    accelerator: object = None   # accelerate.Accelerator; several processes under `accelerate launch`
    model_identity: dict | None = None   # the loaded weights' hub revision or fingerprint (weights_identity)
    new_classes: base_to_new.NewClasses | None = None   # --base-to-new: the classes held out of training

    @property
    def cache_dir(self) -> Path:
        return Path(self.args.output_dir) / "cache"

    def train_config(self, augment: bool = True) -> TrainConfig:
        return train_config(self.args, self.device, self.out_dir, augment, self.accelerator)

    def maybe_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(model) if self.args.compile else model


def train_config(a: argparse.Namespace, device: torch.device, out_dir: Path, augment: bool = True,
                 accelerator=None) -> TrainConfig:
    """The training loop's settings from the command line; checkpoints go to out_dir/checkpoint."""
    settings = {k: v for k, v in sorted(vars(a).items()) if k not in NOT_SETTINGS}
    return TrainConfig(epochs=a.epochs, patience=a.patience, batch_size=a.batch_size, lr=a.lr,
                       weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs, seed=a.seed,
                       device=device, checkpoint_dir=out_dir / "checkpoint", augment=augment,
                       resume=a.resume, stop_after_epochs=a.stop_after_epochs, precision=a.precision,
                       checkpoint_every=a.checkpoint_every, settings=settings, accelerator=accelerator,
                       min_steps=a.min_steps, head_lr=a.head_lr, head_start=a.head_start,
                       fixed_schedule=a.schedule == "coop",
                       tensorboard_dir=out_dir / "tensorboard" if a.report_to == "tensorboard" else None)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.model is None:   # a script that brings its own backbone names its defaults (E14: ResNet-18's)
        default, smoke = getattr(args, "default_models", (DEFAULT_MODEL, TINY_CLIP))
        args.model = smoke if args.smoke else default
    if args.data is None:
        args.data = str(SAMPLE_DATA) if args.smoke else DEFAULT_DATA
    if args.schedule == "coop":
        if not args.shots:
            raise UserError("--schedule coop is CoOp's schedule per number of shots: pass --shots K")
        if args.epochs is None and not isinstance(args.shots, list):   # run_all: each run sets its own K's
            args.epochs = coop_epochs(args.shots)
    if args.epochs is None and args.smoke and args.schedule != "coop":
        args.epochs = SMOKE_EPOCHS
    if args.patience is None:
        args.patience = SMOKE_PATIENCE if args.smoke else PATIENCE_STEPS
    if args.min_steps is None:
        args.min_steps = 0 if args.smoke else MIN_STEPS

    def flag(name):
        return "--" + name.replace("_", "-")
    for name in ("epochs", "patience", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"{flag(name)} must be at least 1")
    for name in ("num_prompts", "num_text_prompts", "weight_decay", "min_steps"):
        if getattr(args, name, 0) < 0:
            raise UserError(f"{flag(name)} must not be negative")
    if args.report_to == "tensorboard":
        summary_writer_class()   # missing tensorboard: say so now, not after the data is read
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.checkpoint_every < 0:
        raise UserError("--checkpoint-every must not be negative")
    for name in ("lr", "head_lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"{flag(name)} must be positive")
    if not 0 <= getattr(args, "prompt_dropout", 0) < 1:
        raise UserError("--prompt-dropout must be in [0, 1)")
    check_shots(args.shots)
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    if args.templates:
        load_templates(args.templates)   # a bad file fails here, before the model and data load
    return args


def needs_hub(args: argparse.Namespace) -> bool:
    """Whether the data or the model may come from the Hugging Face hub (or its cache)."""
    return not is_local(args.data) or not (is_random(args.model) or Path(args.model).expanduser().exists())


def check_sources(args: argparse.Namespace) -> None:
    """The data and the model resolved once, before any experiment of a run starts (run_all_experiments.py, and a
    single script when offline): a wrong path, an unreachable hub or a missing cache is said within seconds, not
    once per experiment after the hub's retries, and every missing piece in the same run (one `error:` line
    each, with its fix), not one per attempt. A hub dataset is downloaded here (into the cache the experiments
    then read)."""
    def data():
        for shots in (args.shots if isinstance(args.shots, list) else [args.shots]):   # run_all: several K
            check_data_early(args.data, shots, args.split_file)
        if not is_local(args.data):
            load_source(args.data, args.image_column, args.label_column, args.test_split, args.class_names)

    def model():
        check_model(args.model)
        if args.image_processor == "fast":
            check_torchvision()

    if needs_hub(args):
        hub.notice_offline()
    problems = []
    for check in (data, model):
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError("\nerror: ".join(problems))   # run() prints the first "error: "


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 leftovers outside autocast run on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


_created_folders: list[Path] = []   # by check_writable; run() removes those still empty when a run fails


def check_writable(folder: Path) -> None:
    """Fail before any training, not after an hour of it."""
    try:
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        _created_folders.extend(missing)   # deepest first: the order they can be removed in
        probe = folder / f".write-test-{os.getpid()}"   # processes of one accelerate launch probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to output folder {folder} ({error.strerror or error}); "
                        f"pass --output-dir a writable folder") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(device: torch.device):
    """Hugging Face accelerate's view of the launch: one process when run plainly, several (one per GPU, or gloo
    processes on a CPU) under `accelerate launch`. Without a GPU it must be told so, or it treats
    `--multi_gpu` processes as unrelated single ones. mixed_precision="no": --precision is a run's only
    autocast, whatever `accelerate config` or ACCELERATE_MIXED_PRECISION says."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    if accelerator.num_processes > 1:
        atexit.register(leave_process_group)   # once per process, however many experiments it runs
    return accelerator


def open_run(name: str, args: argparse.Namespace):
    """The flags checked, the output folder writable, the device and the processes chosen:
    (args, out_dir, device, accelerator). start() goes on to load CLIP and the classification data."""
    set_quiet(args.quiet)
    args = resolve_defaults(args)
    mark_random_weights(is_random(args.model))   # every figure of this run says so
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir) / name
    check_writable(out_dir)
    device = pick_device(args.device)
    accelerator = make_accelerator(device)
    if accelerator.num_processes > 1:
        device = accelerator.device   # this process's GPU
        set_quiet(args.quiet or not is_main_process())   # one progress log, not one per process
    return args, out_dir, device, accelerator


def start(name: str, args: argparse.Namespace, load_model=None) -> Experiment:
    """load_model: for a script that brings its own backbone, its loader in place of load_clip (the same
    arguments; it returns the backbone, its image processor, and None for the tokenizer)."""
    started = time.time()
    timing.reset()
    with timing.phase("startup"):
        return start_timed(name, args, started, load_model or load_clip)


def start_timed(name: str, args: argparse.Namespace, started: float, load_model=load_clip) -> Experiment:
    args, out_dir, device, accelerator = open_run(name, args)
    if getattr(args, "base_to_new", False):
        from clip_adapt.runner import script_named
        base_to_new.check_open_vocabulary(name, script_named(name).module)
    check_data_early(args.data, args.shots, args.split_file)
    if needs_hub(args):
        hub.notice_offline()
        if hub.offline():   # from the cache alone, quick: every missing piece said in this one run
            check_sources(args)
    clip, image_processor, tokenizer = load_model(args.model, device, args.image_processor)
    identity = weights_identity(args.model, clip)   # before anything trains (E6 changes the tower)
    with timing.phase("loading"):
        data = load_data(args.data, image_processor, args.val_fraction, args.split_seed,
                         skip_bad_images=args.skip_bad_images, drop_test_duplicates=args.drop_test_duplicates,
                         image_column=args.image_column, label_column=args.label_column, test_split=args.test_split,
                         class_names=args.class_names, duplicates=args.duplicates, shots=args.shots,
                         split_file=args.split_file)
    if is_main_process():   # one log, not one per process
        print(f"{name}: {args.model} on {device}; data {args.data}: {len(data.train)} train / {len(data.val)} val / "
              f"{len(data.test)} test images; classes {', '.join(data.class_names)}")
        print(describe_copies(data.report))
        for key, what in (("skipped_images", "skipped unreadable images"),
                          ("dropped_train_duplicates", "dropped train copies (exact or near) of test images"),
                          ("train_copies_moved_to_val", "train copies of the dataset's own validation images, "
                                                        "moved to validation")):
            if data.report[key]:
                print(f"{what}: {', '.join(data.report[key])}")
    new_classes = None
    if getattr(args, "base_to_new", False):
        data, new_classes = base_to_new.split_data(data)
        new_classes.test = new_classes.test.to(device)
        if is_main_process():
            print(f"base-to-new: training on {', '.join(data.class_names)}; {', '.join(new_classes.class_names)} "
                  f"held out ({len(new_classes.test)} test images)")
    seed_everything(args.seed)   # the same initial weights whatever loading consumed
    return Experiment(name, args, device, out_dir, clip.to(device), image_processor, tokenizer, data.to(device),
                      started, accelerator, identity, new_classes)


def tune(exp: Experiment, build, augment: bool = True, splits: dict | None = None) -> dict:
    """With --tune, chooses --lr and --weight-decay on the validation split, then re-seeds, so that the run
    that follows equals a plain run given the chosen values. VPT's protocol searched 10 rates x 4 weight decays
    on validation; here the rates are the method's default times TUNE_LR_FACTORS and the decays
    TUNE_WEIGHT_DECAYS, narrowed by successive halving (Jamieson & Talwalkar, 2016): every point trains for
    TUNE_FIRST_EPOCHS, the better half by validation goes on to twice the budget, and so on up to TUNE_EPOCHS
    (never more than --epochs). Each point is a fresh run of `build(clip)` on a fresh copy of the CLIP from the
    same seed. A point is ranked by the rule training selects its epoch by: the lowest validation loss of any of
    its epochs. A point whose loss diverges (or becomes non-finite) is recorded and dropped. Test data steers
    nothing: the loop records it, and nothing here reads it. Returns what metrics.json records: every point
    of every rung, the choice and the seconds it took; without --tune, {}. splits: what the points train on, when
    not the images (train, val, test; E11's adapter trains on cached embeddings)."""
    args = exp.args
    if not args.tune:
        return {}
    started, rows = time.time(), []
    cap = min(args.epochs or TUNE_EPOCHS, TUNE_EPOCHS)
    points = [(args.lr * factor, weight_decay) for factor in TUNE_LR_FACTORS for weight_decay in TUNE_WEIGHT_DECAYS]
    budget = min(TUNE_FIRST_EPOCHS, cap)
    while True:
        rung = []
        for lr, weight_decay in points:
            point = argparse.Namespace(**{**vars(args), "lr": lr, "weight_decay": weight_decay, "epochs": budget,
                                          "resume": False, "stop_after_epochs": None, "report_to": "none"})
            clip = copy.deepcopy(exp.clip)   # every point starts from the same weights (random:<arch> too)
            seed_everything(args.seed)
            out_dir = exp.out_dir / "tune" / f"lr{lr:g}_wd{weight_decay:g}_e{budget}"
            row = {"lr": lr, "weight_decay": weight_decay, "epochs": budget}
            try:
                result = train(build(clip), *(exp.data.train, exp.data.val, exp.data.test) if splits is None
                               else (splits["train"], splits["val"], splits["test"]),
                               train_config(point, exp.device, out_dir, augment, exp.accelerator))
            except UserError as error:   # a non-finite loss: refuse_non_finite stopped it
                rung.append({**row, "diverged": True, "reason": str(error)})
                continue
            best = next(r for r in result.history if r["epoch"] == result.best_epoch)
            rung.append({**row, "diverged": result.verdict == "diverging", "val_loss": best["val_loss"],
                         "val_accuracy": best["val_accuracy"], "best_epoch": result.best_epoch,
                         "epochs_run": result.epochs_run})
        rows += rung
        ranked = sorted((r for r in rung if not r["diverged"]), key=lambda r: r["val_loss"])
        if not ranked:
            raise UserError(f"--tune: every grid point diverged at {budget} epochs (rates {args.lr * min(TUNE_LR_FACTORS):g}"
                            f" to {args.lr * max(TUNE_LR_FACTORS):g}): pass a lower --lr to centre the grid lower")
        if len(ranked) == 1 or budget >= cap:
            choice = ranked[0]
            break
        points = [(r["lr"], r["weight_decay"]) for r in ranked[:math.ceil(len(ranked) / 2)]]
        budget = min(2 * budget, cap)
    args.lr, args.weight_decay = choice["lr"], choice["weight_decay"]
    seed_everything(args.seed)   # the run that follows starts as a plain run with the chosen values would
    seconds = round(time.time() - started, 2)
    if is_main_process():
        print(f"tuned on validation: --lr {args.lr:g} --weight-decay {args.weight_decay:g} "
              f"({len(rows)} short runs by successive halving, {seconds:.1f} s)")
    return {"tune": {"grid": rows, "choice": {"lr": args.lr, "weight_decay": args.weight_decay},
                     "points": len(TUNE_LR_FACTORS) * len(TUNE_WEIGHT_DECAYS), "seconds": seconds}}


def build_and_train(exp: Experiment, build_model) -> tuple[torch.nn.Module, TrainResult, dict]:
    """A method trained end to end on the images: --tune's choice first (when asked), then the model the script's
    build_model(clip, tokenizer, class_names, args) makes, trained. Returns (model, the training's result, what
    metrics.json records of the tuning)."""
    args, data = exp.args, exp.data
    tuned = tune(exp, lambda clip: build_model(clip, exp.tokenizer, data.class_names, args))
    model = build_model(exp.clip, exp.tokenizer, data.class_names, args)
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    return model, result, tuned


def frozen_embeddings(exp: Experiment, model: torch.nn.Module, features: str = "projected") -> dict:
    """Each split with its image embeddings from the frozen tower (model.embed) as inputs, from the disk cache
    keyed by the tower's weights and the features (clip_adapt.training.cached_embeddings): E2, E9 and E11 share it."""
    return cached_embeddings(model.embed, exp.data.splits(), exp.cache_dir,
                             f"{fingerprint(model.vision, model.projection)}|{features}", 2 * exp.args.batch_size,
                             exp.device, exp.args.precision, write=is_main_process())


def zero_shot_history(scores: dict) -> list[dict]:
    return [{"epoch": 0, **{f"{split}_{metric}": scores[split][metric] for split in ("train", "val", "test")
                             for metric in ("loss", "accuracy")}, "lr": 0.0}]


def evaluate(exp: Experiment, model: torch.nn.Module, split_logits: dict | None) -> tuple[dict, list[dict]]:
    """Clean logits on every split (unless given), and test accuracy under each level of pixel noise."""
    args, data, device = exp.args, exp.data, exp.device
    eval_batch = 2 * args.batch_size
    if split_logits is None:
        split_logits = {name: predict_everywhere(model, split, eval_batch, device, args.precision,
                                                 exp.accelerator, desc=f"final evaluation ({name})")
                        for name, split in data.splits().items()}
    robustness = []
    for sigma in args.noise_levels:
        noisy = WithPixelNoise(model, sigma, exp.image_processor.image_mean, exp.image_processor.image_std, args.seed)
        logits = split_logits["test"] if sigma == 0 else predict_everywhere(
            noisy, data.test, eval_batch, device, args.precision, exp.accelerator,
            desc=f"robustness, noise sigma {sigma}", by_index=True)
        robustness.append({"sigma": sigma, **{f"test_{k}": v for k, v in
                                             classification_metrics(logits, data.test.labels).items()}})
    return split_logits, robustness


def finish(exp: Experiment, model: torch.nn.Module, result: TrainResult | None = None,
           split_logits: dict | None = None, **extra) -> dict:
    """Final evaluation of the selected model, noise robustness, and every output file.
    split_logits: already computed clean logits per split (E2 has them from its cached embeddings)."""
    args, data, device = exp.args, exp.data, exp.device
    with timing.phase("evaluation"):
        split_logits, robustness = evaluate(exp, model, split_logits)
    scores = {name: classification_metrics(split_logits[name], split.labels) for name, split in data.splits().items()}

    trainable, total = count_params(model, exp.clip)
    correct = (split_logits["test"].argmax(1) == data.test.labels.cpu()).numpy()
    report = data.report
    metrics = {
        "experiment": exp.name,
        **{f"{split}_{metric}": scores[split][metric] for split in ("train", "val", "test")
           for metric in ("accuracy", "loss")},
        **{f"test_{metric}": scores["test"][metric] for metric in ("macro_f1", "balanced_accuracy", "ece")},
        "test_accuracy_ci95": bootstrap_interval(correct, args.seed),
        **auroc_metrics(split_logits["test"], data.test.labels.cpu(), data.class_names, args.seed),
        "best_epoch": result.best_epoch if result else 0,
        "epochs_run": result.epochs_run if result else 0,
        # Convergence (of the training loss) and selection (of the reported epoch, on validation): apart.
        "converged": result.converged if result else True,
        "convergence": result.verdict if result else "nothing trained",
        "convergence_reason": result.convergence_reason if result else "nothing is trained",
        "convergence_notes": result.notes if result else [],
        "selection": result.selection if result else {},
        "head_start": result.head_start if result else {},
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "wall_time_s": round(time.time() - exp.started, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": args.model, "weights": weights_of(args.model), **provenance(exp), "data": args.data, "seed": args.seed,
        "split_seed": args.split_seed, "shots": args.shots, "split_file": args.split_file,
        "precision": precision_used(device, args.precision),   # what ran: "auto" resolved; accelerate adds none
        "num_processes": exp.accelerator.num_processes if exp.accelerator is not None else 1,
        "model_dims": extra.pop("model_dims", None) or model_dims(exp.clip),   # a backbone of its own: its dims
        "class_names": data.class_names,
        "num_images": report["num_images"],
        "train_test_duplicates": sum(len(g["test"]) for g in report["train_test_duplicates"]),
        "skipped_images": len(report["skipped_images"]),
        "dropped_train_duplicates": len(report["dropped_train_duplicates"]),
        "robustness": {str(r["sigma"]): r["test_accuracy"] for r in robustness},
        **({"base_to_new": new_class_scores(exp, model, scores["test"]["accuracy"])} if exp.new_classes else {}),
        **extra,
        "settings": {k: v for k, v in sorted(vars(args).items())},
    }
    history = result.history if result else zero_shot_history(scores)
    if not is_main_process():   # the other processes computed the same numbers; one writes them
        return metrics
    with timing.phase("reports"):
        if data.closest_pairs:
            write_contact_sheet(exp, data.closest_pairs, report.get("near_copy_threshold"))
        write_json(exp.out_dir / "split.json", split_record(data.splits(), data.class_names))
        write_report(exp.out_dir, exp.name, data.class_names, split_logits["test"], data.test.labels.cpu(),
                     data.test.files, history, metrics, robustness, report)
    # The reports' own time is known only once they are written: metrics.json again, with every phase.
    metrics["timings"] = run_timings(exp)
    write_json(exp.out_dir / "metrics.json", metrics)
    low, high = metrics["test_accuracy_ci95"]
    print(f"{exp.name}: test accuracy {metrics['test_accuracy']:.4f} (95% CI {low:.3f}-{high:.3f}), "
          f"macro-F1 {metrics['test_macro_f1']:.4f}, best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
          f"{trainable:,} trainable of {total:,} parameters, {metrics['wall_time_s']:.1f} s; outputs in {exp.out_dir}")
    return metrics


def write_contact_sheet(exp: Experiment, pairs: list, threshold: float | None) -> None:
    """The data's contact sheet (closest test-train pairs), one per output folder, not one per experiment: every
    experiment of a run saw the same images. The first experiment of this process writes it; a later one of the
    same process (run_all_experiments.py) finds it written since the process started and leaves it. Each
    experiment's data_report.json names it (contact_sheet, relative to the experiment's folder)."""
    sheet = Path(exp.args.output_dir) / CONTACT_SHEET
    if not sheet.exists() or sheet.stat().st_mtime < PROCESS_STARTED:
        plot_closest_pairs(pairs, threshold, sheet)
    exp.data.report["contact_sheet"] = os.path.relpath(sheet, exp.out_dir)


def new_class_scores(exp: Experiment, model: torch.nn.Module, base_accuracy: float) -> dict:
    """--base-to-new: the trained parts carried into the same method built for the held-out classes, scored on
    their test images among them (clip_adapt/base_to_new.py)."""
    from clip_adapt.runner import script_named
    new = exp.new_classes
    fresh = script_named(exp.name).build_model(exp.clip, exp.tokenizer, new.class_names, exp.args).to(exp.device)
    rebuilt = base_to_new.carried_over(model, fresh).eval()
    logits = predict_everywhere(rebuilt, new.test, 2 * exp.args.batch_size, exp.device, exp.args.precision,
                                exp.accelerator, desc="base-to-new: the new classes")
    new_accuracy = classification_metrics(logits, new.test.labels)["accuracy"]
    scores = base_to_new.record(base_accuracy, new_accuracy, new, len(exp.data.test))
    if is_main_process():
        print(base_to_new.describe(scores))
    return scores


def auroc_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], seed: int) -> dict:
    """metrics.json's one-vs-rest AUROC of the test softmax: `auroc` (macro, per class and the macro's 95% bootstrap
    interval) and `test_auroc` (the macro, for the summary)."""
    scores = auroc(logits.softmax(1).numpy(), labels.numpy(), class_names, seed)
    return {"test_auroc": scores["macro"], "auroc": scores}


def provenance(exp: Experiment) -> dict:
    """What metrics.json records so that a result can be traced: the model's weights (hub revision or
    fingerprint), the libraries' versions and the code's git commit with whether the checkout was dirty."""
    return {"model_weights": exp.model_identity, "versions": library_versions(), "code": code_version()}


def run_timings(exp: Experiment) -> dict:
    """Seconds per phase of this run (clip_adapt/timing.py); `other` is the rest of its wall time (building the
    model, the console)."""
    phases = timing.seconds()
    return {**phases, "other": round(max(0.0, time.time() - exp.started - sum(phases.values())), 3),
            "total": round(time.time() - exp.started, 3)}


def run(main) -> None:
    """Runs a script's main: a user's mistake is one line on stderr and a non-zero exit, not a traceback."""
    created_before = len(_created_folders)
    try:
        main()
    except UserError as error:
        remove_empty_folders(_created_folders[created_before:])
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stop:
        if is_main_process():   # every process stopped alike; one says so
            print(stop)
    except TrainingInterrupted as interruption:
        print(interruption, file=sys.stderr)
        sys.exit(interruption.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command with --resume to continue from the last finished epoch",
              file=sys.stderr)
        sys.exit(130)


def remove_empty_folders(folders: list[Path]) -> None:
    """A run refused before it wrote anything leaves no empty output folder behind (those it made, deepest first;
    a folder something was written into stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty, or gone
            pass


def leave_process_group() -> None:
    """Under `accelerate launch`, every process leaves the group before Python exits: a gloo group still alive at
    interpreter shutdown can abort one process ("terminate called without an active exception") after its work
    is done, and the launcher then reports the whole run as failed. Registered with atexit, not run after each
    script: run_all_experiments.py runs several in one process, all in the same group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def script_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
