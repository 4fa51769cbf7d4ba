"""What a method needs from a CLIP, whatever library built it: one small interface, `Backbone`, and its two
implementations, one module per library: clip_adapt/backend_transformers.py (a transformers `CLIPModel`) and
clip_adapt/backend_open_clip.py (an open_clip model: BiomedCLIP, the LAION CLIPs, local open_clip folders).

The methods (clip_adapt/models.py, adapters.py, feature_adapters.py), the prompts (prompts.py) and the loop reach
a CLIP only through it. A classifier is built from the CLIP model itself (what load_clip returns, what the tests
build); `backbone(clip)` gives its Backbone, and is the one place that asks which library the model comes from.
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone:
    """A CLIP's parts as the methods use them. Attributes, set by each implementation:

    model: the CLIP model itself (the module a classifier freezes and holds)
    vision: the image tower up to its pooled output (the projection too, where the library keeps it inside)
    projection: the image projection as a module of its own, or an empty module where it lives in `vision`
    vision_width, vision_layers, patch_size, image_size, projection_dim, text_width: the dimensions
    vision_blocks: the image encoder's blocks in order, each called with the tokens (batch, tokens, width) as its
        first argument: VPT's prompts go in at a block's input (a forward pre-hook)
    vision_pre_norm: the module the embedded image tokens (class token first, positions added) enter before the
        first block: layer-0 prompts go in at its input ("pre-ln")
    patch_embedding: the module that takes the normalised pixels (positionally or as pixel_values): pixel-space
        prompts are added at its input
    text_token_embedding: the text tower's token-embedding layer: CoOp's context replaces some of its outputs
    context_length: the most tokens a text may have
    templates: the model's own zero-shot templates (BiomedCLIP's "this is a photo of {}"), or None for the
        project's MRI templates
    adapter_targets: E7's layer names (q_proj, k_proj, v_proj, out_proj, fc1, fc2) -> this model's module name
        pattern of that linear layer in the image encoder, for peft
    lora_only_targets: those of E7's names that only peft's LoRA reaches here (open_clip's OpenAI-layout
        attention, one nn.MultiheadAttention)
    """

    model: nn.Module
    vision: nn.Module
    projection: nn.Module
    vision_width: int
    vision_layers: int
    patch_size: int
    image_size: int
    projection_dim: int
    text_width: int
    vision_blocks: list
    vision_pre_norm: nn.Module
    patch_embedding: nn.Module
    text_token_embedding: nn.Module
    context_length: int
    templates: tuple[str, ...] | None = None
    adapter_targets: dict
    lora_only_targets: frozenset = frozenset()

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled output (the class token after the final norm), before the projection."""
        raise NotImplementedError

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled)

    def image_features(self, pixels: torch.Tensor, projected: bool = True) -> torch.Tensor:
        """The image embedding CLIP compares with text (projected), or the pooled output before the projection."""
        pooled = self.pooled_image(pixels)
        return self.project_image(pooled) if projected else pooled

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The projected text embedding of token ids; the ids go through text_token_embedding, so that CoOp's
        hook on it holds."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, as CLIP stores it (its log)."""
        return self.model.logit_scale

    def dims(self) -> dict:
        """What metrics.json records as model_dims."""
        return {"vision_hidden": self.vision_width, "vision_layers": self.vision_layers,
                "projection_dim": self.projection_dim, "text_hidden": self.text_width}


def backbone(clip) -> Backbone:
    """The Backbone of a CLIP model (a Backbone passes through): the library is asked here and nowhere else."""
    if isinstance(clip, Backbone):
        return clip
    from clip_adapt import backend_open_clip, backend_transformers
    for backend in (backend_transformers, backend_open_clip):
        if backend.wraps(clip):
            return backend.wrap(clip)
    raise TypeError(f"{type(clip).__name__} is neither a transformers CLIPModel nor an open_clip CLIP")
