"""E11 — CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on CLIP's frozen image embedding,
f' = 0.2 · ReLU(W₂ ReLU(W₁ f)) + 0.8 · f (reduction 4, no biases), classified by CLIP's scaled cosine similarity
to E1's class text embeddings (its templates, --templates; CLIP's own logit scale). Trainable: 2 · 512 · 128 =
131,072 for ViT-B/16 (clip_adapt/feature_adapters.py ResidualAdapter).

The frozen tower gives every image the same embedding, so the embeddings are computed once (shared with E2's
cache) and the adapter is trained on them by the project's loop until its training loss converges, the epoch
chosen on validation loss (docs/how-a-run-works.md).

Where it differs from gaopengcuhk/CLIP-Adapter (clip_adapter.py at 08d07f8), and why: the class text is E1's
template ensemble, not one template per data set; no augmentation (a flipped or cropped image would need the
tower again; the reference trains on random resized crops and flips through the tower); AdamW at 1e-3 with the
project's warm-up and plateau cuts, not SGD with cosine decay over a fixed number of epochs (the reference keeps
the last epoch); fp32 (the reference casts the adapter to CLIP's fp16 on CUDA). The adapter, the residual mix and
the logits reproduce the reference's to 1e-5 on fixed features and weights (tests/test_feature_adapters.py).
"""

import common
from clip_adapt.base import UserError
from clip_adapt.feature_adapters import REDUCTION, RESIDUAL_RATIO, CLIPAdapter
from clip_adapt.training import predict, train

LEARNING_RATE = 1e-3
STUDY_ACCURACY = None
OPEN_VOCABULARY = True   # every trained part carries over to other class names (--base-to-new)


def add_flags(parser):
    adapter = parser.add_argument_group("CLIP-Adapter")
    adapter.add_argument("--reduction", type=int, default=REDUCTION, help="bottleneck width = embedding width / this")
    adapter.add_argument("--residual-ratio", type=float, default=RESIDUAL_RATIO,
                         help="share of the adapted embedding in the mix with CLIP's own")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return CLIPAdapter(clip, tokenizer, class_names, common.class_templates(args, clip), args.reduction,
                       args.residual_ratio)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()
    if not 0 < args.residual_ratio <= 1 or args.reduction < 1:
        raise UserError("--residual-ratio must be in (0, 1] and --reduction at least 1")

    exp = common.start(common.script_name(__file__), args)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args).to(exp.device)
    embeddings = common.frozen_embeddings(exp, model)
    tuned = common.tune(exp, lambda clip: build_model(clip, exp.tokenizer, exp.data.class_names, args).adapter,
                        augment=False, splits=embeddings)
    result = train(model.adapter, embeddings["train"], embeddings["val"], embeddings["test"],
                   exp.train_config(augment=False))
    logits = {name: predict(model.adapter, split.inputs, 2 * args.batch_size, exp.device, args.precision)
              for name, split in embeddings.items()}
    common.finish(exp, model, result, split_logits=logits, reduction=args.reduction,
                  residual_ratio=args.residual_ratio, **tuned)


if __name__ == "__main__":
    common.run(main)
