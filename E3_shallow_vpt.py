"""E3 — shallow Visual Prompt Tuning (Jia et al., ECCV 2022, section 3.2): N learnable tokens join the
image tokens of the frozen CLIP vision tower before its first layer (before CLIP's pre-layernorm by default,
--prompt-entry); a linear head reads the projected image embedding.
Trainable: 2,052 + 768·N for ViT-B/16 (2,820 with N = 1).

--prompt-type padding | fixed-patch | random-patch learns a prompt in pixel space instead (Bahng et al., 2022,
"Exploring Visual Prompts for Adapting Large-Scale Models"), added to the normalised image, and classifies by
CLIP's text classifier as that paper does (--head clip, the default there; its templates: --templates) or by a
linear head. Trainable for a padding of p pixels on S-pixel images: 12·p·(S − p), 69,840 at the default p = 30,
S = 224; for a patch of s pixels: 3·s². Default --lr: 1e-3 for tokens, 0.1 for a padding, 10 for a patch.
"""

import common
from clip_adapt.backbone import backbone
from clip_adapt.base import is_main_process
from clip_adapt.models import ImageClassifier
from clip_adapt.prompts import PIXEL_PROMPTERS, scaled_prompt_size
from clip_adapt.training import train

LEARNING_RATE = 1e-3   # token prompts
STUDY_ACCURACY = 0.88
# Pixel prompts live on the scale of normalised pixels (about 1), not of prompt tokens (0.02): at 1e-3 AdamW
# leaves them near their random start. Bahng et al. train them with SGD at 40. With AdamW, each kind's rate is
# the one of lowest validation loss among 1e-3 ... 100 on tools/known_answer.py's task, three seeds (the test
# split not looked at; docs/prompt-studies.md): a padding's 0.1, a patch's 10 (48 parameters, where a
# padding has 1,344 at 32 px).
PIXEL_LEARNING_RATES = {"padding": 0.1, "fixed-patch": 10.0, "random-patch": 10.0}
# Other command lines whose models the part contract checks too (tests/test_part_contract.py).
MODEL_VARIANTS = [("--prompt-type", kind) for kind in PIXEL_PROMPTERS] + [("--head", "clip")]


def add_flags(parser):
    prompts = common.add_prompt_flags(parser)
    prompts.add_argument("--prompt-type", default="token", choices=["token", *PIXEL_PROMPTERS],
                         help="token: VPT prompt tokens (the --num-prompts and --prompt-* flags); else a pixel prompt")
    prompts.add_argument("--pad-size", type=int, help="padding width in pixels [default: 30 at 224 px, scaled "
                                                      "with the model's image size, e.g. 4 at 32 px]")
    prompts.add_argument("--patch-size", type=int, help="patch side in pixels [default: as --pad-size]")
    common.add_head_flag(prompts, default="clip for pixel prompts, linear for tokens")
    parser.set_defaults(lr=None)   # chosen by --prompt-type in main: LEARNING_RATE or PIXEL_LEARNING_RATES
    common.describe_default(parser, "lr", f"{LEARNING_RATE:g} for token prompts, " + ", ".join(
        f"{rate:g} for {kind}" for kind, rate in PIXEL_LEARNING_RATES.items()))
    return parser


def head_of(args) -> str:
    return args.head or ("linear" if args.prompt_type == "token" else "clip")


def pixel_prompt_size(args, image_size: int) -> int:
    size = args.pad_size if args.prompt_type == "padding" else args.patch_size or args.pad_size
    return size or scaled_prompt_size(image_size)


def build_model(clip, tokenizer, class_names, args):
    text_head = common.text_head(clip, tokenizer, class_names, args, head_of(args))
    if args.prompt_type == "token":
        return ImageClassifier(clip, len(class_names), num_prompts=args.num_prompts, prompt_layers=[0],
                               prompt_dropout=args.prompt_dropout, head=text_head, **common.prompt_options(args))
    image_size = backbone(clip).image_size
    prompter = PIXEL_PROMPTERS[args.prompt_type](image_size, pixel_prompt_size(args, image_size))
    return ImageClassifier(clip, len(class_names), pixel_prompt=prompter, head=text_head)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()
    if args.lr is None:
        args.lr = LEARNING_RATE if args.prompt_type == "token" else PIXEL_LEARNING_RATES[args.prompt_type]

    exp = common.start(common.script_name(__file__), args)
    tuned = common.tune(exp, lambda clip: build_model(clip, exp.tokenizer, exp.data.class_names, args))
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args)
    if args.prompt_type == "token":
        extra = dict(num_prompts=args.num_prompts, prompt_layers=[0],
                     prompt_entry=model.prompts.entry if model.prompts else None)
    else:
        image_size = backbone(exp.clip).image_size
        size = pixel_prompt_size(args, image_size)
        extra = dict(num_prompts=0, prompt_size=size, prompt_params=model.pixel_prompt.count(image_size, size))
        if is_main_process():
            print(f"{args.prompt_type} prompt of {size} px on {image_size}-px images: {extra['prompt_params']:,} "
                  f"parameters")
    data = exp.data
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    common.finish(exp, model, result, prompt_type=args.prompt_type, head=head_of(args), **extra, **tuned)


if __name__ == "__main__":
    common.run(main)
