"""E9 — Tip-Adapter (Zhang et al., ECCV 2022), training-free, and Tip-Adapter-F with --finetune: a cache of the
L2-normalised training image embeddings (keys) and their one-hot labels (values) added to CLIP's zero-shot
classifier, logits = s · f Tᵀ + α · exp(−β (1 − f Kᵀ)) V (clip_adapt/feature_adapters.py). s is CLIP's own
learned logit scale (exp(4.6052) = 100 for OpenAI's ViT-B/16, so equal to the reference's fixed 100 there; the
tiny and random CLIPs have their own), so that α = 0 gives E1's logits back. T is E1's class text (its templates,
--templates). The cache holds N·(512 + C) numbers for N training images and C classes on ViT-B/16 (grows with
--shots); trainable: nothing, or with --finetune the keys, 512·N (32,768 at 16 shots of 4 classes).

Where it differs from gaopengcuhk/Tip-Adapter (main.py, utils.py at d0e2d6f), and why:
- Selection on the validation split only. (β, α) are searched on validation, as the reference's current main.py
  does; its earlier code searched on test (Tip-Adapter#11, the author agreed validation should be used).
  Tip-Adapter-F's epoch is chosen by the project's loop on validation loss; the reference keeps the epoch of best
  *test* accuracy.
- The search's ranges are the reference's EuroSAT config (β 0.1 to 12 in 200 steps, α 0.1 to 10 in 20;
  --search-scale, --search-steps); ties keep the first best as the reference does, except that a grid where every
  point scores 0 keeps its first point, not (0, 0).
- The keys are the plain training embeddings, shared with E2's embedding cache; the reference averages 10
  augmented views (random resized crop, flip) per image. Tip-Adapter-F trains on those cached embeddings without
  augmentation (a flipped image would need the tower again), by the project's loop: AdamW at the reference's
  rate (1e-3) and weight decay (0.01) but epsilon 1e-8 (the reference: 1e-4), batches of --batch-size (256
  there), the project's warm-up and plateau cuts until the training loss converges (docs/how-a-run-works.md)
  instead of 20 epochs of cosine decay.
- fp32 throughout; the reference runs CLIP in fp16 on CUDA.
The cache model's forward and the search reproduce the reference's outputs to 1e-5 on fixed inputs
(tests/test_feature_adapters.py). alpha_beta_search.csv holds every grid point's validation accuracy.
"""

import time

import common
from clip_adapt.base import UserError, is_main_process, write_csv
from clip_adapt.feature_adapters import INIT_ALPHA, INIT_BETA, SEARCH_SCALE, SEARCH_STEPS, TipAdapter, fit_tip_adapter
from clip_adapt.training import predict

LEARNING_RATE = 1e-3   # Tip-Adapter-F's keys, the reference's rate; the training-free cache uses none
STUDY_ACCURACY = None


def add_flags(parser):
    tip = parser.add_argument_group("Tip-Adapter")
    tip.add_argument("--finetune", action="store_true", help="Tip-Adapter-F: train the cache's keys")
    tip.add_argument("--search-scale", type=float, nargs=2, default=list(SEARCH_SCALE), metavar=("BETA", "ALPHA"),
                     help="the searched values run from 0.1 up to these")
    tip.add_argument("--search-steps", type=int, nargs=2, default=list(SEARCH_STEPS), metavar=("BETA", "ALPHA"),
                     help="grid points of beta and alpha")
    tip.add_argument("--init-alpha", type=float, default=INIT_ALPHA, help="alpha while --finetune trains")
    tip.add_argument("--init-beta", type=float, default=INIT_BETA, help="beta while --finetune trains")
    return parser


def build_model(clip, tokenizer, class_names, args):
    return TipAdapter(clip, tokenizer, class_names, common.class_templates(args, clip), args.finetune, args.init_alpha,
                      args.init_beta)


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()
    if args.tune and args.finetune:
        raise UserError("--tune: E9 always searches alpha and beta on validation; with --finetune pass --lr and "
                        "--weight-decay yourself")
    if min(args.search_steps) < 1 or min(args.search_scale) <= 0.1:
        raise UserError("--search-steps must be at least 1 and --search-scale above 0.1 (the grid starts there)")
    exp = common.start(common.script_name(__file__), args)
    model = build_model(exp.clip, exp.tokenizer, exp.data.class_names, args).to(exp.device)
    embeddings = common.frozen_embeddings(exp, model)
    config = exp.train_config(augment=False) if args.finetune else None
    started = time.time()
    result, fitted, grid = fit_tip_adapter(model, embeddings, exp.out_dir / "checkpoint", config,
                                           args.search_scale, args.search_steps)
    if args.tune:   # the search on validation is this method's tuning
        fitted["tune"] = {"grid": grid, "choice": {"alpha": fitted["alpha"], "beta": fitted["beta"]}, "seconds": round(time.time() - started, 2)}
    if is_main_process():
        write_csv(exp.out_dir / "alpha_beta_search.csv", grid)
        print(f"searched on validation: beta {fitted['beta']:g}, alpha {fitted['alpha']:g} (validation accuracy "
              f"{fitted['search_val_accuracy']:.3f}); cache of {fitted['cache_size']['images']} images")
    logits = {name: predict(model.cache, split.inputs, 2 * args.batch_size, exp.device, args.precision)
              for name, split in embeddings.items()}
    common.finish(exp, model, result, split_logits=logits, finetune=args.finetune, **fitted)


if __name__ == "__main__":
    common.run(main)
