"""E8's final evaluation and its files: captions for the test images (greedy or beam search), CIDEr-D,
CLIPScore and RefCLIPScore, metrics.json, predictions.json, per-image scores, curves, the gallery of the best
and worst captions by CLIPScore, and their word-by-word cross-attention maps (docs/captioning.md)."""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip_adapt.base import atomic_save, is_main_process, write_csv, write_json
from clip_adapt.captioning import MAX_CAPTION_TOKENS, Captioner, CaptionSplit, cider_d, clip_scores
from clip_adapt.models import count_params, normalized_image_embeddings
from clip_adapt.reporting import plot_curves, plt
from clip_adapt.training import autocast

GALLERY_SIZE = 4        # best and worst images each
MAX_WORD_PANELS = 12    # attention panels per image


def generate_captions(model: Captioner, split: CaptionSplit, batch_size: int, device, precision: str,
                      num_beams: int, max_new_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    captions = []
    for start in range(0, len(split.files), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split.files)))
        with autocast(device, precision):
            captions += model.captions(split.images.model_inputs(index, device), num_beams, max_new_tokens)
    return captions


@torch.no_grad()
def score_image_embeddings(clip, image_processor, split: CaptionSplit, device, batch_size: int) -> torch.Tensor:
    """The scoring CLIP's unit image embeddings of the split's images. The stored pixels were resized and
    cropped for the captioning CLIP; a scoring CLIP of another input size gets them resized bilinearly."""
    size = clip.config.vision_config.image_size
    mean = torch.tensor(image_processor.image_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=device).view(1, -1, 1, 1)
    out = []
    for start in range(0, len(split.files), batch_size):
        pixels = split.images.inputs[start:start + batch_size].to(device).float() / 255
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(normalized_image_embeddings(clip, (pixels - mean) / std).cpu())
    return torch.cat(out)


def save_grid(fig, path: Path, top: float = 0.9) -> None:
    """A grid of images with fixed spacing: tight_layout's measuring of a hundred small axes takes seconds."""
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.6)
    atomic_save(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def shown(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).cpu().numpy()


def plot_gallery(split: CaptionSplit, captions: list[str], clipscore: list[float], picks: dict[str, list[int]],
                 path: Path) -> None:
    columns = max(len(p) for p in picks.values())
    fig, axes = plt.subplots(len(picks), columns, figsize=(3.2 * columns, 3.6 * len(picks)), squeeze=False)
    for row, (title, indices) in enumerate(picks.items()):
        for column in range(columns):
            ax = axes[row][column]
            ax.axis("off")
            if column >= len(indices):
                continue
            i = indices[column]
            ax.imshow(shown(split.images.inputs[i]))
            ax.set_title(f"{title} · CLIP-S {clipscore[i]:.3f}\n{wrap(captions[i])}\nref: {wrap(split.references[i][0])}",
                         fontsize=7)
    save_grid(fig, path, top=0.85)


def wrap(text: str, width: int = 38) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)[:3]) or "(empty)"


def plot_attention(model: Captioner, split: CaptionSplit, indices: list[int], device, path: Path,
                   max_new_tokens: int = MAX_CAPTION_TOKENS) -> None:
    """One row per image: the image, then one panel per generated token with the last decoder layer's
    cross-attention (mean over heads) upsampled onto it, scaled within each panel (red: that panel's most
    attended patch). Drawn as one mosaic with labels: a hundred separate axes take matplotlib seconds."""
    pixels = split.images.model_inputs(torch.tensor(indices), device)
    maps = model.word_attention(pixels, max_new_tokens)
    columns = 1 + min(MAX_WORD_PANELS, max((len(words) for words, _ in maps), default=0))
    size = split.images.inputs.shape[-1]
    stride = size + size // 4   # a white gap above each row for its labels
    mosaic = np.ones((len(indices) * stride, columns * size, 3))
    labels = []
    for row, (i, (words, grids)) in enumerate(zip(indices, maps)):
        image = shown(split.images.inputs[i]) / 255
        top = row * stride + size // 4
        mosaic[top:top + size, :size] = image
        labels.append((row, 0, "image"))
        for column, (word, grid) in enumerate(zip(words[:columns - 1], grids), start=1):
            heat = F.interpolate(grid[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)).numpy()
            panel = 0.5 * image + 0.5 * plt.get_cmap("jet")(heat)[..., :3]
            mosaic[top:top + size, column * size:(column + 1) * size] = panel
            labels.append((row, column, word))
    fig, ax = plt.subplots(figsize=(1.6 * columns, 2.0 * len(indices)))
    ax.imshow(mosaic, interpolation="nearest")
    for row, column, text in labels:
        ax.text((column + 0.5) * size, row * stride + size // 4 - 1, text, ha="center", va="bottom", fontsize=8)
    ax.axis("off")
    ax.set_title("cross-attention per generated token (last layer, mean over heads): where the decoder looked, "
                 "not why it chose the word", fontsize=8, pad=14)
    save_grid(fig, path, top=0.93)


def best_epoch_row(history: list[dict], best_epoch: int) -> dict:
    return next((row for row in history if row["epoch"] == best_epoch), history[-1] if history else {})


def finish_captioning(exp, model: Captioner, result, score_clip, score_processor, score_tokenizer, **extra) -> dict:
    """Captions for the test images, their scores, and every output file (main process only writes)."""
    args, device, test = exp.args, exp.device, exp.data.test
    batch = 2 * args.batch_size
    captions = generate_captions(model, test, batch, device, args.precision, args.num_beams, args.max_caption_tokens)
    cider, cider_per_image = cider_d(test.references, captions)
    images = score_image_embeddings(score_clip, score_processor, test, device, batch)
    scores = clip_scores(images, score_clip, score_tokenizer, captions, test.references)
    trainable, total = count_params(model)
    best = best_epoch_row(result.history, result.best_epoch)
    metrics = {
        "experiment": exp.name, "task": "captioning", "peft": args.peft,
        "test_cider": cider, "test_clipscore": float(np.mean(scores["clipscore"])),
        "test_refclipscore": float(np.mean(scores["refclipscore"])),
        "val_loss": best.get("val_loss"), "test_loss": best.get("test_loss"),
        "val_token_accuracy": best.get("val_accuracy"), "test_token_accuracy": best.get("test_accuracy"),
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "converged": result.converged, "convergence_reason": result.convergence_reason,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "trainable_by_part": model.trainable_counts(),
        "wall_time_s": round(time.time() - exp.started, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": args.model, "decoder": args.decoder, "clipscore_model": args.clipscore_model or args.model,
        "data": args.data, "seed": args.seed, "split_seed": args.split_seed, "num_beams": args.num_beams,
        **exp.data.report, **extra,
        "settings": {k: v for k, v in sorted(vars(args).items())},
    }
    if not is_main_process():
        return metrics
    out = exp.out_dir
    write_json(out / "predictions.json", dict(zip(test.files, captions)))
    write_csv(out / "test_scores.csv", [
        {"file": f, "caption": c, "cider": ci, "clipscore": cs, "refclipscore": rc, "references": " | ".join(r)}
        for f, c, ci, cs, rc, r in zip(test.files, captions, cider_per_image, scores["clipscore"],
                                       scores["refclipscore"], test.references)])
    write_csv(out / "history.csv", result.history)
    plot_curves(result.history, "loss", f"{exp.name}: next-token loss", out / "loss_curves.png")
    plot_curves(result.history, "accuracy", f"{exp.name}: next-token accuracy", out / "accuracy_curves.png")
    order = np.argsort(scores["clipscore"], kind="stable")
    k = max(1, min(GALLERY_SIZE, len(order) // 2))
    picks = {"best": order[::-1][:k].tolist(), "worst": order[:k].tolist()}
    plot_gallery(test, captions, scores["clipscore"], picks, out / "gallery.png")
    plot_attention(model, test, picks["best"] + picks["worst"], device, out / "attention_maps.png",
                   args.max_caption_tokens)
    write_json(out / "metrics.json", metrics)
    print(f"{exp.name} ({args.peft}): test CIDEr-D {cider:.4f}, CLIPScore {metrics['test_clipscore']:.4f}, "
          f"RefCLIPScore {metrics['test_refclipscore']:.4f}; best epoch {result.best_epoch} of {result.epochs_run}, "
          f"{trainable:,} trainable of {total:,} parameters, {metrics['wall_time_s']:.1f} s; outputs in {out}")
    return metrics
