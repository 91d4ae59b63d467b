"""Stage 6 of the loop: targeted LoRA with a consistency loss, standard PEFT adapters, merging, ablations.

`train_lora()` puts rank-r adapters on chosen language-decoder layers and trains them with cross-entropy on
the first answer token plus a symmetric KL between a pair's two phrasings. Only what an adapter can change
is recomputed: the residual stream entering the lowest adapted layer (vision tower included) is computed
once per example and cached, and only the answer position is unembedded.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import numbers
import os
import random
import re
import shutil
import tempfile
import types
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp import dist, hf
from interp._errors import AdapterMismatchError, ForeignFilesError, InterpError
from interp._io import OUTPUT_MARKER, atomic_write_text, has_marker, mark_folder, shown, usable_folder
from interp._results import Result, jsonable
from interp.capture import StopForward
from interp.consistency import ConsistencyReport
from interp.data import ParaphrasePair, check_pairs, split
from interp.dist import rank_and_world
from interp.layers import DEFAULT_TARGET_MODULES, LayerSelection, layers_pattern_of, lora_config
from interp.models import Model, Prompt, _find_layers, exclusive, nf4_config
from interp.scoring import last_hidden, project

CHECKPOINT_FORMAT = "interp.lora-checkpoint/1"
KlSpace = Literal["yes_no", "vocab"]
_VISION_PARTS = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision")


# ==== the loss ========================================================================================
class LossParts(NamedTuple):
    """One micro-batch's loss and its two terms (each already a mean over its rows)."""

    total: Tensor  # ce_weight * ce + kl_weight * kl
    ce: Tensor  # cross-entropy of the gold answer token, mean over phrasings that have one
    kl: Tensor  # symmetric KL between the two phrasings' answer distributions, mean over pairs


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``(KL(p||q) + KL(q||p)) / 2`` between ``softmax(logits_p)`` and ``softmax(logits_q)`` over the last axis."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q): one pass, exactly symmetric in p and q
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def pair_loss(logits_a: Tensor, logits_b: Tensor, targets_a: Tensor, targets_b: Tensor, inverted: Tensor,
              answer_ids: tuple[int, int], *, ce_weight: float = 1.0, kl_weight: float = 1.0,
              kl_space: KlSpace = "yes_no") -> LossParts:
    """The study's loss for ``[pairs, vocab]`` first-answer-token logits of phrasings a and b.

    ``targets_*``: gold token ids (-100 where a pair has no gold answer). ``inverted``: ``[pairs]`` bool, True
    where b inverts the polarity of a; b's yes/no are swapped before comparing the two distributions.
    ``kl_space="yes_no"`` compares the 2-way (yes, no) softmax, i.e. the decision the margin measures;
    ``"vocab"`` compares full-vocabulary distributions (yes/no columns of b swapped on inverted pairs).
    """
    yes, no = answer_ids
    zero = logits_a.new_zeros((), dtype=torch.float32)
    ce = zero
    if ce_weight:
        logits = torch.cat([logits_a, logits_b]).float()
        targets = torch.cat([targets_a, targets_b]).to(logits.device)
        n_gold = int((targets != -100).sum())
        if n_gold:
            ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / n_gold
    kl = zero
    if kl_weight:
        flip = inverted.to(logits_a.device)[:, None]
        if kl_space == "yes_no":
            la, lb = logits_a[:, [yes, no]], logits_b[:, [yes, no]]
            lb = torch.where(flip, lb.flip(-1), lb)
        elif kl_space == "vocab":
            perm = torch.arange(logits_b.shape[-1], device=logits_b.device)
            perm[yes], perm[no] = no, yes
            la, lb = logits_a, torch.where(flip, logits_b[:, perm], logits_b)
        else:
            raise InterpError(f"kl_space={kl_space!r}; use 'yes_no' or 'vocab'")
        kl = symmetric_kl(la, lb).mean()
    return LossParts(ce_weight * ce + kl_weight * kl, ce.detach(), kl.detach())


def _targets(pairs: Sequence[ParaphrasePair], answer_ids: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    def tid(word: str | None) -> int:
        return -100 if word is None else answer_ids[0 if word == "yes" else 1]

    ta = torch.tensor([tid(p.answer) for p in pairs])
    tb = torch.tensor([tid(p.answer_b) for p in pairs])
    inverted = torch.tensor([not p.same_polarity for p in pairs])
    return ta, tb, inverted


def pair_metrics(margins_a: Tensor, margins_b: Tensor, pairs: Sequence[ParaphrasePair], *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Flip rate, mean |margin difference| (polarity-corrected), its scale-free ratio to mean |margin| and
    accuracy from per-phrasing margins, with the definitions and 95% intervals of `ConsistencyReport`
    (Clopper-Pearson for the two shares, a cluster bootstrap of ``n_boot`` resamples for the margins)."""
    rep = ConsistencyReport.from_margins(pairs, margins_a.double().cpu().numpy(), margins_b.double().cpu().numpy(),
                                         n_boot=n_boot, seed=seed)
    ci = {k: None if v is None else (float(v[0]), float(v[1])) for k, v in rep.ci.items()}
    return {"flip_rate": rep.flip_rate, "mean_margin_diff": rep.mean_margin_diff,
            "accuracy": float("nan") if rep.accuracy is None else rep.accuracy, "n_eval": rep.n,
            "flip_rate_ci": ci.get("flip_rate"), "accuracy_ci": ci.get("accuracy"),
            "mean_margin_diff_ci": ci.get("mean_margin_diff"), "relative_margin_diff": rep.relative_margin_diff,
            "relative_margin_diff_ci": ci.get("relative_margin_diff"), "n_clusters": rep.n_clusters}


# ==== dropout that depends on the example, not on the batch ========================================
class _DropoutRows:
    """Which example each row of the current forward pass is: a seed and a real length per row."""

    def __init__(self) -> None:
        self.seeds: list[int] | None = None
        self.lengths: list[int] | None = None
        self.counters: dict[tuple[int, torch.device], Tensor] = {}  # hashed element indices, shared by modules

    @contextmanager
    def rows(self, seeds: Sequence[int]):
        self.seeds, self.lengths = list(seeds), None
        try:
            yield self
        finally:
            self.seeds = self.lengths = None
            self.counters.clear()

    def counter(self, n: int, device: torch.device) -> Tensor:
        """``_mix32(arange(n))``: the same for every module with inputs of ``n`` values per row in this pass."""
        key = (n, device)
        if key not in self.counters:
            self.counters[key] = _mix32(torch.arange(n, dtype=torch.int32, device=device))
        return self.counters[key]


def _mix32(x: Tensor) -> Tensor:
    """Chris Wellons' lowbias32 integer hash on int32 tensors, in place (signed shifts are masked to logical)."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x846CA68B - (1 << 32)
    x ^= (x >> 16) & 0xFFFF
    return x


def _row_key(seed: int, salt: int) -> int:
    """A 32-bit key per (example seed, module), as a signed int32 value."""
    k = (seed * 1_000_003 + salt) & 0xFFFFFFFF
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 1)):
        k ^= k >> shift
        k = (k * mult) & 0xFFFFFFFF
    return k - (1 << 32) if k >= 1 << 31 else k


class _RowDropout(nn.Module):
    """LoRA dropout whose mask is a counter-based hash of (example seed, module, position, feature).

    With it, a pair's dropout masks are the same whichever micro-batches are fused into one pass, which GPU
    computes it and whether the run was resumed; and activation checkpointing recomputes the same masks.
    The mask of a whole fused pass is a dozen element-wise kernels, not a generator call per row: on short
    text prompts, launching one per row and module was half of a training step's kernel launches.
    """

    CHUNK = 1 << 24  # elements hashed at once: bounds the int32 temporaries (64 MiB each)

    def __init__(self, p: float, salt: int, ctx: _DropoutRows):
        super().__init__()
        self.p, self.salt, self.ctx = p, salt, ctx
        self.threshold = int(round(p * (1 << 24)))  # keep where the hash's low 24 bits >= p * 2^24

    def mask_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """What `_row_mask` needs for ``x`` in this pass: (hashed element indices, row keys, row lengths);
        None where the rows of ``x`` are not this pass's examples (plain ``F.dropout`` then)."""
        ctx = self.ctx
        if ctx.seeds is None or ctx.lengths is None or x.dim() < 3 or x.shape[0] != len(ctx.seeds):
            return None
        n = x.shape[1] * math.prod(x.shape[2:])
        if n >= 1 << 31:
            raise InterpError(f"a LoRA input of {x.shape[1]} x {n // x.shape[1]} values per row is beyond the "
                              "dropout hash's 2^31 counter; pass dropout=0 or shorter prompts")
        keys = torch.tensor([_row_key(s, self.salt) for s in ctx.seeds], dtype=torch.int32, device=x.device)
        return ctx.counter(n, x.device), keys, torch.tensor(ctx.lengths, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = self.mask_inputs(x)
        if mask is None:
            return F.dropout(x, self.p, True)
        return x * _row_mask(x.shape, *mask, self.threshold) * (1.0 / (1.0 - self.p))


def _row_mask(shape: torch.Size, counter: Tensor, keys: Tensor, lengths: Tensor, threshold: int) -> Tensor:
    """The keep mask (bool, ``shape`` = [rows, width, ...]) of `_RowDropout`: False at padding positions."""
    rows, width = shape[:2]
    n = counter.numel()  # width * features
    keep = torch.empty(rows, n, dtype=torch.bool, device=counter.device)
    step = max(1, _RowDropout.CHUNK // max(1, n))
    for r in range(0, rows, step):
        h = _mix32(counter[None, :] ^ keys[r:r + step, None])  # [chunk, width * feat]
        torch.ge(h & 0xFFFFFF, threshold, out=keep[r:r + step])
    real = torch.arange(width, device=counter.device)[None, :] < lengths[:, None]
    keep = keep.view(shape)
    keep &= real.view(rows, width, *([1] * (len(shape) - 2)))  # in place: one mask-sized tensor, not two
    return keep


@functools.cache
def _bit_values(device: torch.device) -> Tensor:
    """(1, 2, 4, ..., 128) on ``device``: what bit ``i`` of a `_pack_mask` byte is worth (made once per device,
    not copied to the GPU in every pass)."""
    return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)


def _pack_mask(keep: Tensor, out: Tensor) -> None:
    """Write the bool mask ``keep`` [rows, ...] into ``out`` [rows, ceil(n / 8)] (uint8, n: values per row),
    8 values a byte: bit ``i`` of byte ``j`` is value ``8 * j + i`` of the flattened row. A row whose ``n`` is
    not a multiple of 8 ends in zero bits; rows start on a byte, so a span of rows is a slice of ``out``."""
    rows, n = keep.shape[0], math.prod(keep.shape[1:])
    flat = keep.reshape(rows, n) if n % 8 == 0 else F.pad(keep.reshape(rows, n), (0, -n % 8))
    torch.sum(flat.view(rows, flat.shape[1] // 8, 8) * _bit_values(flat.device), -1, dtype=torch.uint8, out=out)


def _unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool mask (``shape`` = [rows, ...]) that `_pack_mask` packed into ``packed`` [rows, ceil(n / 8)]."""
    bits = (packed[..., None] & _bit_values(packed.device)) != 0  # [rows, bytes, 8]
    return bits.view(packed.shape[0], packed.shape[1] * 8)[:, :math.prod(shape[1:])].reshape(shape)


def _dropped(x: Tensor, dtype: torch.dtype, keep: Tensor | None, scale: float) -> Tensor:
    """What PEFT feeds ``lora_A``: ``x`` cast to the adapter's dtype, then `_RowDropout` (``keep``: its mask).
    The same values as ``x.to(dtype) * keep * scale`` in two kernels on one ``dtype`` copy: the mask is applied
    in the cast (a product with 0 or 1 is exact in any dtype, so the order changes no bit)."""
    if keep is None:
        return x.to(dtype)
    return torch.mul(x, keep, out=torch.empty(x.shape, dtype=dtype, device=x.device)).mul_(scale)


class _DroppedLinear(torch.autograd.Function):
    """``F.linear(_dropped(x, W.dtype, keep, scale), W)`` that keeps for the backward pass only ``x`` as it
    came, ``W`` and ``keep`` packed 8 values a byte (`_pack_mask`); ``mask``: the hash inputs of ``keep``
    (none: no dropout). The mask is hashed once, in the forward pass: recomputing its ~14 kernels a chunk in
    the backward pass made a folded step on an H200 host-bound (kernel launches, not GPU time, set its pace).

    Both passes go through ``x`` a few rows at a time (`ROWS_ELEMENTS` values): the float32 dropped copy and
    the input gradient of ``down_proj`` at 8,192 tokens would be 0.3 GB each at once, a peak of their own.
    Spans of 2^24 values (64 MiB in float32) take a pass of 16 rows x 314 tokens whole at 2,560 features and
    in four spans at 10,240; each further span costs ~8 kernels in the forward pass and ~9 in the backward
    (2^25 would halve the spans at 10,240 for twice the temporaries, against QLoRA's memory margin)."""

    ROWS_ELEMENTS = 1 << 24

    @staticmethod
    def _spans(x: Tensor) -> list[slice]:
        step = max(1, _DroppedLinear.ROWS_ELEMENTS // max(1, x[0].numel())) if x.dim() >= 3 else x.shape[0]
        return [slice(r, r + step) for r in range(0, x.shape[0], step)]

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, threshold: int, scale: float, *mask: Tensor) -> Tensor:
        ctx.scale = scale
        packed = None
        if mask:
            counter, keys, lengths = mask
            packed = torch.empty(x.shape[0], -(-x[0].numel() // 8), dtype=torch.uint8, device=x.device)
        parts = []
        for sp in _DroppedLinear._spans(x):
            keep = None
            if packed is not None:
                keep = _row_mask(x[sp].shape, counter, keys[sp], lengths[sp], threshold)
                _pack_mask(keep, packed[sp])
            parts.append(F.linear(_dropped(x[sp], weight.dtype, keep, scale), weight))
        ctx.save_for_backward(x, weight, *(() if packed is None else (packed,)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *packed = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = None
        for sp in _DroppedLinear._spans(x):
            keep = _unpack_mask(packed[0][sp], x[sp].shape) if packed else None
            g = grad[sp].reshape(-1, grad.shape[-1])  # [tokens, r]
            if want_w:  # as autograd computes it through F.linear (summed over spans in float32)
                part = g.t().mm(_dropped(x[sp], weight.dtype, keep, ctx.scale).reshape(-1, x.shape[-1]))
                grad_w = part if grad_w is None else grad_w.float().add_(part)
            if want_x:  # autograd's order through PEFT's ops: @ W, * scale, * keep, cast (on the way out)
                gx = g.mm(weight).view(x[sp].shape)
                if keep is None:
                    grad_x[sp] = gx
                else:
                    torch.mul(gx.mul_(ctx.scale), keep, out=grad_x[sp])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, *(None for _ in ctx.needs_input_grad[4:])


class _DroppedA(_RowDropout):
    """A LoRA ``lora_A`` linear with its `_RowDropout` folded in, for `_row_dropout`.

    Through PEFT, each adapted module keeps for the backward pass a float32 copy of its dropped input and the
    mask (5 bytes per input value), although q/k/v (and gate/up) read one input. Here the input arrives uncast
    (the layer's ``cast_input_dtype_enabled`` is off) and, in a pass of at least ``FOLD_MIN_TOKENS`` tokens,
    only it is kept, in the model's dtype: one tensor for all the modules that read it (2 bytes per value in
    bf16), beside each module's mask packed 8 values a byte. Smaller passes, and passes without gradients, take
    PEFT's ops unchanged. Forward values are PEFT's (bitwise on the CPU, where the tests compare them; a pass
    split into row spans may round differently on a GPU).
    """

    def __init__(self, linear: nn.Linear, p: float, salt: int, ctx: _DropoutRows):
        super().__init__(p, salt, ctx)
        self.weight = linear.weight  # the same parameter, under the same state-dict key (``lora_A.<name>.weight``)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    # Below this many tokens per pass (rows x width) the adapters' saved inputs are small (~90 KB a token at
    # Gemma 3 4B's widths: 0.2 GB at 2,048), and the folded path's extra kernels cost more than they are worth:
    # on an H200, text pairs of ~50 tokens trained 4.0x plain PEFT folded against 6.0x unfolded (measured while
    # the backward pass still recomputed the mask's hash).
    FOLD_MIN_TOKENS = 2048

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        small = x.dim() >= 3 and x.shape[0] * x.shape[1] < self.FOLD_MIN_TOKENS
        # PEFT's own ops (cast, `_RowDropout`, linear) where nothing is saved for a backward pass, on small
        # passes, and under autocast (which a custom backward would not see)
        if small or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return F.linear(super().forward(x.to(w.dtype)), w)
        mask = self.mask_inputs(x) if self.training and self.p > 0 else ()
        if mask is None:  # not this pass's examples: `_RowDropout` falls back to plain F.dropout
            return F.linear(super().forward(x.to(w.dtype)), w)
        return _DroppedLinear.apply(x, w, self.threshold, 1.0 / (1.0 - self.p) if mask else 1.0, *mask)


@contextmanager
def _row_dropout(model: nn.Module, ctx: _DropoutRows, *, fold: bool = True) -> Iterator[None]:
    """Swap every LoRA ``nn.Dropout`` of ``model`` for a `_RowDropout` for the duration of training.

    With ``fold`` (the default), a plain LoRA adapter (no DoRA or other variant) gets a `_DroppedA` as its
    ``lora_A`` and an identity as its dropout instead, and a layer whose adapters are all such passes its input
    uncast: the same values for less activation memory. Everything is put back on exit.
    """
    from peft.tuners.lora import LoraLayer

    swapped: list[tuple[nn.Module, str, nn.Module, nn.Module | None]] = []  # (layer, adapter, dropout, lora_A)
    casts: list[tuple[nn.Module, bool]] = []
    try:  # a failure halfway through the swap puts back what was swapped
        for name, mod in _base_of(model).named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            folded = 0
            for key, drop in list(mod.lora_dropout.items()):
                salt = zlib.crc32(f"{name}.{key}".encode())
                lin = mod.lora_A[key] if key in mod.lora_A else None
                if (fold and isinstance(drop, (nn.Dropout, nn.Identity)) and type(lin) is nn.Linear
                        and lin.bias is None and key not in getattr(mod, "lora_variant", {})):
                    swapped.append((mod, key, drop, lin))
                    mod.lora_A[key] = _DroppedA(lin, getattr(drop, "p", 0.0), salt, ctx).train(drop.training)
                    mod.lora_dropout[key] = nn.Identity()
                    folded += 1
                elif isinstance(drop, nn.Dropout):
                    swapped.append((mod, key, drop, None))
                    mod.lora_dropout[key] = _RowDropout(drop.p, salt, ctx).train(drop.training)
            if folded and folded == len(mod.lora_A):
                casts.append((mod, getattr(mod, "cast_input_dtype_enabled", True)))
                mod.cast_input_dtype_enabled = False
        yield
    finally:
        for mod, enabled in casts:
            mod.cast_input_dtype_enabled = enabled
        for mod, key, drop, lin in swapped:
            mod.lora_dropout[key] = drop
            if lin is not None:
                mod.lora_A[key] = lin


def _fold_default(qlora: bool) -> bool:
    """Whether `train_lora` folds the LoRA dropout into ``lora_A`` (`_row_dropout`'s ``fold``) when
    ``fold_dropout`` is None: under QLoRA, whose point is memory, and not otherwise. Measured on an H200
    (MedGemma-4B shape, bf16, image pairs, bench/lora.py): folded 19.24 pairs/s at 9.73 GiB peak, unfolded
    22.12 pairs/s at 10.31 GiB (4.15x and 4.83x the plain PEFT loop's 4.6 pairs/s): 13% of the speed for 0.58 GiB."""
    return qlora


def _prefetch(fn: Callable[[Any], Any], items: Sequence[Any], depth: int) -> Iterator[Any]:
    """``map(fn, items)`` computed ``depth`` items ahead in threads (tokenising and image preprocessing
    overlap the GPU work), holding no more than ``depth`` results at a time."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ==== the fast path ===================================================================================
_base_of = hf.base_model


def _arch_kind(base: nn.Module, body: nn.Module) -> str:
    """Which fast path runs: 'gemma3' or 'llama' (verified layouts), 'unverified' (another decoder whose
    forward takes ``inputs_embeds``; checked against the plain forward before training), or 'generic'."""
    try:
        hf.check_run_from_layer(body)
    except hf.Unsupported:
        return "generic"
    name = type(base).__name__
    if name.startswith("Gemma3") and not getattr(base.config.get_text_config(), "use_bidirectional_attention",
                                                 False):
        return "gemma3"
    if name in ("LlamaForCausalLM", "LlavaForConditionalGeneration", "LlavaLlamaForCausalLM"):
        return "llama"
    return "unverified"


class _Runner:
    """First-answer-token hidden states of prompts, running only the layers an adapter can change.

    ``lower`` runs the model's own forward (embeddings, vision tower, layers below ``lo``) without gradients
    and stops at the pre-hook of layer ``lo``; its output is cached per phrasing, memory permitting.
    ``upper`` runs the model's own forward again with the cached residual as ``inputs_embeds`` and the
    layers below ``lo`` skipped (`interp.hf.run_from_layer`), so the model builds its masks and rotary
    embeddings itself. Architectures without that forward ('generic') run the plain forward of the body
    instead (still no logits but the answer position's).
    """

    def __init__(self, model: Model, lo: int, *, fast: bool = True, cache: bool | str = "auto",
                 checkpoint: bool = False, dropout_rows: _DropoutRows | None = None):
        self.model, self.lo, self.checkpoint = model, lo, checkpoint
        self.dropout_rows = dropout_rows or _DropoutRows()
        self.base = _base_of(model.hf)
        self.body = self.base.model if hasattr(self.base, "model") else self.base
        _path, self.layers = _find_layers(self.base)
        self.kind = _arch_kind(self.base, self.body) if fast else "generic"
        self.dedupe_images = hf.takes_image_features(self.body)
        self.store: dict[Any, tuple[Tensor, Tensor | None]] = {}
        self.used: dict[torch.device, float] = {}
        self.budgets = self._budgets(cache) if self.kind != "generic" else []

    # -- cache policy --
    def _budgets(self, cache: bool | str) -> list[tuple[torch.device, float]]:
        dev = self.model.device
        if cache is False:
            return []
        if cache is True:
            return [(dev, math.inf)]
        if cache == "cpu":
            return [(torch.device("cpu"), math.inf)]
        if cache != "auto":
            raise InterpError(f"cache={cache!r}; use 'auto', True, False or 'cpu'")
        ram = _available_ram()
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            return [(dev, 0.3 * free), (torch.device("cpu"), 0.3 * ram)]
        return [(dev, 0.3 * ram)]

    @property
    def cache_bytes(self) -> int:
        return int(sum(self.used.values()))

    def _keep(self, key: Any, resid: Tensor, tt: Tensor | None) -> None:
        size = resid.numel() * resid.element_size()
        for dev, budget in self.budgets:
            if self.used.get(dev, 0.0) + size <= budget:
                r = resid.to(dev, copy=True)  # a copy: a view would pin the whole padded batch in memory
                if dev.type == "cpu" and self.model.device.type == "cuda":
                    r = r.pin_memory()
                self.store[key] = (r, None if tt is None else tt.to(dev, copy=True))
                self.used[dev] = self.used.get(dev, 0.0) + size
                return

    # -- the two halves --
    def _lower_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Any]:
        pv = inputs.get("pixel_values")
        if pv is None or not self.dedupe_images or pv.shape[0] < 2:
            return inputs
        # the two phrasings of a pair show the same image: run the vision tower once per distinct image
        flat = pv.reshape(pv.shape[0], -1)
        uniq: list[int] = []
        inverse: list[int] = []
        for i in range(flat.shape[0]):
            j = next((k for k, u in enumerate(uniq) if torch.equal(flat[u], flat[i])), None)
            if j is None:
                uniq.append(i)
                j = len(uniq) - 1
            inverse.append(j)
        if len(uniq) == flat.shape[0]:
            return inputs
        feats = hf.image_features(self.body, pv[uniq])
        per_row = feats[inverse] if isinstance(feats, Tensor) else [feats[j] for j in inverse]
        return hf.with_image_features(self.body, inputs, per_row)

    def lower(self, inputs: dict[str, Tensor], lengths: Tensor | None = None) -> Tensor:
        """Residual stream entering layer ``lo``: ``[batch, pos, d_model]`` (no gradient). ``lengths``: the rows'
        lengths on the host, if known (the masks can then be prepared, `hf.prepared_masks`)."""
        captured: dict[str, Tensor] = {}

        def grab(_module, args, kwargs):
            captured["resid"] = args[0] if args else kwargs["hidden_states"]
            raise StopForward

        handle = self.layers[self.lo].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                with hf.prepared_masks(self.body, self._lower_inputs(inputs), padded=hf.host_padded(lengths, inputs)) as run:
                    self.body(**run, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        if "resid" not in captured:
            raise InterpError(f"layer {self.lo} of {type(self.base).__name__} was never called in the forward pass")
        return captured["resid"]

    def upper(self, resid: Tensor, lengths: Tensor, token_type: Tensor | None = None) -> Tensor:
        """Layers ``lo..end`` on right-padded ``resid [batch, pos, d]``; final-norm state at each last token."""
        batch, width = resid.shape[:2]
        dev = resid.device
        attn = (torch.arange(width, device=dev)[None, :] < lengths.to(dev)[:, None]).long()
        hidden = hf.run_from_layer(self.body, self.layers, self.lo, resid, attn, token_type_ids=token_type,
                                   checkpoint=self.checkpoint and torch.is_grad_enabled(), padded=hf.host_padded(lengths, width))
        return hidden[torch.arange(batch, device=dev), lengths.to(dev) - 1]

    # -- what training and evaluation call --
    def hidden(self, keys: Sequence[Any], prompts: Sequence[Prompt]) -> Tensor:
        """``[len(prompts), d_model]`` final-norm states at the first answer token (differentiable)."""
        if self.kind == "generic":
            batch = self.model.encode(list(prompts))
            self.dropout_rows.lengths = batch.lengths.tolist()
            return last_hidden(self.model, batch)
        rows: dict[int, tuple[Tensor, Tensor | None]] = {i: self.store[k] for i, k in enumerate(keys)
                                                         if k in self.store}
        missing = [i for i in range(len(keys)) if i not in rows]
        if missing:  # not cached (yet, or no room): the lower part for these rows, now
            for i, entry in zip(missing, self._lower_rows(self.model.encode([prompts[i] for i in missing])),
                                strict=True):
                rows[i] = entry
                self._keep(keys[i], *entry)
        dev = self.model.device
        lengths = torch.tensor([rows[i][0].shape[0] for i in range(len(keys))])
        self.dropout_rows.lengths = lengths.tolist()
        first = rows[0][0]
        padded = first.new_zeros((len(keys), int(lengths.max()), first.shape[-1]), device=dev)
        any_tt = any(rows[i][1] is not None for i in range(len(keys)))
        token_type = torch.zeros(padded.shape[:2], dtype=torch.long, device=dev) if any_tt else None
        for i in range(len(keys)):
            r, tt = rows[i]
            padded[i, :r.shape[0]] = r.to(dev, non_blocking=True)
            if tt is not None:
                token_type[i, :tt.shape[0]] = tt.to(dev, non_blocking=True)
        return self.upper(padded, lengths, token_type)

    def _lower_rows(self, batch) -> list[tuple[Tensor, Tensor | None]]:
        resid = self.lower(batch.inputs, batch.lengths)
        tts = batch.inputs.get("token_type_ids")
        return [(resid[j, :n], None if tts is None else tts[j, :n]) for j, n in enumerate(batch.lengths.tolist())]

    def prefill(self, items: Sequence[tuple[Any, Prompt]], *, rows_per_pass: int, progress: bool = False) -> None:
        """Cache the residual stream entering layer ``lo`` for every row, a few examples per forward pass
        (keep an example's phrasings adjacent so that its image is encoded once), until the budget is full."""
        todo = [(k, p) for k, p in items if k not in self.store]
        if self.kind == "generic" or not self.budgets or not todo:
            return
        chunks = [todo[i:i + rows_per_pass] for i in range(0, len(todo), rows_per_pass)]
        # preprocessing (tokeniser, 896 px image resizing) is CPU work: several chunks are encoded at once
        depth = min(8, max(2, (os.cpu_count() or 2) // 2))
        encoded = _prefetch(lambda chunk: self.model.encode([p for _, p in chunk]), chunks, depth=depth)
        bar = tqdm(total=len(todo), desc=f"caching layer {self.lo} inputs", unit="row", disable=not progress,
                   leave=False)
        for chunk, batch in zip(chunks, encoded, strict=True):
            before = len(self.store)
            for (key, _), entry in zip(chunk, self._lower_rows(batch), strict=True):
                self._keep(key, *entry)
            bar.update(len(chunk))
            if len(self.store) - before < len(chunk):
                break  # out of room: the remaining rows are computed when they are needed
        encoded.close()
        bar.close()

    def check(self, prompts: Sequence[Prompt]) -> float:
        """Relative max difference between the fast path and the plain forward on ``prompts`` (0 if generic)."""
        if self.kind == "generic":
            return 0.0
        with torch.no_grad():
            batch = self.model.encode(list(prompts))
            ref = last_hidden(self.model, batch).float()
            fast = self.upper(self.lower(batch.inputs, batch.lengths), batch.lengths,
                              batch.inputs.get("token_type_ids")).float()
        return float((fast - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _available_ram() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8e9


# ==== results =========================================================================================
@dataclass(frozen=True)
class EpochStats(Result):
    """Training loss of one epoch and the held-out consistency after it (epoch 0: before training)."""

    epoch: float  # completed epochs (fractional when max_steps stopped a run mid-epoch)
    step: int  # optimizer steps so far
    loss: float | None  # mean training loss over the epoch's micro-batches (None for epoch 0)
    ce: float | None
    kl: float | None
    flip_rate: float  # held-out, polarity-corrected sign disagreement between phrasings
    accuracy: float  # held-out first-token accuracy over phrasings with a gold answer
    mean_margin_diff: float  # held-out mean |margin_a - corrected margin_b| (logits)
    n_eval: int
    lr: float
    # 95% intervals (docs/STATISTICS.md): Clopper-Pearson for the shares (Korn-Graubard effective n when
    # held-out pairs cluster), a cluster bootstrap for the margin measures; None without held-out pairs
    flip_rate_ci: tuple[float, float] | None = None
    accuracy_ci: tuple[float, float] | None = None
    mean_margin_diff_ci: tuple[float, float] | None = None
    relative_margin_diff: float = float("nan")  # mean |margin diff| / mean |margin|: unchanged by a logit rescale
    relative_margin_diff_ci: tuple[float, float] | None = None
    n_clusters: int = 0  # clusters of dependent held-out pairs the intervals resample


@dataclass(frozen=True)
class TrainResult(Result):
    """A trained adapter: where it is, what it touches, and how training and held-out consistency went."""

    adapter_path: Path  # a standard PEFT folder: PeftModel.from_pretrained(base, adapter_path)
    layers: tuple[int, ...]
    history: tuple[EpochStats, ...]
    n_train: int
    n_eval: int
    trainable_params: int
    steps: int
    fast_path: str  # 'gemma3', 'llama' or 'generic'
    cache_bytes: int  # residual-stream cache held at the end (0: not cached)
    output_dir: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> EpochStats:
        return self.history[-1]

    @property
    def table(self):
        """The history as a pandas DataFrame, one row per epoch."""
        import pandas as pd

        return pd.DataFrame([h.to_dict() for h in self.history])

    def load(self, model: Model) -> Model:
        """This adapter on ``model`` (see `load_adapter`)."""
        return load_adapter(model, self.adapter_path)

    def figure(self):
        """Training loss (CE and KL beside it) and held-out flip rate, accuracy and margin difference per
        epoch, each held-out point with its 95% interval (epoch 0 = before training)."""
        from plotly.subplots import make_subplots

        h = self.history
        ep = [x.epoch for x in h]
        fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.2,
                            specs=[[{}, {}], [{}, {"secondary_y": True}]],
                            subplot_titles=("training loss (mean per micro-batch)", "held-out flip rate",
                                            "held-out first-token accuracy", "held-out |margin diff|"))

        def bars(values: list[float], cis: list[Any]) -> dict[str, Any] | None:
            if not any(c for c in cis):
                return None
            hi = [None if c is None else c[1] - v for v, c in zip(values, cis, strict=True)]
            lo = [None if c is None else v - c[0] for v, c in zip(values, cis, strict=True)]
            return dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1.2, width=4)

        trained = [x for x in h if x.loss is not None]
        for name, key, dash in (("total", "loss", "solid"), ("CE", "ce", "dot"), ("KL", "kl", "dash")):
            fig.add_scatter(x=[x.epoch for x in trained], y=[getattr(x, key) for x in trained], name=name,
                            mode="lines+markers", line=dict(dash=dash), legendgroup="loss", row=1, col=1)
        fig.add_scatter(x=ep, y=[x.flip_rate for x in h], error_y=bars([x.flip_rate for x in h],
                        [x.flip_rate_ci for x in h]), mode="lines+markers", name="flip rate", showlegend=False,
                        row=1, col=2)
        fig.add_scatter(x=ep, y=[x.accuracy for x in h], error_y=bars([x.accuracy for x in h],
                        [x.accuracy_ci for x in h]), mode="lines+markers", name="accuracy", showlegend=False,
                        row=2, col=1)
        fig.add_scatter(x=ep, y=[x.mean_margin_diff for x in h], error_y=bars([x.mean_margin_diff for x in h],
                        [x.mean_margin_diff_ci for x in h]), mode="lines+markers", name="mean |margin diff| (logits)",
                        row=2, col=2, secondary_y=False)
        fig.add_scatter(x=ep, y=[x.relative_margin_diff for x in h], mode="lines+markers", line=dict(dash="dot"),
                        error_y=bars([x.relative_margin_diff for x in h], [x.relative_margin_diff_ci for x in h]),
                        name="relative (÷ mean |margin|)", row=2, col=2, secondary_y=True)
        for row, col in ((1, 2), (2, 1)):
            fig.update_yaxes(tickformat=".0%", range=[0, 1.02], row=row, col=col)
        def upper(values: list[float], cis: list[Any]) -> list[float] | None:
            tops = [c[1] if c else v for v, c in zip(values, cis, strict=True) if v is not None and math.isfinite(v)]
            return [0, 1.1 * max(tops)] if tops and max(tops) > 0 else None

        fig.update_yaxes(title_text="logits", row=2, col=2, secondary_y=False, tickformat=".2~f",
                         range=upper([x.mean_margin_diff for x in h], [x.mean_margin_diff_ci for x in h]))
        fig.update_yaxes(title_text="ratio", row=2, col=2, secondary_y=True, showgrid=False, tickformat=".2~f",
                         range=upper([x.relative_margin_diff for x in h], [x.relative_margin_diff_ci for x in h]))
        fig.update_yaxes(rangemode="tozero", row=1, col=1)
        ticks = sorted(set(ep))
        for row in (1, 2):
            for col in (1, 2):
                fig.update_xaxes(title_text="epoch", tickvals=ticks if len(ticks) <= 12 else None,
                                 range=[min(ep) - 0.15, max(ep) + 0.15], row=row, col=col)
        n_cl = h[-1].n_clusters if h else 0
        fig.update_layout(
            title=dict(text=f"LoRA on layers {_span(self.layers)}: {self.trainable_params:,} params, {self.n_train} "
                            f"train / {self.n_eval} held-out pairs<br><sup>bars: 95% intervals (Clopper-Pearson for "
                            f"rates, cluster bootstrap for margins{f'; {n_cl} clusters' if n_cl else ''}); "
                            "epoch 0 = before training</sup>", x=0.02, font=dict(size=15)),
            height=660, width=900, margin=dict(t=100, l=60, r=60, b=110),
            legend=dict(orientation="h", yanchor="top", y=-0.13, x=0.0), template="plotly_white")
        return fig

    def __repr__(self) -> str:
        h0, h1 = self.history[0], self.history[-1]
        return (f"TrainResult(layers {_span(self.layers)}, {self.steps} steps, {self.trainable_params:,} params, "
                f"flip {h0.flip_rate:.1%} -> {h1.flip_rate:.1%}, acc {h0.accuracy:.1%} -> {h1.accuracy:.1%}, "
                f"margin diff {h0.mean_margin_diff:.2f} -> {h1.mean_margin_diff:.2f}, "
                f"adapter='{self.adapter_path}')")


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ==== data ============================================================================================
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _micro_seed(seed: int, epoch: int, index: int) -> int:
    """Per-micro-batch seed: dropout masks depend on the example, not on which GPU or run computes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[:8], "little") >> 1


# ==== checkpoints (safetensors + JSON, written atomically) ============================================
@contextmanager
def _atomic_dir(target: Path):
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _quiet_peft():
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing``; users cannot act on that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=1))


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]),
                                                                      int(np_state[3]), float(np_state[4])]}


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


def _save_checkpoint(folder: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     state: dict[str, Any]) -> None:
    with _atomic_dir(folder) as tmp:
        peft_model.save_pretrained(tmp / "adapter")
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items()
                   for k, v in s.items() if isinstance(v, Tensor)}
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        _write_json(tmp / "state.json", {**state, "format": CHECKPOINT_FORMAT, "param_groups": opt["param_groups"],
                                         "scheduler": sched, "rng": rng_meta})


class _BadCheckpoint(Exception):
    """A checkpoint folder that cannot be resumed from (the message says why)."""


def _step_of(folder: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", folder.name)
    return int(m.group(1)) if m else -1


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    """Checkpoint folders under ``output_dir/checkpoints``, newest first (by the step in the name)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and _step_of(d) >= 0), key=_step_of, reverse=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _BadCheckpoint(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _BadCheckpoint(f"{path.name} is not valid JSON ({type(e).__name__}: {e})") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise _BadCheckpoint(f"{path.name} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _BadCheckpoint(f"{path.name} is corrupt or truncated ({str(e).splitlines()[0] if str(e) else e})"
                             ) from None


def _read_checkpoint(folder: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked against the model and optimizer before anything is
    applied, so that a bad checkpoint changes nothing (`_BadCheckpoint` says what is wrong)."""
    from peft import get_peft_model_state_dict

    state = _read_json(folder / "state.json")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _BadCheckpoint(f"state.json is not an {CHECKPOINT_FORMAT} checkpoint")
    need = {"config": dict, "epoch": int, "step_in_epoch": int, "global_step": int, "history": list,
            "param_groups": list, "scheduler": dict, "rng": dict, "epoch_sums": list}
    bad = [k for k, t in need.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if bad:
        raise _BadCheckpoint(f"state.json lacks or mistypes {', '.join(bad)}")
    try:
        history = [EpochStats(**h) for h in state["history"]]
    except TypeError as e:
        raise _BadCheckpoint(f"state.json has a malformed history ({e})") from None
    adapter = _read_tensors(folder / "adapter" / "adapter_model.safetensors")
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    got = {k: tuple(v.shape) for k, v in adapter.items()}
    if got != want:
        odd = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise _BadCheckpoint(f"its adapter weights do not fit this run (e.g. '{odd[0]}')")
    flat = _read_tensors(folder / "optimizer.safetensors")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key == "empty":
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise _BadCheckpoint(f"optimizer.safetensors holds an unknown entry '{key}'")
        i = int(parts[1])
        if value.dim() and value.shape != params[i].shape:
            raise _BadCheckpoint(f"optimizer state '{key}' has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(params[i].shape)}")
        opt_state.setdefault(i, {})[parts[2]] = value
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise _BadCheckpoint("state.json's optimizer groups do not match this run")
    rng = _read_tensors(folder / "rng.safetensors")
    if "torch" not in rng or "numpy_keys" not in rng or not {"python", "numpy"} <= set(state["rng"]):
        raise _BadCheckpoint("rng.safetensors or state.json lacks the random-number state")
    return {"state": state, "history": history, "adapter": adapter, "optimizer": opt_state, "rng": rng}


def _apply_checkpoint(ckpt: dict[str, Any], peft_model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any) -> None:
    from peft import set_peft_model_state_dict

    state = ckpt["state"]
    set_peft_model_state_dict(peft_model, ckpt["adapter"])
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    optimizer.load_state_dict({"state": ckpt["optimizer"], "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    _set_rng_state(ckpt["rng"], state["rng"])


def _resume_checkpoint(output_dir: Path, cfg: dict[str, Any], peft_model: nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any] | None:
    """Load the newest good checkpoint of this run; a corrupt or truncated one is skipped with a warning
    naming it (the one before it is used). A good checkpoint of other settings is an error."""
    for folder in _checkpoint_folders(output_dir):
        try:
            ckpt = _read_checkpoint(folder, peft_model, optimizer)
        except _BadCheckpoint as e:
            warnings.warn(f"skipping checkpoint '{folder}': {e}; resuming from the one before it (if any). "
                          "It is left in place and is replaced when training passes that step again.",
                          stacklevel=4)
            continue
        saved = ckpt["state"]["config"]
        diff = {k: (saved.get(k), v) for k, v in jsonable(cfg).items() if saved.get(k) != v}
        if diff:
            key, (old, new) = next(iter(diff.items()))
            raise InterpError(f"output_dir '{output_dir}' holds a run with other settings ({key}: {old!r} there, "
                              f"{new!r} now); pass resume=False to start over, or use another output_dir")
        _apply_checkpoint(ckpt, peft_model, optimizer, scheduler)
        return {**ckpt["state"], "history": ckpt["history"], "folder": folder}
    return None


# ---- what train_lora writes into output_dir, and nothing else ----------------------------------------
_RUN_ENTRIES = ("checkpoints", "adapter", "result.json", OUTPUT_MARKER)  # train_lora's own top-level names
_CHECKPOINT_ENTRIES = {"adapter", "optimizer.safetensors", "rng.safetensors", "state.json"}
_ADAPTER_ENTRIES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # PEFT's save_pretrained


def _ours_temp(name: str, targets: Iterable[str]) -> bool:
    """A temporary name our atomic writers make beside ``target`` (``.target.XXXX``, ``.target.old123``)."""
    return any(name.startswith(f".{t}.") for t in targets)


def _foreign_entries(output_dir: Path) -> tuple[list[str], list[str]]:
    """(entries at the top of ``output_dir`` that train_lora did not write, entries inside its own
    subfolders that it did not write). Only the second kind blocks a folder that carries our marker."""
    top = [e.name + ("/" if e.is_dir() else "") for e in sorted(output_dir.iterdir())
           if e.name not in _RUN_ENTRIES and not _ours_temp(e.name, _RUN_ENTRIES)]
    inner: list[str] = []
    ck = output_dir / "checkpoints"
    if ck.exists() and not ck.is_dir():
        inner.append("checkpoints (a file)")
    elif ck.is_dir():
        for e in sorted(ck.iterdir()):
            if e.is_dir() and _step_of(e) >= 0:
                inner += [f"checkpoints/{e.name}/{x.name}" for x in sorted(e.iterdir())
                          if x.name not in _CHECKPOINT_ENTRIES and not _ours_temp(x.name, _CHECKPOINT_ENTRIES)]
                sub = e / "adapter"
                if sub.is_dir():
                    inner += [f"checkpoints/{e.name}/adapter/{x.name}" for x in sorted(sub.iterdir())
                              if x.name not in _ADAPTER_ENTRIES and not _ours_temp(x.name, _ADAPTER_ENTRIES)]
            elif not (e.is_dir() and e.name.startswith(".step-")):
                inner.append(f"checkpoints/{e.name}")
    ad = output_dir / "adapter"
    if ad.exists() and not ad.is_dir():
        inner.append("adapter (a file)")
    elif ad.is_dir():
        inner += [f"adapter/{x.name}" for x in sorted(ad.iterdir())
                  if x.name not in _ADAPTER_ENTRIES and not _ours_temp(x.name, _ADAPTER_ENTRIES)]
    res = output_dir / "result.json"
    if res.exists():
        try:
            mine = res.is_file() and {"adapter_path", "history", "layers"} <= set(json.loads(res.read_text()))
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            mine = False
        if not mine:
            inner.append("result.json (not a train_lora result)")
    return top, inner


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Check, writing nothing, that `train_lora` may write into ``output_dir``.

    Accepted: a new or empty folder; a folder carrying the workbench's marker (``.interp-output.json``:
    our runs, `run_loop`'s and `export`'s folders), whose other files are left alone; an earlier
    `train_lora` run without the marker. Refused (`ForeignFilesError`, naming the files): a non-empty folder
    holding anything else, and any file of the user's inside the subfolders train_lora replaces
    (``checkpoints/``, ``adapter/``) or the ``result.json`` it rewrites.
    """
    path = usable_folder(output_dir, what="output_dir")
    if not path.is_dir():
        return path
    top, inner = _foreign_entries(path)
    if top and not has_marker(path):
        raise ForeignFilesError(
            f"output_dir '{output_dir}' already holds files that interp did not write ({shown(top)}); train_lora "
            f"writes checkpoints/, adapter/ and result.json there and never touches a user's files: choose a new "
            "or empty folder (or one interp made)")
    if inner:
        raise ForeignFilesError(
            f"output_dir '{output_dir}' holds {shown(inner)}, which interp did not write, inside what train_lora "
            "replaces or deletes; move them out or choose another output_dir. Nothing was changed.")
    return path


def _remove_checkpoints(output_dir: Path) -> None:
    """Delete this run's stale checkpoints (folders `_foreign_entries` found to be ours), nothing else."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return
    for e in root.iterdir():
        if e.is_dir() and (_step_of(e) >= 0 or e.name.startswith(".step-")):
            shutil.rmtree(e, ignore_errors=True)


# ==== distributed (accelerate / torch.distributed) ====================================================
def _all_reduce_sum(tensors: list[Tensor], world: int) -> None:
    if world > 1:
        dist.all_reduce_sum(tensors)


# ==== training ========================================================================================
def _resolve_layers(model: Model, layers: Any) -> list[int]:
    if isinstance(layers, LayerSelection) and layers.n_layers != model.n_layers:
        raise InterpError(f"the LayerSelection {_span(layers.layers)} is for a {layers.n_layers}-layer model but "
                          f"'{model.name}' has {model.n_layers}; use selection.to_depth({model.n_layers})")
    return model.check_layers(layers)


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not (
            isinstance(value, numbers.Integral) or float(value).is_integer())):
        kind = "an integer" if integer else "a number"
        raise InterpError(f"{name}={value!r} must be {kind}")
    return float(value)


def check_settings(*, r: Any = 16, alpha: Any = 32, dropout: Any = 0.05, lr: Any = 2e-4, epochs: Any = 3,
                   batch_size: Any = 1, grad_accum: Any = 8, ce_weight: Any = 1.0, kl_weight: Any = 1.0,
                   kl_space: Any = "yes_no", warmup_ratio: Any = 0.0, weight_decay: Any = 0.0,
                   max_grad_norm: Any = 1.0, max_steps: Any = None) -> None:
    """Raise an `InterpError` naming the first LoRA setting that cannot train (before any work is done)."""
    for name, value in (("r", r), ("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if _number(name, value, integer=True) < 1:
            raise InterpError(f"{name}={value} must be a positive integer")
    if max_steps is not None and _number("max_steps", max_steps, integer=True) < 1:
        raise InterpError(f"max_steps={max_steps} must be a positive integer (or None for all epochs)")
    checks = [("lr", lr, lambda v: v > 0, "a positive finite number (the study: 2e-4)"),
              ("alpha", alpha, lambda v: v > 0, "a positive finite number (the study: 32 with r=16)"),
              ("dropout", dropout, lambda v: 0 <= v < 1, "in [0, 1) (the study: 0.05)"),
              ("ce_weight", ce_weight, lambda v: v >= 0, "a finite number >= 0"),
              ("kl_weight", kl_weight, lambda v: v >= 0, "a finite number >= 0"),
              ("warmup_ratio", warmup_ratio, lambda v: 0 <= v < 1, "in [0, 1)"),
              ("weight_decay", weight_decay, lambda v: v >= 0, "a finite number >= 0")]
    if max_grad_norm is not None:
        checks.append(("max_grad_norm", max_grad_norm, lambda v: v > 0, "a positive finite number, or None"))
    for name, value, ok, what in checks:
        v = _number(name, value)
        if not math.isfinite(v) or not ok(v):
            raise InterpError(f"{name}={value!r} must be {what}")
    if float(ce_weight) + float(kl_weight) == 0:
        raise InterpError(f"ce_weight={ce_weight}, kl_weight={kl_weight}: both >= 0 and not both 0")
    if kl_space not in ("yes_no", "vocab"):
        raise InterpError(f"kl_space={kl_space!r}; use 'yes_no' or 'vocab'")


_LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)


def resolve_target_modules(model: Model, layers: Sequence[int], target_modules: Any) -> tuple[Any, list[str]]:
    """(the value recorded in the run's config, the module names handed to PEFT) for ``target_modules``.

    A list of names (``["q_proj", "v_proj"]`` or dotted suffixes like ``"self_attn.q_proj"``), one name as a
    string (``"q_proj"``), ``"all-linear"``, or a regular expression that the full module name must match
    (PEFT's rule for a string). Every name must exist in the adapted ``layers``; an unknown one is an error
    listing those available. A regex is resolved to the matching modules inside ``layers`` only.
    """
    prefix = model.layers_path + "."
    inside = {n: m for n, m in model.hf.named_modules()
              if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()
              and int(n[len(prefix):].split(".")[0]) in set(layers) and isinstance(m, _LORA_TYPES)}
    available = sorted({n.rsplit(".", 1)[-1] for n in inside})
    where = f"layers {_span(layers)} of '{model.name}'"
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            names = sorted({n.rsplit(".", 1)[-1] for n, m in inside.items() if isinstance(m, nn.Linear)})
            return target_modules, names
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target_modules):
            target_modules = [target_modules]  # one module name, not a sequence of characters
        else:
            try:
                rx = re.compile(target_modules)
            except re.error as e:
                raise InterpError(f"target_modules={target_modules!r} is neither a module name nor a valid regular "
                                  f"expression ({e}); modules in {where}: {', '.join(available)}") from None
            hits = sorted(n for n in inside if rx.fullmatch(n))
            if not hits:
                raise InterpError(f"target_modules={target_modules!r} (a regular expression, matched against full "
                                  f"module names such as '{next(iter(inside), '')}') matches no module in {where}; "
                                  f"modules there: {', '.join(available)}")
            missed = sorted(set(layers) - {int(n[len(prefix):].split(".")[0]) for n in hits})
            if missed:
                raise InterpError(f"target_modules={target_modules!r} matches no module in layer(s) {_span(missed)}"
                                  f" of the adapted layers {_span(layers)}: widen the expression or the layers")
            return target_modules, hits
    try:
        names = list(target_modules)
    except TypeError:
        raise InterpError(f"target_modules={target_modules!r}: pass module names like ['q_proj', 'v_proj'], one "
                          "name, or a regular expression") from None
    if not names or not all(isinstance(t, str) and t for t in names):
        raise InterpError(f"target_modules={target_modules!r}: pass a non-empty list of module names "
                          f"(modules in {where}: {', '.join(available)})")
    unknown = [t for t in names if not any(n == t or n.endswith("." + t) for n in inside)]
    if unknown:
        raise InterpError(f"target_modules {shown(unknown)} name no module in {where}; modules there: "
                          f"{', '.join(available)}")
    return names, names


def _peft_wrap(model: Model, layers: list[int], *, r: int, alpha: float, dropout: float, target_modules: Any,
               seed: int) -> Model:
    """``model`` with fresh LoRA adapters on ``layers``, as a new `Model` that shares the base weights:
    the adapters go into a structural copy of the module tree, so ``model`` itself is never modified."""
    from peft import get_peft_model

    if hasattr(model.hf, "peft_config"):
        raise InterpError(f"'{model.name}' already carries a PEFT adapter; train on the base model (or merge() "
                          "the adapter first)")
    _, names = resolve_target_modules(model, layers, target_modules)
    cfg = lora_config(layers, layers_pattern=layers_pattern_of(model.layers_path), r=r, alpha=alpha,
                      dropout=dropout, target_modules=names)
    flags = _grad_flags(model.hf)
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)  # LoRA A matrices start from the same draw on every run and every GPU
        with _quiet_peft():
            peft = get_peft_model(shallow_copy(model.hf), cfg)
    peft.eval()  # new LoRA dropout modules start in training mode; training switches them on itself
    wrapped = _rewrap(model, peft)
    report = adapter_report(wrapped)
    if report.vision_modules or report.other_modules or sorted(report.language_layers) != layers:
        _restore_grad_flags(flags)
        raise InterpError(f"adapters landed on {report.modules[:3]}... instead of only language layers {layers}; "
                          f"check target_modules={target_modules!r}")
    return wrapped


# ---- a model tree that shares its weights: adapters without touching the caller's model --------------
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_SHARES_WEIGHTS = "_interp_shares_weights"  # set on a shallow copy: merge() must not write into its weights


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module tree with the same parameters and buffers (no tensor is copied).

    PEFT injects adapters by replacing submodules of the tree it is given; on this copy that leaves the
    original tree, and so the caller's base model, exactly as it was. Hooks are copied per module (a hook
    registered on one tree does not fire in the other); an instance-level ``forward`` bound to the original
    module (accelerate's device hooks) is rebound to the copy.
    """
    memo: dict[int, nn.Module] = {}

    def rebind(value: Any, old: nn.Module, new: nn.Module) -> Any:
        if isinstance(value, types.MethodType) and value.__self__ is old:
            return types.MethodType(value.__func__, new)
        if isinstance(value, functools.partial) and value.args and value.args[0] is old:
            return functools.update_wrapper(functools.partial(value.func, new, *value.args[1:], **value.keywords),
                                            value)
        return value

    def cp(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = copy.copy(m)
        memo[id(m)] = new
        d = new.__dict__
        d["_parameters"] = type(m._parameters)(m._parameters)
        d["_buffers"] = type(m._buffers)(m._buffers)
        d["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        for k in _HOOK_DICTS:
            if k in m.__dict__:
                d[k] = type(m.__dict__[k])(m.__dict__[k])
        for k, v in list(d.items()):
            if k != "_modules":
                d[k] = rebind(v, m, new)
        d["_modules"] = type(m._modules)((k, None if c is None else cp(c)) for k, c in m._modules.items())
        return new

    out = cp(module)
    out.__dict__[_SHARES_WEIGHTS] = True
    return out


def _grad_flags(module: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """``requires_grad`` of every parameter: PEFT freezes the (shared) base weights; we put them back."""
    return [(p, p.requires_grad) for p in module.parameters()]


def _restore_grad_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def _rewrap(model: Model, hf: nn.Module, name: str | None = None) -> Model:
    return Model(hf=hf, tokenizer=model.tokenizer, processor=model.processor, name=name or model.name,
                 chat=model.chat, answer_words=model.answer_words, source=model.source)


def _rng_devices(model: Model) -> list[int]:
    return [model.device.index or 0] if model.device.type == "cuda" else []


def _as_4bit(model: Model) -> Model:
    """QLoRA: the base in 4-bit NF4 (bitsandbytes), reloaded from its source, ready for k-bit training."""
    if not torch.cuda.is_available() or model.device.type != "cuda":
        raise InterpError("qlora=True needs a CUDA GPU: 4-bit NF4 quantisation (bitsandbytes) has no CPU kernels "
                          "here. On the CPU train a plain LoRA (qlora=False); on a GPU machine load the model "
                          "there (interp.load(..., device='cuda')).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InterpError("qlora=True needs bitsandbytes: pip install 'interp[gpu]' (bitsandbytes>=0.45)") from e
    if not _is_4bit(model.hf):
        src = model.source
        if not src or src in ("tiny-medgemma", "tiny-llava") or not (Path(src).is_dir() or src.count("/") == 1):
            raise InterpError(f"qlora=True reloads the model in 4-bit from its hub id or folder, but '{model.name}' "
                              f"came from {src!r}; load it with BitsAndBytesConfig yourself and Model.wrap() it")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        cfg = AutoConfig.from_pretrained(src)
        cls = AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None else AutoModelForCausalLM
        hf = cls.from_pretrained(src, quantization_config=nf4_config(), dtype=torch.bfloat16,
                                 device_map={"": model.device.index or 0})
        model = _rewrap(model, hf, name=f"{model.name} (4-bit)")
    # Not peft's prepare_model_for_kbit_training: it casts every bf16 weight left unquantised (embeddings,
    # norms, the vision tower's) to float32, which for MedGemma's 262k x 2560 embedding alone adds 2.5 GiB.
    # bf16 compute needs no upcast, peft's wrapper freezes the base, and gradient checkpointing is our own.
    return model


def _is_4bit(hf: nn.Module) -> bool:
    base = _base_of(hf)
    if getattr(base, "is_loaded_in_4bit", False):
        return True
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    if qc is not None and (getattr(qc, "load_in_4bit", False) or (isinstance(qc, dict) and qc.get("load_in_4bit"))):
        return True
    return any(type(m).__name__ == "Linear4bit" for m in base.modules())


class _Trainer:
    """The state of one training run (shared by `train_lora` and the benchmark)."""

    def __init__(self, model: Model, lo: int, cfg: dict[str, Any], *, fast: bool, cache: Any,
                 fuse_tokens: int = 0, checkpoint: bool = False):
        self.model, self.cfg, self.fuse_tokens = model, cfg, fuse_tokens
        self.dropout_rows = _DropoutRows()
        self.runner = _Runner(model, lo, fast=fast, cache=cache, checkpoint=checkpoint,
                              dropout_rows=self.dropout_rows)
        self.answer_ids = model.answer_ids
        self.params = [p for p in model.hf.parameters() if p.requires_grad]

    def _logits(self, pairs: Sequence[ParaphrasePair], keys: Sequence[Any]) -> Tensor:
        prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
        row_keys = [(k, "a") for k in keys] + [(k, "b") for k in keys]  # (example, phrasing)
        return project(self.model, self.runner.hidden(row_keys, prompts)).float()  # [2k, vocab]

    def _pair_loss(self, pairs: Sequence[ParaphrasePair], la: Tensor, lb: Tensor) -> LossParts:
        ta, tb, inverted = _targets(pairs, self.answer_ids)
        return pair_loss(la, lb, ta, tb, inverted, self.answer_ids, ce_weight=self.cfg["ce_weight"],
                         kl_weight=self.cfg["kl_weight"], kl_space=self.cfg["kl_space"])

    def loss(self, pairs: Sequence[ParaphrasePair], keys: Sequence[Any]) -> LossParts:
        """The loss of one micro-batch of pairs (``keys``: a cache key per pair)."""
        logits, n = self._logits(pairs, keys), len(pairs)
        return self._pair_loss(pairs, logits[:n], logits[n:])

    def _tokens(self, key: Any) -> int:
        entry = self.runner.store.get(key)
        return entry[0].shape[0] if entry is not None else 1 << 30  # unknown length: never fused

    def backward_group(self, micro: Sequence[tuple[Sequence[ParaphrasePair], Sequence[Any], Sequence[int]]],
                       group_size: int) -> list[LossParts]:
        """Forward and backward of micro-batches ``(pairs, keys, seeds)`` of one accumulation group.

        Micro-batches are fused into passes of at most ``fuse_tokens`` (padded) tokens; each one's loss is
        divided by ``group_size`` exactly as gradient accumulation does, so fusing changes no gradient (up
        to float rounding) and no dropout mask (they are drawn per example).
        """
        chunks: list[list[int]] = []
        width = rows = 0
        for j, (pairs, keys, _) in enumerate(micro):
            longest = max(self._tokens((k, side)) for k in keys for side in ("a", "b"))
            new_rows, new_width = rows + 2 * len(pairs), max(width, longest)
            if chunks and new_rows * new_width <= self.fuse_tokens:
                chunks[-1].append(j)
                rows, width = new_rows, new_width
            else:
                chunks.append([j])
                rows, width = 2 * len(pairs), longest
        parts: list[LossParts] = []
        for chunk in chunks:
            pairs = [p for j in chunk for p in micro[j][0]]
            keys = [k for j in chunk for k in micro[j][1]]
            seeds = [s for j in chunk for s in micro[j][2]]
            with self.dropout_rows.rows([2 * s for s in seeds] + [2 * s + 1 for s in seeds]):
                logits, n = self._logits(pairs, keys), len(pairs)
                total, start = logits.new_zeros(()), 0
                for j in chunk:
                    k = len(micro[j][0])
                    part = self._pair_loss(micro[j][0], logits[start:start + k], logits[n + start:n + start + k])
                    total, start = total + part.total / group_size, start + k
                    parts.append(part)
                total.backward()  # inside the context: checkpointed layers redraw the same dropout masks
        return parts

    @torch.no_grad()
    def margins(self, pairs: Sequence[ParaphrasePair], prefix: str, batch_rows: int, progress: bool = False
                ) -> tuple[Tensor, Tensor]:
        prompts = [q for p in pairs for q in (p.prompt_a(), p.prompt_b())]
        keys = [((prefix, i), side) for i in range(len(pairs)) for side in ("a", "b")]
        out = torch.zeros(len(prompts))
        ids = list(self.answer_ids)
        step = _eval_step(batch_rows)
        rank, world = rank_and_world()
        starts = list(range(0, len(prompts), step))[rank::world]  # under several processes, every world-th slice
        for s in tqdm(starts, desc="held-out", disable=not progress, leave=False):
            sl = slice(s, s + step)
            logits = project(self.model, self.runner.hidden(keys[sl], prompts[sl]), ids).float().cpu()
            out[sl] = logits[:, 0] - logits[:, 1]
        if world > 1:
            dist.all_reduce_sum([out])  # each margin is non-zero in one process only: the sum is exact
        return out[0::2], out[1::2]


def _eval_step(batch_rows: int) -> int:
    return max(2, batch_rows - batch_rows % 2)  # whole pairs per slice


def _eval_share(n_pairs: int, batch_rows: int, rank: int, world: int) -> list[int]:
    """The held-out pairs this process scores in `_Trainer.margins` (so only those are cached for it)."""
    per = _eval_step(batch_rows) // 2
    return [i for i in range(n_pairs) if (i // per) % world == rank]


@exclusive
def train_lora(model: Model, pairs: Sequence[ParaphrasePair], *, layers: Any, r: int = 16, alpha: int = 32,
               dropout: float = 0.05, lr: float = 2e-4, epochs: int = 3, batch_size: int = 1, grad_accum: int = 8,
               ce_weight: float = 1.0, kl_weight: float = 1.0, kl_space: KlSpace = "yes_no",
               target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
               eval_pairs: Sequence[ParaphrasePair] | float | None = 0.1, seed: int = 0,
               output_dir: str | os.PathLike = "lora_run", resume: bool = True, max_steps: int | None = None,
               warmup_ratio: float = 0.0, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
               qlora: bool = False, fast_path: bool = True, cache: bool | str = "auto",
               fuse_tokens: int | None = None, checkpointing: bool | None = None,
               eval_batch_size: int | None = None, fold_dropout: bool | None = None,
               progress: bool = True) -> TrainResult:
    """Train a LoRA on ``layers`` with CE on the first answer token + symmetric KL between phrasings.

    Loss per micro-batch: ``ce_weight * CE + kl_weight * KL``, CE the mean cross-entropy of the gold answer
    token over phrasings that have one, KL the mean over pairs of ``(KL(p_a||p_b) + KL(p_b||p_a)) / 2`` (the
    mean of the two directions, `symmetric_kl`: a loss that sums them is this one at ``kl_weight=2``).

    Defaults are the study's (r=16, alpha=32, dropout 0.05, q/k/v/o/gate/up/down, lr 2e-4, 1 pair x 8
    accumulation steps, 3 epochs, linear decay). ``layers``: a `LayerSelection`, ints, or ``"all"``.
    ``ce_weight=0`` is pure consistency training (it collapses to a constant answer). ``eval_pairs``: held-out
    pairs, or a fraction of ``pairs`` to hold out (by question group), or None for no held-out metrics.
    ``kl_space``: ``"yes_no"`` (default) compares the 2-way yes/no distributions, i.e. the decision whose
    flips we count, and lets inverted-polarity pairs be compared by swapping yes/no; ``"vocab"`` compares
    full-vocabulary distributions. Each epoch ends with a checkpoint in ``output_dir/checkpoints``; with
    ``resume=True`` a rerun continues from the last one. The adapter (standard PEFT) goes to
    ``output_dir/adapter``; ``model`` itself is left without adapters (load it with `load_adapter`).

    Speed (none of it changes the gradient beyond float rounding): the residual stream entering the lowest
    adapted layer is cached once per example (``cache``: "auto" = GPU, then CPU memory, as room allows;
    True, False, "cpu"); the micro-batches of one accumulation group are fused into forward passes of at
    most ``fuse_tokens`` padded tokens (default 8192 on a GPU, 2048 on the CPU; 0 = one micro-batch per
    pass), and ``checkpointing`` (default: on a GPU) recomputes each adapted-stack layer in the backward
    pass so that fusing costs no extra memory. LoRA dropout masks are drawn per example, so fusing, the
    number of GPUs and resuming leave them unchanged. ``fold_dropout``: fold the LoRA dropout into ``lora_A``
    on long passes: less activation memory (0.58 GiB at MedGemma-4B on image pairs), 13% slower steps; None
    (the default): folded under ``qlora=True`` only. ``fast_path=False`` trains with the plain
    forward.
    Under ``accelerate launch`` (or torchrun) each process takes its share of every accumulation group and
    the LoRA gradients are summed across processes (DDP): same result as one GPU up to reduction order.
    """
    check_settings(r=r, alpha=alpha, dropout=dropout, lr=lr, epochs=epochs, batch_size=batch_size,
                   grad_accum=grad_accum, ce_weight=ce_weight, kl_weight=kl_weight, kl_space=kl_space,
                   warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   max_steps=max_steps)
    if fold_dropout is not None and not isinstance(fold_dropout, bool):
        raise InterpError(f"fold_dropout={fold_dropout!r} must be True, False or None (the default)")
    fold = _fold_default(bool(qlora)) if fold_dropout is None else fold_dropout
    pairs = check_pairs(pairs)
    layer_list = _resolve_layers(model, layers)
    targets, _ = resolve_target_modules(model, layer_list, target_modules)  # before the model is wrapped
    output_dir = check_output_dir(output_dir)  # a user's files are never overwritten or deleted
    if isinstance(eval_pairs, float):
        train, held = split(pairs, eval_pairs, seed=seed)
    else:
        train, held = pairs, ([] if eval_pairs is None else check_pairs(eval_pairs, name="eval_pairs"))
    layers_held_out = None
    if held and isinstance(layers, LayerSelection):  # were the layers chosen on the pairs that evaluate them?
        from interp.features import _selection_overlap

        layers_held_out, said = _selection_overlap(held, layers, "the layers")
        if layers_held_out is False:
            warnings.warn(f"train_lora: the held-out metrics are not held out from the layer selection: {said}",
                          stacklevel=2)
    rank, world = rank_and_world()
    if grad_accum % world:
        raise InterpError(f"grad_accum={grad_accum} must be a multiple of the {world} processes so that every "
                          "optimizer step sees the same examples as on one GPU")
    cfg = dict(layers=layer_list, r=int(r), alpha=alpha, dropout=dropout, lr=lr, epochs=int(epochs),
               batch_size=int(batch_size), grad_accum=int(grad_accum), ce_weight=ce_weight, kl_weight=kl_weight,
               kl_space=kl_space, target_modules=targets, seed=seed, warmup_ratio=warmup_ratio,
               weight_decay=weight_decay, max_grad_norm=max_grad_norm, qlora=qlora,
               train_digest=_digest([p.to_dict() for p in train]), eval_digest=_digest([p.to_dict() for p in held]),
               model=model.name, model_fingerprint=model.fingerprint)
    if qlora:
        model = _as_4bit(model)
    if rank == 0:
        mark_folder(output_dir, what="output_dir", by="train_lora")
    flags = _grad_flags(model.hf)
    peft_model = _peft_wrap(model, layer_list, r=int(r), alpha=alpha, dropout=dropout, target_modules=targets,
                            seed=seed)
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)):
            result = _train(peft_model, train, held, cfg, output_dir=output_dir, resume=resume, max_steps=max_steps,
                            fast=fast_path, cache=cache, fuse_tokens=fuse_tokens, checkpointing=checkpointing,
                            eval_batch_size=eval_batch_size, fold=fold, progress=progress,
                            rank=rank, world=world)
        # not a training setting (a resumed run's checkpoint does not compare it): said beside the result
        return replace(result, config={**result.config,
                                       "eval_held_out_from_layer_selection": layers_held_out})
    finally:
        _restore_grad_flags(flags)  # the adapters lived in a copy; the caller's model is as it came in


def _train(pm: Model, train: list[ParaphrasePair], held: list[ParaphrasePair], cfg: dict[str, Any], *,
           output_dir: Path, resume: bool, max_steps: int | None, fast: bool, cache: Any,
           fuse_tokens: int | None, checkpointing: bool | None, eval_batch_size: int | None, fold: bool,
           progress: bool, rank: int, world: int) -> TrainResult:
    from transformers import get_linear_schedule_with_warmup

    layers, seed = cfg["layers"], cfg["seed"]
    cuda = pm.device.type == "cuda"
    fuse = (8192 if cuda else 2048) if fuse_tokens is None else int(fuse_tokens)
    ckpt = cuda if checkpointing is None else bool(checkpointing)
    trainer = _Trainer(pm, layers[0], cfg, fast=fast, cache=cache, fuse_tokens=fuse, checkpoint=ckpt)
    if trainer.runner.kind != "generic":
        # guard against a transformers release whose decoder forward we no longer reproduce exactly
        try:
            err = trainer.runner.check([train[0].prompt_a(), train[0].prompt_b()])
            problem = f"differs from the plain forward by {err:.2e} (relative)" \
                if err > (1e-3 if pm.dtype == torch.float32 else 5e-2) else None
        except Exception as e:  # noqa: BLE001 - any failure means: use the plain forward
            problem = f"failed ({type(e).__name__}: {e})"
        if problem and hf.is_verified(pm.hf):
            raise InterpError(f"the {trainer.runner.kind} fast path {problem} on '{pm.name}' "
                              f"({hf.architecture(pm.hf)}, an architecture it is verified for). This is a bug in "
                              "interp or an untested transformers release; pass fast=False to train with the "
                              "plain forward")
        if problem:
            warnings.warn(f"the fast path {problem} on '{pm.name}' ({hf.architecture(pm.hf)}, not verified); "
                          "training with the plain forward instead", stacklevel=3)
            trainer = _Trainer(pm, layers[0], cfg, fast=False, cache=False)
    # the residual stream entering layer lo: computed once per example, before any training
    items = [((("train", i), side), p.prompt_a() if side == "a" else p.prompt_b())
             for i, p in enumerate(train) for side in ("a", "b")]
    eval_rows = eval_batch_size or (32 if pm.device.type == "cuda" else 16)
    items += [((("eval", i), side), held[i].prompt_a() if side == "a" else held[i].prompt_b())
              for i in _eval_share(len(held), eval_rows, rank, world) for side in ("a", "b")]
    trainer.runner.prefill(items, rows_per_pass=8, progress=progress and rank == 0)
    optimizer = torch.optim.AdamW(trainer.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    bs, ga = cfg["batch_size"], cfg["grad_accum"]
    n_micro = math.ceil(len(train) / bs)
    steps_per_epoch = math.ceil(n_micro / ga)
    total_steps = steps_per_epoch * cfg["epochs"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg["warmup_ratio"] * total_steps), total_steps)

    def evaluate_now(epoch: float, step: int, loss: list[float] | None) -> EpochStats:
        pm.hf.eval()
        if held:
            ma, mb = trainer.margins(held, "eval", eval_rows, progress=progress and rank == 0)
            m = pair_metrics(ma, mb, held, seed=seed)
        else:
            m = {"flip_rate": float("nan"), "accuracy": float("nan"), "mean_margin_diff": float("nan"), "n_eval": 0}
        mean = (lambda i: loss[i] / max(loss[3], 1)) if loss else (lambda i: None)
        return EpochStats(epoch=epoch, step=step, loss=mean(0), ce=mean(1), kl=mean(2), lr=scheduler.get_last_lr()[0],
                          **m)

    def train_mode() -> None:
        pm.hf.eval()  # the cached lower part was computed in eval mode; only the adapted layers train
        for i in range(layers[0], len(trainer.runner.layers)):
            trainer.runner.layers[i].train()

    ckpt_root = output_dir / "checkpoints"
    history: list[EpochStats] = []
    epoch0, step_in_epoch, global_step = 0, 0, 0
    resumed_sums = [0.0, 0.0, 0.0, 0.0]
    saved = _resume_checkpoint(output_dir, cfg, pm.hf, optimizer, scheduler) if resume else None
    if saved is not None:
        history = list(saved["history"])
        epoch0, step_in_epoch, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        if rank == 0 and step_in_epoch:  # resumed mid-epoch: the epoch's loss so far (all processes)
            resumed_sums = list(saved["epoch_sums"])
    elif rank == 0 and not resume:
        _remove_checkpoints(output_dir)  # stale checkpoints of ours must not be resumed by a later run
    _barrier(world)
    if not history:
        history.append(evaluate_now(0, 0, None))

    with _row_dropout(pm.hf, trainer.dropout_rows, fold=fold):  # dropout masks drawn per example
        bar = tqdm(total=total_steps, initial=global_step, desc=f"lora {_span(layers)}", unit="step",
                   disable=not progress or rank != 0)
        for epoch in range(epoch0, cfg["epochs"]):
            if max_steps is not None and global_step >= max_steps:
                break
            order = np.random.default_rng([seed, epoch]).permutation(len(train)).tolist()
            micro = [order[i:i + bs] for i in range(0, len(order), bs)]
            sums = resumed_sums if epoch == epoch0 else [0.0, 0.0, 0.0, 0.0]  # loss, ce, kl, micro-batches
            train_mode()
            stopped = False
            for s in range(step_in_epoch if epoch == epoch0 else 0, steps_per_epoch):
                group = list(range(s * ga, min((s + 1) * ga, n_micro)))
                for p in trainer.params:
                    p.grad = None
                mine = [micro[mi] for k, mi in enumerate(group) if k % world == rank]  # this process's share
                torch.manual_seed(_micro_seed(seed, epoch, -1 - s))
                parts = trainer.backward_group([([train[i] for i in idx], [("train", i) for i in idx],
                                                 [_micro_seed(seed, epoch, i) for i in idx]) for idx in mine], len(group))
                if parts:
                    totals = torch.stack([torch.stack([q.total.detach(), q.ce, q.kl]) for q in parts]).sum(0)
                    for j, v in enumerate(totals.tolist()):  # one device sync per optimizer step
                        sums[j] += v
                    sums[3] += len(parts)
                for p in trainer.params:
                    if p.grad is None:  # a process with no micro-batch this step still joins the reduction
                        p.grad = torch.zeros_like(p)
                _all_reduce_sum([p.grad for p in trainer.params], world)
                if cfg["max_grad_norm"]:
                    torch.nn.utils.clip_grad_norm_(trainer.params, cfg["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0] / max(sums[3], 1):.3f}")
                if max_steps is not None and global_step >= max_steps and s + 1 < steps_per_epoch:
                    stopped, step_in_epoch = True, s + 1
                    break
            totals = torch.tensor(sums, dtype=torch.float64)
            _all_reduce_sum([totals], world)
            done = epoch + 1 if not stopped else epoch + step_in_epoch / steps_per_epoch
            history.append(evaluate_now(round(done, 4), global_step, totals.tolist()))
            if rank == 0:
                _save_checkpoint(ckpt_root / f"step-{global_step:06d}", pm.hf, optimizer, scheduler,
                                 {"config": cfg, "epoch": epoch if stopped else epoch + 1,
                                  "step_in_epoch": step_in_epoch if stopped else 0, "global_step": global_step,
                                  "history": [h.to_dict() for h in history], "epoch_sums": totals.tolist()})
            if stopped:
                break
        bar.close()
    pm.hf.eval()
    adapter_dir = output_dir / "adapter"
    if rank == 0:
        with _atomic_dir(adapter_dir) as tmp:
            pm.hf.save_pretrained(tmp)
    result = TrainResult(adapter_path=adapter_dir, layers=tuple(layers), history=tuple(history), n_train=len(train),
                         n_eval=len(held), trainable_params=sum(p.numel() for p in trainer.params), steps=global_step,
                         fast_path=trainer.runner.kind, cache_bytes=trainer.runner.cache_bytes,
                         output_dir=output_dir, config=cfg)
    if rank == 0:
        result.to_json(output_dir / "result.json")
    _barrier(world)
    return result


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ==== adapters: report, load, merge ===================================================================
@dataclass(frozen=True)
class AdapterReport(Result):
    """Exactly which modules carry LoRA adapters, split into language layers, vision tower and the rest."""

    modules: tuple[str, ...]  # every adapted module, named as in the base model
    language_layers: tuple[int, ...]  # decoder layers with at least one adapted module
    vision_modules: tuple[str, ...]  # adapted modules inside a vision tower (the cxr-auditor case)
    other_modules: tuple[str, ...]  # adapted modules in neither (projector, lm_head, ...)
    adapter_params: int
    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> r, alpha, targets, layers

    @property
    def touches_vision(self) -> bool:
        return bool(self.vision_modules)

    @property
    def table(self):
        """One row per adapted module: name, part (language / vision / other), layer."""
        import pandas as pd

        part = {m: "vision" for m in self.vision_modules} | {m: "other" for m in self.other_modules}
        return pd.DataFrame([{"module": m, "part": part.get(m, "language"), "layer": _layer_of(m)}
                             for m in self.modules])

    def __repr__(self) -> str:
        lang = f"language layers {_span(self.language_layers)}" if self.language_layers else "no language layers"
        text = f"AdapterReport({len(self.modules)} modules on {lang}, {self.adapter_params:,} params"
        if self.vision_modules:
            text += f"; WARNING {len(self.vision_modules)} in the vision tower, e.g. '{self.vision_modules[0]}'"
        if self.other_modules:
            text += f"; {len(self.other_modules)} elsewhere, e.g. '{self.other_modules[0]}'"
        return text + ")"


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a in ("layers", "h") and b.isdigit():
            return int(b)
    return None


def adapter_report(model: Model | nn.Module) -> AdapterReport:
    """List the modules that carry adapters; any inside the vision tower are flagged."""
    from peft.tuners.lora import LoraLayer

    hf = model.hf if isinstance(model, Model) else model
    base = _base_of(hf)
    layers_path, _ = _find_layers(base)
    modules, lang, vision, other = [], set(), [], []
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer) or not mod.lora_A:
            continue
        modules.append(name)
        if name.startswith(layers_path + "."):
            lang.add(int(name[len(layers_path) + 1:].split(".")[0]))
        elif any(part in _VISION_PARTS for part in name.split(".")):
            vision.append(name)
        else:
            other.append(name)
    n_params = sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    configs = {k: {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                   "target_modules": sorted(c.target_modules) if isinstance(c.target_modules, (set, list))
                   else c.target_modules, "layers_to_transform": c.layers_to_transform,
                   "layers_pattern": c.layers_pattern}
               for k, c in getattr(hf, "peft_config", {}).items()}
    return AdapterReport(tuple(modules), tuple(sorted(lang)), tuple(vision), tuple(other), n_params, configs)


# Known renamings of the same module between layouts (full names under the model, one tuple per part):
# transformers 5.x VLMs (model.language_model.layers), 4.x VLMs (language_model.model.layers), LLaMA and
# the original LLaVA code base, LLaVA-Rad's included (model.layers).
_LAYOUT_ALIASES = (
    ("model.language_model.layers.", "language_model.model.layers.", "model.layers.", "language_model.layers."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_PEFT_PREFIX = "base_model.model."


def _read_adapter_config(folder: Path, src: str) -> Any:
    """The folder's adapter_config.json as a `peft.LoraConfig`, or an `InterpError` saying what is wrong."""
    from peft import PeftConfig

    file = folder / "adapter_config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InterpError(f"adapter '{src}': {file} is not valid JSON ({type(e).__name__}: {e}); re-download the "
                          "adapter or save it again with PEFT's save_pretrained") from None
    if not isinstance(raw, dict):
        raise InterpError(f"adapter '{src}': {file} holds a {type(raw).__name__}, not a PEFT config object")
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise InterpError(f"adapter '{src}': peft_type={raw.get('peft_type')!r} in {file}; interp loads LoRA "
                          "adapters (peft_type 'LORA')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys from other PEFT versions are dropped, which is fine
            cfg = PeftConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise InterpError(f"adapter '{src}': {file} is not a valid LoRA config ({type(e).__name__}: {e})") from None
    r, alpha = getattr(cfg, "r", None), getattr(cfg, "lora_alpha", None)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or \
            not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise InterpError(f"adapter '{src}': {file} has r={r!r}, lora_alpha={alpha!r}; need an integer r >= 1 "
                          "and a finite lora_alpha")
    tm = cfg.target_modules
    if tm is not None and not isinstance(tm, str) and not all(isinstance(t, str) for t in tm):
        raise InterpError(f"adapter '{src}': target_modules={tm!r} in {file} must be names or a regular expression")
    return cfg


def _read_adapter_weights(folder: Path, src: str) -> dict[str, Tensor]:
    try:
        return _read_tensors(folder / "adapter_model.safetensors")
    except _BadCheckpoint as e:
        raise InterpError(f"adapter '{src}': {e}; re-download the adapter (or save it again) and retry") from None


def _fit_config(cfg: Any, model: Model) -> list[str]:
    """Point a config written for another layout of the same model at this one (``layers_pattern`` and
    full module names); returns what was changed."""
    notes: list[str] = []
    target_path = model.layers_path + "."
    pattern = cfg.layers_pattern
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    fits = [p for p in patterns if (target_path).endswith("." + p + ".") or target_path == p + "."]
    if patterns and not fits:
        known = {a.rstrip(".") for a in _LAYOUT_ALIASES[0]} | {".".join(a.rstrip(".").split(".")[-2:])
                                                               for a in _LAYOUT_ALIASES[0]}
        if all(p in known for p in patterns):
            cfg.layers_pattern = layers_pattern_of(model.layers_path)
            notes.append(f"layers_pattern {pattern!r} (another module layout) -> {cfg.layers_pattern!r}")
    tm = cfg.target_modules
    if tm is not None and not isinstance(tm, str) and any("." in t for t in tm):
        names = {n for n, _ in model.hf.named_modules()}
        mapped = [_alias(t, names) or t for t in tm]
        if mapped != list(tm):
            notes.append(f"{sum(a != b for a, b in zip(mapped, tm, strict=True))} full target module names")
            cfg.target_modules = set(mapped) if isinstance(tm, set) else mapped
    return notes


def _alias(name: str, known: Iterable[str]) -> str | None:
    """``name`` renamed into the layout whose names are ``known`` (a set, or the keys of a dict)."""
    for group in _LAYOUT_ALIASES:
        for old in sorted(group, key=len, reverse=True):
            if name.startswith(old):
                for new in group:
                    if new != old and (cand := new + name[len(old):]) in known:
                        return cand
                break
    return None


def _match_keys(weights: dict[str, Tensor], expected: dict[str, tuple[int, ...]], src: str, model: Model, *,
                tolerate_outside: bool = False) -> tuple[dict[str, Tensor], int, list[str]]:
    """The adapter's weights keyed as ``expected`` (PEFT's saved names for this model), mapping keys of a
    known other layout; an `AdapterMismatchError` naming every key that stays missing or unexpected.

    ``tolerate_outside``: when every weight in the file found its module and the only missing keys are
    outside the language decoder (a broad ``layers_pattern`` such as ``"layers"`` also matched the vision
    tower's layers, which the adapter never trained), return those keys instead of raising."""
    def strip(k: str) -> str:
        return k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k

    want = {strip(k): k for k in expected}
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    renamed = 0
    for key, value in weights.items():
        short = strip(key)
        if short in want:
            out[want[short]] = value
        elif (cand := _alias(short, want)) is not None and want[cand] not in out:
            out[want[cand]] = value
            renamed += 1
        else:
            unexpected.append(key)
    missing = sorted(k for k in expected if k not in out)
    inside = f"{_PEFT_PREFIX}{model.layers_path}."
    if tolerate_outside and weights and not unexpected and missing and not any(k.startswith(inside) for k in missing):
        return out, renamed, missing
    if not out and weights:
        raise AdapterMismatchError(
            f"adapter '{src}': none of the {len(weights)} weights in adapter_model.safetensors match a module of "
            f"'{model.name}' (e.g. {shown(sorted(weights), 3)}; this model's adapted modules are named like "
            f"{shown(sorted(expected), 2)}). Every LoRA update would stay zero: the adapter was saved for another "
            "model or layout")
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) in the file match no adapted module ({shown(sorted(unexpected))})")
        if missing:
            parts.append(f"{len(missing)} adapted module weight(s) are not in the file, so their LoRA update would "
                         f"stay zero ({shown(missing)})")
        raise AdapterMismatchError(f"adapter '{src}' does not fit '{model.name}': {'; '.join(parts)}. Load it onto "
                                   "the model it was trained for")
    bad = [k for k, v in out.items() if tuple(v.shape) != expected[k]]
    if bad:
        k = bad[0]
        raise AdapterMismatchError(f"adapter '{src}': weight '{k}' has shape {tuple(out[k].shape)} but '{model.name}'"
                                   f" needs {expected[k]} ({len(bad)} such); it was trained for another base model")
    return out, renamed, []


def _same_base(declared: str | None, model: Model) -> bool:
    if not declared:
        return True
    cfg = getattr(_base_of(model.hf), "config", None)
    mine = {str(x) for x in (model.source, model.name, getattr(cfg, "_name_or_path", None)) if x}
    if not mine:
        return True

    def tail(x: str) -> str:
        return x.rstrip("/").rsplit("/", 1)[-1].lower()

    return declared in mine or tail(declared) in {tail(m) for m in mine}


def load_adapter(model: Model, path_or_hub_id: str | os.PathLike, *, adapter_name: str = "default",
                 is_trainable: bool = False) -> Model:
    """``model`` with a standard PEFT LoRA adapter (a local folder or a hub id), as a new `Model`.

    ``model`` stays the base: the adapter goes into a structural copy of its module tree that shares the base
    weights (no tensor is copied), so ``evaluate(model)`` still scores the base and ``train_lora(model)``
    trains a fresh adapter; moving either model to another device moves both. Checked before use: the config
    (valid JSON, a LoRA config, layers the model has), the weights file (readable safetensors), and that the
    file's keys are exactly the adapted modules' (keys of a known other layout, transformers 4.x
    ``language_model.model.layers`` or original LLaVA ``model.layers``, are mapped with a warning; any other
    missing or unexpected key is an `AdapterMismatchError` naming it). A ``base_model_name_or_path`` that
    differs from the model's name warns.
    """
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    if hasattr(model.hf, "peft_config"):
        raise InterpError(f"'{model.name}' already carries an adapter; load the new one onto a fresh base model "
                          "or merge() the current one first")
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", adapter_name):
        raise InterpError(f"adapter_name={adapter_name!r} must be a plain name like 'default'")
    src = str(path_or_hub_id)
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise InterpError(f"'{path}' has no adapter_config.json: pass the folder PEFT's save_pretrained wrote")
        folder = path
    else:
        if src.count("/") != 1 or src.startswith((".", "/", "~")):
            raise InterpError(f"adapter '{src}' is neither a local folder nor a hub id like 'owner/name'")
        folder = _fetch_adapter(src)
    if not (folder / "adapter_model.safetensors").is_file():
        raise InterpError(f"'{folder}' has no adapter_model.safetensors; interp loads safetensors adapters only "
                          "(a pickled adapter_model.bin can run code when loaded)")
    pcfg = _read_adapter_config(folder, src)
    weights = _read_adapter_weights(folder, src)
    wanted = pcfg.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else (wanted or [])
    if wanted and max(wanted) >= model.n_layers:
        raise InterpError(f"adapter '{src}' targets layer {max(wanted)} but '{model.name}' has {model.n_layers} "
                          "layers: it was trained for another base model")
    if not _same_base(pcfg.base_model_name_or_path, model):
        warnings.warn(f"adapter '{src}' was trained on '{pcfg.base_model_name_or_path}', not on '{model.name}' "
                      f"(source {model.source or 'unknown'!r}); its keys fit, but check that this is the same base "
                      "model", stacklevel=2)
    notes = _fit_config(pcfg, model)
    pcfg.inference_mode = not is_trainable
    flags = _grad_flags(model.hf)

    def inject() -> tuple[Any, dict[str, tuple[int, ...]]]:
        try:
            with _quiet_peft():
                pm = PeftModel(shallow_copy(model.hf), pcfg, adapter_name=adapter_name)
        except ValueError as e:
            raise AdapterMismatchError(f"adapter '{src}' does not fit '{model.name}': {e}") from None
        return pm, {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm, adapter_name=adapter_name).items()}

    try:
        peft, expected = inject()
        mapped, renamed, stray_modules = _match_keys(weights, expected, src, model, tolerate_outside=True)
        if stray_modules:
            # adapt exactly the modules the file has weights for (PEFT matches full names exactly)
            names = sorted({k[len(_PEFT_PREFIX):].split(".lora_")[0] for k in mapped})
            notes.append(f"its layers_pattern {pcfg.layers_pattern!r} also matched {len(stray_modules) // 2} modules "
                         f"with no weights in the file (e.g. '{stray_modules[0].split('.lora_')[0]}'), left out")
            pcfg.target_modules, pcfg.layers_to_transform, pcfg.layers_pattern = names, None, None
            peft, expected = inject()
            mapped, renamed, _ = _match_keys(weights, expected, src, model)
        weights = mapped
        result = set_peft_model_state_dict(peft, weights, adapter_name=adapter_name)
        stray = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if stray:
            raise AdapterMismatchError(f"adapter '{src}': PEFT could not place {shown(stray)}")
    finally:
        if not is_trainable:
            _restore_grad_flags(flags)  # PEFT froze the shared base weights; the caller's model is unchanged
    if renamed:
        notes.append(f"{renamed} weight keys renamed from another module layout to this model's "
                     f"'{model.layers_path}'")
    if notes:
        warnings.warn(f"adapter '{src}' was fitted to '{model.name}': {'; '.join(notes)}. The weights are loaded "
                      "unchanged (check adapter_report)", stacklevel=2)
    peft.eval()
    return _rewrap(model, peft, name=f"{model.name}+{Path(src).name or src}")


def _fetch_adapter(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
    except Exception as e:  # offline, gated, missing: all mean "get the folder another way"
        raise InterpError(f"could not fetch adapter '{hub_id}' from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). This machine may have no hub access: "
                          "download the adapter folder elsewhere and pass its local path.") from e


@dataclass(frozen=True)
class MergeReport(Result):
    """Per adapted module: how much the merge changed the weight, and whether anything else moved."""

    relative_delta: dict[str, float]  # ||W_merged - W_base|| / ||W_base||
    agreement: dict[str, float]  # ||W_merged - W_base|| / ||B A * scale|| (1 = the merge kept the update)
    unchanged_elsewhere: bool
    passed: bool


@exclusive
def merge(model: Model, verify: bool = True, *, min_relative_delta: float = 1e-6) -> Model:
    """Merge the adapter into the base weights (``merge_and_unload``) and return the merged `Model`.

    A model from `load_adapter` shares its weights with the base model it was loaded onto: the merge writes
    into copies of the adapted modules' weights, so that base model is left unchanged.

    Refuses a 4-bit base (merge into a clean bf16 base instead). With ``verify``: every adapted module's
    weight must move by a non-trivial amount that agrees with its LoRA update (so a zero adapter, or one
    that bf16 rounding swallowed, fails), and no other parameter may change. The check is attached to the
    result as ``.merge_report``.
    """
    from peft.tuners.lora import LoraLayer

    hf = model.hf
    if not hasattr(hf, "merge_and_unload"):
        raise InterpError(f"'{model.name}' carries no adapter to merge; load one with interp.load_adapter first")
    if _is_4bit(hf):
        raise InterpError("refusing to merge into a 4-bit base: merging dequantises and re-rounds the weights and "
                          "silently loses the update. Load the base in bf16 (interp.load(source, dtype='bfloat16')), "
                          "load_adapter() onto it, and merge that.")
    base = _base_of(hf)
    adapted = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer) and m.lora_A}
    if not adapted:
        raise InterpError(f"'{model.name}' has no LoRA modules to merge")
    before: dict[str, Tensor] = {}
    expected: dict[str, float] = {}
    if verify:
        for name, mod in adapted.items():
            with torch.no_grad():
                delta = sum(mod.get_delta_weight(a).float() for a in mod.active_adapters if a in mod.lora_A)
            expected[name] = float(torch.linalg.norm(delta)) if isinstance(delta, Tensor) else 0.0
            before[name] = mod.get_base_layer().weight.detach().to("cpu", copy=True)
        zero = [n for n, e in expected.items() if e == 0.0]
        if zero:
            raise InterpError(f"merge verification failed before merging: the adapter's update is exactly zero in "
                              f"{len(zero)} of {len(adapted)} modules (e.g. '{zero[0]}'), so merging would change "
                              "nothing. Was the adapter trained (or saved before training)?")
        adapted_params = {f"{n}.base_layer.weight" for n in adapted}
        sums = {n: _checksum(p) for n, p in base.named_parameters() if "lora_" not in n and n not in adapted_params}
    if base.__dict__.get(_SHARES_WEIGHTS):
        # the base weights are shared with the caller's base model (load_adapter): merge into copies of the
        # adapted modules' weights only, so that the base model stays the base
        for mod in adapted.values():
            layer = mod.get_base_layer()
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    merged = hf.merge_and_unload()
    out = _rewrap(model, merged, name=f"{model.name} (merged)")
    if verify:
        rel, agree = {}, {}
        for name, w0 in before.items():
            w1 = merged.get_submodule(name).weight.detach().cpu()
            moved = float(torch.linalg.norm(w1.float() - w0.float()))
            rel[name] = moved / max(float(torch.linalg.norm(w0.float())), 1e-30)
            agree[name] = moved / expected[name]
        after = {n: _checksum(p) for n, p in merged.named_parameters()}
        changed = [n for n, s in sums.items() if n.replace(".base_layer", "") in after
                   and after[n.replace(".base_layer", "")] != s]
        bad = [n for n in rel if rel[n] <= min_relative_delta or not 0.5 <= agree[n] <= 2.0]
        report = MergeReport(rel, agree, not changed, not bad and not changed)
        object.__setattr__(out, "merge_report", report)
        if changed:
            raise InterpError(f"merge verification failed: {len(changed)} parameters outside the adapted modules "
                              f"changed (e.g. '{changed[0]}')")
        if bad:
            n = bad[0]
            raise InterpError(f"merge verification failed: '{n}' moved by {rel[n]:.2e} (relative), "
                              f"{agree[n]:.2f}x its LoRA update; merge into a float32 or bf16 base, not a "
                              "quantised or lower-precision one")
    return out


def _checksum(p: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        return float(p.sum(dtype=torch.float64)), float(p.abs().sum(dtype=torch.float64))


# ==== layer-range ablation ============================================================================
@dataclass(frozen=True)
class AblationReport(Result):
    """One adapter per layer range, same data and settings, evaluated on the same held-out pairs: each arm
    against the base model (``table``) and against the reference arm (``between``), with paired tests."""

    table: Any  # pandas DataFrame, one row per arm (baseline first): measures, 95% CIs, tests vs the baseline
    results: dict[str, TrainResult] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)  # arm -> ConsistencyReport (baseline included)
    reference: str = ""  # the arm every other arm is tested against (default: 'selected')
    between: Any = None  # pandas DataFrame, one row per other arm: arm minus reference, CIs and paired tests
    comparisons: dict[str, Any] = field(default_factory=dict)  # "arm vs reference" -> ConsistencyComparison

    def to_dict(self) -> dict[str, Any]:
        return {"table": jsonable(self.table), "reference": self.reference,
                "between": jsonable(self.between) if self.between is not None else [],
                "results": {k: v.to_dict() for k, v in self.results.items()}}

    def figure(self):
        """Flip rate, mean margin difference and accuracy per arm with 95% intervals (paired p-values
        against the baseline above the bars)."""
        from plotly.subplots import make_subplots

        t = self.table
        flip_test = str(t["flip_test"].dropna().iloc[0]) if "flip_test" in t.columns and t["flip_test"].notna().any() \
            else "exact McNemar"
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
            f"flip rate<br><sup>p: {flip_test}</sup>", "mean |margin diff| (logits)<br><sup>p: Wilcoxon signed-rank</sup>",
            "accuracy<br><sup>p: paired test on each phrasing</sup>"))
        for col, metric in enumerate(("flip_rate", "mean_margin_diff", "accuracy"), start=1):
            pcol = {"flip_rate": "p_flip", "mean_margin_diff": "p_margin", "accuracy": "p_accuracy"}[metric]
            values = list(t[metric])
            cis = list(t[f"{metric}_ci"]) if f"{metric}_ci" in t.columns else [None] * len(values)
            err = dict(type="data", symmetric=False,
                       array=[None if c is None else c[1] - v for v, c in zip(values, cis, strict=True)],
                       arrayminus=[None if c is None else v - c[0] for v, c in zip(values, cis, strict=True)])
            fig.add_bar(x=t["arm"], y=values, error_y=err, showlegend=False, row=1, col=col)
            tops = [v if c is None else c[1] for v, c in zip(values, cis, strict=True)]
            span = max([x for x in tops if x is not None and math.isfinite(x)], default=1.0) or 1.0
            if pcol in t.columns:  # above each interval, so that no label sits on an error bar
                for arm, top, pv in zip(t["arm"], tops, t[pcol], strict=True):
                    if isinstance(pv, float) and math.isfinite(pv) and top is not None:
                        fig.add_annotation(x=arm, y=top + 0.04 * span, text=f"p={pv:.2g}", showarrow=False,
                                           yanchor="bottom", font=dict(size=11), row=1, col=col)
            if col == 2:
                fig.update_yaxes(range=[0, 1.2 * span], row=1, col=col)
        for col in (1, 3):
            fig.update_yaxes(tickformat=".0%", range=[0, 1.15], row=1, col=col)
        n = getattr(next(iter(self.reports.values()), None), "n", None)
        held = f"{n} held-out pairs" if n else "held-out pairs"
        fig.update_layout(title=dict(text=f"LoRA layer-range ablation ({held})<br><sup>bars: 95% intervals; p above "
                                          "each bar: paired test of that arm against the baseline, same pairs</sup>",
                                     x=0.02),
                          height=430, width=1050, template="plotly_white", margin=dict(t=120))
        return fig

    def __repr__(self) -> str:
        cols = [c for c in ("arm", "layers", "flip_rate", "mean_margin_diff", "relative_margin_diff", "accuracy",
                            "p_flip") if c in self.table.columns]
        text = "AblationReport(\n" + self.table[cols].to_string(index=False)
        if self.between is not None and len(self.between):
            bcols = [c for c in ("arm", "vs", "flip_rate_delta", "p_flip", "margin_diff_relative", "p_margin",
                                 "accuracy_delta", "p_accuracy") if c in self.between.columns]
            text += f"\nagainst '{self.reference}' (paired, same held-out pairs):\n" + \
                self.between[bcols].to_string(index=False)
        return text + "\n)"


@exclusive
def ablate_layers(model: Model, pairs: Sequence[ParaphrasePair], ranges: Mapping[str, Any], *,
                  eval_pairs: Sequence[ParaphrasePair] | float = 0.2, output_dir: str | os.PathLike = "lora_ablation",
                  seed: int = 0, reference: str | None = None, progress: bool = True,
                  **train_kw: Any) -> AblationReport:
    """Train one adapter per layer range (e.g. early / selected / late / all) from the same base, with the
    same data and settings, and evaluate each on the same held-out pairs.

    ``table``: each arm against the base model (`ConsistencyReport.compare`): ``p_flip`` is the paired flip
    test (exact McNemar, or its cluster version when held-out pairs cluster; named in ``flip_test``),
    ``p_margin`` the paired test on per-pair |margin diff| (Wilcoxon signed-rank, or the cluster sign-flip
    test when held-out pairs cluster; named in ``margin_test``; the Wilcoxon p is kept as
    ``p_margin_wilcoxon_pairs``), ``p_accuracy`` the paired test on
    per-phrasing correctness; the study's unpaired z-tests are kept as ``p_flip_z_unpaired`` and
    ``p_accuracy_z_unpaired``; deltas carry paired cluster-bootstrap 95% CIs. ``between``: every other arm
    against ``reference`` (default the arm named 'selected', else the first `LayerSelection`, else the first
    arm) with the same paired tests on the same pairs, so that "early beats selected" has a test and an interval.
    """
    from interp.consistency import evaluate

    pairs = check_pairs(pairs)
    if not ranges:
        raise InterpError("ranges is empty: pass e.g. {'early': range(0, 5), 'selected': selection, 'all': 'all'}")
    if isinstance(eval_pairs, float):
        train, held = split(pairs, eval_pairs, seed=seed)
    else:
        train, held = pairs, check_pairs(eval_pairs, name="eval_pairs")
    arms = {str(name): _resolve_layers(model, spec) for name, spec in ranges.items()}  # fail before training
    if reference is None:
        reference = "selected" if "selected" in arms else next(
            (str(k) for k, v in ranges.items() if isinstance(v, LayerSelection)), next(iter(arms)))
    elif str(reference) not in arms:
        raise InterpError(f"reference={reference!r} is not one of the arms {list(arms)}")
    reference = str(reference)
    check_settings(**{k: v for k, v in train_kw.items() if k in _SETTING_NAMES})
    for layer_list in arms.values():
        resolve_target_modules(model, layer_list, train_kw.get("target_modules", DEFAULT_TARGET_MODULES))
    root = check_output_dir(output_dir)
    for name in arms:
        check_output_dir(root / _safe_name(name))
    mark_folder(root, what="output_dir", by="ablate_layers")
    baseline = evaluate(model, held, progress=progress)
    rows = [{"arm": "baseline", "layers": "", "n_layers": 0, "trainable_params": 0, **_report_metrics(baseline)}]
    results, reports = {}, {"baseline": baseline}
    for name, layer_list in arms.items():
        res = train_lora(model, train, layers=layer_list, eval_pairs=held, seed=seed, progress=progress,
                         output_dir=root / _safe_name(name), **train_kw)
        report = evaluate(load_adapter(model, res.adapter_path), held, progress=progress)  # model stays the base
        results[name], reports[name] = res, report
        rows.append({"arm": name, "layers": _span(layer_list), "n_layers": len(layer_list),
                     "trainable_params": res.trainable_params, **_report_metrics(report),
                     **_comparison(baseline.compare(report))})
    comparisons = {f"{name} vs {reference}": reports[reference].compare(reports[name])
                   for name in arms if name != reference}
    between = [{"arm": name, "vs": reference, **_comparison(comparisons[f"{name} vs {reference}"])}
               for name in arms if name != reference]
    import pandas as pd

    return AblationReport(pd.DataFrame(rows), results, reports, reference=reference, between=pd.DataFrame(between),
                          comparisons=comparisons)


_SETTING_NAMES = ("r", "alpha", "dropout", "lr", "epochs", "batch_size", "grad_accum", "ce_weight", "kl_weight",
                  "kl_space", "warmup_ratio", "weight_decay", "max_grad_norm", "max_steps")
_REPORTED = ("flip_rate", "mean_margin_diff", "accuracy", "relative_margin_diff", "mean_abs_margin", "yes_rate")


def _report_metrics(report: Any) -> dict[str, Any]:
    """One arm's measures (`ConsistencyReport`) and their 95% intervals (``<name>_ci``)."""
    out: dict[str, Any] = {k: float("nan") if getattr(report, k) is None else float(getattr(report, k))
                           for k in _REPORTED}
    out |= {f"{k}_ci": report.ci.get(k) for k in ("flip_rate", "mean_margin_diff", "accuracy")}
    return out


def _comparison(cmp: Any) -> dict[str, Any]:
    """One arm against another on the same pairs (`ConsistencyComparison`): paired tests first, the
    study's unpaired z-tests kept and labelled."""
    return {"flip_rate_delta": cmp.flip_rate_delta, "flip_rate_delta_ci": cmp.ci.get("flip_rate_delta"),
            "p_flip": cmp.p_flip, "flip_test": cmp.flip_test, "p_flip_z_unpaired": cmp.p_z,
            "margin_diff_relative": cmp.margin_diff_relative, "margin_diff_relative_ci": cmp.ci.get("margin_diff_relative"),
            "p_margin": cmp.p_margin, "margin_test": cmp.margin_test, "p_margin_wilcoxon_pairs": cmp.p_wilcoxon,
            "relative_margin_diff_delta": cmp.relative_margin_diff_delta,
            "mean_abs_margin_relative": cmp.mean_abs_margin_relative, "yes_rate_delta": cmp.yes_rate_delta,
            "accuracy_delta": cmp.accuracy_delta, "accuracy_delta_ci": cmp.ci.get("accuracy_delta"),
            "p_accuracy": cmp.p_accuracy_paired, "p_accuracy_z_unpaired": cmp.p_accuracy}


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "arm"
