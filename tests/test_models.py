"""The classifiers: reference numbers, parameter counts, frozen weights, where gradients go, prompt placement."""

import copy
import inspect
import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SAMPLE_DATA, noise_image, run_process, tiny_batch
from transformers import CLIPModel

from clip_adapt import models
from clip_adapt.base import UserError
from clip_adapt.data import Split
from clip_adapt.models import (TINY_CLIP, ImageClassifier, PromptedCLIP, ZeroShot, count_params, load_clip,
                               normalized_image_embeddings, tiny_tokenizer, vit_b16_config, weights_of)
from clip_adapt.runner import classification_scripts
from clip_adapt.training import TrainConfig, predict, train

CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]


def splits_of(pixels: torch.Tensor, labels: torch.Tensor):
    split = Split(pixels, labels, [f"img{i}" for i in range(len(labels))])
    return split, split, split


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(epochs=2, patience=5, batch_size=4, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                  device=torch.device("cpu"), checkpoint_dir=tmp_path / "checkpoint", augment=True)
    return TrainConfig(**{**values, **overrides})


def clip_state(clip):
    return {k: v.clone() for k, v in clip.state_dict().items()}


def assert_unchanged(before: dict, clip):
    after = clip.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"


def gradients_after_one_step(model, pixels, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(pixels), labels).backward()
    return {name: p.grad for name, p in model.named_parameters()}


# --------------------------------------------------------------------------- E1

def test_zero_shot_logits_equal_transformers_clip(clip_parts, tiny_clip_dir):
    clip, image_processor, tokenizer = clip_parts
    pixels = tiny_batch(image_processor, 6)
    template = "a brain MRI scan showing {}."
    ours = ZeroShot(clip, tokenizer, CLASS_NAMES, templates=(template,))(pixels)

    reference = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = tokenizer([template.format(c) for c in CLASS_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(pixel_values=pixels, **tokens).logits_per_image
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-5)


def test_zero_shot_ensemble_averages_unit_text_embeddings(clip_parts):
    clip, _, tokenizer = clip_parts
    templates = ("a brain MRI scan showing {}.", "an MRI of {}.")
    model = ZeroShot(clip, tokenizer, CLASS_NAMES, templates)
    singles = [ZeroShot(clip, tokenizer, CLASS_NAMES, (t,)).class_embeddings for t in templates]
    torch.testing.assert_close(model.class_embeddings, F.normalize(singles[0] + singles[1], dim=-1))
    assert count_params(model)[0] == 0


# --------------------------------------------------------------------------- parameter counts

def fixture_dims(clip):
    v, t = clip.config.vision_config, clip.config.text_config
    return v.hidden_size, v.num_hidden_layers, clip.config.projection_dim, t.hidden_size


@pytest.mark.parametrize("num_prompts", [1, 3])
def test_parameter_counts_match_formulas_for_fixture(clip_parts, num_prompts):
    clip, _, tokenizer = clip_parts
    width, layers, projection, text_width = fixture_dims(clip)
    head = projection * 4 + 4
    vision_total = count_params(ImageClassifier(copy.deepcopy(clip), 4, train_backbone=True))[1] - head
    expected = {
        "E2": (ImageClassifier(copy.deepcopy(clip), 4), head),
        "E3": (ImageClassifier(copy.deepcopy(clip), 4, num_prompts=num_prompts), head + width * num_prompts),
        "E4": (ImageClassifier(copy.deepcopy(clip), 4, num_prompts=num_prompts, prompt_layers=range(layers)),
               head + layers * width * num_prompts),
        "E5": (PromptedCLIP(copy.deepcopy(clip), tokenizer, CLASS_NAMES, num_prompts, 5),
               width * num_prompts + text_width * 5),
        "E6": (ImageClassifier(copy.deepcopy(clip), 4, train_backbone=True), vision_total + head),
    }
    for name, (model, trainable) in expected.items():
        assert count_params(model)[0] == trainable, name
    assert vision_total == sum(p.numel() for p in clip.vision_model.parameters()) + projection * width


def test_parameter_counts_for_vit_b16_on_meta_device():
    with torch.device("meta"):
        clip = CLIPModel(vit_b16_config())
    tokenizer = tiny_tokenizer()   # only its ids are used; counting needs no real vocabulary
    assert count_params(ImageClassifier(copy.deepcopy(clip), 4))[0] == 2_052
    assert count_params(ImageClassifier(copy.deepcopy(clip), 4, num_prompts=1))[0] == 2_820
    assert count_params(ImageClassifier(copy.deepcopy(clip), 4, num_prompts=1, prompt_layers=range(12)))[0] == 11_268
    assert count_params(PromptedCLIP(copy.deepcopy(clip), tokenizer, CLASS_NAMES, 1, 4))[0] == 768 + 4 * 512
    full = ImageClassifier(copy.deepcopy(clip), 4, train_backbone=True)
    assert count_params(full) == (86_194_692, 86_194_692)   # no text tower, trained or counted


def readme_trainable_counts() -> dict[str, int]:
    """The README's methods table: script name -> its trainable parameters (the cell's last bold number)."""
    counts = {}
    for line in (REPO / "README.md").read_text().splitlines():
        row = re.match(r"\| `(E\d+_\w+)\.py` \|.*\| (.*) \|$", line)
        if row:
            bold = re.findall(r"\*\*([\d,]+)\*\*", row.group(2))
            counts[row.group(1)] = int((bold[-1] if bold else row.group(2)).replace(",", ""))
    return counts


def test_random_vit_b16_counts_what_the_readme_says_through_every_script():
    """--model random:vit-b16 builds the published architecture: each script's build_model, with its default
    flags, trains exactly the README's count (E6: 86,194,692, as with the real checkpoint). On the meta device,
    with eager attention (SDPA's mask reads a value back, which a meta tensor cannot give)."""
    clip, _, tokenizer = load_clip("random:vit-b16", device="meta")
    clip.set_attn_implementation("eager")
    counted = {script.name: count_params(script.build_model(copy.deepcopy(clip), tokenizer, CLASS_NAMES))[0]
               for script in classification_scripts() if script.takes_clip}   # E8's counts: tests/test_captioning.py
    for script in classification_scripts():   # a backbone of its own (E14's ResNet-18): at its full size
        if not script.takes_clip:
            backbone = script.load_backbone(script.default_args("--model", "random:resnet-18"))[0]
            counted[script.name] = count_params(script.build_model(backbone, None, CLASS_NAMES))[0]
    assert counted == {name: count for name, count in readme_trainable_counts().items() if not name.startswith("E8")}
    assert counted["E6_full_finetune"] == 86_194_692


@pytest.mark.parametrize("architecture", ["vit-b16", "vit-l14-336"])
def test_random_clip_has_a_tokenizer_that_fits_its_vocabulary_and_clips_preprocessing(architecture):
    clip, image_processor, tokenizer = load_clip(f"random:{architecture}", device="meta")
    text, vision = clip.config.text_config, clip.config.vision_config
    assert len(tokenizer) == text.vocab_size == 49_408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (text.bos_token_id, text.eos_token_id) == (49406, 49407)
    tokens = tokenizer(["a brain MRI scan showing glioma.", "no tumor"], padding=True, return_tensors="pt")
    assert tokens.input_ids.max() < text.vocab_size and (tokens.input_ids[:, 0] == text.bos_token_id).all()
    # CLIP's text tower pools at the first end-of-text token: it must be each text's last real token.
    first_eos = (tokens.input_ids == text.eos_token_id).int().argmax(-1)
    assert first_eos.tolist() == (tokens.attention_mask.sum(-1) - 1).tolist()
    pixels = image_processor([noise_image(0, size=(300, 260))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, vision.image_size, vision.image_size)
    assert tuple(image_processor.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert weights_of(f"random:{architecture}") == weights_of(TINY_CLIP) == "random"
    assert weights_of("openai/clip-vit-base-patch16") == "pretrained"


def test_random_weights_are_drawn_on_the_cpu_from_their_own_seed(monkeypatch):
    """random:<architecture> on a CPU (torch.random.fork_rng once asked for a torch.cpu.get_rng_state that does not
    exist): the same weights every time, and the caller's random state untouched. A small architecture stands in
    for the published ones here; E1 with random:vit-b32 runs end to end in the slow tier."""
    monkeypatch.setitem(models.CLIP_ARCHITECTURES, "vit-tiny", (32, 1, 2, 16, 32, 32, 2, 16))
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first = load_clip("random:vit-tiny", device="cpu")[0]
    assert torch.equal(torch.rand(1), expected_next)
    second = load_clip("random:vit-tiny", device=torch.device("cpu"))[0]
    assert models.fingerprint(first) == models.fingerprint(second)


@pytest.mark.slow   # ViT-B/32's 151M random weights and the sample's preprocessing at 224 px on a CPU: about 30 s
def test_e1_runs_end_to_end_on_a_random_vit_b32_on_the_cpu(tmp_path):
    result = run_process("E1_zero_shot_clip.py", "--model", "random:vit-b32", "--data", SAMPLE_DATA, "--device",
                         "cpu", "--output-dir", tmp_path, "--quiet", "--noise-levels", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "E1_zero_shot_clip" / "metrics.json").read_text())
    assert metrics["weights"] == "random" and metrics["model_dims"]["vision_hidden"] == 768
    assert set(metrics["model_weights"]) == {"weights_fingerprint"}


def test_unknown_random_architecture_is_named():
    with pytest.raises(UserError, match="choose one of random:vit-b32, random:vit-b16"):
        load_clip("random:vit-h14")


# --------------------------------------------------------------------------- frozen weights and gradients

@pytest.mark.parametrize("kind", ["E2", "E3", "E4", "E5"])
def test_frozen_clip_is_bit_identical_and_only_prompts_and_head_get_gradients(clip_parts, tmp_path, kind):
    clip, image_processor, tokenizer = clip_parts
    clip.config.vision_config.attention_dropout = 0.0
    before = clip_state(clip)
    layers = clip.config.vision_config.num_hidden_layers
    model = {"E2": lambda: ImageClassifier(clip, 4),
             "E3": lambda: ImageClassifier(clip, 4, num_prompts=2),
             "E4": lambda: ImageClassifier(clip, 4, num_prompts=2, prompt_layers=range(layers)),
             "E5": lambda: PromptedCLIP(clip, tokenizer, CLASS_NAMES, 2, 3)}[kind]()
    pixels, labels = tiny_batch(image_processor, 8), torch.arange(8) % 4

    grads = gradients_after_one_step(model, pixels, labels)
    trainable = {"E2": {"head.weight", "head.bias"},
                 "E3": {"head.weight", "head.bias", "prompts.prompts"},
                 "E4": {"head.weight", "head.bias", "prompts.prompts"},
                 "E5": {"visual_prompts.prompts", "text_context.context"}}[kind]
    assert {n for n, g in grads.items() if g is not None} == trainable
    assert all(grads[n].abs().sum() > 0 for n in trainable)
    assert not any(m.training for name, m in model.named_modules() if name.startswith(("vision", "clip")))

    train(model, *splits_of(pixels, labels), config(tmp_path))
    assert_unchanged(before, clip)


def test_full_finetune_trains_every_vision_weight_and_leaves_text_tower_alone(clip_parts):
    clip, image_processor, _ = clip_parts
    text_before = {k: v.clone() for k, v in clip.text_model.state_dict().items()}
    model = ImageClassifier(clip, 4, train_backbone=True)
    grads = gradients_after_one_step(model, tiny_batch(image_processor, 8), torch.arange(8) % 4)
    missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert not any("text" in name for name, _ in model.named_parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.equal(text_before[k], v) for k, v in clip.text_model.state_dict().items())
    assert all(p.grad is None for p in clip.text_model.parameters())


# --------------------------------------------------------------------------- prompt placement

def test_zero_prompts_give_exactly_the_frozen_embeddings(clip_parts):
    clip, image_processor, tokenizer = clip_parts
    pixels = tiny_batch(image_processor)
    with torch.no_grad():
        plain_image = clip.get_image_features(pixel_values=pixels).pooler_output
        plain_text = clip.get_text_features(**tokenizer(CLASS_NAMES, padding=True, return_tensors="pt")).pooler_output
        layers = range(clip.config.vision_config.num_hidden_layers)
        prompted = ImageClassifier(copy.deepcopy(clip), 4)
        from clip_adapt.prompts import VisualPrompts
        VisualPrompts(prompted.backbone, 0, layers)
        # Through the hooks' concatenations, another path: equal to float rounding (bit for bit on one CPU only).
        torch.testing.assert_close(prompted.embed(pixels), plain_image, rtol=1e-6, atol=1e-6)
        e5 = PromptedCLIP(clip, tokenizer, CLASS_NAMES, num_prompts=0, num_text_prompts=2)
        torch.testing.assert_close(clip.get_image_features(pixel_values=pixels).pooler_output, plain_image,
                                   rtol=1e-6, atol=1e-6)
        # Outside E5's own forward, the text tower is CLIP's own.
        assert torch.equal(clip.get_text_features(**tokenizer(CLASS_NAMES, padding=True, return_tensors="pt"))
                           .pooler_output, plain_text)
        assert e5.class_embeddings().shape == (4, clip.config.projection_dim)


def record_layer_inputs(vision_model) -> list:
    seen = []
    for layer in vision_model.encoder.layers:   # registered after the prompt hooks, so they see what the layer sees
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("num_prompts, layers", [(1, [0]), (3, [0]), (2, [0, 1, 2]), (2, [1, 2])])
def test_each_encoder_layer_sees_the_expected_sequence(clip_parts, num_prompts, layers):
    clip, image_processor, _ = clip_parts
    model = ImageClassifier(clip, 4, num_prompts=num_prompts, prompt_layers=layers, entry="post-ln")
    seen = record_layer_inputs(model.vision)
    with torch.no_grad():
        model(tiny_batch(image_processor, 2))
    patches = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2
    first = min(layers)
    expected = [1 + patches + (num_prompts if i >= first else 0) for i in range(len(seen))]
    assert [s.shape[1] for s in seen] == expected
    # Each prompted layer reads its own prompts verbatim right after the class token (after the pre-layernorm).
    for position, index in enumerate(sorted(layers)):
        prompts = model.prompts.prompts[position]
        assert torch.equal(seen[index][:, 1:1 + num_prompts], prompts.expand(2, -1, -1))


def test_prompt_dropout_is_active_only_in_training(clip_parts):
    clip, image_processor, _ = clip_parts
    model = ImageClassifier(clip, 4, num_prompts=4, prompt_dropout=0.5)
    pixels = tiny_batch(image_processor, 2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels), model(pixels))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(pixels), model(pixels))


# --------------------------------------------------------------------------- E5

def test_class_name_shapes_its_text_embedding(clip_parts):
    clip, _, tokenizer = clip_parts
    model = PromptedCLIP(clip, tokenizer, CLASS_NAMES, 1, 4)
    renamed = PromptedCLIP(copy.deepcopy(clip), tokenizer, ["glioma", "meningioma", "healthy brain", "pituitary"], 1, 4)
    renamed.text_context.context.data.copy_(model.text_context.context.data)
    with torch.no_grad():
        a, b = model.class_embeddings(), renamed.class_embeddings()
    assert not torch.allclose(a[2], b[2])
    torch.testing.assert_close(a[[0, 1, 3]], b[[0, 1, 3]])


def test_learned_context_changes_text_embeddings_and_gets_gradients(clip_parts):
    clip, image_processor, tokenizer = clip_parts
    model = PromptedCLIP(clip, tokenizer, CLASS_NAMES, 1, 4)
    with torch.no_grad():
        before = model.class_embeddings()
        model.text_context.context.add_(1.0)
        assert not torch.allclose(before, model.class_embeddings())
    grads = gradients_after_one_step(model, tiny_batch(image_processor, 4), torch.arange(4))
    assert grads["text_context.context"].abs().sum() > 0


def test_e5_predictions_never_see_labels(clip_parts, tmp_path):
    clip, image_processor, tokenizer = clip_parts
    assert list(inspect.signature(PromptedCLIP.forward).parameters) == ["self", "pixels"]
    assert "labels" not in inspect.signature(predict).parameters
    pixels, labels = tiny_batch(image_processor, 8), torch.arange(8) % 4
    train_split = Split(pixels, labels, [])
    # Train twice, alike but for the test labels (the answer sheet): they must change nothing.
    runs = []
    for name, test_labels in (("a", labels), ("b", torch.tensor([3, 3, 0, 1, 2, 2, 0, 1]))):
        torch.manual_seed(0)
        model = PromptedCLIP(copy.deepcopy(clip), tokenizer, CLASS_NAMES, 1, 4)
        result = train(model, train_split, train_split, Split(pixels, test_labels, []), config(tmp_path / name))
        runs.append((predict(model, pixels, 3, torch.device("cpu")), [r["val_loss"] for r in result.history]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    # Nor do other images of the batch: each prediction alone equals the batched one.
    alone = torch.cat([predict(model, pixels[i:i + 1], 1, torch.device("cpu")) for i in range(8)])
    torch.testing.assert_close(alone, runs[1][0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- E2 cache

def test_cached_embeddings_train_the_same_head_as_running_the_tower(clip_parts, tmp_path):
    from clip_adapt.training import cached_embeddings
    clip, image_processor, _ = clip_parts
    pixels = torch.cat([tiny_batch(image_processor, 8), image_processor(
        [noise_image(200 + i, mode="L").convert("RGB") for i in range(8)], return_tensors="pt")["pixel_values"]])
    labels = torch.arange(16) % 4
    settings = dict(epochs=4, augment=False)

    torch.manual_seed(0)
    every_epoch = ImageClassifier(copy.deepcopy(clip), 4)
    train(every_epoch, *splits_of(pixels, labels), config(tmp_path / "a", **settings))

    torch.manual_seed(0)
    cached = ImageClassifier(clip, 4)
    split = Split(pixels, labels, [])
    embeddings = cached_embeddings(cached.embed, {"train": split}, tmp_path / "cache", "key", 5, torch.device("cpu"))
    train(cached.head, embeddings["train"], embeddings["train"], embeddings["train"], config(tmp_path / "b", **settings))

    torch.testing.assert_close(cached.head.weight, every_epoch.head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached.head.bias, every_epoch.head.bias, rtol=1e-4, atol=1e-5)
    # A second call reads the file instead of running the tower.
    again = cached_embeddings(None, {"train": split}, tmp_path / "cache", "key", 5, torch.device("cpu"))
    assert torch.equal(again["train"].inputs, embeddings["train"].inputs)


# --------------------------------------------------------------------------- precision and prompt dropout

@pytest.mark.parametrize("kind", ["E1", "E3", "E5"])
def test_bf16_autocast_logits_are_computed_in_fp32(clip_parts, kind):
    """Under bf16 autocast, similarities at CLIP's logit scale of 100 and the heads would round to bf16 steps
    (0.125 at 16–32), tying classes; the logits must come out in fp32, equal to an fp32 matmul of the same
    embeddings."""
    clip, image_processor, tokenizer = clip_parts
    model = {"E1": lambda: ZeroShot(clip, tokenizer, CLASS_NAMES),
             "E3": lambda: ImageClassifier(clip, 4, num_prompts=1),
             "E5": lambda: PromptedCLIP(clip, tokenizer, CLASS_NAMES, 1, 2)}[kind]().eval()
    if kind == "E3":
        with torch.no_grad():
            model.head.weight.mul_(300)   # logits of tens, where bf16's steps are coarse
    pixels = tiny_batch(image_processor, 6)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixels)
            if kind == "E3":
                features = model.embed(pixels).float()
            else:
                features = normalized_image_embeddings(clip, pixels)
                text = model.class_embeddings if kind == "E1" else model.class_embeddings()
        # The reference: the same bf16-tower features, the last step in fp32.
        expected = (features @ model.head.weight.T + model.head.bias if kind == "E3"
                    else clip.logit_scale.exp() * features @ text.float().T)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected.float(), rtol=1e-5, atol=1e-4)


def test_prompt_dropout_draws_a_mask_per_image(clip_parts):
    clip, image_processor, _ = clip_parts
    model = ImageClassifier(clip, 4, num_prompts=8, prompt_dropout=0.5).train()
    pixels = tiny_batch(image_processor, 1).expand(16, -1, -1, -1)   # one image 16 times: only masks differ
    torch.manual_seed(0)
    logits = model(pixels)
    assert len({tuple(row.tolist()) for row in logits.detach()}) > 1


@pytest.mark.parametrize("layers", [[0], [0, 1, 2]])
def test_removed_prompts_leave_exactly_the_frozen_tower_and_come_back(clip_parts, layers):
    """Removed, not zeroed: a zero prompt still takes part in attention; a removed one is not there at all."""
    clip, image_processor, _ = clip_parts
    pixels = tiny_batch(image_processor)
    with torch.no_grad():
        plain = clip.get_image_features(pixel_values=pixels).pooler_output
        model = ImageClassifier(clip, 4, num_prompts=2, prompt_layers=layers).eval()
        model.prompts.prompts.zero_()
        zeroed = model.embed(pixels)
        with model.prompts.removed():
            torch.testing.assert_close(model.embed(pixels), plain, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(zeroed, plain, atol=1e-4)
        assert torch.equal(model.embed(pixels), zeroed)   # back after the context: same path, same inputs


def test_a_disabled_adapter_leaves_the_frozen_tower(clip_parts):
    from clip_adapt.adapters import AdapterClassifier
    clip, image_processor, _ = clip_parts
    pixels = tiny_batch(image_processor)
    with torch.no_grad():
        plain = clip.get_image_features(pixel_values=pixels).pooler_output
        model = AdapterClassifier(clip, 4).eval()
        for name, p in model.vision.named_parameters():
            if "lora_B" in name:
                p.normal_()   # peft starts B at zero: make the adapter change something
        assert not torch.allclose(model.embed(pixels), plain, atol=1e-4)
        with model.disabled():
            torch.testing.assert_close(model.embed(pixels), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["E3_shallow_vpt", "E4_deep_vpt", "E7_lora"])
def test_with_the_frozen_clip_head_only_the_prompts_or_adapter_train(clip_parts, name):
    from clip_adapt.models import TextHead
    from clip_adapt.runner import experiment_scripts
    clip, _, tokenizer = clip_parts
    script = next(s for s in experiment_scripts() if s.name == name)
    model = script.build_model(clip, tokenizer, list(CLASS_NAMES), script.default_args("--smoke", "--head", "clip"))
    assert isinstance(model.head, TextHead) and not list(model.head.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("prompts" in n or "lora_" in n for n in trainable), trainable


def test_exact_fp32_turns_autocast_and_tf32_off_inside_and_restores_them(monkeypatch):
    """The fp32 heads' guard (Fp32Linear, TextHead, similarity_logits): no autocast and no TF32 inside, the
    run's settings back afterwards. On a GPU, tests/test_cuda.py checks the heads' error with TF32 on."""
    from clip_adapt.models import exact_fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with exact_fp32("cpu"):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
    assert seen == [(False, False), (True, True)]


def test_metrics_name_the_weights_by_hub_revision_or_by_their_fingerprint(clip_parts, tiny_clip_dir, monkeypatch):
    """A hub model by the commit of the snapshot loaded; a local directory or random weights by a hash of the
    weights themselves, which changes with any weight."""
    from clip_adapt.models import weights_identity
    clip = clip_parts[0]
    monkeypatch.setattr(clip.config, "_commit_hash", "0123abcd" * 5, raising=False)
    assert weights_identity("openai/clip-vit-base-patch16", clip) == {"revision": "0123abcd" * 5}
    local = weights_identity(str(tiny_clip_dir), clip)
    assert set(local) == {"weights_fingerprint"} and weights_identity(TINY_CLIP, clip) == local
    with torch.no_grad():
        clip.visual_projection.weight[0, 0] += 1
    assert weights_identity(str(tiny_clip_dir), clip) != local


def test_the_code_version_is_the_commit_and_whether_the_checkout_is_dirty(tmp_path):
    import subprocess
    from clip_adapt.reporting import code_version
    assert code_version(tmp_path) == {"commit": None, "dirty": None}   # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}
