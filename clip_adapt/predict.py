"""Apply a finished run to new images: `python -m clip_adapt.predict outputs/E4_deep_vpt new_images/`.

The run's folder holds what is needed: metrics.json (the experiment, every setting, the weights' identity) and
checkpoint/best.safetensors (the reported weights). The model is rebuilt as the run built it (the same CLIP, the
script's build_model with the run's settings, the same seed), its trained weights are loaded from the best
checkpoint, and every image under the image folder (subfolders too, symbolic links followed) gets its predicted
class and the probability of each class, in a CSV file (by default <run folder>/predictions_<image folder>.csv;
--output names another). The CLIP is checked against the one the run recorded: other weights (a hub model that
moved on, another local directory) are refused rather than silently combined with the run's trained parts.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from clip_adapt.base import UserError, write_csv
from clip_adapt.data import IMAGE_SUFFIXES, open_rgb, preprocess, Split

USAGE = "python -m clip_adapt.predict RUN_FOLDER IMAGE_FOLDER [--output FILE]"


def image_paths(folder: Path) -> list[str]:
    """Every image file under folder, sorted, following symbolic links; hidden files left out."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True) for name in names
                  if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."))


def read_run(run: Path) -> dict:
    metrics_file, checkpoint = run / "metrics.json", run / "checkpoint" / "best.safetensors"
    if not metrics_file.is_file():
        raise UserError(f"{run} holds no metrics.json: pass the folder of a finished run (outputs/<script name>)")
    metrics = json.loads(metrics_file.read_text())
    if metrics.get("task", "classification") != "classification":
        raise UserError(f"{run} is a {metrics['task']} run: predict applies classifiers (its captions: "
                        f"predictions.json)")
    if metrics.get("trainable_params", 0) and not checkpoint.is_file():
        raise UserError(f"{run} has no {checkpoint.relative_to(run)}: the run did not finish, or its checkpoint was "
                        f"removed")
    return metrics


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], run: Path) -> None:
    """The checkpoint's tensors into the rebuilt model. The training loop saves from the whole model; a method
    fitted on cached embeddings saves the part it fitted (E2's head, E11's adapter, E9's cache), so the model and
    then each of its parts is tried. Every saved tensor must find its place with its shape, except a tensor the
    model holds empty until it is fitted (Tip-Adapter's cache of training embeddings), which takes the saved one."""
    candidates = [model, *(part for _, part in model.named_children())]
    for target in candidates:
        tensors = dict(target.named_parameters()) | dict(target.named_buffers())
        if all(name in tensors and (tensors[name].shape == value.shape or tensors[name].numel() == 0)
               for name, value in state.items()):
            with torch.no_grad():
                for name, value in state.items():
                    owner_name, _, attribute = name.rpartition(".")
                    owner, current = target.get_submodule(owner_name), tensors[name]
                    if current.shape == value.shape:
                        current.copy_(value)
                    elif isinstance(current, torch.nn.Parameter):
                        setattr(owner, attribute, torch.nn.Parameter(value.clone(), current.requires_grad))
                    else:
                        setattr(owner, attribute, value.clone())   # a registered buffer: replaced in place
            return
    raise UserError(f"{run}/checkpoint/best.safetensors does not fit the model rebuilt from the run's settings "
                    f"(tensors {', '.join(sorted(state)[:3])}, ...): was the run made by another version of its "
                    f"script?")


def rebuild(run: Path, device: torch.device):
    """(model, image processor, metrics) of a finished run, its trained weights loaded."""
    import common
    from safetensors.torch import load_file

    from clip_adapt import hub
    from clip_adapt.models import is_random, load_clip, weights_identity
    from clip_adapt.runner import experiment_scripts
    metrics = read_run(run)
    scripts = {script.name: script for script in experiment_scripts()}
    if metrics["experiment"] not in scripts:
        raise UserError(f"{run} was written by {metrics['experiment']}, which is not an experiment script here")
    script = scripts[metrics["experiment"]]
    args = script.default_args()   # today's defaults, then every setting the run recorded
    vars(args).update(metrics["settings"])
    if not is_random(args.model) and not Path(args.model).expanduser().exists():
        hub.notice_offline()
    if script.takes_clip:
        clip, image_processor, tokenizer = load_clip(args.model, device, args.image_processor)
    else:   # a script with its own backbone (E14's ResNet) loads it as its run did
        clip, image_processor, tokenizer = script.load_backbone(args, device)
    if weights_identity(args.model, clip) != metrics["model_weights"]:
        raise UserError(f"the model loaded from {args.model} is not the one the run used ({metrics['model_weights']}): "
                        f"predict needs the run's own weights")
    common.seed_everything(args.seed)   # as the run built its model: whatever is not in the checkpoint matches
    model = script.build_model(clip.to(device), tokenizer, metrics["class_names"], args)
    checkpoint = run / "checkpoint" / "best.safetensors"
    if checkpoint.is_file():
        load_weights(model, load_file(str(checkpoint), device=str(device)), run)
    return model.to(device).eval(), image_processor, metrics


def predict_folder(run: Path, images: Path, device: torch.device, batch_size: int = 64) -> list[dict]:
    """One row per image: its file (relative to the image folder), the predicted class and every class's
    probability, as the run's own predictions.csv gives them (without the label, which a new image lacks)."""
    from clip_adapt.training import predict
    files = image_paths(images)
    if not files:
        raise UserError(f"no images under {images} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    model, image_processor, metrics = rebuild(run, device)
    pixels = preprocess([open_rgb({"path": f}) for f in files], image_processor)
    split = Split(pixels, torch.zeros(len(files), dtype=torch.long), files, tuple(image_processor.image_mean),
                  tuple(image_processor.image_std))
    with torch.no_grad():
        probs = predict(model, split, batch_size, device, metrics.get("precision", "auto")).float().softmax(1)
    names = metrics["class_names"]
    return [{"file": os.path.relpath(f, images), "prediction": names[int(row.argmax())],
             **{f"p_{name}": round(float(p), 6) for name, p in zip(names, row)}} for f, row in zip(files, probs)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run's folder, e.g. outputs/E4_deep_vpt")
    p.add_argument("images", type=Path, help="a folder of images (subfolders included)")
    p.add_argument("--output", type=Path, help="the CSV file to write [default: "
                                               "<run>/predictions_<image folder name>.csv]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when PyTorch sees one, else the CPU [default: auto]")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass [default: 64]")
    args = p.parse_args(argv)
    from clip_adapt.runner import REPO
    if str(REPO) not in sys.path:   # common.py and the experiment scripts live at the repository's root
        sys.path.insert(0, str(REPO))
    import common
    try:
        if not args.images.is_dir():
            raise UserError(f"no image folder {args.images}: pass a folder of images")
        rows = predict_folder(args.run, args.images, common.pick_device(args.device), args.batch_size)
        output = args.output or args.run / f"predictions_{args.images.resolve().name}.csv"
        write_csv(output, rows)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(rows)} predictions written to {output}")


if __name__ == "__main__":
    main()
