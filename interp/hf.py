"""The one door to transformers' internals: everything version-specific that the fast paths rely on.

Stage modules call this module and the models' public forwards, nothing else of transformers' private or
version-specific API, so that a transformers release changes this file and no other. Tested with
transformers 5.17.0 and 5.24.0 (MedGemma's Gemma 3 VLM, text-only Gemma 3, LLaMA and LLaVA layouts).
What it relies on:

- **The cache argument.** Decoder forwards take the KV cache as ``past_key_values`` up to 5.23 and as
  ``cache`` from 5.24 (the old name warns, and goes in 5.40); outputs carry it under the same name.
  `cache_kwargs` and `output_cache` read the name off the forward's signature.
- **Cache objects.** ``DynamicCache()`` (no config: every layer keeps all keys, sliding windows are
  masked, not cut), its ``.layers[i].keys`` / ``.values``, ``.update(k, v, layer_idx)`` and
  ``.batch_select_indices``.
- **Decoder layers** are called as ``layer(hidden_states, **kwargs)`` and return the hidden-states tensor,
  and a body's forward takes ``inputs_embeds`` as the input of layer 0 (Gemma's embedding scale lives in
  its embedding module). So a layer can be skipped by making it the identity (`run_from_layer`): the
  model's own forward then builds the rotary embeddings, and its masks (causal, sliding window, Gemma 3's
  bidirectional image block from ``token_type_ids``) unless they are passed prepared.
- **Prepared masks** (`prepared_masks`, Gemma 3 bodies under SDPA): the forward takes ``attention_mask`` as a
  dict of 4D boolean masks per layer type (as ``generate`` passes it). The masks built here are used only
  after the first forward of each body and class of batch has recorded the model's own and they were equal,
  element for element; a release that changes its masks gets its own masks used, with one warning.
- **Vision-language bodies** (``Gemma3Model``, ``LlavaModel``): ``get_image_features(pixel_values)``, a
  ``vision_tower`` whose ``*VisionEmbeddings`` module makes the patch embeddings (`contiguous_vision`), and
  from 5.2x the ``mm_encoder_outputs`` argument that takes image features computed once per image.
- **Processors** (Gemma 3, LLaVA): ``_merge_kwargs``, ``_process_images``, ``get_text_with_replacements``
  and ``create_mm_token_type_ids``, so that a processor call can be split into image and text parts
  (`ProcessorSplit`; the split is checked against the full call before it is used).
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

# Architectures whose fast paths (capture, the shared-prefix scorer, the upper-layer LoRA runner and
# KV-cached patching) are checked against the plain forward in tests/ (CPU) and tests/gpu/ (H200, bf16):
# for these a fast path that cannot run is an error, never a silent fallback.
VERIFIED = frozenset({
    "Gemma3ForConditionalGeneration",  # MedGemma-4B, MedGemma-1.5-4B, tiny-medgemma
    "Gemma3ForCausalLM",  # text-only Gemma 3 (gemma3-270m)
    "LlamaForCausalLM",
    "LlavaForConditionalGeneration",  # transformers' LLaVA (tiny-llava)
    "LlavaLlamaForCausalLM",  # LLaVA-Rad / LLaVA-1.5 code base (decoder at model.layers)
})


class Unsupported(Exception):
    """This model cannot take a fast path (the caller falls back, or raises for a verified architecture)."""


def base_model(module: nn.Module) -> nn.Module:
    """The model under any PEFT wrapping (PEFT injects its layers in place: the base holds them)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def architecture(hf: nn.Module) -> str:
    """Class name of the model under any PEFT wrapping."""
    return type(base_model(hf)).__name__


def is_verified(hf: nn.Module) -> bool:
    return architecture(hf) in VERIFIED


# ---- the KV cache ------------------------------------------------------------------------------------
def cache_name(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the KV cache: ``cache`` (5.24+) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise Unsupported(f"{type(module).__name__}.forward takes no KV cache argument")


def check_forward(module: nn.Module, *needed: str) -> None:
    """Raise `Unsupported` unless ``module.forward`` takes each of ``needed`` (and a cache, if 'cache')."""
    params = set(inspect.signature(module.forward).parameters)
    missing = [n for n in needed if n != "cache" and n not in params]
    if "cache" in needed:
        try:
            cache_name(module)
        except Unsupported:
            missing.append("cache/past_key_values")
    if missing:
        raise Unsupported(f"{type(module).__name__}.forward takes no {'/'.join(missing)}")


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module.forward``, whichever name this transformers release uses."""
    return {cache_name(module): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` from 5.24, ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def new_cache() -> Any:
    """An empty cache that keeps every key of every layer (sliding windows are masked, not cut)."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_kv(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(keys, values)``, each ``[batch, kv_heads, pos, head_dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_kv(kv: Sequence[tuple[Tensor, Tensor]], rows: Tensor | None = None) -> Any:
    """A new cache holding ``kv`` (only batch ``rows`` of it, in that order, if given)."""
    cache = new_cache()
    for layer, (k, v) in enumerate(kv):
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        cache.update(k, v, layer)
    return cache


def tile_cache(cache: Any, copies: int) -> Any:
    """A copy of ``cache`` with its batch repeated ``copies`` times (copy j holds rows j*B .. j*B+B-1)."""
    keys = cache_kv(cache)[0][0]  # [batch, kv_heads, pos, head_dim]
    step = copy.deepcopy(cache)
    step.batch_select_indices(torch.arange(keys.shape[0], device=keys.device).repeat(copies))
    return step


def cache_nbytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- running part of the decoder ----------------------------------------------------------------------
def _identity(hidden_states: Tensor, *_args: Any, **_kwargs: Any) -> Tensor:
    return hidden_states


@contextmanager
def _forwards(layers: nn.ModuleList, replace: dict[int, Any]) -> Iterator[None]:
    """Temporarily replace ``layers[i].forward`` (an instance attribute shadows the class method; one that
    was there already, such as accelerate's dispatch hook, is put back afterwards)."""
    _absent = object()
    saved: list[tuple[int, Any]] = []
    try:
        for i, fwd in replace.items():
            saved.append((i, vars(layers[i]).get("forward", _absent)))
            layers[i].forward = fwd
        yield
    finally:
        for i, old in saved:
            if old is _absent:
                del layers[i].forward
            else:
                layers[i].forward = old


def _checkpointed(layer: nn.Module):
    inner = layer.forward

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return inner(hidden_states, *args, **kwargs)
        # keep only the layer's input; recompute the layer in the backward pass. Dropout masks are a hash
        # of (example, module, position, feature) (lora._RowDropout), so recomputation draws the same masks.
        return torch.utils.checkpoint.checkpoint(inner, hidden_states, *args, use_reentrant=False,
                                                 preserve_rng_state=False, **kwargs)

    return forward


def run_from_layer(body: nn.Module, layers: nn.ModuleList, lo: int, resid: Tensor, attention_mask: Tensor,
                   *, token_type_ids: Tensor | None = None, checkpoint: bool = False,
                   padded: bool | None = None) -> Tensor:
    """The body's own forward from layer ``lo`` on: ``resid [batch, pos, d]`` is the residual stream
    entering layer ``lo``; layers below it are skipped (identity). Returns the final-norm hidden states
    ``[batch, pos, d]``. The model builds its rotary embeddings and (unless they can be prepared: ``padded``,
    `prepared_masks`) its masks as in any forward."""
    replace: dict[int, Any] = {i: _identity for i in range(lo)}
    if checkpoint:
        replace |= {i: _checkpointed(layers[i]) for i in range(lo, len(layers))}
    kw: dict[str, Any] = dict(inputs_embeds=resid, attention_mask=attention_mask, use_cache=False)
    if token_type_ids is not None:
        kw["token_type_ids"] = token_type_ids
    with _forwards(layers, replace), prepared_masks(body, kw, padded=padded) as run:
        out = body(**run)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def check_run_from_layer(body: nn.Module) -> None:
    check_forward(body, "inputs_embeds", "attention_mask")


# ---- images ------------------------------------------------------------------------------------------
def takes_image_features(body: nn.Module) -> bool:
    """Does the body's forward take image features computed beforehand (``mm_encoder_outputs``, 5.2x)?"""
    return ("mm_encoder_outputs" in inspect.signature(body.forward).parameters
            and hasattr(body, "get_image_features"))


def _contiguous(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    return output.contiguous() if isinstance(output, Tensor) else output


@contextmanager
def contiguous_vision(body: nn.Module) -> Iterator[None]:
    """Run the vision tower on a contiguous residual stream.

    SigLIP's patch embeddings are ``conv(pixels).flatten(2).transpose(1, 2)``: a transposed view, and
    element-wise ops keep their input's layout, so every residual add, norm and linear of all 27 layers
    works on (or first copies) strided memory. On an H200 that is a third of the tower's time. The values
    are the same; the hook on each ``*VisionEmbeddings`` module lasts for the ``with`` block only.
    """
    tower = getattr(body, "vision_tower", None)
    handles = [m.register_forward_hook(_contiguous) for m in (tower.modules() if tower is not None else ())
               if type(m).__name__.endswith("VisionEmbeddings")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def image_features(body: nn.Module, pixel_values: Tensor) -> list[Tensor] | Tensor:
    """Vision tower + projector: per image, ``[n_image_tokens, d_model]`` (a tensor or list of them)."""
    if not hasattr(body, "get_image_features"):
        raise Unsupported(f"{type(body).__name__} has no get_image_features()")
    with contiguous_vision(body):
        out = body.get_image_features(pixel_values=pixel_values)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def with_image_features(body: nn.Module, inputs: dict[str, Tensor], per_row: list[Tensor] | Tensor) -> dict:
    """``inputs`` with ``pixel_values`` replaced by image features already computed (one entry per row)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = {k: v for k, v in inputs.items() if k != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
    return out


def embeds_with_image_features(body: nn.Module, inputs: dict[str, Tensor], per_row: list[Tensor] | Tensor,
                               host_ids: Tensor) -> dict[str, Tensor] | None:
    """``inputs`` with ``input_ids`` (and any ``pixel_values``) replaced by ``inputs_embeds``: the token embeddings
    with the image placeholders holding ``per_row``'s features in order, as the body's forward merges them
    (embedding lookup, then ``masked_scatter``), so the values are the same. None where the body has no
    ``image_token_id`` or token embedding to do it with (pass `with_image_features` to the forward instead).

    The forward's own merge checks the number of image tokens against the features with a device-to-host read,
    twice (Gemma 3 and LLaVA format the count into the error message before the check): two syncs per forward,
    each draining the kernel queue. Here the count is checked on ``host_ids`` (``input_ids`` on the CPU)."""
    token = getattr(getattr(body, "config", None), "image_token_id", None)
    embed = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    if token is None or embed is None:
        return None
    feats = per_row if isinstance(per_row, Tensor) else torch.cat(list(per_row))
    n, width = int((host_ids == token).sum()), getattr(embed, "embedding_dim", None) or embed.weight.shape[-1]
    if feats.shape[-1] != width or n * width != feats.numel():
        raise Unsupported(f"image features and image tokens do not match: {n} image tokens of width {width} in "
                          f"the batch, features of shape {tuple(feats.shape)}")
    ids = inputs["input_ids"]
    vocab = getattr(body, "vocab_size", None) or embed.num_embeddings
    emb = embed(torch.where(ids == token, 0, ids) if token >= vocab else ids)  # the forward's rule for an OOV id
    mask = (ids == token).unsqueeze(-1)
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    out["inputs_embeds"] = emb.masked_scatter(mask, feats.to(emb.device, emb.dtype))
    return out


def _pixel_values(processed: Any) -> Tensor:
    """An image processor's ``pixel_values``, where it returns nothing else the fast path would have to pass on."""
    extra = set(processed) - {"pixel_values", "num_crops"}
    if extra:
        raise Unsupported(f"the image processor returns {sorted(extra)}, which the fast path does not pass on")
    return processed["pixel_values"]


class ProcessorSplit:
    """A multimodal processor's call split in two: each image processed once (thread-safe, no tokenizer),
    each phrasing only expanded and tokenised. Callers check it against the full call before use."""

    def __init__(self, processor: Any, tokenizer: Any):
        self.processor, self.tokenizer = processor, tokenizer
        merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs,
                                         return_tensors="pt", add_special_tokens=False)
        self.images_kwargs = dict(merged["images_kwargs"])

    def process_image(self, image: Any) -> tuple[Tensor, str]:
        """``pixel_values`` and the placeholder expansion of one opened image."""
        processed, replacements = self.processor._process_images([[image]], **self.images_kwargs)
        return _pixel_values(processed), replacements[0]

    def image_job(self) -> tuple[Any, dict] | None:
        """``(image_processor, kwargs)``: the image half of `process_image` that another process can run, as
        ``image_processor([[image]], **kwargs)``, its output then passed to `finish_image`. None where that would
        not be the same call: a processor with its own ``_process_images``, or an image processor that is not
        one of transformers' own classes (one loaded with remote code stays in this process)."""
        from transformers.processing_utils import ProcessorMixin

        proc = self.processor
        ip = getattr(proc, "image_processor", None)
        if (ip is None or type(proc)._process_images is not ProcessorMixin._process_images
                or getattr(proc, "image_token", None) is None
                or not type(ip).__module__.startswith("transformers.")):
            return None
        return ip, self.images_kwargs

    def finish_image(self, processed: Any) -> tuple[Tensor, str]:
        """`process_image`'s result from the image processor's output for one image (`image_job`)."""
        return _pixel_values(processed), self.processor.replace_image_token(processed, image_idx=0,
                                                                            **self.images_kwargs)

    def expand(self, text: str, replacement: str, token_types: bool) -> tuple[list[int], list[int] | None]:
        """Token ids (and token types) of a prompt whose image placeholder expands to ``replacement``."""
        expanded = self.processor.get_text_with_replacements([text], [replacement])[0][0]
        ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        return ids, (list(self.processor.create_mm_token_type_ids([ids])[0]) if token_types else None)


__all__ = ["VERIFIED", "ProcessorSplit", "Unsupported", "architecture", "base_model", "cache_from_kv", "cache_kv",
           "cache_kwargs", "cache_name", "cache_nbytes", "check_forward", "contiguous_vision",
           "embeds_with_image_features", "image_features", "is_verified", "new_cache", "output_cache",
           "run_from_layer", "takes_image_features", "tile_cache", "with_image_features"]


# --- attention masks built from the batch (no vmap, no device-to-host read) --------------------------------------
# Gemma 3's forward builds each batch's masks itself. With images (causal, or bidirectional inside each image's
# block of soft tokens; AND a sliding window on local layers; AND padding) it does so through `torch.vmap` over a
# mask function: ~10 ms of host time per forward on the H200 machine, in forwards that are launch-bound. Without
# images it reads the padding mask back to decide whether a mask is needed at all: two device-to-host syncs per
# mask, each draining the kernel queue. The forward takes the masks prepared (a dict, as `generate` passes them):
# `prepared_masks` builds the same boolean masks with a dozen tensor ops on the device, and decides "no mask"
# (SDPA's own causal path) from the padding the host already knows. They are used only once checked: the first
# forward of each body and class of batch (images or not, padded or not, reaching the sliding window or not: the
# branches of the formula it uses) runs transformers' own masks, recorded on their way into the decoder, and the
# masks built here for the same batch must equal them element for element (None where theirs is None); otherwise
# transformers' own are kept for that class, with one warning. A release that changes its masks in a way the first
# batch of each class shows costs speed, not values. (Interp's prompts hold at most one image each; the formula
# numbers several image blocks in a row as transformers 5.24 does, checked in tests/test_masks.py.)
# body -> {(images?, padded?, window reached?, attention implementation, window, layer types): ours equal theirs}
_MASKS_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _mask_plan(body: nn.Module) -> tuple[tuple, Any, nn.Module] | None:
    """(check key less the batch's class, the text config, the module whose forward input to record) for a
    Gemma 3 body under SDPA, causal; else None."""
    name = type(body).__name__
    if name == "Gemma3Model":
        decoder = getattr(body, "language_model", None)
    elif name == "Gemma3TextModel":
        decoder = body
    else:
        return None
    cfg = getattr(body, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if decoder is None or text is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return None
    impl = getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)
    if impl != "sdpa" or not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        return None
    types = tuple(getattr(text, "layer_types", None) or ())
    if not types or set(types) - {"full_attention", "sliding_attention"}:
        return None
    if "sliding_attention" in types and not isinstance(getattr(text, "sliding_window", None), int):
        return None
    return (impl, getattr(text, "sliding_window", None), types), text, decoder


def _maskless(images: bool, padded: bool, n: int, sliding_window: int | None,
              layer_types: Sequence[str]) -> tuple[str, ...]:
    """The layer types whose mask the forward leaves out (None: SDPA's own causal path) for a batch of ``n``
    positions: without images or padding, full attention always, sliding attention while ``n`` is within the
    window."""
    if images or padded:
        return ()
    return tuple(k for k in dict.fromkeys(layer_types) if k != "sliding_attention" or n < sliding_window)


def _same_image_block(token_type_ids: Tensor) -> Tensor:
    """``[batch, q, kv]``: both positions in the same image's block of soft tokens (a run of ``token_type_ids ==
    1``; the blocks of a row numbered in order, as transformers numbers them)."""
    is_image = token_type_ids == 1
    starts = is_image & ~nn.functional.pad(is_image, (1, 0))[:, :-1]
    block = torch.where(is_image, torch.cumsum(starts.int(), dim=1) - 1, -1)
    return (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)


def causal_masks(attention_mask: Tensor, token_type_ids: Tensor | None, sliding_window: int | None,
                 layer_types: Sequence[str], padded: bool) -> dict[str, Tensor | None]:
    """Gemma 3's masks for a forward with no cache, per layer type: ``[batch, 1, q, kv]`` booleans, True where
    ``q`` attends to ``kv``: ``kv <= q`` or both in the same image's block of soft tokens (``token_type_ids ==
    1``, a block being a run of them), and ``kv`` not padding; on sliding-window layers also ``kv > q - window``.
    Without images, None where SDPA's causal path gives the same (``padded``: any row has padding; and, on
    sliding layers, the batch is shorter than the window)."""
    pad = attention_mask.bool()
    n = pad.shape[1]
    idx = torch.arange(n, device=pad.device)
    allowed = idx[None, None, :] <= idx[None, :, None]
    if token_type_ids is not None:
        allowed = allowed | _same_image_block(token_type_ids)
    out: dict[str, Tensor | None] = {}
    skipped = _maskless(token_type_ids is not None, padded, n, sliding_window, layer_types)
    for kind in dict.fromkeys(layer_types):
        if kind in skipped:
            out[kind] = None
            continue
        windowed = kind == "sliding_attention"
        mask = allowed & (idx[None, :] > idx[:, None] - sliding_window) if windowed else allowed
        out[kind] = (mask & pad[:, None, :]).expand(pad.shape[0], n, n).unsqueeze(1).contiguous()
    return out


def _same_masks(ours: dict[str, Tensor | None], theirs: Any) -> bool:
    if not isinstance(theirs, dict) or set(theirs) != set(ours):
        return False
    for k, t in theirs.items():
        mine = ours[k]
        if (t is None) != (mine is None):
            return False
        if t is not None and not (isinstance(t, Tensor) and t.dtype == torch.bool and t.shape == mine.shape
                                  and torch.equal(t, mine)):
            return False
    return True


def host_padded(lengths: Tensor | None, width: int | dict[str, Any]) -> bool | None:
    """Does any right-padded row end before ``width`` (or the width of ``inputs['attention_mask']``)? From
    lengths on the host; None where they are not there (the forward then builds its own masks)."""
    if isinstance(width, dict):
        mask = width.get("attention_mask")
        if not isinstance(mask, Tensor):
            return None
        width = mask.shape[-1]
    if lengths is None or lengths.device.type != "cpu" or lengths.numel() == 0:
        return None
    return bool((lengths < width).any())


def _record_masks(body: nn.Module, decoder: nn.Module, layer_types: Sequence[str], seen: dict[str, Any], *,
                  stop: bool = False) -> list[Any]:
    """Hooks that put the masks the model's forward builds itself into ``seen["masks"]``, and their handles (the
    caller removes them). A vision-language body hands its decoder the masks as one dict; a text body builds
    them inside the decoder, and the first layer of each type gets its type's. Only this thread's forward is
    recorded. ``stop``: raise `_Recorded` once all are recorded (nothing further is computed)."""
    owner = threading.get_ident()

    def record(kind: str | None):
        def hook(_module, _args, kwargs):
            if threading.get_ident() != owner:  # another thread's forward of the same model
                return
            if kind is None:
                seen.setdefault("masks", kwargs.get("attention_mask"))
            else:
                seen.setdefault("masks", {}).setdefault(kind, kwargs.get("attention_mask"))
            if stop and (kind is None or len(seen["masks"]) == len(set(layer_types))):
                raise _Recorded

        return hook

    if decoder is not body:
        return [decoder.register_forward_pre_hook(record(None), with_kwargs=True)]
    return [decoder.layers[layer_types.index(kind)].register_forward_pre_hook(record(kind), with_kwargs=True)
            for kind in dict.fromkeys(layer_types)]


class _Recorded(Exception):
    """Raised by `_record_masks`' hook with ``stop`` once the masks are recorded: nothing further is computed."""


@contextmanager
def prepared_masks(body: nn.Module | None, inputs: dict[str, Any], *,
                   padded: bool | None = None) -> Iterator[dict[str, Any]]:
    """``inputs`` (keyword arguments of ``body``'s forward, or of the model's around it) for a forward with no cache
    and no position ids, with ``attention_mask`` replaced by the prepared masks (`causal_masks`) where that is
    checked to give the model's own; else ``inputs`` as they are. A Gemma 3 body under SDPA, where ``padded``
    (does any row have padding?) is known on the host. The first forward of each body and class of batch (images
    or not, padded or not, reaching the sliding window or not) is the check: it runs with the model's own masks,
    recorded on the way into the decoder, and compared with the masks built here once the forward has run."""
    plan = _mask_plan(body) if body is not None else None
    mask, types = inputs.get("attention_mask"), inputs.get("token_type_ids")
    cached = any(inputs.get(k) is not None for k in ("cache", "past_key_values")) or inputs.get("use_cache")
    if (plan is None or cached or padded is None or "position_ids" in inputs or not isinstance(mask, Tensor)
            or mask.ndim != 2 or (types is not None and (not isinstance(types, Tensor) or types.shape != mask.shape))):
        yield inputs
        return
    key, text, decoder = plan
    # Checked per class of batch: with images or not, padded or not, reaching the window or not. Each class uses
    # its own branches of the formula (a batch that needs no mask at all checks only that decision), so each is
    # checked on its first batch. Interp's prompts hold at most one image: one image block a row.
    window = getattr(text, "sliding_window", None)
    reached = "sliding_attention" in key[-1] and mask.shape[1] >= window
    checks = _MASKS_CHECKED.setdefault(body, {})
    key = (types is not None, bool(padded), reached, *key)

    def ours() -> dict[str, Tensor | None]:
        return causal_masks(mask, types, window, key[-1], bool(padded))

    state = checks.get(key)
    if state:
        yield {**inputs, "attention_mask": ours()}
        return
    if state is False:
        yield inputs
        return
    seen: dict[str, Any] = {}
    handles = _record_masks(body, decoder, key[-1], seen)
    try:
        yield inputs
    finally:  # also when the forward was stopped early (capture stops after its last layer)
        for h in handles:
            h.remove()
        masks = seen.get("masks")
        if masks is not None and (decoder is not body or set(masks) == set(key[-1])):  # all seen, to decide
            same = _same_masks(ours(), masks)
            checks[key] = same
            if not same:
                warnings.warn(f"interp: the attention masks built for {'image' if types is not None else 'text'} "
                              f"batches differ from {type(body).__name__}'s own in this transformers version; its "
                              "own are used (same values, more host time per forward)", RuntimeWarning, stacklevel=3)


# --- packed rows: several prompts in one row, each its own segment ------------------------------------------
# A packed row holds prompts end to end, each with position ids from 0 and attending only within itself (its
# segment), and after them, where the row is not full, a tail of padding that is a segment of its own (so that
# no query attends to nothing). The forward takes ``position_ids`` and the masks built here, never a 2D
# ``attention_mask``. transformers builds such masks itself from position ids (``attention_mask=None``), but its
# Gemma 3 sliding-window mask for images indexes the image blocks by position id, not by place in the row (the
# block overlay is an ``or_mask_function``, remapped with the rest): wrong for a second prompt with an image. So
# the reference is the model's own mask for the same prompts as a padded batch: before the first packed batch of
# each body and class (images or not, reaching the sliding window or not) runs, the model builds its masks for a
# padded batch of a few of its prompts (a forward on zero embeddings that stops once they are recorded), and each
# prompt's block of the packed mask must equal its row of theirs, with nothing outside the block
# (`check_packed`). After a mismatch (one warning) batches of that class run padded.


def packs(body: nn.Module | None) -> bool:
    """Can ``body``'s forward take packed rows (`packed_masks`)? Gemma 3 bodies under SDPA, causal."""
    return body is not None and _mask_plan(body) is not None


def segments(position_ids: Tensor) -> Tensor:
    """``[rows, pos]`` segment numbers: a new segment wherever the position id does not go up by one."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def packed_masks(position_ids: Tensor, token_type_ids: Tensor | None, sliding_window: int | None,
                 layer_types: Sequence[str]) -> dict[str, Tensor]:
    """Gemma 3's masks for packed rows, per layer type, ``[rows, 1, q, kv]`` booleans: ``q`` attends to ``kv``
    in the same segment where ``kv <= q`` or both lie in the same image's block of soft tokens; on
    sliding-window layers also ``kv > q - window``. Each prompt's block is its mask alone (`causal_masks`)."""
    seg = segments(position_ids)
    n = seg.shape[1]
    idx = torch.arange(n, device=seg.device)
    allowed = (idx[None, None, :] <= idx[None, :, None]).expand(seg.shape[0], n, n)
    if token_type_ids is not None:
        allowed = allowed | _same_image_block(token_type_ids)
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    out: dict[str, Tensor] = {}
    for kind in dict.fromkeys(layer_types):
        mask = allowed & (idx[None, :] > idx[:, None] - sliding_window) if kind == "sliding_attention" else allowed
        out[kind] = mask.unsqueeze(1).contiguous()
    return out


def packed_key(body: nn.Module, inputs: dict[str, Any]) -> tuple | None:
    """The check key of a packed batch's class (None: ``body`` cannot take packed rows)."""
    plan = _mask_plan(body) if body is not None else None
    if plan is None:
        return None
    key, text, _ = plan
    window = getattr(text, "sliding_window", None)
    width = inputs["position_ids"].shape[1]
    reached = "sliding_attention" in key[-1] and width >= window
    return ("packed", inputs.get("token_type_ids") is not None, reached, *key)


def packed_state(body: nn.Module, key: tuple) -> bool | None:
    """True: packed rows of this class are checked; False: their masks differed (batches run padded); None: not
    yet checked (`check_packed`)."""
    return _MASKS_CHECKED.get(body, {}).get(key)


def probe_masks(model: nn.Module, body: nn.Module, inputs: dict[str, Tensor]) -> Any:
    """The masks ``body``'s forward builds itself for a padded batch (``inputs``: ``attention_mask`` and any
    ``token_type_ids``), recorded on their way into the decoder (a text body: into each layer type's first
    layer) from a forward of ``model`` on zero embeddings that stops there: the dict of masks per layer type, or
    None where not recorded. The masks depend on the padding, the token types and the shape only."""
    plan = _mask_plan(body)
    if plan is None:
        return None
    key, _, decoder = plan
    width = body.get_input_embeddings().weight
    mask = inputs["attention_mask"]
    embeds = torch.zeros(*mask.shape, width.shape[-1], dtype=width.dtype if width.is_floating_point()
                         else torch.float32, device=mask.device)
    seen: dict[str, Any] = {}
    handles = _record_masks(body, decoder, key[-1], seen, stop=True)
    try:
        model(inputs_embeds=embeds, **inputs, use_cache=False)
    except _Recorded:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen.get("masks")


def check_packed(model: nn.Module, body: nn.Module, key: tuple, packed_inputs: dict[str, Any],
                 probe: dict[str, Tensor], places: Sequence[tuple[int, int, int, int]]) -> bool:
    """Check the packed masks for ``packed_inputs`` against the model's own for ``probe``, a padded batch of some
    of the same prompts (`probe_masks`); ``places``: per probed prompt (its row in the probe, its packed row,
    its first packed position, its length). Each prompt's block of the packed mask must equal its probe row's
    ``[:length, :length]`` (SDPA's causal path where theirs is None), and the packed mask must let it attend to
    nothing outside the block. Records the outcome for ``key`` (a mismatch warns) and returns it."""
    plan = _mask_plan(body)
    theirs = probe_masks(model, body, probe) if plan is not None else None
    same = isinstance(theirs, dict) and set(theirs) == set(plan[0][-1]) and bool(places)
    if same:
        window = getattr(plan[1], "sliding_window", None)
        ours = packed_masks(packed_inputs["position_ids"], packed_inputs.get("token_type_ids"), window, plan[0][-1])
        width = probe["attention_mask"].shape[-1]
        for kind, mask in ours.items():
            ref = theirs[kind]
            if ref is not None and not (isinstance(ref, Tensor) and ref.dtype == torch.bool and ref.ndim == 4
                                        and ref.shape[-1] == width):
                same = False
            for b, r, s, n in places if same else ():
                block = mask[r, 0, s:s + n]
                if ref is None:  # SDPA's causal path: causal, and on sliding layers the window (n < it then)
                    want = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
                else:
                    want = ref[b, 0, :n, :n].to(mask.device)
                if not (torch.equal(block[:, s:s + n], want) and int(block.sum()) == int(want.sum())):
                    same = False
                    break
            if not same:
                break
    _MASKS_CHECKED.setdefault(body, {})[key] = same
    if not same:
        warnings.warn(f"interp: the packed attention masks built for {type(body).__name__} do not match its own "
                      "masks for the same prompts padded in this transformers version; batches run padded (same "
                      "values, more padding)", RuntimeWarning, stacklevel=3)
    return same


@contextmanager
def packed_forward(body: nn.Module, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``inputs`` of a packed batch (``position_ids``, no ``attention_mask``) with the packed masks, for a
    class already checked (`check_packed`); raises `Unsupported` otherwise."""
    key = packed_key(body, inputs)
    if key is None or packed_state(body, key) is not True or inputs.get("attention_mask") is not None:
        raise Unsupported("packed rows of this class are not checked")
    plan = _mask_plan(body)
    window = getattr(plan[1], "sliding_window", None)
    yield {**inputs, "attention_mask": packed_masks(inputs["position_ids"], inputs.get("token_type_ids"), window,
                                                    plan[0][-1])}
