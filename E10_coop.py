"""E10 — CoOp (Zhou et al., IJCV 2022): M learned context vectors in CLIP's frozen text tower in place of a
hand-written template, shared by every class; the image tower untouched; an image is classified by CLIP itself
(scaled cosine similarity to each class's text embedding). Trainable: 512·M for ViT-B/16 (8,192 at CoOp's
default M = 16; 2,048 with --context-init "a photo of a").

As KaiyangZhou/CoOp trainers/coop.py (PromptLearner, CustomCLIP; scripts/coop/main.sh): 16 context vectors drawn
from N(0, 0.02) by default (its N_CTX 16, CTX_INIT ""), or --context-init words whose token embeddings start them
(its ctxv1 configs: "a photo of a", M = 4); the class token at the end, or --class-token-position middle|front;
one context for all classes (CSC False). --kgcoop-weight adds KgCoOp's penalty (Yao et al., CVPR 2023;
htyao89/KgCoOp, weight 8.0 in its scripts): weight · (1 − mean cosine similarity between each class's learned and
hand-written text embedding, the latter E1's templates, --templates).

Where it differs from the reference, and why: the project's training loop (AdamW at 2e-3, warm-up, plateau cuts
until the training loss converges, the epoch chosen on validation loss; the reference: SGD at 2e-3, cosine decay
over 50 to 200 epochs, the last epoch kept), the project's augmentation (flips; the reference adds random resized
crops) and fp32 on a CPU (the reference runs CLIP in fp16 on CUDA). KgCoOp's penalty enters the validation loss
that selects the epoch. Class embeddings and logits reproduce the reference's to 1e-5 on a small CLIP
(tests/test_coop.py). E5 trains this text context together with visual prompts.
"""

import common
from clip_adapt.models import CoOp, KgCoOp
from clip_adapt.prompts import CLASS_TOKEN_POSITIONS

LEARNING_RATE = 2e-3   # CoOp's (with SGD there)
STUDY_ACCURACY = None
OPEN_VOCABULARY = True   # every trained part carries over to other class names (--base-to-new)
MODEL_VARIANTS = (("--class-token-position", "middle"), ("--class-token-position", "front"),
                  ("--context-init", "a photo of a"), ("--kgcoop-weight", "8"))


def add_flags(parser):
    coop = parser.add_argument_group("CoOp")
    coop.add_argument("--num-context", type=int, default=16, help="M, learned context vectors (CoOp's N_CTX)")
    coop.add_argument("--context-init", help="words whose token embeddings start the context, e.g. 'a photo of a' "
                                             "(CoOp's CTX_INIT; M becomes their number of tokens)")
    coop.add_argument("--class-token-position", default="end", choices=CLASS_TOKEN_POSITIONS,
                      help="where the class name goes among the context vectors")
    coop.add_argument("--kgcoop-weight", type=float, default=0.0,
                      help="KgCoOp: weight of 1 − cosine similarity to the hand-written class text (8 in KgCoOp)")
    return parser


def build_model(clip, tokenizer, class_names, args):
    coop = (args.num_context, args.class_token_position, args.context_init)
    if args.kgcoop_weight:
        return KgCoOp(clip, tokenizer, class_names, *coop, args.kgcoop_weight, common.class_templates(args, clip))
    return CoOp(clip, tokenizer, class_names, *coop)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    model, result, tuned = common.build_and_train(exp, build_model)
    common.finish(exp, model, result, num_context=len(model.text_context.context),
                  class_token_position=args.class_token_position, kgcoop_weight=args.kgcoop_weight, **tuned)


if __name__ == "__main__":
    common.run(main)
