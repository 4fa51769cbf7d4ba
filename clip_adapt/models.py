"""CLIP loading and the classifiers of the experiments, built around an unmodified `transformers` CLIP.

The prompts they train are in prompts.py, E7's peft adapters in adapters.py (both in this package).
"""

from __future__ import annotations   # CLIPModel in signatures, without importing transformers' models for them

import contextlib
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from clip_adapt.backbone import backbone
from clip_adapt.base import Part, UserError
from clip_adapt.data import looks_like_hub_id
from clip_adapt.prompts import TextContext, VisualPrompts

if TYPE_CHECKING:   # transformers' model classes are imported where used: --help needs none of them
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
TINY_CLIP = "tiny-random-clip"   # what --smoke loads: random weights, seconds on a CPU, no download
RANDOM_PREFIX = "random:"   # random:vit-b16 etc.: a published architecture with random weights, no download

ZERO_SHOT_TEMPLATES = (
    "a brain MRI scan showing {}.",
    "an MRI image of a brain with {}.",
    "a magnetic resonance image of the brain showing {}.",
    "a brain MRI, diagnosis: {}.",
)

# The template study (--templates study on E1): generic CLIP templates, including a negation that CLIP's
# bag-of-words-like text embeddings are known to barely tell apart from the positive and the study's third
# template ("No {}, no score."), then the MRI ones.
STUDY_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of {}",
    "This is not a photo of {}",
    "No {}, no score.",
    "a photo of {}, a type of brain MRI.",
    *ZERO_SHOT_TEMPLATES,
)


def load_templates(source: str) -> tuple[str, ...]:
    """'study' for STUDY_TEMPLATES, else a text file with one template per line, each holding one {} for the
    class name; blank lines and lines starting with # are left out."""
    if source == "study":
        return STUDY_TEMPLATES
    path = Path(source).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read templates file {source} ({getattr(error, 'strerror', None) or error}): pass "
                        f"--templates a text file with one template per line, or 'study'") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for template in templates:
        if not template.count("{}") == template.count("{") == template.count("}") == 1:
            raise UserError(f"template '{template}' in {source} must hold exactly one {{}} for the class name "
                            f"and no other braces")
    if not templates:
        raise UserError(f"templates file {source} holds no template: write one per line, each with {{}}")
    return tuple(templates)


# --------------------------------------------------------------------------- loading

# The published OpenAI CLIP architectures: (vision width, depth, heads, patch, image size, text width, text
# heads, projection). Every one has a 12-layer text tower and MLPs four times as wide as the layer.
CLIP_ARCHITECTURES = {
    "vit-b32": (768, 12, 12, 32, 224, 512, 8, 512),       # openai/clip-vit-base-patch32
    "vit-b16": (768, 12, 12, 16, 224, 512, 8, 512),       # openai/clip-vit-base-patch16
    "vit-l14": (1024, 24, 16, 14, 224, 768, 12, 768),     # openai/clip-vit-large-patch14
    "vit-l14-336": (1024, 24, 16, 14, 336, 768, 12, 768),  # openai/clip-vit-large-patch14-336
}


def clip_config(name: str) -> CLIPConfig:
    """The architecture of a published CLIP, for counting and benchmarking without a download."""
    from transformers import CLIPConfig
    if name not in CLIP_ARCHITECTURES:
        raise UserError(f"unknown CLIP architecture '{name}': choose one of {', '.join(CLIP_ARCHITECTURES)}")
    width, layers, heads, patch, image_size, text_width, text_heads, projection = CLIP_ARCHITECTURES[name]
    return CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=12,
                         num_attention_heads=text_heads, max_position_embeddings=77, vocab_size=49408,
                         bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch),
        projection_dim=projection)


def vit_b16_config() -> CLIPConfig:
    """The architecture of openai/clip-vit-base-patch16 (the project's default model)."""
    return clip_config("vit-b16")


def tiny_tokenizer(vocab_size: int | None = None) -> CLIPTokenizer:
    """A working CLIP tokenizer with no merges: every word is spelled out in byte-level characters.

    vocab_size: pad the vocabulary to this size, as CLIP's is laid out: the 512 byte-level characters first,
    then tokens no text produces where CLIP's 48,894 merged words are, then <|startoftext|> and <|endoftext|>
    as its last two ids (49,406 and 49,407 for the published CLIPs), so that a text tower built from a published
    configuration pools at its end-of-text token. Without it: 514 tokens, the special ones last."""
    from transformers import CLIPTokenizer
    from tokenizers import pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars]
    if vocab_size is not None:
        if vocab_size < len(tokens) + 2:
            raise ValueError(f"a byte-level CLIP tokenizer needs at least {len(tokens) + 2} tokens, not {vocab_size}")
        tokens += [f"<|unused_{i}|>" for i in range(len(tokens), vocab_size - 2)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip(image_size: int = 32, seed: int = 0, image_processor: str = "pil"):
    """A small random CLIP with a real tokenizer and image processor: the whole pipeline in seconds on a CPU.
    Text and vision widths differ on purpose so that a mixed-up dimension fails loudly."""
    from transformers import CLIPConfig, CLIPModel
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    return clip.eval(), clip_image_processor(image_size, image_processor), tokenizer


def is_random(name: str) -> bool:
    """Whether --model names random weights (whose accuracies mean nothing): the smoke CLIP, or a random:<arch>."""
    return name == TINY_CLIP or name.startswith(RANDOM_PREFIX)


def model_source(name: str) -> str:
    """The local directory or hub id to load `name` from; a missing directory fails here."""
    path = Path(name).expanduser()
    if not path.exists() and not looks_like_hub_id(name):
        raise UserError(f"model directory {name} does not exist: pass --model a directory saved with "
                        f"save_pretrained (CLIPModel and CLIPProcessor) or a hub id such as {DEFAULT_MODEL}")
    return str(path) if path.exists() else name


def not_loadable(name: str, error: Exception) -> UserError:
    from clip_adapt import hub
    if Path(name).expanduser().exists():
        return UserError(f"{name} is not a CLIP model directory ({type(error).__name__}): save one with "
                         f"CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    return UserError(f"could not load model '{name}': {hub.unavailable('it', error)}; pass --model a local "
                     f"directory saved with save_pretrained, or --model {RANDOM_PREFIX}vit-b16 for the same "
                     f"architecture with random weights (tests the pipeline, no download)")


def check_model(name: str) -> None:
    """The model's config, read (from the hub or its cache) before anything else is loaded: a model that is
    missing, out of reach or not a CLIP fails here, in seconds."""
    from transformers import AutoConfig
    from clip_adapt import backend_open_clip
    if is_random(name):
        return
    if backend_open_clip.names_open_clip(name):
        return backend_open_clip.check(name)
    try:
        model_type = AutoConfig.from_pretrained(model_source(name)).model_type
    except (OSError, ValueError) as error:
        raise not_loadable(name, error) from None
    if model_type != "clip":   # from_pretrained would only warn, and carry on with random weights
        raise UserError(f"{name} holds a '{model_type}' model, not CLIP: pass --model a CLIP model directory")



IMAGE_PROCESSORS = ("pil", "fast")   # transformers' PIL backend, and its torchvision one


def clip_image_processor(image_size: int, kind: str = "pil"):
    """CLIP's own preprocessing (resize the short side, centre crop, OpenAI's mean and std) at image_size, by
    PIL or (kind "fast") by torchvision."""
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    if kind == "fast":
        check_torchvision()
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor
        return CLIPImageProcessor(**sizes)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(**sizes)


def check_torchvision() -> None:
    """--image-processor fast needs a torchvision built for this torch; transformers would quietly fall back to
    PIL without one, and the run would not be what it says."""
    import importlib
    try:
        importlib.import_module("torchvision")
    except Exception as error:   # missing, or built for another torch (its operators fail to register)
        raise UserError(f"--image-processor fast needs torchvision built for torch {torch.__version__} "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'not importable'}): "
                        f"install the matching torchvision, or use --image-processor pil") from None


def random_clip(architecture: str, seed: int = 0, device: torch.device | str | None = None,
                image_processor: str = "pil"):
    """A published CLIP's architecture (clip_config) with random weights, CLIP's image processor at its size and
    a byte-level tokenizer padded to its vocabulary: the real model's compute and memory, no download.
    device: where to draw the weights (on a GPU in a blink; ViT-B/16's take seconds on one CPU core)."""
    from transformers import CLIPModel
    device = torch.device(device or "cpu")
    config = clip_config(architecture)
    tokenizer = tiny_tokenizer(config.text_config.vocab_size)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.text_config.bos_token_id,
                                                                 config.text_config.eos_token_id)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    # The CPU's generator is forked always; asking fork_rng for the CPU as a device too fails (torch 2.14: torch.cpu
    # has no get_rng_state), so on the CPU it forks no device's.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else None, device_type=device.type), device:
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    clip.set_attn_implementation("sdpa")
    return clip.eval(), clip_image_processor(config.vision_config.image_size, image_processor), tokenizer


def is_study_model(name: str) -> bool:
    """Whether --model is the reproduced study's CLIP: openai/clip-vit-base-patch16 from the hub, or a local
    directory holding pretrained weights of its architecture (a saved copy; what can be checked offline)."""
    if name == DEFAULT_MODEL:
        return True
    path = Path(name).expanduser()
    if is_random(name) or not (path / "config.json").is_file():
        return False
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return False
    study = vit_b16_config()
    return config.model_type == "clip" and all(
        getattr(config.vision_config, key) == getattr(study.vision_config, key)
        for key in ("hidden_size", "num_hidden_layers", "patch_size", "image_size")) and \
        config.projection_dim == study.projection_dim


def weights_of(name: str) -> str:
    """'random' for the models load_clip builds with random weights (TINY_CLIP, random:<architecture>), else
    'pretrained'; metrics.json records it, so that no one reads a random model's accuracy as CLIP's."""
    return "random" if is_random(name) else "pretrained"


def weights_identity(name: str, model: nn.Module) -> dict:
    """Which weights a run loaded: the hub revision (the commit of the snapshot) for a hub model, else a
    fingerprint of the weights themselves (a local directory, random weights). Taken when the model is loaded,
    before anything trains."""
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    if revision and not Path(name).expanduser().exists() and not is_random(name):
        return {"revision": revision}
    return {"weights_fingerprint": fingerprint(model)}


def load_clip(name: str, device: torch.device | str | None = None, image_processor: str = "pil"):
    """(CLIP model, image processor, tokenizer) from a hub id, a local save_pretrained directory, TINY_CLIP, or
    random:<architecture> (one of CLIP_ARCHITECTURES with random weights, drawn on `device`): a transformers
    CLIPModel; or, for an open_clip name (hf-hub:<repo>, open_clip:<arch>/<tag>, a folder with
    open_clip_config.json), an open_clip model (clip_adapt/backend_open_clip.py). image_processor: "pil"
    (transformers' PIL backend) or "fast" (its torchvision backend), with the model's own settings."""
    from clip_adapt import backend_open_clip
    if image_processor == "fast":
        check_torchvision()
    if backend_open_clip.names_open_clip(name):
        return backend_open_clip.load(name, image_processor)
    if name == TINY_CLIP:
        return tiny_clip(image_processor=image_processor)
    if name.startswith(RANDOM_PREFIX):
        architecture = name.removeprefix(RANDOM_PREFIX)
        if architecture not in CLIP_ARCHITECTURES:
            raise UserError(f"--model {name}: unknown architecture '{architecture}'; choose one of "
                            f"{', '.join(RANDOM_PREFIX + a for a in CLIP_ARCHITECTURES)}")
        return random_clip(architecture, device=device, image_processor=image_processor)
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    transformers.logging.disable_progress_bar()
    check_model(name)
    source = model_source(name)
    try:
        clip = CLIPModel.from_pretrained(source, attn_implementation="sdpa")
        # The PIL backend unless asked: the torchvision one resizes slightly differently (docs/speed-and-memory.md),
        # and results should not depend on whether torchvision happens to be installed.
        processor = AutoImageProcessor.from_pretrained(source, backend="torchvision" if image_processor == "fast"
                                                       else "pil")
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise not_loadable(name, error) from None
    return clip.eval(), processor, tokenizer


def model_dims(clip) -> dict:
    return backbone(clip).dims()


def count_params(model: nn.Module, clip: nn.Module | None = None) -> tuple[int, int]:
    """(trainable, total), trainable counted from requires_grad over the modules the classifier holds. total:
    those modules' parameters; with `clip`, the whole CLIP (both towers, whichever the method uses) plus what the
    method adds to it, so that every method's share of the total divides by the same CLIP."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if clip is None:
        return trainable, sum(p.numel() for p in params)
    in_clip = {id(p) for p in clip.parameters()}
    return trainable, sum(p.numel() for p in clip.parameters()) + sum(p.numel() for p in params
                                                                      if id(p) not in in_clip)


def fingerprint(*modules: nn.Module) -> str:
    """A hash of the weights themselves: a cache keyed on it cannot outlive a change to the model."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- classifiers

def freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class Classifier(nn.Module):
    """Maps preprocessed pixels to class logits. Submodules named in `frozen` stay in eval mode
    (no dropout) even while the rest trains, and have requires_grad off, so no gradient is computed for them."""
    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self


def normalized_image_embeddings(clip, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(backbone(clip).image_features(pixels).float(), dim=-1)


@contextlib.contextmanager
def exact_fp32(device_type: str):
    """fp32 as it says: autocast off, and on CUDA no TF32 either, which pick_device turns on for the rest of a
    run (TF32 rounds a matmul's inputs to 10 bits of mantissa: about 3e-4 relative error)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def similarity_logits(clip, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP's scaled cosine similarities, in fp32 even under autocast and without TF32: at a logit scale of 100,
    bf16 logits of 16–32 fall on steps of 0.125, and the ties it makes go to class 0."""
    with exact_fp32(image.device.type):
        return backbone(clip).logit_scale.exp().float() * image.float() @ text.float().T


class Fp32Linear(nn.Linear):
    """A linear head that computes in fp32 (no autocast, no TF32), for the same reason as similarity_logits.

    Its input may be standardised first: `input_shift` and `input_scale` (buffers, identity until set) are the
    training split's per-feature mean and standard deviation of the initial features, set once before training
    by clip_adapt/probe.py (start_head) and kept with the trained weights (FITTED_BUFFERS)."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.register_buffer("input_shift", torch.zeros(in_features))
        self.register_buffer("input_scale", torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with exact_fp32(x.device.type):
            return super().forward((x.float() - self.input_shift) / self.input_scale)


# Buffers fitted to the data at the start of training: saved and resumed with the trainable weights.
FITTED_BUFFERS = ("input_shift", "input_scale")


def trainable(module: nn.Module | None, prefix: str = "") -> dict:
    """The module's parameters that train, by name (for a Part)."""
    if module is None:
        return {}
    return {f"{prefix}{name}": p for name, p in module.named_parameters() if p.requires_grad}


def class_text_embeddings(clip, tokenizer, class_names: list[str], templates) -> torch.Tensor:
    """Unit class embeddings from CLIP's text tower; with several templates, prompt ensembling as in CLIP's
    paper: the unit vectors are averaged, then renormalised."""
    parts = backbone(clip)
    device = parts.logit_scale.device
    with torch.no_grad():
        per_template = []
        for template in templates:
            tokens = tokenizer([template.format(c) for c in class_names], padding=True, return_tensors="pt").to(device)
            per_template.append(F.normalize(parts.text_features(tokens["input_ids"], tokens["attention_mask"]).float(),
                                            dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)


class ZeroShot(Classifier):
    """E1: CLIP as it is, each class described by text; the class embedding averages several templates."""
    frozen = ("clip",)

    def parts(self) -> list[Part]:
        return []   # nothing trains

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES):
        super().__init__()
        self.clip = freeze(clip)
        self.register_buffer("class_embeddings", class_text_embeddings(clip, tokenizer, class_names, templates))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = normalized_image_embeddings(self.clip, pixels)
        return similarity_logits(self.clip, image, self.class_embeddings)


class TextHead(nn.Module):
    """CLIP's zero-shot text classifier as a fixed head on the projected image embedding (Bahng et al.
    classify a prompted image this way): scaled cosine similarity to each class's text embedding. It holds
    buffers only, so it trains nothing; the text tower is used once here and not kept."""

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES):
        super().__init__()
        self.register_buffer("class_embeddings", class_text_embeddings(clip, tokenizer, class_names, templates))
        self.register_buffer("logit_scale", backbone(clip).logit_scale.detach().exp().float().clone())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with exact_fp32(embeddings.device.type):
            return self.logit_scale * F.normalize(embeddings.float(), dim=-1) @ self.class_embeddings.T


FEATURES = ("projected", "pooled")


class ImageClassifier(Classifier):
    """CLIP's image tower and projection, then a linear head on the projected embedding.
    E2: frozen tower; E3/E4: frozen tower with visual prompts; E6: the whole tower trained."""

    def __init__(self, clip: CLIPModel, num_classes: int, train_backbone: bool = False,
                 num_prompts: int = 0, prompt_layers=(0,), prompt_dropout: float = 0.0,
                 pixel_prompt: nn.Module | None = None, head: nn.Module | None = None, features: str = "projected",
                 **prompt_options):
        """pixel_prompt: a pixel-space prompter (clip_adapt.prompts.PixelPrompter) added to the normalised image
        as it enters the tower; head: in place of the linear head (TextHead for CLIP's text classifier);
        features: "projected" (the image embedding CLIP compares with text) or "pooled" (the tower's pooled
        output before the projection, as the CLIP paper's linear probes read ViTs, appendix A.3); prompt_options:
        VisualPrompts' position, entry, init."""
        super().__init__()
        self.backbone = backbone(clip)
        self.vision, self.projection = self.backbone.vision, self.backbone.projection
        if not train_backbone:
            self.frozen = ("vision", "projection")
            freeze(self.vision), freeze(self.projection)
        self.prompts = (VisualPrompts(self.backbone, num_prompts, prompt_layers, prompt_dropout, **prompt_options)
                        if num_prompts else None)
        self.pixel_prompt = pixel_prompt.attach(self.backbone) if pixel_prompt is not None else None
        if features not in FEATURES:
            raise UserError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
        self.features = features
        width = self.backbone.projection_dim if features == "projected" else self.backbone.vision_width
        self.head = head if head is not None else Fp32Linear(width, num_classes)
        self.train_backbone = train_backbone

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixels, self.features == "projected")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))

    def parts(self) -> list[Part]:
        parts = []
        if self.prompts is not None:
            parts.append(Part("prompts", trainable(self.prompts, "prompts."), self.prompts.removed))
        if self.pixel_prompt is not None:
            parts.append(Part("pixel prompt", trainable(self.pixel_prompt, "pixel_prompt."), self.pixel_prompt.removed))
        if trainable(self.head):
            parts.append(Part("head", trainable(self.head, "head.")))
        if self.train_backbone:
            parts.append(Part("backbone", {**trainable(self.vision, "vision."),
                                           **trainable(self.projection, "projection.")}))
        return parts


class CoOp(Classifier):
    """E10: CoOp (Zhou et al., IJCV 2022): learned context vectors in the frozen text tower in place of a
    hand-written template (TextContext); the image tower is CLIP's, untouched; the logits are CLIP's own scaled
    cosine similarities (KaiyangZhou/CoOp trainers/coop.py, CustomCLIP)."""
    frozen = ("clip",)

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], num_context: int = 16,
                 class_token_position: str = "end", context_init: str | None = None):
        super().__init__()
        self.clip = freeze(clip)
        self.backbone = backbone(clip)
        self.text_context = TextContext(self.backbone, tokenizer, class_names, num_context, class_token_position,
                                        context_init)

    def class_embeddings(self) -> torch.Tensor:
        with self.text_context.active() as (input_ids, attention_mask):
            return F.normalize(self.backbone.text_features(input_ids, attention_mask).float(), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = normalized_image_embeddings(self.clip, pixels)
        return similarity_logits(self.clip, image, self.class_embeddings())

    def parts(self) -> list[Part]:
        return [Part("text context", trainable(self.text_context, "text_context."), self.text_context.removed)]


class KgCoOp(CoOp):
    """E10 --kgcoop-weight: KgCoOp (Yao et al., CVPR 2023; htyao89/KgCoOp trainers/kgcoop.py): CoOp whose training
    loss adds weight · (1 − the mean cosine similarity between each class's learned and hand-written text
    embeddings), the hand-written ones E1's (`templates`). It brings its own loss (clip_adapt.training
    brings_own_loss): called with labels it returns (loss, correct), so that the validation loss, which selects
    the epoch, holds the penalty too; without labels, CoOp's logits."""
    own_loss = True

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], num_context: int = 16,
                 class_token_position: str = "end", context_init: str | None = None, weight: float = 8.0,
                 templates=ZERO_SHOT_TEMPLATES):
        super().__init__(clip, tokenizer, class_names, num_context, class_token_position, context_init)
        self.weight = weight
        self.register_buffer("hand_written", class_text_embeddings(clip, tokenizer, class_names, templates))

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None):
        image = normalized_image_embeddings(self.clip, pixels)
        text = self.class_embeddings()
        logits = similarity_logits(self.clip, image, text)
        if labels is None:
            return logits
        penalty = 1 - F.cosine_similarity(text, self.hand_written, dim=1, eps=1e-7).mean()
        return F.cross_entropy(logits.float(), labels) + self.weight * penalty, (logits.argmax(1) == labels).sum()


class CoCoOp(CoOp):
    """E12: CoCoOp (Zhou et al., CVPR 2022; KaiyangZhou/CoOp trainers/cocoop.py): CoOp's context shifted for each
    image by a meta-network's output π(x), linear → ReLU → linear (width / 16 in between), from the unit image
    embedding to the text width: [BOS] ctx_1 + π(x) ... ctx_M + π(x) <class name> . [EOS]. The text tower
    therefore runs once per image, on every class's sentence (images × classes sequences a batch)."""

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], num_context: int = 4,
                 context_init: str | None = "a photo of a"):
        super().__init__(clip, tokenizer, class_names, num_context, "end", context_init)
        width, text_width = backbone(clip).projection_dim, backbone(clip).text_width
        # At least one unit in between: below a width of 16 the reference's width // 16 is zero, a meta-net that
        # cannot shift anything (CoCoOp would quietly be CoOp); the published CLIPs' widths are all above it.
        hidden = max(1, width // 16)
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(width, hidden)), ("relu", nn.ReLU()),
                                                   ("linear2", nn.Linear(hidden, text_width))]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = normalized_image_embeddings(self.clip, pixels)
        with self.text_context.active(self.meta_net(image)) as (input_ids, attention_mask):
            text = self.backbone.text_features(input_ids, attention_mask)
        text = F.normalize(text.float(), dim=-1).view(len(image), len(self.text_context.input_ids), -1)
        with exact_fp32(image.device.type):
            return self.backbone.logit_scale.exp().float() * torch.einsum("bd,bcd->bc", image.float(), text)

    def parts(self) -> list[Part]:
        return [*super().parts(), Part("meta-net", trainable(self.meta_net, "meta_net."))]


class PromptedCLIP(CoOp):
    """E5: visual prompts in the image tower and learned context in the text tower (CoOp); the logits are
    CLIP's own scaled cosine similarities between an image and each class's text. No linear head."""

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], num_prompts: int = 1,
                 num_text_prompts: int = 4, prompt_dropout: float = 0.0, **prompt_options):
        Classifier.__init__(self)   # not CoOp's: the visual prompts draw their start before the text context
        self.clip = freeze(clip)
        self.backbone = backbone(clip)
        self.visual_prompts = VisualPrompts(self.backbone, num_prompts, (0,), prompt_dropout, **prompt_options)
        self.text_context = TextContext(self.backbone, tokenizer, class_names, num_text_prompts)

    def parts(self) -> list[Part]:
        return [Part("visual prompts", trainable(self.visual_prompts, "visual_prompts."), self.visual_prompts.removed),
                Part("text context", trainable(self.text_context, "text_context."), self.text_context.removed)]
