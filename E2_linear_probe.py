"""E2 — linear probe: a linear head on CLIP's frozen image features: the projected embedding (2,052 parameters
for ViT-B/16) or, with --features pooled, the tower's pooled output before the projection (768·4 + 4 = 3,076).

The frozen tower gives every image the same embedding, so each embedding is computed once, cached on disk
(keyed by the weights, the features, the preprocessed pixels and the device), and the head is fitted on them.
--solver lbfgs (the default) follows the CLIP paper's linear-probe protocol (Radford et al., 2021, appendix
A.3): multinomial logistic regression fitted by scikit-learn's L-BFGS, its L2 strength C chosen on held-out
data from a log grid, then refitted on train + validation with the chosen C (--refit); the sweep goes to
metrics.json. Where it still differs from A.3 (clip_adapt/probe.py): the features are standardised before the
fit; C is chosen by 5-fold cross-validation over train + validation by default (--c-selection validation: A.3's
validation split), since the study's validation splits are small; the grid has 25 half-decades of A.3's range
in place of its binary search over 96 steps; and --features projected, the default for the study's 2,052
parameters, is not A.3's choice (pooled is). --solver adamw trains the head by gradient steps, as the
reproduced study did, until its training loss converges (docs/how-a-run-works.md). Augmentation is off either
way: a flipped image would need the tower again.
"""

import time

import common
from clip_adapt.base import UserError, is_main_process
from clip_adapt.models import FEATURES, ImageClassifier
from clip_adapt.probe import SELECTIONS, fit_probe_head
from clip_adapt.training import predict, train

LEARNING_RATE = 1e-3
STUDY_ACCURACY = 0.91
STUDY_RECIPE = {"solver": "adamw"}   # the study trained the head by gradient steps; the default here is L-BFGS


def add_flags(parser):
    probe = parser.add_argument_group("linear probe")
    probe.add_argument("--solver", default="lbfgs", choices=["lbfgs", "adamw"],
                       help="lbfgs: logistic regression by L-BFGS, L2 strength chosen on held-out data (CLIP's "
                            "protocol; --lr, --epochs and --patience unused); adamw: gradient training of the head")
    probe.add_argument("--features", default="projected", choices=FEATURES,
                       help="projected: the image embedding CLIP compares with text (the study's head); pooled: "
                            "the tower's output before the projection (the CLIP paper's ViT probes)")
    probe.add_argument("--c-selection", default="cross-validation", choices=SELECTIONS,
                       help="lbfgs: how C is chosen: 5-fold cross-validation over the images it is fitted on "
                            "(copies kept in one fold), or the validation split (A.3)")
    probe.add_argument("--refit", default="train+val", choices=["train+val", "train"],
                       help="lbfgs: the images the chosen C is fitted on; train+val as A.3 (then the validation "
                            "scores are of fitted images)")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return ImageClassifier(clip, len(class_names), features=args.features)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    if args.tune and args.solver == "adamw":
        raise UserError("--tune tunes E2 by its default --solver lbfgs (L2 strength on validation); with "
                        "--solver adamw, pass --lr and --weight-decay yourself")
    exp = common.start(common.script_name(__file__), args)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args)
    embeddings = common.frozen_embeddings(exp, model, args.features)
    if args.solver == "lbfgs":
        started = time.time()
        result, fitted = fit_probe_head(model.head, embeddings, exp.out_dir / "checkpoint", args.c_selection,
                                        args.refit == "train+val", exp.data.copy_groups)
        if fitted["c_at_grid_edge"] and is_main_process():
            print(f"note: {result.notes[0]}")
        if args.tune:   # the C sweep on validation is this method's tuning
            fitted["tune"] = {"grid": fitted["c_sweep"], "choice": {"l2_c": fitted["l2_c"]},
                              "seconds": round(time.time() - started, 2)}
    else:
        result, fitted = train(model.head, embeddings["train"], embeddings["val"], embeddings["test"],
                               exp.train_config(augment=False)), {"solver": "adamw"}
    logits = {name: predict(model.head, split.inputs, 2 * args.batch_size, exp.device, args.precision)
              for name, split in embeddings.items()}
    common.finish(exp, model, result, split_logits=logits, features=args.features, **fitted)


if __name__ == "__main__":
    common.run(main)
