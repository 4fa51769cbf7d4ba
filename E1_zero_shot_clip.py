"""E1 — zero-shot CLIP: each class is described by text prompts; nothing is trained.

The image is assigned to the class whose prompt embedding is most similar to its own. By default each
class embedding averages several MRI prompt templates (prompt ensembling); --no-ensemble uses the first.
--templates FILE (one template per line, each with {} for the class name) or --templates study (generic
templates, a negation, and the MRI ones) sets the templates; the ensemble of them is the reported model,
and templates.csv gives each template's own validation and test accuracy. top_k_samples.png shows sample test
images with their k = min(5, classes) most probable classes.
"""

from functools import partial

import common
from clip_adapt.base import is_main_process, write_csv
from clip_adapt.models import (ZERO_SHOT_TEMPLATES, ZeroShot, class_text_embeddings,
                               normalized_image_embeddings, similarity_logits)
from clip_adapt.reporting import plot_top_k
from clip_adapt.training import batched

LEARNING_RATE = None   # nothing is trained
STUDY_ACCURACY = 0.29  # reported by the study this project reproduces
OPEN_VOCABULARY = True   # every trained part carries over to other class names (--base-to-new)


def add_flags(parser):
    parser.add_argument_group("zero-shot").add_argument(
        "--no-ensemble", action="store_true", help=f"use only the template '{ZERO_SHOT_TEMPLATES[0]}'")
    return parser


def templates_of(args, clip) -> tuple[str, ...]:
    """--templates, else the model's own (BiomedCLIP's), else the MRI templates; --no-ensemble: the first."""
    templates = common.class_templates(args, clip)
    return templates[:1] if args.no_ensemble and not args.templates else templates


def build_model(clip, tokenizer, class_names, args):
    return ZeroShot(clip, tokenizer, class_names, templates_of(args, clip)).eval()


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    exp = common.start(common.script_name(__file__), args)
    templates = templates_of(args, exp.clip)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args)
    # The tower runs once per split; every template, and their ensemble, reuses those image embeddings.
    splits = exp.data.splits()
    embed = partial(normalized_image_embeddings, exp.clip)
    images = {name: batched(embed, split, 2 * args.batch_size, exp.device, args.precision,
                            desc=f"image embeddings ({name})") for name, split in splits.items()}

    def accuracy(text, split):
        logits = similarity_logits(exp.clip, images[split].to(text.device), text).cpu()
        return round(float((logits.argmax(1) == splits[split].labels.cpu()).double().mean()), 4)

    rows = []
    for template in templates:
        text = class_text_embeddings(exp.clip, exp.tokenizer, exp.data.class_names, [template])
        rows.append({"template": template, "val_accuracy": accuracy(text, "val"),
                     "test_accuracy": accuracy(text, "test")})
    rows.append({"template": f"ensemble of {len(templates)}", "val_accuracy": accuracy(model.class_embeddings, "val"),
                 "test_accuracy": accuracy(model.class_embeddings, "test")})
    if is_main_process():   # every process computed the same rows; one writes and prints them
        write_csv(exp.out_dir / "templates.csv", rows)
        for row in rows:
            print(f"  {row['test_accuracy']:.3f} test, {row['val_accuracy']:.3f} val: {row['template']}")
    logits = {name: similarity_logits(exp.clip, images[name].to(exp.device), model.class_embeddings).cpu()
              for name in splits}
    if is_main_process():
        test = exp.data.test
        plot_top_k(test.inputs, logits["test"].softmax(1).numpy(), test.labels.cpu(), exp.data.class_names,
                   exp.out_dir / "top_k_samples.png")
    common.finish(exp, model, split_logits=logits, templates=list(templates),
                  template_accuracy={r["template"]: r["test_accuracy"] for r in rows[:-1]})


if __name__ == "__main__":
    common.run(main)
