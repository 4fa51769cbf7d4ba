"""Measures what each experiment costs at real scale, on this machine's device.

A full-size ViT-B/16 CLIP is built from its config (--model random:vit-b16, the default; also random:vit-l14 and
the others of clip_adapt.models.CLIP_ARCHITECTURES): random weights have exactly the compute and memory cost
of the real ones, and need no download (or pass --model a hub id or directory). For each classification
experiment (E1..E7 by default) it times the training step and evaluation on random 224x224 batches and reports
the step time, images/s, peak memory and model FLOP utilisation (MFU): FLOPs actually executed per second
(counted by PyTorch's FlopCounterMode, forward + backward) divided by the device's peak. Every model is built by
its own script's build_model with the script's default flags. With E2 it also times E2 both ways: image
embeddings computed once and cached, versus the frozen tower run every epoch. A captioning experiment (E8, by
name in --experiments) is timed on random captions of the longest length, with a decoder of GPT-2's size and
random weights (or the tiny one with --smoke). Writes <output-dir>/bench.json after each experiment and prints a
table; an experiment that fails (out of memory, say) is recorded with its error and the next one runs.
"""

import argparse
import copy
import gc
import platform
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode
from PIL import Image
from transformers import CLIPModel

if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from clip_adapt.base import UserError, write_json  # noqa: E402
from clip_adapt.data import Split  # noqa: E402
from clip_adapt.models import RANDOM_PREFIX, TINY_CLIP, load_clip, weights_of  # noqa: E402
from clip_adapt.runner import classification_scripts, experiment_scripts  # noqa: E402
from clip_adapt.training import batched, brings_own_loss, own_loss_and_accuracy, training_step  # noqa: E402
from tools.bench_models import image_size_of  # noqa: E402

CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # OpenAI CLIP's
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (half the "with sparsity" figure), first match wins:
# H100 PCIe 1,513 / 2; H100 NVL and H200 NVL 1,671 / 2; H100 and H200 SXM 1,979 / 2; A100 312.
GPU_PEAK_BF16 = [(r"H100 PCIe", 756e12), (r"H[12]00 NVL", 835e12), (r"H100|H200", 989e12), (r"A100", 312e12)]


SCRIPTS = {script.name: script for script in experiment_scripts()}
CLASSIFIERS = [script.name for script in classification_scripts()]


def build_model(name: str, clip: CLIPModel, tokenizer, decoder: str | None = None) -> torch.nn.Module:
    """The experiment's model as its script builds it with its default flags (a captioner: with --decoder
    `decoder`, or the tiny one where None)."""
    clip = copy.deepcopy(clip)   # prompt hooks attach to the CLIP they are given: one fresh copy each
    script = SCRIPTS[name]
    if script.task == "captioning":
        # As E8 does: the decoder's new cross-attention layers, untrained, are what it trains; no warning for them.
        transformers.logging.set_verbosity_error()
        return script.build_model(clip, tokenizer, [], script.default_args(
            *(["--decoder", decoder] if decoder else ["--smoke"])))
    return script.build_model(clip, tokenizer, CLASS_NAMES)


def random_gpt2(folder: Path) -> str:
    """GPT-2's architecture (GPT2Config's defaults: 12 layers 768 wide, 12 heads, a 50,257-token vocabulary) with
    random weights and the byte-level tokenizer, saved as a local decoder: E8 at GPT-2's cost, with no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clip_adapt.captioning import byte_tokenizer
    tokenizer = byte_tokenizer()
    GPT2LMHeadModel(GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def caption_targets(tokenizer, n: int, device: torch.device) -> torch.Tensor:
    """n random captions of the longest length E8 trains on: [start, MAX_CAPTION_TOKENS tokens, end]."""
    from clip_adapt.captioning import MAX_CAPTION_TOKENS
    tokens = torch.randint(0, tokenizer.eos_token_id, (n, MAX_CAPTION_TOKENS + 2), device=device)
    tokens[:, 0], tokens[:, -1] = tokenizer.bos_token_id, tokenizer.eos_token_id
    return tokens


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
    best = min(timed(lambda: a @ a, device, steps=1, warmup=1 if i == 0 else 0)[0] for i in range(5))
    what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return 2 * n ** 3 / best, f"{what}: measured {str(dtype).split('.')[-1]} {n}^3 matmul, best of 5"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per call after warm-up, seconds of the warm-up: compilation, autotuning, allocator growth)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warmed = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - warmed) / steps, warmed - start


def count_flops(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, backward: bool) -> int:
    """FLOPs of one step, counted on an eager-attention copy: the counter does not see every fused
    attention kernel, and the arithmetic is the same."""
    counted = copy.deepcopy(model).float()
    for module in counted.modules():
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        loss = counted(pixels, labels)[0] if brings_own_loss(counted) else F.cross_entropy(counted(pixels), labels)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def flops_of_step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, backward: bool,
                  batch_size: int) -> tuple[float, float]:
    """(FLOPs per image, FLOPs of a step of batch_size images), from counts at 2 and 4 images: what does not
    grow with the batch (E5's text tower, run once per step for all the class prompts) is counted once per
    step, not once per image."""
    two, four = (count_flops(model, pixels[:n], labels[:n], backward) for n in (2, 4))
    per_image = (four - two) / 2
    return per_image, two - 2 * per_image + per_image * batch_size


def start_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """On a GPU, the most allocated since start_peak_memory; on the CPU the process's peak so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux kB


def own_backbone(name: str, args, device: torch.device):
    """(backbone, its image size, None) for a script that brings its own (E14's ResNet): that architecture with
    random weights at full size (random:resnet-18), or the tiny one with --smoke; bench's --model is CLIP's."""
    script = SCRIPTS[name]
    model = script.default_args("--smoke").model if args.smoke else RANDOM_PREFIX + "resnet-18"
    backbone, processor, _ = script.load_backbone(script.default_args("--model", model), device)
    return backbone, image_size_of(processor), None


def bench_experiment(name, clip, tokenizer, args, device, peak, decoder=None) -> dict:
    if SCRIPTS[name].takes_clip:
        size = clip.config.vision_config.image_size
    else:
        clip, size, tokenizer = own_backbone(name, args, device)
    model = build_model(name, clip, tokenizer, decoder).to(device)
    captioning = SCRIPTS[name].task == "captioning"
    n = 2 * args.batch_size
    # As in training: uint8 pixels on the device, normalised there batch by batch (Split.model_inputs).
    labels = caption_targets(model.tokenizer, n, device) if captioning else torch.arange(n, device=device) % 4
    images = Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device), labels, [],
                   CLIP_MEAN, CLIP_STD)
    batch = torch.arange(args.batch_size, device=device)
    pixels, labels = images.model_inputs(batch, device), images.labels[batch]
    run_model = torch.compile(model) if args.compile else model
    row = {"experiment": name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    peaks = []   # memory at its most during the timed steps (FLOP counting, on a copy, comes after)
    if trainable:
        model.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        start_peak_memory(device)
        seconds, warmup = timed(lambda: training_step(run_model, optimizer, images.model_inputs(batch, device),
                                                      images.labels[batch], device), device, args.steps, args.warmup)
        peaks.append(peak_memory_mb(device))
        per_image, per_step = flops_of_step(model, pixels, labels, True, args.batch_size)
        row.update(train_step_s=seconds, train_warmup_s=warmup, train_images_per_s=args.batch_size / seconds,
                   train_gflop_per_image=per_image / 1e9, train_mfu=per_step / seconds / peak,
                   train_peak_memory_mb=peaks[0])
    model.eval()
    # A captioner is evaluated as training evaluates it: next-token loss and accuracy (own_loss_and_accuracy).
    evaluate = (lambda: own_loss_and_accuracy(run_model, images, len(images), device)) if captioning else \
        (lambda: batched(run_model, images, len(images), device))
    start_peak_memory(device)
    seconds, warmup = timed(evaluate, device, args.steps, args.warmup)
    peaks.append(peak_memory_mb(device))
    per_image, per_step = flops_of_step(model, pixels, labels, False, len(images))
    row.update(eval_pass_s=seconds, eval_warmup_s=warmup, eval_images_per_s=len(images) / seconds,
               eval_gflop_per_image=per_image / 1e9, eval_mfu=per_step / seconds / peak, peak_memory_mb=max(peaks),
               trainable_params=sum(p.numel() for p in trainable))
    print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in row.items() if k != "experiment"), flush=True)
    return row


def measured(name: str, measure, device: torch.device) -> dict:
    """measure()'s result; where it fails (out of memory, an error), the error, printed, in its place: the next
    experiment still runs. The failed one's memory is handed back first."""
    try:
        return measure()
    except Exception as error:   # noqa: BLE001 - any failure is recorded, and the benchmark goes on
        traceback.print_exc()
        what = "out of memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
        return {"experiment": name, "error": f"{what}: {str(error).strip().splitlines()[0] if str(error) else ''}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


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

    cached_s = timed(cached, device, steps=1, warmup=1)[0]
    tower_s = timed(tower_every_epoch, device, steps=1, warmup=0)[0]
    result = {"epochs": args.e2_epochs, "train_images": train_n, "eval_images": eval_n, "cached_s": cached_s,
              "tower_every_epoch_s": tower_s, "speedup": tower_s / cached_s}
    print(f"  E2 over {args.e2_epochs} epochs: cached embeddings {cached_s:.2f} s, tower every epoch "
          f"{tower_s:.2f} s: {result['speedup']:.1f}x faster", flush=True)
    return result


DUPLICATE_SIZES = (7_000, 28_000, 60_000)
PLANTED_EVERY = 50   # one image in 50 of the benchmark set is a planted near copy of an earlier one
TILE = 256   # side of each scan in a mosaic of the benchmark set

_small_originals: list = []   # per worker process: the originals reduced to TILE px, decoded once


def read_originals(originals: list[str]) -> None:
    _small_originals[:] = [Image.open(path).convert("RGB").resize((TILE, TILE)) for path in originals]


def mosaic(j: int) -> Image.Image:
    """A distinct image built from four scans: four originals drawn by image number j, each turned by a multiple
    of 90 degrees and maybe mirrored, on a 2 x 2 grid."""
    rng = random.Random(j)
    canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
    for cell in range(4):
        tile = rng.choice(_small_originals).rotate(90 * rng.randrange(4))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas.paste(tile, (TILE * (cell % 2), TILE * (cell // 2)))
    return canvas


def planted_source(i: int, num_originals: int) -> int | None:
    """The earlier mosaic that image i is a planted copy of, or None where image i is no planted copy."""
    if i < num_originals + PLANTED_EVERY or i % PLANTED_EVERY:
        return None
    rng = random.Random(-i)
    while True:   # a mosaic, never another planted copy: a cluster is one mosaic and its planted copies
        j = rng.randrange(num_originals, i)
        if j % PLANTED_EVERY:
            return j


def planted_pairs(size: int, num_originals: int) -> set[tuple[int, int]]:
    """The copy pairs planted among the first `size` images: each planted copy with its source, and two planted
    copies of the same source with each other."""
    groups = defaultdict(list)
    for i in range(size):
        source = planted_source(i, num_originals)
        if source is not None:
            groups[source].append(i)
    return {(a, b) for source, copies in groups.items() for members in [[source, *copies]]
            for x, a in enumerate(members) for b in members[x + 1:]}


def write_benchmark_image(job: tuple) -> None:
    """Writes image i of the benchmark set as a JPEG at a random quality: the originals first (re-encoded, with
    the copies they hold), then distinct mosaics of them (mosaic), and in every PLANTED_EVERY a planted copy
    of an earlier mosaic: resized to 60-100% and re-contrasted, as a real release holds copies."""
    from PIL import ImageEnhance
    i, original, target, num_originals = job
    rng = random.Random(i)
    source = planted_source(i, num_originals)
    if i < num_originals:
        with Image.open(original) as opened:
            image = opened.convert("RGB")
    elif source is None:
        image = mosaic(i)
    else:
        image = mosaic(source)
        scale = rng.uniform(0.6, 1.0)
        image = image.resize((int(image.width * scale), int(image.height * scale)))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    image.save(target, quality=rng.randint(50, 95))


def load_once(folder: str, mode: str, queue) -> None:
    """In a fresh process, so that its peak memory is this load's alone: load_data as the experiments call it."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from clip_adapt import timing
    from clip_adapt.data import load_data
    from clip_adapt.progress import set_quiet
    set_quiet(True)
    timing.reset()
    started = time.perf_counter()
    with timing.phase("loading"):
        data = load_data(folder, CLIPImageProcessorPil(), duplicates=mode)   # ViT-B/16's processor: 224 px
    seconds = time.perf_counter() - started
    splits = (data.train, data.val, data.test)
    queue.put({"seconds": seconds, "pairs_stage_s": timing.seconds()["copy_check"],
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "uint8_gib": sum(s.inputs.numel() for s in splits) / 2**30,
               "copy_pairs": [(int(Path(p["a"]).stem), int(Path(p["b"]).stem))
                              for p in data.report.get("copy_pairs", [])],
               "cross_split_clusters": len(data.report["train_test_duplicates"])})


def bench_duplicates(num_images: int, source: Path, out_dir: Path, sizes=DUPLICATE_SIZES) -> dict:
    """Times the near-copy check against loading, at 7,000, 28,000 and 60,000 images (those up to num_images,
    and num_images), on JPEGs written from the source folder's images (write_benchmark_image): the originals,
    then distinct mosaics of them, one in PLANTED_EVERY a planted near copy of an earlier mosaic. 80% go to
    train, 20% to test, in class folders. Each size is loaded twice by load_data, each time in a fresh process:
    with the exact check only (loading: decoding, hashing, CLIP's 224 px preprocessing) and with the near-copy
    check. The check's cost is the difference, in time and in the process's peak memory; it also says how many
    planted copy pairs the check found (planted_pairs), and how many other pairs among the mosaics it called
    copies."""
    import multiprocessing
    import os
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from clip_adapt.data import image_files

    def summary(rows):
        return {"source": str(source), "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(), "image_set": write_benchmark_image.__doc__,
                "sizes": rows}

    originals = [path for paths in image_files(source).values() for path in paths]
    if not originals:
        raise UserError(f"no images under {source}/train or {source}/test to build the benchmark set from")
    sizes = sorted({size for size in sizes if size < num_images} | {num_images})
    rng = random.Random(0)
    context = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        targets = []
        for i in range(num_images):
            original = Path(originals[i % len(originals)])   # a mosaic takes the class folder of its number
            split = "test" if rng.random() < 0.2 else "train"
            targets.append(Path(folder) / "all" / split / original.parent.name / f"{i}.jpg")
            targets[-1].parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with ProcessPoolExecutor(os.cpu_count(), mp_context=context, initializer=read_originals,
                                 initargs=(originals,)) as pool:
            for size in sizes:   # each size's images written just before it is measured: results come size by size
                started = time.perf_counter()
                list(pool.map(write_benchmark_image, [(i, originals[i % len(originals)], targets[i], len(originals))
                                                      for i in range(written, size)], chunksize=64))
                print(f"wrote images {written:,} to {size:,} in {time.perf_counter() - started:.0f} s", flush=True)
                written = size
                rows.append(measure_size(size, targets, Path(folder), len(originals), context))
                write_json(out_dir / "bench_duplicates.json", summary(rows))   # after each size: a long run is kept
    result = summary(rows)
    print("\n| images | loading (s) | near-copy check (s) | check / loading | of which pairs stage (s) | uint8 images "
          "(GiB) | peak, loading (GiB) | peak, loading + check (GiB) | check adds (GiB) | planted copy pairs found | "
          "other pairs called copies |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['load_s']} | {r['near_copy_check_s']} | {r['check_over_load']} | "
              f"{r['pairs_stage_s']} | {r['uint8_gib']} | {r['peak_rss_load_gib']} | {r['peak_rss_with_check_gib']} | "
              f"{r['check_adds_gib']} | {r['planted_pairs_found']} of {r['planted_pairs']} | "
              f"{r['other_pairs_among_mosaics']} |")
    print(f"\nwritten to {out_dir / 'bench_duplicates.json'}")
    return result


def measure_size(size: int, targets: list[Path], folder: Path, num_originals: int, context) -> dict:
    """Loads the first `size` images of the set twice, each in a fresh process (exact check, near-copy check),
    and compares."""
    subset = folder / str(size)   # the first `size` images, linked
    for target in targets[:size]:
        link = subset / target.relative_to(folder / "all")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    measured = {}
    for mode in ("exact", "near"):
        queue = context.Queue()
        child = context.Process(target=load_once, args=(str(subset), mode, queue))
        child.start()
        measured[mode] = queue.get()
        child.join()
    exact, near = measured["exact"], measured["near"]
    found = {tuple(sorted(pair)) for pair in near["copy_pairs"]}
    planted = planted_pairs(size, num_originals)
    among_mosaics = {pair for pair in found if min(pair) >= num_originals}
    row = {"images": size, "load_s": round(exact["seconds"], 1),
           "near_copy_check_s": round(near["seconds"] - exact["seconds"], 1),
           "check_over_load": round((near["seconds"] - exact["seconds"]) / exact["seconds"], 2),
           "pairs_stage_s": round(near["pairs_stage_s"], 1),
           "uint8_gib": round(exact["uint8_gib"], 2), "peak_rss_load_gib": round(exact["peak_rss_gib"], 2),
           "peak_rss_with_check_gib": round(near["peak_rss_gib"], 2),
           "check_adds_gib": round(near["peak_rss_gib"] - exact["peak_rss_gib"], 2),
           "copy_pairs": len(found), "copy_pairs_among_originals": len(found) - len(among_mosaics),
           "planted_pairs": len(planted), "planted_pairs_found": len(planted & found),
           "other_pairs_among_mosaics": len(among_mosaics - planted),
           "other_pairs_first_20": sorted(among_mosaics - planted)[:20],   # image numbers: see them with mosaic()
           "cross_split_clusters": near["cross_split_clusters"]}
    print(f"  {size:,} images: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                              if k not in ("images", "other_pairs_first_20")), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=RANDOM_PREFIX + "vit-b16",
                   help="random:<architecture> (a published CLIP with random weights), a hub id or a local directory")
    p.add_argument("--smoke", action="store_true", help="a tiny random CLIP: seconds on a CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--e2-epochs", type=int, default=10, help="epochs for the E2 cached-versus-tower timing")
    p.add_argument("--e2-images", type=int, nargs=2, default=[408, 392], metavar=("TRAIN", "EVAL"),
                   help="images per epoch in the E2 timing: trained on, and evaluated (val + test)")
    p.add_argument("--experiments", nargs="+", choices=list(SCRIPTS), default=CLASSIFIERS,
                   help="the experiments to time [default: every classification one]")
    p.add_argument("--decoder", help="a captioning experiment's decoder [default: GPT-2's architecture with random "
                                     "weights; with --smoke the tiny random GPT-2]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for MFU, in TFLOP/s [default: the "
                   "datasheet's for a known GPU, else the best of five large matmuls measured here]")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel: PyTorch's fused scaled-dot-product, or transformers' plain one")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--duplicates", type=int, metavar="IMAGES",
                   help="instead: time the near-copy check against loading this many images built from --data")
    p.add_argument("--data", default=str(common.SAMPLE_DATA), help="image folder for --duplicates")
    p.add_argument("--duplicate-sizes", type=int, nargs="*", default=list(DUPLICATE_SIZES), metavar="IMAGES",
                   help="with --duplicates: also measure these smaller sizes (the first images of the same set)")
    p.add_argument("--compare-models", nargs="+", metavar="MODEL",
                   help="instead: compare these models (tiny, tiny-resnet, random:<architecture> of CLIP or ResNet, "
                        "hub ids, folders): test accuracy of the head alone, inference time per image and peak "
                        "memory with and without torch.no_grad() (tools/bench_models.py)")
    p.add_argument("--measure-inference", metavar="MODEL", help=argparse.SUPPRESS)   # one measurement, for the above
    p.add_argument("--grad", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_inference or args.compare_models:
        import json
        from tools import bench_models
        device = common.pick_device(args.device)
        if args.measure_inference:   # a child of --compare-models: its result on stdout's last line
            print(json.dumps(bench_models.measure_inference(args.measure_inference, args.grad, args.batch_size,
                                                            args.steps, args.warmup, device.type)))
            return
        common.check_writable(Path(args.output_dir))
        args.resolved_device = device.type
        args.device_label = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                             f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
        bench_models.compare_models(args.compare_models, args, Path(args.output_dir))
        return
    if args.duplicates:
        common.check_writable(Path(args.output_dir))
        bench_duplicates(args.duplicates, Path(args.data), Path(args.output_dir), args.duplicate_sizes)
        return

    if args.batch_size < 4:
        raise UserError("--batch-size must be at least 4: FLOPs are counted on 2 and on 4 images")
    device = common.pick_device(args.device)
    common.check_writable(Path(args.output_dir))
    torch.manual_seed(0)
    model_name = TINY_CLIP if args.smoke else args.model
    clip, _, tokenizer = load_clip(model_name, device)
    clip.set_attn_implementation(args.attention)
    peak, peak_how = (args.peak_tflops * 1e12, "given by --peak-tflops") if args.peak_tflops else peak_flops(device)
    print(f"bench: {model_name} on {device}, batch {args.batch_size}, {args.attention} attention; "
          f"peak assumed {peak / 1e12:.3g} TFLOP/s ({peak_how})", flush=True)
    own = [SCRIPTS[n].short_name for n in args.experiments if not SCRIPTS[n].takes_clip]
    if own:
        print(f"note: {', '.join(own)} bring{'s' * (len(own) == 1)} {'its' if len(own) == 1 else 'their'} own backbone, "
              f"timed at its own architecture with random weights: --model and --attention (CLIP's) are the CLIP "
              f"scripts' only", flush=True)

    result = {"model": model_name, "weights": weights_of(model_name),
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "compile": args.compile, "attention": args.attention,
              "peak_flops": peak, "peak_flops_source": peak_how,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "experiments": [],
              "e2_cached_vs_tower": None}
    output = Path(args.output_dir) / "bench.json"
    write_json(output, result)
    with tempfile.TemporaryDirectory() as scratch:
        decoder = args.decoder
        if decoder is None and not args.smoke and any(SCRIPTS[n].task == "captioning" for n in args.experiments):
            decoder = random_gpt2(Path(scratch))
        for name in args.experiments:
            result["experiments"].append(measured(name, lambda: bench_experiment(name, clip, tokenizer, args,
                                                                                 device, peak, decoder), device))
            write_json(output, result)   # after each experiment: a run cut short keeps what it measured
    if "E2_linear_probe" in args.experiments:
        result["e2_cached_vs_tower"] = measured("E2_linear_probe", lambda: bench_e2_cache(clip, args, device), device)
        write_json(output, result)
    rows = result["experiments"]

    print("\n| experiment | train step (ms) | train img/s | eval img/s | train MFU | eval MFU | peak memory (MB) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['experiment']} | {r['error']} | | | | | |")
            continue
        train = (f"{1000 * r['train_step_s']:.1f} | {r['train_images_per_s']:.1f} | " if "train_step_s" in r
                 else "- | - | ")
        mfu = f"{100 * r['train_mfu']:.1f}% | " if "train_mfu" in r else "- | "
        print(f"| {r['experiment']} | {train}{r['eval_images_per_s']:.1f} | {mfu}{100 * r['eval_mfu']:.1f}% | "
              f"{r['peak_memory_mb']:.0f} |")
    print(f"\nwritten to {output}")
    failed = [r for r in rows + [result["e2_cached_vs_tower"] or {}] if "error" in r]
    if failed:
        print(f"bench: {len(failed)} measurements failed: " + "; ".join(f"{r['experiment']}: {r['error']}"
                                                                       for r in failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
