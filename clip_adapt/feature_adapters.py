"""Methods on CLIP's frozen image embedding that still classify by CLIP's text embeddings: Tip-Adapter's cache
model (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter) and CLIP-Adapter's residual bottleneck (Gao et al.,
IJCV 2023; gaopengcuhk/CLIP-Adapter). Their image tower is frozen, so each embedding is computed once and shared
with E2's cache (clip_adapt.training.cached_embeddings, keyed by the same tower and features); what trains works
on those embeddings, and the classifier built around it takes pixels like every other (for the final
evaluation and the noise-robustness check). The text classifier is E1's: the same templates, CLIP's own learned
logit scale (exp(4.6052) = 100 for OpenAI's ViT-B/16, the reference's fixed 100).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from clip_adapt.backbone import backbone
from clip_adapt.base import Part
from clip_adapt.models import ZERO_SHOT_TEMPLATES, Classifier, class_text_embeddings, exact_fp32, freeze, trainable

# Tip-Adapter's hyper-parameter search (utils.py search_hp): `steps` values from 0.1 up to, not including,
# `scale`. The reference's configs set (beta, alpha) scales per data set, from (7, 3) for ImageNet to (13, 13);
# (12, 10) is its EuroSAT setting, the one out-of-domain set among them. Steps: (200, 20) in every config.
SEARCH_SCALE = (12.0, 10.0)
SEARCH_STEPS = (200, 20)
INIT_BETA, INIT_ALPHA = 1.0, 2.0   # the reference's init_beta (every config) and init_alpha (EuroSAT, DTD)


def search_values(scale: float, steps: int) -> list[float]:
    """The reference's grid: i · (scale − 0.1) / steps + 0.1 for i in 0 .. steps − 1."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class TipCache(nn.Module):
    """Tip-Adapter on unit image embeddings f: logits = s · f Tᵀ + α · exp(−β (1 − f Kᵀ)) V, with T the class text
    embeddings and s CLIP's logit scale (the zero-shot classifier, E1's logits), K the cache's keys (the
    L2-normalised training embeddings, one row per image) and V their one-hot labels. With α = 0 it is E1.
    trainable_keys: Tip-Adapter-F, whose keys are fine-tuned (the reference's `adapter`, a linear layer holding
    them). The cache is empty until fill()."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: torch.Tensor, trainable_keys: bool = False,
                 alpha: float = INIT_ALPHA, beta: float = INIT_BETA):
        super().__init__()
        classes, width = class_embeddings.shape
        self.register_buffer("class_embeddings", class_embeddings.float().clone())
        self.register_buffer("logit_scale", logit_scale.detach().float().clone())
        self.register_buffer("values", torch.zeros(0, classes))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.keys = nn.Parameter(torch.zeros(0, width), requires_grad=trainable_keys)

    def fill(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """The cache from the training embeddings (any scale; normalised here) and their labels."""
        device = self.class_embeddings.device
        keys = F.normalize(embeddings.float().to(device), dim=-1)
        self.keys = nn.Parameter(keys, requires_grad=self.keys.requires_grad)
        self.values = F.one_hot(labels.long().to(device), len(self.class_embeddings)).float()

    @property
    def size(self) -> dict:
        """The cache: images, and the numbers it stores (keys and values)."""
        return {"images": len(self.keys), "numbers": self.keys.numel() + self.values.numel()}

    def zero_shot_logits(self, unit: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * unit @ self.class_embeddings.T

    def cache_logits(self, unit: torch.Tensor, beta) -> torch.Tensor:
        """exp(−β (1 − f Kᵀ)) V, before α."""
        return torch.exp(-beta * (1 - unit @ self.keys.T)) @ self.values

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with exact_fp32(embeddings.device.type):
            unit = F.normalize(embeddings.float(), dim=-1)
            return self.zero_shot_logits(unit) + self.alpha * self.cache_logits(unit, self.beta)

    @torch.no_grad()
    def search(self, embeddings: torch.Tensor, labels: torch.Tensor, scale=SEARCH_SCALE, steps=SEARCH_STEPS) -> dict:
        """Tip-Adapter's search of (β, α) by accuracy on the images given (this project: the validation split):
        β over the outer loop, α the inner, the first best kept (the reference's strict `>`), then sets them.
        Returns the choice and the grid of accuracies (rows: β, columns: α)."""
        unit = F.normalize(embeddings.float().to(self.keys.device), dim=-1)
        labels = labels.to(unit.device)
        zero_shot = self.zero_shot_logits(unit)
        betas, alphas = search_values(scale[0], steps[0]), search_values(scale[1], steps[1])
        alpha_column = torch.tensor(alphas, device=unit.device)[:, None, None]
        correct = []
        for beta in betas:
            logits = zero_shot + alpha_column * self.cache_logits(unit, beta)   # (alphas, images, classes)
            correct.append((logits.argmax(-1) == labels).sum(-1).tolist())
        best, where = -1, (0, 0)
        for i, row in enumerate(correct):
            for j, count in enumerate(row):
                if count > best:
                    best, where = count, (i, j)
        self.beta.fill_(betas[where[0]])
        self.alpha.fill_(alphas[where[1]])
        return {"beta": betas[where[0]], "alpha": alphas[where[1]], "accuracy": best / len(labels),
                "images": len(labels), "betas": betas, "alphas": alphas,
                "accuracy_grid": [[count / len(labels) for count in row] for row in correct]}


def embeddings_of(model: nn.Module, splits: dict, config) -> dict:
    """Each pixel split with its image embeddings (model.embed) as inputs, computed here: what a known-answer run
    fits on (the scripts read them from the disk cache, clip_adapt.training.cached_embeddings)."""
    from clip_adapt.training import batched
    model.to(config.device)
    return {name: split.with_inputs(batched(model.embed, split, 2 * config.batch_size, config.device,
                                            config.precision, desc=f"image embeddings ({name})"))
            for name, split in splits.items()}


class FrozenImageTower(Classifier):
    """CLIP's frozen image tower and projection, then a method (`self.on_embedding`) on the projected image
    embedding, as E2's ImageClassifier.embed computes it (so that they share the embedding cache)."""
    frozen = ("vision", "projection")

    def __init__(self, clip):
        super().__init__()
        self.backbone = backbone(clip)
        self.vision, self.projection = freeze(self.backbone.vision), freeze(self.backbone.projection)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.on_embedding(self.embed(pixels))


class TipAdapter(FrozenImageTower):
    """E9: CLIP's frozen image tower and projection, then TipCache on the image embedding."""

    def __init__(self, clip, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES,
                 finetune: bool = False, alpha: float = INIT_ALPHA, beta: float = INIT_BETA):
        super().__init__(clip)
        self.cache = TipCache(class_text_embeddings(clip, tokenizer, class_names, templates),
                              backbone(clip).logit_scale.exp(), finetune, alpha, beta)

    @property
    def on_embedding(self) -> TipCache:
        return self.cache

    def fit(self, splits: dict, config, scale=SEARCH_SCALE, steps=SEARCH_STEPS):
        """fit_tip_adapter on pixel splits (train, val, test), their embeddings computed here (the scripts use
        the disk cache instead); config trains the keys only if they train (--finetune). The TrainResult."""
        embeddings = embeddings_of(self, splits, config)
        finetune = self.cache.keys.requires_grad   # on embeddings: no augmentation (a flip would need the tower)
        return fit_tip_adapter(self, embeddings, config.checkpoint_dir,
                               dataclasses.replace(config, augment=False) if finetune else None, scale, steps)[0]

    def parts(self) -> list[Part]:
        keys = trainable(self.cache, "cache.")
        return [Part("cache keys", keys)] if keys else []


def fit_tip_adapter(model: TipAdapter, embeddings: dict, checkpoint_dir, config=None, scale=SEARCH_SCALE,
                    steps=SEARCH_STEPS):
    """Tip-Adapter on the image embeddings of each split (clip_adapt.data.Split with embeddings as inputs): the
    cache from the training split; with a training config (Tip-Adapter-F), its keys trained by the project's
    loop (clip_adapt.training.train, the epoch chosen on validation) at the reference's initial α and β; then
    (β, α) searched on the validation split, and the cache written to checkpoint_dir/best.safetensors. Test plays
    no part. Returns (TrainResult, what metrics.json records)."""
    from pathlib import Path
    from safetensors.torch import save_file
    from clip_adapt import timing
    from clip_adapt.base import atomic_save, is_main_process
    from clip_adapt.training import TrainResult, loss_and_accuracy, train
    cache = model.cache
    with timing.phase("training"):
        cache.fill(embeddings["train"].inputs, embeddings["train"].labels)
        result = None
        if config is not None:
            result = train(cache, embeddings["train"], embeddings["val"], embeddings["test"], config)
        search = cache.search(embeddings["val"].inputs, embeddings["val"].labels, scale, steps)
    cache.eval()
    row = {"epoch": result.best_epoch if result else 1}
    with torch.no_grad():
        for name, split in embeddings.items():
            logits = cache(split.inputs.to(cache.keys.device)).float().cpu()
            row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(logits, split.labels)
    row["lr"] = 0.0
    selection = {"metric": "val_accuracy of (beta, alpha)", "value": search["accuracy"], "images": search["images"]}
    if result is None:
        result = TrainResult([row], best_epoch=1, epochs_run=1, convergence_reason="training-free: the cache is "
                             "the training embeddings, (beta, alpha) searched on validation",
                             selection={"epoch": 1, **selection})
    else:
        result.selection = {**result.selection, "then": selection}
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in
                 (("keys", cache.keys), ("values", cache.values), ("alpha", cache.alpha), ("beta", cache.beta))}
        atomic_save(folder / "best.safetensors", lambda p: save_file(state, p))
    grid = [{"beta": beta, "alpha": alpha, "val_accuracy": accuracy} for beta, accuracies in
            zip(search["betas"], search["accuracy_grid"]) for alpha, accuracy in zip(search["alphas"], accuracies)]
    return result, {"solver": "adamw" if config is not None else "search", "alpha": search["alpha"],
                    "beta": search["beta"], "search_scale": list(scale), "search_steps": list(steps),
                    "search_val_accuracy": search["accuracy"], "cache_size": cache.size,
                    "after_search": {k: v for k, v in row.items() if k != "lr"}}, grid


# --------------------------------------------------------------------------- CLIP-Adapter

REDUCTION, RESIDUAL_RATIO = 4, 0.2   # gaopengcuhk/CLIP-Adapter clip_adapter.py: Adapter(1024, 4), ratio = 0.2


class ResidualAdapter(nn.Module):
    """CLIP-Adapter on an image embedding f (unnormalised, as CLIP's image encoder gives it): a bottleneck
    A(f) = ReLU(W₂ ReLU(W₁ f)) without biases, W₁ width → width / reduction, mixed in as r · A(f) + (1 − r) · f,
    then classified by CLIP's scaled cosine similarity to the class text embeddings T."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: torch.Tensor, reduction: int = REDUCTION,
                 ratio: float = RESIDUAL_RATIO):
        super().__init__()
        width = class_embeddings.shape[1]
        self.down = nn.Linear(width, width // reduction, bias=False)
        self.up = nn.Linear(width // reduction, width, bias=False)
        self.ratio = ratio
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", logit_scale.detach().float().clone())

    def adapted(self, embeddings: torch.Tensor) -> torch.Tensor:
        f = embeddings.float()
        return self.ratio * F.relu(self.up(F.relu(self.down(f)))) + (1 - self.ratio) * f

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with exact_fp32(embeddings.device.type):
            return self.logit_scale * F.normalize(self.adapted(embeddings), dim=-1) @ self.class_embeddings.T


class CLIPAdapter(FrozenImageTower):
    """E11: CLIP's frozen image tower and projection, then ResidualAdapter on the image embedding, classified by
    E1's class text."""

    def __init__(self, clip, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES,
                 reduction: int = REDUCTION, ratio: float = RESIDUAL_RATIO):
        super().__init__(clip)
        self.adapter = ResidualAdapter(class_text_embeddings(clip, tokenizer, class_names, templates),
                                       backbone(clip).logit_scale.exp(), reduction, ratio)

    @property
    def on_embedding(self) -> ResidualAdapter:
        return self.adapter

    def fit(self, splits: dict, config):
        """The adapter trained by the project's loop on the splits' embeddings (no augmentation: a flipped image
        would need the tower again); the TrainResult."""
        from clip_adapt.training import train
        embeddings = embeddings_of(self, splits, config)
        return train(self.adapter, embeddings["train"], embeddings["val"], embeddings["test"],
                     dataclasses.replace(config, augment=False))

    def parts(self) -> list[Part]:
        return [Part("adapter", trainable(self.adapter, "adapter."))]
