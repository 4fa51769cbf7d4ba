"""E7's `peft` adapters (LoRA, LoHa, LoKr, IA3) on the CLIP vision tower: their configurations, restricted to
the vision encoder by a regular expression, and the classifier that trains them with a linear head.

The layers are named as in a transformers CLIP (q_proj, k_proj, v_proj, out_proj, fc1, fc2); the model's Backbone
(clip_adapt/backbone.py) says which module each is in its own library. On BiomedCLIP's timm trunk q, k and v are
one fused `qkv` Linear: q_proj, k_proj or v_proj each put one adapter on all three (one LoRA of rank r on the
fused layer, r·(w + 3w) parameters a block: as many as LoRA on q and v apart, 2·r·2w).
"""

import contextlib
import warnings
from pathlib import Path

import torch
from clip_adapt.backbone import backbone
from clip_adapt.base import Part, UserError
from clip_adapt.models import Classifier, Fp32Linear, freeze, trainable


ADAPTERS = ("lora", "loha", "lokr", "ia3")
VISION_LINEAR_LAYERS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                        "out_proj": "self_attn", "fc1": "mlp", "fc2": "mlp"}
# (IA)^3 (Liu et al., NeurIPS 2022) rescales keys, values and the feed-forward's inner activation (fc2's input);
# the low-rank adapters default to LoRA's q_proj and v_proj (Hu et al., ICLR 2022).
DEFAULT_TARGETS = {"lora": ("q_proj", "v_proj"), "loha": ("q_proj", "v_proj"), "lokr": ("q_proj", "v_proj"),
                   "ia3": ("k_proj", "v_proj", "fc2")}


def vision_layers_regex(names, clip=None) -> str:
    """A regular expression peft matches against full module names of the whole CLIP: only the vision encoder's
    layers with these names, so that the text tower's own q_proj, v_proj, ... stay untouched. clip: the model (or
    its Backbone) whose module names these are [default: a transformers CLIPModel's]."""
    from clip_adapt.backend_transformers import ADAPTER_TARGETS
    unknown = sorted(set(names) - set(VISION_LINEAR_LAYERS))
    if unknown or not names:
        raise UserError(f"unknown target modules {unknown or '(none)'}: choose from {' '.join(VISION_LINEAR_LAYERS)}")
    targets = (backbone(clip).adapter_targets if clip is not None else
               {name: rf"vision_model\.encoder\.layers\.\d+\.{pattern}" for name, pattern in ADAPTER_TARGETS.items()})
    return "|".join(sorted({f"(?:{targets[name]})" for name in names}))


def peft_config(adapter: str = "lora", rank: int = 8, alpha: float = 16, dropout: float = 0.1, targets=None,
                clip=None):
    """The peft config of one adapter kind, restricted to the vision encoder of `clip` (its module names; a
    transformers CLIPModel's by default).
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
    fused = sorted(set(targets) & backbone(clip).lora_only_targets) if clip is not None else []
    if adapter != "lora" and fused:
        raise UserError(f"--adapter {adapter} cannot reach {' '.join(fused)} in this model: its attention is one "
                        f"nn.MultiheadAttention, which of peft's adapters only LoRA adapts; pass --adapter lora, or "
                        f"--target-modules fc1 fc2")
    regex = vision_layers_regex(targets, clip)
    if adapter == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none")
    if adapter == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=regex)
    if adapter == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=regex)
    feedforward = [name for name in targets if name == "fc2"]   # scaled at its input, as in the paper
    return IA3Config(target_modules=regex,
                     feedforward_modules=vision_layers_regex(feedforward, clip) if feedforward else [])


def adapter_settings(args) -> dict:
    """What metrics.json records about the adapter, from E7's flags."""
    targets = list(args.target_modules or DEFAULT_TARGETS[args.adapter])
    if args.adapter == "ia3":
        return {"adapter": "ia3", "target_modules": targets}
    return {"adapter": args.adapter, "rank": args.rank, "alpha": args.alpha, "adapter_dropout": args.lora_dropout,
            "target_modules": targets}


@contextlib.contextmanager
def peft_warnings_silenced():
    """peft 0.21 asks transformers 5 the deprecated `is_gradient_checkpointing` when it wraps a model: a
    FutureWarning about peft's code that the user can do nothing about, and harmless (transformers answers it).
    Silenced by that one message here, where peft wraps a model, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


class AdapterClassifier(Classifier):
    """E7: peft adapters (LoRA by default) in CLIP's vision encoder, then the projection and a linear head
    on the projected embedding, as in ImageClassifier. The whole CLIPModel is wrapped, with target modules
    restricted to the vision encoder, so that the saved adapter loads onto a plain CLIPModel with
    PeftModel.from_pretrained as users expect; the classifier itself holds only the vision tower,
    projection and head, so the text tower is neither trained nor counted, as in E6.

    Base weights are frozen and, like the frozen towers of E2–E4, stay in eval mode while training; only the
    adapter layers follow train()/eval(), so that their own dropout is on in training and off in evaluation."""

    def __init__(self, clip, num_classes: int, config=None, adapter_dir: Path | None = None,
                 head: torch.nn.Module | None = None):
        """Fresh adapters from `config` (peft_config() by default), or, with `adapter_dir`, the adapter and head
        that save_adapter wrote, loaded with PeftModel.from_pretrained for predictions (nothing trainable).
        head: in place of the linear head (TextHead: CLIP's frozen text classifier, which learns nothing)."""
        from peft import PeftModel, get_peft_model
        super().__init__()
        freeze(clip)
        with peft_warnings_silenced():
            peft_model = (PeftModel.from_pretrained(clip, adapter_dir) if adapter_dir is not None
                          else get_peft_model(clip, config or peft_config(clip=clip)))
        # Not a registered submodule: it holds the text tower too, which this classifier does not use.
        object.__setattr__(self, "peft_model", peft_model)
        self.backbone = backbone(clip)
        self.vision, self.projection = self.backbone.vision, self.backbone.projection
        self.head = head if head is not None else Fp32Linear(self.backbone.projection_dim, num_classes)
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

    def disabled(self):
        """A context without the adapters: the frozen tower as it was (peft's disable_adapter)."""
        return self.peft_model.disable_adapter()

    def parts(self) -> list[Part]:
        """The adapter (peft initialises every kind it offers here as a no-op: LoRA's B, LoHa's and LoKr's second
        factors at zero, (IA)^3's scales at one), and the head when it trains."""
        adapter = {name: p for name, p in self.vision.named_parameters(prefix="vision") if p.requires_grad}
        parts = [Part("adapter", adapter, self.disabled, identity_start=True)]
        if trainable(self.head):
            parts.append(Part("head", trainable(self.head, "head.")))
        return parts

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixels)

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
