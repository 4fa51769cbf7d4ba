"""E6 --wise-ft (clip_adapt/wise_ft.py): the reference's interpolation and head, θ_0 is E1, the whole α curve."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, run_script, tiny_batch

from clip_adapt.models import ZERO_SHOT_TEMPLATES, ZeroShot, tiny_clip
from clip_adapt.wise_ft import ALPHAS, ZeroShotLinear, chosen, interpolate

SAME = dict(rtol=1e-5, atol=1e-5)

# mlfoundations/wise-ft at 58b7a4b, src/wise_ft.py _merge (no Fisher) and src/models/modeling.py ClassificationHead
# (normalize=True, the zero-shot head), run unchanged on a CPU in fp32 on reference_inputs(). Stubbed: the modules
# they import and do not use here (clip.clip, src.models.eval/finetune/utils/zeroshot, src.args).
REFERENCE_MERGED_B_AT_0_3 = [-0.8152162, 0.9260139, -1.1435877, 0.1434894, -0.2335908]
REFERENCE_MERGED_A_AT_0_7 = [[0.7234791, -0.7124254, -1.7100122, 0.4298049],
                             [0.6941950, 0.2382883, 0.6633982, 0.3857165],
                             [0.6688790, -1.0243076, -0.7327625, 0.0399953]]
REFERENCE_HEAD_LOGITS = [[-60.1532021, -49.1864662, 21.4073505, -66.5144577],
                         [32.0399323, 26.7525368, -43.7109604, 18.6523952],
                         [-29.5517597, -24.4907455, 5.4685378, -52.7141609]]


def reference_inputs():
    g = torch.Generator().manual_seed(0)
    theta_0 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    theta_1 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    text = F.normalize(torch.randn(4, 6, generator=g), dim=-1)   # the head's weights are 100 times these
    return theta_0, theta_1, text, torch.randn(3, 6, generator=g)


def test_interpolation_and_head_equal_the_reference():
    theta_0, theta_1, text, features = reference_inputs()
    torch.testing.assert_close(interpolate(theta_0, theta_1, 0.3)["b"], torch.tensor(REFERENCE_MERGED_B_AT_0_3),
                               **SAME)
    torch.testing.assert_close(interpolate(theta_0, theta_1, 0.7)["a"], torch.tensor(REFERENCE_MERGED_A_AT_0_7),
                               **SAME)
    assert all(torch.equal(interpolate(theta_0, theta_1, 0.0)[k], theta_0[k]) for k in theta_0)
    head = ZeroShotLinear(text, torch.tensor(100.0))
    with torch.no_grad():
        torch.testing.assert_close(head(features), torch.tensor(REFERENCE_HEAD_LOGITS), **SAME)
    assert ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_the_wise_ft_model_as_built_is_e1():
    import common
    from clip_adapt.runner import experiment_scripts
    script = next(s for s in experiment_scripts() if s.short_name == "E6")
    clip, processor, tokenizer = tiny_clip()
    model = script.build_model(clip, tokenizer, list(CLASSES), script.default_args("--smoke", "--wise-ft")).eval()
    zero_shot = ZeroShot(copy.deepcopy(clip), tokenizer, list(CLASSES), ZERO_SHOT_TEMPLATES)   # ZeroShot freezes it
    pixels = tiny_batch(processor, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), zero_shot(pixels), rtol=0, atol=1e-5)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {name for name, _ in model.named_parameters()}   # the whole tower and the head train
    assert common.class_templates(script.default_args()) == ZERO_SHOT_TEMPLATES


def test_alpha_is_chosen_on_validation_accuracy_then_loss():
    rows = [{"alpha": 0.0, "val_accuracy": 0.5, "val_loss": 1.0}, {"alpha": 0.5, "val_accuracy": 0.7, "val_loss": 0.9},
            {"alpha": 1.0, "val_accuracy": 0.7, "val_loss": 0.8}]
    assert chosen(rows)["alpha"] == 1.0
    rows[2]["val_loss"] = 0.9
    assert chosen(rows)["alpha"] == 0.5


def test_script_writes_the_whole_alpha_curve_and_starts_at_e1(tmp_path):
    flags = ("--smoke", "--quiet", "--noise-levels", 0, 0.1, "--output-dir", tmp_path)
    run_script("E6_full_finetune.py", *flags, "--wise-ft", "--lr", "1e-3", expect_exit=0)
    run_script("E1_zero_shot_clip.py", *flags, expect_exit=0)
    folder = tmp_path / "E6_full_finetune"
    metrics = json.loads((folder / "metrics.json").read_text())
    zero_shot = json.loads((tmp_path / "E1_zero_shot_clip" / "metrics.json").read_text())
    curve = metrics["wise_ft"]["curve"]
    assert [row["alpha"] for row in curve] == list(ALPHAS)
    assert all(set(row["noise"]) == {"0.0", "0.1"} for row in curve)
    assert curve[0]["test_accuracy"] == zero_shot["test_accuracy"]   # θ_0 is E1
    assert curve[0]["val_loss"] == pytest.approx(zero_shot["val_loss"], abs=1e-5)
    best = chosen(curve)
    assert metrics["wise_ft"]["alpha"] == best["alpha"]
    assert metrics["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert metrics["robustness"]["0.1"] == pytest.approx(best["noise"]["0.1"], abs=1e-6)
    assert (folder / "wise_ft.png").read_bytes()[:4] == b"\x89PNG" and (folder / "wise_ft.csv").exists()
