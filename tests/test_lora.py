"""E7: peft adapters in the vision tower — the count, where gradients go, frozen weights, peft's save format."""

import json

import pytest
import torch
from conftest import run_script, tiny_batch
from peft import PeftModel
from test_scripts import assert_complete_outputs
from transformers import CLIPModel

from clip_adapt import models
from clip_adapt.adapters import VISION_LINEAR_LAYERS, AdapterClassifier, peft_config, peft_warnings_silenced
from clip_adapt.data import Split
from clip_adapt.models import count_params, vit_b16_config
from clip_adapt.training import TrainConfig, predict, train

CPU = torch.device("cpu")


def vit_b16_count(adapter: str, **kwargs) -> int:
    with torch.device("meta"):   # the real architecture without allocating its weights
        return count_params(AdapterClassifier(CLIPModel(vit_b16_config()), 4, peft_config(adapter, **kwargs)))[0]


def test_trainable_count_on_vit_b16_follows_the_formula():
    assert vit_b16_count("lora") == 12 * 2 * 8 * (768 + 768) + 2_052 == 296_964
    assert vit_b16_count("lora", rank=4, targets=["q_proj", "k_proj", "v_proj", "fc1"]) \
        == 12 * 4 * ((768 + 768) * 3 + (768 + 3072)) + 2_052
    # The other peft adapters on the same layers (LoHa: two low-rank pairs; LoKr: a Kronecker factor 24x24
    # and a rank-8 one 32x32; IA3: one scale per feature of k, v and fc2's input).
    assert vit_b16_count("loha") == 2 * 294_912 + 2_052 == 591_876
    assert vit_b16_count("lokr") == 12 * 2 * (24 * 24 + 2 * 8 * 32) + 2_052 == 28_164
    assert vit_b16_count("ia3") == 12 * (768 + 768 + 3072) + 2_052 == 57_348


def test_target_modules_reach_the_vision_encoder_only():
    clip = models.tiny_clip()[0]
    AdapterClassifier(clip, 4, peft_config("lora", targets=["q_proj", "v_proj", "fc2"]))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in clip.named_parameters() if ".lora_A." in name}
    layers = clip.config.vision_config.num_hidden_layers
    assert adapted == {f"vision_model.encoder.layers.{i}.{part}" for i in range(layers)
                       for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc2")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP with LoRA on every linear layer, trained for a few epochs, with its weights from before."""
    clip, image_processor, _ = models.tiny_clip()
    before = {name: p.detach().clone() for name, p in clip.named_parameters()}
    pixels, labels = tiny_batch(image_processor, 12), torch.arange(12) % 4
    torch.manual_seed(0)
    model = AdapterClassifier(clip, 4, peft_config("lora", targets=list(VISION_LINEAR_LAYERS)))
    split = Split(pixels, labels, [])
    folder = tmp_path_factory.mktemp("lora")
    train(model, split, split, split, TrainConfig(epochs=3, patience=3, batch_size=4, lr=1e-2, weight_decay=0.0,
                                                  warmup_epochs=0, seed=0, device=CPU, checkpoint_dir=folder / "ckpt"))
    model.save_adapter(folder / "adapter")
    return clip, model, before, pixels, folder


def test_gradients_reach_only_the_adapters_and_the_head(trained):
    clip, model, _, pixels, _ = trained
    model.train()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(pixels), torch.arange(12) % 4).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in with_grad)
    assert all(p.grad is None for p in clip.text_model.parameters())


def test_base_weights_and_text_tower_are_bit_identical_after_training(trained):
    clip, model, before, _, _ = trained
    after = {name.replace(".base_layer", ""): p for name, p in clip.named_parameters()
             if ".lora_" not in name}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert any(p.abs().sum() > 0 for name, p in clip.named_parameters() if ".lora_B." in name)   # it did train


def test_frozen_layers_stay_in_eval_mode_while_adapter_dropout_trains(trained):
    _, model, _, _, _ = trained
    model.train()
    dropouts = [m for name, m in model.vision.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts)
    assert not model.vision.training and not model.vision.encoder.layers[0].self_attn.training
    assert not model.vision.encoder.layers[0].self_attn.q_proj.base_layer.training
    model.eval()
    assert not any(m.training for m in dropouts)


def test_saved_adapter_reloads_with_peft_to_the_same_predictions(trained):
    _, model, _, pixels, folder = trained
    expected = predict(model.eval(), pixels, 5, CPU)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    base = models.tiny_clip()[0]
    plain = AdapterClassifier(models.tiny_clip()[0], 4, adapter_dir=folder / "adapter")
    plain.peft_model.unload()   # the same head without the adapter: it must change the predictions
    assert not torch.allclose(predict(plain, pixels, 5, CPU), expected)

    with peft_warnings_silenced():   # peft's own deprecated question to transformers (adapters.py)
        peft_model = PeftModel.from_pretrained(base, folder / "adapter")   # what a user of peft does
    head = AdapterClassifier(models.tiny_clip()[0], 4, adapter_dir=folder / "adapter").head
    with torch.no_grad():
        features = peft_model.get_image_features(pixel_values=pixels).pooler_output
        # One batch here, batches of 5 in predict: float sums in another order, equal to rounding only.
        torch.testing.assert_close(head(features), expected, rtol=1e-6, atol=1e-6)
    reloaded = AdapterClassifier(models.tiny_clip()[0], 4, adapter_dir=folder / "adapter")
    assert torch.equal(predict(reloaded, pixels, 5, CPU), expected)
    assert count_params(reloaded)[0] == 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e7")
    run_script("E7_lora.py", "--smoke", "--save-merged", "--output-dir", out, expect_exit=0)
    return out / "E7_lora"


def test_smoke_writes_every_output_the_adapter_and_merged_weights(smoke_run):
    metrics = assert_complete_outputs(smoke_run, trained=True)
    assert metrics["adapter"] == "lora" and metrics["rank"] == 8 and metrics["target_modules"] == ["q_proj", "v_proj"]
    tiny = models.tiny_clip()[0].config
    head = tiny.projection_dim * 4 + 4
    assert metrics["trainable_params"] == tiny.vision_config.num_hidden_layers * 2 * 8 * 2 * 32 + head
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= \
        {p.name for p in (smoke_run / "adapter").iterdir()}

    # The merged CLIP and the adapter on the base compute the same thing, and the merged one loads as --model.
    merged, _, _ = models.load_clip(str(smoke_run / "merged"))
    adapted = AdapterClassifier(models.tiny_clip()[0], 4, adapter_dir=smoke_run / "adapter")
    pixels = tiny_batch(models.tiny_clip()[1], 4)
    with torch.no_grad():
        torch.testing.assert_close(adapted.head(merged.get_image_features(pixel_values=pixels).pooler_output),
                                   adapted(pixels), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter", ["loha", "lokr", "ia3"])
def test_each_adapter_kind_runs(adapter, tmp_path):
    run_script("E7_lora.py", "--smoke", "--adapter", adapter, "--epochs", 1, "--output-dir", tmp_path, expect_exit=0)
    metrics = json.loads((tmp_path / "E7_lora" / "metrics.json").read_text())
    assert metrics["adapter"] == adapter and metrics["trainable_params"] > 4 * 16 + 4
    config = json.loads((tmp_path / "E7_lora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter.upper()


def test_resumed_run_equals_an_uninterrupted_one(smoke_run, tmp_path):
    run_script("E7_lora.py", "--smoke", "--stop-after-epochs", 1, "--output-dir", tmp_path)
    assert not (tmp_path / "E7_lora" / "adapter").exists()
    # Saving merged weights changes no result: a resumed run may ask for it.
    run_script("E7_lora.py", "--smoke", "--resume", "--save-merged", "--output-dir", tmp_path, expect_exit=0)
    assert (tmp_path / "E7_lora" / "merged" / "model.safetensors").exists()
    resumed = json.loads((tmp_path / "E7_lora" / "metrics.json").read_text())
    whole = json.loads((smoke_run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "val_loss", "best_epoch", "epochs_run"):
        assert resumed[key] == whole[key], key


@pytest.mark.parametrize("flags, message", [(["--rank", 0], "--rank must be at least 1"),
                                            (["--lora-dropout", 1], "--lora-dropout must be in [0, 1)")])
def test_bad_adapter_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    run_script("E7_lora.py", "--smoke", *flags, "--output-dir", tmp_path, expect_exit=2)
    assert capsys.readouterr().err.strip() == f"error: {message}"
