"""Prompt options (position, entry, init), pixel-space prompts, E1's template study and ablate_prompts.py."""

import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, tiny_batch

from clip_adapt.models import STUDY_TEMPLATES, ImageClassifier, TextHead, ZeroShot, count_params
from clip_adapt.prompts import FixedPatchPrompter, PadPrompter, RandomPatchPrompter, VisualPrompts, scaled_prompt_size

CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]


def record_layer_inputs(vision_model) -> list:
    seen = []
    for layer in vision_model.encoder.layers:   # registered after the prompt hooks: they see what the layer sees
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def prompt_slots(hidden: torch.Tensor, position: str, n: int) -> torch.Tensor:
    return hidden[:, 1:1 + n] if position == "front" else hidden[:, -n:]


# --------------------------------------------------------------------------- token prompt options

@pytest.mark.parametrize("position", ["front", "back"])
@pytest.mark.parametrize("entry", ["pre-ln", "post-ln"])
def test_each_option_places_its_prompts_and_counts_them(clip_parts, position, entry):
    clip, image_processor, _ = clip_parts
    n, layers = 3, [0, 2]
    pixels = tiny_batch(image_processor, 2)
    layer_norm = copy.deepcopy(clip.vision_model.pre_layrnorm)   # the hook below goes on the original
    with torch.no_grad():
        plain = layer_norm(clip.vision_model.embeddings(pixels))
    model = ImageClassifier(clip, 4, num_prompts=n, prompt_layers=layers, position=position, entry=entry)
    width = clip.config.vision_config.hidden_size
    assert count_params(model)[0] == len(layers) * n * width + clip.config.projection_dim * 4 + 4
    seen = record_layer_inputs(model.vision)
    with torch.no_grad():
        model(pixels)
    patches = plain.shape[1] - 1
    assert [s.shape[1] for s in seen] == [1 + patches + n] * len(seen)
    prompts = model.prompts.prompts.detach()
    # Layer 0: before CLIP's pre-layernorm, the layer reads the layer-normed prompts; after it, the prompts verbatim.
    first = layer_norm(prompts[0]) if entry == "pre-ln" else prompts[0]
    torch.testing.assert_close(prompt_slots(seen[0], position, n), first.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert torch.equal(prompt_slots(seen[2], position, n), prompts[1].expand(2, -1, -1))   # deeper: verbatim
    # The image tokens are CLIP's own, in their own order, whatever the position; the class token stays first.
    image_tokens = seen[0][:, [0, *range(1 + n, 1 + n + patches)]] if position == "front" else seen[0][:, :1 + patches]
    torch.testing.assert_close(image_tokens, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("entry", ["pre-ln", "post-ln"])
def test_front_and_back_give_the_same_embedding(clip_parts, entry):
    """No attention mask, no position embedding on the prompts: attention cannot tell where they sit."""
    clip, image_processor, _ = clip_parts
    pixels = tiny_batch(image_processor, 3)
    embeddings = {}
    for position in ("front", "back"):
        torch.manual_seed(0)
        model = ImageClassifier(copy.deepcopy(clip), 4, num_prompts=4, prompt_layers=[0, 1], position=position,
                                entry=entry, init="xavier")   # larger prompts than N(0, 0.02): a real change
        with torch.no_grad():
            embeddings[position] = model.embed(pixels)
    with torch.no_grad():
        plain = clip.get_image_features(pixel_values=pixels).pooler_output
    assert not torch.allclose(embeddings["front"], plain, atol=1e-3)
    torch.testing.assert_close(embeddings["front"], embeddings["back"], rtol=1e-5, atol=1e-5)


def test_initialisations_and_entry_of_a_deeper_first_layer(clip_parts):
    clip, _, _ = clip_parts
    torch.manual_seed(0)
    normal = VisualPrompts(copy.deepcopy(clip), 200, [0])
    assert abs(normal.prompts.std().item() - 0.02) < 0.002 and abs(normal.prompts.mean().item()) < 0.002
    config = clip.config.vision_config
    bound = (6 / (3 * config.patch_size ** 2 + config.hidden_size)) ** 0.5
    xavier = VisualPrompts(copy.deepcopy(clip), 200, [0], init="xavier")
    assert xavier.prompts.abs().max() <= bound and xavier.prompts.abs().max() > 0.9 * bound
    assert normal.entry == "pre-ln"
    assert VisualPrompts(copy.deepcopy(clip), 2, [1, 2], entry="pre-ln").entry == "post-ln"


# --------------------------------------------------------------------------- pixel prompts

@pytest.mark.parametrize("image_size, size", [(224, 30), (32, 4), (48, 7)])
def test_pixel_prompt_counts_match_formulas(image_size, size):
    assert sum(p.numel() for p in PadPrompter(image_size, size).parameters()) == 12 * size * (image_size - size)
    for kind in (FixedPatchPrompter, RandomPatchPrompter):
        assert sum(p.numel() for p in kind(image_size, size).parameters()) == 3 * size ** 2
    assert PadPrompter.count(224, 30) == 69_840
    assert scaled_prompt_size(224) == 30 and scaled_prompt_size(32) == 4


def changed_pixels(prompter, image_size: int) -> torch.Tensor:
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        return (prompter(pixels) != pixels).any(1)   # per pixel, over channels


def test_padding_changes_only_the_border_and_patches_only_their_square():
    torch.manual_seed(0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:28, 4:28] = False
    assert torch.equal(changed_pixels(PadPrompter(32, 4), 32), border.expand(2, -1, -1))
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:5, :5] = True
    assert torch.equal(changed_pixels(FixedPatchPrompter(32, 5), 32), corner.expand(2, -1, -1))
    random_patch = RandomPatchPrompter(32, 5)
    assert torch.equal(changed_pixels(random_patch.eval(), 32), corner.expand(2, -1, -1))   # evaluation: fixed
    places = {tuple(changed_pixels(random_patch.train(), 32)[0].nonzero()[0].tolist()) for _ in range(20)}
    assert len(places) > 1 and all(changed_pixels(random_patch, 32).sum((1, 2)).eq(25))
    pixels = torch.randn(2, 3, 32, 32)   # placed by indexing with tensors (no graph break) = padded into place
    for top, left in ((0, 0), (27, 3), (11, 27)):
        assert torch.equal(random_patch.place(pixels, top, left),
                           pixels + random_patch.placed(torch.tensor(top), torch.tensor(left)))


def test_pixel_prompt_with_clip_head_trains_only_the_prompt_and_matches_zero_shot(clip_parts):
    clip, image_processor, tokenizer = clip_parts
    pixels = tiny_batch(image_processor, 4)
    zero_shot = ZeroShot(copy.deepcopy(clip), tokenizer, CLASS_NAMES)
    with torch.no_grad():
        expected = zero_shot(pixels)
        plain = ImageClassifier(copy.deepcopy(clip), 4, head=TextHead(clip, tokenizer, CLASS_NAMES))
        torch.testing.assert_close(plain(pixels), expected, rtol=1e-5, atol=1e-4)
    model = ImageClassifier(clip, 4, pixel_prompt=PadPrompter(32, 4), head=TextHead(clip, tokenizer, CLASS_NAMES))
    assert count_params(model)[0] == 12 * 4 * 28
    model.train()
    F.cross_entropy(model(pixels), torch.arange(4)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"pixel_prompt.pad_{side}" for side in ("up", "down", "left", "right")}


# --------------------------------------------------------------------------- the scripts

def metrics_of(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("prompt_type, head, expected", [("padding", None, 12 * 4 * 28), ("fixed-patch", None, 48),
                                                         ("padding", "linear", 12 * 4 * 28 + 16 * 4 + 4)])
def test_e3_pixel_prompts_report_formula_counts(tmp_path, prompt_type, head, expected):
    args = ["--smoke", "--epochs", 1, "--prompt-type", prompt_type, "--output-dir", tmp_path]
    run_script("E3_shallow_vpt.py", *args, *(["--head", head] if head else []), expect_exit=0)
    metrics = metrics_of(tmp_path / "E3_shallow_vpt")
    assert metrics["trainable_params"] == expected
    assert metrics["prompt_params"] == (1344 if prompt_type == "padding" else 48) and metrics["prompt_size"] == 4


def test_e4_back_pre_ln_runs_and_records_its_options(tmp_path):
    run_script("E4_deep_vpt.py", "--smoke", "--epochs", 1, "--prompt-position", "back", "--prompt-entry", "pre-ln",
               "--num-prompts", 2, "--output-dir", tmp_path, expect_exit=0)
    metrics = metrics_of(tmp_path / "E4_deep_vpt")
    assert metrics["prompt_entry"] == "pre-ln" and metrics["settings"]["prompt_position"] == "back"
    assert metrics["trainable_params"] == 3 * 2 * 32 + 16 * 4 + 4


def test_e1_reports_each_template_and_the_ensemble(tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n# a comment\n\nThis is not a photo of {}\n")
    run_script("E1_zero_shot_clip.py", "--smoke", "--templates", templates, "--output-dir", tmp_path, expect_exit=0)
    folder = tmp_path / "E1_zero_shot_clip"
    rows = list(csv.DictReader((folder / "templates.csv").read_text().splitlines()))
    assert [r["template"] for r in rows] == ["a photo of a {}.", "This is not a photo of {}", "ensemble of 2"]
    metrics = metrics_of(folder)
    assert set(metrics["template_accuracy"]) == {"a photo of a {}.", "This is not a photo of {}"}
    assert float(rows[-1]["test_accuracy"]) == metrics["test_accuracy"]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert {"a photo of a {}.", "This is a photo of {}", "This is not a photo of {}", "No {}, no score."} \
        <= set(STUDY_TEMPLATES)
    assert (folder / "top_k_samples.png").read_bytes()[:4] == b"\x89PNG"
    templates.write_text("no placeholder here\n")
    capsys.readouterr()
    run_script("E1_zero_shot_clip.py", "--smoke", "--templates", templates, "--output-dir", tmp_path, expect_exit=2)
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_ablate_smoke_writes_one_row_per_cell_and_resumes(tmp_path, capsys):
    args = ["--smoke", "--epochs", 1, "--counts", 1, "--output-dir", tmp_path]
    run_script("tools/ablate_prompts.py", *args, expect_exit=0)
    rows = list(csv.DictReader((tmp_path / "ablation.csv").read_text().splitlines()))
    # 1 count × layers 0, all × front, back + padding + fixed patch
    assert [r["cell"] for r in rows] == ["token_layer0_n1_front", "token_layer0_n1_back", "token_layerall_n1_front",
                                         "token_layerall_n1_back", "padding", "fixed-patch"]
    assert {r["prompt_type"] for r in rows} == {"token", "padding", "fixed-patch"}
    table = (tmp_path / "ablation.md").read_text()
    assert "| layer | prompts | trainable params | front | back |" in table and "| all | 1 |" in table
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    finished = {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/seed_0/cell.json")}
    assert len(finished) == len(rows)

    capsys.readouterr()
    run_script("tools/ablate_prompts.py", *args, expect_exit=0)
    assert capsys.readouterr().out.count("finished before, not rerun") == len(rows)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert list(csv.DictReader((tmp_path / "ablation.csv").read_text().splitlines())) == rows
