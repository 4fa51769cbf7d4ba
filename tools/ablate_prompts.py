"""The prompt studies in one command: a grid of prompt counts, injection layers, positions and prompt types,
each cell trained with every seed through the experiment scripts themselves (token prompts by E4, which with
--prompt-layers 0 is E3; pixel prompts by E3 --prompt-type), so every cell keeps their protocol: validation
carved from train selects the weights, test only measured.

Writes <output-dir>/ablation.csv (one row per grid cell), ablation.md (token prompts in the studies' shape:
rows of layer × count, columns front and back; then the pixel prompts) and ablation.png (test accuracy
against trainable parameters, and against injection layer). Each finished run leaves a cell.json in
<output-dir>/cells/<cell>/seed_<s>/; rerunning the same command skips those and runs only what is missing.
Every other flag of its --help (e.g. --epochs, --prompt-entry, --smoke) goes to every run; a flag missing from
its --help (e.g. --prompt-dropout) is refused.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from clip_adapt.base import UserError, is_main_process, write_csv, write_json, write_text  # noqa: E402
from clip_adapt.launch import LAUNCHER_FLAGS, Run, add_launcher_flags, check_launcher_flags, launch  # noqa: E402
from clip_adapt.prompts import PIXEL_PROMPTERS, PROMPT_ENTRIES, PROMPT_INITS, PROMPT_POSITIONS  # noqa: E402
from clip_adapt.reporting import plt, save_figure  # noqa: E402
from clip_adapt.runner import aggregate, clip_only_note, experiment_scripts, spread  # noqa: E402

TYPES = ["token", *PIXEL_PROMPTERS]
GRID = {"counts": [1, 4, 8], "layers": ["0", "6", "11", "all"], "positions": ["front", "back"],
        "types": ["token", "padding", "fixed-patch"]}
# --smoke: the tiny CLIP has 3 encoder layers; 2 counts × 2 layers × 2 positions + 2 pixel prompts = 10 cells.
SMOKE_GRID = {"counts": [1, 2], "layers": ["0", "all"], "positions": ["front", "back"],
              "types": ["token", "padding", "fixed-patch"]}
OWN = ("counts", "layers", "positions", "types", "seeds", "pad_size", "patch_size", "head", *LAUNCHER_FLAGS)


def add_own_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--counts", type=int, nargs="+", help=f"token prompt counts [default: {GRID['counts']}]")
    p.add_argument("--layers", nargs="+", help=f"injection layers, 0-based, or 'all' [default: {GRID['layers']}]")
    p.add_argument("--positions", nargs="+", choices=PROMPT_POSITIONS, help="token prompt positions [default: both]")
    p.add_argument("--types", nargs="+", choices=TYPES, help=f"prompt types [default: {GRID['types']}]")
    p.add_argument("--seeds", type=int, nargs="+", help="one run per seed and cell [default: --seed]")
    p.add_argument("--pad-size", type=int, help="padding prompt width, as E3's")
    p.add_argument("--patch-size", type=int, help="patch prompt side, as E3's")
    p.add_argument("--head", choices=["clip", "linear"], help="pixel prompts' head, as E3's")
    return add_launcher_flags(p)


def grid_cells(args: argparse.Namespace) -> list[dict]:
    """Each cell: its name, the script that runs it, that script's flags, and what it varies."""
    grid = SMOKE_GRID if args.smoke else GRID
    counts, layers, positions, types = (getattr(args, k) or grid[k] for k in ("counts", "layers", "positions", "types"))
    for layer in layers:
        if layer != "all" and not (layer.isdigit()):
            raise UserError(f"--layers takes 0-based layer numbers or 'all', got '{layer}'")
    if any(c < 1 for c in counts):
        raise UserError("--counts must be at least 1")
    cells = []
    if "token" in types:
        for layer in layers:
            for count in counts:
                for position in positions:
                    flags = ["--num-prompts", str(count), "--prompt-position", position]
                    flags += [] if layer == "all" else ["--prompt-layers", layer]
                    cells.append({"cell": f"token_layer{layer}_n{count}_{position}", "script": "E4_deep_vpt",
                                  "flags": flags, "prompt_type": "token", "layer": layer, "num_prompts": count,
                                  "position": position})
    pixel_flags = [f for k in ("pad_size", "patch_size", "head") if getattr(args, k) is not None
                   for f in ("--" + k.replace("_", "-"), str(getattr(args, k)))]
    for kind in (t for t in types if t != "token"):
        cells.append({"cell": kind, "script": "E3_shallow_vpt", "flags": ["--prompt-type", kind, *pixel_flags],
                      "prompt_type": kind, "layer": "pixels", "num_prompts": "", "position": ""})
    return cells


def finished_before(folder: Path, key: dict) -> dict | None:
    """A cell's seed is finished when its cell.json holds the same key: its metrics, else None."""
    done = folder / "cell.json"
    if done.exists() and json.loads(done.read_text())["key"] == key:
        return json.loads(done.read_text())["metrics"]
    return None


def markdown(rows: list[dict], failed: list[str], seeds: list[int], command: str) -> str:
    interval = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else "[95% bootstrap interval over test images]"
    lines = ["# Prompt ablation\n", f"`{command}`\n",
             f"Test accuracy of the weights of the best validation epoch: {interval}.\n"]
    token = [r for r in rows if r["prompt_type"] == "token"]
    if token:
        positions = list(dict.fromkeys(r["position"] for r in token))
        lines += ["## Token prompts\n", "| layer | prompts | trainable params | "
                  + " | ".join(positions) + " |", "|---|---|---|" + "---|" * len(positions)]
        for layer, count in dict.fromkeys((r["layer"], r["num_prompts"]) for r in token):
            by_position = {r["position"]: r for r in token if (r["layer"], r["num_prompts"]) == (layer, count)}
            params = next(iter(by_position.values()))["trainable_params"]
            lines.append(f"| {layer} | {count} | {params:,} | " + " | ".join(
                spread(by_position[p], "test_accuracy") if p in by_position else "failed" for p in positions) + " |")
    pixel = [r for r in rows if r["prompt_type"] != "token"]
    if pixel:
        lines += ["\n## Pixel prompts (Bahng et al., 2022)\n", "| type | trainable params | test accuracy |",
                  "|---|---|---|"]
        lines += [f"| {r['prompt_type']} | {r['trainable_params']:,} | {spread(r, 'test_accuracy')} |" for r in pixel]
    if failed:
        lines.append(f"\n**Failed:** {', '.join(failed)} (see the console output).")
    return "\n".join(lines) + "\n"


def plot_ablation(rows: list[dict], path: Path) -> None:
    fig, (by_params, by_layer) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in dict.fromkeys(r["prompt_type"] for r in rows):
        mine = [r for r in rows if r["prompt_type"] == kind]
        by_params.errorbar([r["trainable_params"] for r in mine], [r["test_accuracy_mean"] for r in mine],
                           yerr=[r["test_accuracy_std"] or 0.0 for r in mine], fmt="o", capsize=3, label=kind)
    by_params.set_xscale("log")
    by_params.set(xlabel="trainable parameters (log scale)", ylabel="test accuracy", ylim=(0, 1.02),
                  title="Accuracy against trainable parameters")
    by_params.legend(fontsize="small")
    token = [r for r in rows if r["prompt_type"] == "token"]
    layers = list(dict.fromkeys(r["layer"] for r in token))
    for count, position in dict.fromkeys((r["num_prompts"], r["position"]) for r in token):
        line = [r for r in token if (r["num_prompts"], r["position"]) == (count, position)]
        by_layer.plot([layers.index(r["layer"]) for r in line], [r["test_accuracy_mean"] for r in line],
                      marker="o", linestyle="-" if position == "front" else "--",
                      label=f"{count} prompt{'s' * (count != 1)}, {position}")
    by_layer.set_xticks(range(len(layers)), layers)
    by_layer.set(xlabel="injection layer (0-based; all = every layer)", ylabel="test accuracy", ylim=(0, 1.02),
                 title="Token prompts: accuracy against injection layer")
    if token:
        by_layer.legend(fontsize="small")
    by_params.grid(alpha=0.3), by_layer.grid(alpha=0.3)
    save_figure(fig, path)


def main():
    parser = add_own_flags(common.parser(__doc__, lr=None))   # validates every flag; --help
    parser.add_argument("--prompt-entry", choices=PROMPT_ENTRIES, help="as E4's [default: pre-ln]")
    parser.add_argument("--prompt-init", choices=PROMPT_INITS, help="as E4's [default: normal]")
    args = parser.parse_args()
    _, forwarded = add_own_flags(argparse.ArgumentParser(add_help=False, allow_abbrev=False)).parse_known_args()
    seeds = args.seeds or [args.seed]
    cells = grid_cells(args)
    scripts = {script.name: script for script in experiment_scripts()}
    note = clip_only_note([scripts[name] for name in dict.fromkeys(c["script"] for c in cells)], forwarded)
    if note and is_main_process():   # none today: every cell is a CLIP script's
        print(note)
    check_launcher_flags(args)
    out_dir = Path(args.output_dir)
    common.check_writable(out_dir)
    # What makes two runs of a cell the same: every setting but where and how fast it runs.
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in common.NOT_SETTINGS | set(OWN) | {"seed"}}

    # Finished seeds of a cell (cell.json with the same key) are not rerun: a resubmitted sweep runs only what is
    # missing or failed.
    results, planned, keys = {}, [], {}
    for cell in cells:
        for seed in seeds:
            folder = out_dir / "cells" / cell["cell"] / f"seed_{seed}"
            keys[folder] = {"flags": cell["flags"], "seed": seed, **settings}
            results[folder] = finished_before(folder, keys[folder])
            if results[folder] is not None:
                if is_main_process():
                    print(f"{cell['cell']} (seed {seed}): finished before, not rerun")
            else:
                planned.append(Run(cell["script"], [*scripts[cell["script"]].forwarded(forwarded), *cell["flags"],
                                   "--seed", str(seed)], folder,
                                   f"{cell['cell']} (seed {seed})"))
    for run, (metrics, _) in zip(planned, launch(planned, args)):
        results[run.out_dir] = metrics
        if metrics is not None:
            write_json(run.out_dir / "cell.json", {"key": keys[run.out_dir], "metrics": metrics})

    rows, failed = [], []
    for cell in cells:
        runs = []
        for seed in seeds:
            metrics = results[out_dir / "cells" / cell["cell"] / f"seed_{seed}"]
            if metrics is None:
                failed.append(f"{cell['cell']} (seed {seed})")
            else:
                runs.append(metrics)
        if runs and is_main_process():
            described = {k: cell[k] for k in ("prompt_type", "layer", "num_prompts", "position")}
            summary = aggregate(cell["cell"], runs)
            rows.append({"cell": summary.pop("experiment"), **described, **summary})

    if not is_main_process():
        return
    if rows:
        write_csv(out_dir / "ablation.csv", rows)
        plot_ablation(rows, out_dir / "ablation.png")
    write_text(out_dir / "ablation.md", markdown(rows, failed, seeds, " ".join(["python", *sys.argv])))
    print(f"\nablation of {len(rows)} cells written to {out_dir / 'ablation.md'}")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
