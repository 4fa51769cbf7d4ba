"""Methods on CLIP's frozen image embedding that still classify by CLIP's text embeddings: Tip-Adapter's cache
model (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter), CLIP-Adapter's residual bottleneck (Gao et al.,
IJCV 2023; gaopengcuhk/CLIP-Adapter) and LP++'s text-blended linear probe (Huang et al., CVPR 2024;
FereshteShakeri/FewShot-CLIP-Strong-Baseline). Their image tower is frozen, so each embedding is computed once and shared
with E2's cache (clip_adapt.training.cached_embeddings, keyed by the same tower and features); what trains works
on those embeddings, and the classifier built around it takes pixels like every other (for the final
evaluation and the noise-robustness check). The text classifier is E1's: the same templates, CLIP's own learned
logit scale (exp(4.6052) = 100 for OpenAI's ViT-B/16, the reference's fixed 100); LP++ uses no logit scale, as its
reference.
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


# --------------------------------------------------------------------------- LP++

# FereshteShakeri/FewShot-CLIP-Strong-Baseline at f81054f, methods/linear_probe_p2.py and configs/base.yaml:
LPP_EPOCHS = 300          # train_epoch: full-batch steps, each followed by a validation check
LPP_MOMENTUM = 0.9        # SGD on the linear layer
LPP_ALPHA_EVERY = 10      # the blending weights take one step every 10th epoch
LPP_ALPHA_START = 250.0   # calculate_init_alpha: 250 × the mean text similarity of each class's own images


class BlendedProbe(nn.Module):
    """LP++ on image embeddings f, normalised here: logits = W f + b + α ⊙ (f Tᵀ), a linear probe (W, b) plus the
    class text embeddings T (unit rows) weighted per class by α. No logit scale: the reference's."""

    def __init__(self, class_embeddings: torch.Tensor):
        super().__init__()
        classes, width = class_embeddings.shape
        self.linear = nn.Linear(width, classes)   # its bias keeps nn.Linear's random start, as the reference's
        self.alpha = nn.Parameter(torch.ones(classes))
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with exact_fp32(embeddings.device.type):
            unit = F.normalize(embeddings.float(), dim=-1)
            return self.linear(unit) + self.alpha * (unit @ self.class_embeddings.T)

    @torch.no_grad()
    def start(self, unit: torch.Tensor, labels: torch.Tensor) -> dict:
        """The reference's start and step sizes from the unit training embeddings: W the per-class sums of the
        embeddings (compute_centroids, which sums), every α the mean over classes of 250 × the mean similarity
        of a class's images to its own text (calculate_init_alpha), the linear layer's step 4N / λ_max(FᵀF)
        (calculate_lr_w) and α's N / (4 max_c Σ_n (f_n · t_c)²) (calculate_lr_alpha): the inverse Lipschitz
        bounds of the loss's gradients."""
        one_hot = F.one_hot(labels.long(), len(self.class_embeddings)).float()
        if (one_hot.sum(0) == 0).any():
            raise ValueError("LP++ needs a training image of every class")
        self.linear.weight.copy_(one_hot.T @ unit)
        text = unit @ self.class_embeddings.T
        own = (one_hot * text).sum(0) / one_hot.sum(0)
        alpha = LPP_ALPHA_START * own.double().mean()
        self.alpha.fill_(float(alpha))
        largest_eigenvalue = torch.linalg.eigvalsh((unit.T @ unit).double()).max()
        return {"init_alpha": float(alpha), "lr_linear": float(4 * len(unit) / largest_eigenvalue),
                "lr_alpha": float(len(unit) / (4 * text.pow(2).sum(0).max()))}


def fit_lp_plus_plus(probe: BlendedProbe, embeddings: dict, checkpoint_dir, epochs: int = LPP_EPOCHS,
                     lr_scale: float = 1.0):
    """LP++ as its reference trains it, on the image embeddings of each split (clip_adapt.data.Split with
    embeddings as inputs): BlendedProbe.start on the training split, then `epochs` full-batch steps: SGD with
    momentum on (W, b), and every LPP_ALPHA_EVERY-th step a plain gradient step on α with the gradient summed
    over every step so far (the reference never zeroes α's gradient). After each step the validation accuracy;
    the last epoch of best validation accuracy is kept (the reference's `>=`). lr_scale multiplies both step
    sizes (1: the reference's). Test plays no part: its scores are recorded per epoch, as the project's loop
    records them. Writes checkpoint_dir/best.safetensors; returns (TrainResult, what metrics.json records)."""
    from pathlib import Path
    from safetensors.torch import save_file
    from clip_adapt import timing
    from clip_adapt.base import atomic_save, is_main_process
    from clip_adapt.convergence import NEW_LOW
    from clip_adapt.training import TrainResult, loss_and_accuracy, load_trainable, trainable_state
    device = probe.class_embeddings.device
    splits = {name: (split.inputs.to(device), split.labels.to(device)) for name, split in embeddings.items()}
    features, labels = splits["train"]

    def scores(epoch: int) -> dict:
        probe.eval()
        row = {"epoch": epoch}
        with torch.no_grad():
            for name, (inputs, targets) in splits.items():
                row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(probe(inputs).float().cpu(), targets)
        return {**row, "lr": lr_scale * steps["lr_linear"] if epoch else 0.0}

    with timing.phase("training"):
        steps = probe.start(F.normalize(features.float(), dim=-1), labels)
        optimizer = torch.optim.SGD(probe.linear.parameters(), lr_scale * steps["lr_linear"], momentum=LPP_MOMENTUM)
        history, losses, best, best_state = [scores(0)], [], -1.0, None   # epoch 0: the start, recorded only
        for epoch in range(1, epochs + 1):
            probe.train()
            loss = F.cross_entropy(probe(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if epoch % LPP_ALPHA_EVERY == 0:
                with torch.no_grad():
                    probe.alpha -= lr_scale * steps["lr_alpha"] * probe.alpha.grad
            row = scores(epoch)
            history.append(row)
            if row["val_accuracy"] >= best:
                best, best_epoch, best_state = row["val_accuracy"], epoch, trainable_state(probe)
    load_trainable(probe, best_state)
    probe.alpha.grad = None
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_save(folder / "best.safetensors", lambda p: save_file(best_state, p))
    # A fixed number of steps, as the reference: converged when its last tenth lowered the loss by less than
    # NEW_LOW of the fall before it (the project's plateau rule, clip_adapt/convergence.py).
    tenth = max(1, len(losses) // 10)
    fall = losses[0] - losses[-tenth - 1] if len(losses) > tenth else 0.0
    converged = len(losses) > tenth and losses[-tenth - 1] - losses[-1] <= NEW_LOW * max(fall, 0.0)
    result = TrainResult(history, best_epoch=best_epoch, epochs_run=epochs, converged=converged,
                         verdict="converged" if converged else "still-falling",
                         convergence_reason=f"{epochs} full-batch steps (the reference's fixed schedule); the "
                                            f"training loss {'settled' if converged else 'was still falling'} "
                                            f"over the last {tenth}",
                         selection={"epoch": best_epoch, "metric": "val_accuracy", "value": best,
                                    "rule": "the last epoch of the best (the reference's >=); the start is no candidate"})
    return result, {"solver": "lp++", "lpp_epochs": epochs, "lr_scale": lr_scale, **steps,
                    "alpha": probe.alpha.detach().cpu().tolist()}


class LPPlusPlus(FrozenImageTower):
    """E13: CLIP's frozen image tower and projection, then BlendedProbe on the image embedding, blended with E1's
    class text."""

    def __init__(self, clip, tokenizer, class_names: list[str], templates=ZERO_SHOT_TEMPLATES):
        super().__init__(clip)
        self.probe = BlendedProbe(class_text_embeddings(clip, tokenizer, class_names, templates))

    @property
    def on_embedding(self) -> BlendedProbe:
        return self.probe

    def fit(self, splits: dict, config):
        """fit_lp_plus_plus on pixel splits (train, val, test), their embeddings computed here (the script uses
        the disk cache); config.epochs (default LPP_EPOCHS) and config.lr (a factor on the step sizes)."""
        embeddings = embeddings_of(self, splits, config)
        return fit_lp_plus_plus(self.probe, embeddings, config.checkpoint_dir, config.epochs or LPP_EPOCHS,
                                config.lr)[0]

    def parts(self) -> list[Part]:
        return [Part("linear probe", trainable(self.probe.linear, "probe.linear.")),
                Part("blending weights", {"probe.alpha": self.probe.alpha})]
