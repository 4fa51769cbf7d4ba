"""E4 — deep Visual Prompt Tuning: N fresh learnable tokens at the input of every encoder layer of the
frozen CLIP vision tower; each layer's prompt outputs are dropped and replaced by the next layer's own.
Trainable: 2,052 + 12·768·N for ViT-B/16 (11,268 with N = 1). --prompt-layers 0 is E3. --head clip classifies
by CLIP's frozen text classifier instead of a trained linear head: then only the prompts train (12·768·N).
"""

import common
from clip_adapt.backbone import backbone
from clip_adapt.models import ImageClassifier

LEARNING_RATE = 1e-3
STUDY_ACCURACY = 0.92
# Other command lines whose models the part contract checks too (tests/test_part_contract.py).
MODEL_VARIANTS = [("--head", "clip")]


def add_flags(parser):
    prompts = common.add_prompt_flags(parser, "N, learnable prompt tokens per layer")
    prompts.add_argument("--prompt-layers", type=int, nargs="+", help="encoder layers (0-based) that get prompts "
                                                                      "[default: all]")
    common.add_head_flag(prompts)
    return parser


def layers_of(clip, args) -> list[int]:
    return args.prompt_layers or list(range(backbone(clip).vision_layers))


def build_model(clip, tokenizer, class_names, args):
    return ImageClassifier(clip, len(class_names), num_prompts=args.num_prompts, prompt_layers=layers_of(clip, args),
                           prompt_dropout=args.prompt_dropout, **common.prompt_options(args),
                           head=common.text_head(clip, tokenizer, class_names, args, args.head or "linear"))


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    model, result, tuned = common.build_and_train(exp, build_model)
    common.finish(exp, model, result, num_prompts=args.num_prompts, prompt_layers=layers_of(exp.clip, args),
                  prompt_entry=model.prompts.entry if model.prompts else None, head=args.head or "linear", **tuned)


if __name__ == "__main__":
    common.run(main)
