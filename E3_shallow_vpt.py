"""E3 — shallow Visual Prompt Tuning (Jia et al., ECCV 2022, section 3.2): N learnable tokens enter the
frozen CLIP vision tower at the input of its first encoder layer; a linear head reads the projected image
embedding. Trainable: 2,052 + 768·N for ViT-B/16 (2,820 with N = 1).
"""

import common
from models import ImageClassifier
from training import train

LEARNING_RATE = 1e-3   # run_all_experiments.py reads it


def main():
    p = common.parser(__doc__, lr=LEARNING_RATE)
    p.add_argument("--num-prompts", type=int, default=1, help="N, learnable prompt tokens")
    p.add_argument("--prompt-dropout", type=float, default=0.0)
    args = p.parse_args()

    exp = common.start(common.script_name(__file__), args)
    model = ImageClassifier(exp.clip, len(exp.data.class_names), num_prompts=args.num_prompts,
                            prompt_layers=[0], prompt_dropout=args.prompt_dropout)
    data = exp.data
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    common.finish(exp, model, result, num_prompts=args.num_prompts, prompt_layers=[0])


if __name__ == "__main__":
    common.run(main)
