"""E7 — LoRA (Hu et al., ICLR 2022) through Hugging Face peft in the frozen CLIP vision tower, plus a linear
head on the projected embedding; the text tower is untouched. Default rank 8, alpha 16, dropout 0.1 on q_proj
and v_proj: 12·2·r·(768 + 768) + 2,052 = 296,964 trainable for ViT-B/16. --adapter loha|lokr|ia3 runs peft's
other adapters on the same layers ((IA)^3: k_proj v_proj fc2 unless --target-modules says otherwise).
The adapter is saved in peft's format to <output-dir>/E7_lora/adapter/ (with head.safetensors), and with
--save-merged a plain CLIP with the adapter merged in goes to merged/. --head clip classifies by CLIP's frozen
text classifier instead of a trained linear head: then only the adapter trains.
"""

import common
from clip_adapt.adapters import ADAPTERS, VISION_LINEAR_LAYERS, AdapterClassifier, adapter_settings, peft_config
from clip_adapt import backend_open_clip
from clip_adapt.base import UserError, is_main_process

LEARNING_RATE = 1e-3
STUDY_ACCURACY = None   # not in the study
# Other command lines whose models the part contract checks too (tests/test_part_contract.py).
MODEL_VARIANTS = [("--adapter", kind) for kind in ADAPTERS if kind != "lora"] + [("--head", "clip")]


def add_flags(parser):
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--adapter", default="lora", choices=ADAPTERS,
                         help="the peft adapter on the vision tower: LoRA, LoHa, LoKr or (IA)^3 (docs/adapters.md)")
    adapter.add_argument("--rank", type=int, default=8, help="r, the rank of the update (not used by ia3)")
    adapter.add_argument("--alpha", type=float, default=16, help="the update is scaled by alpha / r (not used by ia3)")
    adapter.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA's input dropout; loha and lokr: "
                                                                         "rank dropout (not used by ia3)")
    adapter.add_argument("--target-modules", nargs="+", choices=list(VISION_LINEAR_LAYERS),
                         help="the vision encoder's linear layers that get adapters "
                              "[default: q_proj v_proj; ia3: k_proj v_proj fc2]")
    adapter.add_argument("--save-merged", action="store_true", help="also save a CLIP with the adapter merged in")
    common.add_head_flag(adapter)
    return parser


def config_of(args, clip=None):
    """The adapter's peft config, on the module names of `clip` (checked without a model first)."""
    return peft_config(args.adapter, args.rank, args.alpha, args.lora_dropout, args.target_modules, clip)


def build_model(clip, tokenizer, class_names, args):
    return AdapterClassifier(clip, len(class_names), config_of(args, clip),
                             head=common.text_head(clip, tokenizer, class_names, args, args.head or "linear"))


def main():
    args = add_flags(common.parser(__doc__, LEARNING_RATE)).parse_args()

    config_of(args)   # bad adapter flags fail here, before the model and data load
    if args.save_merged and args.model and backend_open_clip.names_open_clip(args.model):
        raise UserError("--save-merged writes a transformers CLIPModel; an open_clip model's adapter is saved in "
                        "peft's format (adapter/) only: leave out --save-merged")
    exp = common.start(common.script_name(__file__), args)
    model, result, tuned = common.build_and_train(exp, build_model)
    if is_main_process():   # under accelerate launch, one process writes
        model.save_adapter(exp.out_dir / "adapter")
        if args.save_merged:
            model.save_merged(exp.out_dir / "merged", exp.image_processor, exp.tokenizer)
    common.finish(exp, model, result, head=args.head or "linear", **adapter_settings(args), **tuned)


if __name__ == "__main__":
    common.run(main)
