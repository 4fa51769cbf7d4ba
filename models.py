"""CLIP loading and the classifiers of the six experiments, built around an unmodified `transformers` CLIP.

Prompts are added by hooks on CLIP's own modules, never by copying its code, so the frozen backbone
computes exactly what it computes without them.
"""

import contextlib
import hashlib
import math
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer

from data import UserError, looks_like_hub_id

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
TINY_CLIP = "tiny-random-clip"   # what --smoke loads: random weights, seconds on a CPU, no download

ZERO_SHOT_TEMPLATES = (
    "a brain MRI scan showing {}.",
    "an MRI image of a brain with {}.",
    "a magnetic resonance image of the brain showing {}.",
    "a brain MRI, diagnosis: {}.",
)

# The template study (--templates study on E1): generic CLIP templates, including a negation that CLIP's
# bag-of-words-like text embeddings are known to barely tell apart from the positive, then the MRI ones.
STUDY_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of {}",
    "This is not a photo of {}",
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


def tiny_tokenizer() -> CLIPTokenizer:
    """A working CLIP tokenizer with no merges: every word is spelled out in byte-level characters."""
    from tokenizers import pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip(image_size: int = 32, seed: int = 0):
    """A small random CLIP with a real tokenizer and image processor: the whole pipeline in seconds on a CPU.
    Text and vision widths differ on purpose so that a mixed-up dimension fails loudly."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
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
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return clip.eval(), processor, tokenizer


def load_clip(name: str):
    """(CLIPModel, image processor, tokenizer) from a hub id, a local save_pretrained directory, or TINY_CLIP."""
    if name == TINY_CLIP:
        return tiny_clip()
    import transformers
    transformers.logging.disable_progress_bar()
    path = Path(name).expanduser()
    if not path.exists() and not looks_like_hub_id(name):
        raise UserError(f"model directory {name} does not exist: pass --model a directory saved with "
                        f"save_pretrained (CLIPModel and CLIPProcessor) or a hub id such as {DEFAULT_MODEL}")
    source = str(path) if path.exists() else name
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type != "clip":   # from_pretrained would only warn, and carry on with random weights
            raise UserError(f"{name} holds a '{model_type}' model, not CLIP: pass --model a CLIP model directory")
        clip = CLIPModel.from_pretrained(source, attn_implementation="sdpa")
        # The PIL backend everywhere: the torchvision one resizes slightly differently, and results
        # should not depend on whether torchvision happens to be installed.
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if path.exists():
            raise UserError(f"{name} is not a CLIP model directory ({type(error).__name__}): save one with "
                            f"CLIPModel.save_pretrained and CLIPProcessor.save_pretrained") from None
        raise UserError(f"could not load '{name}': the Hugging Face hub cannot be reached and it is not cached; "
                        f"pass --model a local directory saved with save_pretrained") from None
    return clip.eval(), image_processor, tokenizer


def model_dims(clip: CLIPModel) -> dict:
    config = clip.config
    return {"vision_hidden": config.vision_config.hidden_size, "vision_layers": config.vision_config.num_hidden_layers,
            "projection_dim": config.projection_dim, "text_hidden": config.text_config.hidden_size}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counted from requires_grad over the modules the classifier actually holds."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fingerprint(*modules: nn.Module) -> str:
    """A hash of the weights themselves: a cache keyed on it cannot outlive a change to the model."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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


def normalized_image_embeddings(clip: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)


def similarity_logits(clip: CLIPModel, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP's scaled cosine similarities, in fp32 even under autocast: at a logit scale of 100, bf16 logits
    of 16–32 fall on steps of 0.125, and the ties it makes go to class 0."""
    with torch.autocast(image.device.type, enabled=False):
        return clip.logit_scale.exp().float() * image.float() @ text.float().T


class Fp32Linear(nn.Linear):
    """A linear head that computes in fp32 under autocast too, for the same reason as similarity_logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class ZeroShot(Classifier):
    """E1: CLIP as it is, each class described by text; the class embedding averages several templates."""
    frozen = ("clip",)

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES):
        super().__init__()
        self.clip = freeze(clip)
        with torch.no_grad():
            per_template = [self.text_embeddings(tokenizer, [t.format(c) for c in class_names]) for t in templates]
            # Prompt ensembling as in CLIP's paper: average unit vectors, then renormalise.
            class_embeddings = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        self.register_buffer("class_embeddings", class_embeddings)

    def text_embeddings(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        device = self.clip.logit_scale.device
        tokens = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        return F.normalize(self.clip.get_text_features(**tokens).pooler_output, dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = normalized_image_embeddings(self.clip, pixels)
        return similarity_logits(self.clip, image, self.class_embeddings)


PROMPT_POSITIONS = ("front", "back")
PROMPT_ENTRIES = ("pre-ln", "post-ln")
PROMPT_INITS = ("normal", "xavier")


class VisualPrompts(nn.Module):
    """VPT (Jia et al., ECCV 2022): N learnable tokens among the image tokens at the input of the chosen
    encoder layers. The first chosen layer inserts them; every later chosen layer throws away the previous
    layer's prompt outputs and puts in its own (VPT-deep); a layer not chosen carries the prompts along.
    Shallow VPT is the case layers=[0].

    position: "front" puts the prompts right after the class token (VPT), "back" after the last patch token
    (MaPLe's code). The pooled output stays the class token either way. The two are the same function: CLIP's
    vision tower has no attention mask and the prompts carry no position embedding, so attention, being
    permutation-equivariant over the other tokens, gives the class token the same output up to float rounding
    (tested).

    entry: where the first prompted layer's prompts go in when that layer is 0. "pre-ln" (the default) appends
    them to the embeddings before CLIP's pre-layernorm, as the CLIP-based reference implementations of
    VPT-style prompting do (MaPLe and its independent vision-language prompting baseline, IVLP,
    Khattak et al., CVPR 2023); "post-ln" puts them at the encoder layer's input, after the pre-layernorm,
    as a free vector in the space the layer reads (this project's earlier behaviour). Deeper layers have no
    pre-layernorm before them: their prompts always go in at the layer's input, as MaPLe's deeper prompts do,
    so a first prompted layer above 0 makes entry moot, and `self.entry` says "post-ln".

    init: "normal" draws N(0, 0.02) as MaPLe and IVLP do (the default); "xavier" is VPT's uniform bound
    sqrt(6 / (3·patch² + width)).
    """

    def __init__(self, vision_model: nn.Module, num_prompts: int, layers=(0,), dropout: float = 0.0,
                 position: str = "front", entry: str = "pre-ln", init: str = "normal"):
        super().__init__()
        config = vision_model.config
        self.layers = sorted(set(layers))
        if not self.layers or not all(0 <= i < config.num_hidden_layers for i in self.layers):
            raise UserError(f"prompt layers must be between 0 and {config.num_hidden_layers - 1}, got {list(layers)}")
        for name, value, allowed in (("position", position, PROMPT_POSITIONS), ("entry", entry, PROMPT_ENTRIES),
                                     ("init", init, PROMPT_INITS)):
            if value not in allowed:
                raise UserError(f"prompt {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.num_prompts, self.position = num_prompts, position
        self.entry = entry if self.layers[0] == 0 else "post-ln"
        prompts = torch.empty(len(self.layers), num_prompts, config.hidden_size)
        if init == "normal":
            nn.init.normal_(prompts, std=0.02)
        else:
            bound = math.sqrt(6 / (3 * config.patch_size ** 2 + config.hidden_size))   # VPT's Xavier-uniform bound
            nn.init.uniform_(prompts, -bound, bound)
        self.prompts = nn.Parameter(prompts)
        self.dropout = nn.Dropout(dropout)
        for index, layer in enumerate(self.layers):
            if index == 0 and self.entry == "pre-ln":
                vision_model.pre_layrnorm.register_forward_pre_hook(partial(self._put_prompts, index, True))
            else:
                vision_model.encoder.layers[layer].register_forward_pre_hook(
                    partial(self._put_prompts, index, index == 0), with_kwargs=True)

    def _put_prompts(self, index: int, inserting: bool, module, args, kwargs=None):
        hidden = args[0]
        # Expanded before dropout, so that every image draws its own mask, as in VPT.
        prompts = self.dropout(self.prompts[index].expand(hidden.shape[0], -1, -1)).to(hidden.dtype)
        kept = self.num_prompts if not inserting else 0   # the previous layer's prompt outputs, thrown away
        if self.position == "front":
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + kept:]], dim=1)
        else:
            hidden = torch.cat([hidden[:, :hidden.shape[1] - kept], prompts], dim=1)
        return (hidden, *args[1:]) if kwargs is None else ((hidden, *args[1:]), kwargs)


# --------------------------------------------------------------------------- pixel-space prompts

def scaled_prompt_size(image_size: int, size_at_224: int = 30) -> int:
    """Bahng et al.'s 30-pixel prompt at 224 px, scaled to the model's image size (4 at 32 px), at least 1."""
    return max(1, round(size_at_224 * image_size / 224))


class PadPrompter(nn.Module):
    """Bahng et al. (2022), "Exploring Visual Prompts for Adapting Large-Scale Models": a learnable frame
    `pad_size` pixels wide, added to the normalised image; the inside is untouched.
    Parameters: 3·2·p·S (top, bottom) + 3·2·p·(S − 2p) (left, right) = 12·p·(S − p); 69,840 at S = 224, p = 30."""

    def __init__(self, image_size: int, pad_size: int):
        super().__init__()
        if not 0 < 2 * pad_size < image_size:
            raise UserError(f"--pad-size must be between 1 and {(image_size - 1) // 2} for {image_size}-pixel "
                            f"images, got {pad_size}")
        self.image_size, self.pad_size = image_size, pad_size
        inner = image_size - 2 * pad_size
        self.pad_up = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_down = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_left = nn.Parameter(torch.randn(1, 3, inner, pad_size))
        self.pad_right = nn.Parameter(torch.randn(1, 3, inner, pad_size))
        self.register_buffer("centre", torch.zeros(1, 3, inner, inner), persistent=False)

    @staticmethod
    def count(image_size: int, pad_size: int) -> int:
        return 12 * pad_size * (image_size - pad_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        middle = torch.cat([self.pad_left, self.centre, self.pad_right], dim=3)
        frame = torch.cat([self.pad_up, middle, self.pad_down], dim=2)
        return pixels + frame.to(pixels.dtype)


class FixedPatchPrompter(nn.Module):
    """Bahng et al. (2022): a learnable `patch_size`² square added at the top-left corner. Parameters: 3·s²."""

    def __init__(self, image_size: int, patch_size: int):
        super().__init__()
        if not 0 < patch_size <= image_size:
            raise UserError(f"--patch-size must be between 1 and {image_size} for {image_size}-pixel images, "
                            f"got {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.patch = nn.Parameter(torch.randn(1, 3, patch_size, patch_size))

    @staticmethod
    def count(image_size: int, patch_size: int) -> int:
        return 3 * patch_size ** 2

    def place(self, pixels: torch.Tensor, top: int, left: int) -> torch.Tensor:
        s = self.patch_size
        prompt = F.pad(self.patch, (left, self.image_size - left - s, top, self.image_size - top - s))
        return pixels + prompt.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.place(pixels, 0, 0)


class RandomPatchPrompter(FixedPatchPrompter):
    """Bahng et al. (2022): the same square at a random place, drawn once per batch while training.
    Unlike their code, which draws a place at test time too, evaluation puts it at the top-left corner, so that
    a prediction is the same every time it is made."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.place(pixels, 0, 0)
        top, left = torch.randint(0, self.image_size - self.patch_size + 1, (2,)).tolist()
        return self.place(pixels, top, left)


PIXEL_PROMPTERS = {"padding": PadPrompter, "fixed-patch": FixedPatchPrompter, "random-patch": RandomPatchPrompter}


def class_text_embeddings(clip: CLIPModel, tokenizer, class_names: list[str], templates) -> torch.Tensor:
    """Unit class embeddings from CLIP's text tower, averaged over templates and renormalised (as ZeroShot)."""
    device = clip.logit_scale.device
    with torch.no_grad():
        per_template = []
        for template in templates:
            tokens = tokenizer([template.format(c) for c in class_names], padding=True, return_tensors="pt").to(device)
            per_template.append(F.normalize(clip.get_text_features(**tokens).pooler_output.float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)


class TextHead(nn.Module):
    """CLIP's zero-shot text classifier as a fixed head on the projected image embedding (Bahng et al.
    classify a prompted image this way): scaled cosine similarity to each class's text embedding. It holds
    buffers only, so it trains nothing; the text tower is used once here and not kept."""

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES):
        super().__init__()
        self.register_buffer("class_embeddings", class_text_embeddings(clip, tokenizer, class_names, templates))
        self.register_buffer("logit_scale", clip.logit_scale.detach().exp().float().clone())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.logit_scale * F.normalize(embeddings.float(), dim=-1) @ self.class_embeddings.T


class ImageClassifier(Classifier):
    """CLIP's image tower and projection, then a linear head on the projected embedding.
    E2: frozen tower; E3/E4: frozen tower with visual prompts; E6: the whole tower trained."""

    def __init__(self, clip: CLIPModel, num_classes: int, train_backbone: bool = False,
                 num_prompts: int = 0, prompt_layers=(0,), prompt_dropout: float = 0.0,
                 pixel_prompt: nn.Module | None = None, head: nn.Module | None = None, **prompt_options):
        """pixel_prompt: a pixel-space prompter applied to the normalised image first; head: in place of the
        linear head (TextHead for CLIP's text classifier); prompt_options: VisualPrompts' position, entry, init."""
        super().__init__()
        self.vision, self.projection = clip.vision_model, clip.visual_projection
        if not train_backbone:
            self.frozen = ("vision", "projection")
            freeze(self.vision), freeze(self.projection)
        self.prompts = (VisualPrompts(self.vision, num_prompts, prompt_layers, prompt_dropout, **prompt_options)
                        if num_prompts else None)
        self.pixel_prompt = pixel_prompt
        self.head = head if head is not None else Fp32Linear(clip.config.projection_dim, num_classes)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pixel_prompt is not None:
            pixels = self.pixel_prompt(pixels)
        return self.projection(self.vision(pixel_values=pixels).pooler_output)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))


class TextContext(nn.Module):
    """CoOp (Zhou et al., IJCV 2022): M learnable context vectors in place of a hand-written template.
    Each class's sentence is [BOS] ctx_1 ... ctx_M <class name> . [EOS]; CLIP still pools it at its
    end-of-text token, so the class name's own tokens shape the class embedding."""

    def __init__(self, text_model: nn.Module, tokenizer, class_names: list[str], num_context: int):
        super().__init__()
        self.context = nn.Parameter(torch.randn(num_context, text_model.config.hidden_size) * 0.02)
        tokens = tokenizer([f"{name}." for name in class_names], padding=True, return_tensors="pt")
        limit = text_model.config.max_position_embeddings
        if tokens["input_ids"].shape[1] + num_context > limit:
            raise UserError(f"{num_context} text context vectors and the class names take "
                            f"{tokens['input_ids'].shape[1] + num_context} tokens, more than CLIP's {limit}: "
                            f"lower --num-text-prompts")
        # Any token id serves as the placeholder (its embedding is replaced); BOS is never the end-of-text token.
        placeholders = torch.full((len(class_names), num_context), tokenizer.bos_token_id)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        self.register_buffer("input_ids", torch.cat([ids[:, :1], placeholders, ids[:, 1:]], 1), persistent=False)
        self.register_buffer("attention_mask", torch.cat([mask[:, :1], torch.ones_like(placeholders), mask[:, 1:]], 1),
                             persistent=False)
        self._active = False
        text_model.embeddings.token_embedding.register_forward_hook(self._put_context)

    def _put_context(self, module, args, token_embeddings):
        if not self._active:   # any other use of this text tower sees plain token embeddings
            return None
        context = self.context.to(token_embeddings.dtype).expand(token_embeddings.shape[0], -1, -1)
        return torch.cat([token_embeddings[:, :1], context, token_embeddings[:, 1 + len(self.context):]], dim=1)

    @contextlib.contextmanager
    def active(self):
        self._active = True
        try:
            yield self.input_ids, self.attention_mask
        finally:
            self._active = False


class PromptedCLIP(Classifier):
    """E5: visual prompts in the image tower and learned context in the text tower; the logits are
    CLIP's own scaled cosine similarities between an image and each class's text. No linear head."""
    frozen = ("clip",)

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], num_prompts: int = 1,
                 num_text_prompts: int = 4, prompt_dropout: float = 0.0, **prompt_options):
        super().__init__()
        self.clip = freeze(clip)
        self.visual_prompts = VisualPrompts(clip.vision_model, num_prompts, (0,), prompt_dropout, **prompt_options)
        self.text_context = TextContext(clip.text_model, tokenizer, class_names, num_text_prompts)

    def class_embeddings(self) -> torch.Tensor:
        with self.text_context.active() as (input_ids, attention_mask):
            return F.normalize(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
                               .pooler_output.float(), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = normalized_image_embeddings(self.clip, pixels)
        return similarity_logits(self.clip, image, self.class_embeddings())


# --------------------------------------------------------------------------- E7: peft adapters

ADAPTERS = ("lora", "loha", "lokr", "ia3")
VISION_LINEAR_LAYERS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                        "out_proj": "self_attn", "fc1": "mlp", "fc2": "mlp"}
# (IA)^3 (Liu et al., NeurIPS 2022) rescales keys, values and the feed-forward's inner activation (fc2's input);
# the low-rank adapters default to LoRA's q_proj and v_proj (Hu et al., ICLR 2022).
DEFAULT_TARGETS = {"lora": ("q_proj", "v_proj"), "loha": ("q_proj", "v_proj"), "lokr": ("q_proj", "v_proj"),
                   "ia3": ("k_proj", "v_proj", "fc2")}


def vision_layers_regex(names) -> str:
    """A regular expression peft matches against full module names of a CLIPModel: only the vision encoder's
    linear layers with these names, so that the text tower's own q_proj, v_proj, ... stay untouched."""
    unknown = sorted(set(names) - set(VISION_LINEAR_LAYERS))
    if unknown or not names:
        raise UserError(f"unknown target modules {unknown or '(none)'}: choose from {' '.join(VISION_LINEAR_LAYERS)}")
    groups = {}
    for name in sorted(set(names)):
        groups.setdefault(VISION_LINEAR_LAYERS[name], []).append(name)
    parts = "|".join(rf"{block}\.({'|'.join(layer_names)})" for block, layer_names in sorted(groups.items()))
    return rf"vision_model\.encoder\.layers\.\d+\.({parts})"


def peft_config(adapter: str = "lora", rank: int = 8, alpha: float = 16, dropout: float = 0.1, targets=None):
    """The peft config of one adapter kind, restricted to the vision encoder.
    LoHa and LoKr have no input dropout like LoRA's: `dropout` becomes their rank dropout (a share of the
    rank components dropped per step). (IA)^3 learns one scale per feature: it has no rank, alpha or dropout,
    and those arguments are ignored for it."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
    if adapter not in ADAPTERS:
        raise UserError(f"unknown adapter '{adapter}': choose from {', '.join(ADAPTERS)}")
    if rank < 1:
        raise UserError("--rank must be at least 1")
    if not 0 <= dropout < 1:
        raise UserError("--lora-dropout must be in [0, 1)")
    targets = tuple(targets or DEFAULT_TARGETS[adapter])
    regex = vision_layers_regex(targets)
    if adapter == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none")
    if adapter == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=regex)
    if adapter == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=regex)
    feedforward = [name for name in targets if name == "fc2"]   # scaled at its input, as in the paper
    return IA3Config(target_modules=regex,
                     feedforward_modules=vision_layers_regex(feedforward) if feedforward else [])


def adapter_settings(args) -> dict:
    """What metrics.json records about the adapter, from E7's flags."""
    targets = list(args.target_modules or DEFAULT_TARGETS[args.adapter])
    if args.adapter == "ia3":
        return {"adapter": "ia3", "target_modules": targets}
    return {"adapter": args.adapter, "rank": args.rank, "alpha": args.alpha, "adapter_dropout": args.lora_dropout,
            "target_modules": targets}


class AdapterClassifier(Classifier):
    """E7: peft adapters (LoRA by default) in CLIP's vision encoder, then the projection and a linear head
    on the projected embedding, as in ImageClassifier. The whole CLIPModel is wrapped, with target modules
    restricted to the vision encoder, so that the saved adapter loads onto a plain CLIPModel with
    PeftModel.from_pretrained as users expect; the classifier itself holds only the vision tower,
    projection and head, so the text tower is neither trained nor counted, as in E6.

    Base weights are frozen and, like the frozen towers of E2–E4, stay in eval mode while training; only the
    adapter layers follow train()/eval(), so that their own dropout is on in training and off in evaluation."""

    def __init__(self, clip: CLIPModel, num_classes: int, config=None, adapter_dir: Path | None = None):
        """Fresh adapters from `config` (peft_config() by default), or, with `adapter_dir`, the adapter and head
        that save_adapter wrote, loaded with PeftModel.from_pretrained for predictions (nothing trainable)."""
        from peft import PeftModel, get_peft_model
        super().__init__()
        freeze(clip)
        with warnings.catch_warnings():
            # peft asks transformers a deprecated question; the user can do nothing about that warning.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = (PeftModel.from_pretrained(clip, adapter_dir) if adapter_dir is not None
                          else get_peft_model(clip, config or peft_config()))
        # Not a registered submodule: it holds the text tower too, which this classifier does not use.
        object.__setattr__(self, "peft_model", peft_model)
        self.vision, self.projection = clip.vision_model, clip.visual_projection
        self.head = Fp32Linear(clip.config.projection_dim, num_classes)
        if adapter_dir is not None:
            from safetensors.torch import load_file
            self.head.load_state_dict(load_file(Path(adapter_dir) / "head.safetensors"))
            self.head.requires_grad_(False)
        self.train(adapter_dir is None)

    def train(self, mode: bool = True):
        from peft.tuners.tuners_utils import BaseTunerLayer
        super().train(mode)
        self.vision.eval(), self.projection.eval()
        for module in self.vision.modules():
            if isinstance(module, BaseTunerLayer):
                module.train(mode)
                module.get_base_layer().eval()
        return self

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision(pixel_values=pixels).pooler_output)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))

    def save_adapter(self, directory: Path) -> None:
        """peft's own format (adapter_config.json, adapter_model.safetensors), plus head.safetensors."""
        from safetensors.torch import save_file
        self.peft_model.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  Path(directory) / "head.safetensors")

    def save_merged(self, directory: Path, image_processor, tokenizer) -> None:
        """A plain CLIPModel with the adapters merged into its weights, loadable with --model; this model's
        own weights are left as they are (the merge runs on a copy)."""
        import copy
        from transformers import CLIPProcessor
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        merged.save_pretrained(directory)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
