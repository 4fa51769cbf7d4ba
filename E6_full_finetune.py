"""E6 — full fine-tuning: the whole CLIP vision tower, its projection and a linear head are trained
(86,194,692 parameters for ViT-B/16; the text tower is not used, trained or counted).
AdamW at a small learning rate with a warm-up epoch, as suits full fine-tuning.
"""

import common
from clip_adapt.models import ImageClassifier
from clip_adapt.training import train

LEARNING_RATE = 1e-5
STUDY_ACCURACY = 0.95


def add_flags(parser):
    parser.set_defaults(warmup_epochs=1.0)
    return parser


def build_model(clip, tokenizer, class_names, args):
    return ImageClassifier(clip, len(class_names), train_backbone=True)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    tuned = common.tune(exp, lambda clip: build_model(clip, exp.tokenizer, exp.data.class_names, args))
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args)
    data = exp.data
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    common.finish(exp, model, result, **tuned)


if __name__ == "__main__":
    common.run(main)
