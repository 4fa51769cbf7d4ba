"""E9 Tip-Adapter and Tip-Adapter-F (clip_adapt/feature_adapters.py): the reference's numbers, E1 at alpha = 0,
the keys as the part that trains, the script's outputs; and, slow, the known answer."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, run_script, tiny_batch

from clip_adapt.feature_adapters import TipAdapter, TipCache, search_values
from clip_adapt.models import ZERO_SHOT_TEMPLATES, ZeroShot, tiny_clip

SAME = dict(rtol=1e-5, atol=1e-5)


def reference_inputs() -> dict:
    """The fixed inputs the reference ran on: 4 classes in 8 dimensions, 16 training images (unnormalised, as the
    reference's encode_image gives them), 20 validation and 16 test images (unit), a zero-shot classifier that is
    off (unit rows)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)

    def draw(n):
        labels = torch.arange(n) % 4
        return centres[labels] + 1.6 * torch.randn(n, 8, generator=g), labels

    train, train_labels = draw(16)
    val, val_labels = draw(20)
    test, test_labels = draw(16)
    text = centres + 1.5 * torch.randn(4, 8, generator=g)
    return dict(train=train, train_labels=train_labels, val=F.normalize(val, dim=-1), val_labels=val_labels,
                test=F.normalize(test, dim=-1), test_labels=test_labels, text=F.normalize(text, dim=-1))


# gaopengcuhk/Tip-Adapter at d0e2d6f, main.py run_tip_adapter and run_tip_adapter_F with utils.py's
# build_cache_model and search_hp, run unchanged on a CPU in fp32 (numpy 2.2: its cls_acc converts a 1-element
# array to float) on reference_inputs(), search_scale [12, 10], search_step [200, 20], init_beta 1, init_alpha 2;
# -F: lr 0.01, 3 epochs, torch.manual_seed(0), two batches (images 0-6, 7-15). Stubbed: its `clip` and `datasets`
# imports; .cuda() a no-op; the stub CLIP's encode_image returns the features it is given.
REFERENCE_SEARCHED = {"training-free": (0.5760000000000001, 9.504999999999999),
                      "finetuned": (0.5165, 9.01)}   # (beta, alpha)
# The keys the reference's Tip-Adapter-F run kept (its adapter.weight), one row per training image.
REFERENCE_TUNED_KEYS = [
    [-0.61652327, -0.33220667, -0.31428379, 0.00854601, 0.45850435, 0.26473656, 0.22013842, -0.41953978],
    [0.04525382, -0.01818721, -0.03832837, 0.04973203, 0.17751254, 0.81772119, -0.19216925, -0.46358261],
    [-0.56730413, -0.06213033, 0.52705163, 0.25558609, 0.06004540, -0.49634761, 0.11493675, 0.28847152],
    [0.02167885, 0.09980427, 0.31914160, 0.76367241, -0.16002652, -0.06061836, 0.52120423, -0.23236291],
    [-0.34648734, 0.03303957, 0.25788808, 0.28094700, -0.26439983, 0.79243898, -0.18062490, -0.27431449],
    [-0.44998547, -0.45806786, -0.10499697, -0.11940267, -0.31240031, 0.60064662, 0.18005201, 0.22327025],
    [-0.34236327, -0.12623048, -0.16560528, 0.18444228, 0.44108862, -0.48315054, 0.28808537, 0.54831022],
    [0.09559676, 0.69447720, -0.67499620, 0.03479348, -0.08002681, 0.00048018, 0.22286493, 0.08199565],
    [0.25266820, -0.60560286, 0.03603301, 0.08949137, -0.58481717, -0.34584960, -0.10507561, -0.31347764],
    [0.21785676, -0.33388752, 0.22836737, 0.27098215, 0.25408435, -0.05999193, 0.64956748, -0.47314256],
    [-0.25581387, -0.80956435, 0.07286248, 0.11497268, 0.31923962, -0.13881133, -0.27191985, 0.26446635],
    [-0.02626845, -0.21430725, 0.52685285, -0.07080068, 0.26210424, 0.59848684, 0.43125018, 0.25875297],
    [-0.41864574, -0.30667067, -0.26189432, 0.09329137, 0.30561164, 0.24411041, 0.46083209, -0.62115926],
    [0.10800973, -0.50035983, -0.28787708, -0.77324206, -0.00627309, -0.20556743, 0.27283251, 0.07235364],
    [-0.41738242, -0.34255284, 0.22918215, 0.62331802, 0.25294349, -0.21065503, -0.16047674, 0.39311299],
    [0.24954636, -0.37955162, -0.68468398, 0.09594028, 0.03895988, 0.44662052, 0.26516476, -0.03122994],
]
# Test logits at the (beta, alpha) each searched on validation.
REFERENCE_TEST_LOGITS = {"training-free": [
    [81.076881, 61.136532, 39.365372, 90.574799],
    [23.116095, -3.980251, 27.511787, 89.559349],
    [26.355537, 0.543996, 11.372732, -30.831406],
    [23.126413, 2.736958, 24.537899, 77.446747],
    [38.721214, 95.952393, -12.202450, 32.845753],
    [-0.885820, 56.922729, 11.186725, -15.891415],
    [41.063370, 43.954605, 93.002815, -23.067366],
    [50.677299, 44.194893, 10.416489, 66.277000],
    [75.399902, 14.980009, 55.651779, 45.809799],
    [-4.907238, 15.257176, -69.410728, 40.290218],
    [92.495743, -0.937170, 61.532166, 48.065941],
    [0.441309, 84.023315, 55.808655, 20.645462],
    [7.687956, 7.993302, 17.044926, 106.287018],
    [48.114674, 58.099232, 50.270386, 90.001900],
    [41.693169, 30.485100, 53.915619, -11.203873],
    [41.455166, 41.598732, 9.077183, 83.430893],
],
                         "finetuned": [
    [80.874725, 60.665024, 39.408321, 90.076500],
    [23.137516, -4.087456, 27.326048, 89.501831],
    [26.688564, 1.087863, 11.293743, -30.407907],
    [23.170635, 2.749437, 24.788494, 76.997360],
    [38.690308, 95.412621, -11.807428, 32.604572],
    [-0.879217, 56.830971, 11.485196, -15.650526],
    [41.382248, 44.387760, 92.031754, -22.763988],
    [50.527168, 43.730556, 10.778753, 65.700760],
    [75.519638, 15.143457, 55.150814, 46.020203],
    [-4.777185, 15.206912, -68.798836, 40.434608],
    [92.501587, -0.840218, 60.997841, 48.103458],
    [0.666527, 83.899124, 55.786591, 20.381235],
    [7.600460, 7.773986, 17.257954, 105.860794],
    [48.063499, 57.653889, 50.096893, 89.623512],
    [42.040695, 31.038651, 53.786018, -10.989967],
    [41.476265, 41.268459, 9.357756, 83.001671],
]}


def reference_cache(x: dict, trainable_keys: bool = False) -> TipCache:
    cache = TipCache(x["text"], torch.tensor(100.0), trainable_keys)   # the reference's fixed logit scale
    cache.fill(x["train"], x["train_labels"])
    return cache


def test_the_grid_is_the_references():
    assert search_values(12, 200)[:3] == pytest.approx([0.1, 0.1595, 0.219]) and len(search_values(12, 200)) == 200
    assert search_values(10, 20)[-1] == pytest.approx(9.505)


@pytest.mark.parametrize("variant", ["training-free", "finetuned"])
def test_search_and_logits_equal_the_reference(variant):
    """Given the same features (and for -F the reference's trained keys), the project's cache model searches the
    same (beta, alpha) on validation and gives the same test logits, to 1e-5 in fp32."""
    x = reference_inputs()
    cache = reference_cache(x)
    if variant == "finetuned":
        with torch.no_grad():
            cache.keys.copy_(torch.tensor(REFERENCE_TUNED_KEYS))
    chosen = cache.search(x["val"], x["val_labels"], (12, 10), (200, 20))
    assert (chosen["beta"], chosen["alpha"]) == pytest.approx(REFERENCE_SEARCHED[variant], abs=1e-9)
    torch.testing.assert_close(cache(x["test"]), torch.tensor(REFERENCE_TEST_LOGITS[variant]), **SAME)


def test_the_cache_is_the_references():
    """build_cache_model's keys (normalised training features, one augment epoch) are the first variant's."""
    x = reference_inputs()
    cache = reference_cache(x)
    torch.testing.assert_close(cache.keys.norm(dim=-1), torch.ones(16), **SAME)
    assert torch.equal(cache.values, F.one_hot(x["train_labels"], 4).float())


def tip_on_tiny_clip(finetune: bool = False):
    clip, processor, tokenizer = tiny_clip()
    torch.manual_seed(0)
    model = TipAdapter(clip, tokenizer, list(CLASSES), finetune=finetune)
    train = tiny_batch(processor, 8)
    with torch.no_grad():
        model.cache.fill(model.embed(train), torch.arange(8) % 4)
    return model.eval(), clip, tokenizer, processor


def test_alpha_zero_gives_e1s_logits_at_clips_logit_scale():
    model, clip, tokenizer, processor = tip_on_tiny_clip()
    pixels = tiny_batch(processor, 4)
    zero_shot = ZeroShot(clip, tokenizer, list(CLASSES), ZERO_SHOT_TEMPLATES)
    with torch.no_grad():
        model.cache.alpha.fill_(0.0)
        torch.testing.assert_close(model(pixels), zero_shot(pixels), rtol=0, atol=1e-6)
        model.cache.alpha.fill_(2.0)
        assert (model(pixels) - zero_shot(pixels)).abs().max() > 1e-3   # the cache term is there at alpha > 0


def test_training_free_trains_nothing_and_finetune_trains_only_the_keys():
    free = tip_on_tiny_clip()[0]
    assert free.parts() == [] and not any(p.requires_grad for p in free.parameters())
    model, _, _, processor = tip_on_tiny_clip(finetune=True)
    (part,) = model.parts()
    assert list(part.tensors) == ["cache.keys"]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"cache.keys"}
    pixels = tiny_batch(processor, 4)
    frozen = {name: p.clone() for name, p in model.state_dict().items() if not name.startswith("cache.")}
    model.train()
    F.cross_entropy(model(pixels), torch.arange(4)).backward()
    grad = model.cache.keys.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    before = model.eval()(pixels)
    with torch.no_grad():
        model.cache.keys.add_(0.1 * torch.randn_like(model.cache.keys))
    assert (model(pixels) - before).abs().max() > 1e-4
    assert all(torch.equal(p, frozen[name]) for name, p in model.state_dict().items() if name in frozen)
    assert not model.vision.training and not model.projection.training


@pytest.mark.parametrize("flags", [(), ("--finetune",)], ids=["Tip-Adapter", "Tip-Adapter-F"])
def test_script_searches_on_validation_and_records_the_grid(flags, tmp_path):
    run_script("E9_tip_adapter.py", "--smoke", "--quiet", "--noise-levels", 0, "--output-dir", tmp_path, *flags,
               expect_exit=0)
    folder = tmp_path / "E9_tip_adapter"
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "alpha_beta_search.csv") as file:
        grid = list(csv.DictReader(file))
    assert len(grid) == 200 * 20
    best = max(float(row["val_accuracy"]) for row in grid)
    first = next(row for row in grid if float(row["val_accuracy"]) == best)
    assert (metrics["beta"], metrics["alpha"]) == (float(first["beta"]), float(first["alpha"]))
    assert metrics["cache_size"]["images"] == metrics["num_images"]["train"]
    assert metrics["trainable_params"] == (metrics["num_images"]["train"] * 16 if flags else 0)
    assert metrics["val_accuracy"] == pytest.approx(best, abs=1e-4)


# --------------------------------------------------------------------------- CLIP-Adapter (E11)

# gaopengcuhk/CLIP-Adapter at 08d07f8, clip_adapter.py: Adapter(1024, 4) and CustomCLIP.forward, run unchanged on
# a CPU in fp32 on clip_adapter_inputs(), logit_scale 4.6052, the adapter's two weights set to its `down` and `up`.
# Stubbed: dassl and clip (imports only), a CLIP whose image encoder returns the features given and whose
# encode_text returns the fixed text features; its prompts.to('cuda') sent to the CPU.
CLIP_ADAPTER_LOGITS = [
    [2.274461, -2.950812, -3.131284, 2.015481],
    [2.671348, -1.404811, 0.520458, -4.339719],
    [6.043278, 3.460590, 2.779487, 2.835694],
]


def clip_adapter_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(images=torch.randn(3, 1024, generator=g), text=torch.randn(4, 1024, generator=g),
                down=0.05 * torch.randn(256, 1024, generator=g), up=0.05 * torch.randn(1024, 256, generator=g))


def test_clip_adapter_logits_equal_the_reference():
    from clip_adapt.feature_adapters import ResidualAdapter
    x = clip_adapter_inputs()
    adapter = ResidualAdapter(x["text"], torch.tensor(4.6052).exp())
    with torch.no_grad():
        adapter.down.weight.copy_(x["down"])
        adapter.up.weight.copy_(x["up"])
        torch.testing.assert_close(adapter(x["images"]), torch.tensor(CLIP_ADAPTER_LOGITS), **SAME)


def test_clip_adapter_trains_only_its_bottleneck_and_classifies_by_e1s_text():
    from clip_adapt.feature_adapters import CLIPAdapter
    clip, processor, tokenizer = tiny_clip()
    frozen = {name: p.clone() for name, p in clip.state_dict().items()}
    torch.manual_seed(0)
    model = CLIPAdapter(clip, tokenizer, list(CLASSES))
    (part,) = model.parts()
    assert set(part.tensors) == {"adapter.down.weight", "adapter.up.weight"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(part.tensors)
    pixels = tiny_batch(processor, 4)
    model.train()
    F.cross_entropy(model(pixels), torch.arange(4)).backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in part.tensors.values())
    assert all(torch.equal(p, frozen[name]) for name, p in clip.state_dict().items())
    # With the residual ratio at 0 the adapter is out of the mix: E1's logits.
    zero_shot = ZeroShot(clip, tokenizer, list(CLASSES), ZERO_SHOT_TEMPLATES)
    model.eval()
    model.adapter.ratio = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), zero_shot(pixels), rtol=0, atol=1e-5)


def test_clip_adapter_script_trains_on_the_cached_embeddings(tmp_path):
    run_script("E11_clip_adapter.py", "--smoke", "--quiet", "--noise-levels", 0, "--output-dir", tmp_path,
               expect_exit=0)
    metrics = json.loads((tmp_path / "E11_clip_adapter" / "metrics.json").read_text())
    assert metrics["trainable_params"] == 2 * 16 * 4   # the tiny CLIP's 16-wide embedding, reduction 4
    assert metrics["epochs_run"] == 3 and metrics["selection"]["metric"] == "val_loss"


# --------------------------------------------------------------------------- LP++ (E13)

# FereshteShakeri/FewShot-CLIP-Strong-Baseline at f81054f, methods/linear_probe_p2.py LinearProbe_P2.forward (with
# methods/utils.py and methods/method.py), run unchanged on a CPU in fp32 on lp_inputs(), shots 4, train_epoch 300
# (configs/base.yaml), torch.manual_seed(0) before it (its nn.Linear's bias), the training features in two batches
# (images 0-6, 7-15), text_weights the unit text rows transposed. Shims outside its code: .cuda() a no-op; a stub
# CLIP (dtype fp32) whose encode_image returns the features given; its get_one_hot's fp16 one-hots, which bmm
# cannot mix with fp32 features, replaced by the same 0/1 values in fp32; the forward's locals read at its return.
# A second run with train_epoch 25 (its best epoch) gave the blending weights at that epoch.
LPP_REFERENCE = {"best_epoch": 25,   # its 0-based best_epoch 24: the state after 25 steps
                 "init_alpha": 73.4992353245616, "lr_linear": 16.921104431152344, "lr_alpha": 1.4245383739471436,
                 "alpha": [73.6411361694336, 72.73836517333984, 73.52848815917969, 73.20616149902344],
                 "val_accuracy": 0.75, "test_accuracy": 0.375}
LPP_TEST_LOGITS = [   # its logits_test: at the last epoch of best validation accuracy
    [29.516712, 52.196732, -11.022536, -36.447723],
    [37.616196, 14.350647, 42.622253, 71.701172],
    [36.921677, -23.962908, 54.776852, -40.813461],
    [-4.159475, 34.356926, 19.571056, 19.399538],
    [41.180939, 47.521137, 26.642355, 34.132034],
    [44.697876, 14.167217, 12.646839, 21.716862],
    [-59.487537, -74.138863, 74.479385, 9.756454],
    [-12.637803, 55.421928, 5.348399, 33.436100],
    [-14.319275, -1.899229, 25.920546, 59.757584],
    [-60.124084, 22.125378, -3.966290, -17.028984],
    [-18.535477, -55.976841, 91.021896, 4.290297],
    [-10.421809, 59.435791, -16.635532, 11.186283],
    [29.437725, 7.910656, 64.546204, -11.948927],
    [-48.624840, 10.552282, -4.950379, 47.979626],
    [-4.604851, 23.766890, 30.983242, -23.084133],
    [-32.009743, 11.207220, 35.559700, 62.702785],
]


def lp_inputs() -> dict:
    """reference_inputs() with 16 validation images (4 shots per class, as the reference's validation set),
    unnormalised as the reference's encode_image gives them (it normalises them itself)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)

    def draw(n):
        labels = torch.arange(n) % 4
        return centres[labels] + 1.6 * torch.randn(n, 8, generator=g), labels

    (train, train_labels), (val, val_labels), (test, test_labels) = draw(16), draw(16), draw(16)
    text = centres + 1.5 * torch.randn(4, 8, generator=g)
    return dict(train=train, train_labels=train_labels, val=val, val_labels=val_labels,
                test=F.normalize(test, dim=-1), test_labels=test_labels, text=F.normalize(text, dim=-1))


def lp_fitted(tmp_path, epochs: int = 300):
    from types import SimpleNamespace
    from clip_adapt.feature_adapters import BlendedProbe, fit_lp_plus_plus
    x = lp_inputs()
    torch.manual_seed(0)   # the bias's random start, drawn as the reference's nn.Linear draws it
    probe = BlendedProbe(x["text"])
    splits = {name: SimpleNamespace(inputs=x[name], labels=x[f"{name}_labels"]) for name in ("train", "val", "test")}
    result, fitted = fit_lp_plus_plus(probe, splits, tmp_path, epochs)
    return probe, result, fitted, x


def test_lp_plus_plus_equals_the_reference(tmp_path):
    """The same start, step sizes, selected epoch, blending weights there and test logits as the reference's
    LP++, to 1e-5 in fp32."""
    probe, result, fitted, x = lp_fitted(tmp_path)
    assert result.best_epoch == LPP_REFERENCE["best_epoch"] and result.epochs_run == 300
    for key in ("init_alpha", "lr_linear", "lr_alpha"):
        assert fitted[key] == pytest.approx(LPP_REFERENCE[key], rel=1e-5), key
    torch.testing.assert_close(probe.alpha.detach(), torch.tensor(LPP_REFERENCE["alpha"]), **SAME)
    with torch.no_grad():
        logits = probe(x["test"])
    torch.testing.assert_close(logits, torch.tensor(LPP_TEST_LOGITS), **SAME)
    best = result.history[result.best_epoch]
    assert (best["val_accuracy"], best["test_accuracy"]) == (LPP_REFERENCE["val_accuracy"],
                                                             LPP_REFERENCE["test_accuracy"])
    assert (tmp_path / "best.safetensors").exists()


def test_lp_plus_plus_keeps_the_last_best_validation_epoch_and_test_steers_nothing(tmp_path):
    probe, result, _, x = lp_fitted(tmp_path)
    assert result.history[0]["epoch"] == 0   # the start, recorded; the reference never evaluates it
    val = [row["val_accuracy"] for row in result.history[1:]]
    assert result.best_epoch == max(i + 1 for i, v in enumerate(val) if v == max(val))
    # Other test images: the same epoch and weights.
    from types import SimpleNamespace
    from clip_adapt.feature_adapters import BlendedProbe, fit_lp_plus_plus
    torch.manual_seed(0)
    other = BlendedProbe(x["text"])
    splits = {name: SimpleNamespace(inputs=x[name], labels=x[f"{name}_labels"]) for name in ("train", "val")}
    splits["test"] = SimpleNamespace(inputs=-x["test"], labels=x["test_labels"].flip(0))
    again, _ = fit_lp_plus_plus(other, splits, tmp_path / "again")
    assert again.best_epoch == result.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), other.state_dict().values()))


def test_lp_plus_plus_trains_only_its_probe_and_blend_and_blends_e1s_text():
    from clip_adapt.feature_adapters import LPPlusPlus
    clip, processor, tokenizer = tiny_clip()
    frozen = {name: p.clone() for name, p in clip.state_dict().items()}
    torch.manual_seed(0)
    model = LPPlusPlus(clip, tokenizer, list(CLASSES))
    assert [part.name for part in model.parts()] == ["linear probe", "blending weights"]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {"probe.linear.weight", "probe.linear.bias", "probe.alpha"}
    pixels = tiny_batch(processor, 4)
    model.train()
    F.cross_entropy(model(pixels), torch.arange(4)).backward()
    assert all(torch.equal(p, frozen[name]) for name, p in clip.state_dict().items())
    assert not model.vision.training and not model.projection.training
    # With the probe at zero, the logits are α times E1's cosine similarities (E1's logits over its logit scale).
    zero_shot = ZeroShot(clip, tokenizer, list(CLASSES), ZERO_SHOT_TEMPLATES)
    model.eval()
    with torch.no_grad():
        model.probe.linear.weight.zero_()
        model.probe.linear.bias.zero_()
        model.probe.alpha.fill_(3.0)
        torch.testing.assert_close(model(pixels), 3.0 * zero_shot(pixels) / clip.logit_scale.exp(), **SAME)


def test_lp_plus_plus_script_records_its_step_sizes(tmp_path, capsys):
    run_script("E13_lp_plus_plus.py", "--smoke", "--quiet", "--noise-levels", 0, "--output-dir", tmp_path,
               "--epochs", 12, expect_exit=0)
    metrics = json.loads((tmp_path / "E13_lp_plus_plus" / "metrics.json").read_text())
    assert metrics["trainable_params"] == 16 * 4 + 4 + 4   # the tiny CLIP's 16-wide embedding
    assert metrics["epochs_run"] == 12 and metrics["lpp_epochs"] == 12
    assert metrics["lr_linear"] > 0 and metrics["lr_alpha"] > 0
    assert metrics["alpha"] != [metrics["init_alpha"]] * 4   # α took its step at epoch 10
    assert metrics["selection"]["metric"] == "val_accuracy"
    capsys.readouterr()
    run_script("E13_lp_plus_plus.py", "--smoke", "--tune", "--output-dir", tmp_path / "tuned", expect_exit=2)
    assert "nothing to tune" in capsys.readouterr().err and not (tmp_path / "tuned").exists()
