"""The fast paths compute what the plain ones do; the benchmark runs, writes valid JSON as it goes, and survives an
experiment's failure."""

import copy
import json
import sys

import pytest
import torch
from conftest import CLASSES, run_script, tiny_batch

from clip_adapt.data import Split
from clip_adapt.models import ImageClassifier, PromptedCLIP
from clip_adapt.runner import classification_scripts
from clip_adapt.training import TrainConfig, predict, train


def test_sdpa_attention_matches_plain_attention_in_logits_and_training(clip_parts, tmp_path):
    clip, image_processor, tokenizer = clip_parts
    plain = copy.deepcopy(clip)
    plain.set_attn_implementation("eager")
    assert clip.config._attn_implementation == "sdpa" and plain.config._attn_implementation == "eager"
    pixels, labels = tiny_batch(image_processor, 12), torch.arange(12) % 4
    split = Split(pixels, labels, [])
    results = []
    for backbone, folder in ((clip, "fast"), (plain, "plain")):
        torch.manual_seed(0)
        model = ImageClassifier(backbone, 4, num_prompts=2, prompt_layers=[0, 1, 2])
        e5 = PromptedCLIP(copy.deepcopy(backbone), tokenizer, ["a", "b", "c", "d"], 1, 2)
        before = predict(model, pixels, 5, torch.device("cpu")), predict(e5, pixels, 5, torch.device("cpu"))
        config = TrainConfig(epochs=3, patience=3, batch_size=4, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                             device=torch.device("cpu"), checkpoint_dir=tmp_path / folder)
        train(model, split, split, split, config)
        results.append((*before, predict(model, pixels, 5, torch.device("cpu"))))
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_bench_smoke_writes_valid_json(tmp_path):
    run_script("tools/bench.py", "--smoke", "--steps", 1, "--warmup", 1, "--e2-epochs", 2, "--e2-images", 16, 16,
               "--output-dir", tmp_path, expect_exit=0)
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["experiment"]: r for r in result["experiments"]}
    assert {script.name for script in classification_scripts()} == set(rows)
    assert "train_images_per_s" not in rows["E1_zero_shot_clip"]
    trains = {name: row["trainable_params"] > 0 for name, row in rows.items()}   # as built by default flags
    for name, row in rows.items():
        assert row["eval_images_per_s"] > 0 and 0 < row["eval_mfu"] < 1 and row["peak_memory_mb"] > 0, name
        assert ("train_step_s" in row) == trains[name], name   # nothing to train: no step to time
        if trains[name]:
            assert row["train_images_per_s"] == pytest.approx(result["batch_size"] / row["train_step_s"]), name
    # Frozen backbone: backward computes input gradients only, so a step costs less than a full fine-tuning one.
    assert rows["E4_deep_vpt"]["train_gflop_per_image"] < rows["E6_full_finetune"]["train_gflop_per_image"]
    assert rows["E2_linear_probe"]["trainable_params"] < rows["E7_lora"]["trainable_params"] \
        < rows["E6_full_finetune"]["trainable_params"]
    # A figure, not a target: timing ratios are measured by the benchmark, never asserted by a test.
    assert result["e2_cached_vs_tower"]["speedup"] > 0
    assert result["peak_flops"] > 0 and result["peak_flops_source"]


def test_bench_records_a_failed_experiment_measures_the_rest_and_writes_after_each(tmp_path, monkeypatch):
    """An experiment that runs out of memory is recorded with its error, the next one (E8, on the tiny decoder)
    is still measured, bench.json is rewritten after every experiment, and the exit code says one failed."""
    from clip_adapt.captioning import expected_trainable
    from tools import bench
    build = bench.build_model

    def out_of_memory_for_e3(name, *args):
        if name == "E3_shallow_vpt":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(name, *args)
    written = []
    write = bench.write_json
    monkeypatch.setattr(bench, "build_model", out_of_memory_for_e3)
    monkeypatch.setattr(bench, "write_json", lambda path, data: (written.append(len(data["experiments"])),
                                                                  write(path, data)))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--steps", "1", "--warmup", "1", "--batch-size", "4",
                                      "--e2-epochs", "1", "--e2-images", "8", "8", "--output-dir", str(tmp_path),
                                      "--experiments", "E2_linear_probe", "E3_shallow_vpt", "E8_caption_peft"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 1
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["experiment"]: row for row in result["experiments"]}
    assert list(rows) == ["E2_linear_probe", "E3_shallow_vpt", "E8_caption_peft"]
    assert rows["E3_shallow_vpt"] == {"experiment": "E3_shallow_vpt",
                                      "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert written == [0, 1, 2, 3, 3] and result["e2_cached_vs_tower"]["speedup"] > 0
    # E8 as its script builds it: the tiny GPT-2 (width 96, 2 layers) reading the tiny CLIP's 32-wide tower through
    # cross-attention and the study's adapter; backward makes a training image cost more than an evaluated one.
    e8 = rows["E8_caption_peft"]
    assert e8["trainable_params"] == sum(expected_trainable(96, 2, 32, "adapter").values())
    assert e8["train_gflop_per_image"] > e8["eval_gflop_per_image"] > 0 and e8["train_images_per_s"] > 0


def test_batches_of_a_split_equal_its_model_inputs_and_its_constants_are_made_once():
    """Split.batches is the training loop's feed (gathered and prefetched when the images are pinned, which
    needs a GPU; plain here); its normalisation constants are made once per device, not on every batch."""
    pixels = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    split = Split(pixels, torch.zeros(10), [], (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    indices = [torch.tensor([3, 1, 4]), None, torch.tensor([9, 0])]
    plain = list(split.batches(indices, torch.device("cpu")))
    fed = [inputs.clone() if inputs is not None else None   # a prefetched batch lives in a reused buffer
           for inputs in split.batches(indices, torch.device("cpu"), prefetch=True)]
    assert fed[1] is None and plain[1] is None
    for index, inputs, reference in zip([indices[0], indices[2]], [fed[0], fed[2]], [plain[0], plain[2]]):
        torch.testing.assert_close(inputs, reference, rtol=0, atol=0)
        expected = (pixels[index].float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) \
            / torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
        torch.testing.assert_close(inputs, expected)
    constants = split.normalisation(torch.device("cpu"))
    split.model_inputs(torch.tensor([0]), torch.device("cpu"))
    assert all(a is b for a, b in zip(split.normalisation(torch.device("cpu")), constants))


COMPILED = [("E3_shallow_vpt", []), ("E3_shallow_vpt", ["--prompt-type", "random-patch"]), ("E4_deep_vpt", []),
            ("E5_clip_vpt", [])]


@pytest.mark.slow
@pytest.mark.parametrize("name, flags", COMPILED, ids=["E3-token", "E3-random-patch", "E4", "E5"])
def test_compiled_training_equals_eager_in_one_graph(name, flags, tiny_clip_dir, tmp_path):
    """--compile: torch.compile (inductor, on the CPU here) trains each prompt method to the same losses as eager
    over 2 epochs, with no graph break (the random patch is placed by tensor ops, nothing read back). Inductor
    draws random numbers its own way unless told to use eager's (fallback_random), so the random patch would
    land elsewhere: told here, so that the two runs place it alike."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    import common
    from clip_adapt.models import load_clip
    script = next(s for s in classification_scripts() if s.name == name)
    pixels, labels = tiny_batch(load_clip(str(tiny_clip_dir))[1], 16), torch.arange(16) % 4
    split = Split(pixels, labels, [])
    histories = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        args = script.default_args("--model", str(tiny_clip_dir), "--device", "cpu", *flags)
        args.lr = script.learning_rate
        clip, _, tokenizer = load_clip(args.model)
        common.seed_everything(0)
        model = script.build_model(clip, tokenizer, list(CLASSES), args)
        config = TrainConfig(epochs=2, patience=100, batch_size=8, lr=args.lr, weight_decay=0.0, warmup_epochs=0,
                             seed=0, device=torch.device("cpu"), checkpoint_dir=tmp_path / str(compiled),
                             augment=False, precision="fp32")
        with torch._inductor.config.patch(fallback_random=True):
            result = train(torch.compile(model) if compiled else model, split, split, split, config)
        histories.append([(row["train_loss"], row["val_loss"]) for row in result.history])
        if compiled:
            assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]), rtol=1e-4, atol=1e-4)


def test_compare_models_measures_each_mode_in_process():
    """The fast sibling of the slow test below: one measurement of each mode of a tiny ResNet, in this process."""
    from tools import bench_models
    assert bench_models.script_for("tiny-resnet") == "E14_resnet18"
    assert bench_models.script_for("tiny-random-clip") == "E2_linear_probe"
    for grad in (False, True):
        row = bench_models.measure_inference("random:resnet-tiny", grad, 2, 1, 0, "cpu")
        assert row["parameters"] == 12_348 and row["seconds_per_image"] > 0, grad   # its backbone and a 4-class head
        assert row["peak_memory_mb"] >= row["memory_before_mb"] - 1 and row["memory_of_passes_mb"] >= 0, grad


@pytest.mark.slow   # a fresh process per model and mode: 30 s on the 2-core Xeon
def test_bench_compare_models_smoke_writes_the_figure_and_the_no_grad_table(tmp_path):
    """tools/bench.py --compare-models on the two tiny random models (a CLIP, a ResNet): each one's head-only test
    accuracy as its script's metrics.json says, and time and peak memory measured with and without no_grad."""
    run_script("tools/bench.py", "--smoke", "--compare-models", "tiny", "tiny-resnet", "--batch-size", 4,
               "--steps", 1, "--warmup", 1, "--output-dir", tmp_path, expect_exit=0)
    result = json.loads((tmp_path / "compare_models.json").read_text())
    rows = {r["model"]: r for r in result["models"]}
    assert set(rows) == {"tiny-random-clip", "random:resnet-tiny"}
    assert {r["script"] for r in rows.values()} == {"E2_linear_probe", "E14_resnet18"}
    for name, row in rows.items():
        folder = tmp_path / "compare_models" / name.replace(":", "_") / row["script"]
        assert row["test_accuracy"] == json.loads((folder / "metrics.json").read_text())["test_accuracy"]
        for mode in ("with_no_grad", "autograd"):
            assert row[mode]["seconds_per_image"] > 0 and row[mode]["peak_memory_mb"] > 0, (name, mode)
            assert row[mode]["peak_memory_mb"] >= row[mode]["memory_before_mb"] - 1, (name, mode)
    assert rows["random:resnet-tiny"]["parameters"] == 12_348   # its backbone and a 4-class head
    assert (tmp_path / "compare_models.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "compare_models.md").read_text()
    assert "| random:resnet-tiny | 12,348 |" in table and "no_grad" in table
