"""E14 — a supervised ImageNet CNN beside CLIP: ResNet-18 (`microsoft/resnet-18`, transformers'
ResNetForImageClassification without torchvision) with its 1000-class head replaced by a new linear head on the
pooled 512 features, as the CIFAR prompt study behind the project's ablations compared CLIP against it:

- default: only the head trained (the study's "retrain the fully connected layer"): 512·4 + 4 = 2,052 for 4
  classes, on the frozen backbone's features computed once (cached as E2's);
- --flip: the same with random left-right flips of the training images (through the frozen backbone each step);
- --train-stage last / first: the head with the last (8,393,728 weights) or the first (147,968) of the four
  convolutional stages (the study's "last vs first convolutional layer"); that stage's batch norms train with it,
  the rest of the backbone stays frozen in eval mode.

It brings its own backbone (BACKBONE, load_backbone; clip_adapt/runner.py): --model microsoft/resnet-18 (the
default), a local folder saved with ResNetForImageClassification.save_pretrained (and its image processor), or
random:resnet-18 (that architecture with random weights; --smoke: random:resnet-tiny, seconds on a CPU). No CLIP,
no class text: --templates and --image-processor are CLIP's and are refused here; run_all_experiments.py,
tools/ablate_prompts.py and tools/bench.py pass them, and their --model, to the CLIP scripts only. Preprocessing
is the checkpoint's own (ConvNext's for microsoft/resnet-18: short side to 256, centre crop 224, ImageNet's mean
and std). Training is the project's loop, the head started by the convex fit of the head alone (--head-start
probe, clip_adapt/probe.py), so that the head-only start is scikit-learn's logistic regression on the frozen
features (tests/test_resnet.py checks it against one fitted there), until the training loss converges, the epoch
chosen on validation loss (docs/how-a-run-works.md). It joins the noise-robustness table and, with --shots, the
K-shot curve like every other script. Unlike the CLIP methods it has no known-answer bar: there is no CLIP to
start from.
"""

import common
from clip_adapt.base import UserError, is_main_process
from clip_adapt.models import fingerprint
from clip_adapt.resnet import RESNET_MODEL, STAGES, TINY_RESNET, ResNetClassifier, load_resnet, resnet_dims
from clip_adapt.training import cached_embeddings, predict, train

LEARNING_RATE = 1e-3
STUDY_ACCURACY = None
BACKBONE = "resnet"
MODEL_VARIANTS = [("--train-stage", "last"), ("--train-stage", "first")]


def add_flags(parser):
    parser.set_defaults(default_models=(RESNET_MODEL, TINY_RESNET))
    parser._option_string_actions["--model"].help = (
        f"hub id or local folder of a ResNetForImageClassification (save_pretrained, with its image processor), or "
        f"random:resnet-18 (random weights, no download) [default: {RESNET_MODEL}; with --smoke: {TINY_RESNET}]")
    resnet = parser.add_argument_group("ResNet-18")
    resnet.add_argument("--train-stage", default="none", choices=STAGES,
                        help="none: the head only; first or last: that convolutional stage trains with the head")
    resnet.add_argument("--flip", action="store_true", help="random left-right flips of the training images")
    return parser


def load_backbone(args, device=None):
    return load_resnet(args.model, device)


def build_model(backbone, tokenizer, class_names, args):
    return ResNetClassifier(backbone, len(class_names), args.train_stage)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()
    for flag, value in (("--templates", args.templates), ("--image-processor", args.image_processor != "pil")):
        if value:
            raise UserError(f"{flag} is CLIP's; E14's ResNet-18 has no class text and its checkpoint's own "
                            f"preprocessing: leave it out")
    exp = common.start(common.script_name(__file__), args, load_model=load_resnet)
    model = build_model(exp.clip, None, exp.data.class_names, args).to(exp.device)
    extra = {"model_dims": resnet_dims(exp.clip), "backbone": "resnet", "train_stage": args.train_stage,
             "flip": args.flip}
    if args.train_stage == "none" and not args.flip:   # a frozen backbone: its features once, cached as E2's
        embeddings = cached_embeddings(model.embed, exp.data.splits(), exp.cache_dir,
                                       f"{fingerprint(model.backbone)}|resnet-pooled", 2 * args.batch_size,
                                       exp.device, args.precision, write=is_main_process())
        tuned = common.tune(exp, lambda backbone: build_model(backbone, None, exp.data.class_names, args).head,
                            augment=False, splits=embeddings)
        result = train(model.head, embeddings["train"], embeddings["val"], embeddings["test"],
                       exp.train_config(augment=False))
        logits = {name: predict(model.head, split.inputs, 2 * args.batch_size, exp.device, args.precision)
                  for name, split in embeddings.items()}
        common.finish(exp, model, result, split_logits=logits, **extra, **tuned)
        return
    tuned = common.tune(exp, lambda backbone: build_model(backbone, None, exp.data.class_names, args),
                        augment=args.flip)
    result = train(exp.maybe_compile(model), exp.data.train, exp.data.val, exp.data.test,
                   exp.train_config(augment=args.flip))
    common.finish(exp, model, result, **extra, **tuned)


if __name__ == "__main__":
    common.run(main)
