"""E10 CoOp (clip_adapt.models.CoOp, clip_adapt.prompts.TextContext): the reference's logits for each class-token
position and for a word-initialised context, KgCoOp's loss, the parts that train; and, slow, the known answer."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, run_script, tiny_batch

from clip_adapt.models import CoOp, KgCoOp, class_text_embeddings, tiny_clip

SAME = dict(rtol=1e-5, atol=1e-5)
CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]

# KaiyangZhou/CoOp trainers/coop.py (CustomCLIP, PromptLearner, TextEncoder) run unchanged on a CPU in fp32 with
# the small CLIP of small_clip(), converted to OpenAI's layout for its clip/model.py CLIP (attention's q, k, v
# concatenated, projections transposed); CLASS_NAMES; N_CTX 4, CSC False, the context set to context_and_pixels()'s.
# Stubbed: dassl (imports only); its BPE file holds no merges, so its vocabulary is small_tokenizer()'s.
REFERENCE_LOGITS = {
    "end": [
        [4.624193, 1.488195, 3.855266, 4.192707],
        [4.969569, 1.985769, 4.667969, 5.126373],
    ],
    "middle": [
        [3.402354, 0.796342, 2.099259, 3.523677],
        [3.845223, 0.902122, 2.993602, 4.430656],
    ],
    "front": [
        [4.278289, 0.458805, 2.564532, 3.956113],
        [4.399327, 0.212959, 3.329999, 4.783460],
    ],
}
# The reference's token ids of 'X X X X <name>.' up to <|endoftext|> ('X', its placeholder, is id 343).
REFERENCE_IDS = [
    [512, 343, 343, 343, 343, 70, 75, 72, 78, 76, 320, 269, 513],
    [512, 343, 343, 343, 343, 76, 68, 77, 72, 77, 70, 72, 78, 76, 320, 269, 513],
    [512, 343, 343, 343, 343, 77, 334, 83, 84, 76, 78, 337, 269, 513],
    [512, 343, 343, 343, 343, 79, 72, 83, 84, 72, 83, 64, 81, 344, 269, 513],
]
# CTX_INIT 'x y z a' (four words of one token each here, as 'a photo of a' is in CLIP's vocabulary) with
# N_CTX 16, which the words override to 4: the logits at the start.
REFERENCE_INIT_LOGITS = [
    [1.047008, -1.293082, 2.549549, 3.417585],
    [0.798662, -1.732506, 2.709510, 3.771098],
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, in byte order: the order of CLIP's vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def small_tokenizer():
    """CLIP's tokenizer with CLIP's vocabulary layout and no merges: 256 characters, the same with </w>, then
    <|startoftext|> (512) and <|endoftext|> (513), as the reference's SimpleTokenizer builds it from an empty
    merges file."""
    from transformers import CLIPTokenizer
    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])


def small_clip():
    """Widths that OpenAI's CLIP class accepts (vision heads = width / 64), seed 0."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=514, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def context_and_pixels():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    return 0.02 * torch.randn(4, 64, generator=g), pixels


def test_the_class_sentences_are_the_references():
    model = CoOp(small_clip(), small_tokenizer(), CLASS_NAMES, num_context=4)
    ids = model.text_context.input_ids
    for row, reference in zip(ids, REFERENCE_IDS):
        row = row[:len(reference)].clone()
        row[1:5] = 343   # the placeholders: any id serves, its embedding is replaced
        assert row.tolist() == reference


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_logits_equal_the_reference_for_each_class_token_position(position):
    context, pixels = context_and_pixels()
    model = CoOp(small_clip(), small_tokenizer(), CLASS_NAMES, num_context=4, class_token_position=position)
    with torch.no_grad():
        model.text_context.context.copy_(context)
        torch.testing.assert_close(model(pixels), torch.tensor(REFERENCE_LOGITS[position]), **SAME)


def test_a_context_started_from_words_equals_the_reference():
    _, pixels = context_and_pixels()
    clip, tokenizer = small_clip(), small_tokenizer()
    model = CoOp(clip, tokenizer, CLASS_NAMES, num_context=16, context_init="x y z a")
    assert len(model.text_context.context) == 4   # one vector per token of the words
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), torch.tensor(REFERENCE_INIT_LOGITS), **SAME)


def test_kgcoop_adds_one_minus_the_mean_cosine_to_the_hand_written_text():
    clip, processor, tokenizer = tiny_clip()
    torch.manual_seed(0)
    model = KgCoOp(clip, tokenizer, list(CLASSES), num_context=4, weight=8.0, templates=("a photo of a {}.",))
    pixels, labels = tiny_batch(processor, 4), torch.arange(4)
    with torch.no_grad():
        loss, correct = model(pixels, labels)
        logits = model(pixels)
        hand_written = class_text_embeddings(clip, tokenizer, list(CLASSES), ("a photo of a {}.",))
        cosine = (model.class_embeddings() * hand_written).sum(-1).mean()
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, labels) + 8.0 * (1 - cosine)), rel=1e-5)
    assert int(correct) == int((logits.argmax(1) == labels).sum())
    assert not getattr(CoOp(clip, tokenizer, list(CLASSES), num_context=4), "own_loss", False)   # cross-entropy alone


def test_only_the_context_trains_and_the_image_tower_is_clips():
    clip, processor, tokenizer = tiny_clip()
    frozen = {name: p.clone() for name, p in clip.state_dict().items()}
    model = CoOp(clip, tokenizer, list(CLASSES), num_context=4)
    (part,) = model.parts()
    assert list(part.tensors) == ["text_context.context"]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"text_context.context"}
    optimizer = torch.optim.AdamW([model.text_context.context], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(tiny_batch(processor, 4)), torch.arange(4)).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in clip.state_dict().items())
    assert not model.clip.training


def test_script_records_its_context(tmp_path):
    run_script("E10_coop.py", "--smoke", "--quiet", "--noise-levels", 0, "--output-dir", tmp_path,
               "--context-init", "x y", "--class-token-position", "middle", expect_exit=0)
    metrics = json.loads((tmp_path / "E10_coop" / "metrics.json").read_text())
    assert metrics["num_context"] == 2 and metrics["class_token_position"] == "middle"
    assert metrics["trainable_params"] == 2 * 24   # the tiny CLIP's text width


# --------------------------------------------------------------------------- CoCoOp (E12)

# KaiyangZhou/CoOp trainers/cocoop.py (CustomCLIP, PromptLearner), run unchanged as coop.py above, in eval mode:
# N_CTX 4, CTX_INIT '', PREC fp32, the context and the meta-network's weights from cocoop_inputs().
REFERENCE_COCOOP_LOGITS = [
    [1.445963, -2.531891, 1.029950, 4.295625],
    [0.375423, -3.023946, 0.580422, 3.654862],
    [0.879313, -2.861023, 1.180125, 4.425542],
]


def cocoop_inputs(model):
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        model.text_context.context.copy_(0.02 * torch.randn(4, 64, generator=g))
        for name in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):   # the reference's order
            p = model.meta_net.get_parameter(name)
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pixels


def test_cocoop_logits_equal_the_reference():
    from clip_adapt.models import CoCoOp
    model = CoCoOp(small_clip(), small_tokenizer(), CLASS_NAMES, num_context=4, context_init=None).eval()
    pixels = cocoop_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), torch.tensor(REFERENCE_COCOOP_LOGITS), **SAME)
        # One image at a time gives the same: each image's context is its own.
        torch.testing.assert_close(model(pixels[1:2]), torch.tensor(REFERENCE_COCOOP_LOGITS[1:2]), **SAME)


def test_cocoop_trains_its_context_and_meta_net_only(tmp_path):
    from clip_adapt.models import CoCoOp
    clip, processor, tokenizer = tiny_clip()
    model = CoCoOp(clip, tokenizer, list(CLASSES))
    assert [part.name for part in model.parts()] == ["text context", "meta-net"]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {name for part in model.parts() for name in part.tensors}
    run_script("E12_cocoop.py", "--smoke", "--quiet", "--noise-levels", 0, "--output-dir", tmp_path, expect_exit=0)
    metrics = json.loads((tmp_path / "E12_cocoop" / "metrics.json").read_text())
    # 9 context vectors: "a photo of a" is 9 tokens in the tiny tokenizer; meta-net 16 -> 1 -> 24
    assert metrics["trainable_params"] == 9 * 24 + (16 * 1 + 1) + (1 * 24 + 24)
    assert metrics["text_sequences_per_step"] == 32 * 4


def test_cocoop_below_width_16_keeps_one_meta_net_unit_that_conditions_on_the_image():
    # The reference's width // 16 is zero below 16: a meta-net that shifts nothing would make CoCoOp CoOp.
    from transformers import CLIPConfig, CLIPModel
    from clip_adapt.models import CoCoOp, tiny_tokenizer
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tokenizer),
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8),
                        projection_dim=8)
    torch.manual_seed(0)
    model = CoCoOp(CLIPModel(config).eval(), tokenizer, list(CLASSES)).eval()
    assert model.meta_net.linear1.out_features == 1
    torch.nn.init.normal_(model.meta_net.linear2.weight)
    torch.nn.init.normal_(model.meta_net.linear1.weight)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        conditioned = model(pixels)
        torch.nn.init.zeros_(model.meta_net.linear2.weight)
        torch.nn.init.zeros_(model.meta_net.linear2.bias)
        unconditioned = model(pixels)
        coop = CoOp.forward(model, pixels)
    # Without the meta-net's shift CoCoOp is CoOp exactly; with it, the logits are the image's own.
    torch.testing.assert_close(unconditioned, coop)
    assert (conditioned - coop).abs().max() > 1e-3
