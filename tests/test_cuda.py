"""What only a CUDA GPU shows: the bf16 path against fp32, the fp32 heads' precision, pinned host data.
Skipped without a GPU; tools/gpu_check.sh runs them on one."""

import copy

import pytest
import torch

if not torch.cuda.is_available():   # before the imports below: gpu_check.sh's dry run collects this file
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import common  # noqa: E402
from conftest import tiny_batch  # noqa: E402

from clip_adapt import data as data_module  # noqa: E402
from clip_adapt.data import MRIData, Split  # noqa: E402
from clip_adapt.models import Fp32Linear, ImageClassifier, TextHead, similarity_logits, tiny_clip  # noqa: E402
from clip_adapt.training import TrainConfig, predict, train  # noqa: E402


def uint8_split(n: int, size: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return Split(pixels, torch.arange(n) % 4, [f"img{i}" for i in range(n)], (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


def test_bf16_logits_on_the_gpu_match_fp32_on_the_cpu():
    clip, image_processor, _ = tiny_clip()
    model = ImageClassifier(clip, 4, num_prompts=2, prompt_layers=[0, 1, 2])
    pixels = tiny_batch(image_processor, 8)
    reference = predict(model, pixels, 8, torch.device("cpu"), "fp32")
    on_gpu = predict(copy.deepcopy(model).cuda(), pixels, 8, torch.device("cuda"), "bf16")
    assert torch.linalg.norm(on_gpu - reference) / torch.linalg.norm(reference) < 2e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp32_heads_and_similarities_compute_without_tf32_on_the_gpu_as_the_run_sets_it_up(compiled):
    """pick_device turns TF32 on for the fp32 leftovers outside autocast; the heads that must stay fp32
    (Fp32Linear, TextHead, similarity_logits) turn it off inside (models.exact_fp32) and must land at fp32's
    error, far under TF32's ~3e-4, under bf16 autocast too; TF32 is on again afterwards."""
    device = common.pick_device("cuda")
    assert torch.backends.cuda.matmul.allow_tf32
    clip, _, tokenizer = tiny_clip()
    clip = clip.to(device)
    linear = Fp32Linear(512, 4).to(device)
    text_head = TextHead(clip, tokenizer, ["a", "b", "c", "d"]).to(device)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(256, 512, device=device, generator=generator)
    image = torch.nn.functional.normalize(torch.randn(256, 16, device=device, generator=generator), dim=-1)
    text = text_head.class_embeddings
    heads = {
        "Fp32Linear": (linear, x, x.double() @ linear.weight.double().T + linear.bias.double()),
        "TextHead": (text_head, image, text_head.logit_scale.double()
                     * torch.nn.functional.normalize(image.double(), dim=-1) @ text.double().T),
        "similarity_logits": (lambda e: similarity_logits(clip, e, text), image,
                              clip.logit_scale.exp().double() * image.double() @ text.double().T),
    }
    for name, (head, inputs, reference) in heads.items():
        run = torch.compile(head) if compiled else head
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(inputs)
        assert out.dtype == torch.float32, name
        error = (torch.linalg.norm(out.double() - reference) / torch.linalg.norm(reference)).item()
        assert error < 1e-5, (name, error)
        assert torch.backends.cuda.matmul.allow_tf32, name   # back on for the rest of the run


def test_data_kept_in_pinned_host_memory_trains_as_data_on_the_gpu(monkeypatch, tmp_path):
    clip, _, _ = tiny_clip()
    splits = [uint8_split(24, 32, seed) for seed in range(3)]
    results = []
    for share in (1.0, 0.0):   # 0: nothing fits, so the images stay in pinned host memory
        monkeypatch.setattr(data_module, "DEVICE_SHARE", share)
        data = MRIData(["a", "b", "c", "d"], *splits).to("cuda")
        assert data.train.inputs.is_pinned() == (share == 0.0)
        torch.manual_seed(0)
        model = ImageClassifier(copy.deepcopy(clip), 4, num_prompts=1)
        config = TrainConfig(epochs=2, patience=2, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_epochs=0, seed=0,
                             device=torch.device("cuda"), checkpoint_dir=tmp_path / str(share), precision="fp32")
        result = train(model, data.train, data.val, data.test, config)
        results.append([row["train_loss"] for row in result.history])
    assert results[0] == pytest.approx(results[1], rel=1e-5)
