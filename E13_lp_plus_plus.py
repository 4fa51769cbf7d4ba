"""E13 — LP++ (Huang et al., CVPR 2024): a linear probe on CLIP's frozen, L2-normalised image embedding, blended
per class with CLIP's text classifier: logits = W f + b + α ⊙ (f Tᵀ), T E1's class text embeddings (its templates,
--templates), α one weight per class (clip_adapt/feature_adapters.py BlendedProbe). Trainable: 512·4 + 4 + 4 =
2,056 for ViT-B/16 and 4 classes.

It follows FereshteShakeri/FewShot-CLIP-Strong-Baseline (methods/linear_probe_p2.py at f81054f): W starts at the
per-class sums of the training embeddings, b at nn.Linear's random start, every α at 250 × the mean similarity of
each class's images to its own text; 300 full-batch steps (--epochs), SGD with momentum 0.9 on (W, b) at the
step 4N / λ_max(FᵀF), and every 10th step a gradient step on α at N / (4 max_c Σ_n (f_n · t_c)²), with α's gradient
summed over every step so far as the reference's (it never zeroes it); after each step the validation accuracy,
the last epoch of the best kept. These step sizes are the inverse Lipschitz bounds the paper derives, so there
is no learning rate to choose: --lr multiplies both (1, the default: the reference's), --weight-decay, --patience,
--min-steps and --batch-size are unused (full batch, as the reference), and --tune is refused.

Where it differs from the reference, and why:
- Selection on validation only, as the reference does; but its validation set is K shots per class drawn like the
  training set, here the project's validation split (with --shots: min(K, 4) per class, docs/k-shot.md). The
  reference computes test accuracy at each new best epoch; here test is scored every epoch in the history and
  read by nothing.
- The training embeddings are the plain ones, shared with E2's disk cache; the reference computes them once
  from randomly resized-cropped and flipped images.
- The number of classes is the data's, not training images / shots: with unequal classes (the default, every
  training image) each class's mean similarity still counts once in α's start, as with equal shots.
- A fixed schedule as the reference, so `convergence` says whether its last tenth of steps still lowered the
  training loss (clip_adapt/convergence.py's share of the fall), not the project's plateau rule.
- fp32 throughout (the reference runs CLIP in fp16 on CUDA; its one-hot matrices are fp16).
Its start, step sizes, blending weights and test logits reproduce the reference's to 1e-5 on fixed features
(tests/test_feature_adapters.py).
"""

import common
from clip_adapt.base import UserError
from clip_adapt.feature_adapters import LPP_EPOCHS, LPPlusPlus, fit_lp_plus_plus
from clip_adapt.training import predict

LEARNING_RATE = 1.0   # a factor on the reference's Lipschitz step sizes (1: the reference's)
STUDY_ACCURACY = None


def add_flags(parser):
    return parser


def build_model(clip, tokenizer, class_names, args):
    return LPPlusPlus(clip, tokenizer, class_names, common.class_templates(args, clip))


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()
    if args.tune:
        raise UserError("--tune: LP++ sets its step sizes from the features (the reference's Lipschitz rule) and "
                        "has nothing to tune; --lr scales them")
    if args.lr <= 0:
        raise UserError("--lr must be positive: for LP++ it multiplies the reference's step sizes (1: theirs)")
    exp = common.start(common.script_name(__file__), args)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args).to(exp.device)
    embeddings = common.frozen_embeddings(exp, model)
    result, fitted = fit_lp_plus_plus(model.probe, embeddings, exp.out_dir / "checkpoint",
                                      args.epochs or LPP_EPOCHS, args.lr)
    logits = {name: predict(model.probe, split.inputs, 2 * args.batch_size, exp.device, args.precision)
              for name, split in embeddings.items()}
    common.finish(exp, model, result, split_logits=logits, **fitted)


if __name__ == "__main__":
    common.run(main)
