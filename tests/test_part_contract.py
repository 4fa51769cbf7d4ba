"""The part contract: every trainable part of every experiment script's model earns its place.

Driven by the registry: each discovered script (clip_adapt.runner.experiment_scripts, E1-E8 and any added
later) builds its model with its own build_model from its default flags and from each of its MODEL_VARIANTS,
on the tiny random CLIP (and the tiny random GPT-2 for captioning); each classification script's also on
BiomedCLIP's architecture, small and random, through open_clip (tests/conftest.py tiny_biomedclip_dir). The model
names its parts in parts() (clip_adapt.base.Part): the prompts, the text context, an adapter, a prefix, LoRA, a head, the backbone. For each:

- every tensor gets a finite gradient, the part a non-zero one at once, and within a few optimiser steps each of
  its tensors has had a non-zero gradient (a zero-initialised half, LoRA's B or the adapter's up-projection,
  makes its partner's first gradient exactly zero: correct, and why a few steps are allowed);
- perturbing it changes the output (the logits; for captioning the next-token loss);
- a part that claims an identity start leaves the base model's output as it is when just built;
- removing a removable part gives the base model's output back.

The base model is not asked of the model itself: it is a copy of it with every forward hook taken off its modules
and every peft adapter layer replaced by the layer it wraps (`bare`), which is how every part here joins the frozen
model. Heads and backbones are checked by the gradient and perturbation rules only. For captioning, under greedy
decoding and beam search, each generated step's logits equal a teacher-forced pass over the generated tokens.
"""

import copy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, REPO, tiny_batch

from clip_adapt.models import load_clip, tiny_clip
from clip_adapt.prompts import removed_together
from clip_adapt.runner import experiment_scripts

STEPS = 5             # optimiser steps within which every tensor of a part must have had a non-zero gradient
CHANGED = 1e-4        # a perturbed part moves the output by more than this (float noise is about 1e-7 here)
SAME = dict(rtol=1e-5, atol=1e-5)   # the base model's output, computed another way
TEACHER_FORCED = dict(rtol=0, atol=1e-4)


def variants(script) -> list[tuple[str, ...]]:
    return [(), *map(tuple, getattr(script.module, "MODEL_VARIANTS", ()))]


def fresh_clip(model_dir=None):
    """(CLIP, image processor, tokenizer): the tiny random CLIP, or the model saved in model_dir (the tiny
    BiomedCLIP-architecture open_clip folder) loaded as --model loads it."""
    return tiny_clip() if model_dir is None else load_clip(str(model_dir))


def build(script, flags: tuple[str, ...], model_dir=None):
    """The script's model as its main() builds it (seed 0), on a fresh tiny CLIP (or the model in model_dir), or
    on its own tiny backbone (--smoke's) where it brings one."""
    import common
    args = script.default_args("--smoke", *flags)
    clip, _, tokenizer = fresh_clip(model_dir) if script.takes_clip else script.load_backbone(args)
    common.seed_everything(0)
    return script.build_model(clip, tokenizer, list(CLASSES) if script.task == "classification" else [], args)


def batch(script, seed: int = 0, model_dir=None):
    """(pixels, targets): four images, and their labels or, for captioning, caption token ids (start, tokens,
    end, padding as -100)."""
    _, processor, _ = fresh_clip(model_dir)
    pixels = tiny_batch(processor, 4)
    if script.task == "classification":
        return pixels, torch.arange(4)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 256, (4, 9), generator=generator)
    targets[:, 0], targets[:, -1] = 256, 256   # the byte tokenizer's <|endoftext|> starts and ends a caption
    targets[1, 6:] = -100
    return pixels, targets


def loss_of(model, task: str, pixels, targets) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(model(pixels), targets)
    return model(pixels, targets)[0]


@torch.no_grad()
def output(model, task: str, pixels, targets) -> torch.Tensor:
    """What the contract compares: the logits, or the captioning loss (both in eval mode)."""
    model.eval()
    return model(pixels) if task == "classification" else model(pixels, targets)[0]


def bare(model):
    """The base model: a copy with every forward hook removed from its modules and every peft adapter layer
    replaced by the layer it wraps. Every part here joins the frozen model by one of the two."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    base = copy.deepcopy(model)
    for module in base.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    return base


def perturb(tensors: dict, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors.values():
            scale = max(float(tensor.float().std()) if tensor.numel() > 1 else 0.0, 0.1)
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator).to(tensor))


def train_steps(model, task: str, pixels, targets, steps: int = STEPS) -> dict[str, bool]:
    """Adam steps on every trainable tensor; returns, per tensor, whether it has had a non-zero gradient."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    moved = dict.fromkeys(trainable, False)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, task, pixels, targets).backward()
        for name, p in trainable.items():
            moved[name] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        optimizer.step()
    return moved


def cases():
    """One per (script, command line, part); a script whose model trains nothing gets one case saying so."""
    for script in experiment_scripts():
        for flags in variants(script):
            label = script.short_name + "".join(f"[{flag}]" for flag in flags if not flag.startswith("--"))
            parts = [part.name for part in build(script, flags).parts()] or [None]
            for part in parts:
                yield pytest.param(script, flags, part, id=f"{label}-{part or 'no parts'}")


CASES = list(cases())
MODELS = list({(case.values[0].name, case.values[1]): case for case in CASES}.values())


def the_part(model, name: str):
    return next(part for part in model.parts() if part.name == name)


@pytest.mark.parametrize("script, flags, part_name", CASES)
def test_each_part_learns_moves_the_output_and_is_removed_cleanly(script, flags, part_name):
    check_part(script, flags, part_name)


# The same contract on BiomedCLIP's architecture (small and random: a timm trunk, a BERT text tower; open_clip).
CLASSIFICATION_CASES = [case for case in CASES if case.values[0].task == "classification" and case.values[0].takes_clip]


@pytest.mark.parametrize("script, flags, part_name", CLASSIFICATION_CASES)
def test_each_part_holds_on_biomedclips_architecture(script, flags, part_name, tiny_biomedclip_dir):
    check_part(script, flags, part_name, tiny_biomedclip_dir)


def check_part(script, flags: tuple[str, ...], part_name: str | None, model_dir=None) -> None:
    task = script.task
    pixels, targets = batch(script, model_dir=model_dir)
    model = build(script, flags, model_dir)
    if part_name is None:   # E1: nothing trains
        assert not any(p.requires_grad for p in model.parameters()), script.name
        return
    part = the_part(model, part_name)
    assert part.tensors, f"{script.name} {flags}: part {part_name} has no trainable tensors"

    # Gradients: finite everywhere, non-zero for the part at once.
    model.train()
    torch.manual_seed(0)
    loss_of(model, task, pixels, targets).backward()
    for name, tensor in part.tensors.items():
        assert tensor.grad is not None, f"{script.name} {flags}: {part_name} tensor {name} gets no gradient"
        assert torch.isfinite(tensor.grad).all(), f"{script.name} {flags}: {part_name} {name}: non-finite gradient"
    assert any(bool(t.grad.abs().sum() > 0) for t in part.tensors.values()), \
        f"{script.name} {flags}: {part_name}: every gradient is zero"
    model.zero_grad(set_to_none=True)

    # Identity start: as built, the part leaves the base model's output as it is.
    built = output(model, task, pixels, targets)
    if part.identity_start:
        base = output(bare(model), task, pixels, targets)
        assert torch.allclose(built, base, **SAME), (
            f"{script.name} {flags}: {part_name} claims an identity start, but the model as built differs from the "
            f"base model by {(built - base).abs().max():.3g}")

    # Perturbing the part changes the output.
    perturbed = build(script, flags, model_dir)
    perturb(the_part(perturbed, part_name).tensors)
    change = float((output(perturbed, task, pixels, targets) - built).abs().max())
    assert change > CHANGED, f"{script.name} {flags}: perturbing {part_name} changes the output by only {change:.3g}"

    # A few optimiser steps: every tensor of the part has had a non-zero gradient.
    moved = train_steps(model, task, pixels, targets)
    still = [name for name in part.tensors if not moved[name]]
    assert not still, f"{script.name} {flags}: {part_name}: no non-zero gradient in {STEPS} steps for {still}"

    # Removal: the base model's output back, and the part back afterwards.
    if part.removed is not None:
        trained = output(model, task, pixels, targets)
        removable = [p for p in model.parts() if p.removed is not None]
        with removed_together([each.removed for each in removable]):
            all_removed = output(model, task, pixels, targets)
        base = output(bare(model), task, pixels, targets)
        assert torch.allclose(all_removed, base, **SAME), (
            f"{script.name} {flags}: with {', '.join(p.name for p in removable)} removed the output differs from "
            f"the base model by {(all_removed - base).abs().max():.3g}")
        with part.removed():
            alone = output(model, task, pixels, targets)
            perturb(part.tensors, seed=2)
            alone_perturbed = output(model, task, pixels, targets)
        assert torch.equal(alone, alone_perturbed), f"{script.name} {flags}: {part_name} still acts when removed"
        assert not torch.allclose(trained, alone, **SAME), f"{script.name} {flags}: removing {part_name} changes nothing"


@pytest.mark.parametrize("script, flags", [case.values[:2] for case in MODELS],
                         ids=[case.id.rsplit("-", 1)[0] for case in MODELS])
def test_the_parts_are_exactly_what_trains(script, flags):
    model = build(script, flags)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    declared = [id(t) for part in model.parts() for t in part.tensors.values()]
    assert len(declared) == len(set(declared)), f"{script.name} {flags}: a tensor is in two parts"
    assert set(declared) == trainable, f"{script.name} {flags}: trainable tensors outside every part"
    if not trainable:
        return
    model.train()
    pixels, targets = batch(script)
    loss_of(model, script.task, pixels, targets).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{script.name} {flags}: {name}"


CAPTIONING = [case for case in MODELS if case.values[0].task == "captioning"]


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam search"])
@pytest.mark.parametrize("script, flags", [case.values[:2] for case in CAPTIONING],
                         ids=[case.id.rsplit("-", 1)[0] for case in CAPTIONING])
def test_generated_logits_equal_teacher_forcing(script, flags, num_beams):
    """Each step of cached generation sees what a teacher-forced pass over the generated tokens sees. The parts
    are moved first (a few training steps), so that a zero-initialised part is not trivially consistent."""
    model = build(script, flags)
    pixels, targets = batch(script)
    train_steps(model, script.task, pixels, targets, steps=2)
    model.eval()
    with torch.no_grad():
        out = model.generate(pixels, num_beams=num_beams, max_new_tokens=6, min_new_tokens=6, output_logits=True,
                             return_dict_in_generate=True)
        forced = model.model(pixel_values=pixels, decoder_input_ids=out.sequences[:, :-1]).logits
    steps = len(out.logits)
    assert steps == 6 and out.sequences.shape[1] == 7
    rows = (out.beam_indices[:, :steps] if num_beams > 1 else
            torch.arange(len(pixels))[:, None].expand(-1, steps))
    for t in range(steps):
        live = rows[:, t] >= 0   # beams that had ended are padded with -1
        generated = out.logits[t][rows[live, t]]
        torch.testing.assert_close(generated, forced[live, t], **TEACHER_FORCED,
                                   msg=lambda m: f"{script.name} {flags}, step {t}: {m}")


# --------------------------------------------------------------------------- the contract can fail

PLANTED = {
    "prompts created but never inserted": (
        "clip_adapt/prompts.py", "        if self._removed:\n            return None\n        hidden = args[0]",
        "        return None\n        hidden = args[0]", "E3-prompts"),
    "a prefix that never reaches attention": (
        "clip_adapt/captioning.py", '        return args, {**kwargs, "prefix_key_values": self._key_values[module.layer_idx]}',
        "        return None", "E8[prefix]-prefix"),
}


def script_named(short_name: str):
    return next(script for script in experiment_scripts() if script.short_name == short_name)


def test_a_no_op_planted_in_this_process_fails_the_contract(monkeypatch):
    """The fast sibling of the test below: the same two no-ops planted by patching the classes here."""
    from clip_adapt.captioning import PrefixTuning
    from clip_adapt.prompts import VisualPrompts
    monkeypatch.setattr(VisualPrompts, "_put_prompts", lambda self, *args, **kwargs: None)
    with pytest.raises(AssertionError, match="prompts tensor prompts.prompts gets no gradient"):
        check_part(script_named("E3"), (), "prompts")
    monkeypatch.setattr(PrefixTuning, "_give_layer_its_prefix", lambda self, *args, **kwargs: None)
    with pytest.raises(AssertionError, match="prefix tensor prefix.encoder.embedding.weight gets no gradient"):
        check_part(script_named("E8"), ("--peft", "prefix"), "prefix")


@pytest.mark.slow   # a pytest run of its own in a copy of the repository, about 15 s each
@pytest.mark.parametrize("planted", list(PLANTED))
def test_a_planted_no_op_part_fails_the_contract(planted, tmp_path):
    """The no-op planted in a copy of the repository: the contract run there fails on that part, at its first
    rule (the part gets no gradient)."""
    path, original, broken, case = PLANTED[planted]
    copy_root = tmp_path / "repo"
    copy_root.mkdir()
    for name in ("common.py", "pyproject.toml", "clip_adapt", "tests", "sample_data",
                 *(s.path.name for s in experiment_scripts())):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy_root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy_root / name)
    source = (copy_root / path).read_text()
    assert source.count(original) == 1, f"the code to break moved: {path}"
    (copy_root / path).write_text(source.replace(original, broken))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                          f"tests/test_part_contract.py::test_each_part_learns_moves_the_output_and_is_removed_cleanly"
                          f"[{case}]"], cwd=copy_root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 failed" in run.stdout and "gets no gradient" in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("script, flags", [case.values[:2] for case in CAPTIONING],
                         ids=[case.id.rsplit("-", 1)[0] for case in CAPTIONING])
def test_the_eager_attention_of_the_attention_maps_computes_what_the_model_computes(script, flags):
    """The attention maps switch the decoder to eager attention (sdpa returns no weights), as word_attention
    does: every part must come along, the prefix included."""
    from clip_adapt.captioning import set_attention
    model = build(script, flags)
    pixels, targets = batch(script)
    train_steps(model, script.task, pixels, targets, steps=2)
    language_model = model.model.decoder
    language_model = getattr(language_model, "get_base_model", lambda: language_model)()
    usual = output(model, script.task, pixels, targets)
    previous = language_model.config._attn_implementation
    set_attention(language_model, model.eager_attention())
    try:
        eager = output(model, script.task, pixels, targets)
    finally:
        set_attention(language_model, previous)
    torch.testing.assert_close(eager, usual, rtol=1e-5, atol=1e-5)
