"""Stage 2 of the loop: residual-stream activations, captured with hooks and cached on disk.

`capture()` hooks the decoder layers you name, keeps only the token positions you ask for, stops the
forward pass after the last requested layer and batches prompts of similar length together (on Gemma 3, for
text, short prompts laid end to end in the rows beside long ones). With
``cache=`` it writes safetensors shards plus a ``manifest.json``: a rerun reads them back, an interrupted
run resumes, several processes share the work, and a result larger than memory is read back one shard
at a time (`Activations.chunks`, `Activations.batches`). The folder format and `Activations` are in
`interp.activations`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp import _graphs, dist, hf
from interp._errors import InterpError
from interp._io import release_freed_memory
from interp.activations import (
    FORMAT,
    META_KEYS,
    ActivationChunk,  # noqa: F401 (re-exported: code and tests import it from here)
    Activations,
    CacheError,
    CacheWarning,  # noqa: F401 (re-exported: code and tests import it from here)
    _adopt_entries,
    _atomic_json,
    _checked_manifest,
    _count,
    _FolderLock,
    _human,
    _LazyLayers,
    _memory_bytes,
    _open_manifest,
    _read_done_shards,
    _read_shard,
    _shard_name,
    _ShardDamaged,
    _ShardStore,
    _write_shard,
    load_activations,  # noqa: F401 (re-exported: code and tests import it from here)
)
from interp.models import Batch, ImageCache, Model, Prompt, _as_prompt, as_dtype, exclusive

DEFAULT_CACHE_ROOT = Path("sae_cache")
IN_FLIGHT = 1  # shard writes queued behind the forward pass: bounds host memory to a few shards
Positions = Literal["last", "all", "question"] | Callable[..., Any]


class TokenInfo(NamedTuple):
    """What a ``positions=`` callable sees for one prompt (all tensors are [pos], padding removed)."""

    input_ids: Tensor
    tokens: list[str]
    question_mask: Tensor
    special_mask: Tensor
    image_mask: Tensor


class StopForward(Exception):
    """Raised by the hook on the last requested layer: nothing above it is computed."""


def layer_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def position_mask(model: Model, batch: Batch, positions: Positions, exclude: Sequence[str]) -> Tensor:
    """Boolean ``[batch, pos]`` selection of the token positions to keep."""
    real = ~batch.pad_mask.cpu()
    if positions == "last":
        sel = torch.zeros_like(real)
        sel[torch.arange(sel.shape[0]), batch.last_index] = True
        return sel
    if positions == "all":
        sel = real.clone()
        if "special" in exclude:
            sel &= ~batch.special_mask
        if "image" in exclude:
            sel &= ~batch.image_mask
        return sel
    if positions == "question":
        return batch.question_mask.clone()
    sel = torch.zeros_like(real)
    ids = batch.input_ids.cpu()
    for i in range(ids.shape[0]):
        n = int(batch.lengths[i])
        info = TokenInfo(ids[i, :n], model.tokenizer.convert_ids_to_tokens(ids[i, :n].tolist()),
                         batch.question_mask[i, :n], batch.special_mask[i, :n], batch.image_mask[i, :n])
        picked = torch.as_tensor(positions(info))
        if picked.dtype == torch.bool:
            if picked.shape != (n,):
                raise InterpError(f"positions callable returned a mask of shape {tuple(picked.shape)} for "
                                  f"prompt with {n} tokens; return a bool mask of length {n} or indices")
            sel[i, :n] = picked
        else:
            idx = picked.long().reshape(-1)
            if idx.numel() and (idx.min() < -n or idx.max() >= n):
                raise InterpError(f"positions callable returned index {int(idx.max())} for a prompt of {n} tokens")
            sel[i, idx % n] = True
    return sel


@exclusive
def run_hooked(model: Model, batch: Batch, layers: Sequence[int], sel: Tensor,
               out_dtype: torch.dtype | None = None) -> dict[int, Tensor]:
    """One forward pass that keeps the selected rows of each requested layer's output and stops early.

    Returns ``{layer: Tensor[n_selected, d_model]}`` on the model's device; rows are in (batch, pos) order.
    """
    return _run_hooked(model, batch, layers, sel, out_dtype)[1]


def _run_hooked(model: Model, batch: Batch | _Packed, layers: Sequence[int], sel: Tensor,
                out_dtype: torch.dtype | None = None, *, inputs: dict[str, Any] | None = None,
                masks: Literal["prepared", "packed"] = "prepared") -> tuple[Tensor, dict[int, Tensor]]:
    """`run_hooked`, also returning the ``[n_layers, n_selected, d_model]`` buffer whose rows the hooks
    fill (``buffer[k]`` is ``layers[k]``), so that a caller can move every layer to the host in one copy.
    ``inputs``: what the forward takes in place of ``batch.inputs`` (the batch's images merged into its token
    embeddings), the batch itself kept as it is for its masks and ids. ``masks``: "prepared" (the masks built
    here where checked, `hf.prepared_masks`) or "packed" for a `_Packed` batch (its rows, in the order of the
    padded batch's selection ``sel``, `hf.packed_forward`)."""
    inputs = batch.inputs if inputs is None else inputs
    # Flat row indices computed on the host: boolean-mask indexing on the device would force a sync
    # in every hook and stall the kernel queue.
    flat = batch.flat if isinstance(batch, _Packed) else sel.reshape(-1).nonzero().squeeze(1)
    dtype = out_dtype or model.dtype
    buffer = torch.empty(len(layers), flat.numel(), model.d_model, dtype=dtype, device=model.device)
    if model.device.type == "cuda":  # from pinned memory: a pageable copy may wait for the queued kernels
        flat = flat.pin_memory().to(model.device, non_blocking=True)
    else:
        flat = flat.to(model.device)
    kept: dict[int, Tensor] = {}
    last = max(layers)

    def make_hook(k: int, i: int):
        def hook(_module, _inputs, output):
            resid = layer_output(output)  # [batch, pos, d_model]
            rows = resid.reshape(-1, resid.shape[-1]).index_select(0, flat)
            buffer[k].copy_(rows)
            kept[i] = buffer[k]
            if i == last:
                raise StopForward

        return hook

    handles = [model.layers[i].register_forward_hook(make_hook(k, i)) for k, i in enumerate(layers)]
    try:
        vision = (hf.contiguous_vision(_vision_body(model)[1] or model.hf) if "pixel_values" in inputs
                  else contextlib.nullcontext())  # the vision tower runs inside this forward
        body = _vision_body(model)[1]
        if masks == "packed":
            forward = hf.packed_forward(body, inputs)
        else:
            padded = hf.host_padded(batch.lengths, int(batch.lengths.max()))  # right-padded to the longest
            forward = hf.prepared_masks(body, inputs, padded=padded)
        with vision, forward as run:
            model.hf(**run, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in layers if i not in kept]
    if missing:
        raise InterpError(f"layers {missing} of '{model.name}' were never called in the forward pass")
    return buffer, kept


def _prompt_digest(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.question, p.context]).encode())
        if p.image is None:
            h.update(b"<no image>")
        elif isinstance(p.image, (str, Path)):
            h.update(Path(p.image).read_bytes() if Path(p.image).is_file() else str(p.image).encode())
        elif hasattr(p.image, "tobytes"):
            h.update(p.image.tobytes())
        else:
            h.update(repr(p.image).encode())
    return h.hexdigest()


def _positions_label(positions: Positions) -> str:
    if isinstance(positions, str):
        return positions
    try:
        src = inspect.getsource(positions)
    except (OSError, TypeError):
        src = repr(positions)
    return f"callable:{getattr(positions, '__qualname__', 'fn')}:{hashlib.sha256(src.encode()).hexdigest()[:12]}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "model"


# What one more forward pass costs beyond its padded tokens (kernel launches, the hooks, copying rows back,
# host-side bookkeeping), in tokens of compute: the batch planner weighs it against padding, so that it
# neither pads short prompts to a long one nor cuts a batch per distinct length. Rough figures: a
# MedGemma-4B forward on an H200 has some 5-10 ms of fixed cost, about what 1k tokens take; on the CPU a
# token costs far more, so the fixed part is worth fewer of them.
BATCH_OVERHEAD_TOKENS = {"cuda": 1024, "cpu": 256}
ENCODER_THREADS = 8  # at most this many threads encode batches with images (image preprocessing), fewer on small hosts
FIRST_BATCH_SHARE = 4  # the first batch of a capture gets batch_tokens / this: the device starts sooner
FEATURE_CACHE_BYTES = 512 << 20  # image features kept on the device per capture call (least recently used go)
# processed pixel values kept in host memory per capture call, beyond those of the images that batches queued
# ahead still need (held: the images of the shard running and of the one planned ahead, at most 256 of them)
IMAGE_CACHE_BYTES = 1 << 30
HELD_IMAGES = 256  # at most this many distinct images held for queued batches (the default shard_size of them)


class _Batching(NamedTuple):
    batch_size: int  # at most this many prompts per forward pass
    batch_tokens: int  # at most this many padded tokens (prompts x longest) per forward pass
    sort: bool  # group prompts of similar length (False: the caller's order)
    overhead: int = BATCH_OVERHEAD_TOKENS["cpu"]  # cost of one more forward pass, in padded tokens
    pack: bool = False  # with ``sort``: may put several prompts end to end in one row (`_pack_plan`)


@exclusive
def capture(model: Model, prompts: Sequence[Prompt | str], *, layers: Any, positions: Positions = "last",
            cache: str | os.PathLike | bool | None = None, batch_size: int | None = None,
            batch_tokens: int | None = None, sort: bool = True, exclude: Sequence[str] | str = (),
            dtype: Any = None, shard_size: int = 256, recompute: bool = False, progress: bool = True,
            max_memory: int | str | None = None, lazy: bool | None = None,
            distributed: bool | None = None, pack: bool | None = None) -> Activations:
    """Capture residual-stream activations (``blocks.{L}.hook_resid_post``) at the chosen positions.

    ``cache``: ``True`` for ``sae_cache/``, or a folder; each (model, prompts, layers, positions, dtype)
    gets its own subfolder of safetensors shards (``shard_size`` prompts each, in the given order) and a
    ``manifest.json``. A run holds a lock on that subfolder, so a second run with the same inputs waits and
    then reads what the first wrote; a shard found damaged is recomputed with a `CacheWarning`. ``exclude``
    (with ``positions="all"``) drops ``"special"`` and/or ``"image"`` tokens; padding is never kept.

    Batching: within a shard, the length-sorted prompts are cut into the batches that cost least, padded tokens plus
    a fixed cost per forward pass (``sort=False``: the given order, each batch filled up), at most ``batch_size``
    prompts (default 64 on a GPU, 16 on the CPU) and ``batch_tokens`` padded tokens, prompts x longest (default
    16384 / 4096), per forward pass; a longer prompt runs alone, and the first batch is smaller, so that the device
    starts early. Packing (``pack``; Gemma 3 under SDPA, with ``sort``): where it costs less by the same measure, a
    shard's prompts, longest first, are laid end to end in rows as wide as its longest prompt, each prompt its own
    segment (position ids from 0, attending only within itself), so that short prompts fill the room beside long
    ones instead of padding: fewer, fuller forwards, but every row's attention spans the row (SDPA with a mask
    computes all of it). ``pack=None`` packs a call whose prompts are all text, where the model can: on the H200
    packing measured +1-5% tokens/s on ragged text and 2-15% less on the half-image corpus (docs/BENCHMARKS.md,
    round 8); ``True`` packs with images too, ``False`` never. Before the first packed batch of each class (with
    images or not, reaching the sliding window or not) runs on a model, the model builds its own masks for a padded
    batch of some of its prompts, and the packed masks must match them for each prompt (else, with one warning,
    batches stay padded). Rows come back in prompt order, then position, whatever the batches; the cache does not
    depend on them. Each distinct image (a file path, or an image object) is processed once per call and, on
    transformers releases whose forward takes image features, run through the vision tower once, while its pixels
    (1 GB) and features (512 MB) fit the call's caches, and when the processor's call can be split in two (checked
    against the full call; else each prompt makes that call). A batch holds its images' pixels in that cache from
    when it is planned until it has run (with pixel values in the batch: until it is encoded), so an image is
    dropped for room only once no queued batch needs it (this shard's or the next's); what they hold counts in the
    cache's bytes and may take it past 1 GB, by at most 256 distinct images (beyond those, an image may be processed
    again).

    Memory: finished shards stay in host memory while they fit ``max_memory`` (bytes, or ``"2GB"``;
    default a quarter of this machine's RAM). A larger capture needs a cache and returns lazy
    `Activations` that read the shards back (`Activations.chunks`, `.batches`); ``lazy=True`` always does,
    ``lazy=False`` never. Under ``accelerate launch`` or torchrun, the processes split the shards, write
    them into one cache folder (``sae_cache/`` when ``cache`` names none) and each returns the whole
    result; ``distributed=False`` makes this process capture everything itself.
    """
    if not isinstance(model, Model):
        raise InterpError(f"capture() takes an interp.Model, got {type(model).__name__}; load one with "
                          "interp.load(...) or wrap a Hugging Face model with interp.Model.wrap(hf_model, processor)")
    items = _check_prompts(prompts)
    layer_list = model.check_layers(layers)
    if not (callable(positions) or (isinstance(positions, str) and positions in ("last", "all", "question"))):
        raise InterpError(f"positions={positions!r}: use 'last', 'all', 'question' or a callable")
    exclude = _check_exclude(exclude, positions)
    if dtype is None:  # the model's own dtype (float32 for one whose first weights are quantised integers)
        out_dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    else:
        out_dtype = as_dtype(dtype)
    if not out_dtype.is_floating_point:
        raise InterpError(f"dtype={dtype!r}: activations are stored in a floating-point dtype ('float32', "
                          "'bfloat16', 'float16'); an integer dtype would truncate them")
    if not model.is_multimodal:  # named here, by its index in the whole list, before any batch is formed
        with_image = [i for i, p in enumerate(items) if p.image is not None]
        if with_image:
            raise InterpError(f"prompt {with_image[0]} has an image, but '{model.name}' is a text-only model. "
                              "Drop the image or load a vision-language model such as 'tiny-medgemma'.")
    cuda = model.device.type == "cuda"
    packable = hf.packs(_vision_body(model)[1])
    if pack is not None and not isinstance(pack, bool):
        raise InterpError(f"pack={pack!r}: pass True (pack short prompts beside long ones), False, or None (pack "
                          "text-only calls where the model can)")
    if pack and not sort:
        raise InterpError("pack=True needs sort=True: packing lays the length-sorted prompts end to end; pass "
                          "sort=True, or pack=False to keep the given order")
    if pack and not packable:
        raise InterpError(f"pack=True: '{model.name}' ({type(model.hf).__name__}) cannot take packed rows (only "
                          "Gemma 3 models under SDPA attention can); pass pack=None or pack=False")
    batching = _Batching(_count("batch_size", (64 if cuda else 16) if batch_size is None else batch_size,
                                _COUNT_MEANS["batch_size"]),
                         _count("batch_tokens", (16384 if cuda else 4096) if batch_tokens is None else batch_tokens,
                                _COUNT_MEANS["batch_tokens"]),
                         bool(sort), BATCH_OVERHEAD_TOKENS["cuda" if cuda else "cpu"],
                         bool(pack) if pack is not None else (bool(sort) and packable
                                                              and all(p.image is None for p in items)))
    shard_size = _count("shard_size", shard_size, _COUNT_MEANS["shard_size"])
    budget = _memory_bytes(max_memory)
    for name, value in (("lazy", lazy), ("distributed", distributed)):
        if value is not None and not isinstance(value, bool):
            raise InterpError(f"{name}={value!r}: pass True, False or None")
    rank, world = dist.rank_and_world() if distributed is not False else (0, 1)
    if world > 1 and (cache is None or cache is False):
        cache = True  # the processes hand their shards to each other through the folder
    label = _positions_label(positions)
    shards = [(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)]
    row_bytes = len(layer_list) * model.d_model * out_dtype.itemsize

    folder = key = key_src = None
    if cache is not None and cache is not False:
        if not isinstance(cache, (str, os.PathLike)) and cache is not True:
            raise InterpError(f"cache={cache!r}: pass True (for '{DEFAULT_CACHE_ROOT}/'), a folder path, or None")
        root = DEFAULT_CACHE_ROOT if cache is True else Path(cache)
        key_src = {"model": model.name, "weights": model.fingerprint, "prompts": _prompt_digest(items),
                   "layers": layer_list, "positions": label, "exclude": sorted(exclude),
                   "dtype": str(out_dtype), "shard_size": shard_size, "format": FORMAT}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
        folder = root / f"{_slug(model.name)}-{key}"
        _make_folder(folder, cache)
    lengths = None
    if folder is None and lazy:
        raise InterpError("lazy=True reads the shards back from a cache folder: pass cache=True (for "
                          f"'{DEFAULT_CACHE_ROOT}/') or cache=<folder>")
    if folder is None and lazy is None:
        lengths = _check_fits(model, items, positions, exclude, len(layer_list), row_bytes, budget)

    kept = _Kept(budget, lazy, folder, row_bytes)
    info = {"n_prompts": len(items), "positions": label, "model_name": model.name, "path": folder,
            "meta": {"layers": layer_list, "exclude": sorted(exclude), "dtype": str(out_dtype)}}
    with _FolderLock(folder) if folder is not None and rank == 0 else contextlib.nullcontext() as lock:
        # Only the main process locks; the others follow it through the collectives below.
        manifest: dict[str, Any] | None = None
        todo = shards
        if folder is not None:
            todo_index = None
            if rank == 0:
                try:
                    manifest = _open_manifest(folder, key, key_src, model, len(items), recompute,
                                              locked=lock.locked, shards=shards)
                    todo_index = _take_done(folder, manifest, shards, layer_list, model.d_model, out_dtype, kept,
                                            load=world == 1)
                except BaseException:
                    _from_main(world, None, failed=True)
                    raise
            todo = [shards[k] for k in _from_main(world, todo_index)]
        mine = todo
        if world > 1:  # contiguous shares; each shard's batches are the same whichever process runs it
            share = dist.share(len(todo), rank, world)
            mine = todo[share.start:share.stop]
        error = None
        if mine:
            bar = tqdm(total=sum(e - s for s, e in mine), desc=f"capture {model.name}", unit="prompt",
                       disable=not progress or rank != 0, leave=False)
            try:
                _run_shards(model, items, mine, layer_list, positions, exclude, out_dtype, batching, lengths,
                            folder, manifest, bar, kept, entry_files=rank != 0)
            except Exception as e:
                if world == 1:
                    raise
                error = e
            finally:
                bar.close()
        if world > 1:
            _all_succeeded(error)
        if folder is not None:
            if rank == 0:
                try:
                    if world > 1:  # the other processes listed their shards beside them
                        _adopt_entries(folder, manifest, shards)
                    if not manifest["complete"]:
                        manifest["complete"] = True
                        _atomic_json(folder / "manifest.json", manifest)
                except BaseException:
                    _from_main(world, None, failed=True)
                    raise
            _from_main(world, [])  # the others wait until the manifest is complete
        if rank == 0:
            return _assemble(folder, manifest, shards, kept, lazy, budget, layer_list, model.d_model, out_dtype, info)
    # the other processes read the shards they did not compute once the main process let go of the folder;
    # a shared lock keeps a run with recompute=True from rewriting it meanwhile
    with _FolderLock(folder, shared=True):
        manifest = _checked_manifest(folder, "rerun the capture() with recompute=True")
        return _assemble(folder, manifest, shards, kept, lazy, budget, layer_list, model.d_model, out_dtype, info)


def _take_done(folder: Path, manifest: dict, shards: list[tuple[int, int]], layers: list[int], d_model: int,
               dtype: torch.dtype, kept: _Kept, load: bool) -> list[int]:
    """Hand the shards the cache already holds to ``kept`` (checked; their activations only while they fit
    its budget, and only if ``load``) and return the indices of the shards still to compute."""
    listed = sum(e["rows"] for e in manifest["shards"]) * kept.row_bytes
    load = load and kept.keeping and (kept.limit is None or listed <= kept.limit)
    done = _read_done_shards(folder, manifest, shards, layers, d_model, dtype, load=load)
    if not load and kept.limit is not None and kept.keeping and listed > kept.limit:
        kept.stop_keeping()  # the result will be lazy: keep nothing from here on
    for span, tensors in done.items():
        kept.add(span, tensors, verified=True)
    return [k for k, s in enumerate(shards) if s not in done]


def _from_main(world: int, values: list[int] | None, failed: bool = False) -> list[int]:
    """The main process's ``values`` on every process (a collective: every process calls it). When the main
    process ``failed`` it raises its own error; the others raise one that points at it."""
    if world == 1:
        return list(values or [])
    got = dist.broadcast_ints([1] if failed else [0, *(values or [])])
    if got[0]:
        if dist.is_main():
            return []
        raise InterpError("the main process of this capture failed (its error is in its output); a rerun resumes "
                          "from the shards already written")
    return got[1:]


def _all_succeeded(error: Exception | None) -> None:
    """Every process learns whether any failed (a collective); this process's own error is raised first."""
    flag = torch.tensor([0.0 if error is None else 1.0])
    dist.all_reduce_sum([flag])
    if error is not None:
        raise error
    if float(flag) > 0:
        raise InterpError("another process of this capture failed (its error is in its output); the shards written "
                          "so far are kept and a rerun resumes from them")


class _Kept:
    """Finished shards held in host memory: each one's row metadata, and its activations while their total fits
    ``max_memory`` (always with ``lazy=False``, never with ``lazy=True``). Past the budget the activations are
    dropped, to be read back from the cache folder; without a folder that is an error naming ``cache=``."""

    def __init__(self, budget: int, lazy: bool | None, folder: Path | None, row_bytes: int):
        self.budget, self.folder, self.row_bytes = budget, folder, row_bytes
        self.limit = None if lazy is False else budget
        self.keeping, self.dropped = lazy is not True, lazy is True
        self.bytes = 0
        self.records: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.verified: set[str] = set()  # shard files whose sha256 this run checked

    def stop_keeping(self) -> None:
        self.keeping, self.dropped, self.bytes = False, True, 0
        for rec in self.records.values():
            for k in [k for k in rec if k.startswith("layer_")]:
                del rec[k]

    def over(self, pending: int) -> bool:
        """Whether shards of ``pending`` bytes, still being written, would not all fit beside what is kept."""
        return not self.keeping or (self.limit is not None and self.bytes + pending > self.limit)

    def add(self, span: tuple[int, int], tensors: dict[str, Tensor], verified: bool = False) -> None:
        if verified:
            self.verified.add(_shard_name(span))
        rec = {k: tensors[k] for k in META_KEYS}
        if self.keeping and any(k.startswith("layer_") for k in tensors):
            size = rec["prompt_index"].numel() * self.row_bytes
            if self.limit is None or self.bytes + size <= self.limit:
                rec, self.bytes = dict(tensors), self.bytes + size
            elif self.folder is None:
                raise InterpError(f"the activations captured so far ({_human(self.bytes + size)}, up to prompt "
                                  f"{span[1] - 1}) exceed max_memory={_human(self.budget)}: pass cache=True (or "
                                  "cache=<folder>) so that shards go to disk and the result reads them back lazily, "
                                  "or a larger max_memory, or fewer prompts, layers or positions")
            else:
                self.stop_keeping()
        self.records[span] = rec


def _check_fits(model: Model, items: list[Prompt], positions: Positions, exclude: Sequence[str], n_layers: int,
                row_bytes: int, budget: int) -> list[int] | None:
    """Without a cache everything stays in memory: refuse up front a capture whose size is known to exceed
    ``budget`` (one row per prompt for 'last'; the token counts for 'all'). Returns the token counts when
    it computed them, for the batching to reuse."""
    lengths = None
    if positions == "last":
        rows = len(items)
    elif positions == "all" and not exclude:
        lengths = _estimate_lengths(model, items, range(len(items)))
        rows = sum(lengths)
    else:  # 'question', a callable, or exclusions: known once tokenised; checked as shards finish
        return None
    if rows * row_bytes > budget:
        raise InterpError(f"this capture keeps {rows:,} rows x {n_layers} layers, about {_human(rows * row_bytes)}, "
                          f"more than max_memory={_human(budget)}: pass cache=True (or cache=<folder>) and the result "
                          "reads its shards back lazily, or a larger max_memory, or fewer prompts, layers or positions")
    return lengths


def _assemble(folder: Path | None, manifest: dict | None, shards: list[tuple[int, int]], kept: _Kept,
              lazy: bool | None, budget: int, layers: list[int], d_model: int, dtype: torch.dtype,
              info: dict[str, Any]) -> Activations:
    """The result from the shards held in memory and, for the rest, the cache folder: whole, or lazy when it
    does not fit ``budget`` (or ``lazy=True``)."""
    fix = "rerun the capture() with recompute=True"
    entries = {tuple(e["prompts"]): e for e in manifest["shards"]} if manifest is not None else {}
    rows = [int(entries[s]["rows"]) if s in entries else int(kept.records[s]["prompt_index"].numel())
            for s in shards]
    too_big = kept.dropped or sum(rows) * len(layers) * d_model * dtype.itemsize > budget
    info = {**info, "meta": {**info["meta"], "shard_rows": rows}}

    def record(span: tuple[int, int], read: Sequence[int] | None) -> dict[str, Tensor]:
        rec = kept.records.pop(span, None)
        if rec is not None and (read == () or all(f"layer_{i}" in rec for i in layers)):
            return rec
        try:  # another process's shard, or one whose activations were dropped
            return _read_shard(folder, entries[span], layers=layers, d_model=d_model, dtype=dtype, fix=fix, read=read,
                               verify=read != () and _shard_name(span) not in kept.verified)
        except _ShardDamaged as e:
            raise CacheError(f"{e}; {fix}") from e

    if folder is not None and (lazy if lazy is not None else too_big):
        parts = [record(s, ()) for s in shards]
        held = tuple(torch.cat([p[k] for p in parts]) for k in META_KEYS)
        store = _ShardStore(folder, [entries[s] for s in shards], layers, d_model, dtype, budget, held,
                            verified=kept.verified)
        return Activations(acts=_LazyLayers(store), prompt_index=held[0], position=held[1], token_id=held[2],
                           _store=store, **info)
    if len(shards) == 1:
        out = record(shards[0], None)
    else:  # filled shard by shard, each freed once copied: the peak stays near one copy of the result
        n = sum(rows)
        out = {k: torch.empty(n, dtype=torch.long) for k in META_KEYS}
        out |= {f"layer_{i}": torch.empty(n, d_model, dtype=dtype) for i in layers}
        start = 0
        for span, r in zip(shards, rows, strict=True):
            rec = record(span, None)
            for k, t in rec.items():
                if k in out:
                    out[k][start:start + r] = t
            start += r
            del rec
    return Activations(acts={i: out[f"layer_{i}"] for i in layers}, prompt_index=out["prompt_index"],
                       position=out["position"], token_id=out["token_id"], **info)


def _check_prompts(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, bytes, Prompt, dict)):
        text = prompts.question if isinstance(prompts, Prompt) else prompts
        short = repr(text if len(str(text)) <= 40 else f"{str(text)[:37]}...")
        raise InterpError(f"prompts is a single {type(prompts).__name__} ({short}), not a list of prompts; pass a "
                          f"list, e.g. capture(model, [{short}], ...)")
    try:
        given = list(prompts)
    except TypeError:
        raise InterpError(f"prompts must be a list of prompts (str, Prompt, dict or tuple), got "
                          f"{type(prompts).__name__}") from None
    if not given:
        raise InterpError("prompts is empty: pass at least one prompt to capture")
    return [_as_prompt(p, i) for i, p in enumerate(given)]


def _check_exclude(exclude: Any, positions: Positions) -> tuple[str, ...]:
    """``exclude`` as a tuple of names; one name given as a plain string counts as one item."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    try:
        names = tuple(dict.fromkeys(exclude))
    except TypeError:
        raise InterpError(f"exclude={exclude!r}: pass a list of 'special' and/or 'image'") from None
    bad = [e for e in names if e not in ("special", "image")]
    if bad:
        raise InterpError(f"exclude={sorted(bad, key=str)}: only 'special' and 'image' can be excluded")
    if names and positions != "all":
        raise InterpError(f"exclude={list(names)} applies to positions='all' only: 'question' already leaves out "
                          "special and image tokens, 'last' is one fixed token, and a positions callable sees "
                          "info.special_mask and info.image_mask")
    return names


_COUNT_MEANS = {"batch_size": "at most this many prompts per forward pass; None picks 64 on a GPU, 16 on the CPU",
                "batch_tokens": "at most this many padded tokens (prompts x longest prompt) per forward pass; None "
                                "picks 16384 on a GPU, 4096 on the CPU",
                "shard_size": "prompts per cache shard; the default is 256"}


def _make_folder(folder: Path, given: Any) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if where is not None and not where.is_dir():
            raise CacheError(f"cache={str(given)!r}: '{where}' is a file, not a folder; pass a folder "
                             "(it is created if missing)") from None
        raise CacheError(f"cache={str(given)!r}: cannot create the cache folder '{folder}' ({e.strerror or e}); "
                         "pass a folder you can write to") from None


# ---- batches: prompts of similar length together, rows back in prompt order ---------------------------
_IMAGE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Model -> tokens one image adds


def _image_tokens(model: Model) -> int:
    """Tokens one image adds to a prompt once the processor expands it, measured once per model on a blank
    image. A processor that tiles by image size may expand some images more: `_prepare_batch` allows for it."""
    if model not in _IMAGE_TOKENS:
        from PIL import Image

        probe = "Is this a probe?"
        real = int(model.encode([Prompt(probe, Image.new("RGB", (224, 224)))], device="cpu").lengths[0])
        text = len(model.tokenizer(model.format(probe, image=True), add_special_tokens=False)["input_ids"])
        _IMAGE_TOKENS[model] = max(0, real - text)
    return _IMAGE_TOKENS[model]


def _estimate_lengths(model: Model, items: list[Prompt], idx: Sequence[int]) -> list[int]:
    """Token count of each prompt in ``idx``: exact for a text-only prompt (the tokenizer on the formatted text,
    as `Model.encode` runs it); for one with an image, the text plus the model's image expansion."""
    chosen = [items[i] for i in idx]
    texts = [model.format(p.question, context=p.context, image=p.image is not None) for p in chosen]
    counts = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if any(p.image is not None for p in chosen):
        extra = _image_tokens(model)
        counts = [n + (extra if p.image is not None else 0) for n, p in zip(counts, chosen, strict=True)]
    return counts


def _plan(lengths: Sequence[int], batching: _Batching, *, first_tokens: int | None = None) -> list[list[int]]:
    """Batches of indices into ``lengths``, each within ``batch_size`` prompts and ``batch_tokens`` padded tokens
    (a prompt longer than that alone); each batch in index order.

    ``sort=True``: the length-sorted prompts (ties in index order) cut into consecutive runs at the least total
    cost, padded tokens (rows x longest) plus ``overhead`` per forward pass, by dynamic programming; the run that
    starts the shard gets ``first_tokens`` (if given) in place of ``batch_tokens``. Among plans of equal cost the
    one with the longest leading runs wins, so a shard of prompts all of one length gets the batches, and so the
    bits, that ``sort=False`` gives it (but for a ``first_tokens`` run). ``sort=False``: the caller's order, each
    batch filled as far as the limits allow (``first_tokens`` does not apply)."""
    n = len(lengths)
    if not batching.sort:
        return _greedy(range(n), lengths, batching)
    if batching.pack:
        plain = _plan(lengths, batching._replace(pack=False), first_tokens=first_tokens)
        packed = _pack_plan(lengths, batching, first_tokens=first_tokens)
        return packed if _plan_cost(lengths, packed, batching) < _plan_cost(lengths, plain, batching) else plain
    order = sorted(range(n), key=lengths.__getitem__)
    sizes = [lengths[j] for j in order]
    # best[i]: least cost of prompts order[i:]; end[i]: where the batch starting at i ends
    best, end = [0] * (n + 1), [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        cap = first_tokens if first_tokens is not None and i == 0 else batching.batch_tokens
        cost = None
        for j in range(i + 1, min(n, i + batching.batch_size) + 1):
            padded = (j - i) * sizes[j - 1]  # sorted: the last is the longest
            if j > i + 1 and padded > cap:
                break  # wider runs only pad more
            total = padded + batching.overhead + best[j]
            if cost is None or total <= cost:  # ties: the longer run
                cost, end[i] = total, j
        best[i] = cost
    groups, i = [], 0
    while i < n:
        groups.append(sorted(order[i:end[i]]))
        i = end[i]
    return groups


class _Rows(tuple):
    """A packed batch: a tuple of rows, each a tuple of prompt indices laid end to end (`_pack_plan`)."""

    def indices(self) -> list[int]:
        return sorted(j for row in self for j in row)


def _group_indices(g: list[int] | _Rows) -> list[int]:
    return g.indices() if isinstance(g, _Rows) else list(g)


def _plan_cost(lengths: Sequence[int], groups: Sequence[list[int] | _Rows], batching: _Batching) -> int:
    """Padded tokens (rows x widest row) plus ``overhead`` per forward pass, as `_plan` weighs them."""
    total = 0
    for g in groups:
        if isinstance(g, _Rows):
            total += len(g) * max(sum(lengths[j] for j in row) for row in g)
        else:
            total += len(g) * max(lengths[j] for j in g)
    return total + batching.overhead * len(groups)


def _pack_plan(lengths: Sequence[int], batching: _Batching, *, first_tokens: int | None = None
               ) -> list[list[int] | _Rows]:
    """Batches of packed rows: the prompts, longest first (ties in index order), laid end to end into rows as
    wide as the longest prompt (first fit: each goes into the first row with room, at most ``batch_size`` prompts
    a row), and the rows, in the order made, cut into batches of at most ``batch_tokens`` padded tokens (rows x
    row width; ``first_tokens`` for the first) and ``batch_size`` prompts. A batch whose rows each hold one
    prompt is a plain batch (a list of indices, in index order); the others are `_Rows`."""
    n = len(lengths)
    order = sorted(range(n), key=lambda j: (-lengths[j], j))
    width = lengths[order[0]]
    rows: list[list[int]] = []
    used: list[int] = []
    for j in order:
        for r, u in enumerate(used):
            if u + lengths[j] <= width and len(rows[r]) < batching.batch_size:
                rows[r].append(j)
                used[r] += lengths[j]
                break
        else:
            rows.append([j])
            used.append(lengths[j])
    groups: list[list[int] | _Rows] = []
    current: list[list[int]] = []
    count = 0
    for row in rows:
        cap = first_tokens if first_tokens is not None and not groups else batching.batch_tokens
        if current and ((len(current) + 1) * width > cap or count + len(row) > batching.batch_size):
            groups.append(current)
            current, count = [], 0
        current.append(row)
        count += len(row)
    if current:
        groups.append(current)
    return [sorted(r[0] for r in g) if all(len(r) == 1 for r in g) else _Rows(tuple(r) for r in g)
            for g in groups]


def _greedy(order: Sequence[int], lengths: Sequence[int], batching: _Batching) -> list[list[int]]:
    """Batches taken in ``order``, each filled as far as ``batch_size`` and ``batch_tokens`` allow."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for j in order:
        wider = max(longest, lengths[j])
        if current and (len(current) >= batching.batch_size or (len(current) + 1) * wider > batching.batch_tokens):
            groups.append(sorted(current))
            current, wider = [], lengths[j]
        current.append(j)
        longest = wider
    if current:
        groups.append(sorted(current))
    return groups


def _renumbered(e: InterpError, idx: Sequence[int]) -> InterpError:
    """``e`` with its leading "prompt k" (an index inside one batch) turned into the prompt's index in the list."""
    m = re.match(r"prompt (\d+)\b", str(e))
    if not m or int(m[1]) >= len(idx):
        return e
    return type(e)(f"prompt {idx[int(m[1])]}{str(e)[m.end():]}")


def _plan_shard(model: Model, items: list[Prompt], span: tuple[int, int], positions: Positions,
                exclude: Sequence[str], pin: bool, batching: _Batching, lengths: list[int] | None,
                pool: ThreadPoolExecutor, images: ImageCache | None,
                takes_features: bool = False) -> tuple[list[Future], list[list[Hashable]]]:
    """On the tokeniser thread: shard ``span``'s prompts into batches, each queued for encoding on ``pool``
    (behind the batches queued before, so the forward pass finds them in order). With an image cache, each
    batch's images not seen before are queued one by one just ahead of it, so that a batch's images are
    processed in parallel and each distinct image once.

    Returns the batches' futures and, per batch, the image keys it holds in the cache until its forward ran
    (the caller releases them, `ImageCache.release`; empty where the batch carries pixel values: it releases
    its own once encoded). A batch holds its images from now on, so that however many images the batches
    queued ahead of it process, the cache does not drop one it will need and process it again."""
    lo, hi = span
    est = lengths[lo:hi] if lengths is not None else _estimate_lengths(model, items, range(lo, hi))
    # text-only counts are exact: an overlong prompt is named now, by its index, before any forward pass
    model.check_length([n if items[lo + j].image is None else 0 for j, n in enumerate(est)], first_index=lo)
    split = images is not None and images.split is not None  # checked here, off the forward's thread
    features = split and takes_features  # the forward takes features computed beforehand (`_takes_image_features`)
    # The shard that starts the prompt list begins with a small batch, so the device starts early; a rule on
    # the shard, not on this call, keeps each shard's batches the same whichever process or rerun computes it.
    first = batching.batch_tokens // FIRST_BATCH_SHARE if lo == 0 else None
    jobs, holds = [], []
    for g in _plan(est, batching, first_tokens=first):
        idx, rows = _split_group(g, lo)
        held = [k for k in (images.submit(items[i].image, pool, hold=True) for i in idx
                            if split and items[i].image is not None) if k is not None]
        jobs.append(pool.submit(_prepare_batch, model, items, idx, positions, exclude, pin, batching,
                                images if split else None, features, release=() if features else held, rows=rows))
        holds.append(held if features else [])
    return jobs, holds


def _split_group(g: list[int] | _Rows, lo: int) -> tuple[list[int], list[list[int]] | None]:
    """(the prompt indices of plan group ``g`` plus ``lo``, in index order; for packed rows, each row as
    positions in that list, else None)."""
    idx = _group_indices(g)
    if not isinstance(g, _Rows):
        return [lo + j for j in idx], None
    where = {j: k for k, j in enumerate(idx)}
    return [lo + j for j in idx], [[where[j] for j in row] for row in g]


@dataclasses.dataclass
class _Packed:
    """A batch of packed rows (`_pack_plan`): ``inputs`` hold ``input_ids``, ``position_ids`` (from 0 in each
    prompt, and in the padding tail of a row) and any ``token_type_ids``, no ``attention_mask`` (the masks are
    built from the position ids, `hf.packed_masks`). ``plain`` is the padded batch of the same prompts, whose
    selection the rows follow: ``flat`` holds, for each selected (row, position) of ``plain`` in row-major order,
    its flat index in the packed rows. ``places``: per prompt, (its row in ``plain``, its packed row, its first
    packed position, its length)."""

    plain: Batch
    inputs: dict[str, Tensor]
    image_keys: tuple[Hashable | None, ...]
    flat: Tensor
    places: tuple[tuple[int, int, int, int], ...]
    # the check (`hf.check_packed`): a padded batch of a few of the prompts, whose masks the model builds itself
    probe: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # attention_mask, any token_type_ids
    probe_places: tuple[tuple[int, int, int, int], ...] = ()  # as ``places``, rows counted in the probe

    @property
    def lengths(self) -> Tensor:
        return self.plain.lengths

    @property
    def input_ids(self) -> Tensor:
        return self.inputs["input_ids"]

    def to(self, device: Any, *, pin: bool = False) -> _Packed:
        if pin:
            inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        else:
            inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return dataclasses.replace(self, inputs=inputs, flat=self.flat.pin_memory() if pin else self.flat)


_PACKABLE = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def _pack(batch: Batch, rows: Sequence[Sequence[int]], sel: Tensor, pad_id: int) -> _Packed | None:
    """``batch`` (right-padded, on the host) laid out as packed ``rows`` (its row numbers, end to end); None
    where its inputs hold more than token ids and types (pixel values: the batch runs padded)."""
    inputs = batch.inputs
    if set(inputs) - _PACKABLE or "input_ids" not in inputs:
        return None
    lengths = batch.lengths.tolist()
    width = max(sum(lengths[k] for k in row) for row in rows)
    src, types = inputs["input_ids"], inputs.get("token_type_ids")
    ids = torch.full((len(rows), width), pad_id, dtype=src.dtype)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tt = torch.zeros((len(rows), width), dtype=types.dtype) if types is not None else None
    row_of = torch.zeros(len(lengths), dtype=torch.long)
    start = torch.zeros(len(lengths), dtype=torch.long)
    keys, places = [], []
    for r, row in enumerate(rows):
        s = 0
        for k in row:
            n = lengths[k]
            ids[r, s:s + n] = src[k, :n]
            pos[r, s:s + n] = torch.arange(n)
            if tt is not None:
                tt[r, s:s + n] = types[k, :n]
            row_of[k], start[k] = r, s
            places.append((k, r, s, n))
            if batch.image_keys:
                keys.append(batch.image_keys[k])
            s += n
        pos[r, s:] = torch.arange(width - s)  # the padding tail: a segment of its own
    at, p = sel.nonzero(as_tuple=True)
    flat = row_of[at] * width + start[at] + p
    packed = {"input_ids": ids, "position_ids": pos, **({"token_type_ids": tt} if tt is not None else {})}
    # the check's prompts: those of the first row that holds several, the longest (the window: reached or not)
    # and one with an image where any has one; a padded batch of them, as wide as the longest
    chosen = list(next(row for row in rows if len(row) > 1)) + [max(range(len(lengths)), key=lengths.__getitem__)]
    if types is not None:
        chosen += [k for k in range(len(lengths)) if bool((types[k] == 1).any())][:1]
    chosen = sorted(set(chosen))
    cut = max(lengths[k] for k in chosen)
    probe = {k: inputs[k][chosen, :cut] for k in ("attention_mask", "token_type_ids") if k in inputs}
    where = {k: b for b, k in enumerate(chosen)}
    probe_places = tuple((where[k], r, s, n) for k, r, s, n in places if k in where)
    return _Packed(batch, packed, tuple(keys), flat, tuple(places), probe, probe_places)


def _prepare_batch(model: Model, items: list[Prompt], idx: list[int], positions: Positions, exclude: Sequence[str],
                   pin: bool, batching: _Batching, images: ImageCache | None = None,
                   features: bool = False, release: Sequence[Hashable] = (),
                   rows: Sequence[Sequence[int]] | None = None) -> list[tuple[Batch | _Packed, Tensor,
                                                                              dict[str, Tensor]]]:
    """Tokenise prompts ``idx`` on the host: [(batch, selection, row metadata)], one entry unless an image
    expanded to more tokens than estimated and the batch had to be split to stay within ``batch_tokens``.
    With ``features`` the batch carries no pixel values: the forward's thread runs the vision tower once per
    image (`_ImageFeatures`), on pixels the cache holds for it until then. ``release``: image keys held for
    this batch (`_plan_shard`), released once it is encoded (its pixel values are in it). ``rows``: the packed
    rows (positions in ``idx``) the plan laid the prompts in; the entry is then a `_Packed` batch, whose
    selection and metadata are those of the padded batch of the same prompts."""
    try:
        try:
            batch = model.encode([items[i] for i in idx], device="cpu", images=images, pixel_values=not features)
        except InterpError as e:
            raise _renumbered(e, idx) from None
        lengths = batch.lengths.tolist()
        wide = (len(rows) * max(sum(lengths[k] for k in row) for row in rows) if rows is not None
                else len(idx) * max(lengths))
        if (len(idx) > 1 if rows is None else len(rows) > 1) and wide > batching.batch_tokens:
            return [part for g in _plan(lengths, batching)
                    for sub, sub_rows in [_split_group(g, 0)]
                    for part in _prepare_batch(model, items, [idx[j] for j in sub], positions, exclude, pin, batching,
                                               images, features, rows=sub_rows)]
        sel = position_mask(model, batch, positions, exclude)
        at, pos = sel.nonzero(as_tuple=True)  # row-major: batch order, then position order
        meta = {"prompt_index": torch.as_tensor(idx, dtype=torch.long)[at], "position": pos,
                "token_id": batch.input_ids[at, pos]}
        packed = _pack(batch, rows, sel, model.tokenizer.pad_token_id or 0) if rows is not None else None
        if packed is not None:
            body = _vision_body(model)[1]
            if hf.packed_state(body, hf.packed_key(body, packed.inputs)) is False:  # failed its check: padded
                return [part for g in _plan(lengths, batching._replace(pack=False))
                        for part in _prepare_batch(model, items, [idx[j] for j in g], positions, exclude, pin,
                                                   batching, images, features)]
        out = packed if packed is not None else batch
        return [((out.to("cpu", pin=True) if pin else out), sel, meta)]
    finally:
        if release:
            images.release(release)


def _vision_body(model: Model) -> tuple[Any, Any]:
    """(the model under any PEFT wrapping, its multimodal body: vision tower, projector, decoder)."""
    base = hf.base_model(model.hf)
    return base, getattr(base, "model", None)


def _takes_image_features(model: Model) -> bool:
    """Can the model's forward take image features computed beforehand (transformers 5.2x)? Older releases
    take pixel values only, and the vision tower runs in every forward, as it always did."""
    base, body = _vision_body(model)
    return (body is not None and hf.takes_image_features(body)
            and "mm_encoder_outputs" in inspect.signature(base.forward).parameters)


class _ImageFeatures:
    """The vision tower and projector's output for each distinct image of one capture call, on the device,
    least recently used dropped beyond ``max_bytes`` (and computed again if needed: from the pixels that the
    image cache holds for each batch until its forward ran, `_plan_shard`, so not processed again).

    Each image runs through the tower alone: its features then do not depend on which images share its
    batch, so a shard's values are the same whichever process or rerun computes it. The tower runs on the
    forward's thread: on its stream, ahead of the forward that reads the features, or, for a later batch's
    images once the pass is a CUDA graph, on a side stream that the reading forward waits for (`prefetch`)."""

    ahead = True  # queue vision passes ahead on a side stream (`prefetch`)

    def __init__(self, model: Model, images: ImageCache, max_bytes: int | None = None):
        self.model, self.images = model, images
        self.max_bytes = FEATURE_CACHE_BYTES if max_bytes is None else max_bytes
        self.body = _vision_body(model)[1]
        # the vision pass as a CUDA graph where it may be one (`interp._graphs`), checked once per call
        self.fingerprint = _graphs.prepare(self.body, model.device) if self.body is not None else None
        self.cache: OrderedDict[Hashable, Any] = OrderedDict()  # key -> [crops, tokens, d] tensor or list
        self.bytes = 0
        self.as_tensor = True  # Gemma 3 takes a tensor of all images' features, LLaVA a list
        # Vision passes of later batches' images, queued ahead on a side stream while the decoder's forwards
        # run (`prefetch`): key -> the event that marks its features computed there
        self.side = torch.cuda.Stream(model.device) if self.fingerprint is not None and self.ahead else None
        self.pending: dict[Hashable, Any] = {}
        self.prefetched = 0

    @staticmethod
    def _nbytes(f: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ([f] if isinstance(f, Tensor) else f))

    def _features(self, key: Hashable) -> Any:
        if key in self.cache:
            self.cache.move_to_end(key)
            f = self.cache[key]
            done = self.pending.pop(key, None)
            if done is not None:  # computed on the side stream: this stream waits for it, and keeps its memory
                stream = torch.cuda.current_stream(self.model.device)
                stream.wait_event(done)
                for t in [f] if isinstance(f, Tensor) else f:
                    t.record_stream(stream)
            return f
        pixels = self.images.pixels(key).to(self.model.device, non_blocking=True)
        return self._keep(key, _graphs.vision_pass(self.body, pixels, self.fingerprint))

    def _keep(self, key: Hashable, f: Any) -> Any:
        self.as_tensor = isinstance(f, Tensor)
        f = f if self.as_tensor else list(f)
        self.cache[key] = f
        self.bytes += self._nbytes(f)
        return f

    def prefetch(self, keys: Sequence[Hashable]) -> None:
        """On the forward's thread, before it launches a forward: queue the vision passes of a later batch's
        images (``keys``) on the side stream, so that the device runs them in the gaps of the forwards, which
        are launch-bound. Only images whose pixels are processed and whose pass is a built graph (one launch,
        `interp._graphs`); the others are computed when their batch runs, as before. The features are the
        same bits either way (the same graph on the same pixels)."""
        if self.side is None:
            return
        for key in dict.fromkeys(keys):
            if key in self.cache or not self.images.ready(key):
                continue
            host = self.images.pixels(key)
            if not _graphs.built(self.body, host, self.fingerprint):
                continue
            with torch.cuda.stream(self.side):
                self._keep(key, _graphs.vision_pass(self.body, host.to(self.model.device, non_blocking=True),
                                                    self.fingerprint))
                done = torch.cuda.Event()
                done.record(self.side)
            self.pending[key] = done
            self.prefetched += 1

    def inputs(self, batch: Batch, host_ids: Tensor) -> dict[str, Any]:
        """The batch's inputs with its images' features merged into the token embeddings (rows in batch
        order; ``host_ids``: its ``input_ids`` on the CPU), or, for a body that cannot be merged here, passed
        to the forward in place of pixel values."""
        keys = [k for k in batch.image_keys if k is not None]
        per = {k: self._features(k) for k in dict.fromkeys(keys)}
        per_row = torch.cat([per[k] for k in keys]) if self.as_tensor else [t for k in keys for t in per[k]]
        while self.bytes > self.max_bytes and len(self.cache) > 1:  # the batch holds what it uses
            old, f = self.cache.popitem(last=False)
            self.bytes -= self._nbytes(f)
            # prefetched and never read here: only the side stream used its memory, and reuses it in order
            self.pending.pop(old, None)
        try:
            merged = hf.embeds_with_image_features(self.body, batch.inputs, per_row, host_ids)
        except hf.Unsupported:  # counts that do not match: the forward's own merge raises its own error
            merged = None
        return merged if merged is not None else hf.with_image_features(self.body, batch.inputs, per_row)


class _ShardBuffer:
    """Host tensors of one shard, allocated once every batch of it is tokenised (rows are then known), in
    prompt order: each batch's rows go to its prompts' offsets, whatever order the batches ran in.

    Only the copier (or, on the CPU, the main thread) calls `copy`; it allocates on first use, so the
    device starts on the first batch without waiting for the whole shard to be tokenised."""

    def __init__(self, jobs: list[Future], span: tuple[int, int], layers: list[int], d_model: int,
                 dtype: torch.dtype):
        self.jobs, self.span, self.layers, self.d_model, self.dtype = jobs, span, layers, d_model, dtype
        self.out: dict[str, Tensor] | None = None
        self.dest: list[Tensor] = []  # per batch: the shard row of each of its rows

    def _allocate(self) -> dict[str, Tensor]:
        metas = [m for f in self.jobs for _, _, m in f.result()]
        lo, hi = self.span
        counts = torch.zeros(hi - lo, dtype=torch.long)
        for m in metas:
            counts += torch.bincount(m["prompt_index"] - lo, minlength=hi - lo)
        starts = torch.cumsum(counts, 0) - counts  # first row of each prompt
        for m in metas:
            local = m["prompt_index"] - lo
            n = local.numel()
            # a prompt's rows are consecutive in its batch: rank within the prompt = row - its first row
            first = torch.ones(n, dtype=torch.bool)
            first[1:] = local[1:] != local[:-1]
            begin = torch.where(first, torch.arange(n), 0).cummax(0).values if n else local
            self.dest.append(starts[local] + torch.arange(n) - begin)
        total = int(counts.sum())
        out = {key: torch.empty(total, dtype=torch.long) for key in META_KEYS}
        for m, dest in zip(metas, self.dest, strict=True):
            for key in META_KEYS:
                out[key].index_copy_(0, dest, m[key])
        out |= {f"layer_{i}": torch.empty(total, self.d_model, dtype=self.dtype) for i in self.layers}
        return out

    def copy(self, j: int, rows: Tensor, done: Any = None) -> None:
        """Copy batch ``j``'s rows ``[n_layers, n_rows, d_model]`` into this shard's host tensors.

        On a GPU, ``rows`` is a page-locked staging tensor that a side stream is filling; ``done`` is the
        event recorded after that copy, and is waited on here before the rows are read."""
        if self.out is None:
            self.out = self._allocate()
        if done is not None:
            done.synchronize()
        for k, i in enumerate(self.layers):
            self.out[f"layer_{i}"].index_copy_(0, self.dest[j], rows[k])


def _stage(buffer: Tensor, stream: torch.cuda.Stream) -> tuple[Tensor, torch.cuda.Event]:
    """Start copying a device ``buffer`` to page-locked host memory on ``stream``, ordered after the work
    queued so far on the current (compute) stream. Returns the staging tensor and the event that marks
    the copy done. Every stream operation is issued here, on the thread that runs the forward pass, so the
    ordering does not depend on which thread gets there first."""
    compute = torch.cuda.current_stream(buffer.device)
    stream.wait_stream(compute)  # the forward that fills ``buffer`` comes first
    with torch.cuda.stream(stream):
        staged = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
        staged.copy_(buffer, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    # ``buffer`` was allocated on the compute stream: without this, its memory could be handed to the
    # next batch's forward while the side stream still reads it.
    buffer.record_stream(stream)
    return staged, done


def _finish_shard(copies: list[Future], shard: _ShardBuffer, folder: Path | None, manifest: dict | None,
                  span: tuple[int, int], entry_file: bool) -> dict[str, Tensor]:
    for f in copies:
        f.result()
    if shard.out is None:
        shard.out = shard._allocate()
    if folder is not None:
        _write_shard(folder, manifest, span, shard.out, entry_file=entry_file)
    return shard.out


def _written(write: tuple[tuple[int, int], Future]) -> tuple[tuple[int, int], dict[str, Tensor]]:
    """(span, tensors) of a shard write, once done; no name outlives the call to hold the tensors."""
    return write[0], write[1].result()


def _forward(model: Model, body: Any, batch: Batch | _Packed, sel: Tensor, layers: list[int],
             out_dtype: torch.dtype, features: _ImageFeatures | None, batching: _Batching) -> Tensor:
    """One planned batch's forward, on the forward's thread: the ``[n_layers, n_rows, d_model]`` buffer of its
    selected rows. A `_Packed` batch runs packed once its class is checked on this model (the first of each
    class checks it first, `hf.check_packed`); where the check failed, it runs as padded batches of consecutive
    rows within ``batch_tokens`` (the rows, in the same order)."""
    if isinstance(batch, _Packed):
        key = hf.packed_key(body, batch.inputs)
        state = hf.packed_state(body, key) if key is not None else False
        if state is None:
            device = model.device
            packed = {k: batch.inputs[k].to(device) for k in ("position_ids", "token_type_ids") if k in batch.inputs}
            probe = {k: v.to(device) for k, v in batch.probe.items()}
            state = hf.check_packed(model.hf, body, key, packed, probe, batch.probe_places)
        if state:
            return _run_on_device(model, batch, sel, layers, out_dtype, features, "packed")
        return torch.cat([_run_on_device(model, part, part_sel, layers, out_dtype, features, "prepared")
                          for part, part_sel in _padded_parts(batch.plain, sel, batching)], dim=1)
    return _run_on_device(model, batch, sel, layers, out_dtype, features, "prepared")


def _run_on_device(model: Model, batch: Batch | _Packed, sel: Tensor, layers: list[int], out_dtype: torch.dtype,
                   features: _ImageFeatures | None, masks: str) -> Tensor:
    host_ids = batch.input_ids
    batch = batch.to(model.device)
    merged = (features.inputs(batch, host_ids) if features is not None and "pixel_values" not in batch.inputs
              and any(k is not None for k in batch.image_keys) else None)
    return _run_hooked(model, batch, layers, sel, out_dtype, inputs=merged, masks=masks)[0]


def _padded_parts(batch: Batch, sel: Tensor, batching: _Batching) -> list[tuple[Batch, Tensor]]:
    """``batch`` (on the host) cut into runs of consecutive rows as `_greedy` fills them (within ``batch_tokens``
    padded tokens, but for a row alone), each cut to its longest row; with their selections. Their selected rows,
    one run after another, are the batch's in row-major order."""
    parts = []
    for g in _greedy(range(len(batch.lengths)), batch.lengths.tolist(), batching):
        rows, longest = slice(g[0], g[-1] + 1), int(batch.lengths[g].max())
        inputs = {k: v[rows, :longest] for k, v in batch.inputs.items()}
        part = dataclasses.replace(batch, inputs=inputs, lengths=batch.lengths[rows],
                                   question_mask=batch.question_mask[rows, :longest],
                                   special_mask=batch.special_mask[rows, :longest],
                                   image_mask=batch.image_mask[rows, :longest],
                                   image_keys=tuple(batch.image_keys[rows]))
        parts.append((part, sel[rows, :longest]))
    return parts


def _run_shards(model: Model, items: list[Prompt], todo: list[tuple[int, int]], layers: list[int],
                positions: Positions, exclude: Sequence[str], out_dtype: torch.dtype, batching: _Batching,
                lengths: list[int] | None, folder: Path | None, manifest: dict | None, bar: tqdm, kept: _Kept,
                entry_files: bool) -> None:
    """Keep the device busy: batches are planned and tokenised ahead on one thread, rows come back on a side
    stream through a copier thread, and finished shards are written by a third and handed to ``kept``."""
    cuda = model.device.type == "cuda"
    stream = torch.cuda.Stream(model.device) if cuda else None
    body = _vision_body(model)[1]
    tokeniser, copier, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    # Image preprocessing (PIL resizing to 896 px, normalising) is the slow part of encoding: with images,
    # batches are encoded on several threads (the planner's first tokenizer call, with the same settings,
    # comes first, so no thread changes the tokenizer's state while another uses it).
    # Each distinct image is processed once per call (ImageCache) and, where the forward takes precomputed
    # features, run through the vision tower once (_ImageFeatures), while they fit the caches' bounds (beyond
    # them the least recently used are dropped and recomputed if asked for again; but the pixels of a queued
    # batch's images are held for it until its forward ran); both go when the call ends.
    with_images = any(p.image is not None for p in items)
    encoder = (ThreadPoolExecutor(max(1, min(ENCODER_THREADS, (os.cpu_count() or 2) - 2))) if with_images
               else tokeniser)
    # pinned pixels only where they go to the device one image at a time (the vision passes of _ImageFeatures);
    # batches that carry pixel values concatenate them into a new tensor, pinned with the batch
    takes_features = with_images and _takes_image_features(model)
    if with_images and not takes_features:  # the batches carry pixel values: they run padded
        batching = batching._replace(pack=False)
    images = (ImageCache(model, max_bytes=IMAGE_CACHE_BYTES, max_held=HELD_IMAGES,
                         pin=None if takes_features else False) if with_images else None)
    features = _ImageFeatures(model, images) if with_images else None

    def plan(span: tuple[int, int]) -> Future:
        return tokeniser.submit(_plan_shard, model, items, span, positions, exclude, cuda, batching, lengths,
                                encoder, images, takes_features)

    writes: deque[tuple[tuple[int, int], Future]] = deque()
    sizes: deque[int] = deque()  # bytes of each shard in ``writes``
    try:
        planned = plan(todo[0])
        for k, span in enumerate(todo):
            jobs, holds = planned.result()
            if k + 1 < len(todo):
                planned = plan(todo[k + 1])  # queued behind this shard's batches: one shard of look-ahead
            shard = _ShardBuffer(jobs, span, layers, model.d_model, out_dtype)
            copies, j = [], 0
            with torch.inference_mode():
                for b, (job, held) in enumerate(zip(jobs, holds, strict=True)):
                    for batch, sel, _meta in job.result():
                        if features is not None and b + 1 < len(holds):
                            # the next batch's vision passes, on the side stream beside this forward
                            features.prefetch(holds[b + 1])
                        buffer = _forward(model, body, batch, sel, layers, out_dtype, features, batching)
                        if cuda:
                            staged, done = _stage(buffer, stream)
                            copies.append(copier.submit(shard.copy, j, staged, done))
                        else:
                            shard.copy(j, buffer)
                        j += 1
                        bar.update(int(batch.lengths.numel()))
                    if held:  # its forward ran: the cache may drop the pixels of its images now
                        images.release(held)
            rows = sum(int(m["prompt_index"].numel()) for f in jobs for _, _, m in f.result())
            writes.append((span, writer.submit(_finish_shard, copies, shard, folder, manifest, span, entry_files)))
            sizes.append(rows * kept.row_bytes)
            del shard, copies, jobs, holds
            # Wait for older writes once nothing is kept (a lazy result), or once the shards still being written
            # would take what is kept past max_memory: host memory then holds a few shards beyond what is kept,
            # however slow the disk. A finished write also surfaces a failed copy or write now, not at the end.
            while writes and (writes[0][1].done() or (len(writes) > IN_FLIGHT and kept.over(sum(sizes)))):
                kept.add(*_written(writes.popleft()))
                sizes.popleft()
                if not kept.keeping:
                    release_freed_memory()  # the written shard's buffers, back to the OS
        while writes:
            kept.add(*_written(writes.popleft()))
    finally:
        for pool in dict.fromkeys((tokeniser, encoder, copier, writer)):
            pool.shutdown(wait=True, cancel_futures=True)
        if images is not None:
            images.clear()
            features.cache.clear()
