"""E1 — zero-shot CLIP: each class is described by text prompts; nothing is trained.

The image is assigned to the class whose prompt embedding is most similar to its own. By default each
class embedding averages several MRI prompt templates (prompt ensembling); --no-ensemble uses the first.
"""

import common
from models import ZERO_SHOT_TEMPLATES, ZeroShot


def main():
    p = common.parser(__doc__, lr=None)
    p.add_argument("--no-ensemble", action="store_true", help=f"use only the template '{ZERO_SHOT_TEMPLATES[0]}'")
    args = p.parse_args()

    exp = common.start(common.script_name(__file__), args)
    templates = ZERO_SHOT_TEMPLATES[:1] if args.no_ensemble else ZERO_SHOT_TEMPLATES
    model = ZeroShot(exp.clip, exp.tokenizer, exp.data.class_names, templates)
    common.finish(exp, model, templates=list(templates))


if __name__ == "__main__":
    common.run(main)
