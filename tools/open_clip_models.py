"""open_clip models without a download: a transformers CLIP exported to open_clip's format, and BiomedCLIP's
architecture, small and random, as a local folder that --model takes.

    python tools/open_clip_models.py tiny-biomedclip FOLDER     # timm test_vit trunk + tiny random BERT, 160 px
    python tools/open_clip_models.py export CLIP_DIR FOLDER      # a save_pretrained CLIPModel folder -> open_clip

BiomedCLIP's own config (hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, open_clip_config.json):
a timm trunk with token pooling ("timm_pool": "") and a linear projection, an HF BERT text tower with
"hf_pooler_type": "cls_last_hidden_state_pooler" and "hf_proj_type": "mlp", a 256-token context, OpenAI's mean
and std. The tiny one keeps every one of those choices and shrinks the sizes: timm's `test_vit` (64 wide, 6
blocks, patch 16 at 160 px) and a 2-layer, 32-wide BertModel with a word-piece vocabulary of letters and a few
words, saved beside the config and named as the text tower (`hf_model_name`), so that nothing is fetched.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_adapt.backend_open_clip import CONFIG_FILE   # noqa: E402

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
WEIGHTS_FILE = "open_clip_model.safetensors"
# Whole words in the tiny BERT's vocabulary, so that the texts the methods write (CoCoOp's "a photo of a",
# BiomedCLIP's "this is a photo of", the sample's class names) are word tokens, as in BiomedBERT's.
WORDS = "a photo of this is an the brain mri scan showing glioma meningioma pituitary tumor no image with".split()


def biomedclip_config(image_size: int, timm_model: str, text_folder: Path, embed_dim: int) -> dict:
    return {"model_cfg": {"embed_dim": embed_dim,
                          "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False,
                                         "timm_pool": "", "timm_proj": "linear", "image_size": image_size},
                          "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                                       "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                       "context_length": 256}},
            "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}


def word_piece_tokenizer(folder: Path):
    """A BERT tokenizer (uncased, as BiomedBERT's) whose vocabulary spells any word out: the special tokens,
    letters, digits and punctuation, each also as a continuation piece, and WORDS."""
    from transformers import BertTokenizer
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *[f"##{p}" for p in pieces],
             *[w for w in WORDS if w not in pieces]]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_open_clip(model, folder: Path, config: dict) -> Path:
    from safetensors.torch import save_file
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    return folder


def tiny_biomedclip(folder: Path, seed: int = 0) -> Path:
    """BiomedCLIP's architecture with small random weights, written to `folder` (config, weights, tokenizer)."""
    import open_clip
    from transformers import BertConfig
    folder = Path(folder).resolve()
    tokenizer = word_piece_tokenizer(folder)   # the folder's tokenizer, as open_clip's local-dir: reads it
    BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id
               ).save_pretrained(folder)
    config = biomedclip_config(160, "test_vit", folder, 64)   # CoCoOp's meta-net: 64 / 16 = 4 hidden units
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False)
    return save_open_clip(model, folder, config)


def biomedclip_architecture(folder: Path, device: str = "meta"):
    """BiomedCLIP's real architecture (timm vit_base_patch16_224, a BERT-base text tower, 512-wide projection)
    with no weights (on the meta device), and the tiny word-piece tokenizer: for counting parameters."""
    import open_clip
    from transformers import BertConfig
    from clip_adapt import backend_open_clip
    folder = Path(folder).resolve()
    tokenizer = word_piece_tokenizer(folder)
    BertConfig(max_position_embeddings=512).save_pretrained(folder)   # BiomedBERT-base: BERT-base's shape
    config = biomedclip_config(224, "vit_base_patch16_224", folder, 512)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    with torch.device(device):
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False, device=device)
    model.context_length = 256
    model.zero_shot_templates = backend_open_clip.BIOMEDCLIP_TEMPLATES
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- transformers CLIP -> open_clip

def open_clip_config(clip, image_processor, tokenizer_folder: str = "") -> dict:
    """open_clip's config of a transformers CLIP's architecture (OpenAI's layout: open_clip's own towers).
    tokenizer_folder: where its transformers tokenizer is saved (open_clip's local-dir: reads the folder's own)."""
    vision, text = clip.config.vision_config, clip.config.text_config
    if vision.hidden_act != "quick_gelu" or text.hidden_act != "quick_gelu":
        raise ValueError("open_clip's OpenAI layout has QuickGELU or GELU; this converter writes QuickGELU only")
    size = image_processor.crop_size["height"]
    return {"model_cfg": {"embed_dim": clip.config.projection_dim, "quick_gelu": True,
                          "vision_cfg": {"image_size": vision.image_size, "layers": vision.num_hidden_layers,
                                         "width": vision.hidden_size, "patch_size": vision.patch_size,
                                         "head_width": vision.hidden_size // vision.num_attention_heads,
                                         "mlp_ratio": vision.intermediate_size / vision.hidden_size},
                          "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                                       "width": text.hidden_size, "heads": text.num_attention_heads,
                                       "layers": text.num_hidden_layers,
                                       "mlp_ratio": text.intermediate_size / text.hidden_size,
                                       "hf_tokenizer_name": tokenizer_folder}},
            "preprocess_cfg": {"mean": list(image_processor.image_mean), "std": list(image_processor.image_std),
                               "size": size}}


def open_clip_state_dict(hf: dict, vision_layers: int, text_layers: int | None) -> dict:
    """A transformers CLIPModel's tensors (its state_dict, or any tensors under its names: gradients) under open_clip's
    names (the inverse of transformers' own mapping of OpenAI's checkpoints): attention's q, k, v concatenated into
    in_proj, the projections transposed. text_layers None: the image tower and its projection only."""
    out = {}

    def blocks(source: str, target: str, layers: int):
        for i in range(layers):
            s, t = f"{source}.encoder.layers.{i}.", f"{target}.resblocks.{i}."
            out[t + "attn.in_proj_weight"] = torch.cat([hf[s + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[t + "attn.in_proj_bias"] = torch.cat([hf[s + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[t + b + ".weight"], out[t + b + ".bias"] = hf[s + a + ".weight"], hf[s + a + ".bias"]

    v = "vision_model"
    out["visual.conv1.weight"] = hf[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[f"{v}.embeddings.position_embedding.weight"]
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out[f"visual.{b}.weight"], out[f"visual.{b}.bias"] = hf[f"{v}.{a}.weight"], hf[f"{v}.{a}.bias"]
    blocks(v, "visual.transformer", vision_layers)
    out["visual.proj"] = hf["visual_projection.weight"].T
    if text_layers is not None:
        t = "text_model"
        out["logit_scale"] = hf["logit_scale"]
        out["token_embedding.weight"] = hf[f"{t}.embeddings.token_embedding.weight"]
        out["positional_embedding"] = hf[f"{t}.embeddings.position_embedding.weight"]
        blocks(t, "transformer", text_layers)
        out["ln_final.weight"], out["ln_final.bias"] = (hf[f"{t}.final_layer_norm.weight"],
                                                        hf[f"{t}.final_layer_norm.bias"])
        out["text_projection"] = hf["text_projection.weight"].T
    return {k: value.detach().clone().contiguous() for k, value in out.items()}


def open_clip_of(clip, image_processor):
    """The same network as an open_clip CLIP (weights copied), built from open_clip_config."""
    import open_clip
    config = open_clip_config(clip, image_processor)["model_cfg"]
    model = open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"], quick_gelu=True)
    model.load_state_dict(open_clip_state_dict(clip.state_dict(), clip.config.vision_config.num_hidden_layers,
                                               clip.config.text_config.num_hidden_layers))
    return model.eval()


def export(clip, image_processor, tokenizer, folder: Path) -> Path:
    """A transformers CLIP as an open_clip local folder: open_clip_config.json, the weights, its tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return save_open_clip(open_clip_of(clip, image_processor), folder,
                          open_clip_config(clip, image_processor, str(folder.resolve())))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tiny-biomedclip").add_argument("folder", type=Path)
    exporting = commands.add_parser("export")
    exporting.add_argument("clip_dir", type=Path)
    exporting.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "tiny-biomedclip":
        print(tiny_biomedclip(args.folder))
    else:
        from clip_adapt.models import load_clip
        clip, image_processor, tokenizer = load_clip(str(args.clip_dir))
        print(export(clip, image_processor, tokenizer, args.folder))


if __name__ == "__main__":
    main()
