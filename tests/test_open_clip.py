"""open_clip models through every classification method (clip_adapt/backend_open_clip.py).

- The same network through both backends gives the same numbers: the tiny CLIP's weights converted to an open_clip
  CLIP (OpenAI's layout, tools/open_clip_models.py); every classification script of the registry, and each of its
  MODEL_VARIANTS, builds its model on each, with the same prompt, context, adapter and head values; logits and
  the gradients of every trainable tensor and of the input pixels agree to 1e-5 in fp32.
- BiomedCLIP's architecture, small and random (a timm trunk, a BERT text tower with CLS pooling and an MLP
  projection), as a local folder: it loads as --model takes it, every script's --smoke-sized run works on it
  (tests/test_part_contract.py checks its parts), E1 uses its own templates, and LoRA lands on the fused qkv.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, SAMPLE_DATA, run_script, tiny_batch

import common
from clip_adapt.backbone import backbone
from clip_adapt.base import UserError
from clip_adapt.models import load_clip, tiny_clip
from clip_adapt.runner import classification_scripts
from tools.open_clip_models import open_clip_of, open_clip_state_dict

SAME = dict(rtol=1e-5, atol=1e-5)
# E7 on the OpenAI layout: open_clip's attention is one nn.MultiheadAttention (peft adapts it whole, not q and v
# apart), so the equivalence puts the adapters on the MLP's two Linear layers, which both libraries have.
FLAGS = {"E7_lora": ("--target-modules", "fc1", "fc2")}


def variants(script):
    own = FLAGS.get(script.name, ())
    return [own, *[(*own, *v) for v in getattr(script.module, "MODEL_VARIANTS", ())]]


CLIP_SCRIPTS = [script for script in classification_scripts() if script.takes_clip]   # not those with a backbone of their own
CASES = [pytest.param(script, flags, id=script.short_name + "".join(f"[{f}]" for f in flags if not f.startswith("-")))
         for script in CLIP_SCRIPTS for flags in variants(script)]


def open_clip_name(name: str) -> str:
    """A classifier's tensor name on the transformers CLIP, as the open_clip CLIP's (the adapters' layers)."""
    name = re.sub(r"encoder\.layers\.(\d+)\.mlp\.fc1", r"transformer.resblocks.\1.mlp.c_fc", name)
    return re.sub(r"encoder\.layers\.(\d+)\.mlp\.fc2", r"transformer.resblocks.\1.mlp.c_proj", name)


def build(script, clip, tokenizer, flags):
    args = script.default_args("--smoke", *flags)
    common.seed_everything(0)
    return script.build_model(clip, tokenizer, list(CLASSES), args).eval()


def forward_backward(model, pixels):
    pixels = pixels.clone().requires_grad_(True)
    logits = model(pixels)
    F.cross_entropy(logits, torch.arange(len(pixels)) % len(CLASSES)).backward()
    return logits.detach(), pixels.grad


@pytest.mark.parametrize("script, flags", CASES)
def test_both_backends_give_the_same_logits_and_gradients(script, flags):
    clip, processor, tokenizer = tiny_clip()
    converted = open_clip_of(clip, processor)
    own = {id(p) for p in clip.parameters()}   # the CLIP's own weights (E6 trains them), not what a method adds
    hf = build(script, clip, tokenizer, flags)
    oc = build(script, converted, tokenizer, flags)
    hf_trainable = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    oc_trainable = {n: p for n, p in oc.named_parameters() if p.requires_grad}
    backbone_names = {n for n, p in hf_trainable.items() if id(p) in own}   # E6's tower: the converted weights
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():   # identical values, away from any zero start (LoRA's B), in both
        for name, tensor in hf_trainable.items():
            if name not in backbone_names:
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
                oc_trainable[open_clip_name(name)].copy_(tensor)
    assert {open_clip_name(n) for n in hf_trainable if n not in backbone_names} | \
        ({n for n in oc_trainable if n.startswith("vision.")} if backbone_names else set()) == set(oc_trainable)
    pixels = tiny_batch(processor)
    hf_logits, hf_pixel_grad = forward_backward(hf, pixels)
    oc_logits, oc_pixel_grad = forward_backward(oc, pixels)
    torch.testing.assert_close(oc_logits, hf_logits, **SAME)
    torch.testing.assert_close(oc_pixel_grad, hf_pixel_grad, **SAME)
    for name, tensor in hf_trainable.items():
        if name not in backbone_names:
            torch.testing.assert_close(oc_trainable[open_clip_name(name)].grad, tensor.grad, **SAME, msg=name)
    if backbone_names:   # E6: the tower's gradients, under open_clip's names
        grads = {("vision_model." + n.removeprefix("vision.") if n.startswith("vision.") else "visual_projection."
                  + n.removeprefix("projection.")): hf_trainable[n].grad for n in backbone_names}
        expected = open_clip_state_dict(grads, clip.config.vision_config.num_hidden_layers, None)
        for name, grad in expected.items():
            torch.testing.assert_close(oc_trainable["vision." + name.removeprefix("visual.")].grad, grad, **SAME,
                                       msg=name)


def test_tiny_biomedclip_loads_as_a_local_open_clip_folder(tiny_biomedclip_dir):
    clip, processor, tokenizer = load_clip(str(tiny_biomedclip_dir))
    parts = backbone(clip)
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel
    assert isinstance(clip.visual, TimmModel) and isinstance(clip.text, HFTextEncoder)
    assert parts.templates == ("this is a photo of {}",)   # BiomedCLIP's own, not the MRI templates
    assert parts.context_length == 256 and tokenizer.model_max_length == 256
    assert (parts.image_size, parts.patch_size, parts.vision_width, parts.vision_layers) == (160, 16, 64, 6)
    assert processor.crop_size["height"] == 160 and processor.image_mean == [0.48145466, 0.4578275, 0.40821073]
    pixels = tiny_batch(processor, 2)
    with torch.no_grad():   # the interface computes what open_clip's own encoders do
        torch.testing.assert_close(parts.image_features(pixels), clip.encode_image(pixels), **SAME)
        tokens = tokenizer(["this is a photo of glioma", "no tumor"], padding=True, return_tensors="pt")
        torch.testing.assert_close(parts.text_features(tokens["input_ids"], tokens["attention_mask"]),
                                   clip.encode_text(tokens["input_ids"]), **SAME)


def test_lora_on_biomedclip_adapts_the_fused_qkv_of_every_block(tiny_biomedclip_dir):
    from clip_adapt.adapters import AdapterClassifier, peft_config
    clip, _, _ = load_clip(str(tiny_biomedclip_dir))
    model = AdapterClassifier(clip, 4, peft_config("lora", rank=2, clip=clip))
    adapted = sorted({n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n})
    assert adapted == sorted(f"vision.blocks.{i}.attn.qkv" for i in range(6))
    # One LoRA on the fused layer: A is r x w, B is 3w x r.
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 6 * 2 * (64 + 3 * 64)


def test_e4_and_every_classification_script_run_on_the_local_folder(tiny_biomedclip_dir, tmp_path):
    for script in CLIP_SCRIPTS:
        run_script(script.path.name, "--smoke", "--model", tiny_biomedclip_dir, "--data", SAMPLE_DATA,
                   "--epochs", 1, "--output-dir", tmp_path, "--quiet", "--noise-levels", 0, expect_exit=0)
        assert (tmp_path / script.name / "metrics.json").is_file(), script.name


def test_e8_refuses_an_open_clip_model_in_one_line(tiny_biomedclip_dir, capsys):
    run_script("E8_caption_peft.py", "--smoke", "--model", tiny_biomedclip_dir, expect_exit=2)
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "open_clip" in error and "transformers CLIPs only" in error


def test_bad_open_clip_names_fail_in_one_line(tmp_path):
    from clip_adapt.models import check_model
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        check_model(str(tmp_path))
    with pytest.raises(UserError, match="open_clip:<architecture>/<pretrained tag>"):
        check_model("open_clip:ViT-B-16")
    with pytest.raises(UserError, match="not in the local cache"):   # the tests' hub is offline
        check_model("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")


def test_lora_reaches_open_clips_multihead_attention_and_starts_as_the_frozen_tower():
    """open_clip's OpenAI layout keeps q, k and v in one nn.MultiheadAttention: E7's default (q_proj v_proj) puts
    peft's LoRA on the attention module itself (in_proj and out_proj), which starts as a no-op and trains; the
    adapters peft has no MultiheadAttention layer for are refused in one line."""
    from clip_adapt.adapters import AdapterClassifier, peft_config
    clip, processor, _ = tiny_clip()
    converted = open_clip_of(clip, processor)
    pixels = tiny_batch(processor)
    with torch.no_grad():
        frozen = backbone(converted).image_features(pixels)
    model = AdapterClassifier(converted, 4, peft_config("lora", clip=converted)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(pixels), frozen, **SAME)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapted == {f"vision.transformer.resblocks.{i}{part}" for i in range(3)
                       for part in (".attn", ".attn.base_layer.out_proj")}
    F.cross_entropy(model(pixels), torch.arange(4)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.raises(UserError, match="only LoRA adapts"):
        peft_config("ia3", clip=converted)


def test_model_names_go_to_their_backend(tiny_biomedclip_dir, tiny_clip_dir):
    """By name only (the hub cannot be reached here): PubMedCLIP is a transformers CLIPModel, BiomedCLIP and
    open_clip's pretrained tags are open_clip, and a folder goes by what it holds."""
    from clip_adapt.backend_open_clip import names_open_clip
    assert not names_open_clip("flaviagiammarino/pubmed-clip-vit-base-patch32")
    assert not names_open_clip("openai/clip-vit-base-patch16") and not names_open_clip(str(tiny_clip_dir))
    assert names_open_clip("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert names_open_clip("open_clip:ViT-B-16/laion2b_s34b_b88k") and names_open_clip(str(tiny_biomedclip_dir))
