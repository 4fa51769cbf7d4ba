"""The training loop shared by E2–E7: validation-based early stopping, timed checkpoints, exact resume (mid-epoch
included)."""

import contextlib
import hashlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import Split, UserError
from progress import progress_bar, say


RESUME_FORMAT = 2   # the layout of checkpoint/last.pt; an older one is refused with a message, not a KeyError


class TrainingStopped(Exception):
    """Training ended before convergence on purpose (--stop-after-epochs); --resume continues it."""


@dataclass
class TrainConfig:
    epochs: int
    patience: int
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


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    epochs_run: int


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast: by default on CUDA only. precision="bf16" asks for it on a CPU too, which is how the
    tests exercise the GPU's precision path on machines without one."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_save(path: Path, save) -> None:
    """save(temporary_path), then rename: a reader never finds a half-written file, even after a kill."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save(temporary)
    os.replace(temporary, path)


@torch.no_grad()   # not inference_mode: its tensors could not be used later where autograd is on (E2's head)
def batched(fn, inputs: torch.Tensor | Split, batch_size: int, device: torch.device, precision: str = "auto",
            desc: str | None = None, transient: bool = False) -> torch.Tensor:
    """fn over inputs in batches; a Split's uint8 pixels are normalised batch by batch on the device; with
    `desc`, the pass shows its progress."""
    split = inputs if isinstance(inputs, Split) else Split(inputs, torch.empty(len(inputs)), [])
    outputs = []
    starts = range(0, len(split), batch_size)
    for start in progress_bar(starts, desc, transient=transient) if desc else starts:
        with autocast(device, precision):
            outputs.append(fn(split.model_inputs(slice(start, start + batch_size), device)).float())
    return torch.cat(outputs).cpu()


def predict(model: torch.nn.Module, inputs: torch.Tensor | Split, batch_size: int, device: torch.device,
            precision: str = "auto", desc: str | None = None, transient: bool = False) -> torch.Tensor:
    """Logits for inputs. Takes no labels: a prediction cannot see its own."""
    model.eval()
    return batched(model, inputs, batch_size, device, precision, desc, transient)


def predict_everywhere(model: torch.nn.Module, inputs: torch.Tensor | Split, batch_size: int, device: torch.device,
                       precision: str = "auto", accelerator=None, desc: str | None = None,
                       transient: bool = False) -> torch.Tensor:
    """Logits for all inputs, the same on every process: with several processes each predicts its contiguous
    share and the shares are gathered, so evaluation is split as training is."""
    processes = accelerator.num_processes if accelerator is not None else 1
    if processes == 1 or len(inputs) < processes:
        return predict(model, inputs, batch_size, device, precision, desc, transient)
    shares = torch.arange(len(inputs)).tensor_split(processes)
    mine = shares[accelerator.process_index]
    logits = predict(model, inputs.subset(mine) if isinstance(inputs, Split) else inputs[mine.to(inputs.device)],
                     batch_size, device, precision, desc, transient).to(device)
    # accelerate's gather needs equal sizes: pad each share to the longest, gather, then cut the padding off.
    gathered = accelerator.gather(accelerator.pad_across_processes(logits, dim=0)).cpu()
    longest = len(shares[0])
    return torch.cat([gathered[i * longest:i * longest + len(share)] for i, share in enumerate(shares)])


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def tensor_hash(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)   # the same names with or without torch.compile
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(getattr(model, "_orig_mod", model).named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def training_step(model, optimizer, inputs, labels, device,
                  precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step; the benchmark times exactly this."""
    with autocast(device, precision):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


class Schedule:
    """Linear warm-up over `warmup_steps` optimiser steps, then the rate is cut by PLATEAU_FACTOR whenever the
    validation loss has not improved for a third of the early-stopping patience.

    Why not a cosine over --epochs: with early stopping, a run stops long before the cosine's horizon (30–50
    of 500 epochs), so it trained at 97–99% of the peak rate throughout, and changing --epochs changed the
    results even where training stopped at the same epoch. Decaying on a plateau of the same validation loss
    that early stopping watches gives a run one or two lower rates before it stops, whatever --epochs is.
    """
    PLATEAU_FACTOR = 0.3

    def __init__(self, optimizer, warmup_steps: int, patience: int):
        self.warmup = (torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps)
                       if warmup_steps else None)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=self.PLATEAU_FACTOR, patience=max(1, patience // 3), threshold=0)

    def after_step(self):
        if self.warmup is not None:
            self.warmup.step()   # multiplies the current rate, so it keeps any plateau cut; a no-op once warm

    def after_epoch(self, val_loss: float):
        self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return {"warmup": self.warmup.state_dict() if self.warmup else None, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict):
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])


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
    bad_epochs: int = 0


def train(model: torch.nn.Module, train_split: Split, val: Split, test: Split, config: TrainConfig) -> TrainResult:
    """Trains the parameters with requires_grad until validation loss stops improving for `patience`
    epochs (at most `epochs`), then loads the weights of the best validation epoch into the model.
    Test loss and accuracy are recorded every epoch for the curves; they never steer anything.

    The resume state (checkpoint/last.pt) is written every `checkpoint_every` seconds, on --stop-after-epochs,
    on Ctrl-C and SIGTERM, and at the end, not every epoch: for full fine-tuning it is about 1 GB of weights
    and optimiser moments. It may be written mid-epoch; --resume then redraws that epoch's batch order and goes
    on from the next batch, so a resumed run equals an uninterrupted one. The best weights are kept in memory
    and written once, to checkpoint/best.safetensors, when training ends.

    Under `accelerate launch` with several processes (config.accelerator), the model is wrapped by
    accelerator.prepare (DistributedDataParallel): every process draws the same batch order, trains on its own
    slice of each global batch of `batch_size` images, and the gradients are averaged, so a step equals one
    process's step on the whole batch. Losses and accuracies are summed across processes once per epoch;
    only the main process writes checkpoints, and the resume state is written at epoch ends only (a mid-epoch
    write would need every process to stop at the same step). A last batch smaller than the number of
    processes is left out of that epoch."""
    device = config.device
    accelerator = config.accelerator
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    model.to(device)
    stepped = accelerator.prepare(model) if processes > 1 else model   # the DDP wrapper; `model` stays bare
    train_split = train_split.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    schedule = Schedule(optimizer, round(config.warmup_epochs * steps_per_epoch), config.patience)
    generator = torch.Generator().manual_seed(config.seed)   # batch order and augmentation, saved for resume
    progress = Progress()
    best_is_current = False   # the model's weights are the best ones: last.pt need not hold them twice

    checkpoint_dir = Path(config.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.safetensors"
    if config.resume and last_path.exists():
        state = torch.load(last_path, weights_only=True, map_location="cpu")   # a GPU run may resume on a CPU
        if state.get("format") != RESUME_FORMAT:
            raise UserError(f"cannot resume from {last_path}: it was written by an older version of this "
                            f"project; rerun without --resume to start over")
        if state["settings"] != config.settings:
            changed = sorted(k for k in set(state["settings"]) | set(config.settings)
                             if state["settings"].get(k) != config.settings.get(k))
            raise UserError(f"cannot resume: the checkpoint in {checkpoint_dir} was made with different "
                            f"{', '.join(changed)}; rerun with the same flags, or without --resume to start over")
        load_trainable(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        progress = Progress(**state["progress"])
        if progress.best_state is None and progress.best_epoch:
            progress.best_state, best_is_current = state["model"], True
        print(f"resuming at epoch {progress.epoch}, batch {progress.batch} from {last_path}")
    elif config.resume:
        print(f"nothing to resume in {checkpoint_dir}: starting from epoch 1")

    def write_best_weights():
        if not is_main:
            return
        atomic_save(best_path, lambda p: save_file(progress.best_state, p,
                                                   metadata={"epoch": str(progress.best_epoch)}))

    def refuse_non_finite(loss: float, epoch: int):
        if math.isfinite(loss):
            return
        where = "no epoch finished before it"
        if progress.best_state is not None:
            write_best_weights()
            where = f"the best weights so far (epoch {progress.best_epoch}) are in {best_path}"
        raise UserError(f"loss became {loss} in epoch {epoch}: stopped; {where}; try a lower --lr")

    def write_resume_state():
        if not is_main:
            return time.monotonic()
        saved = {**progress.__dict__, "best_state": None if best_is_current else progress.best_state}
        state = {"format": RESUME_FORMAT, "progress": saved, "model": trainable_state(model),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "settings": config.settings}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        atomic_save(last_path, lambda p: torch.save(state, p))
        return time.monotonic()

    last_write, epochs_this_run = time.monotonic(), 0
    # Several processes: Ctrl-C and SIGTERM keep their default effect, and the epoch-end state is the resume point.
    # A resumed run drops the events of epochs it is about to redo (written after the resume state it continues).
    board = tensorboard_writer(config.tensorboard_dir, purge_step=progress.epoch) \
        if config.tensorboard_dir and is_main else None
    with (stop_requests() if processes == 1 else contextlib.nullcontext([])) as stop, \
            contextlib.closing(board) if board else contextlib.nullcontext():
        while progress.epoch <= config.epochs and progress.bad_epochs < config.patience:
            epoch = progress.epoch
            if progress.batch == 0:
                progress.epoch_generator = generator.get_state()
            generator.set_state(progress.epoch_generator)
            model.train()
            order = torch.randperm(len(train_split), generator=generator)
            flips = torch.rand(len(train_split), generator=generator) < 0.5
            order, flips = order.to(device, non_blocking=True), flips.to(device, non_blocking=True)
            # Kept on the device: reading them back every step would stall the GPU.
            loss_sum = torch.tensor(progress.loss_sum if is_main else 0.0, device=device)   # summed across processes
            correct = torch.tensor(progress.correct if is_main else 0.0, device=device)
            batches = order.split(config.batch_size)
            bar = progress_bar(batches[progress.batch:], f"epoch {epoch}/{config.epochs}", initial=progress.batch,
                               total=len(batches))
            for batch in bar:
                if processes > 1:
                    if len(batch) < processes:   # every process needs images for the gradient all-reduce
                        progress.batch += 1
                        continue
                    batch = batch.tensor_split(processes)[rank]
                inputs, labels = train_split.model_inputs(batch, device), train_split.labels[batch]
                if config.augment:   # left-right flips, on the device: MRI slices are near-symmetric
                    inputs = torch.where(flips[batch].view(-1, 1, 1, 1), inputs.flip(-1), inputs)
                logits, loss = training_step(stepped, optimizer, inputs, labels, device, config.precision)
                schedule.after_step()
                loss_sum += loss.detach() * len(batch)
                correct += (logits.argmax(1) == labels).sum()
                progress.batch += 1
                best_is_current = False
                if processes == 1 and (stop or time.monotonic() - last_write >= config.checkpoint_every):
                    progress.loss_sum, progress.correct = loss_sum.item(), correct.item()
                    refuse_non_finite(progress.loss_sum, epoch)   # never a resume state with broken weights
                    last_write = write_resume_state()
                    if stop:
                        getattr(bar, "close", lambda: None)()
                        name = "SIGTERM" if stop[0] == signal.SIGTERM else "Ctrl-C"
                        raise TrainingInterrupted(
                            f"\n{name}: stopped in epoch {epoch} after batch {progress.batch}; the resume state "
                            f"is in {last_path}: rerun the same command with --resume to continue",
                            128 + stop[0])
            if processes > 1:
                loss_sum, correct = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(correct, "sum")
            train_loss, train_accuracy = (loss_sum / len(train_split)).item(), (correct / len(train_split)).item()
            row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                   "lr": optimizer.param_groups[0]["lr"]}
            for name, split in (("val", val), ("test", test)):
                row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(predict_everywhere(
                    model, split, 2 * config.batch_size, device, config.precision, accelerator,
                    desc=f"epoch {epoch} {name} pass", transient=True), split.labels)
            say(f"epoch {epoch}: loss {train_loss:.4f}, accuracy {train_accuracy:.4f}; val loss {row['val_loss']:.4f}, "
                f"val accuracy {row['val_accuracy']:.4f}; lr {row['lr']:.3g}")
            if board is not None:
                log_epoch(board, row)
            refuse_non_finite(train_loss if not math.isfinite(train_loss) else row["val_loss"], epoch)
            progress.history.append(row)
            if row["val_loss"] < progress.best_val_loss:
                progress.best_state, progress.best_val_loss, progress.best_epoch = trainable_state(model), \
                    row["val_loss"], epoch
                progress.bad_epochs, best_is_current = 0, True
            else:
                progress.bad_epochs += 1
            schedule.after_epoch(row["val_loss"])
            progress.epoch, progress.batch, progress.loss_sum, progress.correct = epoch + 1, 0, 0.0, 0.0
            epochs_this_run += 1

            finished = progress.epoch > config.epochs or progress.bad_epochs >= config.patience
            stop_asked = config.stop_after_epochs and epochs_this_run >= config.stop_after_epochs
            if finished or stop_asked or time.monotonic() - last_write >= config.checkpoint_every:
                last_write = write_resume_state()
            if stop_asked and not finished:
                raise TrainingStopped(f"stopped after {epochs_this_run} epochs as asked (epoch {epoch}); "
                                      f"rerun with --resume to continue")

    load_trainable(model, progress.best_state)
    write_best_weights()
    return TrainResult(progress.history, progress.best_epoch, len(progress.history))


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
        print(f"reusing cached image embeddings {path}")
    else:
        embeddings = {name: batched(embed, split, batch_size, device, precision,
                                    desc=f"image embeddings ({name})")
                      for name, split in splits.items()}
        if write:   # only the main process of several writes
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(path, lambda p: save_file(embeddings, p))
    return {name: split.with_inputs(embeddings[name]) for name, split in splits.items()}
