"""E8 scored as COCO's evaluation and Hessel et al.'s code score captions, the checks made before training, and
the caption data: where its images live, the frozen tower once per image and epoch, and attention maps of the
caption that is reported."""

import json
import sys

import pytest
import torch
from conftest import noise_image, run_script

from clip_adapt import data as data_module
from clip_adapt import models
from clip_adapt.caption_report import caption_words, generated, word_attention
from clip_adapt.captioning import (PTB_PROBE, Captioner, PairImages, clean_caption, cider_d, clip_scores,
                                   clip_text_embeddings, load_captions, ptb_tokenize, tiny_decoder,
                                   write_shape_captions)
from clip_adapt.models import normalized_image_embeddings
from clip_adapt.training import TrainConfig, train

SCRIPT = "E8_caption_peft.py"

# ----------------------------------------------------------------------------- CLIPScore and RefCLIPScore

# Pinned from Hessel et al.'s clipscore.py (github.com/jmhessel/clipscore at 1036465276513621f77f1c2208d742e4a430781f),
# run unchanged outside the project on these inputs: its get_clip_score on the tiny CLIP's image features of
# noise_image(1, 2, 3) and the candidates, its get_refonlyclipscore on the references with the candidate features
# get_clip_score returned, and RefCLIPScore as its main() computes it (2·a·b / (a + b)). OpenAI's `clip` package
# was stood in by models.tiny_clip(): its tokenizer laid out as clip.tokenize does it (context 77, zero padding,
# the end token kept last when cut) and the model wrapped as encode_text / encode_image. Weights: tiny_clip(),
# seed 0; CPU, fp32.
HESSEL_IMAGES = (1, 2, 3)
HESSEL_CANDIDATES = ["a red square on a dark background.", "two cats are sleeping next to each other.",
                     "a man's t-shirt, 3 dogs and a close-up"]
HESSEL_REFERENCES = [["a square.", "a red square in the top left of the picture."],
                     ["an orange cat and a grey cat are lying together.", "two cats sleep.", "cats"],
                     ["a man wears a t-shirt.", "three dogs"]]
HESSEL_CLIPSCORE = [0.9286001324653625, 0.27309373021125793, 0.5122964978218079]
HESSEL_TEXT_TEXT = [0.9120079278945923, 0.8807100057601929, 0.9000306725502014]
HESSEL_REFCLIPSCORE = [0.9202291965484619, 0.41691040992736816, 0.6529401540756226]


def test_clipscore_and_refclipscore_equal_hessel_et_al_s_code():
    clip, processor, tokenizer = models.tiny_clip()
    pixels = processor([noise_image(seed) for seed in HESSEL_IMAGES], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        images = normalized_image_embeddings(clip, pixels)
    scores = clip_scores(images, clip, tokenizer, HESSEL_CANDIDATES, HESSEL_REFERENCES)
    assert scores["clipscore"] == pytest.approx(HESSEL_CLIPSCORE, abs=1e-5)
    assert scores["refclipscore"] == pytest.approx(HESSEL_REFCLIPSCORE, abs=1e-5)
    # The text-text term without "A photo depicts " in front (as E8 computed it before) is another number: the
    # pins tell the two apart.
    plain = clip_text_embeddings(clip, tokenizer, HESSEL_CANDIDATES)
    refs = [clip_text_embeddings(clip, tokenizer, r) for r in HESSEL_REFERENCES]
    unprefixed = [float((r @ c).max()) for r, c in zip(refs, plain)]
    assert max(abs(a - b) for a, b in zip(unprefixed, HESSEL_TEXT_TEXT)) > 1e-2


# ----------------------------------------------------------------------------- CIDEr-D

# COCO-style captions with possessives, hyphens, numbers, brackets and punctuation.
REFERENCES = [["A man's T-shirt hangs on a line.", "A t-shirt hanging on a clothes line.",
               "Someone's shirt, drying outside."],
              ["Two dogs play in the snow; one is brown.", "2 dogs playing in snow!", "A pair of dogs in the snow."],
              ["A double-decker bus at 12:30 on St. Mark's Place.", "A red bus (double decker) on a street.",
               "The bus is parked near the 3/4 mark."],
              ["A woman holds an umbrella & a bag.", "A lady with an umbrella, and a handbag.",
               "\"Rain\" again: a woman walks."],
              ["A close-up of a cat's face.", "The cat's eyes are green.", "A cat looking at the camera..."],
              ["Children's toys are strewn across a floor.", "Toys on the floor of a kids' room.",
               "A messy room with toys."]]
CANDIDATES = ["a man's t-shirt on a line.", "two dogs playing in the snow", "a double-decker bus on a street",
              "a woman with an umbrella & a bag", "a close-up of a cat", "toys on a floor."]
# pycocoevalcap 1.2: PTBTokenizer on references and candidates, then Cider (COCOEvalCap's steps). E8's former
# tokenisation (letters, digits and apostrophes) gave 2.5922 on the same set.
OFFICIAL_CIDER = 2.509565403505764


def test_cider_d_equals_the_official_tokenizer_and_cider_pipeline():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(CANDIDATES)})
    official, official_per_image = Cider().compute_score(gts, res)
    score, per_image = cider_d(REFERENCES, CANDIDATES)
    assert score == pytest.approx(official, rel=1e-12) and score == pytest.approx(OFFICIAL_CIDER, rel=1e-9)
    assert per_image == pytest.approx(list(official_per_image), rel=1e-12)


def test_captions_are_tokenised_as_coco_s_ptb_tokenizer_does():
    """The Stanford tokenizer's own choices, punctuation tokens then dropped as pycocoevalcap drops them: brackets
    become -lrb- / -rrb- (lower-cased, so its punctuation list no longer matches them)."""
    cases = {PTB_PROBE[0]: PTB_PROBE[1],
             "A man's hat and the dogs' bowls.": "a man 's hat and the dogs bowls",
             "He can't go; they're here.": "he ca n't go they 're here",
             "A t-shirt - a red one -- and a close-up.": "a t-shirt a red one and a close-up",
             "Prices: $5, 5%, 1,000 people, 3.5 miles, 12:30 pm, 3/4 view.":
                 "prices $ 5 5 % 1,000 people 3.5 miles 12:30 pm 3/4 view",
             "A (small) dog.": "a -lrb- small -rrb- dog", "I cannot go.": "i can not go", "": "",
             "two\nlines": "two lines"}
    assert ptb_tokenize(list(cases)) == list(cases.values())


# ----------------------------------------------------------------------------- checks before training

def smoke(tmp_path, *flags):
    return ["--smoke", "--epochs", 1, "--batch-size", 16, "--max-caption-tokens", 4, "--output-dir", tmp_path,
            "--quiet", *flags]


def assert_stopped_before_training(tmp_path, capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(word in err[0] for word in words), err[0]
    folder = tmp_path / "E8_caption_peft"
    assert not (folder / "history.csv").exists() and not (folder / "checkpoint").exists()


def test_without_pycocoevalcap_e8_stops_in_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)   # an import of it now fails, as where it is missing
    run_script(SCRIPT, *smoke(tmp_path), expect_exit=2)
    assert_stopped_before_training(tmp_path, capsys, "pycocoevalcap", "pip install")


def test_without_java_e8_stops_in_one_line_before_training(tmp_path, capsys, monkeypatch):
    import shutil
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
    run_script(SCRIPT, *smoke(tmp_path), expect_exit=2)
    assert_stopped_before_training(tmp_path, capsys, "Java", "default-jre-headless")


@pytest.mark.parametrize("case", ["score model", "decoder not a language model", "decoder missing"])
def test_a_score_model_or_decoder_that_cannot_load_stops_e8_before_training(case, tmp_path, capsys, tiny_clip_dir):
    flags = {"score model": ["--clipscore-model", tmp_path / "no_such_clip"],
             "decoder not a language model": ["--decoder", tiny_clip_dir],
             "decoder missing": ["--decoder", tmp_path / "no_such_decoder"]}[case]
    run_script(SCRIPT, *smoke(tmp_path, *flags), expect_exit=2)
    words = {"score model": ["--clipscore-model", "no_such_clip"], "decoder not a language model": ["causal"],
             "decoder missing": ["no_such_decoder"]}[case]
    assert_stopped_before_training(tmp_path, capsys, *words)


def test_help_names_the_metric_s_own_clip_as_the_default_scorer(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")   # argparse would break the id at its hyphens
    run_script(SCRIPT, "--help", expect_exit=0)
    text = " ".join(capsys.readouterr().out.split())
    assert "--clipscore-model" in text and "[default: openai/clip-vit-base-patch32" in text
    assert "with --smoke: the tiny random CLIP" in text and "'captioner': the captioner's own --model" in text


def test_scoring_by_the_captioner_s_own_clip_is_labelled_so(tmp_path):
    run_script(SCRIPT, *smoke(tmp_path, "--clipscore-model", "captioner"), expect_exit=0)
    metrics = json.loads((tmp_path / "E8_caption_peft" / "metrics.json").read_text())
    assert metrics["clipscore_model"] == "tiny-random-clip"
    assert metrics["clipscore_scorer"] == "the captioner's own CLIP"


# ----------------------------------------------------------------------------- caption data

@pytest.fixture
def shapes(tmp_path):
    clip, processor, _ = models.tiny_clip()
    _, tokenizer = tiny_decoder()
    return clip, load_captions(str(write_shape_captions(tmp_path / "shapes", (12, 4))), processor, tokenizer)


def test_caption_images_that_do_not_fit_the_planted_free_memory_stay_on_the_host(shapes, monkeypatch, capsys):
    _, data = shapes
    size = sum(s.images.inputs.numel() for s in data.splits().values())
    for free, on_host in ((None, False), (4 * size, False), (size, True)):   # None: the host itself
        monkeypatch.setattr(data_module, "free_device_memory", lambda device, free=free: free)
        placed = data.to("cpu")
        assert all(s.images.on_host == on_host for s in placed.splits().values()), free
    assert "kept in host memory" in capsys.readouterr().out


def history_losses(folder):
    import csv
    with open(folder / "E8_caption_peft" / "history.csv") as f:
        return [(float(row["train_loss"]), float(row["val_loss"])) for row in csv.DictReader(f)]


def test_an_e8_run_whose_images_exceed_the_planted_free_memory_keeps_them_on_the_host_with_the_same_loss(
        tmp_path, monkeypatch, capsys):
    """The whole script twice: images on the device, then kept on the host (gathered there, prefetched by a
    thread) because a planted free-memory figure of 1 KB cannot hold them."""
    run_script(SCRIPT, *smoke(tmp_path / "device", "--epochs", 2), expect_exit=0)
    assert "kept in host memory" not in capsys.readouterr().out
    monkeypatch.setattr(data_module, "free_device_memory", lambda device: 1024)
    run_script(SCRIPT, *smoke(tmp_path / "host", "--epochs", 2), expect_exit=0)
    assert "do not fit in 50% of the device's free 0.00 GB: kept in host memory" in capsys.readouterr().out
    assert history_losses(tmp_path / "host") == pytest.approx(history_losses(tmp_path / "device"), rel=1e-6)


def test_an_epoch_visits_each_image_s_captions_in_a_row(shapes):
    _, data = shapes
    split = data.train
    orders = [split.epoch_order(torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(split)))
        images = split.image_of[order].tolist()
        runs = [image for k, image in enumerate(images) if k == 0 or images[k - 1] != image]
        assert len(runs) == len(split.files) == len(set(runs))   # each image once, all its captions together
    assert not torch.equal(*orders)


def test_sharing_the_frozen_tower_among_an_image_s_captions_leaves_the_loss_unchanged(shapes, tmp_path):
    """A batch's images once each (PairImages) against one image per caption: the same losses over two epochs of
    training and evaluation, with the tower run on far fewer images."""
    clip, data = shapes
    histories, encoded = {}, {}
    for share in (True, False):
        torch.manual_seed(0)
        model = Captioner(clip, *tiny_decoder(), "adapter")
        rows = []
        hook = model.encoder.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
            len(kwargs["pixel_values"]) if "pixel_values" in kwargs else len(args[0])), with_kwargs=True)
        shared = data.sharing(share)
        config = TrainConfig(epochs=2, patience=2, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_epochs=0,
                             seed=0, device=torch.device("cpu"), checkpoint_dir=tmp_path / str(share), augment=False)
        result = train(model, shared.train, shared.val, shared.test, config)
        histories[share] = [(r["train_loss"], r["val_loss"], r["test_loss"]) for r in result.history]
        encoded[share] = sum(rows)
        hook.remove()   # the tower is the fixture's CLIP, shared by both models
    assert histories[True] == pytest.approx(histories[False], rel=1e-5)
    pairs = sum(len(s) for s in data.splits().values())
    images = sum(len(s.files) for s in data.splits().values())
    batches = sum(-(-len(s) // n) for s, n in ((data.train, 8), (data.val, 16), (data.test, 16)))
    # Three passes over every split: epoch 0's evaluation (the model as built), then two epochs.
    assert encoded[False] == 3 * pairs   # every caption its own pass through the tower
    assert encoded[True] <= 3 * (images + batches) < encoded[False]   # an image split by a batch edge: twice


def test_a_shared_batch_gives_the_same_loss_as_one_image_per_caption(shapes):
    clip, data = shapes
    model = Captioner(clip, *tiny_decoder(), "lora").eval()
    index = torch.arange(10)
    images = data.train.image_of[index]
    per_caption = model(data.train.images.model_inputs(images), data.train.labels[index])
    shared = data.train.model_inputs(index)
    assert isinstance(shared, PairImages) and len(shared.pixels) < len(index)
    torch.testing.assert_close(model(shared, data.train.labels[index]), per_caption, rtol=1e-5, atol=1e-5)


def test_an_augmented_run_refuses_a_split_that_shares_images(shapes, tmp_path):
    clip, data = shapes
    config = TrainConfig(epochs=1, patience=2, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                         device=torch.device("cpu"), checkpoint_dir=tmp_path, augment=True)
    with pytest.raises(ValueError, match="cannot be augmented"):
        train(Captioner(clip, *tiny_decoder(), "none"), data.train, data.val, data.test, config)


# ----------------------------------------------------------------------------- attention maps

def test_attention_maps_are_those_generation_had_for_the_reported_caption_per_word(shapes):
    """Greedy decoding's own cross-attention at each step (eager attention, last layer, mean over heads), averaged
    over each word's tokens, equals the teacher-forced maps of word_attention for the caption generated(); the
    words are the caption's words, as the gallery shows it, for greedy and beam search."""
    clip, data = shapes
    torch.manual_seed(1)
    model = Captioner(clip, *tiny_decoder(), "adapter").eval()
    pixels = data.test.images.model_inputs(torch.arange(3))
    language_model = model.model.decoder
    language_model.set_attn_implementation("eager")
    out = model.generate(pixels, 1, 12, min_new_tokens=8, output_attentions=True, return_dict_in_generate=True)
    language_model.set_attn_implementation("sdpa")
    steps = torch.stack([layers[-1][:, :, -1].float().mean(1) for layers in out.cross_attentions], 1)[..., 1:]
    sequences = out.sequences[:, 1:].tolist()
    maps = word_attention(model, pixels, sequences)
    for tokens, step, (words, grids) in zip(sequences, steps, maps):
        pieces = caption_words(model.tokenizer, tokens)
        assert words == [word for word, _ in pieces] and len(words) == len(grids) > 0
        expected = torch.stack([step[positions].mean(0) for _, positions in pieces])
        torch.testing.assert_close(grids.flatten(1), expected, rtol=1e-4, atol=1e-6)
        assert " ".join(words) == clean_caption(model.tokenizer.decode(tokens))
    for beams in (1, 3):
        captions, tokens = generated(model, data.test, 4, torch.device("cpu"), "fp32", beams, 10)
        for caption, (words, _) in zip(captions, word_attention(model, data.test.images.model_inputs(
                torch.arange(len(tokens))), tokens)):
            assert " ".join(words) == caption


def test_the_gallery_lists_the_words_its_attention_panels_show(tmp_path):
    run_script(SCRIPT, *smoke(tmp_path, "--num-beams", 2, "--max-caption-tokens", 12), expect_exit=0)
    folder = tmp_path / "E8_caption_peft"
    gallery = json.loads((folder / "gallery.json").read_text())
    predictions = json.loads((folder / "predictions.json").read_text())
    assert len(gallery) == 8 and {row["pick"] for row in gallery} == {"best", "worst"}
    for row in gallery:
        assert row["caption"] == predictions[row["file"]]
        assert " ".join(row["attention_words"]) == row["caption"]


def test_caption_words_follow_clean_caption_for_byte_level_and_multi_byte_text():
    from clip_adapt.captioning import byte_tokenizer
    tokenizer = byte_tokenizer()
    for text in ["a red square .", "ab  cd", " x y.", ""]:
        words = caption_words(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        assert " ".join(word for word, _ in words) == clean_caption(text)
    # "é" is two byte tokens; the second adds no text of its own and still belongs to its word
    assert caption_words(tokenizer, tokenizer("café été", add_special_tokens=False)["input_ids"]) == [
        ("café", [0, 1, 2, 3, 4]), ("été", [6, 7, 8, 9, 10])]
    assert caption_words(tokenizer, tokenizer("a red square .", add_special_tokens=False)["input_ids"])[-1] == (
        "square.", [6, 7, 8, 9, 10, 11, 13])   # the full stop joins its word; the space before it is no one's


def test_a_scoring_clip_with_other_preprocessing_reads_the_test_images_its_own_way(tmp_path):
    """Captions stored at 48 px for the captioner; the 32 px scoring CLIP embeds the test images as its own
    processor makes them from the files (as Hessel et al.'s code does), not the stored pixels shrunk."""
    from PIL import Image
    from clip_adapt.caption_report import score_image_embeddings
    clip, processor, _ = models.tiny_clip()
    captioner_processor = models.clip_image_processor(48)
    data = load_captions(str(write_shape_captions(tmp_path / "shapes", (6, 3), size=40)), captioner_processor,
                         tiny_decoder()[1])
    scored = score_image_embeddings(clip, processor, data.test, torch.device("cpu"), 2, captioner_processor)
    pixels = processor([Image.open(f).convert("RGB") for f in data.test.files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(scored, normalized_image_embeddings(clip, pixels), rtol=1e-4, atol=1e-5)
