"""The learnable prompts: VPT's prompt tokens in the image tower, pixel-space prompts added to the image
(Bahng et al., 2022), and CoOp's context vectors in the text tower. Each is added by hooks on `transformers`'
own CLIP modules, or open_clip's, found through the model's Backbone (clip_adapt/backbone.py), never by copying
their code, so the frozen backbone computes exactly what it computes without them. The classifiers that use them
are in clip_adapt/models.py.
"""

import contextlib
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from clip_adapt.base import UserError


class Removable(nn.Module):
    """A module that joins a frozen model through hooks, with removed(): a context in which its hooks pass
    everything through untouched, so that the model computes exactly what it computes without it (not with the
    module zeroed: a zero prompt would still take part in attention)."""

    def __init__(self):
        super().__init__()
        self._removed = False

    @contextlib.contextmanager
    def removed(self):
        self._removed = True
        try:
            yield
        finally:
            self._removed = False


@contextlib.contextmanager
def removed_together(removals):
    """Several removals at once: each of `removals` gives a context manager (a Removable's removed, a Part's)."""
    with contextlib.ExitStack() as stack:
        for removed in removals:
            stack.enter_context(removed())
        yield


PROMPT_POSITIONS = ("front", "back")
PROMPT_ENTRIES = ("pre-ln", "post-ln")
PROMPT_INITS = ("normal", "xavier")


class VisualPrompts(Removable):
    """VPT (Jia et al., ECCV 2022): N learnable tokens among the image tokens at the input of the chosen
    encoder layers. The first chosen layer inserts them; every later chosen layer throws away the previous
    layer's prompt outputs and puts in its own (VPT-deep); a layer not chosen carries the prompts along.
    Shallow VPT is the case layers=[0].

    position: "front" puts the prompts right after the class token (VPT), "back" after the last patch token
    (MaPLe's code). The pooled output stays the class token either way. The two are the same function: CLIP's
    vision tower has no attention mask and the prompts carry no position embedding, so attention, being
    permutation-equivariant over the other tokens, gives the class token the same output up to float rounding
    (tested).

    entry: where the first prompted layer's prompts go in when that layer is 0. "pre-ln" (the default) appends
    them to the embeddings before CLIP's pre-layernorm, as the CLIP-based reference implementations of
    VPT-style prompting do (MaPLe and its independent vision-language prompting baseline, IVLP,
    Khattak et al., CVPR 2023); "post-ln" puts them at the encoder layer's input, after the pre-layernorm,
    as a free vector in the space the layer reads (this project's earlier behaviour). Deeper layers have no
    pre-layernorm before them: their prompts always go in at the layer's input, as MaPLe's deeper prompts do,
    so a first prompted layer above 0 makes entry moot, and `self.entry` says "post-ln".

    init: "normal" draws N(0, 0.02) as MaPLe and IVLP do (the default); "xavier" is VPT's uniform bound
    sqrt(6 / (3·patch² + width)).

    removed() (Removable): the tower as it is without prompts.
    """

    def __init__(self, parts, num_prompts: int, layers=(0,), dropout: float = 0.0,
                 position: str = "front", entry: str = "pre-ln", init: str = "normal"):
        """parts: the CLIP's Backbone (clip_adapt.backbone), or the CLIP itself."""
        from clip_adapt.backbone import backbone
        super().__init__()
        parts = backbone(parts)
        depth, width = parts.vision_layers, parts.vision_width
        self.layers = sorted(set(layers))
        if not self.layers or not all(0 <= i < depth for i in self.layers):
            raise UserError(f"prompt layers must be between 0 and {depth - 1}, got {list(layers)}")
        for name, value, allowed in (("position", position, PROMPT_POSITIONS), ("entry", entry, PROMPT_ENTRIES),
                                     ("init", init, PROMPT_INITS)):
            if value not in allowed:
                raise UserError(f"prompt {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.num_prompts, self.position = num_prompts, position
        self.entry = entry if self.layers[0] == 0 else "post-ln"
        prompts = torch.empty(len(self.layers), num_prompts, width)
        if init == "normal":
            nn.init.normal_(prompts, std=0.02)
        else:
            bound = math.sqrt(6 / (3 * parts.patch_size ** 2 + width))   # VPT's Xavier-uniform bound
            nn.init.uniform_(prompts, -bound, bound)
        self.prompts = nn.Parameter(prompts)
        self.dropout = nn.Dropout(dropout)
        for index, layer in enumerate(self.layers):
            if index == 0 and self.entry == "pre-ln":
                parts.vision_pre_norm.register_forward_pre_hook(partial(self._put_prompts, index, True))
            else:
                parts.vision_blocks[layer].register_forward_pre_hook(
                    partial(self._put_prompts, index, index == 0), with_kwargs=True)

    def _put_prompts(self, index: int, inserting: bool, module, args, kwargs=None):
        if self._removed:
            return None
        hidden = args[0]
        # Expanded before dropout, so that every image draws its own mask, as in VPT.
        prompts = self.dropout(self.prompts[index].expand(hidden.shape[0], -1, -1)).to(hidden.dtype)
        kept = self.num_prompts if not inserting else 0   # the previous layer's prompt outputs, thrown away
        if self.position == "front":
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + kept:]], dim=1)
        else:
            hidden = torch.cat([hidden[:, :hidden.shape[1] - kept], prompts], dim=1)
        return (hidden, *args[1:]) if kwargs is None else ((hidden, *args[1:]), kwargs)


# --------------------------------------------------------------------------- pixel-space prompts

def scaled_prompt_size(image_size: int, size_at_224: int = 30) -> int:
    """Bahng et al.'s 30-pixel prompt at 224 px, scaled to the model's image size (4 at 32 px), at least 1."""
    return max(1, round(size_at_224 * image_size / 224))


class PixelPrompter(Removable):
    """A pixel-space prompt added to the normalised image as it enters the vision tower: attach() puts a hook on
    the tower's patch embedding, so that the prompt joins the frozen tower the way the prompt tokens do and
    removed() takes it out. Calling the prompter itself adds it to the pixels it is given."""

    def attach(self, parts) -> "PixelPrompter":
        """parts: the CLIP's Backbone (clip_adapt.backbone), or the CLIP itself."""
        from clip_adapt.backbone import backbone
        backbone(parts).patch_embedding.register_forward_pre_hook(self._prompt_pixels, with_kwargs=True)
        return self

    def _prompt_pixels(self, module, args, kwargs):
        if self._removed:
            return None
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "pixel_values": self(kwargs["pixel_values"])}


class PadPrompter(PixelPrompter):
    """Bahng et al. (2022), "Exploring Visual Prompts for Adapting Large-Scale Models": a learnable frame
    `pad_size` pixels wide, added to the normalised image; the inside is untouched.
    Parameters: 3·2·p·S (top, bottom) + 3·2·p·(S − 2p) (left, right) = 12·p·(S − p); 69,840 at S = 224,
    p = 30."""

    def __init__(self, image_size: int, pad_size: int):
        super().__init__()
        if not 0 < 2 * pad_size < image_size:
            raise UserError(f"--pad-size must be between 1 and {(image_size - 1) // 2} for {image_size}-pixel "
                            f"images, got {pad_size}")
        self.image_size, self.pad_size = image_size, pad_size
        inner = image_size - 2 * pad_size
        self.pad_up = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_down = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_left = nn.Parameter(torch.randn(1, 3, inner, pad_size))
        self.pad_right = nn.Parameter(torch.randn(1, 3, inner, pad_size))
        self.register_buffer("centre", torch.zeros(1, 3, inner, inner), persistent=False)

    @staticmethod
    def count(image_size: int, pad_size: int) -> int:
        return 12 * pad_size * (image_size - pad_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        middle = torch.cat([self.pad_left, self.centre, self.pad_right], dim=3)
        frame = torch.cat([self.pad_up, middle, self.pad_down], dim=2)
        return pixels + frame.to(pixels.dtype)


class FixedPatchPrompter(PixelPrompter):
    """Bahng et al. (2022): a learnable `patch_size`² square added at the top-left corner. Parameters: 3·s²."""

    def __init__(self, image_size: int, patch_size: int):
        super().__init__()
        if not 0 < patch_size <= image_size:
            raise UserError(f"--patch-size must be between 1 and {image_size} for {image_size}-pixel images, "
                            f"got {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.patch = nn.Parameter(torch.randn(1, 3, patch_size, patch_size))

    @staticmethod
    def count(image_size: int, patch_size: int) -> int:
        return 3 * patch_size ** 2

    def place(self, pixels: torch.Tensor, top: int, left: int) -> torch.Tensor:
        s = self.patch_size
        prompt = F.pad(self.patch, (left, self.image_size - left - s, top, self.image_size - top - s))
        return pixels + prompt.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.place(pixels, 0, 0)


class RandomPatchPrompter(FixedPatchPrompter):
    """Bahng et al. (2022): the same square at a random place, drawn once per batch while training.
    Unlike their code, which draws a place at test time too, evaluation puts it at the top-left corner, so that
    a prediction is the same every time it is made."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.place(pixels, 0, 0)
        top, left = torch.randint(0, self.image_size - self.patch_size + 1, (2,)).to(pixels.device)
        return pixels + self.placed(top, left).to(pixels.dtype)

    def placed(self, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """The patch on an empty canvas with its corner at (top, left), given as tensors and placed by indexing:
        no number read back to the host, so torch.compile traces one graph for every place."""
        s, where = self.patch_size, torch.arange(self.image_size, device=self.patch.device)
        rows, cols = where - top, where - left
        inside = ((rows >= 0) & (rows < s))[:, None] & ((cols >= 0) & (cols < s))[None, :]
        return self.patch[..., rows.clamp(0, s - 1)[:, None], cols.clamp(0, s - 1)[None, :]] * inside


PIXEL_PROMPTERS = {"padding": PadPrompter, "fixed-patch": FixedPatchPrompter, "random-patch": RandomPatchPrompter}



CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


class TextContext(Removable):
    """CoOp (Zhou et al., IJCV 2022): M learnable context vectors in place of a hand-written template, shared by
    every class (KaiyangZhou/CoOp trainers/coop.py, PromptLearner with CSC off). Each class's sentence is
    [BOS] ctx_1 ... ctx_M <class name> . [EOS] (class_token_position "end"), [BOS] ctx_1 ... ctx_M/2 <class name>
    ctx_M/2+1 ... ctx_M . [EOS] ("middle") or [BOS] <class name> ctx_1 ... ctx_M . [EOS] ("front"); CLIP still pools
    it at its end-of-text token, so the class name's own tokens shape the class embedding.

    init: words whose token embeddings start the context (CoOp's CTX_INIT, e.g. "a photo of a"), which then sets
    M to their number of tokens (CoOp counts words, the same for words of one token each); else M vectors drawn
    from N(0, 0.02), as CoOp does.

    removed(): the context vectors are not put in, so the M slots hold the placeholder token's own embedding, as
    the text tower reads the ids without the hook."""

    def __init__(self, parts, tokenizer, class_names: list[str], num_context: int,
                 class_token_position: str = "end", init: str | None = None):
        """parts: the CLIP's Backbone (clip_adapt.backbone), or the CLIP itself."""
        from clip_adapt.backbone import backbone
        super().__init__()
        parts = backbone(parts)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise UserError(f"class token position must be one of {', '.join(CLASS_TOKEN_POSITIONS)}, "
                            f"got {class_token_position!r}")
        token_embedding = parts.text_token_embedding
        if init:
            init_ids = torch.tensor(tokenizer(init, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                context = token_embedding(init_ids.to(token_embedding.weight.device)).detach().float().clone()
            if context.device.type != "meta":   # counted on the meta device, it stays there
                context = context.cpu()
            num_context = len(init_ids)
        else:
            context = torch.randn(num_context, parts.text_width) * 0.02
        if num_context < 1:
            raise UserError("CoOp needs at least one context vector: raise the number of text context vectors, or "
                            "give initialisation words")
        self.context = nn.Parameter(context)
        self.class_token_position = class_token_position
        tokens = tokenizer([f"{name}." for name in class_names], padding=True, return_tensors="pt")
        limit = parts.context_length
        if tokens["input_ids"].shape[1] + num_context > limit:
            raise UserError(f"{num_context} text context vectors and the class names take "
                            f"{tokens['input_ids'].shape[1] + num_context} tokens, more than CLIP's {limit}: "
                            f"lower --num-text-prompts")
        name_lengths = [len(tokenizer(name, add_special_tokens=False)["input_ids"]) for name in class_names]
        # Any token id serves as the placeholder (its embedding is replaced); BOS is never the end-of-text token
        # (a BERT tokenizer has no BOS: its [CLS], which pools by position, not by id).
        placeholder = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        # How many context vectors come before the class name; the rest follow it.
        before = {"end": num_context, "middle": num_context // 2, "front": 0}[class_token_position]
        ids, masks, slots = [], [], []
        for row, mask, length in zip(tokens["input_ids"], tokens["attention_mask"], name_lengths):
            # row: [BOS] <class name> . [EOS] padding, the name in row[1 : 1 + length]; -1 marks a context slot
            order = [0, *[-1] * before, *range(1, 1 + length), *[-1] * (num_context - before),
                     *range(1 + length, len(row))]
            ids.append(torch.tensor([placeholder if i < 0 else int(row[i]) for i in order]))
            masks.append(torch.tensor([1 if i < 0 else int(mask[i]) for i in order]))
            slots.append([place for place, i in enumerate(order) if i < 0])
        self.register_buffer("input_ids", torch.stack(ids), persistent=False)
        self.register_buffer("attention_mask", torch.stack(masks), persistent=False)
        self.register_buffer("slots", torch.tensor(slots), persistent=False)   # where each class's context goes
        self._active, self._shift = False, None   # any other use of this text tower sees plain token embeddings
        token_embedding.register_forward_hook(self._put_context)

    def _put_context(self, module, args, token_embeddings):
        if not self._active or self._removed:
            return None
        rows = torch.arange(len(token_embeddings), device=token_embeddings.device)[:, None]
        context = self.context.to(token_embeddings.dtype)
        if self._shift is None:
            context = context.expand(len(token_embeddings), -1, -1)
        else:   # CoCoOp: each image's context, once for every class's sentence
            context = (context + self._shift.to(context.dtype)[:, None]).repeat_interleave(len(self.input_ids), 0)
        slots = self.slots.repeat(len(token_embeddings) // len(self.slots), 1)
        return token_embeddings.index_put((rows, slots), context)

    @contextlib.contextmanager
    def active(self, shift: torch.Tensor | None = None):
        """Yields the token ids and attention mask to give the text tower, whose embedding layer then holds the
        context. shift: (images, width), added to every context vector, one set of class sentences per image
        (CoCoOp's image-conditioned context); the ids then hold the class sentences once per image."""
        self._active, self._shift = True, shift
        try:
            if shift is None:
                yield self.input_ids, self.attention_mask
            else:
                yield self.input_ids.repeat(len(shift), 1), self.attention_mask.repeat(len(shift), 1)
        finally:
            self._active, self._shift = False, None
