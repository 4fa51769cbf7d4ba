"""E4 — deep Visual Prompt Tuning: N fresh learnable tokens at the input of every encoder layer of the
frozen CLIP vision tower; each layer's prompt outputs are dropped and replaced by the next layer's own.
Trainable: 2,052 + 12·768·N for ViT-B/16 (11,268 with N = 1). --prompt-layers 0 is E3.
"""

import common
from models import ImageClassifier
from training import train

LEARNING_RATE = 1e-3   # run_all_experiments.py reads it


def main():
    p = common.add_prompt_flags(common.parser(__doc__, lr=LEARNING_RATE), "N, learnable prompt tokens per layer")
    p.add_argument("--prompt-layers", type=int, nargs="+", help="encoder layers (0-based) that get prompts "
                                                                "[default: all]")
    p.add_argument("--prompt-dropout", type=float, default=0.0)
    args = p.parse_args()

    exp = common.start(common.script_name(__file__), args)
    layers = args.prompt_layers or list(range(exp.clip.config.vision_config.num_hidden_layers))
    model = ImageClassifier(exp.clip, len(exp.data.class_names), num_prompts=args.num_prompts,
                            prompt_layers=layers, prompt_dropout=args.prompt_dropout, **common.prompt_options(args))
    data = exp.data
    result = train(exp.maybe_compile(model), data.train, data.val, data.test, exp.train_config())
    common.finish(exp, model, result, num_prompts=args.num_prompts, prompt_layers=layers,
                  prompt_entry=model.prompts.entry if model.prompts else None)


if __name__ == "__main__":
    common.run(main)
