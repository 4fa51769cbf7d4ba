"""E8's captioner: a frozen CLIP vision tower feeds a causal language model (GPT-2 by default) through new
cross-attention layers, joined by transformers' VisionEncoderDecoderModel; only the cross-attention (with its
layer norm, and a projection when the widths differ) and one parameter-efficient module train:

- adapter: the study's bottleneck (width // 2 - 30 = 354 for GPT-2: down, GELU, up, residual, dropout, then the
  same block again with the same weights), one per decoder layer, on the cross-attention's output before its
  residual sum (so after cross-attention and before the MLP), attached by a forward hook;
- prefix: prefix tuning (Li & Liang 2021; learned keys and values in front of every self-attention layer's
  own, through peft's reparameterisation MLP), put in by this module (PrefixTuning: peft's own prefix tuning
  never reaches attention inside VisionEncoderDecoderModel);
- lora: peft's LoRA on the decoder's self-attention input projection (GPT-2: attn.c_attn, peft's default
  target for GPT-2; the cross-attention trains in full anyway), added after the encoder-decoder is built;
- none: cross-attention alone.

Also here: the caption data (COCO-format files or a `datasets` dataset), the tiny smoke models and data, and
the scores (CIDEr-D as COCO's evaluation computes it, PTB tokenizer included; CLIPScore and RefCLIPScore as
Hessel et al. 2021's code computes them).
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clip_adapt.base import Part, UserError
from clip_adapt.data import Split, is_saved_dataset, looks_like_hub_id, open_rgb, placed, preprocess
from clip_adapt.models import freeze
from clip_adapt.prompts import Removable, removed_together

DEFAULT_DECODER = "gpt2"
TINY_DECODER = "tiny-random-gpt2"   # what --smoke loads
SMOKE_CAPTIONS = "synthetic-shape-captions"   # what --smoke trains on: written into the output folder
PEFT_METHODS = ("adapter", "prefix", "lora", "none")
CROSS_ATTENTION_NAMES = ("crossattention", "ln_cross_attn")   # GPT-2's (and BERT-style decoders') names
MAX_CAPTION_TOKENS = 40
CLIPSCORE_WEIGHT = 2.5            # Hessel et al. 2021: w in CLIP-S = w * max(cos, 0)
CLIPSCORE_PREFIX = "A photo depicts "   # their prompt in front of every caption they embed
CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"   # the CLIP that CLIPScore is defined with (their ViT-B/32)
CAPTIONER_CLIP = "captioner"   # --clipscore-model value: score with the captioner's own CLIP (not independent)


def clean_caption(text: str) -> str:
    """One line, single spaces, no space before a full stop (the study's cleaning)."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+\.", ".", text)


# --------------------------------------------------------------------------- the model

class BottleneckAdapter(Removable):
    """down, GELU, up, residual, dropout; applied twice with the same weights (the study's adapter).

    The up-projection starts at zero, so that the untrained adapter is the identity and the decoder starts as the
    language model it was: Houlsby et al. 2019's near-identity initialisation (as LoRA zeroes B). With PyTorch's
    default initialisation instead, the up-projection's random bias shifted every layer's residual stream: on
    the known-answer decoder (width 64, bottleneck 2) the untrained captioner wrote empty captions, and training
    needed three times the epochs to recover (docs/captioning.md). attach() puts it on a module's first output
    by a forward hook; removed() (Removable) takes it out."""

    def __init__(self, width: int, bottleneck: int, dropout: float = 0.1, repeats: int = 2):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout, self.repeats = nn.Dropout(dropout), repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            x = self.dropout(x + self.up(F.gelu(self.down(x))))
        return x

    def attach(self, module: nn.Module) -> "BottleneckAdapter":
        module.register_forward_hook(self._adapt_first_output)
        return self

    def _adapt_first_output(self, module, inputs, output):
        if self._removed:
            return None
        return (self(output[0]), *output[1:]) if isinstance(output, tuple) else self(output)


def adapter_width(decoder_width: int) -> int:
    return decoder_width // 2 - 30   # 354 for GPT-2's 768, as in the study


def is_cross_attention(name: str) -> bool:
    return any(part in name.split(".") for part in CROSS_ATTENTION_NAMES)


class PrefixTuning(Removable):
    """Prefix tuning (Li & Liang, ACL 2021): learned keys and values in front of every self-attention layer's
    own, for GPT-2 decoders. As peft builds it with prefix_projection: an embedding of the virtual tokens and
    Li & Liang's reparameterisation MLP (Linear, Tanh, Linear; peft's PrefixEncoder, hidden width the decoder's)
    give each layer's prefix keys and values, laid out as peft lays them; the real tokens' positions start after
    the prefix (peft shifts position ids by the virtual tokens). After training only the prefix itself is needed
    (2·L·d per token); the MLP is how it is trained.

    Why not peft's PrefixTuningConfig: peft hands the prefix to the decoder as a pre-filled cache, which
    VisionEncoderDecoderModel does not carry (on transformers 5.2x GPT-2 drops it with a FutureWarning, and the
    prefix never reaches attention), and inside the encoder-decoder peft's forward replaces the cache with a
    fresh prefix at every generated step (transformers 5.17: each step saw only the prefix and its last token).
    Here the prefix never enters the cache: a forward pre-hook on each self-attention module passes its layer's
    prefix to a registered attention function (transformers' AttentionInterface) that puts it in front of the
    keys and values that the module computed or read from the cache. So training, cached generation and beam
    search all see the same prefix, and the cache holds only the real tokens."""

    def __init__(self, decoder: nn.Module, num_tokens: int = 20):
        from peft import PrefixEncoder, PrefixTuningConfig
        super().__init__()
        config = decoder.config
        if config.model_type != "gpt2":
            raise UserError(f"--peft prefix is implemented for GPT-2 decoders, not {config.model_type}: use "
                            f"--peft adapter or lora")
        if num_tokens >= config.n_positions:
            raise UserError(f"--prefix-tokens {num_tokens} leave no positions of the decoder's {config.n_positions}")
        self.num_tokens, self.num_layers, self.num_heads = num_tokens, config.n_layer, config.n_head
        self.encoder = PrefixEncoder(PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_tokens, token_dim=config.n_embd, num_layers=config.n_layer,
            num_attention_heads=config.n_head, encoder_hidden_size=config.n_embd, prefix_projection=True))
        self.register_buffer("tokens", torch.arange(num_tokens), persistent=False)
        self._key_values = None
        self.base_attention = config._attn_implementation
        set_attention(decoder, prefix_attention(self.base_attention))
        decoder.register_forward_pre_hook(self._compute_prefix)
        decoder.register_forward_hook(self._forget_prefix)
        for block in decoder.transformer.h:
            block.attn.register_forward_pre_hook(self._give_layer_its_prefix, with_kwargs=True)
        decoder.transformer.wpe.register_forward_pre_hook(self._shift_positions)

    def key_values(self) -> torch.Tensor:
        """[layers, 2 (keys, values), heads, tokens, head width], from the reparameterisation."""
        out = self.encoder(self.tokens[None])[0]   # [tokens, layers * 2 * width], as peft's get_prompt views it
        out = out.view(self.num_tokens, self.num_layers, 2, self.num_heads, -1)
        return out.permute(1, 2, 3, 0, 4)

    def _compute_prefix(self, module, args):   # once per decoder pass, shared by its layers
        self._key_values = None if self._removed else self.key_values()

    def _forget_prefix(self, module, args, output):
        self._key_values = None

    def _give_layer_its_prefix(self, module, args, kwargs):
        if self._removed or self._key_values is None:
            return None
        return args, {**kwargs, "prefix_key_values": self._key_values[module.layer_idx]}

    def _shift_positions(self, module, args):
        return None if self._removed else (args[0] + self.num_tokens,)


class _WithoutMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def logs_silenced(logger_name: str, text: str, when: bool = True):
    """One named log message of one library logger left out while the block runs (nothing else)."""
    if not when:
        yield
        return
    silencer = _WithoutMessage(text)
    logger = logging.getLogger(logger_name)
    logger.addFilter(silencer)
    try:
        yield
    finally:
        logger.removeFilter(silencer)


def set_attention(language_model: nn.Module, name: str) -> None:
    """The decoder's attention implementation, in every part of it. VisionEncoderDecoderModel gives the language
    model a copy of its config while its inner modules keep the original, and transformers 5.17's
    set_attn_implementation reaches only the former: set on each sub-model, then checked on every attention
    module, since one left on the old implementation would drop the prefix silently."""
    from transformers import PreTrainedModel
    for module in language_model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(name)
    left = {m.config._attn_implementation for m in language_model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "config")} - {name}
    if left:
        raise RuntimeError(f"the decoder's attention stayed {left}, not {name}")


def prefix_attention(base: str) -> str:
    """The name of an attention function registered with transformers that runs `base` ("sdpa", "eager", ...)
    with a layer's prefix keys and values in front of its own, when its module was given them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    name = f"clip_adapt_prefix_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base == "eager":
        from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as base_function
    else:
        base_function = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module, query, key, value, attention_mask, prefix_key_values=None, **kwargs):
        if prefix_key_values is not None:
            prefix = prefix_key_values.to(key.dtype)[:, None].expand(-1, key.shape[0], -1, -1, -1)
            attention_mask = mask_with_prefix(attention_mask, query, key, prefix.shape[-2], base == "eager")
            key, value = torch.cat([prefix[0], key], dim=2), torch.cat([prefix[1], value], dim=2)
        return base_function(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def mask_with_prefix(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, prefix_tokens: int,
                     additive: bool) -> torch.Tensor:
    """The attention mask for [prefix, keys]: every query sees the whole prefix. Without a mask, causal over the
    keys (the last query is the last key's token, as with a cache). additive: a float mask (eager attention),
    else a boolean one (True: attend)."""
    if mask is None:
        queries, keys = query.shape[-2], key.shape[-2]
        rows = torch.arange(queries, device=key.device)[:, None] + (keys - queries)
        mask = (torch.arange(keys, device=key.device)[None, :] <= rows)[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    seen = (torch.zeros if mask.dtype != torch.bool else torch.ones)(
        (*mask.shape[:-1], prefix_tokens), dtype=mask.dtype, device=mask.device)
    return torch.cat([seen, mask], dim=-1)


class Captioner(nn.Module):
    """pixels -> caption. forward(pixels, targets) gives (mean next-token loss, summed per-caption next-token
    accuracy), the `own_loss` that clip_adapt.training.train() trains and evaluates on. targets: the token ids
    [start, caption..., end], padded with -100.

    The PEFT module is added after VisionEncoderDecoderModel is built: its constructor's post_init()
    re-initialises every module not yet marked as initialised, and would redraw LoRA's zero B and the prefix."""
    own_loss = True

    def __init__(self, clip, decoder, decoder_tokenizer, peft: str = "adapter", prefix_tokens: int = 20,
                 rank: int = 8, alpha: float = 16, lora_dropout: float = 0.1, adapter_dropout: float = 0.1):
        from transformers import VisionEncoderDecoderModel
        super().__init__()
        if peft not in PEFT_METHODS:
            raise UserError(f"--peft must be one of {', '.join(PEFT_METHODS)}")
        if not any(is_cross_attention(name) for name, _ in decoder.named_parameters()):
            raise UserError(f"the decoder ({decoder.config.model_type}) has no cross-attention layers: pass "
                            f"--decoder a causal language model that supports add_cross_attention, such as gpt2")
        self.peft, self.tokenizer = peft, decoder_tokenizer
        encoder = freeze(clip.vision_model)
        decoder.requires_grad_(False)
        self.model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)   # adds enc_to_dec_proj if needed
        if peft == "lora":
            from clip_adapt.adapters import peft_warnings_silenced
            from peft import get_peft_model
            with peft_warnings_silenced():
                self.model.decoder = get_peft_model(self.model.decoder, lora_config(decoder.config, rank, alpha,
                                                                                    lora_dropout))
        for name, parameter in self.model.decoder.named_parameters():
            if is_cross_attention(name):
                parameter.requires_grad_(True)
        config = self.model.config
        start = decoder_tokenizer.bos_token_id
        end = decoder_tokenizer.eos_token_id
        config.decoder_start_token_id, config.eos_token_id = start, end
        config.pad_token_id = decoder_tokenizer.pad_token_id if decoder_tokenizer.pad_token_id is not None else end
        self.model.generation_config.update(decoder_start_token_id=start, eos_token_id=end,
                                            pad_token_id=config.pad_token_id, bos_token_id=start)
        self.adapters = nn.ModuleList()
        if peft == "adapter":
            width = decoder.config.hidden_size
            for module_name, module in decoder.named_modules():
                if module_name.split(".")[-1] == "crossattention":
                    self.adapters.append(BottleneckAdapter(width, adapter_width(width), adapter_dropout).attach(module))
        self.prefix = PrefixTuning(decoder, prefix_tokens) if peft == "prefix" else None

    @property
    def encoder(self):
        return self.model.encoder

    def train(self, mode: bool = True):
        """The frozen CLIP tower stays in eval mode; the decoder, which holds the trained layers, follows `mode`
        (its dropout on while training, as in the study)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, pixels: "torch.Tensor | PairImages", targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = targets[:, :-1].masked_fill(targets[:, :-1] < 0, self.model.config.pad_token_id)
        labels = targets[:, 1:]
        if isinstance(pixels, PairImages):   # the frozen tower once per distinct image, its output per caption
            encoded = self.encoder(pixel_values=pixels.pixels).last_hidden_state
            run = dict(encoder_outputs=(encoded.index_select(0, pixels.image_of),))
        else:
            run = dict(pixel_values=pixels)
        logits = self.model(**run, decoder_input_ids=inputs).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        counted = labels >= 0
        right = ((logits.argmax(-1) == labels) & counted).sum(1) / counted.sum(1).clamp(min=1)
        return loss, right.sum()

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, num_beams: int = 1, max_new_tokens: int = MAX_CAPTION_TOKENS,
                 **kwargs):
        self.eval()
        # Two named transformers warnings that do not apply here, silenced for this call only. Its inputs are
        # pixels, which have no padding to mask (GPT-2's pad token being its end token is what it warns of);
        # and with output_attentions (the attention maps) the frozen CLIP encoder, on sdpa, returns no
        # attention weights, which are not wanted: only the decoder's cross-attention is read, in eager mode.
        with logs_silenced("transformers.generation.utils", "The attention mask is not set with a batched input"), \
                logs_silenced("transformers.integrations.sdpa_attention", "does not support `output_attentions=True`",
                              when=bool(kwargs.get("output_attentions"))):
            # At least one token unless asked otherwise: an end token first would be an empty caption, which no
            # reference is (and which the untrained --smoke decoder otherwise gives for every image).
            return self.model.generate(pixel_values=pixels, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                       do_sample=False, **{"min_new_tokens": 1, **kwargs})

    def captions(self, pixels: torch.Tensor, num_beams: int = 1, max_new_tokens: int = MAX_CAPTION_TOKENS
                 ) -> list[str]:
        sequences = self.generate(pixels, num_beams, max_new_tokens)
        return [clean_caption(text) for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]

    def eager_attention(self) -> str:
        """The decoder's eager attention (which returns attention weights), with the prefix when there is one."""
        return prefix_attention("eager") if self.prefix is not None else "eager"

    def parts(self) -> list[Part]:
        """The cross-attention (with its layer norms), the encoder projection when there is one, and the --peft
        module: the adapter and LoRA start as the identity, the prefix does not (its keys and values take part in
        attention from the start); all three can be removed."""
        named = {name: p for name, p in self.named_parameters() if p.requires_grad}
        cross = {name: p for name, p in named.items() if is_cross_attention(name)}
        projection = {name: p for name, p in named.items() if "enc_to_dec_proj" in name}
        module = {name: p for name, p in named.items() if name not in cross and name not in projection}
        parts = [Part("cross-attention", cross)]
        if projection:
            parts.append(Part("encoder projection", projection))
        if self.peft == "adapter":
            parts.append(Part("adapter", module, lambda: removed_together([a.removed for a in self.adapters]), identity_start=True))
        elif self.peft == "prefix":
            parts.append(Part("prefix", module, self.prefix.removed))
        elif self.peft == "lora":
            parts.append(Part("lora", module, self.model.decoder.disable_adapter, identity_start=True))
        return parts

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters by part: cross_attention, encoder_projection, and the --peft module."""
        counts = {"cross_attention": 0, "encoder_projection": 0, self.peft: 0}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                part = ("cross_attention" if is_cross_attention(name) else
                        "encoder_projection" if "enc_to_dec_proj" in name else self.peft)
                counts[part] += parameter.numel()
        return counts


def lora_config(decoder_config, rank: int, alpha: float, dropout: float):
    """peft's LoRA on GPT-2's self-attention input projection only (peft's default target for GPT-2 also matches
    the cross-attention's c_attn, which trains in full); other decoders: peft's default targets."""
    from peft import LoraConfig
    targets = r".*\.attn\.c_attn" if decoder_config.model_type == "gpt2" else None
    return LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=targets, fan_in_fan_out=decoder_config.model_type == "gpt2")


def expected_trainable(decoder_width: int, decoder_layers: int, encoder_width: int, peft: str,
                       prefix_tokens: int = 20, rank: int = 8) -> dict[str, int]:
    """The trainable counts of a GPT-2 decoder by formula (d: decoder width, L: layers, e: encoder width):
    cross-attention L·(4d² + 6d) (query d×d, key and value d×2d, output d×d, with biases, and a layer norm);
    the encoder projection e·d + d when e ≠ d; adapter L·(2·d·b + b + d) with b = d // 2 - 30;
    prefix P·d for the P virtual tokens' embedding, then the reparameterisation MLP d → d → 2·L·d with biases,
    d² + d + 2·L·d·(d + 1) (after training, only the prefix's P·2·L·d values are needed: prefix_values);
    LoRA L·r·(d + 3d) on the d → 3d self-attention projection."""
    d, layers, b = decoder_width, decoder_layers, adapter_width(decoder_width)
    module = {"adapter": layers * (2 * d * b + b + d),
              "prefix": prefix_tokens * d + d * d + d + 2 * layers * d * (d + 1),
              "lora": layers * rank * 4 * d, "none": 0}[peft]
    return {"cross_attention": layers * (4 * d * d + 6 * d),
            "encoder_projection": encoder_width * d + d if encoder_width != d else 0, peft: module}


def prefix_values(decoder_width: int, decoder_layers: int, prefix_tokens: int = 20) -> int:
    """The prefix's own keys and values, P·2·L·d: what a trained prefix amounts to once the MLP is dropped."""
    return prefix_tokens * 2 * decoder_layers * decoder_width


# --------------------------------------------------------------------------- loading the decoder

def byte_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges: 256 byte tokens and <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_decoder(seed: int = 0, tokenizer=None):
    """A small random GPT-2 with cross-attention and the byte-level tokenizer: seconds on a CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = tokenizer or byte_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=96, n_layer=2, n_head=2,
                        add_cross_attention=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config), tokenizer


def decoder_source(name: str) -> str:
    """The local directory or hub id to load --decoder from; a missing directory fails here."""
    path = Path(name).expanduser()
    if not path.exists() and not looks_like_hub_id(name):
        raise UserError(f"decoder directory {name} does not exist: pass --decoder a directory saved with "
                        f"save_pretrained or a hub id such as {DEFAULT_DECODER}")
    return str(path) if path.exists() else name


def check_decoder(name: str) -> None:
    """The decoder's config, read (from a directory, the hub or its cache) before anything loads: a missing
    directory, a model out of reach or one that is not a causal language model fails here, in seconds."""
    if name == TINY_DECODER:
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from clip_adapt import hub
    source = decoder_source(name)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as error:
        if Path(source).exists():
            raise UserError(f"{name} is not a model directory ({type(error).__name__}): pass --decoder a causal "
                            f"language model saved with save_pretrained (model and tokenizer)") from None
        raise UserError(f"could not load decoder '{name}': {hub.unavailable('it')}; pass --decoder a local "
                        f"directory saved with save_pretrained") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"--decoder {name} is a '{model_type}' model, not a causal language model: pass one that "
                        f"supports add_cross_attention, such as {DEFAULT_DECODER}")


def load_decoder(name: str):
    """(causal LM with cross-attention added, its tokenizer) from a hub id, a local directory or TINY_DECODER.
    The cross-attention layers are new, randomly initialised: they are what E8 trains."""
    if name == TINY_DECODER:
        return tiny_decoder()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = decoder_source(name)
    path = Path(source)
    try:
        decoder = AutoModelForCausalLM.from_pretrained(source, add_cross_attention=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if path.exists():
            raise UserError(f"{name} is not a causal language model directory ({type(error).__name__}): save "
                            f"one with save_pretrained (model and tokenizer)") from None
        raise UserError(f"could not load decoder '{name}': the Hugging Face hub cannot be reached and it is not "
                        f"cached; pass --decoder a local directory saved with save_pretrained") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {name} has no start or end token: E8 needs both (GPT-2's is "
                        f"<|endoftext|>)")
    return decoder, tokenizer


# --------------------------------------------------------------------------- data

class PairImages(NamedTuple):
    """The images of a batch of (image, caption) pairs, each distinct image once: `pixels` [images, ...] and, for
    each pair, the row of its image (`image_of`). The captioner runs its frozen tower on `pixels` and hands each
    caption its image's output: the same loss as one image per pair, a fifth of the tower's work on COCO."""
    pixels: torch.Tensor
    image_of: torch.Tensor


@dataclass
class CaptionSplit:
    """One split: the images once (uint8 pixels in `images`) and one row per (image, caption) pair:
    `image_of` the pair's image (kept on the host, where batches are gathered), `labels` its target token ids
    (what train() calls labels). `references` holds every image's captions, for scoring; `sources` the test
    images as read (paths or bytes), for a scoring CLIP that preprocesses them its own way.

    train() visits an epoch image by image, every caption of an image in a row (epoch_order), and with
    share_images each batch carries each distinct image once (PairImages), so that the frozen tower runs once
    per image and epoch, not once per caption (as captioning code with several captions per image does, e.g.
    seq_per_img in ruotianluo's self-critical.pytorch). Only valid while the tower is frozen and images are not augmented: train() refuses
    augmentation for such a split."""
    images: Split
    references: list[list[str]]
    image_of: torch.Tensor
    labels: torch.Tensor
    sources: list | None = None
    share_images: bool = True

    def __len__(self):
        return len(self.labels)

    @property
    def files(self) -> list[str]:
        return self.images.files

    @property
    def inputs(self) -> torch.Tensor:
        return self.images.inputs

    @property
    def host_indices(self) -> bool:
        return True   # the distinct images of a batch are found on the host: no read-back from the device

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The pairs of one epoch: the images in random order, each image's pairs in a row. The same order with
        share_images on or off, so that sharing changes the work, never the batches."""
        image_of = self.image_of.cpu()
        by_image = torch.argsort(image_of, stable=True)   # pair indices, image by image
        counts = torch.bincount(image_of, minlength=len(self.files))
        starts = counts.cumsum(0) - counts
        images = torch.randperm(len(self.files), generator=generator)
        chosen = counts[images]
        within = torch.arange(int(chosen.sum())) - (chosen.cumsum(0) - chosen).repeat_interleave(chosen)
        return by_image[starts[images].repeat_interleave(chosen) + within]

    def image_rows(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the images to gather for these pairs, each pair's row among them): the distinct images and the
        inverse with share_images, else one image per pair and None."""
        index = torch.arange(len(self)) if index is None else torch.as_tensor(index).cpu()
        images = self.image_of[index]
        if not self.share_images:
            return images, None
        return torch.unique(images, return_inverse=True)

    def model_inputs(self, index=None, device=None) -> "torch.Tensor | PairImages":
        images, rows = self.image_rows(index)
        pixels = self.images.model_inputs(images, device)
        return pixels if rows is None else PairImages(pixels, rows.to(pixels.device))

    def batches(self, indices: list, device):
        """model_inputs for each batch of pairs, in order: the images gathered (and prefetched, when they are kept
        on the host) by Split.batches."""
        rows = [self.image_rows(index) for index in indices]
        feed = self.images.batches([images for images, _ in rows], device)
        for (_, row), pixels in zip(rows, feed):
            yield pixels if row is None else PairImages(pixels, row.to(pixels.device, non_blocking=True))

    def to(self, device) -> "CaptionSplit":
        return CaptionSplit(self.images.to(device), self.references, self.image_of, self.labels.to(device),
                            self.sources, self.share_images)

    def kept_on_host(self) -> "CaptionSplit":
        return CaptionSplit(self.images.kept_on_host(), self.references, self.image_of, self.labels, self.sources,
                            self.share_images)


@dataclass
class CaptionData:
    train: CaptionSplit
    val: CaptionSplit
    test: CaptionSplit
    report: dict

    def splits(self) -> dict[str, CaptionSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to(self, device) -> "CaptionData":
        """The images placed by the classification data's rule (clip_adapt.data.placed): on the device when
        they fit in half of its free memory, else kept in host memory and copied batch by batch."""
        splits = placed([self.train.images, self.val.images, self.test.images], device)
        kept = [split if images is split.images else split.kept_on_host()
                for split, images in zip((self.train, self.val, self.test), splits)]
        return CaptionData(*(split.to(device) for split in kept), self.report)

    def sharing(self, share_images: bool) -> "CaptionData":
        return CaptionData(*(dataclasses.replace(split, share_images=share_images)
                             for split in (self.train, self.val, self.test)), self.report)


class LazyImages:
    """Image files opened only when preprocess() takes a chunk of them: a large set is never all open at once."""

    def __init__(self, sources: list):
        self.sources = sources

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index: slice) -> list[Image.Image]:
        return [open_rgb(source) for source in self.sources[index]]


def tokenize_captions(references: list[list[str]], tokenizer, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image of each pair, [start, tokens..., end] padded with -100), captions cut at max_tokens tokens."""
    rows, image_of = [], []
    for image, captions in enumerate(references):
        for caption in captions:
            ids = tokenizer(caption, add_special_tokens=False)["input_ids"][:max_tokens]
            rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
            image_of.append(image)
    labels = torch.full((len(rows), max(map(len, rows), default=2)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, :len(row)] = torch.tensor(row)
    return torch.tensor(image_of, dtype=torch.long), labels


def read_coco_split(json_path: Path, root: Path) -> tuple[list[str], list[list[str]]]:
    """(image files, their captions) from one COCO-format caption file: images with id and file_name,
    annotations with image_id and caption. Files are found under root/images/ or root/."""
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        captions = {image_id: [] for image_id in names}
        for annotation in coco["annotations"]:
            captions[annotation["image_id"]].append(clean_caption(annotation["caption"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{json_path} is not a COCO-format caption file ({type(error).__name__}: {error}): it "
                        f"needs 'images' (id, file_name) and 'annotations' (image_id, caption)") from None
    files, references = [], []
    for image_id, name in names.items():
        if not captions[image_id]:
            continue   # an image without a caption has nothing to learn or score
        path = next((p for p in (root / "images" / name, root / name) if p.is_file()), None)
        if path is None:
            raise UserError(f"image {name} listed in {json_path} is neither in {root / 'images'} nor in {root}")
        files.append(str(path))
        references.append(captions[image_id])
    if not files:
        raise UserError(f"{json_path} has no captioned image")
    return files, references


def pick_caption_column(features, asked: str | None, data: str) -> str:
    from datasets import Sequence, Value
    def is_text(feature):
        return (isinstance(feature, Value) and feature.dtype == "string") or (
            isinstance(feature, (Sequence, list)) and is_text(getattr(feature, "feature", None) or feature[0]))
    candidates = [name for name, feature in features.items() if is_text(feature)]
    if asked:
        if asked not in candidates:
            raise UserError(f"--caption-column {asked} is not a text column of {data}: its text columns are "
                            f"{', '.join(candidates) or 'none'}")
        return asked
    for preferred in ("caption", "captions", "text", "sentences"):
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(f"{data} has {len(candidates)} text columns ({', '.join(candidates)}): name the captions "
                    f"with --caption-column")


def read_dataset_splits(data: str, image_column: str | None, caption_column: str | None, test_split: str
                        ) -> dict[str, tuple[list, list[list[str]]]]:
    """{split: (image sources, captions)} from a `datasets` dataset (save_to_disk folder or hub id)."""
    import datasets
    try:
        path = Path(data).expanduser()
        loaded = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(data)
    except Exception as error:   # datasets raises many kinds; the user needs the one line
        raise UserError(f"could not load caption dataset {data} ({type(error).__name__}): pass --data a COCO-format "
                        f"folder, a save_to_disk folder or a reachable hub id") from None
    if isinstance(loaded, datasets.Dataset):
        raise UserError(f"{data} is a single split: E8 needs a train and a '{test_split}' split")
    for needed in ("train", test_split):
        if needed not in loaded:
            raise UserError(f"{data} has no '{needed}' split (it has {', '.join(loaded)}); see --test-split")
    features = loaded["train"].features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    image = image_column or (images[0] if len(images) == 1 else None)
    if image not in features:
        raise UserError(f"{data}: name its image column with --image-column (image columns: "
                        f"{', '.join(images) or 'none'})")
    caption = pick_caption_column(features, caption_column, data)
    result = {}
    for name in ("train", "validation", test_split):
        if name in loaded:
            split = loaded[name].cast_column(image, datasets.Image(decode=False))
            captions = [[clean_caption(c) for c in ([value] if isinstance(value, str) else value)]
                        for value in split[caption]]
            result[name] = (split[image], captions)
    return result


def read_caption_sources(data: str, image_column=None, caption_column=None, test_split="test") -> dict:
    """{"train", "test", optionally "validation": (image sources, captions)} from --data."""
    root = Path(data).expanduser()
    if root.is_dir() and (root / "train.json").is_file():
        if not (root / "test.json").is_file():
            raise UserError(f"{root} has train.json but no test.json: a COCO-format caption folder needs both "
                            f"(and optionally val.json)")
        found = {"train": "train.json", test_split: "test.json", "validation": "val.json"}
        splits = {split: read_coco_split(root / name, root) for split, name in found.items()
                  if (root / name).is_file()}
        return {split: ([{"path": file} for file in files], captions) for split, (files, captions) in splits.items()}
    if (root.exists() and is_saved_dataset(root)) or (not root.exists() and looks_like_hub_id(data)):
        return read_dataset_splits(data, image_column, caption_column, test_split)
    raise UserError(f"--data {data} is neither a COCO-format caption folder (train.json, test.json, images/), a "
                    f"save_to_disk dataset folder, nor a hub id")


def load_captions(data: str, image_processor, tokenizer, val_fraction: float = 0.15, seed: int = 0,
                  image_column=None, caption_column=None, test_split="test",
                  max_tokens: int = MAX_CAPTION_TOKENS) -> CaptionData:
    """Train / validation / test caption splits; without a validation split, val_fraction of the train images
    (with all their captions) is held out, drawn with `seed`."""
    sources = read_caption_sources(data, image_column, caption_column, test_split)
    if "validation" not in sources:
        images, captions = sources["train"]
        order = np.random.default_rng(seed).permutation(len(images))
        cut = max(1, round(val_fraction * len(images)))
        if len(images) - cut < 1:
            raise UserError(f"{data}: too few train images ({len(images)}) to hold out a validation share")
        pick = lambda idx: ([images[i] for i in sorted(idx)], [captions[i] for i in sorted(idx)])  # noqa: E731
        sources["validation"], sources["train"] = pick(order[:cut]), pick(order[cut:])
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
    splits = {}
    for name, key in (("train", "train"), ("val", "validation"), ("test", test_split)):
        images, captions = sources[key]
        pixels = preprocess(LazyImages(list(images)), image_processor)
        files = [source.get("path") or f"{name}/{i}" for i, source in enumerate(images)]
        image_of, labels = tokenize_captions(list(captions), tokenizer, max_tokens)
        splits[name] = CaptionSplit(Split(pixels, torch.arange(len(files)), files, mean, std), list(captions),
                                    image_of, labels, list(images) if name == "test" else None)
    report = {f"{name}_{what}": count for name, split in splits.items()
              for what, count in (("images", len(split.files)), ("captions", len(split)))}
    return CaptionData(splits["train"], splits["val"], splits["test"], report)


# --------------------------------------------------------------------------- the smoke data

SMOKE_COLOURS = {"red": (215, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235)}
SMOKE_POSITIONS = ("top left", "top right", "bottom left", "bottom right")


def write_shape_captions(root: Path, images_per_split=(24, 8), size: int = 32, seed: int = 0) -> Path:
    """A tiny COCO-format caption folder: a coloured square in one quadrant of a noisy image, captioned
    "a red square in the top left." and "there is a red square at the top left."."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "test"), images_per_split):
        images, annotations = [], []
        for i in range(count):
            colour = list(SMOKE_COLOURS)[rng.integers(len(SMOKE_COLOURS))]
            position = SMOKE_POSITIONS[rng.integers(len(SMOKE_POSITIONS))]
            pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            row = 0 if position.startswith("top") else size // 2
            column = 0 if position.endswith("left") else size // 2
            pixels[row + 3:row + size // 2 - 3, column + 3:column + size // 2 - 3] = SMOKE_COLOURS[colour]
            name = f"{split}_{i:03d}.png"
            Image.fromarray(pixels).save(root / "images" / name)
            images.append({"id": i, "file_name": name})
            annotations += [{"image_id": i, "caption": f"a {colour} square in the {position}."},
                            {"image_id": i, "caption": f"there is a {colour} square at the {position}."}]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


# --------------------------------------------------------------------------- scores

def check_cider() -> None:
    """pycocoevalcap and COCO's PTB tokenizer (Java), tried on one caption before anything trains: a run on a
    machine without them fails in a second with one line, not at the end of training."""
    try:
        import pycocoevalcap.cider.cider  # noqa: F401
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError as error:
        raise UserError(f"E8 scores CIDEr-D with pycocoevalcap, which cannot be imported ({error}): pip install "
                        f"pycocoevalcap") from None
    if shutil.which("java") is None:
        raise UserError("E8 tokenises captions for CIDEr-D with COCO's PTB tokenizer (Stanford CoreNLP, shipped in "
                        "pycocoevalcap), which needs Java: install a Java runtime (Debian/Ubuntu: apt-get install "
                        "default-jre-headless) and put java on PATH")
    try:
        probe = ptb_tokenize([PTB_PROBE[0]])
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        raise UserError(f"COCO's PTB tokenizer (pycocoevalcap, Java) failed on a test caption "
                        f"({type(error).__name__}: {error}); it writes a temporary file beside its jar, so "
                        f"pycocoevalcap's folder must be writable") from None
    if probe != [PTB_PROBE[1]]:
        raise UserError(f"COCO's PTB tokenizer gave {probe[0]!r} for {PTB_PROBE[0]!r}, not {PTB_PROBE[1]!r}: "
                        f"check that java runs pycocoevalcap's Stanford CoreNLP jar")


PTB_PROBE = ("A man's T-shirt, 2 dogs.", "a man 's t-shirt 2 dogs")   # a caption and its official tokens


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Captions as COCO's evaluation tokenises them for CIDEr: pycocoevalcap's PTBTokenizer (Stanford CoreNLP's
    PTB tokenizer, lower case, one caption per line; "man's" gives "man 's", "t-shirt" stays whole), then its
    punctuation tokens dropped. One Java call for all of them; its token count on stderr is kept off the
    console. Each caption is put on one line first (clean_caption), so that lines and captions stay paired."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)   # the Java child inherits file descriptor 2
        try:
            tokenized = PTBTokenizer().tokenize({i: [{"caption": clean_caption(c)}] for i, c in enumerate(captions)})
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        said = log.read().decode(errors="replace").strip().splitlines()
    if len(tokenized) != len(captions) or any("Exception" in line for line in said):
        raise RuntimeError(f"COCO's PTB tokenizer (Java) failed: {said[-1] if said else 'no output'}")
    return [tokenized[i][0] for i in range(len(captions))]


def cider_d(references: list[list[str]], candidates: list[str]) -> tuple[float, list[float]]:
    """CIDEr-D as COCO's evaluation computes it: the captions through pycocoevalcap's PTBTokenizer, then its Cider
    scorer (n-grams 1-4, sigma 6, clipped counts, x10) with document frequencies from these references.
    (corpus score, per-image scores)"""
    from pycocoevalcap.cider.cider import Cider
    tokens = iter(ptb_tokenize([r for rs in references for r in rs] + list(candidates)))
    refs = {i: [next(tokens) for _ in rs] for i, rs in enumerate(references)}
    cands = {i: [next(tokens)] for i in range(len(candidates))}
    score, per_image = Cider().compute_score(refs, cands)
    return float(score), [float(s) for s in per_image]


@torch.no_grad()
def clip_text_embeddings(clip, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings; texts longer than CLIP's context are cut, keeping the end token (as clip.tokenize
    with truncate=True does)."""
    device = clip.logit_scale.device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                           max_length=clip.config.text_config.max_position_embeddings, return_tensors="pt")
        out.append(F.normalize(clip.get_text_features(**tokens.to(device)).pooler_output.float(), dim=-1).cpu())
    return torch.cat(out)


def clip_scores(image_embeddings: torch.Tensor, clip, tokenizer, candidates: list[str],
                references: list[list[str]] | None = None) -> dict[str, list[float]]:
    """Per image, as Hessel et al. 2021's clipscore.py computes them: CLIPScore = 2.5·max(cos(image,
    "A photo depicts " + caption), 0); with references, RefCLIPScore = the harmonic mean of CLIPScore and
    max(max over references of cos(caption, reference), 0), where caption and references both carry the same
    prefix (their code embeds every text through one function that prepends it). Their code leaves the text-text
    maximum unclipped; the paper clips it at 0, as here: the two agree whenever it is positive, as it is for
    CLIP's text embeddings of captions (tests/test_captioning.py pins values from their code)."""
    text = clip_text_embeddings(clip, tokenizer, [CLIPSCORE_PREFIX + c for c in candidates])
    clip_s = CLIPSCORE_WEIGHT * (image_embeddings.float().cpu() * text).sum(1).clamp(min=0)
    scores = {"clipscore": clip_s.tolist()}
    if references is not None:
        flat = [CLIPSCORE_PREFIX + r for rs in references for r in rs]
        ref_embeddings = clip_text_embeddings(clip, tokenizer, flat).split([len(rs) for rs in references])
        text_text = torch.stack([(refs @ c).max().clamp(min=0) for refs, c in zip(ref_embeddings, text)])
        scores["refclipscore"] = torch.where(clip_s + text_text > 0, 2 * clip_s * text_text /
                                             (clip_s + text_text).clamp(min=1e-12), 0.0).tolist()
    return scores
