"""E8's final evaluation and its files: captions for the test images (greedy or beam search), CIDEr-D,
CLIPScore and RefCLIPScore, metrics.json, predictions.json, per-image scores, curves, the gallery of the best
and worst captions by CLIPScore, and their word-by-word cross-attention maps (docs/captioning.md)."""

import math
import re
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip_adapt.base import is_main_process, write_csv, write_json
from clip_adapt.captioning import (CAPTIONER_CLIP, MAX_CAPTION_TOKENS, Captioner, CaptionSplit, LazyImages,
                                   cider_d, clean_caption, clip_scores, set_attention)
from clip_adapt.data import preprocess
from clip_adapt.models import count_params, normalized_image_embeddings
from clip_adapt.reporting import plot_curves, plt, save_png
from clip_adapt.training import autocast

GALLERY_SIZE = 4        # best and worst images each
MAX_WORD_PANELS = 12    # attention panels (words) per image; longer captions are cut (docs/captioning.md)


def generated(model: Captioner, split: CaptionSplit, batch_size: int, device, precision: str, num_beams: int,
              max_new_tokens: int = MAX_CAPTION_TOKENS) -> tuple[list[str], list[list[int]]]:
    """(captions, their token ids) for the split's images, greedy or by beam search: the captions as predictions,
    the gallery and the scores have them; the tokens, for attention maps of exactly those captions. The ids
    leave out the start token and stop before the first end token."""
    captions, sequences = [], []
    end = model.model.config.eos_token_id
    for start in range(0, len(split.files), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split.files)))
        with autocast(device, precision):
            out = model.generate(split.images.model_inputs(index, device), num_beams, max_new_tokens)
        for row in out[:, 1:].tolist():   # generate() starts every sequence with the start token
            sequences.append(row[:row.index(end)] if end in row else row)
        captions += [clean_caption(text) for text in model.tokenizer.batch_decode(out, skip_special_tokens=True)]
    return captions, sequences


def generate_captions(model: Captioner, split: CaptionSplit, batch_size: int, device, precision: str,
                      num_beams: int, max_new_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    return generated(model, split, batch_size, device, precision, num_beams, max_new_tokens)[0]


def same_preprocessing(a, b) -> bool:
    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop", "do_resize")
    return all(getattr(a, key, None) == getattr(b, key, None) for key in keys)


@torch.no_grad()
def score_image_embeddings(clip, image_processor, split: CaptionSplit, device, batch_size: int,
                           captioner_processor=None) -> torch.Tensor:
    """The scoring CLIP's unit image embeddings of the split's images, preprocessed as that CLIP's own processor
    does it (for openai/clip-vit-base-patch32: bicubic resize of the short side to 224, centre crop, its mean
    and std, as Hessel et al.'s code): the stored pixels when the captioning CLIP's processor is the same, else
    the images read again from their sources. Without sources, the stored pixels resized bilinearly."""
    size = clip.config.vision_config.image_size
    if captioner_processor is not None and same_preprocessing(image_processor, captioner_processor):
        pixels = split.images.inputs
    elif split.sources is not None:
        pixels = preprocess(LazyImages(split.sources), image_processor)
    else:
        pixels = split.images.inputs
    mean = torch.tensor(image_processor.image_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=device).view(1, -1, 1, 1)
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size].to(device).float() / 255
        if batch.shape[-1] != size:
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(normalized_image_embeddings(clip, (batch - mean) / std).cpu())
    return torch.cat(out)


def save_grid(fig, path: Path, top: float = 0.9) -> None:
    """A grid of images with fixed spacing: tight_layout's measuring of a hundred small axes takes seconds."""
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.6)
    save_png(fig, path, dpi=100)


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


def caption_words(tokenizer, tokens: list[int]) -> list[tuple[str, list[int]]]:
    """The words of the caption these tokens spell, as clean_caption writes it (white space between words, a full
    stop joined to the word before it), each with the positions of the tokens that spell it: a token belongs
    to every word its decoded text reaches into with more than white space (a byte that completes a character
    another token began adds no text: it belongs to that character's word). Works for byte-level BPE (GPT-2)
    and word-level tokenizers alike."""
    text, spans = "", []
    for k in range(len(tokens)):
        longer = tokenizer.decode(tokens[:k + 1])
        spans.append((len(text), len(longer)))
        text = longer
    words = []
    for match in re.finditer(r"\S+", text):
        if words and match.group().startswith("."):   # clean_caption: "square ." is "square."
            words[-1] = (words[-1][0], match.end())
        else:
            words.append((match.start(), match.end()))
    return [(clean_caption(text[start:end]),
             [k for k, (a, b) in enumerate(spans)
              if text[max(a, start):min(b, end)].strip() or (a == b and start < a <= end)])
            for start, end in words]


@torch.no_grad()
def word_attention(model: Captioner, pixels: torch.Tensor, sequences: list[list[int]]
                   ) -> list[tuple[list[str], torch.Tensor]]:
    """For each image and its reported caption (token ids, as generated), the last decoder layer's
    cross-attention, averaged over heads, on the encoder's patch grid, per word: the mean over the word's
    tokens, as the study showed it. ([word], [words, rows, columns]); the class token's share is left out.

    The caption's tokens are fed back in one teacher-forced pass: the attention at each position is the one
    generation had when it chose the next token, whichever decoding (greedy or beam search) chose the caption,
    since each step depends only on the tokens before it. Needs eager attention (sdpa returns no weights),
    switched on for this call only."""
    model.eval()
    config = model.model.config
    language_model = model.model.decoder
    language_model = getattr(language_model, "get_base_model", lambda: language_model)()   # under peft
    width = max(1, max((len(tokens) for tokens in sequences), default=1))
    inputs = torch.full((len(sequences), width), config.pad_token_id, dtype=torch.long)
    inputs[:, 0] = config.decoder_start_token_id
    for row, tokens in enumerate(sequences):
        inputs[row, 1:1 + len(tokens[:width - 1])] = torch.tensor(tokens[:width - 1], dtype=torch.long)
    previous = language_model.config._attn_implementation
    set_attention(language_model, model.eager_attention())   # with the prefix, when there is one
    try:
        out = model.model(pixel_values=pixels, decoder_input_ids=inputs.to(pixels.device), output_attentions=True)
    finally:
        set_attention(language_model, previous)
    # the query at position k (start token, then the caption's first k tokens) chose token k
    steps = out.cross_attentions[-1].float().mean(1)[..., 1:]   # [images, positions, patches]
    side = math.isqrt(steps.shape[-1])
    grids = steps.reshape(*steps.shape[:2], side, side).cpu()
    results = []
    for tokens, grid in zip(sequences, grids):
        words = caption_words(model.tokenizer, tokens)
        results.append(([word for word, _ in words],
                        torch.stack([grid[positions].mean(0) for _, positions in words]) if words else grid[:0]))
    return results


def plot_attention(model: Captioner, split: CaptionSplit, indices: list[int], sequences: list[list[int]], device,
                   path: Path) -> list[list[str]]:
    """One row per image: the image, then one panel per word of its reported caption (at most MAX_WORD_PANELS),
    with the last decoder layer's cross-attention (mean over heads, mean over the word's tokens) upsampled onto
    it, scaled within each panel (red: that panel's most attended patch). Drawn as one mosaic with labels: a
    hundred separate axes take matplotlib seconds."""
    pixels = split.images.model_inputs(torch.tensor(indices), device)
    maps = word_attention(model, pixels, [sequences[i] for i in indices])
    columns = 1 + min(MAX_WORD_PANELS, max((len(words) for words, _ in maps), default=0))
    size = split.images.inputs.shape[-1]
    stride = size + size // 4   # a white gap above each row for its labels
    mosaic = np.ones((len(indices) * stride, columns * size, 3))
    labels = []
    for row, (i, (words, grids)) in enumerate(zip(indices, maps)):
        image = shown(split.images.inputs[i]) / 255
        top = row * stride + size // 4
        mosaic[top:top + size, :size] = image
        labels.append((row, 0, "image" if words else "image (no words)"))
        for column, (word, grid) in enumerate(zip(words[:columns - 1], grids), start=1):
            heat = F.interpolate(grid[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)).numpy()
            panel = 0.5 * image + 0.5 * plt.get_cmap("jet")(heat)[..., :3]
            mosaic[top:top + size, column * size:(column + 1) * size] = panel
            word = word if len(word) <= 12 else word[:11] + "…"   # a label no wider than its panel
            labels.append((row, column, word if column < columns - 1 or len(words) <= columns - 1 else word + " …"))
    width = max(1.6 * columns, 6.4)   # room for the title, even when the captions have few or no words
    fig, ax = plt.subplots(figsize=(width, 2.0 * len(indices) + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    for row, column, text in labels:
        ax.text((column + 0.5) * size, row * stride + size // 4 - 1, text, ha="center", va="bottom", fontsize=8)
    ax.axis("off")
    ax.set_title(textwrap.fill(f"cross-attention per word of the gallery's caption (last layer, mean over heads and "
                               f"the word's tokens; first {MAX_WORD_PANELS} words): where the decoder looked, not "
                               f"why it chose the word", width=int(14 * width)), fontsize=8, pad=14)
    save_grid(fig, path, top=0.93)
    return [words for words, _ in maps]


def best_epoch_row(history: list[dict], best_epoch: int) -> dict:
    return next((row for row in history if row["epoch"] == best_epoch), history[-1] if history else {})


def scorer_of(args) -> str:
    """The CLIP that scored CLIPScore, by name: --clipscore-model, or for 'captioner' the captioner's --model."""
    if args.clipscore_model == CAPTIONER_CLIP:
        return f"{args.model} (the captioner's own CLIP)"
    return args.clipscore_model


def finish_captioning(exp, model: Captioner, result, score_clip, score_processor, score_tokenizer, **extra) -> dict:
    """Captions for the test images, their scores, and every output file (main process only writes)."""
    args, device, test = exp.args, exp.device, exp.data.test
    batch = 2 * args.batch_size
    captions, sequences = generated(model, test, batch, device, args.precision, args.num_beams,
                                    args.max_caption_tokens)
    cider, cider_per_image = cider_d(test.references, captions)
    images = score_image_embeddings(score_clip, score_processor, test, device, batch, exp.image_processor)
    scores = clip_scores(images, score_clip, score_tokenizer, captions, test.references)
    trainable, total = count_params(model)
    own = args.clipscore_model == CAPTIONER_CLIP
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
        "model": args.model, "decoder": args.decoder, "clipscore_model": args.model if own else args.clipscore_model,
        "clipscore_scorer": "the captioner's own CLIP" if own else "independent of the captioner",
        "cider_tokenizer": "pycocoevalcap PTBTokenizer (Stanford CoreNLP, Java), punctuation dropped",
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
    shown_words = plot_attention(model, test, picks["best"] + picks["worst"], sequences, device,
                                 out / "attention_maps.png")
    write_json(out / "gallery.json", [
        {"pick": pick, "file": test.files[i], "caption": captions[i], "clipscore": scores["clipscore"][i],
         "attention_words": words}
        for (pick, i), words in zip([(p, i) for p, indices in picks.items() for i in indices], shown_words)])
    write_json(out / "metrics.json", metrics)
    print(f"{exp.name} ({args.peft}): test CIDEr-D {cider:.4f}, CLIPScore {metrics['test_clipscore']:.4f}, "
          f"RefCLIPScore {metrics['test_refclipscore']:.4f} (scored by {scorer_of(args)}, "
          f"{metrics['clipscore_scorer']}); best epoch {result.best_epoch} of {result.epochs_run}, "
          f"{trainable:,} trainable of {total:,} parameters, {metrics['wall_time_s']:.1f} s; outputs in {out}")
    return metrics
