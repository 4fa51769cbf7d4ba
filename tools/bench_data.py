"""Measures the data pipeline at CIFAR scale: how fast images are preprocessed for CLIP and what holding them costs.

Synthesises CIFAR-sized images (32x32 RGB, random pixels, so no download), runs clip_adapt.data.preprocess, the exact
step load_data uses (CLIP's bicubic resize and centre crop in parallel threads into one uint8 tensor), with
OpenAI CLIP's image processor settings (224 px), and reports images/s, the tensor's size as uint8 against what
fp32 would take, and the process's peak memory. Then it times the per-batch normalisation on the device.
Writes <output-dir>/bench_data.json.

With --compare-processors it instead times transformers' torchvision-backed ("fast") CLIP image processor
against the PIL one on the same images (synthetic, or the first --images of a --data folder) and measures how far
their pixels differ: <output-dir>/bench_processors.json. That needs a torchvision built for the installed torch.
"""

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from clip_adapt.base import UserError, write_json  # noqa: E402
from clip_adapt.data import Split, preprocess  # noqa: E402
from clip_adapt.models import check_torchvision, clip_image_processor  # noqa: E402


def synthetic_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def real_images(folder: Path, count: int) -> list[Image.Image]:
    """Up to `count` images of an image folder (train/ then test/), decoded as loading decodes them."""
    from clip_adapt.data import image_files, open_rgb
    paths = [path for paths in image_files(folder).values() for path in paths][:count]
    if not paths:
        raise UserError(f"no images under {folder}/train or {folder}/test")
    return [open_rgb({"path": path}) for path in paths]


def compare_processors(images: list[Image.Image], image_size: int, workers: int | None) -> dict:
    """CLIP's preprocessing by transformers' PIL processor and by its torchvision ("fast") one, on the same
    images in the same threads, one after the other: images/s of each (the better of two passes, after a
    warm-up) and how far their uint8 pixels differ."""
    pixels, speed = {}, {}
    for kind in ("pil", "fast"):
        processor = clip_image_processor(image_size, kind)
        preprocess(images[:64], processor, workers)   # warm-up: first calls, thread start-up
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            pixels[kind] = preprocess(images, processor, workers)
            seconds.append(time.perf_counter() - started)
        speed[kind] = len(images) / min(seconds)
    difference = (pixels["fast"].int() - pixels["pil"].int()).abs()
    return {"images": len(images), "pil_images_per_s": round(speed["pil"], 1),
            "fast_images_per_s": round(speed["fast"], 1), "fast_over_pil": round(speed["fast"] / speed["pil"], 2),
            "largest_pixel_difference": int(difference.max()),
            "mean_pixel_difference": round(float(difference.float().mean()), 4),
            "share_of_pixels_differing": round(float((difference > 0).float().mean()), 4)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports kB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=60_000, help="how many synthetic images (CIFAR-10 train: 50,000)")
    p.add_argument("--source-size", type=int, default=32, help="side of the synthetic images, px")
    p.add_argument("--image-size", type=int, default=224, help="CLIP's input side, px")
    p.add_argument("--workers", type=int, help="preprocessing threads [default: min(8, CPU cores)]")
    p.add_argument("--batch-size", type=int, default=256, help="for timing the normalisation on the device")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compare-processors", action="store_true",
                   help="instead: time transformers' torchvision (fast) image processor against the PIL one on the "
                        "same images, and compare their pixels (needs torchvision)")
    p.add_argument("--data", help="with --compare-processors: an image folder (train/<class>/*, test/<class>/*) "
                                  "whose first --images images are compared [default: the synthetic images]")
    p.add_argument("--smoke", action="store_true", help="300 images at 64 px: seconds")
    p.add_argument("--output-dir", default="outputs")
    args = p.parse_args()
    if args.smoke:
        args.images, args.image_size = 300, 64
    if args.images < 1:
        raise UserError("--images must be at least 1")
    device = common.pick_device(args.device)
    common.check_writable(Path(args.output_dir))
    if args.compare_processors:
        check_torchvision()
        images = real_images(Path(args.data), args.images) if args.data else synthetic_images(args.images,
                                                                                             args.source_size)
        result = {"source": args.data or f"synthetic {args.source_size} px", "image_size": args.image_size,
                  "workers": args.workers or min(8, os.cpu_count() or 1), "torch_threads": torch.get_num_threads(),
                  "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
                  "torch": torch.__version__, **compare_processors(images, args.image_size, args.workers)}
        write_json(Path(args.output_dir) / "bench_processors.json", result)
        print(f"bench_data: {result['images']:,} images ({result['source']}) -> {args.image_size} px with "
              f"{result['workers']} threads: PIL {result['pil_images_per_s']:,} images/s, torchvision (fast) "
              f"{result['fast_images_per_s']:,} images/s ({result['fast_over_pil']}x); pixels differ by at most "
              f"{result['largest_pixel_difference']} of 255 (mean {result['mean_pixel_difference']}, "
              f"{100 * result['share_of_pixels_differing']:.1f}% of them differ)")
        print(f"written to {Path(args.output_dir) / 'bench_processors.json'}")
        return
    processor = clip_image_processor(args.image_size)

    images = synthetic_images(args.images, args.source_size)
    preprocess(images[:64], processor, args.workers)   # warm-up, untimed: first calls, thread start-up
    before = peak_rss_gb()
    started = time.perf_counter()
    pixels = preprocess(images, processor, args.workers)
    seconds = time.perf_counter() - started
    uint8_gb = pixels.numel() / 2**30

    # Where training holds the images when they fit (MRIData.to): on the device. One untimed batch first, so that
    # neither the CUDA context nor a copy from pageable host memory, which the training loop never makes, is timed.
    split = Split(pixels, torch.zeros(len(pixels), dtype=torch.long), [], tuple(processor.image_mean),
                  tuple(processor.image_std)).to(device)
    batches = min(20, -(-len(split) // args.batch_size))
    split.model_inputs(torch.arange(min(args.batch_size, len(split)), device=device), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for b in range(batches):
        split.model_inputs(torch.arange(b * args.batch_size, min((b + 1) * args.batch_size, len(split)),
                                        device=device), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    normalise_seconds = time.perf_counter() - started
    normalised = min(batches * args.batch_size, len(split))

    result = {
        "images": args.images, "source_size": args.source_size, "image_size": args.image_size,
        "workers": args.workers or min(8, os.cpu_count() or 1), "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "preprocess_seconds": round(seconds, 2), "preprocess_images_per_s": round(args.images / seconds, 1),
        "uint8_bytes": pixels.numel(), "fp32_would_be_bytes": 4 * pixels.numel(),
        "uint8_gb": round(uint8_gb, 3), "fp32_would_be_gb": round(4 * uint8_gb, 3),
        "peak_rss_before_gb": round(before, 3), "peak_rss_gb": round(peak_rss_gb(), 3),
        "device": str(device), "normalise_images_per_s": round(normalised / normalise_seconds, 1),
    }
    write_json(Path(args.output_dir) / "bench_data.json", result)
    print(f"bench_data: {args.images:,} images {args.source_size} px -> {args.image_size} px with "
          f"{result['workers']} threads: {result['preprocess_images_per_s']:,} images/s "
          f"({seconds:.1f} s); uint8 tensor {uint8_gb:.2f} GiB (fp32 would be {4 * uint8_gb:.2f} GiB); process peak "
          f"{result['peak_rss_gb']:.2f} GiB; normalisation on {device}: {result['normalise_images_per_s']:,} images/s")
    print(f"written to {Path(args.output_dir) / 'bench_data.json'}")


if __name__ == "__main__":
    common.run(main)
