"""The known-answer CLIP (tools/known_answer.py) exported to open_clip's format (tools/open_clip_models.py export)
learns as it does through transformers: E1, E2 and E3, run end to end by run_all_experiments.py on each with the
same flags, reach the same test accuracies within one test image (the two backends' floats differ in rounding
only, tests/test_open_clip.py). The fast sibling: test_the_export_of_a_saved_clip_loads_and_classifies_alike."""

import json

import pytest
import torch

from conftest import run_script, tiny_batch

from clip_adapt.models import ZeroShot, load_clip
from tools.open_clip_models import export

METHODS = ("E1_zero_shot_clip", "E2_linear_probe", "E3_shallow_vpt")
# As tests/test_known_answer.py runs its methods (a patience of 25 steps keeps it short).
FLAGS = ("--epochs", "60", "--patience", "25", "--min-steps", "0", "--noise-levels", "0", "--device", "cpu",
         "--quiet")


def exported(clip_dir, folder):
    clip, processor, tokenizer = load_clip(str(clip_dir))
    return export(clip, processor, tokenizer, folder)


@pytest.mark.slow   # trains E2 and E3 to an answer, twice
def test_known_answer_open_clip_export_reaches_the_transformers_accuracies(known_answer_dir, tmp_path):
    directory, _ = known_answer_dir
    models = {"transformers": directory / "clip", "open_clip": exported(directory / "clip", tmp_path / "open_clip")}
    accuracies = {}
    for backend, model in models.items():
        out_dir = tmp_path / backend
        run_script("run_all_experiments.py", "--model", model, "--data", directory / "shapes", *FLAGS,
                   "--output-dir", out_dir, "--experiments", *METHODS, expect_exit=0)
        accuracies[backend] = {name: json.loads((out_dir / name / "metrics.json").read_text()) for name in METHODS}
    test_images = accuracies["transformers"][METHODS[0]]["num_images"]["test"]
    for name in METHODS:
        hf, oc = (accuracies[b][name]["test_accuracy"] for b in ("transformers", "open_clip"))
        assert abs(hf - oc) <= 1 / test_images + 1e-9, (name, hf, oc)
        assert accuracies["open_clip"][name]["model_dims"] == accuracies["transformers"][name]["model_dims"]
    print({name: {b: accuracies[b][name]["test_accuracy"] for b in models} for name in METHODS})


def test_the_export_of_a_saved_clip_loads_and_classifies_alike(tiny_clip_dir, tmp_path):
    """The export as --model loads it (open_clip's local-dir: config, weights, the folder's own tokenizer): the
    same preprocessing and E1's same logits."""
    folder = exported(tiny_clip_dir, tmp_path / "open_clip")
    hf, hf_processor, hf_tokenizer = load_clip(str(tiny_clip_dir))
    oc, oc_processor, oc_tokenizer = load_clip(str(folder))
    assert type(oc).__module__.startswith("open_clip")
    assert oc_processor.crop_size == hf_processor.crop_size
    assert list(oc_processor.image_mean) == list(hf_processor.image_mean)
    assert list(oc_processor.image_std) == list(hf_processor.image_std)
    pixels = tiny_batch(hf_processor)
    classes = ["glioma", "no tumor"]
    with torch.no_grad():
        torch.testing.assert_close(ZeroShot(oc, oc_tokenizer, classes)(pixels),
                                   ZeroShot(hf, hf_tokenizer, classes)(pixels), rtol=1e-5, atol=1e-5)
