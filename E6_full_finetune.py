"""E6 — full fine-tuning: the whole CLIP vision tower, its projection and a linear head are trained
(86,194,692 parameters for ViT-B/16; the text tower is not used, trained or counted).
AdamW at a small learning rate with a warm-up epoch, as suits full fine-tuning.
"""

import common
from models import ImageClassifier
from training import train

LEARNING_RATE = 1e-5   # run_all_experiments.py reads it


def main():
    args = common.parser(__doc__, lr=LEARNING_RATE, warmup_epochs=1.0).parse_args()

    exp = common.start(common.script_name(__file__), args)
    model = ImageClassifier(exp.clip, len(exp.data.class_names), train_backbone=True)
    data = exp.data
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    common.finish(exp, model, result)


if __name__ == "__main__":
    common.run(main)
