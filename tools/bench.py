"""Measures what each experiment costs at real scale, on this machine's device.

A full-size ViT-B/16 CLIP is built from its config: random weights have exactly the compute and memory cost
of the real ones, and need no download (or pass --model). For E1..E7 it times the training step and
evaluation on random 224x224 batches and reports images/s, peak memory and model FLOP utilisation (MFU):
FLOPs actually executed per second (counted by PyTorch's FlopCounterMode, forward + backward) divided by the
device's peak. Every model is built by its own script's build_model with the script's default flags. It
also times E2 both ways: image embeddings computed once and cached, versus the frozen tower
run every epoch. Writes <output-dir>/bench.json and prints a table.
"""

import argparse
import copy
import platform
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from PIL import Image
from transformers import CLIPModel

if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from clip_adapt.base import UserError, write_json  # noqa: E402
from clip_adapt.models import load_clip, tiny_clip, tiny_tokenizer, vit_b16_config  # noqa: E402
from clip_adapt.runner import classification_scripts  # noqa: E402
from clip_adapt.training import batched, training_step  # noqa: E402

CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (sparsity not counted), first match wins.
GPU_PEAK_BF16 = [(r"H100 PCIe", 756e12), (r"H100|H200", 989e12), (r"A100", 312e12)]


SCRIPTS = {script.name: script for script in classification_scripts()}


def build_model(name: str, clip: CLIPModel, tokenizer) -> torch.nn.Module:
    """The experiment's model as its script builds it with its default flags."""
    clip = copy.deepcopy(clip)   # prompt hooks attach to the CLIP they are given: one fresh copy each
    return SCRIPTS[name].build_model(clip, tokenizer, CLASS_NAMES)


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, value in GPU_PEAK_BF16:
            if re.search(pattern, name):
                return value, f"{name}: datasheet dense bf16 peak {value / 1e12:.0f} TFLOP/s"
    # No datasheet figure: the best of several large matmuls stands in for the peak. On a shared machine a
    # noisy moment can lower it, so MFU is approximate there.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: a @ a, device, steps=1, warmup=1 if i == 0 else 0) for i in range(5))
    what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return 2 * n ** 3 / best, f"{what}: measured {str(dtype).split('.')[-1]} {n}^3 matmul, best of 5"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call, after warm-up (compilation, autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def count_flops(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, backward: bool) -> int:
    """FLOPs of one step, counted on an eager-attention copy: the counter does not see every fused
    attention kernel, and the arithmetic is the same."""
    counted = copy.deepcopy(model).float()
    for module in counted.modules():
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(counted(pixels), labels)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # process peak so far, Linux kB


def bench_experiment(name, clip, tokenizer, args, device, peak) -> dict:
    model = build_model(name, clip, tokenizer).to(device)
    size = clip.config.vision_config.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.arange(args.batch_size, device=device) % 4
    eval_pixels = torch.randn(2 * args.batch_size, 3, size, size, device=device)
    run_model = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = {"experiment": name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        model.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        seconds = timed(lambda: training_step(run_model, optimizer, pixels, labels, device), device, args.steps,
                        args.warmup)
        flops = count_flops(model, pixels[:2], labels[:2], True) / 2
        row.update(train_images_per_s=args.batch_size / seconds, train_gflop_per_image=flops / 1e9,
                   train_mfu=flops * args.batch_size / seconds / peak)
    model.eval()
    seconds = timed(lambda: batched(run_model, eval_pixels, len(eval_pixels), device), device, args.steps, args.warmup)
    flops = count_flops(model, pixels[:2], labels[:2], False) / 2
    row.update(eval_images_per_s=len(eval_pixels) / seconds, eval_gflop_per_image=flops / 1e9,
               eval_mfu=flops * len(eval_pixels) / seconds / peak, peak_memory_mb=peak_memory_mb(device),
               trainable_params=sum(p.numel() for p in trainable))
    print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in row.items() if k != "experiment"), flush=True)
    return row


def bench_e2_cache(clip, args, device) -> dict:
    """E2 both ways on the real split sizes (408 train, 72 val, 320 test images by default):
    cached = embed every image once, then train the head; tower = run the frozen tower every epoch."""
    model = build_model("E2_linear_probe", clip, None).to(device).eval()
    size = clip.config.vision_config.image_size
    train_n, eval_n = args.e2_images
    images = torch.randn(train_n + eval_n, 3, size, size, device=device)
    labels = torch.arange(train_n, device=device) % 4
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    bs = args.batch_size

    def head_epoch(embeddings):
        for batch in torch.arange(train_n, device=device).split(bs):
            training_step(model.head, optimizer, embeddings[batch], labels[batch], device)

    def cached():
        embeddings = batched(model.embed, images, 2 * bs, device).to(device)
        for _ in range(args.e2_epochs):
            head_epoch(embeddings[:train_n])
            model.head(embeddings[train_n:])

    def tower_every_epoch():
        for _ in range(args.e2_epochs):
            head_epoch(batched(model.embed, images[:train_n], bs, device).to(device))
            batched(model, images[train_n:], 2 * bs, device)

    cached_s = timed(cached, device, steps=1, warmup=1)
    tower_s = timed(tower_every_epoch, device, steps=1, warmup=0)
    result = {"epochs": args.e2_epochs, "train_images": train_n, "eval_images": eval_n, "cached_s": cached_s,
              "tower_every_epoch_s": tower_s, "speedup": tower_s / cached_s}
    print(f"  E2 over {args.e2_epochs} epochs: cached embeddings {cached_s:.2f} s, tower every epoch "
          f"{tower_s:.2f} s: {result['speedup']:.1f}x faster", flush=True)
    return result


def bench_duplicates(num_images: int, source: Path, out_dir: Path) -> dict:
    """Times the near-copy check against loading (decoding and CLIP's 224 px preprocessing) on num_images
    JPEGs written from the source folder's images, each re-encoded at a random quality, resized and
    re-contrasted, so that the set holds copies as a real release does. 80% go to train, 20% to test."""
    import random
    import tempfile

    from PIL import ImageEnhance
    from transformers import CLIPImageProcessor

    from clip_adapt.copies import find_near_copies, pixel_hash
    from clip_adapt.data import image_files, open_rgb

    originals = [path for paths in image_files(source).values() for path in paths]
    if not originals:
        raise UserError(f"no images under {source}/train or {source}/test to build the benchmark set from")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        files, splits = [], []
        for i in range(num_images):
            with Image.open(originals[i % len(originals)]) as original:
                image = original.convert("RGB")
            if i >= len(originals):   # the first pass is the originals themselves, the rest copies of them
                scale = rng.uniform(0.6, 1.0)
                image = image.resize((max(32, int(image.width * scale)), max(32, int(image.height * scale))))
                image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
            files.append(Path(folder) / f"{i}.jpg")
            image.save(files[-1], quality=rng.randint(50, 95))
            splits.append("test" if rng.random() < 0.2 else "train")
        processor = CLIPImageProcessor()   # ViT-B/16's: 224 px
        started = time.perf_counter()
        images = [open_rgb({"path": str(f)}) for f in files]
        hashes = [pixel_hash(img) for img in images]
        for start in range(0, len(images), 64):
            processor(images[start:start + 64], return_tensors="pt")
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        found = find_near_copies(images, splits, hashes)
        check_s = time.perf_counter() - started
    result = {"images": num_images, "load_s": round(load_s, 2), "near_copy_check_s": round(check_s, 2),
              "check_over_load": round(check_s / load_s, 3), "candidate_pairs": found["candidates"],
              "copy_pairs": len(found["pairs"]), "clusters": len(found["clusters"]),
              "threads": torch.get_num_threads()}
    write_json(out_dir / "bench_duplicates.json", result)
    print(f"near-copy check on {num_images} images: {check_s:.1f} s, loading them {load_s:.1f} s "
          f"({check_s / load_s:.2f}x); {found['candidates']} candidate pairs, {len(found['pairs'])} copies "
          f"in {len(found['clusters'])} clusters; written to {out_dir / 'bench_duplicates.json'}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="hub id or local directory [default: a random full-size ViT-B/16 CLIP]")
    p.add_argument("--smoke", action="store_true", help="a tiny random CLIP: seconds on a CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--e2-epochs", type=int, default=10, help="epochs for the E2 cached-versus-tower timing")
    p.add_argument("--e2-images", type=int, nargs=2, default=[408, 392], metavar=("TRAIN", "EVAL"),
                   help="images per epoch in the E2 timing: trained on, and evaluated (val + test)")
    p.add_argument("--experiments", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel: PyTorch's fused scaled-dot-product, or transformers' plain one")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--duplicates", type=int, metavar="IMAGES",
                   help="instead: time the near-copy check against loading this many images built from --data")
    p.add_argument("--data", default=str(common.SAMPLE_DATA), help="image folder for --duplicates")
    args = p.parse_args()
    if args.duplicates:
        common.check_writable(Path(args.output_dir))
        bench_duplicates(args.duplicates, Path(args.data), Path(args.output_dir))
        return

    device = common.pick_device(args.device)
    common.check_writable(Path(args.output_dir))
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    if args.smoke:
        clip, _, tokenizer = tiny_clip()
        model_name = "tiny random CLIP"
    elif args.model:
        clip, _, tokenizer = load_clip(args.model)
        model_name = args.model
    else:
        config = vit_b16_config()
        config.text_config.eos_token_id = tokenizer.eos_token_id   # the stand-in tokenizer's, so pooling is right
        clip = CLIPModel(config).eval()
        model_name = "ViT-B/16 CLIP from its config, random weights"
    clip.set_attn_implementation(args.attention)
    peak, peak_how = peak_flops(device)
    print(f"bench: {model_name} on {device}, batch {args.batch_size}, {args.attention} attention; "
          f"peak assumed {peak / 1e12:.3g} TFLOP/s ({peak_how})", flush=True)

    rows = [bench_experiment(name, clip, tokenizer, args, device, peak) for name in args.experiments]
    e2 = bench_e2_cache(clip, args, device) if "E2_linear_probe" in args.experiments else None
    result = {"model": model_name, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "compile": args.compile, "attention": args.attention,
              "peak_flops": peak, "peak_flops_source": peak_how,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "experiments": rows,
              "e2_cached_vs_tower": e2}
    write_json(Path(args.output_dir) / "bench.json", result)

    print("\n| experiment | train img/s | eval img/s | train MFU | eval MFU | peak memory (MB) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        train = f"{r['train_images_per_s']:.1f} | " if "train_images_per_s" in r else "- | "
        mfu = f"{100 * r['train_mfu']:.1f}% | " if "train_mfu" in r else "- | "
        print(f"| {r['experiment']} | {train}{r['eval_images_per_s']:.1f} | {mfu}{100 * r['eval_mfu']:.1f}% | "
              f"{r['peak_memory_mb']:.0f} |")
    print(f"\nwritten to {Path(args.output_dir) / 'bench.json'}")


if __name__ == "__main__":
    common.run(main)
