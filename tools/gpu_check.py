"""The Python steps of tools/gpu_check.sh, each a subcommand that adds its result to one JSON file
(--result, under the step's name): the versions, the wheels the machine lacks, the largest batch that fits, the
host syncs of E3's training loop, and the whole suite timed phase by phase. Run by gpu_check.sh; each runs on
its own too, e.g. `python tools/gpu_check.py syncs --result out.json --model random:vit-b16 --data DIR`.
"""

import argparse
import collections
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(REPO))
# torch and the rest of the library are imported by the steps that use them: recording a step stays quick.
from clip_adapt.base import write_json  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "imagehash", "safetensors", "scikit-learn",
            "matplotlib", "tokenizers", "numpy")
CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]


def record(result: Path, step: str, value=None, status: dict | None = None) -> None:
    """Adds one step's result (and, from the shell, its status and seconds under "steps") to the JSON file,
    rewritten whole each time, so that a run cut short keeps every step that finished."""
    results = json.loads(result.read_text()) if result.exists() else {}
    if value is not None:
        results[step] = value
    if status is not None:
        results.setdefault("steps", {})[step] = status
    write_json(result, results)


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(args) -> dict:
    import torch
    found = {"python": platform.python_version(), "platform": platform.platform(),
             "packages": {name: installed(name) for name in PACKAGES},
             "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2 ** 30, 1),
                     multiprocessors=properties.multi_processor_count,
                     compute_capability=f"{properties.major}.{properties.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        found["nvidia_smi"] = f"not run: {error}"
    for key, value in found.items():
        print(f"{key}: {value}")
    return found


def wheels(args) -> dict:
    """Installs, with no index, the wheels in the folder whose distribution is not installed already (the machine's
    own torch, transformers and the rest stay as they are), into --target; the caller puts it on PYTHONPATH."""
    lacking, present = [], []
    for wheel in sorted(Path(args.folder).glob("*.whl")):
        name = wheel.name.split("-")[0].replace("_", "-")
        (present if installed(name) else lacking).append(wheel)
    print(f"wheels: installing {', '.join(w.name for w in lacking) or 'nothing'}; already installed: "
          f"{', '.join(w.name.split('-')[0] for w in present) or 'none'}", flush=True)
    if lacking:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", args.target, *map(str, lacking)], check=True)
    return {"installed": [w.name for w in lacking], "already_there": [w.name for w in present]}


def largest_batch(args) -> dict:
    """The largest power-of-two batch (from --start, at most --limit) at which E6, the experiment that holds the
    most (every weight's gradient and AdamW moments), takes two training steps and evaluates twice that batch."""
    import torch

    from clip_adapt.models import load_clip
    from clip_adapt.runner import experiment_scripts
    from clip_adapt.training import batched, training_step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip, _, tokenizer = load_clip(args.model, device)
    e6 = {s.name: s for s in experiment_scripts()}["E6_full_finetune"]
    model = e6.build_model(clip, tokenizer, CLASS_NAMES).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = clip.config.vision_config.image_size
    fits, tried, batch = None, [], args.start
    while batch <= args.limit:
        try:
            pixels = torch.randn(2 * batch, 3, size, size, device=device)
            labels = torch.arange(batch, device=device) % len(CLASS_NAMES)
            model.train()
            for _ in range(2):
                training_step(model, optimizer, pixels[:batch], labels, device)
            model.eval()
            batched(model, pixels, 2 * batch, device)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            tried.append({"batch": batch, "fits": True, "peak_memory_gib": peak})
            fits = batch
            print(f"batch {batch}: fits" + (f", peak {peak:.1f} GiB" if peak else ""), flush=True)
        except torch.OutOfMemoryError:
            tried.append({"batch": batch, "fits": False})
            print(f"batch {batch}: out of memory", flush=True)
            break
        finally:
            pixels = labels = None
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return {"largest_batch": fits, "tried": tried, "model": args.model, "experiment": e6.name}


def syncs(args) -> dict:
    """Runs E3 (one epoch by default: a few steps) with torch.cuda.set_sync_debug_mode("warn") and counts the
    host syncs: by the phase they fall in (clip_adapt/timing.py) and by the innermost line of this project's
    code that caused them. A sync whose count grows with the number of steps is one inside the step loop."""
    import torch

    from clip_adapt import timing
    from clip_adapt.runner import run_experiment
    found = collections.Counter()
    by_phase = collections.Counter()

    def remember(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(f"{REPO}{os.sep}")
                and not f.filename.startswith((f"{REPO / 'tools'}{os.sep}", f"{REPO / '.venv'}{os.sep}"))]
        where = f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno} {ours[-1].name}" if ours else filename
        found[where] += 1
        by_phase[timing.current() or "outside phases"] += 1

    cuda = torch.cuda.is_available()
    out = Path(tempfile.mkdtemp(prefix="gpu_check_syncs_"))
    argv = ["--model", args.model, "--data", args.data, "--epochs", str(args.epochs), "--quiet",
            "--noise-levels", "0", *(["--smoke"] if args.smoke else []), "--output-dir", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = remember
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            code = run_experiment("E3_shallow_vpt", argv)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    metrics_path = out / "E3_shallow_vpt" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    train_images, batch = metrics.get("num_images", {}).get("train", 0), 32
    result = {"exit_code": code, "counted": cuda, "epochs": args.epochs,
              "steps": args.epochs * -(-train_images // batch) if train_images else None,
              "syncs": sum(found.values()) if cuda else None, "by_phase": dict(by_phase),
              "by_place": dict(found.most_common())}
    print(json.dumps(result, indent=1))
    return result


def suite(args) -> dict:
    """run_all_experiments.py in a fresh process, timed whole; each experiment's metrics.json gives its phases."""
    out = Path(tempfile.mkdtemp(prefix="gpu_check_suite_"))
    command = [sys.executable, str(REPO / "run_all_experiments.py"), "--model", args.model, "--data", args.data,
               "--seed", "0", "--epochs", str(args.epochs), "--quiet", "--output-dir", str(out),
               *(["--smoke"] if args.smoke else []), *(["--compile"] if args.compile else []),
               *(["--experiments", *args.experiments] if args.experiments else [])]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    try:
        code = subprocess.run(command, cwd=REPO, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timed out"
        print(f"suite stopped after {args.timeout:.0f} s: the experiments that finished are recorded", flush=True)
    total = time.perf_counter() - started
    experiments, phases = {}, collections.Counter()
    for metrics_path in sorted(out.glob("E*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        experiments[metrics["experiment"]] = {"timings": metrics["timings"], "epochs_run": metrics["epochs_run"],
                                              "weights": metrics["weights"], "test_accuracy": metrics["test_accuracy"]}
        phases.update({k: v for k, v in metrics["timings"].items() if k != "total"})
    inside = sum(e["timings"]["total"] for e in experiments.values())
    # Outside every experiment: the interpreter's imports, then the summary and report.html at the end.
    result = {"exit_code": code, "total_s": round(total, 2), "compile": args.compile, "epochs": args.epochs,
              "model": args.model, "data": args.data,
              "phases_s": {**{k: round(v, 2) for k, v in phases.items()},
                           "outside_experiments": round(total - inside, 2)},
              "experiments": experiments}
    print(json.dumps({k: v for k, v in result.items() if k != "experiments"}, indent=1))
    return result


def summary(result: Path) -> None:
    """The figures to read first, as a few lines (the device tool returns the end of the output)."""
    results = json.loads(result.read_text())
    print("\n=== gpu_check summary ===")
    for name, step in results.get("steps", {}).items():
        print(f"{name}: {step['status']}" + (f" ({step['seconds']:.0f} s)" if step["seconds"] is not None else ""))
    env = results.get("env", {})
    print(f"gpu {env.get('gpu', 'none')}; {env.get('nvidia_smi', '')}; torch {env.get('packages', {}).get('torch')} "
          f"CUDA {env.get('torch_cuda')}")
    for key in ("bench_batch_32", "bench_largest_batch"):
        bench = results.get(key)
        if bench:
            rows = ", ".join(f"{r['experiment'].split('_')[0]} {r.get('train_images_per_s', 0):.0f} img/s "
                             f"MFU {100 * r.get('train_mfu', r['eval_mfu']):.0f}%" for r in bench["experiments"])
            print(f"{key} (batch {bench['batch_size']}): {rows}")
    if "max_batch" in results:
        print(f"largest batch for E6: {results['max_batch']['largest_batch']}")
    if "syncs" in results:
        print(f"E3 syncs: {results['syncs']['syncs']} in {results['syncs']['steps']} steps; by phase "
              f"{results['syncs']['by_phase']}")
    for key in ("suite", "suite_compile"):
        if key in results:
            print(f"{key}: {results[key]['total_s']} s, exit {results[key]['exit_code']}; {results[key]['phases_s']}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--result", type=Path, required=True, help="the JSON file the step's result is added to")
    p.add_argument("--step", help="the name to record it under [default: the subcommand's]")
    steps = p.add_subparsers(dest="command", required=True)
    steps.add_parser("env", help="python, packages, torch, CUDA, GPU and driver versions")
    w = steps.add_parser("wheels", help="install the wheels of a folder that this machine lacks")
    w.add_argument("folder")
    w.add_argument("--target", required=True)
    b = steps.add_parser("max-batch", help="the largest power-of-two batch at which E6 trains")
    b.add_argument("--model", default="random:vit-b16")
    b.add_argument("--start", type=int, default=32)
    b.add_argument("--limit", type=int, default=4096)
    s = steps.add_parser("syncs", help="host syncs while E3 trains, by phase and place")
    r = steps.add_parser("suite", help="run_all_experiments.py, timed and split into phases")
    for sub in (s, r):
        sub.add_argument("--model", default="random:vit-b16")
        sub.add_argument("--data", required=True)
        sub.add_argument("--epochs", type=int, default=1)
        sub.add_argument("--smoke", action="store_true")
    r.add_argument("--compile", action="store_true")
    r.add_argument("--timeout", type=float, help="stop the suite after this many seconds; what finished counts")
    r.add_argument("--experiments", nargs="+")
    steps.add_parser("summary", help="print the main figures of the result file")
    c = steps.add_parser("record", help="record a step the shell ran: its status, and a JSON file it wrote")
    c.add_argument("--status", required=True)
    c.add_argument("--seconds", type=float)
    c.add_argument("--json", type=Path, help="a JSON file the step wrote, recorded whole")
    args = p.parse_args()
    if args.command == "record":
        value = json.loads(args.json.read_text()) if args.json and args.json.exists() else None
        record(args.result, args.step, value, {"status": args.status, "seconds": args.seconds})
        return
    if args.command == "summary":
        summary(args.result)
        return
    run = {"env": environment, "wheels": wheels, "max-batch": largest_batch, "syncs": syncs, "suite": suite}
    record(args.result, args.step or args.command, run[args.command](args))


if __name__ == "__main__":
    main()
