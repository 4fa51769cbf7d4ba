"""E14's ResNet-18 (clip_adapt/resnet.py), the script that brings its own backbone: the head-only start against
scikit-learn's logistic regression on the same frozen features (in place of a known-answer bar: there is no CLIP
to start from), the real architecture's counts, what trains and what stays frozen, and how the tools keep CLIP's
flags from it."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from conftest import SAMPLE_DATA, run_script

from clip_adapt.resnet import TINY_RESNET, ResNetClassifier, load_resnet
from clip_adapt.runner import clip_only_note, experiment_scripts, without_clip_flags


def test_random_resnet_18_is_the_published_architecture():
    backbone, processor, tokenizer = load_resnet("random:resnet-18")
    config = backbone.config
    assert (config.embedding_size, config.hidden_sizes, config.depths, config.layer_type) == \
        (64, [64, 128, 256, 512], [2, 2, 2, 2], "basic")
    assert sum(p.numel() for p in backbone.parameters()) == 11_176_512   # ResNet-18 without its 1000-class head
    assert tokenizer is None and processor.size == {"shortest_edge": 224} and processor.crop_pct == 0.875
    counts = {stage: sum(p.numel() for p in ResNetClassifier(backbone, 4, stage).parameters() if p.requires_grad)
              for stage in ("none", "first", "last")}
    assert counts == {"none": 2_052, "first": 2_052 + 147_968, "last": 2_052 + 8_393_728}


def test_a_trained_stage_trains_and_the_rest_stays_frozen_bit_for_bit():
    backbone, processor, _ = load_resnet(TINY_RESNET)
    model = ResNetClassifier(backbone, 4, "last")
    before = {name: t.clone() for name, t in model.backbone.state_dict().items()}
    pixels = torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.backbone.embedder.training and not model.backbone.encoder.stages[0].training
    assert model.stage.training
    F.cross_entropy(model(pixels), torch.arange(8) % 4).backward()
    optimizer.step()
    after = model.backbone.state_dict()
    last = f"encoder.stages.{len(model.backbone.encoder.stages) - 1}."
    assert all(torch.equal(after[name], before[name]) for name in before if not name.startswith(last))
    assert any(not torch.equal(after[name], before[name]) for name in before if name.startswith(last))


def test_the_head_only_start_is_scikit_learns_logistic_regression_on_the_frozen_features(tmp_path):
    """E14 (head only) starts its head by the convex fit on the frozen features; scikit-learn's
    LogisticRegression, fitted here on the pooled features computed here, with the C it chose, gives the same
    losses on every split (epoch 0 of the history, the model as built)."""
    from clip_adapt.data import load_data
    run_script("E14_resnet18.py", "--smoke", "--quiet", "--epochs", 1, "--noise-levels", 0, "--output-dir",
               tmp_path, expect_exit=0)
    metrics = json.loads((tmp_path / "E14_resnet18" / "metrics.json").read_text())
    history = list(csv.DictReader((tmp_path / "E14_resnet18" / "history.csv").read_text().splitlines()))
    start = next(row for row in history if int(row["epoch"]) == 0)
    c = metrics["head_start"]["probe_l2_c"]
    backbone, processor, _ = load_resnet(TINY_RESNET)
    data = load_data(str(SAMPLE_DATA), processor, 0.15, 0)
    with torch.no_grad():
        features = {name: backbone(pixel_values=split.model_inputs()).pooler_output.flatten(1).numpy()
                    for name, split in data.splits().items()}
    labels = {name: split.labels.numpy() for name, split in data.splits().items()}
    shift, scale = features["train"].mean(0), np.maximum(features["train"].std(0), 1e-6)
    fit = LogisticRegression(C=c, max_iter=1000).fit((features["train"] - shift) / scale, labels["train"])
    for name in ("train", "val", "test"):
        probabilities = fit.predict_proba((features[name] - shift) / scale)
        assert float(start[f"{name}_loss"]) == pytest.approx(log_loss(labels[name], probabilities, labels=range(4)),
                                                             abs=1e-4), name
        assert float(start[f"{name}_accuracy"]) == pytest.approx((probabilities.argmax(1) == labels[name]).mean())
    assert metrics["trainable_params"] == 16 * 4 + 4 and metrics["model"] == TINY_RESNET
    assert metrics["weights"] == "random" and metrics["backbone"] == "resnet"


def test_clips_flags_are_kept_from_a_script_with_its_own_backbone():
    argv = ["--smoke", "--model", "tiny-random-clip", "--templates=study", "--epochs", "2", "--image-processor", "pil"]
    assert without_clip_flags(argv) == (["--smoke", "--epochs", "2"], ["--model", "--templates", "--image-processor"])
    scripts = {script.short_name: script for script in experiment_scripts()}
    assert scripts["E14"].backbone == "resnet" and scripts["E1"].takes_clip
    assert scripts["E14"].forwarded(argv) == ["--smoke", "--epochs", "2"] and scripts["E1"].forwarded(argv) == argv
    note = clip_only_note([scripts["E1"], scripts["E14"]], argv)
    assert note.startswith("note: E14 brings its own backbone") and "--model, --templates" in note
    assert clip_only_note([scripts["E1"]], argv) is None and clip_only_note([scripts["E14"]], ["--smoke"]) is None


def test_e14_refuses_clips_flags_in_one_line(tmp_path, capsys):
    run_script("E14_resnet18.py", "--smoke", "--templates", "study", "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err
    assert err.startswith("error: --templates is CLIP's") and len(err.strip().splitlines()) == 1
    run_script("E14_resnet18.py", "--smoke", "--model", "tiny-random-clip", "--output-dir", tmp_path, expect_exit=2)
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "E14_resnet18" / "metrics.json").exists()


def test_run_all_passes_clips_model_to_the_clip_scripts_only(tmp_path, capsys):
    run_script("run_all_experiments.py", "--smoke", "--quiet", "--noise-levels", 0, "--experiments", "E1", "E14",
               "--model", "tiny-random-clip", "--output-dir", tmp_path, expect_exit=0)
    out = capsys.readouterr().out
    assert "note: E14 brings its own backbone: --model (CLIP's) passed to the CLIP scripts only" in out
    models = {name: json.loads((tmp_path / name / "metrics.json").read_text())["model"]
              for name in ("E1_zero_shot_clip", "E14_resnet18")}
    assert models == {"E1_zero_shot_clip": "tiny-random-clip", "E14_resnet18": TINY_RESNET}
    summary = (tmp_path / "summary.md").read_text()
    assert "| E14_resnet18 |" in summary and "E14_resnet18" in (tmp_path / "report.html").read_text()


def test_a_local_resnet_folder_loads_as_its_backbone_and_a_clip_folder_is_refused(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    from clip_adapt.models import UserError, fingerprint
    from clip_adapt.resnet import RESNET_ARCHITECTURES, resnet_image_processor
    from tools.bench_models import image_size_of, is_resnet
    saved = ResNetForImageClassification(ResNetConfig(**RESNET_ARCHITECTURES["resnet-tiny"], num_labels=1000))
    saved.save_pretrained(tmp_path / "resnet")
    resnet_image_processor(32).save_pretrained(tmp_path / "resnet")
    backbone, processor, tokenizer = load_resnet(str(tmp_path / "resnet"))
    assert fingerprint(backbone) == fingerprint(saved.resnet) and tokenizer is None and image_size_of(processor) == 32
    assert is_resnet(str(tmp_path / "resnet")) and is_resnet("random:resnet-18") and not is_resnet("random:vit-b32")
    from clip_adapt.models import tiny_clip
    clip, clip_processor, _ = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(UserError, match="holds a 'clip' model, not a ResNet"):
        load_resnet(str(tmp_path / "clip"))
