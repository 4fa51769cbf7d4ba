"""A known answer, offline: a tiny CLIP that this project pretrains itself, and a task it was never trained on.

Random frozen features carry no signal, so on a random CLIP every frozen-backbone method stays at chance and
nothing shows that the methods work, only that they run. The real weights cannot be downloaded here, so this
script makes its own: a small CLIP trained with CLIP's own contrastive loss on synthetic image–caption pairs
("a photo of a red circle in the top left": 4 shapes × 4 colours × 4 positions on noisy backgrounds), saved
with save_pretrained (model, tokenizer, image processor) so that it goes through `--model DIR` exactly as
`openai/clip-vit-base-patch16` does. The downstream task is an ImageFolder of shapes (4 classes, colour and
position random): CLIP saw shapes only inside whole captions and was never trained to classify them.

    python tools/known_answer.py --output-dir known_answer
    python run_all_experiments.py --model known_answer/clip --data known_answer/shapes --epochs 60 \\
        --noise-levels 0
    python E6_full_finetune.py --model known_answer/clip --data known_answer/shapes --epochs 60 \\
        --noise-levels 0 --lr 3e-4 --output-dir outputs/e6_known_answer

(E6's default rate is meant for ViT-B/16; this tower needs a higher one to converge in 60 epochs.
`--templates known_answer/templates.txt` gives E1 the task's own templates.)

For captioning it also writes a COCO-format caption set of the same world ("a red circle in the top left"; a
quarter of the combinations only in test) and a tiny GPT-2 pretrained on caption text, for E8:

    python E8_caption_peft.py --model known_answer/clip --decoder known_answer/decoder \\
        --data known_answer/captions --peft adapter --epochs 10 --lr 3e-3 --patience 1000

What it proves: each method learns from features that carry signal (zero-shot above chance; prompts, heads,
the text context, fine-tuning and LoRA above zero-shot). What it does not: anything about accuracy on MRI, or about
the real ViT-B/16.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clip_adapt.models import clip_image_processor  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CAPTION = "a photo of a {colour} {shape} in the {position}"
TEMPLATES = ("a photo of a {}.", "a {} in the picture.")   # zero-shot templates for the shapes task
IMAGE_SIZE = 32


# --------------------------------------------------------------------------- the synthetic world

def render(shape: str, colour: str, position: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One uint8 RGB image: a coloured shape, jittered in size and place, in one quadrant of a noisy background."""
    image = rng.integers(0, 110, (size, size, 3)).astype(np.float32)
    row, column = position.split()
    quarter = size / 4
    cy = quarter * (1 if row == "top" else 3) + rng.uniform(-1.5, 1.5)
    cx = quarter * (1 if column == "left" else 3) + rng.uniform(-1.5, 1.5)
    r = rng.uniform(0.6, 0.85) * quarter
    dy, dx = np.mgrid[0:size, 0:size] + 0.5 - np.array([cy, cx])[:, None, None]
    mask = {"circle": dx ** 2 + dy ** 2 <= r ** 2,
            "square": (abs(dx) <= 0.8 * r) & (abs(dy) <= 0.8 * r),
            "triangle": (dy <= 0.8 * r) & (dy >= -r) & (abs(dx) <= 0.55 * (dy + r)),
            "cross": ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))}[shape]
    image[mask] = np.array(COLOURS[colour]) + rng.normal(0, 12, (mask.sum(), 3))
    return image.clip(0, 255).astype(np.uint8)


def word_tokenizer() -> CLIPTokenizer:
    """A real CLIP byte-level BPE tokenizer whose merges spell out this world's words, so that most words are
    one token (a word outside it still tokenises, letter by letter)."""
    from tokenizers import pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    words = {w for text in (CAPTION, *TEMPLATES, *SHAPES, *COLOURS, *POSITIONS) for w in text.split()
             if w.isalpha() and len(w) > 1}
    for word in sorted(words, key=lambda w: (-len(w), w)):   # longest first: a short word cannot split it
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
                vocab.append(merged + symbol)
            merged += symbol
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def known_answer_config(tokenizer) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=32)


def image_processor():
    return clip_image_processor(IMAGE_SIZE)


# --------------------------------------------------------------------------- pretraining

def combinations():
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def batch(rng: np.random.Generator, processor, tokenizer):
    """Every shape × colour × position once, in random order: no two captions in a batch are alike, so
    CLIP's contrastive targets (the diagonal) are never wrong."""
    combos = [combinations()[i] for i in rng.permutation(len(combinations()))]
    images = [Image.fromarray(render(*combo, rng)) for combo in combos]
    captions = [CAPTION.format(shape=s, colour=c, position=p) for s, c, p in combos]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    return pixels, tokens


def pretrain(steps: int = 300, seed: int = 0, lr: float = 2e-3, log_every: int = 100):
    """(CLIPModel, processor, tokenizer), trained from a fixed seed with CLIP's contrastive loss."""
    tokenizer, processor = word_tokenizer(), image_processor()
    torch.manual_seed(seed)
    clip = CLIPModel(known_answer_config(tokenizer))
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    # A tenth of the steps warm up, and at least two: OneCycleLR divides by the warm-up's length less one.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=max(0.1, 2 / steps))
    rng = np.random.default_rng(seed)
    clip.train()
    for step in range(1, steps + 1):
        pixels, tokens = batch(rng, processor, tokenizer)
        loss = clip(pixel_values=pixels, **tokens, return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps}: contrastive loss {loss.item():.3f}", flush=True)
    return clip.eval(), processor, tokenizer


@torch.no_grad()
def caption_retrieval_accuracy(clip, processor, tokenizer, seed: int = 1234) -> float:
    """Share of fresh images whose own caption is the nearest of all 64: how well pretraining went."""
    pixels, tokens = batch(np.random.default_rng(seed), processor, tokenizer)
    return (clip(pixel_values=pixels, **tokens).logits_per_image.argmax(1) == torch.arange(len(pixels))) \
        .float().mean().item()


def save_clip(folder: Path, clip, processor, tokenizer) -> None:
    clip.save_pretrained(folder)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


# --------------------------------------------------------------------------- the downstream task

def write_shapes_task(root: Path, train_per_class: int = 40, test_per_class: int = 20, seed: int = 0) -> Path:
    """ImageFolder train/<shape>/*.png and test/<shape>/*.png; colour and position random."""
    rng = np.random.default_rng(seed + 10_000)   # never the pretraining images
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour, position = rng.choice(list(COLOURS)), rng.choice(POSITIONS)
                Image.fromarray(render(shape, colour, position, rng)).save(folder / f"{shape}_{i:03d}.png")
    return root


# A family of harder tasks, for proving defaults on data they were not tuned on: every image shows the same
# scene (one shape, colour and place, drawn once per task seed), with the class's shape faded in at low contrast
# in another corner, a random colour each time, under pixel noise, and the whole image mirrored left-right half
# the time (so that the training loop's flips stay in distribution, as they do for near-symmetric MRI slices).
# To this CLIP the images look alike, as MRI slices look alike to a natural-image CLIP: the class signal is a
# weak direction of a tight cluster of embeddings, and a linear head needs large weights to read it.
TASK_FAMILY = {
    "weak": dict(contrast=0.4, train=(40, 40, 40, 40)),
    "imbalanced": dict(contrast=0.45, train=(64, 40, 24, 16)),
    "few": dict(contrast=0.6, train=(16, 16, 16, 16)),   # the field's 16-shot setting
}
FAMILY_NOISE = 10.0        # pixel noise (0-255): enough that no two images are near copies of each other
FAMILY_TEST_PER_CLASS = 40


def write_weak_task(root: Path, contrast: float, train: tuple[int, ...], seed: int = 0,
                    test_per_class: int = FAMILY_TEST_PER_CLASS, noise: float = FAMILY_NOISE) -> Path:
    """An ImageFolder (train/<shape>/, test/<shape>/) of one TASK_FAMILY member; `train` counts per class."""
    rng = np.random.default_rng(seed + 30_000)   # never the pretraining, shapes-task or caption images
    scene_shape, scene_colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    scene = render(scene_shape, scene_colour, "top left", rng).astype(np.float32)
    for split, counts in (("train", train), ("test", (test_per_class,) * len(SHAPES))):
        for shape, count in zip(SHAPES, counts):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mark = render(shape, list(COLOURS)[rng.integers(len(COLOURS))], "bottom right", rng)
                image = scene + contrast * (mark - scene) + rng.normal(0, noise, scene.shape)
                if rng.random() < 0.5:   # mirrored half the time: the loop's left-right flips stay in distribution
                    image = image[:, ::-1]
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{shape}_{i:03d}.png")
    return root


def write_templates(path: Path) -> Path:
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


def build(output_dir: Path, steps: int = 300, seed: int = 0, verbose: bool = True) -> dict:
    """Writes output_dir/clip, output_dir/shapes and output_dir/templates.txt; returns what it measured."""
    started = time.time()
    clip, processor, tokenizer = pretrain(steps, seed, log_every=100 if verbose else 0)
    seconds = time.time() - started
    save_clip(output_dir / "clip", clip, processor, tokenizer)
    write_shapes_task(output_dir / "shapes", seed=seed)
    write_templates(output_dir / "templates.txt")
    return {"pretraining_seconds": round(seconds, 1),
            "caption_retrieval_accuracy": caption_retrieval_accuracy(clip, processor, tokenizer)}


# --------------------------------------------------------------------------- methods trained in-process

def load_task(output_dir: Path, split_seed: int = 0):
    """The shapes task as the scripts load it (validation: 0.15 of train, drawn by split_seed)."""
    from clip_adapt.data import load_data
    from clip_adapt.models import load_clip
    _, processor, _ = load_clip(str(output_dir / "clip"))
    return load_data(str(output_dir / "shapes"), processor, 0.15, split_seed)


def scripted_model(output_dir: Path, script, class_names: list[str], *argv: str, seed: int = 0):
    """(model, parsed flags): `script`'s own build_model from its command line (argv: the data and more flags) on
    a freshly loaded known-answer CLIP, with the new layers' initial weights drawn as its main() draws them."""
    import common
    from clip_adapt.models import load_clip
    args = script.default_args("--model", str(output_dir / "clip"), "--seed", str(seed), "--device", "cpu", *argv)
    args.lr = args.lr or script.learning_rate
    clip, _, tokenizer = load_clip(args.model)
    common.seed_everything(seed)
    return script.build_model(clip, tokenizer, class_names, args), args


def train_method(output_dir: Path, data, name: str, *argv: str, seed: int = 0, precision: str = "fp32"):
    """(model, TrainResult or None) for experiment `name` with its command-line flags argv, built by the script's
    own build_model on a freshly loaded known-answer CLIP and trained by the project's loop, without the
    script's outputs (figures, robustness, reports): what the known-answer tests and their measurement need."""
    import common
    from clip_adapt.runner import experiment_scripts
    from clip_adapt.training import train
    script = next(s for s in experiment_scripts() if s.name == name)
    model, args = scripted_model(output_dir, script, data.class_names, "--data", str(output_dir / "shapes"),
                                 "--precision", precision, *argv, seed=seed)
    if not script.trains:
        return model, None
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        config = common.train_config(args, torch.device("cpu"), Path(folder))
        if hasattr(model, "fit"):   # a method fitted on its frozen embeddings brings its own procedure (E9, E11)
            return model, model.fit({"train": data.train, "val": data.val, "test": data.test}, config)
        return model, train(model, data.train, data.val, data.test, config)


def wise_ft_run(output_dir: Path, data, *argv: str, seed: int = 0, precision: str = "fp32") -> dict:
    """E6 --wise-ft on the known-answer task as its main() runs it, without the noise levels: the model as built
    (θ_0: the zero-shot head, E1's classifier), fine-tuned by the project's loop (θ_1), the α curve on validation
    and test (clip_adapt/wise_ft.py) and the α chosen on validation."""
    from clip_adapt.runner import experiment_scripts
    from clip_adapt.training import predict
    from clip_adapt.wise_ft import alpha_curve, chosen, state_of
    script = next(s for s in experiment_scripts() if s.name == "E6_full_finetune")
    built, _ = scripted_model(output_dir, script, data.class_names, "--data", str(output_dir / "shapes"),
                              "--wise-ft", *argv, seed=seed)
    model, result = train_method(output_dir, data, script.name, "--wise-ft", *argv, seed=seed, precision=precision)

    def evaluate(m):
        return {name: predict(m, getattr(data, name), 64, torch.device("cpu"), precision) for name in ("val", "test")}, []

    rows = alpha_curve(model, state_of(built), state_of(model), evaluate,
                       {"val": data.val.labels.cpu(), "test": data.test.labels.cpu()})
    return {"alpha": chosen(rows)["alpha"], "accuracy": chosen(rows)["test_accuracy"], "curve": rows,
            "converged": result.converged}


def accuracy(model, split, precision: str = "fp32") -> float:
    from clip_adapt.training import predict
    logits = predict(model, split, 64, torch.device("cpu"), precision)
    return (logits.argmax(1) == split.labels.cpu()).float().mean().item()


# --------------------------------------------------------------------------- credit only for what a method adds

# The methods whose own parts are credited: every classification script whose model has a part that can be
# removed (clip_adapt.base.Part), found from the scripts. A script that accepts --head clip (E3's token prompts,
# E4, E7) is trained through CLIP's frozen text head from E1's templates, which cannot learn on its own, so that
# with its parts removed it is E1 again; one without a head to freeze (E5) is judged part by part against the
# same run with that part removed. The prompts' rate on this task; a patience of 25 steps (5 epochs here) keeps
# the runs short (docs/known-answer.md).
CREDIT_FLAGS = ("--epochs", "60", "--patience", "25", "--min-steps", "0", "--lr", "1e-2")


def takes_clip_head(script) -> bool:
    return any("--head" in action.option_strings and "clip" in (action.choices or ())
               for action in script.parser()._actions)


def credited() -> list[str]:
    """The classification scripts that train a removable part (built on the tiny random CLIP to ask)."""
    from clip_adapt.models import tiny_clip
    from clip_adapt.runner import classification_scripts
    names = []
    for script in classification_scripts():
        if script.trains and script.takes_clip:   # a backbone of its own has no CLIP to be credited against
            clip, _, tokenizer = tiny_clip()
            model = script.build_model(clip, tokenizer, list(SHAPES))
            if any(part.removed is not None for part in model.parts()):
                names.append(script.name)
    return names


def scores_on(model, split, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a split."""
    import torch.nn.functional as F
    from clip_adapt.training import predict
    logits = predict(model, split, 64, torch.device("cpu"), precision).float()
    labels = split.labels.cpu()
    return (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def credit_run(output_dir: Path, data, name: str, seed: int = 0, precision: str = "fp32") -> dict:
    """Test accuracy and loss of one credited method, and of the same trained classifier with its removable
    parts removed (prompts: the hooks pass every layer through; an adapter: disabled): through the frozen text
    head, all of them at once, which must be E1's again ("removed"); without a head to freeze, each part alone
    ("<part> removed")."""
    from clip_adapt.prompts import removed_together
    from clip_adapt.runner import experiment_scripts
    script = next(s for s in experiment_scripts() if s.name == name)
    through_head = takes_clip_head(script)
    model, result = train_method(output_dir, data, name, *(("--head", "clip") if through_head else ()),
                                 *CREDIT_FLAGS, seed=seed, precision=precision)
    accuracy, loss = scores_on(model, data.test, precision)
    run = {"accuracy": accuracy, "loss": loss, "converged": result.converged}
    removable = [part for part in model.parts() if part.removed is not None]
    if through_head:
        with removed_together([part.removed for part in removable]):
            run["removed"], run["removed loss"] = scores_on(model, data.test, precision)
        return run
    for part in removable:
        with part.removed():
            run[f"{part.name} removed"], run[f"{part.name} removed loss"] = scores_on(model, data.test, precision)
    return run


def measure_credit(output_dir: Path, seeds: list[int], precision: str, names: list[str] | None = None) -> None:
    """Prints, per seed, what the credit tests hold each method to: the measurement behind their margins."""
    data = load_task(output_dir)
    zero_shot = accuracy(train_method(output_dir, data, "E1_zero_shot_clip", precision=precision)[0], data.test,
                         precision)
    print(f"E1 zero-shot ({precision}): {zero_shot:.4f}", flush=True)
    for name in names or credited():
        for seed in seeds:
            started = time.time()
            run = credit_run(output_dir, data, name, seed, precision)
            print(f"{name} seed {seed} ({precision}): " + ", ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in run.items())
                + f" ({time.time() - started:.0f} s)", flush=True)


# --------------------------------------------------------------------------- the task family (defaults proven)

# The gradient-trained methods held to the family's bar (tests/test_task_family.py), with their extra flags.
FAMILY_GRADIENT = {"E2 by AdamW": ("E2_linear_probe", "--solver", "adamw"), "E3": ("E3_shallow_vpt",),
                   "E4": ("E4_deep_vpt",), "E7": ("E7_lora",)}


def write_family(root: Path, clip_dir: Path) -> dict[str, Path]:
    """{task: folder laid out as train_method reads it (clip/, a link to clip_dir, and shapes/)} for every
    TASK_FAMILY member."""
    folders = {}
    for task, settings in TASK_FAMILY.items():
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "clip").exists():
            (folder / "clip").symlink_to(Path(clip_dir).resolve(), target_is_directory=True)
        if not (folder / "shapes").exists():
            write_weak_task(folder / "shapes", **settings)
        folders[task] = folder
    return folders


def family_references(folder: Path) -> dict[str, float]:
    """Test accuracies of two scikit-learn logistic regressions on the CLIP's image features of train + validation
    (the whole training folder, so the same for every split seed), computed by transformers and scikit-learn
    alone: "e2_recipe", E2's recipe end to end (StandardScaler and LogisticRegression in a Pipeline, C by
    GridSearchCV's 5-fold cross-validated log-loss), and "plain", LogisticRegressionCV on the raw features with C by
    cross-validated accuracy."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import CLIPImageProcessor, CLIPModel
    clip = CLIPModel.from_pretrained(folder / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(folder / "clip")

    def features(split):
        files = sorted((folder / "shapes" / split).glob("*/*.png"))
        labels = np.array([SHAPES.index(f.parent.name) for f in files])
        with torch.no_grad():
            pixels = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
            return clip.get_image_features(pixel_values=pixels).pooler_output.double().numpy(), labels
    (x, y), (test_x, test_y) = features("train"), features("test")
    folds, grid = StratifiedKFold(5, shuffle=True, random_state=0), np.logspace(-6, 6, 25)
    e2_recipe = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=100_000, tol=1e-8)),
                             {"logisticregression__C": grid}, cv=folds, scoring="neg_log_loss").fit(x, y)
    plain = LogisticRegressionCV(Cs=grid, cv=folds, scoring="accuracy", l1_ratios=(0.0,), max_iter=100_000, tol=1e-8,
                                 use_legacy_attributes=False).fit(x, y)
    return {name: float((fit.predict(test_x) == test_y).mean())
            for name, fit in (("e2_recipe", e2_recipe), ("plain", plain))}


def e2_lbfgs_run(folder: Path, seed: int, output_dir: Path) -> dict:
    """metrics.json of E2 with its default flags (the L-BFGS probe), run as a user runs it, at split and
    training seed `seed`."""
    import subprocess
    import sys
    subprocess.run([sys.executable, str(PROJECT / "E2_linear_probe.py"), "--model", str(folder / "clip"), "--data",
                    str(folder / "shapes"), "--seed", str(seed), "--split-seed", str(seed), "--noise-levels", "0",
                    "--quiet", "--device", "cpu", "--output-dir", str(output_dir)], check=True, cwd=PROJECT,
                   stdout=subprocess.DEVNULL)
    return json.loads((output_dir / "E2_linear_probe" / "metrics.json").read_text())


def measure_family(output_dir: Path, seeds: list[int]) -> None:
    """Prints, per family member, both references and each method's test accuracy and verdict per seed (seed s:
    split seed and training seed s): the measurement behind tests/test_task_family.py's bars."""
    import tempfile
    from clip_adapt import progress
    progress.set_quiet(True)
    for task, folder in write_family(output_dir / "family", output_dir / "clip").items():
        print(f"{task}: references {json.dumps(family_references(folder))}", flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            runs = [e2_lbfgs_run(folder, seed, Path(scratch) / str(seed)) for seed in seeds]
        print(f"{task} E2 (L-BFGS): " + ", ".join(f"{run['test_accuracy']:.4f} {run['convergence']}" for run in runs),
              flush=True)
        for method, (name, *flags) in FAMILY_GRADIENT.items():
            cells = []
            for seed in seeds:
                data = load_task(folder, split_seed=seed)
                model, result = train_method(folder, data, name, *flags, "--split-seed", str(seed), "--quiet", seed=seed)
                cells.append(f"{accuracy(model, data.test):.4f} {result.verdict}")
            print(f"{task} {method}: " + ", ".join(cells), flush=True)


# --------------------------------------------------------------------------- captioning (E8)

# Two phrasings per image, as COCO has several captions per image.
CAPTIONS = ("a {colour} {shape} in the {position}", "there is a {colour} {shape} in the {position} of the picture")
CAPTIONING_LM_STEPS = 100
# E8's flags for the known-answer runs: a fixed ten epochs (no early stop, no rate cut) at a rate for this tiny
# decoder; the best validation epoch is kept (docs/captioning.md, "Known-answer figures").
CAPTIONING_FLAGS = ("--epochs", "10", "--lr", "3e-3", "--patience", "1000")
# Every --peft, "none" (the cross-attention alone) included: what the PEFT modules add is measured against it.
PEFT_MEASURED = ("adapter", "prefix", "lora", "none")


def held_out(shape: str, colour: str, position: str) -> bool:
    """A quarter of the shape × colour × position combinations, shown only in test. Each pair of attributes
    (red circle, circle top left, red top left) is still seen in training, with three of its four partners."""
    return (SHAPES.index(shape) + list(COLOURS).index(colour) + POSITIONS.index(position)) % len(SHAPES) == 0


def write_caption_task(root: Path, per_seen: int = 4, per_held_out: int = 2, seed: int = 0) -> Path:
    """A COCO-format caption folder (train.json, test.json, images/) as E8 reads it: train holds the 48 seen
    combinations (per_seen images each), test only the 16 held-out ones, so every test caption describes a
    combination no training image showed."""
    rng = np.random.default_rng(seed + 20_000)   # never the pretraining or the shapes-task images
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_seen), ("test", per_held_out)):
        images, annotations = [], []
        for combo in combinations():
            if held_out(*combo) != (split == "test"):
                continue
            shape, colour, position = combo
            for _ in range(count):
                image_id = len(images)
                name = f"{split}_{image_id:04d}.png"
                Image.fromarray(render(shape, colour, position, rng)).save(root / "images" / name)
                images.append({"id": image_id, "file_name": name})
                annotations += [{"image_id": image_id, "caption": text.format(shape=shape, colour=colour,
                                                                              position=position)}
                                for text in CAPTIONS]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def caption_tokenizer():
    """A word-level tokenizer over this world's words, GPT-2's <|endoftext|> as start, end and padding: it works
    offline and saves with the language model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted({word for text in (*CAPTIONS, *SHAPES, *COLOURS, *POSITIONS) for word in text.split()
                    if not word.startswith("{")})
    vocab = {word: i for i, word in enumerate(["<|endoftext|>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")


def pretrain_language_model(captions: list[str], steps: int = CAPTIONING_LM_STEPS, seed: int = 0,
                            lr: float = 1e-2, batch_size: int = 64):
    """(GPT2LMHeadModel, tokenizer): a tiny GPT-2 (2 layers, width 64) trained on caption text alone with next-token
    loss, as GPT-2 was on web text, so that E8's decoder knows the words before it sees an image. No
    cross-attention: E8 adds it (--decoder DIR), new and untrained, as it does to GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = caption_tokenizer()
    inputs, labels = caption_tokens(captions, tokenizer)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    # GPT-2's next-token loss by name: transformers finds none in the class name "GPT2LMHeadModel" and warns
    # that loss_type=None is unrecognised before it falls back to this same loss.
    model.loss_type = "ForCausalLM"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = model(input_ids=inputs[batch], attention_mask=labels[batch] >= 0, labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), tokenizer


def world_captions() -> list[str]:
    """Every caption the shapes world can say: each combination in each phrasing."""
    return [text.format(shape=shape, colour=colour, position=position)
            for shape, colour, position in combinations() for text in CAPTIONS]


def build_captioning(output_dir: Path, seed: int = 0, lm_steps: int = CAPTIONING_LM_STEPS) -> dict:
    """Writes output_dir/captions (COCO format) and output_dir/decoder: the tiny GPT-2 and its tokenizer,
    pretrained on the world's caption text, every combination held out of the images included, as GPT-2 read
    text about red circles in top left corners without their pictures. A language model that never read a
    held-out combination would all but forbid its caption, and the held-out test would measure that, not whether
    the captioner reads the image. Returns what it measured."""
    write_caption_task(output_dir / "captions", seed=seed)
    text = world_captions()
    started = time.time()
    model, tokenizer = pretrain_language_model(text, lm_steps, seed)
    seconds = time.time() - started
    model.save_pretrained(output_dir / "decoder")
    tokenizer.save_pretrained(output_dir / "decoder")
    return {"language_model_seconds": round(seconds, 1),
            "language_model_loss": language_model_loss(model, tokenizer, text)}


def caption_tokens(captions: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) as E8 trains on them: <|endoftext|>, the caption, <|endoftext|>; labels padded with -100."""
    from clip_adapt.captioning import MAX_CAPTION_TOKENS, tokenize_captions
    _, labels = tokenize_captions([[text] for text in captions], tokenizer, MAX_CAPTION_TOKENS)
    return labels.masked_fill(labels < 0, tokenizer.pad_token_id), labels


@torch.no_grad()
def language_model_loss(model, tokenizer, captions: list[str]) -> float:
    """Mean next-token loss on these captions."""
    inputs, labels = caption_tokens(captions, tokenizer)
    model.loss_type = "ForCausalLM"   # as in pretrain_language_model (a reloaded model has it unset again)
    return model(input_ids=inputs, attention_mask=labels >= 0, labels=labels).loss.item()


def load_caption_task(output_dir: Path, split_seed: int = 0):
    """E8's caption splits as the script loads them (validation: 0.15 of the train images, drawn by split_seed),
    tokenised by the known-answer decoder's tokenizer."""
    from transformers import AutoTokenizer
    from clip_adapt.captioning import load_captions
    from clip_adapt.models import load_clip
    _, processor, _ = load_clip(str(output_dir / "clip"))
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir / "decoder"))
    return load_captions(str(output_dir / "captions"), processor, tokenizer, 0.15, split_seed)


def captioner(output_dir: Path, peft: str, *argv: str, seed: int = 0):
    """(E8's Captioner, its parsed flags): the known-answer CLIP's tower and the known-answer decoder with new
    cross-attention, built by E8's own build_model from its command line (argv: more flags), untrained."""
    from clip_adapt.runner import experiment_scripts
    script = next(s for s in experiment_scripts() if s.task == "captioning")
    return scripted_model(output_dir, script, [], "--data", str(output_dir / "captions"), "--decoder",
                          str(output_dir / "decoder"), "--peft", peft, *argv, seed=seed)


def train_captioner(output_dir: Path, data, peft: str, *argv: str, seed: int = 0):
    """(Captioner, TrainResult): E8's model trained by the project's loop on `data`, in-process and without the
    script's outputs (scores, gallery, attention maps): what the known-answer tests and their measurement need."""
    import tempfile
    import common
    from clip_adapt.training import train
    model, args = captioner(output_dir, peft, *argv, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        run = common.Experiment("E8_caption_peft", args, torch.device("cpu"), Path(folder), None, None, None,
                                data, time.time())
        return model, train(model, data.train, data.val, data.test, run.train_config(augment=False))


def greedy_captions(model, split) -> tuple[list[str], float]:
    """(the model's greedy captions for the split's images, their CIDEr-D), as E8 writes and scores them."""
    from clip_adapt.caption_report import generate_captions
    from clip_adapt.captioning import cider_d
    captions = generate_captions(model, split, 64, torch.device("cpu"), "fp32", 1)
    return captions, cider_d(split.references, captions)[0]


def most_frequent_caption(data) -> tuple[str, float]:
    """The most frequent training caption (the first of the most frequent, in training order), given for every
    test image, and its test CIDEr-D."""
    from collections import Counter
    from clip_adapt.captioning import cider_d
    caption = Counter(c for captions in data.train.references for c in captions).most_common(1)[0][0]
    return caption, cider_d(data.test.references, [caption] * len(data.test.references))[0]


def named(caption: str) -> tuple:
    """(shape, colour, position) a caption names; None for each it does not."""
    return (next((s for s in SHAPES if f" {s} " in f" {caption} "), None),
            next((c for c in COLOURS if f" {c} " in f" {caption} "), None),
            next((p for p in POSITIONS if f" {p}" in f" {caption}"), None))


def captioning_scores(output_dir: Path, data, seed: int = 0, flags: tuple = CAPTIONING_FLAGS) -> dict:
    """Test CIDEr-D of each PEFT method trained with `flags` (E8's command line) from `seed`, and of the two
    baselines: the most frequent training caption for every image, and the same model untrained (fresh
    cross-attention and PEFT module: the decoder's language model with the image barely let through). Also what
    the right caption in the first phrasing scores, and the share of test images whose caption names each
    attribute right."""
    from clip_adapt.captioning import cider_d
    test = data.test
    truth = [named(references[0]) for references in test.references]
    caption, cider = most_frequent_caption(data)
    scores = {"seed": seed, "most_frequent": {"caption": caption, "cider": cider},
              "right_caption": cider_d(test.references, [references[0] for references in test.references])[0]}
    for peft in PEFT_MEASURED:
        untrained_captions, untrained_cider = greedy_captions(captioner(output_dir, peft, *flags, seed=seed)[0], test)
        model, result = train_captioner(output_dir, data, peft, *flags, seed=seed)
        captions, cider = greedy_captions(model, test)
        right = np.array([[a == b for a, b in zip(named(c), t)] for c, t in zip(captions, truth)]).mean(0)
        scores[peft] = {"cider": cider, "untrained_cider": untrained_cider,
                        "untrained_captions": sorted(set(untrained_captions)),
                        "val_cider": greedy_captions(model, data.val)[1], "best_epoch": result.best_epoch,
                        "named_right": dict(zip(("shape", "colour", "position"), right.round(3).tolist()))}
    return scores


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="known_answer",
                   help="writes clip/, shapes/, templates.txt, captions/ and decoder/ here")
    p.add_argument("--steps", type=int, default=300, help="contrastive pretraining steps (64 pairs each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--credit-seeds", type=int, nargs="+", metavar="SEED",
                   help="instead of building: measure, on the CLIP already in --output-dir, what each credited method "
                        "(credited(): E3, E4, E5, E7) adds (credit_run) for these training seeds")
    p.add_argument("--credit-experiments", nargs="+", metavar="NAME", help="for --credit-seeds: only these")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="for --credit-seeds")
    p.add_argument("--family-seeds", type=int, nargs="+", metavar="SEED",
                   help="instead of building: on the CLIP already in --output-dir, write the task family (TASK_FAMILY) "
                        "under family/ and print both references and every method's test accuracy and verdict per "
                        "seed (docs/known-answer.md, \"The task family\")")
    p.add_argument("--captioning-seeds", type=int, default=0, metavar="N",
                   help="then train E8's adapter, prefix, LoRA and cross-attention alone (--peft none) on captions/ "
                        "from seeds 0..N-1 and print their "
                        "test CIDEr-D and the baselines', one JSON line per seed (docs/captioning.md)")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be at least 3 (a warm-up, then the decay)")
    output_dir = Path(args.output_dir)
    if args.family_seeds:
        measure_family(output_dir, args.family_seeds)
        return
    if args.credit_seeds:
        measure_credit(output_dir, args.credit_seeds, args.precision, args.credit_experiments)
        return
    result = build(output_dir, args.steps, args.seed)
    print(f"pretrained in {result['pretraining_seconds']} s; each image finds its own caption among all 64 "
          f"{100 * result['caption_retrieval_accuracy']:.0f}% of the time; wrote {args.output_dir}/clip, "
          f"{args.output_dir}/shapes and {args.output_dir}/templates.txt")
    captioning = build_captioning(output_dir, args.seed)
    print(f"wrote {args.output_dir}/captions and {args.output_dir}/decoder: a tiny GPT-2 pretrained on the "
          f"captions' text in {captioning['language_model_seconds']} s (next-token loss "
          f"{captioning['language_model_loss']:.3f})", flush=True)
    if args.captioning_seeds:
        from clip_adapt import progress
        progress.set_quiet(True)   # one line per seed, not per epoch
        data = load_caption_task(output_dir)
        for seed in range(args.captioning_seeds):
            print(json.dumps(captioning_scores(output_dir, data, seed)), flush=True)


if __name__ == "__main__":
    main()
