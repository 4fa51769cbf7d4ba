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


class VisualPrompts(nn.Module):
    """VPT (Jia et al., ECCV 2022): N learnable tokens between the class token and the patch tokens
    at the input of the chosen encoder layers. The first chosen layer inserts them; every later chosen
    layer throws away the previous layer's prompt outputs and puts in its own (VPT-deep); a layer not
    chosen carries the prompts along. Shallow VPT is the case layers=[0].

    Prompts enter at the encoder layer's input, that is after CLIP's pre-layernorm. That makes layer 0
    no different from the deep layers (one mechanism for E3 and E4), and it leaves each prompt a free
    vector in the space the layer reads, as in VPT; passing it through the pre-layernorm would only
    pin its mean and norm, and an encoder layer normalises its own input anyway.
    """

    def __init__(self, vision_model: nn.Module, num_prompts: int, layers=(0,), dropout: float = 0.0):
        super().__init__()
        config = vision_model.config
        self.layers = sorted(set(layers))
        if not self.layers or not all(0 <= i < config.num_hidden_layers for i in self.layers):
            raise UserError(f"prompt layers must be between 0 and {config.num_hidden_layers - 1}, got {list(layers)}")
        self.num_prompts = num_prompts
        bound = math.sqrt(6 / (3 * config.patch_size ** 2 + config.hidden_size))   # VPT's Xavier-uniform bound
        self.prompts = nn.Parameter(torch.empty(len(self.layers), num_prompts, config.hidden_size).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        for position, index in enumerate(self.layers):
            vision_model.encoder.layers[index].register_forward_pre_hook(
                partial(self._put_prompts, position), with_kwargs=True)

    def _put_prompts(self, position: int, layer, args, kwargs):
        hidden = args[0]
        # Expanded before dropout, so that every image draws its own mask, as in VPT.
        prompts = self.dropout(self.prompts[position].expand(hidden.shape[0], -1, -1)).to(hidden.dtype)
        first_patch = 1 if position == 0 else 1 + self.num_prompts
        hidden = torch.cat([hidden[:, :1], prompts, hidden[:, first_patch:]], dim=1)
        return (hidden, *args[1:]), kwargs


class ImageClassifier(Classifier):
    """CLIP's image tower and projection, then a linear head on the projected embedding.
    E2: frozen tower; E3/E4: frozen tower with visual prompts; E6: the whole tower trained."""

    def __init__(self, clip: CLIPModel, num_classes: int, train_backbone: bool = False,
                 num_prompts: int = 0, prompt_layers=(0,), prompt_dropout: float = 0.0):
        super().__init__()
        self.vision, self.projection = clip.vision_model, clip.visual_projection
        if not train_backbone:
            self.frozen = ("vision", "projection")
            freeze(self.vision), freeze(self.projection)
        self.prompts = (VisualPrompts(self.vision, num_prompts, prompt_layers, prompt_dropout)
                        if num_prompts else None)
        self.head = Fp32Linear(clip.config.projection_dim, num_classes)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
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
                 num_text_prompts: int = 4, prompt_dropout: float = 0.0):
        super().__init__()
        self.clip = freeze(clip)
        self.visual_prompts = VisualPrompts(clip.vision_model, num_prompts, (0,), prompt_dropout)
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
