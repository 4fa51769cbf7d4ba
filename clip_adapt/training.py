"""The training loop shared by E2–E7: trained until the training loss converges (clip_adapt/convergence.py), the
reported epoch selected on validation, timed checkpoints, exact resume (mid-epoch included)."""

import contextlib
import dataclasses
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clip_adapt import timing
from clip_adapt.convergence import CUT_FACTOR, TrainingLoss, Verdict, after_epoch, judge
from clip_adapt.base import UserError, atomic_save, is_main_process
from clip_adapt.data import Split
from clip_adapt.models import FITTED_BUFFERS
from clip_adapt.progress import progress_bar, say


# With --epochs unset, a run may train for the larger of these: small data sets have few optimiser steps an epoch,
# and the plateau test needs two windows of `patience` steps at each of its rates (clip_adapt/convergence.py).
DEFAULT_EPOCHS, EPOCH_CAP_WINDOWS = 500, 20
RESUME_FORMAT = 4   # the layout of checkpoint/last.pt; an older one is refused with a message, not a KeyError


class TrainingStopped(Exception):
    """Training ended before convergence on purpose (--stop-after-epochs); --resume continues it."""


@dataclass
class TrainConfig:
    epochs: int | None                       # at most; None: DEFAULT_EPOCHS or more for small data
    patience: int                            # optimiser steps per window of the training-loss plateau test
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    seed: int
    device: torch.device
    checkpoint_dir: Path
    augment: bool = True
    resume: bool = False
    stop_after_epochs: int | None = None     # this invocation only; --resume continues
    precision: str = "auto"
    checkpoint_every: float = 300.0          # seconds between writes of the resume state
    tensorboard_dir: Path | None = None      # --report-to tensorboard: per-epoch scalars go here
    settings: dict = field(default_factory=dict)   # what a resumed run must share with the one it continues
    accelerator: object = None   # an accelerate.Accelerator: with several processes, each trains on its shard
    min_steps: int = 0                       # no early stop before this many optimiser steps
    head_lr: float | None = None             # the rate of parameters under `head.` when it differs from `lr`
    head_start: str = "none"                 # a linear head's start (clip_adapt/probe.py HEAD_STARTS)
    fixed_schedule: bool = False             # CoOp's: exactly `epochs`, a cosine rate, the last epoch kept


@dataclass
class TrainResult:
    history: list[dict]                      # one row per epoch; epoch 0 is the model as built, before any step
    best_epoch: int                          # the selected epoch, whose weights the model holds
    epochs_run: int                          # epochs trained
    converged: bool = True
    convergence_reason: str = ""
    verdict: str = "converged"               # clip_adapt/convergence.py: converged, still-falling, diverging, ...
    selection: dict = field(default_factory=dict)   # {"epoch", "metric", "value"}: how best_epoch was chosen
    notes: list = field(default_factory=list)        # e.g. over-fitting after the selected epoch
    head_start: dict = field(default_factory=dict)   # what the linear head started from (probe.py)


PRECISIONS = ("auto", "bf16", "fp32")


def precision_used(device: torch.device, precision: str = "auto") -> str:
    """What --precision means on this device: "auto" is bf16 on CUDA and fp32 elsewhere."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast: by default on CUDA only. precision="bf16" asks for it on a CPU too, which is how the
    tests exercise the GPU's precision path on machines without one. The only autocast of a run: the
    Accelerator is made with mixed_precision="no" (common.make_accelerator)."""
    if precision_used(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PassStopped(Exception):
    """A stop request (Ctrl-C, SIGTERM) arrived during an evaluation pass; the pass ended at a batch boundary."""


@torch.no_grad()   # not inference_mode: its tensors could not be used later where autograd is on (E2's head)
def batched(fn, inputs: torch.Tensor | Split, batch_size: int, device: torch.device, precision: str = "auto",
            desc: str | None = None, transient: bool = False, indices: torch.Tensor | None = None,
            stop: list | None = None) -> torch.Tensor:
    """fn over inputs in batches; a Split's uint8 pixels are normalised batch by batch on the device; with
    `desc`, the pass shows its progress. With `indices` (each input's position in the whole set), fn is called
    as fn(batch, the batch's indices). A `stop` list that fills (stop_requests) ends the pass between batches
    with PassStopped."""
    split = inputs if isinstance(inputs, Split) else Split(inputs, torch.empty(len(inputs)), [])
    outputs = []
    starts = range(0, len(split), batch_size)
    for start in progress_bar(starts, desc, transient=transient) if desc else starts:
        if stop:
            raise PassStopped
        batch = split.model_inputs(slice(start, start + batch_size), device)
        with autocast(device, precision):
            output = fn(batch) if indices is None else fn(batch, indices[start:start + batch_size])
        outputs.append(output.float())
    return torch.cat(outputs).cpu()


def predict(model: torch.nn.Module, inputs: torch.Tensor | Split, batch_size: int, device: torch.device,
            precision: str = "auto", desc: str | None = None, transient: bool = False,
            indices: torch.Tensor | None = None, stop: list | None = None) -> torch.Tensor:
    """Logits for inputs. Takes no labels: a prediction cannot see its own."""
    model.eval()
    return batched(model, inputs, batch_size, device, precision, desc, transient, indices, stop)


def predict_everywhere(model: torch.nn.Module, inputs: torch.Tensor | Split, batch_size: int, device: torch.device,
                       precision: str = "auto", accelerator=None, desc: str | None = None,
                       transient: bool = False, by_index: bool = False, stop: list | None = None) -> torch.Tensor:
    """Logits for all inputs, the same on every process: with several processes each predicts its contiguous
    share and the shares are gathered, so evaluation is split as training is. by_index: the model is called as
    model(batch, each image's index in `inputs`), the same indices however many processes share the work
    (WithPixelNoise seeds each image's noise by it)."""
    processes = accelerator.num_processes if accelerator is not None else 1
    if processes == 1 or len(inputs) < processes:
        return predict(model, inputs, batch_size, device, precision, desc, transient,
                       torch.arange(len(inputs)) if by_index else None, stop)
    shares = torch.arange(len(inputs)).tensor_split(processes)
    mine = shares[accelerator.process_index]
    logits = predict(model, inputs.subset(mine) if isinstance(inputs, Split) else inputs[mine.to(inputs.device)],
                     batch_size, device, precision, desc, transient, mine if by_index else None, stop).to(device)
    # accelerate's gather needs equal sizes: pad each share to the longest, gather, then cut the padding off.
    gathered = accelerator.gather(accelerator.pad_across_processes(logits, dim=0)).cpu()
    longest = len(shares[0])
    return torch.cat([gathered[i * longest:i * longest + len(share)] for i, share in enumerate(shares)])


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def tensor_hash(tensor: torch.Tensor, rows_at_once: int = 1024) -> str:
    """A digest of the tensor's bytes, copied to the host rows_at_once rows at a time: never a host copy of a
    whole dataset (the same digest as hashing all the bytes at once)."""
    digest = hashlib.blake2b(digest_size=16)
    rows = tensor.detach()
    rows = rows.flatten(1) if rows.dim() > 1 else rows.reshape(-1, 1)
    for start in range(0, len(rows), rows_at_once):
        digest.update(rows[start:start + rows_at_once].cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights, and the buffers fitted before training (a standardised head's statistics) that
    they only make sense with."""
    model = getattr(model, "_orig_mod", model)   # the same names with or without torch.compile
    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    return state | {name: b.detach().cpu().clone() for name, b in model.named_buffers()
                    if name.rsplit(".", 1)[-1] in FITTED_BUFFERS}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    model = getattr(model, "_orig_mod", model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def parameter_groups(model: torch.nn.Module, head_lr: float | None) -> list:
    """The trainable parameters, for the optimiser; with head_lr, a model's `head` gets its own rate: a linear
    head and prompts or adapters may want different ones."""
    trainable = [(name, p) for name, p in getattr(model, "_orig_mod", model).named_parameters() if p.requires_grad]
    if head_lr is None:
        return [p for _, p in trainable]
    head = [p for name, p in trainable if name.startswith("head.")]
    rest = [p for name, p in trainable if not name.startswith("head.")]
    return [group for group in ({"params": rest}, {"params": head, "lr": head_lr}) if group["params"]]


def brings_own_loss(model: torch.nn.Module) -> bool:
    """A model with `own_loss = True` (the captioner) takes (inputs, targets) and returns (mean loss, number of
    correct predictions) itself; any other model returns logits, scored by cross-entropy against class labels."""
    for wrapper in ("module", "_orig_mod"):   # DistributedDataParallel, torch.compile
        model = getattr(model, wrapper, model)
    return getattr(model, "own_loss", False)


def training_step(model, optimizer, inputs, labels, device, precision: str = "auto",
                  weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on `weight` × the mean loss (train() weighs each process's slice); returns the mean
    loss and the number of correct predictions in the batch. The benchmark times exactly this."""
    own_loss = brings_own_loss(model)
    with autocast(device, precision):
        output = model(inputs, labels) if own_loss else model(inputs)
    loss, correct = output if own_loss else (F.cross_entropy(output.float(), labels),
                                             (output.argmax(1) == labels).sum())
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    optimizer.step()
    return loss, correct


@torch.no_grad()
def own_loss_and_accuracy(model: torch.nn.Module, split, batch_size: int, device: torch.device,
                          precision: str = "auto") -> tuple[float, float]:
    """Mean loss and accuracy on a split for a model that brings its own loss, batch by batch. Every process
    evaluates the whole split (the same numbers on each)."""
    model.eval()
    loss_sum = correct = 0.0
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        with autocast(device, precision):
            loss, right = model(split.model_inputs(index, device), split.labels[index.to(split.labels.device)])
        loss_sum, correct = loss_sum + loss.item() * len(index), correct + right.item()
    return loss_sum / len(split), correct / len(split)


class Schedule:
    """Linear warm-up over `warmup_steps` optimiser steps, then the peak rate until the training loss reaches a
    plateau, when the loop cuts it (cut(); clip_adapt/convergence.py says when). Nothing here reads validation.
    cosine_steps (the fixed schedule, CoOp's): after the warm-up the rate follows a cosine from the peak to 0 over
    the remaining steps, and is never cut."""

    def __init__(self, optimizer, warmup_steps: int, cosine_steps: int | None = None):
        self.optimizer, self.warmup_steps, self.cosine_steps, self.steps = optimizer, warmup_steps, cosine_steps, 0
        self.peaks = [group["lr"] for group in optimizer.param_groups]   # before the warm-up lowers them
        self.warmup = (torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps)
                       if warmup_steps else None)

    def after_step(self):
        self.steps += 1
        if self.warmup is not None:
            self.warmup.step()   # multiplies the current rate, so it keeps any cut; a no-op once warm
        if self.cosine_steps and self.steps > self.warmup_steps:
            done = min(1.0, (self.steps - self.warmup_steps) / max(1, self.cosine_steps - self.warmup_steps))
            for group, peak in zip(self.optimizer.param_groups, self.peaks):
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * done))

    def cut(self):
        for group in self.optimizer.param_groups:
            group["lr"] *= CUT_FACTOR

    def state_dict(self) -> dict:
        return {"warmup": self.warmup.state_dict() if self.warmup else None, "steps": self.steps}

    def load_state_dict(self, state: dict):
        self.steps = state.get("steps", 0)
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a step; the resume state was written first."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C and SIGTERM ask the loop to stop after the step under way, so that the resume state it writes
    is exact; a second Ctrl-C stops at once. Yields the list of signals received."""
    received = []
    if threading.current_thread() is not threading.main_thread():   # signals can only be caught there
        yield received
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def handler(number, frame):
        received.append(number)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for number in previous:
        signal.signal(number, handler)
    try:
        yield received
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@dataclass
class Progress:
    """Where training stands: everything the resume state holds besides the model, optimiser and schedule."""
    epoch: int = 1                      # the epoch under way
    batch: int = 0                      # its batches already trained
    epoch_generator: torch.Tensor | None = None   # the generator at the epoch's start: redraws its order
    loss_sum: float = 0.0
    correct: float = 0.0
    history: list = field(default_factory=list)
    best_state: dict | None = None
    best_val_loss: float = math.inf
    best_epoch: int = 0
    steps: int = 0                      # optimiser steps taken
    training_loss: TrainingLoss = field(default_factory=TrainingLoss)
    head_start: dict = field(default_factory=dict)   # probe.py's start of a linear head, made before epoch 0
    stopped: bool = False               # the training loss said stop (convergence.after_epoch)


class ResumeState:
    """What a run keeps so that it can stop anywhere and continue exactly: checkpoint/last.pt (trainable
    weights, optimiser, schedule, random states and the Progress) and, once at the end, the best weights in
    checkpoint/best.safetensors.

    last.pt is written when `due()` says so (every `checkpoint_every` seconds), on a stop request and at the
    end, not every epoch: for full fine-tuning it is about 1 GB of weights and optimiser moments. When the
    model's weights are the best ones, last.pt does not hold them twice. Only the main process writes; with
    several processes, last.pt also holds every process's own random states (their dropout differs), and
    every process takes part in each write."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, optimizer, schedule: Schedule,
                 generator: torch.Generator):
        self.config, self.model, self.optimizer, self.schedule, self.generator = (config, model, optimizer,
                                                                                  schedule, generator)
        self.folder = Path(config.checkpoint_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path = self.folder / "last.pt", self.folder / "best.safetensors"
        self.progress = Progress()
        self.best_is_current = False   # the model's weights are the best ones
        self.is_main = is_main_process()
        accelerator = config.accelerator
        self.processes = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.last_write = time.monotonic()

    def restore(self) -> Progress:
        """With --resume, everything as it was when last.pt was written; else a fresh Progress."""
        if not self.config.resume:
            return self.progress
        if not self.last_path.exists():
            if self.is_main:
                print(f"nothing to resume in {self.folder}: starting from epoch 1")
            return self.progress
        state = torch.load(self.last_path, weights_only=True, map_location="cpu")   # a GPU run may resume on a CPU
        if state.get("format") != RESUME_FORMAT:
            raise UserError(f"cannot resume from {self.last_path}: it was written by an older version of this "
                            f"project; rerun without --resume to start over")
        if state["settings"] != self.config.settings:
            changed = sorted(k for k in set(state["settings"]) | set(self.config.settings)
                             if state["settings"].get(k) != self.config.settings.get(k))
            raise UserError(f"cannot resume: the checkpoint in {self.folder} was made with different "
                            f"{', '.join(changed)}; rerun with the same flags, or without --resume to start over")
        load_trainable(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        # This process's own random states; one that the run resumed did not have keeps its fresh seed.
        saved = state.get("rank_rng") or [state]
        if self.rank < len(saved):
            torch.set_rng_state(saved[self.rank]["torch_rng"])
            if self.config.device.type == "cuda" and "cuda_rng" in saved[self.rank]:
                torch.cuda.set_rng_state(saved[self.rank]["cuda_rng"])
        saved = dict(state["progress"])
        self.progress = Progress(**{**saved, "training_loss": TrainingLoss(**saved["training_loss"])})
        if self.progress.best_state is None and self.progress.best_epoch:
            self.progress.best_state, self.best_is_current = state["model"], True
        if self.is_main:
            print(f"resuming at epoch {self.progress.epoch}, batch {self.progress.batch} from {self.last_path}")
        return self.progress

    def due(self) -> bool:
        due = time.monotonic() - self.last_write >= self.config.checkpoint_every
        if self.processes > 1:   # every process takes part in a write: the main process's clock decides for all
            from accelerate.utils import broadcast_object_list
            due = broadcast_object_list([due])[0]
        return due

    def stepped(self) -> None:
        self.best_is_current = False

    def random_states(self) -> dict:
        states = {"torch_rng": torch.get_rng_state()}
        if self.config.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state()
        return states

    def write(self) -> None:
        self.last_write = time.monotonic()
        own = self.random_states()
        if self.processes > 1:
            from accelerate.utils import gather_object
            every_rank = gather_object([own])   # a collective: every process is here
        if not self.is_main:
            return
        progress = self.progress
        saved = {**progress.__dict__, "best_state": None if self.best_is_current else progress.best_state,
                 "training_loss": dataclasses.asdict(progress.training_loss)}
        state = {"format": RESUME_FORMAT, "progress": saved, "model": trainable_state(self.model),
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "generator": self.generator.get_state(), **own, "settings": self.config.settings}
        if self.processes > 1:
            state["rank_rng"] = every_rank
        with timing.phase("checkpoints"):
            atomic_save(self.last_path, lambda p: torch.save(state, p))
        self.last_write = time.monotonic()

    def end_epoch(self, row: dict) -> None:
        """The epoch's row joins the history, and the best validation loss so far keeps its weights (selection).
        The training loss's own record (convergence) is kept by the loop."""
        progress = self.progress
        progress.history.append(row)
        if row["val_loss"] < progress.best_val_loss:
            progress.best_state, progress.best_val_loss, progress.best_epoch = (trainable_state(self.model),
                                                                                row["val_loss"], row["epoch"])
            self.best_is_current = True
        progress.epoch, progress.batch, progress.loss_sum, progress.correct = row["epoch"] + 1, 0, 0.0, 0.0

    def write_best(self) -> None:
        if self.is_main:
            with timing.phase("checkpoints"):
                atomic_save(self.best_path, lambda p: save_file(self.progress.best_state, p,
                                                                metadata={"epoch": str(self.progress.best_epoch)}))

    def refuse_non_finite(self, loss: float, epoch: int) -> None:
        """Never a resume state with broken weights: stop, keeping the best weights so far."""
        if math.isfinite(loss):
            return
        where = "no epoch finished before it"
        if self.progress.best_state is not None:
            self.write_best()
            where = f"the best weights so far (epoch {self.progress.best_epoch}) are in {self.best_path}"
        raise UserError(f"loss became {loss} in epoch {epoch}: stopped; {where}; try a lower --lr")

    def load_best(self) -> None:
        load_trainable(self.model, self.progress.best_state)
        self.write_best()


def train(model: torch.nn.Module, train_split: Split, val: Split, test: Split, config: TrainConfig) -> TrainResult:
    """Trains the parameters with requires_grad until the smoothed validation loss has made no new low for
    `patience` optimiser steps, after at least `min_steps`, while the training loss no longer falls fast (or
    until `epochs`), then loads the weights of the best validation epoch into the model and says whether the
    run converged. Test loss and accuracy are recorded every epoch for the curves; they never steer anything.
    A model that brings its own loss (brings_own_loss: E8's captioner, next-token loss and accuracy) is trained
    and evaluated on it, with the same schedule, early stopping, checkpoints and resume.

    The resume state (ResumeState) may be written mid-epoch; --resume then redraws that epoch's batch order
    and goes on from the next batch, so a resumed run equals an uninterrupted one.

    Under `accelerate launch` with several processes (config.accelerator), the model is wrapped by
    accelerator.prepare (DistributedDataParallel): every process draws the same batch order, trains on its own
    slice of each global batch of `batch_size` images, and weighs its mean loss by its slice's share of the
    batch times the number of processes, so that the averaged gradient is one process's on the whole batch
    whatever the slice sizes (11/11/10 of 32 on 3). A process whose slice is empty (a last batch smaller than
    the number of processes) joins the gradient average with a zero-weight image. Dropout draws differ between
    processes (seeded per process); the batch order is shared. Losses and accuracies are summed across
    processes once per epoch; only the main process writes checkpoints, and the resume state is written at
    epoch ends only (a mid-epoch write would need every process to stop at the same step)."""
    device, accelerator = config.device, config.accelerator
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    model.to(device)
    stepped = accelerator.prepare(model) if processes > 1 else model   # the DDP wrapper; `model` stays bare
    if processes > 1:   # dropout masks differ per process (seed + process index); resume restores each one's
        from accelerate.utils import set_seed
        set_seed(config.seed, device_specific=True)
    train_split = train_split.to(device)
    if config.augment and getattr(train_split, "share_images", False):
        raise ValueError("a caption split that shares each image among its captions cannot be augmented (a flip "
                         "would be drawn per caption): pass augment=False, or a split with share_images=False")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("nothing to train: every parameter of this model is frozen (e.g. --num-prompts 0 with "
                        "--head clip); give it prompts, a trainable head or an adapter")
    optimizer = torch.optim.AdamW(parameter_groups(model, config.head_lr), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    window_epochs = max(1, math.ceil(config.patience / steps_per_epoch))   # the plateau test's window
    epochs = config.epochs or max(DEFAULT_EPOCHS, EPOCH_CAP_WINDOWS * window_epochs)
    if config.fixed_schedule and not config.epochs:
        raise ValueError("a fixed schedule needs its epochs")
    schedule = Schedule(optimizer, round(config.warmup_epochs * steps_per_epoch),
                        epochs * steps_per_epoch if config.fixed_schedule else None)
    generator = torch.Generator().manual_seed(config.seed)   # batch order and augmentation, saved for resume
    checkpoint = ResumeState(config, model, optimizer, schedule, generator)
    progress = checkpoint.restore()

    def save_mid_epoch():
        progress.loss_sum, progress.correct = loss_sum.item(), correct.item()
        checkpoint.refuse_non_finite(progress.loss_sum, epoch)
        checkpoint.write()

    def stop_now(where: str):
        getattr(bar, "close", lambda: None)()
        name = "SIGTERM" if stop[0] == signal.SIGTERM else "Ctrl-C"
        raise TrainingInterrupted(f"\n{name}: stopped in epoch {epoch} {where}; the resume state is in "
                                  f"{checkpoint.last_path}: rerun the same command with --resume to continue",
                                  128 + stop[0])

    def scores(split: Split, name: str, epoch: int) -> tuple[float, float]:
        """Loss and accuracy of the model as it is, in evaluation mode, over a whole split."""
        if brings_own_loss(model):
            return own_loss_and_accuracy(model, split, 2 * config.batch_size, device, config.precision)
        return loss_and_accuracy(predict_everywhere(model, split, 2 * config.batch_size, device, config.precision,
                                                    accelerator, desc=f"epoch {epoch} {name} pass", transient=True,
                                                    stop=stop), split.labels)

    epochs_this_run = 0
    # Several processes: Ctrl-C and SIGTERM keep their default effect, and the epoch-end state is the resume point.
    # A resumed run drops the events of epochs it is about to redo (written after the resume state it continues).
    board = tensorboard_writer(config.tensorboard_dir, purge_step=progress.epoch) \
        if config.tensorboard_dir and checkpoint.is_main else None
    with (stop_requests() if processes == 1 else contextlib.nullcontext([])) as stop, \
            contextlib.closing(board) if board else contextlib.nullcontext(), timing.phase("training"):
        if not progress.history:   # epoch 0: the model as built (and its head as started), a candidate too
            epoch = 0
            from clip_adapt.probe import start_head   # probe.py builds on this module
            progress.head_start = start_head(model, train_split, val, config)
            bar = None
            try:
                with timing.phase("evaluation"):
                    row = {"epoch": 0}
                    for name, split in (("train", train_split), ("val", val), ("test", test)):
                        row[f"{name}_loss"], row[f"{name}_accuracy"] = scores(split, name, 0)
                    row["lr"] = 0.0
            except PassStopped:   # nothing trained yet: a rerun starts afresh, with or without --resume
                stop_now("before its first step")
            if board is not None:
                log_epoch(board, row)
            checkpoint.end_epoch(row)
            progress.training_loss = TrainingLoss(at_start=row["train_loss"], window_epochs=window_epochs)
        while progress.epoch <= epochs and not progress.stopped:
            epoch = progress.epoch
            if progress.batch == 0:
                progress.epoch_generator = generator.get_state()
            generator.set_state(progress.epoch_generator)
            model.train()
            host_order = train_split.epoch_order(generator)
            flips = torch.rand(len(train_split), generator=generator) < 0.5
            order, flips = host_order.to(device, non_blocking=True), flips.to(device, non_blocking=True)
            # Kept on the device: reading them back every step would stall the GPU.
            loss_sum = torch.tensor(progress.loss_sum if checkpoint.is_main else 0.0, device=device)
            correct = torch.tensor(progress.correct if checkpoint.is_main else 0.0, device=device)
            batches = order.split(config.batch_size)
            # This process's slice of each batch, and the weight of its mean loss: slice mean × its share of the
            # batch × processes, summed over the slices and averaged by DDP, is the whole batch's mean whatever
            # the slice sizes. An empty slice still joins the gradient all-reduce, with one zero-weight image.
            def share(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
                if processes == 1:
                    return batch, 1.0
                mine = batch.tensor_split(processes)[rank]
                return (mine if len(mine) else batch[:1]), len(mine) * processes / len(batch)

            shared = [share(batch) for batch in batches]
            # Inputs held on the host are gathered by host indices (Split.batches): reading indices back from the
            # device would stall every step.
            gathered = ([share(batch)[0] for batch in host_order.split(config.batch_size)]
                        if train_split.host_indices else [batch for batch, _ in shared])
            feed = train_split.batches(gathered[progress.batch:], device)
            bar = progress_bar(shared[progress.batch:], f"epoch {epoch}/{epochs}", initial=progress.batch,
                               total=len(batches))
            for (batch, weight), inputs in zip(bar, feed):
                labels = train_split.labels[batch]
                if config.augment:   # left-right flips, on the device: MRI slices are near-symmetric
                    inputs = torch.where(flips[batch].view(-1, 1, 1, 1), inputs.flip(-1), inputs)
                loss, right = training_step(stepped, optimizer, inputs, labels, device, config.precision, weight)
                schedule.after_step()
                if weight:   # a zero-weight stand-in image counts nowhere
                    loss_sum += loss.detach() * len(batch)
                    correct += right
                progress.batch += 1
                progress.steps += 1
                checkpoint.stepped()
                if processes == 1 and (stop or checkpoint.due()):
                    save_mid_epoch()
                    if stop:
                        stop_now(f"after batch {progress.batch}")
            if processes > 1:
                loss_sum, correct = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(correct, "sum")
            row = {"epoch": epoch, "train_loss": (loss_sum / len(train_split)).item(),
                   "train_accuracy": (correct / len(train_split)).item(), "lr": optimizer.param_groups[0]["lr"]}
            try:   # a stop request is honoured between evaluation batches too: a large test set takes long
                with timing.phase("evaluation"):
                    for name, split in (("val", val), ("test", test)):
                        row[f"{name}_loss"], row[f"{name}_accuracy"] = scores(split, name, epoch)
            except PassStopped:
                save_mid_epoch()
                stop_now("during its evaluation, its training done")
            say(f"epoch {epoch}: loss {row['train_loss']:.4f}, accuracy {row['train_accuracy']:.4f}; val loss "
                f"{row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.4f}; lr {row['lr']:.3g}")
            if board is not None:
                log_epoch(board, row)
            checkpoint.refuse_non_finite(row["train_loss"] if not math.isfinite(row["train_loss"])
                                         else row["val_loss"], epoch)
            checkpoint.end_epoch(row)
            progress.training_loss.losses.append(row["train_loss"])
            # The fixed schedule runs its epochs whatever the loss does: no cut, no early stop.
            decision = "go on" if config.fixed_schedule else after_epoch(progress.training_loss, progress.steps,
                                                                         config.min_steps)
            if decision == "cut":
                schedule.cut()
                say(f"the training loss stopped falling over {config.patience} optimiser steps: learning rate cut to "
                    f"{optimizer.param_groups[0]['lr']:.3g}")
            progress.stopped = decision == "stop"
            epochs_this_run += 1

            finished = progress.epoch > epochs or progress.stopped
            stop_asked = config.stop_after_epochs and epochs_this_run >= config.stop_after_epochs
            if finished or stop_asked or checkpoint.due():
                checkpoint.write()
            if stop_asked and not finished:
                raise TrainingStopped(f"stopped after {epochs_this_run} epochs as asked (epoch {epoch}); "
                                      f"rerun with --resume to continue")

    reachable = progress.head_start.get("reachable_train_loss")
    final_train_loss = scores(train_split, "train", progress.epoch)[0] if reachable is not None else None
    if config.fixed_schedule:   # the last epoch is the reported one, as CoOp reports it
        progress.best_state, progress.best_epoch = trainable_state(model), progress.history[-1]["epoch"]
        progress.best_val_loss = progress.history[-1]["val_loss"]
    checkpoint.load_best()
    if config.fixed_schedule:
        verdict = Verdict(False, "fixed-schedule", f"CoOp's fixed schedule: {epochs} epochs at a cosine rate, the "
                          f"last one kept; the convergence test was not applied")
        selection = {"epoch": progress.best_epoch, "metric": "last epoch (fixed schedule)",
                     "value": progress.best_val_loss}
    else:
        verdict = judge(progress.training_loss, progress.steps, epochs, config.patience, config.min_steps,
                        progress.history, progress.best_epoch, final_train_loss, reachable,
                        progress.head_start.get("classes"))
        if not verdict.converged:
            say(f"not converged: {verdict.reason}")
        selection = {"epoch": progress.best_epoch, "metric": "val_loss", "value": progress.best_val_loss}
    return TrainResult(progress.history, progress.best_epoch, len(progress.history) - 1, verdict.converged,
                       verdict.reason, verdict.verdict, selection, verdict.notes, progress.head_start)


def summary_writer_class():
    """torch's SummaryWriter for --report-to tensorboard; tensorboard is optional, so its absence is a clear
    error (checked before any training)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard, "
                        "or pass --report-to none") from None
    return SummaryWriter


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    return summary_writer_class()(str(log_dir), purge_step=purge_step)


def log_epoch(board, row: dict) -> None:
    """One epoch's losses, accuracies and learning rate at step = epoch; named metric/split (loss/train,
    loss/val ...) so that TensorBoard shows each metric's splits side by side."""
    for metric in ("loss", "accuracy"):
        for split in ("train", "val", "test"):
            board.add_scalar(f"{metric}/{split}", row[f"{split}_{metric}"], row["epoch"])
    board.add_scalar("learning_rate", row["lr"], row["epoch"])
    board.flush()


def cached_embeddings(embed, splits: dict[str, Split], cache_dir: Path, key: str, batch_size: int,
                      device: torch.device, precision: str = "auto", write: bool = True) -> dict[str, Split]:
    """The frozen tower gives every image the same embedding every epoch: compute each once, keep them
    on disk keyed by the weights, the exact preprocessed pixels and the device precision, and reuse them."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{key}|{device.type}|{precision}".encode())
    for name, split in splits.items():
        digest.update(f"{name}:{tensor_hash(split.inputs)}".encode())
    path = Path(cache_dir) / f"embeddings-{digest.hexdigest()}.safetensors"
    if path.exists():
        embeddings = load_file(path)
        if is_main_process():
            print(f"reusing cached image embeddings {path}")
    else:
        with timing.phase("training"):   # E2's training consists of this pass and the head's epochs
            embeddings = {name: batched(embed, split, batch_size, device, precision,
                                        desc=f"image embeddings ({name})")
                          for name, split in splits.items()}
        if write:   # only the main process of several writes
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(path, lambda p: save_file(embeddings, p))
    return {name: split.with_inputs(embeddings[name]) for name, split in splits.items()}
