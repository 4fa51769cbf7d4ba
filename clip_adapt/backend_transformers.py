"""The Backbone (clip_adapt/backbone.py) of a transformers `CLIPModel`: OpenAI's CLIPs and every checkpoint saved
as one (PubMedCLIP and the like). Loading it, the tiny and random CLIPs included, is clip_adapt.models.load_clip.
"""

from __future__ import annotations

import torch

from clip_adapt.backbone import Backbone

# E7's layer names are this library's own: each is the same name inside a CLIP encoder layer.
ADAPTER_TARGETS = {"q_proj": r"self_attn\.q_proj", "k_proj": r"self_attn\.k_proj", "v_proj": r"self_attn\.v_proj",
                   "out_proj": r"self_attn\.out_proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}


def wraps(model) -> bool:
    from transformers import CLIPModel
    return isinstance(model, CLIPModel)


def wrap(model) -> "TransformersBackbone":
    return TransformersBackbone(model)


class TransformersBackbone(Backbone):
    def __init__(self, clip):
        config, vision = clip.config, clip.vision_model
        self.model, self.vision, self.projection = clip, vision, clip.visual_projection
        self.vision_width, self.vision_layers = config.vision_config.hidden_size, config.vision_config.num_hidden_layers
        self.patch_size, self.image_size = config.vision_config.patch_size, config.vision_config.image_size
        self.projection_dim, self.text_width = config.projection_dim, config.text_config.hidden_size
        self.vision_blocks = list(vision.encoder.layers)
        self.vision_pre_norm = vision.pre_layrnorm
        self.patch_embedding = vision.embeddings
        self.text_token_embedding = clip.text_model.embeddings.token_embedding
        self.context_length = config.text_config.max_position_embeddings
        self.adapter_targets = {name: rf"vision_model\.encoder\.layers\.\d+\.{pattern}"
                                for name, pattern in ADAPTER_TARGETS.items()}

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels).pooler_output

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
