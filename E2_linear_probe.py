"""E2 — linear probe: a linear head on CLIP's frozen, projected image embedding (2,052 parameters for ViT-B/16).

The frozen tower gives every image the same embedding, so each embedding is computed once, cached on disk
(keyed by the weights, the preprocessed pixels and the device), and the head is fitted on them.
--solver lbfgs (the default) follows the CLIP paper: multinomial logistic regression fitted exactly by
scikit-learn's L-BFGS, its L2 strength C chosen on the validation split from a log grid (clip_adapt/probe.py);
the sweep goes to metrics.json. --solver adamw trains the head by gradient steps with early stopping, as the
reproduced study did. Augmentation is off either way: a flipped image would need the tower again.
"""

import time

import common
from clip_adapt.base import UserError, is_main_process
from clip_adapt.models import ImageClassifier, fingerprint
from clip_adapt.probe import fit_probe_head
from clip_adapt.training import cached_embeddings, predict, train

LEARNING_RATE = 1e-3
STUDY_ACCURACY = 0.91
STUDY_RECIPE = {"solver": "adamw"}   # the study trained the head by gradient steps; the default here is L-BFGS


def add_flags(parser):
    parser.add_argument_group("linear probe").add_argument(
        "--solver", default="lbfgs", choices=["lbfgs", "adamw"],
        help="lbfgs: logistic regression fitted exactly, L2 strength chosen on validation (CLIP's protocol; "
             "--lr, --epochs and --patience unused); adamw: gradient training of the head")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return ImageClassifier(clip, len(class_names))


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    if args.tune and args.solver == "adamw":
        raise UserError("--tune tunes E2 by its default --solver lbfgs (L2 strength on validation); with "
                        "--solver adamw, pass --lr and --weight-decay yourself")
    exp = common.start(common.script_name(__file__), args)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args)
    embeddings = cached_embeddings(model.embed, exp.data.splits(), exp.cache_dir,
                                   fingerprint(model.vision, model.projection), 2 * args.batch_size, exp.device,
                                   args.precision, write=is_main_process())
    if args.solver == "lbfgs":
        started = time.time()
        result, fitted = fit_probe_head(model.head, embeddings, exp.out_dir / "checkpoint")
        if args.tune:   # the C sweep on validation is this method's tuning
            fitted["tune"] = {"grid": fitted["c_sweep"], "choice": {"l2_c": fitted["l2_c"]},
                              "seconds": round(time.time() - started, 2)}
    else:
        result, fitted = train(model.head, embeddings["train"], embeddings["val"], embeddings["test"],
                               exp.train_config(augment=False)), {"solver": "adamw"}
    logits = {name: predict(model.head, split.inputs, 2 * args.batch_size, exp.device, args.precision)
              for name, split in embeddings.items()}
    common.finish(exp, model, result, split_logits=logits, **fitted)


if __name__ == "__main__":
    common.run(main)
