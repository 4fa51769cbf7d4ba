"""A supervised ImageNet CNN beside CLIP: ResNet-18 (He et al., CVPR 2016) through transformers'
ResNetForImageClassification (`microsoft/resnet-18`; no torchvision), its 1000-class head replaced by a new one.
The CIFAR prompt study behind the project's ablations compared CLIP with it: only the head retrained, the same with
left-right flips, and the head with the last or the first convolutional stage. The script that runs it
(E14_resnet18.py) brings its own backbone (BACKBONE = "resnet" and load_backbone, clip_adapt/runner.py): no CLIP,
no tokenizer, no class text.
"""

from __future__ import annotations

import torch

from clip_adapt.base import Part, UserError
from clip_adapt.models import RANDOM_PREFIX, Classifier, Fp32Linear, freeze, not_loadable, trainable

RESNET_MODEL = "microsoft/resnet-18"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# random:<name>: the architecture with random weights, no download. resnet-18 is microsoft/resnet-18's config;
# resnet-tiny (--smoke) the same layout at a width and depth that run in seconds on a CPU at 32 px.
RESNET_ARCHITECTURES = {
    "resnet-18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"),
    "resnet-tiny": dict(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"),
}
IMAGE_SIZES = {"resnet-18": 224, "resnet-tiny": 32}
TINY_RESNET = RANDOM_PREFIX + "resnet-tiny"
STAGES = ("none", "first", "last")


def resnet_image_processor(image_size: int = 224):
    """microsoft/resnet-18's preprocessing (ConvNext's: the short side to size / 0.875, a centre crop to size,
    bicubic, ImageNet's mean and std) by PIL."""
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    return ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=0.875, image_mean=IMAGENET_MEAN,
                                     image_std=IMAGENET_STD)


def load_resnet(name: str, device: torch.device | str | None = None, image_processor: str = "pil"):
    """(ResNetModel, image processor, None) from a hub id, a local save_pretrained directory of a
    ResNetForImageClassification, or random:resnet-18 / random:resnet-tiny (seed 0). The third place, a CLIP's
    tokenizer, is empty: this backbone has no text. image_processor: only PIL's (the flag is CLIP's)."""
    from transformers import ResNetConfig, ResNetModel
    if name.startswith(RANDOM_PREFIX):
        architecture = name.removeprefix(RANDOM_PREFIX)
        if architecture not in RESNET_ARCHITECTURES:
            raise UserError(f"--model {name}: unknown ResNet '{architecture}'; choose "
                            f"{', '.join(RANDOM_PREFIX + a for a in RESNET_ARCHITECTURES)}, {RESNET_MODEL} or a "
                            f"local ResNet folder")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = ResNetModel(ResNetConfig(**RESNET_ARCHITECTURES[architecture]))
        return model.eval(), resnet_image_processor(IMAGE_SIZES[architecture]), None
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, ResNetForImageClassification
    from clip_adapt.models import model_source
    transformers.logging.disable_progress_bar()
    source = model_source(name)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type != "resnet":
            raise UserError(f"{name} holds a '{model_type}' model, not a ResNet: pass --model {RESNET_MODEL} or a "
                            f"local ResNet folder (E14 brings its own backbone; CLIP's --model is not its)")
        model = ResNetForImageClassification.from_pretrained(source).resnet   # the backbone; its head is replaced
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError) as error:
        raise not_loadable(name, error) from None
    return model.eval(), processor, None


def resnet_dims(backbone) -> dict:
    config = backbone.config
    return {"embedding_size": config.embedding_size, "hidden_sizes": list(config.hidden_sizes),
            "depths": list(config.depths), "layer_type": config.layer_type}


class ResNetClassifier(Classifier):
    """The ResNet backbone (stem, four stages, global average pooling), then a new linear head on the pooled
    features (Fp32Linear, so that clip_adapt/probe.py can start it: standardised input and the convex fit).
    train_stage: none (the head only), first or last: that stage trains with the head. What does not train stays
    frozen and in eval mode (its batch-norm statistics untouched); a trained stage's batch norms train with it."""

    def __init__(self, backbone, num_classes: int, train_stage: str = "none"):
        super().__init__()
        if train_stage not in STAGES:
            raise ValueError(f"train_stage must be one of {STAGES}")
        self.backbone = freeze(backbone)
        self.train_stage = train_stage
        self.stage = None
        if train_stage != "none":
            stages = self.backbone.encoder.stages
            self.stage = stages[0 if train_stage == "first" else len(stages) - 1].requires_grad_(True)
        self.head = Fp32Linear(backbone.config.hidden_sizes[-1], num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        if self.stage is not None:
            self.stage.train(mode)
        return self

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixels).pooler_output.flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))

    def parts(self) -> list[Part]:
        parts = [Part("head", trainable(self.head, "head."))]
        if self.stage is not None:
            index = 0 if self.train_stage == "first" else len(self.backbone.encoder.stages) - 1
            parts.append(Part(f"{self.train_stage} stage",
                              trainable(self.stage, f"backbone.encoder.stages.{index}.")))
        return parts
