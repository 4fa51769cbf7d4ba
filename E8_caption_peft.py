"""E8 — image captioning on a frozen CLIP vision tower: a GPT-2 decoder (--decoder) reads it through new
cross-attention layers (transformers' VisionEncoderDecoderModel); CLIP and GPT-2's own weights stay frozen, and
only the cross-attention and one parameter-efficient module train: --peft adapter (the study's bottleneck,
354 wide for GPT-2, applied twice after cross-attention), prefix (prefix tuning, 20 tokens, with peft's
reparameterisation MLP; GPT-2 decoders), lora (peft, self-attention) or none. Trained by the project's one loop
on next-token loss (early stopping on validation loss); test captions by greedy or beam search (--num-beams),
scored by CIDEr-D (COCO's PTB tokenizer: needs Java), CLIPScore and RefCLIPScore (by CLIP ViT-B/32,
--clipscore-model).

--data: a COCO-format folder (train.json, test.json, optional val.json; images in images/) or a `datasets`
dataset with an image and a caption column. --smoke: a tiny random CLIP and GPT-2 on synthetic shape captions.
E8 takes transformers CLIPs only (a CLIPModel hub id or folder); open_clip models (BiomedCLIP) run E1-E7 and the
other classification scripts. See docs/captioning.md.
"""

import time
from pathlib import Path

import common
from clip_adapt.base import UserError
from clip_adapt.caption_report import finish_captioning
from clip_adapt.captioning import (CAPTIONER_CLIP, CLIPSCORE_MODEL, DEFAULT_DECODER, MAX_CAPTION_TOKENS, PEFT_METHODS,
                                   SMOKE_CAPTIONS, TINY_DECODER, Captioner, check_cider, check_decoder,
                                   load_captions, load_decoder, write_shape_captions)
from clip_adapt import hub
from clip_adapt import backend_open_clip
from clip_adapt.models import TINY_CLIP, check_model, is_random, load_clip, weights_identity
from clip_adapt.training import train

TASK = "captioning"   # not run on classification data by run_all_experiments.py, bench.py or their tests
LEARNING_RATE = 1e-4  # the study's AdamW rate
STUDY_ACCURACY = None  # a captioner has no accuracy; the study's CIDEr / CLIPScore are in docs/captioning.md
# Other command lines whose models the part contract checks too (tests/test_part_contract.py).
MODEL_VARIANTS = [("--peft", method) for method in PEFT_METHODS if method != "adapter"]


def add_flags(parser):
    caption = parser.add_argument_group("captioning")
    caption.add_argument("--decoder", help=f"causal language model (hub id or local directory) that gets "
                                           f"cross-attention [default: {DEFAULT_DECODER}; with --smoke: a tiny "
                                           f"random GPT-2]")
    caption.add_argument("--peft", default="adapter", choices=PEFT_METHODS,
                         help="what trains besides the cross-attention")
    caption.add_argument("--prefix-tokens", type=int, default=20, help="prefix tuning's virtual tokens")
    caption.add_argument("--rank", type=int, default=8, help="LoRA rank")
    caption.add_argument("--alpha", type=float, default=16, help="LoRA alpha (the update is scaled by alpha / r)")
    caption.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA's input dropout (--peft lora)")
    caption.add_argument("--adapter-dropout", type=float, default=0.1,
                         help="dropout inside the bottleneck adapter (--peft adapter)")
    caption.add_argument("--caption-column", help="the dataset's caption column (one caption or a list per "
                                                  "image) [default: caption, captions, text or its only text "
                                                  "column]")
    caption.add_argument("--max-caption-tokens", type=int, default=MAX_CAPTION_TOKENS,
                         help="captions are cut to this many tokens for training; generation stops there too")
    caption.add_argument("--num-beams", type=int, default=1, help="1: greedy decoding; more: beam search")
    caption.add_argument("--clipscore-model",
                         help=f"the CLIP that computes CLIPScore and RefCLIPScore (hub id or local directory) "
                              f"[default: {CLIPSCORE_MODEL}, the ViT-B/32 the metric is defined with; with "
                              f"--smoke: the tiny random CLIP]; '{CAPTIONER_CLIP}': the captioner's own --model, "
                              f"not an independent judge (labelled so in the summary and metrics.json)")
    return parser


def decoder_of(args) -> str:
    return args.decoder or (TINY_DECODER if args.smoke else DEFAULT_DECODER)


def clipscore_model_of(args) -> str:
    return args.clipscore_model or (TINY_CLIP if args.smoke else CLIPSCORE_MODEL)


def check_inputs(args) -> None:
    """What the run needs after training, checked before anything loads: pycocoevalcap and COCO's PTB tokenizer
    (Java) for CIDEr-D, and the configs of the captioning CLIP, the decoder and the scoring CLIP (read from a
    directory, the hub or its cache). A missing piece is one line in seconds, not a crash after training."""
    check_cider()
    for flag, name in (("--model", args.model), ("--clipscore-model", args.clipscore_model)):
        if name and backend_open_clip.names_open_clip(name):
            raise UserError(f"{flag} {name} is an open_clip model; E8 captions with transformers CLIPs only (a "
                            f"CLIPModel hub id or save_pretrained folder)")
    names = [args.model, args.decoder] + ([args.clipscore_model] if args.clipscore_model != CAPTIONER_CLIP else [])
    if any(not is_random(n) and n != TINY_DECODER and not Path(n).expanduser().exists() for n in names):
        hub.notice_offline()
    check_model(args.model)
    check_decoder(args.decoder)
    if args.clipscore_model != CAPTIONER_CLIP:
        try:
            check_model(args.clipscore_model)
        except UserError as error:
            raise UserError(f"--clipscore-model: {error}".replace("pass --model", "pass --clipscore-model")) from None


def build_model(clip, tokenizer, class_names, args):
    decoder, decoder_tokenizer = load_decoder(decoder_of(args))
    identity = weights_identity(decoder_of(args), decoder)   # the decoder as loaded, for metrics.json
    positions = getattr(decoder.config, "n_positions", None)   # GPT-2's, the decoders prefix tuning supports
    if args.peft == "prefix" and positions and args.prefix_tokens + args.max_caption_tokens + 1 > positions:
        raise UserError(f"--prefix-tokens {args.prefix_tokens} and --max-caption-tokens {args.max_caption_tokens} "
                        f"(with the start token) need more than the decoder's {positions} positions: the prefix "
                        f"shifts every caption's positions; lower one of them")
    model = Captioner(clip, decoder, decoder_tokenizer, args.peft, args.prefix_tokens, args.rank, args.alpha,
                      args.lora_dropout, args.adapter_dropout)
    model.decoder_weights = identity
    return model


def check_flags(args) -> None:
    if args.data is None and not args.smoke:
        raise UserError("E8 needs --data: a COCO-format caption folder or a datasets dataset with images and "
                        "captions (or --smoke for a synthetic set)")
    if args.shots or args.split_file or args.schedule != "converge":
        raise UserError("--shots, --split-file and --schedule are the classification scripts' (K images per class, "
                        "CoOp's splits and schedule); E8 captions: leave them out")
    if args.tune:
        raise UserError("E8 has no --tune yet: set --lr and --weight-decay yourself (its default is the study's "
                        "recipe)")
    for name in ("prefix_tokens", "rank", "max_caption_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    started = time.time()
    check_flags(args)
    args.data = args.data or SMOKE_CAPTIONS
    args.decoder = decoder_of(args)
    args.clipscore_model = clipscore_model_of(args)
    name = common.script_name(__file__)
    args, out_dir, device, accelerator = common.open_run(name, args)
    check_inputs(args)
    data_source = str(write_shape_captions(out_dir / "smoke_data")) if args.data == SMOKE_CAPTIONS else args.data
    clip, image_processor, tokenizer = load_clip(args.model, image_processor=args.image_processor)
    common.seed_everything(args.seed)   # the new layers' initial weights
    identity = weights_identity(args.model, clip)   # before anything trains
    model = build_model(clip, tokenizer, [], args)
    data = load_captions(data_source, image_processor, model.tokenizer, args.val_fraction, args.split_seed,
                         args.image_column, args.caption_column, args.test_split, args.max_caption_tokens)
    print(f"{name}: {args.model} + {args.decoder} ({args.peft}) on {device}; data {args.data}: "
          + ", ".join(f"{count} {what.replace('_', ' ')}" for what, count in data.report.items()))
    # Loaded now, not after training: a scoring CLIP that cannot be loaded stops the run before its first step.
    score_clip, score_processor, score_tokenizer = ((clip, image_processor, tokenizer)
                                                    if args.clipscore_model == CAPTIONER_CLIP
                                                    else load_clip(args.clipscore_model))
    exp = common.Experiment(name, args, device, out_dir, clip.to(device), image_processor, tokenizer,
                            data.to(device), started, accelerator, identity)
    # No flips: they would turn "left" into "right" in the picture but not in its caption.
    result = train(exp.maybe_compile(model), exp.data.train, exp.data.val, exp.data.test,
                   exp.train_config(augment=False))
    finish_captioning(exp, model, result, score_clip.to(device), score_processor, score_tokenizer,
                      **common.provenance(exp), decoder_weights=model.decoder_weights)


if __name__ == "__main__":
    common.run(main)
