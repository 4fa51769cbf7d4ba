"""E8: a frozen CLIP tower, a GPT-2 decoder with new cross-attention, and one PEFT module; CIDEr-D and CLIPScore."""

import json
import signal

import datasets
import numpy as np
import pytest
import torch
from conftest import noise_image, run_script
from transformers import CLIPModel, GPT2Config, GPT2LMHeadModel

from clip_adapt import models
from clip_adapt.base import UserError
from clip_adapt.captioning import (PEFT_METHODS, BottleneckAdapter, Captioner, byte_tokenizer, clean_caption,
                                   expected_trainable, load_captions, tiny_decoder, write_shape_captions)
from clip_adapt.training import TrainConfig, TrainingInterrupted, tensor_hash, train

SCRIPT = "E8_caption_peft.py"
OUTPUTS = {"metrics.json", "predictions.json", "test_scores.csv", "history.csv", "loss_curves.png",
           "accuracy_curves.png", "gallery.png", "gallery.json", "attention_maps.png"}


@pytest.mark.parametrize("encoder", ["vit-b16", "vit-l14"])
def test_trainable_counts_match_the_formula_for_gpt2(encoder):
    """GPT-2 (768 wide, 12 layers) on the meta device: no weights are made, every count is exact."""
    width = models.CLIP_ARCHITECTURES[encoder][0]
    for peft in PEFT_METHODS:
        with torch.device("meta"):
            clip = CLIPModel(models.clip_config(encoder))
            decoder = GPT2LMHeadModel(GPT2Config(add_cross_attention=True))
            model = Captioner(clip, decoder, byte_tokenizer(), peft)
        counts = model.trainable_counts()
        assert counts == expected_trainable(768, 12, width, peft), (encoder, peft)
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The study's adapter: 354 wide; cross-attention 12·(4·768² + 6·768); ViT-L/14 needs a 1024→768 projection.
    assert expected_trainable(768, 12, width, "adapter") == {
        "cross_attention": 28_366_848, "encoder_projection": 0 if width == 768 else 787_200, "adapter": 6_538_392}


def small_captions(tmp_path, clip_parts):
    clip, processor, _ = clip_parts
    decoder, tokenizer = tiny_decoder()
    data = load_captions(str(write_shape_captions(tmp_path / "shapes", (12, 4))), processor, tokenizer)
    return clip, decoder, tokenizer, data


@pytest.mark.parametrize("peft", PEFT_METHODS)
def test_only_the_new_parts_train_and_the_frozen_weights_stay_bit_identical(peft, tmp_path, clip_parts):
    clip, decoder, tokenizer, data = small_captions(tmp_path, clip_parts)
    model = Captioner(clip, decoder, tokenizer, peft)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("crossattention" in n or "ln_cross_attn" in n or "enc_to_dec_proj" in n
                              or (peft == "adapter" and n.startswith("adapters."))
                              or (peft == "lora" and "lora_" in n) or (peft == "prefix" and n.startswith("prefix.")))
                             for n in trainable), trainable
    assert any(n.startswith(("adapters.", "prefix.")) or "lora_" in n for n in trainable) == (peft != "none")
    before = {n: tensor_hash(p) for n, p in model.named_parameters()}
    config = TrainConfig(epochs=2, patience=2, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                         device=torch.device("cpu"), checkpoint_dir=tmp_path / "checkpoint", augment=False)
    model.train()
    assert not model.encoder.training and model.model.decoder.training
    result = train(model, data.train, data.val, data.test, config)
    after = {n: tensor_hash(p) for n, p in model.named_parameters()}
    assert all(before[n] == after[n] for n in before if n not in trainable)
    assert any(before[n] != after[n] for n in trainable)
    assert len(result.history) == 3 and all(np.isfinite(r["val_loss"]) for r in result.history)   # epochs 0-2


@pytest.mark.parametrize("peft", PEFT_METHODS)
def test_smoke_writes_every_output(peft, tmp_path):
    run_script(SCRIPT, "--smoke", "--peft", peft, "--epochs", 1, "--batch-size", 16, "--max-caption-tokens", 4,
               "--output-dir", tmp_path, "--quiet", expect_exit=0)
    folder = tmp_path / "E8_caption_peft"
    assert OUTPUTS <= {p.name for p in folder.iterdir()}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["peft"] == peft and metrics["epochs_run"] == 1
    assert {"test_cider", "test_clipscore", "test_refclipscore"} <= set(metrics)
    assert metrics["clipscore_model"] == "tiny-random-clip" and metrics["clipscore_scorer"] == \
        "independent of the captioner"
    assert metrics["trainable_by_part"] == expected_trainable(96, 2, 32, peft)   # the tiny GPT-2 and CLIP
    assert sum(metrics["trainable_by_part"].values()) == metrics["trainable_params"]
    predictions = json.loads((folder / "predictions.json").read_text())
    assert len(predictions) == metrics["test_images"] == 8
    assert max(len(caption.split()) for caption in predictions.values()) <= 4   # generation stops at the limit
    # The smoke run shows the pipeline working: captions with words (at least one token each), and attention
    # maps with a panel per word, wide enough for their title.
    assert all(caption.strip() for caption in predictions.values()), predictions
    gallery = json.loads((folder / "gallery.json").read_text())
    assert all(entry["attention_words"] for entry in gallery)
    from PIL import Image
    with Image.open(folder / "attention_maps.png") as image:
        assert image.width >= 600 and image.text.get("Weights") == "random"


def write_coco_folder(root, images=20, captions_per_image=2, test_images=6):
    """20 images, two captions each, split into train.json and test.json, as COCO writes them."""
    (root / "images").mkdir(parents=True)
    files = {}
    for i in range(images):
        noise_image(i, size=(36, 30)).save(root / "images" / f"{i:012d}.jpg")
        files[i] = f"{i:012d}.jpg"
    for split, ids in (("train", range(test_images, images)), ("test", range(test_images))):
        coco = {"images": [{"id": i, "file_name": files[i]} for i in ids],
                "annotations": [{"id": 100 * i + k, "image_id": i, "caption": f"A picture  number {i} .\n"}
                                for i in ids for k in range(captions_per_image)]}
        (root / f"{split}.json").write_text(json.dumps(coco))
    return root


def test_a_coco_format_folder_of_20_images_runs_end_to_end(tmp_path, tiny_clip_dir):
    data = write_coco_folder(tmp_path / "coco")
    decoder, tokenizer = tiny_decoder()
    decoder.save_pretrained(tmp_path / "decoder")
    tokenizer.save_pretrained(tmp_path / "decoder")
    run_script(SCRIPT, "--data", data, "--model", tiny_clip_dir, "--decoder", tmp_path / "decoder", "--epochs", 1,
               "--clipscore-model", tiny_clip_dir,   # the default, openai/clip-vit-base-patch32, is not cached here
               "--num-beams", 2, "--max-caption-tokens", 12, "--output-dir", tmp_path / "out", "--quiet",
               expect_exit=0)
    folder = tmp_path / "out" / "E8_caption_peft"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["train_images"], metrics["val_images"], metrics["test_images"]) == (12, 2, 6)
    assert metrics["test_captions"] == 12 and metrics["num_beams"] == 2
    assert set(json.loads((folder / "predictions.json").read_text())) == {
        str(tmp_path / "coco" / "images" / f"{i:012d}.jpg") for i in range(6)}


def test_captions_are_cleaned():
    assert clean_caption("A dog  runs\non grass .\r\n") == "A dog runs on grass."


def test_a_datasets_dataset_with_a_list_of_captions_per_image(tmp_path, clip_parts):
    def split(n, offset):
        return datasets.Dataset.from_dict(
            {"image": [noise_image(offset + i) for i in range(n)],
             "sentences": [[f"image {offset + i} .", f"another {offset + i}"] for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "sentences": datasets.Sequence(datasets.Value("string"))}))
    datasets.DatasetDict({"train": split(10, 0), "test": split(3, 50)}).save_to_disk(tmp_path / "saved")
    _, processor, _ = clip_parts
    data = load_captions(str(tmp_path / "saved"), processor, byte_tokenizer(), val_fraction=0.2)
    assert (len(data.train.files), len(data.val.files), len(data.test.files)) == (8, 2, 3)
    assert len(data.train) == 16 and data.test.references[0] == ["image 50.", "another 50"]
    with pytest.raises(UserError, match="--caption-column"):
        load_captions(str(tmp_path / "saved"), processor, byte_tokenizer(), caption_column="nope")


@pytest.mark.parametrize("case", ["no data", "no test.json", "missing image", "not coco"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    data = write_coco_folder(tmp_path / "coco", images=4, test_images=2)
    args = ["--data", data]
    if case == "no data":
        args = []
    elif case == "no test.json":
        (data / "test.json").unlink()
    elif case == "missing image":
        (data / "images" / f"{1:012d}.jpg").unlink()
    else:
        (data / "train.json").write_text('{"pictures": []}')
    run_script(SCRIPT, *args, "--model", "tiny-random-clip", "--decoder", "tiny-random-gpt2", "--output-dir",
               tmp_path / "out", expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_a_captioner_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, clip_parts):
    """The captioner's own loss goes through the same loop: SIGTERM mid-epoch, --resume, the same history."""
    clip, _, _, data = small_captions(tmp_path, clip_parts)

    def run(folder, stop_at_step=None, resume=False):
        torch.manual_seed(0)
        model = Captioner(clip, *tiny_decoder(), "adapter")   # the adapter's dropout needs the random state back
        steps = []
        def stop(module, args):
            steps.extend([1] if module.training else [])   # training steps only: epoch 0 is evaluated first
            if module.training and len(steps) == stop_at_step:
                signal.raise_signal(signal.SIGTERM)
        model.register_forward_pre_hook(stop)
        config = TrainConfig(epochs=2, patience=2, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                             device=torch.device("cpu"), checkpoint_dir=tmp_path / folder, augment=False,
                             resume=resume, checkpoint_every=3600)
        return train(model, data.train, data.val, data.test, config)

    whole = run("whole")
    with pytest.raises(TrainingInterrupted):
        run("parts", stop_at_step=2)
    assert run("parts", resume=True).history == whole.history


def test_an_untrained_adapter_is_the_identity_and_still_learns():
    """Near-identity initialisation (Houlsby et al. 2019): the decoder starts as the language model it was."""
    adapter = BottleneckAdapter(16, 4).eval()
    x = torch.randn(3, 5, 16)
    assert torch.equal(adapter(x), x)
    adapter(x).square().sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0   # the zero up-projection gets gradients: it can move
