"""The training loop shared by E2–E6: validation-based early stopping, per-epoch checkpoints, exact resume."""

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from data import Split, UserError


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
    settings: dict = field(default_factory=dict)   # what a resumed run must share with the one it continues


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
def batched(fn, inputs: torch.Tensor, batch_size: int, device: torch.device, precision: str = "auto") -> torch.Tensor:
    outputs = []
    for chunk in inputs.split(batch_size):
        with autocast(device, precision):
            outputs.append(fn(chunk.to(device, non_blocking=True)).float())
    return torch.cat(outputs).cpu()


def predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
            precision: str = "auto") -> torch.Tensor:
    """Logits for inputs. Takes no labels: a prediction cannot see its own."""
    model.eval()
    return batched(model, inputs, batch_size, device, precision)


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


def training_step(model, optimizer, inputs, labels, device, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step; the benchmark times exactly this."""
    with autocast(device, precision):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train(model: torch.nn.Module, train_split: Split, val: Split, test: Split, config: TrainConfig) -> TrainResult:
    """Trains the parameters with requires_grad until validation loss stops improving for `patience`
    epochs (at most `epochs`), then loads the weights of the best validation epoch into the model.
    Test loss and accuracy are recorded every epoch for the curves; they never steer anything."""
    device = config.device
    model.to(device)
    train_split = train_split.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)   # batch order and augmentation, saved for resume
    history, best_state, best_val_loss, best_epoch, bad_epochs, start = [], None, math.inf, 0, 0, 1

    checkpoint_dir = Path(config.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.safetensors"
    if config.resume and last_path.exists():
        state = torch.load(last_path, weights_only=True, map_location="cpu")   # a GPU run may resume on a CPU
        if state["settings"] != config.settings:
            changed = sorted(k for k in set(state["settings"]) | set(config.settings)
                             if state["settings"].get(k) != config.settings.get(k))
            raise UserError(f"cannot resume: the checkpoint in {checkpoint_dir} was made with different "
                            f"{', '.join(changed)}; rerun with the same flags, or without --resume to start over")
        load_trainable(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        history, best_state, best_val_loss, best_epoch, bad_epochs = (
            state[k] for k in ("history", "best_model", "best_val_loss", "best_epoch", "bad_epochs"))
        start = state["epoch"] + 1
        print(f"resuming after epoch {state['epoch']} from {last_path}")
    elif config.resume:
        print(f"nothing to resume in {checkpoint_dir}: starting from epoch 1")

    epochs_this_run = 0
    for epoch in range(start, config.epochs + 1):
        if bad_epochs >= config.patience:
            break
        model.train()
        order = torch.randperm(len(train_split), generator=generator)
        flips = torch.rand(len(train_split), generator=generator) < 0.5
        order, flips = order.to(device, non_blocking=True), flips.to(device, non_blocking=True)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        bar = tqdm(order.split(config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch")
        for batch in bar:
            inputs, labels = train_split.inputs[batch], train_split.labels[batch]
            if config.augment:   # left-right flips, on the device: MRI slices are near-symmetric
                inputs = torch.where(flips[batch].view(-1, 1, 1, 1), inputs.flip(-1), inputs)
            logits, loss = training_step(model, optimizer, inputs, labels, device, config.precision)
            scheduler.step()
            # Kept on the device: reading them back every step would stall the GPU.
            loss_sum += loss.detach() * len(batch)
            correct += (logits.argmax(1) == labels).sum()
        train_loss, train_accuracy = (loss_sum / len(train_split)).item(), (correct / len(train_split)).item()
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
               "lr": scheduler.get_last_lr()[0]}
        for name, split in (("val", val), ("test", test)):
            row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(
                predict(model, split.inputs, 2 * config.batch_size, device, config.precision), split.labels)
        if not (math.isfinite(train_loss) and math.isfinite(row["val_loss"])):
            bar.close()
            raise UserError(f"loss became {train_loss if not math.isfinite(train_loss) else row['val_loss']} in "
                            f"epoch {epoch}: stopped; the last good checkpoint (epoch {epoch - 1}) is in "
                            f"{checkpoint_dir}; try a lower --lr")
        history.append(row)
        bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_accuracy:.3f}",
                        val_loss=f"{row['val_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
        bar.close()

        weights = trainable_state(model)
        if row["val_loss"] < best_val_loss:
            best_state, best_val_loss, best_epoch, bad_epochs = weights, row["val_loss"], epoch, 0
            # The weights for users; last.pt below carries its own copy, so a kill between the two writes
            # can never pair these weights with another epoch's bookkeeping.
            atomic_save(best_path, lambda p: save_file(best_state, p, metadata={"epoch": str(epoch)}))
        else:
            bad_epochs += 1
        state = {"epoch": epoch, "model": weights, "best_model": best_state,
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "history": history, "best_val_loss": best_val_loss,
                 "best_epoch": best_epoch, "bad_epochs": bad_epochs, "settings": config.settings}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        atomic_save(last_path, lambda p: torch.save(state, p))

        epochs_this_run += 1
        if config.stop_after_epochs and epochs_this_run >= config.stop_after_epochs and epoch < config.epochs \
                and bad_epochs < config.patience:
            raise TrainingStopped(f"stopped after {epochs_this_run} epochs as asked (epoch {epoch}); "
                                  f"rerun with --resume to continue")

    load_trainable(model, best_state)
    return TrainResult(history, best_epoch, len(history))


def cached_embeddings(embed, splits: dict[str, Split], cache_dir: Path, key: str, batch_size: int,
                      device: torch.device, precision: str = "auto") -> dict[str, Split]:
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
        embeddings = {name: batched(embed, split.inputs, batch_size, device, precision)
                      for name, split in splits.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda p: save_file(embeddings, p))
    return {name: split.with_inputs(embeddings[name]) for name, split in splits.items()}
