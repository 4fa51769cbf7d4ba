"""The Backbone (clip_adapt/backbone.py) of an open_clip model, and how --model names one: BiomedCLIP
(`hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`: a timm ViT trunk with a linear projection,
an HF BiomedBERT text tower with CLS pooling and an MLP projection, a 256-token context), open_clip's pretrained
tags (`open_clip:ViT-B-16/laion2b_s34b_b88k`), other `hf-hub:` open_clip repositories, and local folders holding
`open_clip_config.json` and weights.

Two image towers: a timm trunk (open_clip's TimmModel; its blocks, norm_pre and patch_embed, then the head's
projection) and open_clip's own OpenAI-style VisionTransformer (resblocks, ln_pre, conv1, proj). Two text towers:
an HF encoder (HFTextEncoder), fed as BiomedCoOp feeds BiomedCLIP (HealthX-Lab/BiomedCoOp
trainers/biomedcoop_biomedclip.py): the word embeddings of the ids, where CoOp's context replaces some, go in as
`inputs_embeds` with the tokenizer's attention mask, then its pooler and projection; and open_clip's own text
transformer (token_embedding, causal mask, pooled at the end-of-text token), which takes ids padded to its full
context.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_adapt.backbone import Backbone
from clip_adapt.base import UserError

PREFIX = "open_clip:"   # open_clip:<architecture>/<pretrained tag>
HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
# BiomedCLIP's model card classifies with "this is a photo of " + label (its captions are PubMed figure text).
BIOMEDCLIP_TEMPLATES = ("this is a photo of {}",)


def names_open_clip(name: str) -> bool:
    """Whether --model names an open_clip model: hf-hub:<repo>, open_clip:<arch>/<tag>, or a local folder with
    open_clip_config.json."""
    return name.startswith((PREFIX, HUB_PREFIX)) or (Path(name).expanduser() / CONFIG_FILE).is_file()


def wraps(model) -> bool:
    from open_clip.model import CLIP, CustomTextCLIP
    return isinstance(model, (CLIP, CustomTextCLIP))


def wrap(model) -> "OpenCLIPBackbone":
    return OpenCLIPBackbone(model)


def identifier(name: str) -> tuple[str, str | None]:
    """(model name, pretrained tag) as open_clip's factory takes them."""
    if name.startswith(PREFIX):
        architecture, _, tag = name.removeprefix(PREFIX).partition("/")
        if not architecture or not tag:
            raise UserError(f"--model {name}: write open_clip:<architecture>/<pretrained tag>, e.g. "
                            f"open_clip:ViT-B-16/laion2b_s34b_b88k (open_clip.list_pretrained() lists them)")
        return architecture, tag
    if name.startswith(HUB_PREFIX):
        return name, None
    folder = Path(name).expanduser()
    if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
        raise UserError(f"{name} holds {CONFIG_FILE} but no weights: save the model's state_dict there as "
                        f"open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
    return f"local-dir:{folder.resolve()}", None


def check(name: str) -> None:
    """A bad name, a local folder without weights, or an hf-hub: model whose config is out of reach (not in the
    cache, or the hub unreachable) fails here, in seconds: its open_clip_config.json is fetched into the cache."""
    model_name, _ = identifier(name)
    if model_name.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download
        from clip_adapt import hub
        try:
            hf_hub_download(model_name.removeprefix(HUB_PREFIX), CONFIG_FILE)
        except Exception as error:   # offline, missing from the cache, no such repository: all one line
            raise UserError(f"could not read {CONFIG_FILE} of '{name}' ({type(error).__name__}): "
                            f"{hub.unavailable('it')}") from None


def model_config(name: str) -> dict:
    """The open_clip_config.json of a local folder ({} for the other names)."""
    path = Path(name).expanduser() / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load(name: str, image_processor: str = "pil"):
    """(open_clip model, image processor, tokenizer) for --model `name`. The image processor is the project's
    (clip_adapt.models.clip_image_processor) set to the model's own preprocessing (size, mean, std); the
    tokenizer has transformers' call (open_clip's HF tokenizer itself, or its BPE tokenizer behind
    OpenCLIPTokenizer), limited to the model's context."""
    import open_clip
    from clip_adapt import hub
    model_name, tag = identifier(name)
    try:
        model, _ = open_clip.create_model_from_pretrained(model_name, pretrained=tag)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, OSError, ValueError) as error:
        where = "" if model_name.startswith("local-dir:") else f": {hub.unavailable('it')}"
        raise UserError(f"could not load open_clip model '{name}' ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]}){where}") from None
    context = tokenizer.context_length
    if hasattr(tokenizer, "tokenizer"):   # open_clip's HFTokenizer: the transformers tokenizer inside it
        tokenizer = tokenizer.tokenizer
        tokenizer.model_max_length = context
    else:
        tokenizer = OpenCLIPTokenizer(tokenizer)
    model.context_length = context   # the tokenizer's (BiomedCLIP: 256), not the BERT's 512 positions
    text_name = model_config(name).get("model_cfg", {}).get("text_cfg", {}).get("hf_model_name", "")
    if "biomedclip" in name.lower() or "biomed" in text_name.lower():
        model.zero_shot_templates = BIOMEDCLIP_TEMPLATES
    return model.eval(), image_processor_of(model, image_processor), tokenizer


def image_processor_of(model, kind: str):
    """The project's CLIP image processor (resize the short side, centre crop) at the model's size, mean and std;
    open_clip's own transform does the same with torchvision (its "shortest" resize mode, the default)."""
    import open_clip
    from clip_adapt.models import clip_image_processor
    config = open_clip.get_model_preprocess_cfg(model)
    if config.get("resize_mode", "shortest") != "shortest" or config.get("interpolation", "bicubic") != "bicubic":
        raise UserError(f"this open_clip model resizes by {config.get('resize_mode')} / "
                        f"{config.get('interpolation')}; only the shortest-side bicubic resize CLIP uses is supported")
    size = config["size"] if isinstance(config["size"], int) else config["size"][0]
    processor = clip_image_processor(size, kind)
    processor.image_mean, processor.image_std = list(config["mean"]), list(config["std"])
    return processor


class OpenCLIPTokenizer:
    """open_clip's BPE tokenizer (SimpleTokenizer) with the transformers call the project uses:
    tokenizer(texts, padding=True, return_tensors="pt") -> input_ids and attention_mask, and
    add_special_tokens=False for a text's own tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_token_id, self.eos_token_id, self.pad_token_id = tokenizer.sot_token_id, tokenizer.eot_token_id, 0
        self.context_length = tokenizer.context_length

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def __call__(self, texts, padding=False, return_tensors=None, add_special_tokens=True):
        from transformers import BatchEncoding
        single = isinstance(texts, str)
        rows = [self.tokenizer.encode(text) for text in ([texts] if single else texts)]
        if add_special_tokens:
            rows = [[self.bos_token_id, *row[:self.context_length - 2], self.eos_token_id] for row in rows]
        masks = [[1] * len(row) for row in rows]
        if padding:
            longest = max(map(len, rows))
            masks = [mask + [0] * (longest - len(mask)) for mask in masks]
            rows = [row + [self.pad_token_id] * (longest - len(row)) for row in rows]
        encoded = {"input_ids": rows, "attention_mask": masks}
        if single:
            encoded = {key: value[0] for key, value in encoded.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors)


class OpenCLIPBackbone(Backbone):
    def __init__(self, model):
        from open_clip.hf_model import HFTextEncoder
        from open_clip.timm_model import TimmModel
        self.model, visual = model, model.visual
        if isinstance(visual, TimmModel):
            trunk = visual.trunk
            self.vision, self.projection = trunk, visual.head
            self.vision_width, self.vision_blocks = trunk.embed_dim, list(trunk.blocks)
            self.vision_pre_norm, self.patch_embedding = trunk.norm_pre, trunk.patch_embed
            self.patch_size = trunk.patch_embed.patch_size[0]
            self._timm = True
            base = r"visual\.trunk\.blocks\.\d+\."
            self.adapter_targets = {"q_proj": base + r"attn\.qkv", "k_proj": base + r"attn\.qkv",
                                    "v_proj": base + r"attn\.qkv", "out_proj": base + r"attn\.proj",
                                    "fc1": base + r"mlp\.fc1", "fc2": base + r"mlp\.fc2"}
        else:   # open_clip's VisionTransformer, OpenAI's layout
            if not visual.transformer.batch_first:
                raise UserError("this open_clip image tower runs sequence-first; open_clip 3 builds them batch-first")
            self.vision, self.projection = visual, nn.Module()   # visual.proj: a parameter inside the tower
            self.vision_width, self.vision_blocks = visual.transformer.width, list(visual.transformer.resblocks)
            self.vision_pre_norm, self.patch_embedding = visual.ln_pre, visual.conv1
            self.patch_size = visual.patch_size[0]
            self._timm = False
            base = r"visual\.transformer\.resblocks\.\d+\."
            # nn.MultiheadAttention keeps q, k, v in one in_proj weight and calls no Linear of its own: peft's LoRA
            # wraps the attention module itself (its in_proj and out_proj).
            self.adapter_targets = {"q_proj": base + "attn", "k_proj": base + "attn", "v_proj": base + "attn",
                                    "out_proj": base + "attn", "fc1": base + r"mlp\.c_fc", "fc2": base + r"mlp\.c_proj"}
            self.lora_only_targets = frozenset({"q_proj", "k_proj", "v_proj", "out_proj"})
        self.vision_layers = len(self.vision_blocks)
        self.image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        self.projection_dim = ([m for m in visual.head.modules() if isinstance(m, nn.Linear)][-1].out_features
                               if self._timm else visual.proj.shape[1])
        text = getattr(model, "text", model)   # CustomTextCLIP holds its text tower apart; CLIP holds it in itself
        self._hf_text = isinstance(text, HFTextEncoder)
        if self._hf_text:
            self.text_token_embedding = text.transformer.get_input_embeddings()
            self.text_width = text.transformer.config.hidden_size
        else:
            self.text_token_embedding = text.token_embedding
            self.text_width = text.token_embedding.embedding_dim
            self._positions = text.positional_embedding.shape[0]
        self._text = text
        self.context_length = model.context_length
        self.templates = getattr(model, "zero_shot_templates", None)

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._timm:   # the trunk has no classifier: it gives the pooled (class token, final norm) features
            return self.vision(pixels)
        visual = self.vision
        return visual._pool(visual.transformer(visual._embeds(pixels)))[0]

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled) if self._timm else pooled @ self.vision.proj

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._hf_text:
            text = self._text
            output = text.transformer(inputs_embeds=self.text_token_embedding(input_ids), attention_mask=attention_mask)
            return text.proj(text.pooler(output, attention_mask))
        # open_clip's text transformer adds all its positions and its causal mask at full length: the ids are
        # padded to it with 0 (below the end-of-text id it pools at; the causal mask keeps padding out of it).
        ids = F.pad(input_ids, (0, self._positions - input_ids.shape[1]), value=0)
        return self.model.encode_text(ids)
