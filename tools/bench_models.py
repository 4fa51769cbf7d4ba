"""tools/bench.py --compare-models: the CIFAR prompt study's model comparison, for the models a user names (CLIP
variants and the ResNet). For each model:

- test accuracy of its head alone on its frozen features: a CLIP by E2 (the linear probe), a ResNet by E14 (head
  only), each run by its script on --data (with --smoke: the shipped sample) into <output-dir>/compare_models/;
- inference time per image and peak memory of the model as that script builds it, on random images at its own
  size, with torch.no_grad() and without it. Without it, autograd records the forward as training would: every
  weight of the model requires a gradient (as a model loaded for training has them), so the activations the
  backward pass needs are kept. Peak memory, measured: on CUDA torch.cuda.max_memory_allocated over the timed
  passes (its statistics reset first); on a CPU the peak resident set size (Linux's VmHWM, reset to the current
  size just before the first pass through /proc/self/clear_refs) of a fresh process that runs only that
  measurement. The table gives the peak less the memory before the first pass (the model loaded): each mode's
  passes alone.

Writes compare_models.json, compare_models.md (the table) and compare_models.png (time per image against test
accuracy and against parameter count, one figure). Names: `tiny` (the tiny random CLIP of --smoke), `tiny-resnet`
(E14's tiny random ResNet), random:<architecture> of either, a hub id or a local folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from clip_adapt.base import UserError, write_json, write_text
from clip_adapt.models import RANDOM_PREFIX, TINY_CLIP, load_clip
from clip_adapt.reporting import plt, save_figure
from clip_adapt.resnet import RESNET_ARCHITECTURES, TINY_RESNET, load_resnet
from clip_adapt.runner import REPO, experiment_scripts, run_for_metrics

ALIASES = {"tiny": TINY_CLIP, "tiny-resnet": TINY_RESNET}
CLASSES = 4


def is_resnet(name: str) -> bool:
    if name.startswith(RANDOM_PREFIX):
        return name.removeprefix(RANDOM_PREFIX) in RESNET_ARCHITECTURES
    config = Path(name).expanduser() / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("model_type") == "resnet"
    return "resnet" in name.lower()


def script_for(name: str) -> str:
    """The script whose head-only run gives a model's accuracy: E14 for a ResNet, E2 for a CLIP."""
    return "E14_resnet18" if is_resnet(name) else "E2_linear_probe"


def built_model(name: str, device: torch.device):
    """(model as its script builds it with default flags, image size) on device."""
    script = next(s for s in experiment_scripts() if s.name == script_for(name))
    backbone, processor, tokenizer = (load_resnet if is_resnet(name) else load_clip)(name, device)
    size = image_size_of(processor)
    model = script.build_model(backbone, tokenizer, [f"class {i}" for i in range(CLASSES)],
                               script.default_args("--model", name))
    return model.to(device).eval(), size


def image_size_of(processor) -> int:
    """The side of the square images a model's processor makes: CLIP's crop, or ConvNext's (ResNet's) short side."""
    crop = getattr(processor, "crop_size", None)
    return crop["height"] if crop else processor.size["shortest_edge"]


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident set size now (VmRSS), or its peak (VmHWM), from Linux's /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise UserError(f"--compare-models on a CPU reads {field} from /proc/self/status, which this system lacks")


def reset_peak_resident() -> None:
    """Linux (4.0 on): writing 5 to /proc/self/clear_refs sets the peak resident size (VmHWM) to the current one."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_inference(name: str, grad: bool, batch_size: int, steps: int, warmup: int, device_name: str) -> dict:
    """One mode's time per image and peak memory (the module docstring says how memory is measured)."""
    from tools.bench import sync, timed
    device = torch.device(device_name)
    torch.manual_seed(0)
    model, size = built_model(name, device)
    if grad:
        model.requires_grad_(True)
    pixels = torch.randn(batch_size, 3, size, size, device=device)

    def forward():
        if grad:
            model.zero_grad(set_to_none=True)
            return model(pixels)
        with torch.no_grad():
            return model(pixels)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
    else:
        reset_peak_resident()
        before = resident_mb()
    seconds, _ = timed(forward, device, steps, warmup)
    sync(device)
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device) / 2 ** 20, "torch.cuda.max_memory_allocated"
    else:
        peak, how = resident_mb("VmHWM"), "the peak resident set size (VmHWM, reset first)"
    return {"seconds_per_image": seconds / batch_size, "peak_memory_mb": peak, "memory_before_mb": before,
            "memory_of_passes_mb": max(peak - before, 0.0), "memory_measure": how,
            "parameters": sum(p.numel() for p in model.parameters())}


def measured_in_child(name: str, grad: bool, args) -> dict:
    """measure_inference in a fresh process (a CPU's peak resident size is per process and never goes down)."""
    command = [sys.executable, str(REPO / "tools" / "bench.py"), "--measure-inference", name,
               "--grad" if grad else "--no-grad", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.resolved_device]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise UserError(f"--compare-models: measuring {name} failed: "
                        f"{(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compare_models(names: list[str], args, out_dir: Path) -> dict:
    names = [ALIASES.get(name, name) for name in names]
    rows = []
    for name in names:
        script = script_for(name)
        argv = ["--model", name, "--data", args.data, "--quiet", "--noise-levels", "0", "--device",
                args.resolved_device, *(["--smoke"] if args.smoke else [])]
        folder = out_dir / "compare_models" / name.replace("/", "_").replace(":", "_")
        metrics = run_for_metrics(script, argv, folder, f"{name}: {script}, head only")
        if metrics is None:
            raise UserError(f"--compare-models: {script} failed on {name} (its error is above)")
        modes = {("with_no_grad" if not grad else "autograd"): measured_in_child(name, grad, args)
                 for grad in (False, True)}
        rows.append({"model": name, "script": script, "test_accuracy": metrics["test_accuracy"],
                     "weights": metrics["weights"], "parameters": modes["with_no_grad"]["parameters"], **modes})
        print(f"  {name}: test accuracy {metrics['test_accuracy']:.3f}, " + ", ".join(
            f"{mode} {1000 * m['seconds_per_image']:.2f} ms/image, {m['memory_of_passes_mb']:.0f} MB"
            for mode, m in modes.items()), flush=True)
    device = rows[0]["with_no_grad"]["memory_measure"]
    result = {"device": args.device_label, "batch_size": args.batch_size, "steps": args.steps, "data": args.data,
              "models": rows}
    write_json(out_dir / "compare_models.json", result)
    lines = [f"# Models compared on {args.device_label}\n",
             f"Batch {args.batch_size}, {args.steps} timed passes after {args.warmup}; peak memory by {device}, "
             f"less the memory before the first pass (the model loaded). Test accuracy: the head alone on frozen features "
             f"(E2 for CLIP, E14 for ResNet).\n",
             "| model | parameters | test accuracy | ms / image, no_grad | ms / image, autograd | peak MB above the "
             "model, no_grad | peak MB above the model, autograd |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['test_accuracy']:.3f} | "
              f"{1000 * r['with_no_grad']['seconds_per_image']:.2f} | {1000 * r['autograd']['seconds_per_image']:.2f} | "
              f"{r['with_no_grad']['memory_of_passes_mb']:.0f} | {r['autograd']['memory_of_passes_mb']:.0f} |"
              for r in rows]
    write_text(out_dir / "compare_models.md", "\n".join(lines) + "\n")
    plot(rows, out_dir / "compare_models.png", args.device_label)
    print("\n".join(lines[2:]))
    print(f"\nwritten to {out_dir / 'compare_models.md'}, compare_models.json and compare_models.png")
    return result


def plot(rows: list[dict], path: Path, device: str) -> None:
    fig, (by_accuracy, by_size) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):
        ms = 1000 * r["with_no_grad"]["seconds_per_image"]
        marker = "osD^vP*Xh"[i % 9]
        by_accuracy.plot(ms, r["test_accuracy"], marker, markersize=8, label=r["model"])
        by_size.plot(ms, r["parameters"], marker, markersize=8, label=r["model"])
    by_accuracy.set(xlabel="inference time per image (ms, torch.no_grad)", ylabel="test accuracy (head only)",
                    ylim=(0, 1.02), title="Test accuracy against inference time")
    by_size.set(xlabel="inference time per image (ms, torch.no_grad)", ylabel="parameters", yscale="log",
                title="Parameters against inference time")
    from matplotlib.ticker import NullFormatter
    for ax in (by_accuracy, by_size):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # the minor ticks' labels overprint each other
        ax.grid(alpha=0.3)
    by_size.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Models compared on {device}")
    save_figure(fig, path)
