"""E12 — CoCoOp (Zhou et al., CVPR 2022): CoOp's learned context (E10) plus a meta-network (linear, ReLU, linear;
width ÷ 16 in between) that turns each image's embedding into a shift added to every context vector, so that the
prompt is conditioned on the image. Trainable for ViT-B/16: 512·M + (512·32 + 32) + (32·512 + 512) = 35,360 with
CoCoOp's M = 4 context vectors started from "a photo of a" (its ctxv1 configs, used by its scripts; 4 tokens in
CLIP's vocabulary: the byte-level tokenizer of the tiny and random:<arch> CLIPs spells it in 9).

Cost: the text tower runs once per image, on every class's sentence: a batch of B images is B × C text sequences
(128 at the default --batch-size 32 with 4 classes), where CoOp runs C once a batch. metrics.json records it
(text_sequences_per_step). CoCoOp's own scripts train with a batch of 1 image for 10 epochs.

As KaiyangZhou/CoOp trainers/cocoop.py (PromptLearner, CustomCLIP); where it differs, and why: the project's
training loop (AdamW at 2e-3, warm-up, plateau cuts until the training loss converges, the epoch chosen on
validation loss; the reference: SGD at 2e-3 with cosine decay over 10 epochs, the last kept), --batch-size 32 by
default (1 there), flips only (the reference adds random resized crops), fp32 (the reference's default PREC is
fp16), and a meta-net at least one unit wide (the reference's width ÷ 16 is zero below a width of 16, as in the
small test CLIPs, which would make CoCoOp CoOp). Logits reproduce the reference's to 1e-5 on a small CLIP (tests/test_coop.py).
"""

import common
from clip_adapt.models import CoCoOp

LEARNING_RATE = 2e-3   # CoCoOp's (with SGD there)
STUDY_ACCURACY = None
OPEN_VOCABULARY = True   # every trained part carries over to other class names (--base-to-new)
MODEL_VARIANTS = (("--context-init", "", "--num-context", "16"),)


def add_flags(parser):
    coop = parser.add_argument_group("CoCoOp")
    coop.add_argument("--num-context", type=int, default=4, help="M, learned context vectors, when --context-init "
                                                                 "is empty (CoCoOp's N_CTX)")
    coop.add_argument("--context-init", default="a photo of a",
                      help="words whose token embeddings start the context; '' for M vectors from N(0, 0.02)")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return CoCoOp(clip, tokenizer, class_names, args.num_context, args.context_init or None)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    model, result, tuned = common.build_and_train(exp, build_model)
    data = exp.data
    common.finish(exp, model, result, num_context=len(model.text_context.context),
                  text_sequences_per_step=args.batch_size * len(data.class_names), **tuned)


if __name__ == "__main__":
    common.run(main)
