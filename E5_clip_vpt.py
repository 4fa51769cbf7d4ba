"""E5 — prompts in both towers: N shallow visual prompts in the frozen vision tower (as in E3) and M learned
context vectors in the frozen text tower in place of a hand-written template (CoOp). An image is classified
by CLIP itself, the scaled cosine similarity between its embedding and each class's text embedding; there is
no linear head. Trainable: 768·N + 512·M for ViT-B/16 (2,816 with N = 1, M = 4).
"""

import common
from clip_adapt.models import PromptedCLIP

LEARNING_RATE = 1e-3
STUDY_ACCURACY = 1.00
OPEN_VOCABULARY = True   # every trained part carries over to other class names (--base-to-new)


def add_flags(parser):
    prompts = common.add_prompt_flags(parser, "N, visual prompt tokens")
    prompts.add_argument("--num-text-prompts", type=int, default=4, help="M, learned text context vectors")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return PromptedCLIP(clip, tokenizer, class_names, args.num_prompts, args.num_text_prompts, args.prompt_dropout,
                        **common.prompt_options(args))


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    model, result, tuned = common.build_and_train(exp, build_model)
    common.finish(exp, model, result, num_prompts=args.num_prompts, num_text_prompts=args.num_text_prompts, **tuned)


if __name__ == "__main__":
    common.run(main)
