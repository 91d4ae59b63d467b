"""Stage 2 of the loop: residual-stream activations, captured with hooks and cached on disk.

`capture()` hooks the decoder layers you name, keeps only the token positions you ask for, stops the
forward pass after the last requested layer and batches prompts of similar length together. With
``cache=`` it writes safetensors shards plus a ``manifest.json``: a rerun reads them back, an interrupted
run resumes, several processes share the work, and a result larger than memory is read back one shard
at a time (`Activations.chunks`, `Activations.batches`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import operator
import os
import re
import shutil
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp import dist
from interp._errors import InterpError
from interp._io import atomic_write_text, file_sha256, release_freed_memory
from interp.models import Batch, Model, Prompt, _as_prompt, as_dtype

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent runs into one folder are not serialised
    fcntl = None

FORMAT = "interp.activations/1"
DEFAULT_CACHE_ROOT = Path("sae_cache")
LOCK_FILE = ".lock"  # flock()ed by the run using a cache folder; never deleted (see `_FolderLock`)
ENTRY_PREFIX = ".entry-"  # a shard's manifest entry, written by a process other than the main one
META_KEYS = ("prompt_index", "position", "token_id")
IN_FLIGHT = 1  # shard writes queued behind the forward pass: bounds host memory to a few shards
Positions = Literal["last", "all", "question"] | Callable[..., Any]


class TokenInfo(NamedTuple):
    """What a ``positions=`` callable sees for one prompt (all tensors are [pos], padding removed)."""

    input_ids: Tensor
    tokens: list[str]
    question_mask: Tensor
    special_mask: Tensor
    image_mask: Tensor


class ActivationChunk(NamedTuple):
    """One shard's rows, from `Activations.chunks`."""

    acts: dict[int, Tensor]  # {layer: [rows, d_model]}
    prompt_index: Tensor  # [rows]
    position: Tensor  # [rows]
    token_id: Tensor  # [rows]


class CacheError(InterpError):
    """The on-disk activation cache is missing a piece or is corrupt."""


class _ShardDamaged(CacheError):
    """A listed shard is missing, truncated or fails its hash. The workbench wrote it, so `capture`
    recomputes it (with a `CacheWarning`) instead of failing."""


class CacheWarning(UserWarning):
    """A cache shard was recomputed, or a run waited for another run on the same cache folder."""


@dataclass(frozen=True, eq=False)
class Activations:
    """Captured activations: ``acts[layer]`` is ``[n_rows, d_model]``; each row knows its prompt and position.

    A lazy one (``.lazy``: a capture larger than ``max_memory``) holds only ``prompt_index``, ``position`` and
    ``token_id`` in memory and reads the layers from its cache folder: `chunks` one shard at a time, `batches`
    shuffled for training, ``acts[layer]`` whole when that fits ``max_memory``."""

    acts: Mapping[int, Tensor]  # {layer: [n_rows, d_model]}; lazy: read from the shards on access
    prompt_index: Tensor  # [n_rows] index into the prompt list
    position: Tensor  # [n_rows] token position inside that prompt's input
    token_id: Tensor  # [n_rows] the token at that position
    n_prompts: int
    positions: str
    model_name: str = ""
    path: Path | None = None  # the cache folder, when cached
    meta: dict[str, Any] = field(default_factory=dict)  # layers, exclude, dtype, shard_rows (rows per shard)
    _store: _ShardStore | None = field(default=None, repr=False)  # set for a lazy one

    @property
    def lazy(self) -> bool:
        """Whether the layers are read from the cache folder on use (the row metadata is in memory)."""
        return self._store is not None

    @property
    def layers(self) -> list[int]:
        return sorted(self.acts)

    @property
    def dtype(self) -> torch.dtype | None:
        if self._store is not None:
            return self._store.dtype
        return next(iter(self.acts.values())).dtype if self.acts else None

    @property
    def d_model(self) -> int:
        if self._store is not None:
            return self._store.d_model
        return int(next(iter(self.acts.values())).shape[-1]) if self.acts else 0

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.acts:
            raise InterpError(f"layer {layer} was not captured; captured layers are {self.layers}")
        return self.acts[layer]

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    def chunks(self, layers: Sequence[int] | int | None = None) -> Iterator[ActivationChunk]:
        """The rows shard by shard, in prompt order; a lazy object reads one shard at a time."""
        wanted = self._wanted(layers)
        for k, (lo, hi) in enumerate(self._spans()):
            if self._store is not None:
                read = self._store.read(k, wanted)
                acts = {i: read[f"layer_{i}"] for i in wanted}
            else:
                acts = {i: self.acts[i][lo:hi] for i in wanted}
            yield ActivationChunk(acts, self.prompt_index[lo:hi], self.position[lo:hi], self.token_id[lo:hi])

    def batches(self, layer: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, repeat: bool = False,
                drop_last: bool = True, shards_in_memory: int = 4) -> Iterator[Tensor]:
        """``[batch_size, d_model]`` rows of ``layer`` for training (an SAE, a probe), shuffled across shards.

        Shards are read in a seeded random order, ``shards_in_memory`` at a time, into a buffer that is
        permuted and cut into batches; rows left over join the next buffer. One pass yields every row once
        (``drop_last``: but a last short batch); ``repeat=True`` starts a new pass in a new order, forever.
        A lazy object holds at most twice ``shards_in_memory`` shards: the next group is read while this
        one is yielded."""
        [wanted] = self._wanted([layer])
        size = _count("batch_size", batch_size, "rows per batch")
        per_group = _count("shards_in_memory", shards_in_memory, "shards mixed in one buffer; the default is 4")
        units = [(k, lo, hi) for k, (lo, hi) in enumerate(self._spans()) if hi > lo]
        total = sum(hi - lo for _, lo, hi in units)
        if total == 0 or (drop_last and total < size):
            raise InterpError(f"batch_size={size} is more than the {total} rows of layer {wanted}; pass a smaller "
                              "batch_size, or drop_last=False to get the rows as one short batch")
        return self._batches(wanted, size, bool(shuffle), int(seed), bool(repeat), bool(drop_last), per_group, units)

    def _batches(self, layer: int, size: int, shuffle: bool, seed: int, repeat: bool, drop_last: bool,
                 per_group: int, units: list[tuple[int, int, int]]) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        pool = ThreadPoolExecutor(1) if self._store is not None else None

        def read(group: list[tuple[int, int, int]]) -> list[Tensor]:  # each [shard rows, d_model]
            if self._store is None:
                return [self.acts[layer][lo:hi] for _, lo, hi in group]
            return [self._store.read(k, [layer])[f"layer_{layer}"] for k, _, _ in group]

        def fetch(group: list[tuple[int, int, int]]) -> Callable[[], list[Tensor]]:
            if pool is None:
                parts = read(group)
                return lambda: parts
            return pool.submit(read, group).result

        try:
            while True:
                order = torch.randperm(len(units), generator=gen).tolist() if shuffle else list(range(len(units)))
                groups = [[units[i] for i in order[g:g + per_group]] for g in range(0, len(order), per_group)]
                carry: Tensor | None = None
                pending = fetch(groups[0])
                for g in range(len(groups)):
                    parts = pending()
                    if g + 1 < len(groups):
                        pending = fetch(groups[g + 1])  # read the next group while this one is consumed
                    if carry is not None:
                        parts = [carry, *parts]
                    buf = parts[0] if len(parts) == 1 else torch.cat(parts)  # [rows, d_model]
                    del parts
                    n = buf.shape[0]
                    perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
                    full = n - n % size
                    for s in range(0, full, size):
                        yield buf[perm[s:s + size]]  # a copy: callers may change it in place
                    carry = buf[perm[full:]] if full < n else None
                    del buf
                    if pool is not None:
                        release_freed_memory()
                if carry is not None and not drop_last:
                    yield carry
                if not repeat:
                    return
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _wanted(self, layers: Sequence[int] | int | None) -> list[int]:
        if layers is None:
            return self.layers
        wanted = [layers] if isinstance(layers, int) else list(layers)
        for i in wanted:
            if i not in self.acts:
                raise InterpError(f"layer {i} was not captured; captured layers are {self.layers}")
        return [int(i) for i in wanted]

    def _spans(self) -> list[tuple[int, int]]:
        """Row ranges of the shards, in order (one range for activations that came without shards)."""
        rows = self._store.rows if self._store is not None else self.meta.get("shard_rows")
        if not rows or sum(rows) != len(self):
            return [(0, len(self))]
        spans, start = [], 0
        for r in rows:
            spans.append((start, start + r))
            start += r
        return spans

    def per_prompt(self, layer: int) -> list[Tensor]:
        """Rows of ``layer`` split by prompt (a list of ``[n_pos_i, d_model]`` tensors)."""
        counts = torch.bincount(self.prompt_index, minlength=self.n_prompts).tolist()
        return list(torch.split(self[layer], counts))

    def summary(self, groups: dict[str, Sequence[int]] | None = None):
        """Per layer (and group of prompt indices): rows, mean L2 norm, and the cosine between group means.

        ``groups`` like ``{"medical": range(0, 100), "general": range(100, 200)}``; default one group.
        Computed shard by shard, so a lazy capture is never read whole."""
        import pandas as pd

        groups = groups or {"all": range(self.n_prompts)}
        members = {name: torch.as_tensor(list(idx), dtype=torch.long) for name, idx in groups.items()}
        layers = self.layers
        sums = {(i, g): torch.zeros(self.d_model, dtype=torch.float64) for i in layers for g in members}
        norms = dict.fromkeys(sums, 0.0)
        rows = dict.fromkeys(members, 0)
        for chunk in self.chunks():
            for g, idx in members.items():
                m = torch.isin(chunk.prompt_index, idx)
                rows[g] += int(m.sum())
                for i in layers:
                    x = chunk.acts[i][m].double()
                    sums[i, g] += x.sum(0)
                    norms[i, g] += float(x.norm(dim=-1).sum())
        empty = [g for g, n in rows.items() if n == 0]
        if empty:
            raise InterpError(f"group {empty[0]!r} selects no captured rows")
        records = []
        for i in layers:
            for g in members:
                records.append({"layer": i, "group": g, "rows": rows[g], "mean_norm": norms[i, g] / rows[g]})
            if len(members) == 2:
                a, b = (sums[i, g] / rows[g] for g in members)
                cos = float(a @ b / (a.norm() * b.norm()))
                for r in records[-2:]:
                    r["cosine_between_group_means"] = cos
        return pd.DataFrame.from_records(records)

    def figure(self, groups: dict[str, Sequence[int]] | None = None):
        """Plotly: mean residual-stream norm per layer, one line per group."""
        import plotly.express as px

        df = self.summary(groups)
        fig = px.line(df, x="layer", y="mean_norm", color="group", markers=True, log_y=True,
                      title=f"{self.model_name}: residual-stream norm by layer ({self.positions} positions)")
        fig.update_layout(template="plotly_white", yaxis_title="mean ||resid_post||")
        fig.update_xaxes(dtick=1, title_text="decoder layer")  # layers are whole numbers
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "n_rows": len(self), "n_prompts": self.n_prompts,
                "positions": self.positions, "model": self.model_name,
                "path": str(self.path) if self.path else None, "d_model": self.d_model, "lazy": self.lazy}

    def __repr__(self) -> str:
        where = f", {'read lazily from' if self.lazy else 'cached at'} '{self.path}'" if self.path else ""
        return (f"Activations({self.model_name!r}, layers={self.layers}, rows={len(self)} from "
                f"{self.n_prompts} prompts, positions={self.positions!r}, d_model={self.d_model}, {self.dtype}{where})")


class _ShardStore:
    """The shards of one cache folder, read on demand for a lazy `Activations`. A shard's sha256 is checked
    on its first read (and its row metadata against the copy in memory); the folder is not locked meanwhile,
    so a rerun with ``recompute=True`` that rewrites it makes the next read fail by name."""

    def __init__(self, folder: Path, entries: list[dict], layers: list[int], d_model: int, dtype: torch.dtype,
                 max_memory: int, meta: tuple[Tensor, Tensor, Tensor], verified: set[str] | None = None):
        self.folder, self.layers, self.d_model, self.dtype = folder, list(layers), int(d_model), dtype
        self.max_memory, self.meta = max_memory, meta
        self.entries = sorted(entries, key=lambda e: e["prompts"][0])
        self.rows = [int(e["rows"]) for e in self.entries]
        self.starts = [0]
        for r in self.rows:
            self.starts.append(self.starts[-1] + r)
        self.verified = set(verified or ())
        self.fix = "rerun the capture() that wrote it (it recomputes damaged shards), then load it again"

    def read(self, k: int, layers: Sequence[int]) -> dict[str, Tensor]:
        """Shard ``k``'s row metadata and the given layers (``layer_{i}``: ``[rows, d_model]``)."""
        entry = self.entries[k]
        check = entry["file"] not in self.verified
        try:
            tensors = _read_shard(self.folder, entry, layers=self.layers, d_model=self.d_model, dtype=self.dtype,
                                  fix=self.fix, read=layers, verify=check)
        except _ShardDamaged as e:
            raise CacheError(f"{e}; {self.fix}") from e
        if check:
            lo, hi = self.starts[k], self.starts[k + 1]
            for key, held in zip(META_KEYS, self.meta, strict=True):
                if not torch.equal(tensors[key], held[lo:hi]):
                    raise CacheError(f"cache shard '{self.folder / entry['file']}' no longer holds the rows it held "
                                     "when these Activations were made (the folder was rewritten): load it again "
                                     "with load_activations")
            self.verified.add(entry["file"])
        return tensors

    def materialise(self, layer: int) -> Tensor:
        """All rows of ``layer`` as one ``[n_rows, d_model]`` tensor, if that fits ``max_memory``."""
        n = self.starts[-1]
        need = n * self.d_model * self.dtype.itemsize
        if need > self.max_memory:
            raise InterpError(f"layer {layer} of the lazy activations in '{self.folder}' is {_human(need)} ({n:,} rows "
                              f"x {self.d_model} {self.dtype}), more than max_memory={_human(self.max_memory)}: "
                              f"iterate it with .chunks([{layer}]) (one shard at a time) or .batches({layer}, "
                              "batch_size), or load it with load_activations(path, max_memory=...) and a larger budget")
        out = torch.empty(n, self.d_model, dtype=self.dtype)
        for k in range(len(self.entries)):
            out[self.starts[k]:self.starts[k + 1]] = self.read(k, [layer])[f"layer_{layer}"]
        return out


class _LazyLayers(Mapping):
    """``Activations.acts`` of a lazy capture: the layer names without reading; a layer read whole on access."""

    def __init__(self, store: _ShardStore):
        self.store = store

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.store.layers:
            raise KeyError(layer)
        return self.store.materialise(int(layer))

    def __contains__(self, layer: object) -> bool:  # Mapping's default would read the layer
        return layer in self.store.layers

    def __iter__(self) -> Iterator[int]:
        return iter(self.store.layers)

    def __len__(self) -> int:
        return len(self.store.layers)

    def __repr__(self) -> str:
        return f"<layers {self.store.layers} read from '{self.store.folder}'>"


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


def run_hooked(model: Model, batch: Batch, layers: Sequence[int], sel: Tensor,
               out_dtype: torch.dtype | None = None) -> dict[int, Tensor]:
    """One forward pass that keeps the selected rows of each requested layer's output and stops early.

    Returns ``{layer: Tensor[n_selected, d_model]}`` on the model's device; rows are in (batch, pos) order.
    """
    return _run_hooked(model, batch, layers, sel, out_dtype)[1]


def _run_hooked(model: Model, batch: Batch, layers: Sequence[int], sel: Tensor,
                out_dtype: torch.dtype | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """`run_hooked`, also returning the ``[n_layers, n_selected, d_model]`` buffer whose rows the hooks
    fill (``buffer[k]`` is ``layers[k]``), so that a caller can move every layer to the host in one copy."""
    # Flat row indices computed on the host: boolean-mask indexing on the device would force a sync
    # in every hook and stall the kernel queue.
    flat = sel.reshape(-1).nonzero().squeeze(1)
    dtype = out_dtype or model.dtype
    buffer = torch.empty(len(layers), flat.numel(), model.d_model, dtype=dtype, device=model.device)
    flat = flat.to(model.device, non_blocking=True)
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
        model.hf(**batch.inputs, use_cache=False)
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


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from interp import __version__

    return {"interp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "model"


class _Batching(NamedTuple):
    batch_size: int  # at most this many prompts per forward pass
    batch_tokens: int  # at most this many padded tokens (prompts x longest) per forward pass
    sort: bool  # group prompts of similar length (False: the caller's order)


def capture(model: Model, prompts: Sequence[Prompt | str], *, layers: Any, positions: Positions = "last",
            cache: str | os.PathLike | bool | None = None, batch_size: int | None = None,
            batch_tokens: int | None = None, sort: bool = True, exclude: Sequence[str] | str = (),
            dtype: Any = None, shard_size: int = 256, recompute: bool = False, progress: bool = True,
            max_memory: int | str | None = None, lazy: bool | None = None,
            distributed: bool | None = None) -> Activations:
    """Capture residual-stream activations (``blocks.{L}.hook_resid_post``) at the chosen positions.

    ``cache``: ``True`` for ``sae_cache/``, or a folder; each (model, prompts, layers, positions, dtype)
    gets its own subfolder of safetensors shards (``shard_size`` prompts each, in the given order) and a
    ``manifest.json``. A run holds a lock on that subfolder, so a second run with the same inputs waits and
    then reads what the first wrote; a shard found damaged is recomputed with a `CacheWarning`. ``exclude``
    (with ``positions="all"``) drops ``"special"`` and/or ``"image"`` tokens; padding is never kept.

    Batching: within a shard, prompts of similar token length go together (``sort=False``: the given
    order), at most ``batch_size`` prompts (default 64 on a GPU, 16 on the CPU) and ``batch_tokens`` padded
    tokens, prompts x longest (default 16384 / 4096), per forward pass; a longer prompt runs alone. Rows
    come back in prompt order, then position, whatever the batches; the cache does not depend on them.

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
    batching = _Batching(_count("batch_size", (64 if cuda else 16) if batch_size is None else batch_size),
                         _count("batch_tokens", (16384 if cuda else 4096) if batch_tokens is None else batch_tokens),
                         bool(sort))
    shard_size = _count("shard_size", shard_size)
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


def _count(name: str, value: Any, means: str | None = None) -> int:
    """A whole number >= 1 (ints of any integer type), or an `InterpError` naming ``name``."""
    means = means or _COUNT_MEANS[name]
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise InterpError(f"{name}={value!r}: pass a whole number >= 1 ({means})") from None
    if n < 1:
        raise InterpError(f"{name}={n}: must be >= 1 ({means})")
    return n


# Decimal and binary units; accelerate's convert_file_size_to_int reads a lower-case "gb" as gigabits.
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _memory_bytes(value: int | str | None) -> int:
    """``max_memory`` in bytes: an int, a size such as ``"2GB"`` / ``"512 MiB"``, or None for a quarter of RAM."""
    if value is None:
        import psutil

        return psutil.virtual_memory().total // 4
    bad = InterpError(f"max_memory={value!r}: pass a number of bytes or a size such as '2GB' or '512MiB' (None: a "
                      "quarter of this machine's memory)")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if not m or m[2].lower() not in _UNITS:
            raise bad
        n = int(float(m[1]) * _UNITS[m[2].lower()])
    else:
        try:
            if isinstance(value, bool):
                raise TypeError
            n = operator.index(value)
        except TypeError:
            raise bad from None
    if n < 1:
        raise bad
    return n


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


def _plan(lengths: Sequence[int], batching: _Batching) -> list[list[int]]:
    """Batches of indices into ``lengths``: shortest first (or in order), each within ``batch_size`` prompts and
    ``batch_tokens`` padded tokens; a prompt longer than ``batch_tokens`` alone. Each batch in index order.

    Shortest first, ties in index order: a shard whose prompts are already in that order (all of one length,
    say) gets the batches, and so the bits, that ``sort=False`` gives it."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if batching.sort else range(len(lengths))
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
                pool: ThreadPoolExecutor) -> list[Future]:
    """On the tokeniser thread: shard ``span``'s prompts into batches, each queued for encoding on ``pool``
    (behind the batches queued before, so the forward pass finds them in order)."""
    lo, hi = span
    est = lengths[lo:hi] if lengths is not None else _estimate_lengths(model, items, range(lo, hi))
    # text-only counts are exact: an overlong prompt is named now, by its index, before any forward pass
    model.check_length([n if items[lo + j].image is None else 0 for j, n in enumerate(est)], first_index=lo)
    return [pool.submit(_prepare_batch, model, items, [lo + j for j in g], positions, exclude, pin, batching)
            for g in _plan(est, batching)]


def _prepare_batch(model: Model, items: list[Prompt], idx: list[int], positions: Positions, exclude: Sequence[str],
                   pin: bool, batching: _Batching) -> list[tuple[Batch, Tensor, dict[str, Tensor]]]:
    """Tokenise prompts ``idx`` on the host: [(batch, selection, row metadata)], one entry unless an image
    expanded to more tokens than estimated and the batch had to be split to stay within ``batch_tokens``."""
    try:
        batch = model.encode([items[i] for i in idx], device="cpu")
    except InterpError as e:
        raise _renumbered(e, idx) from None
    lengths = batch.lengths.tolist()
    if len(idx) > 1 and len(idx) * max(lengths) > batching.batch_tokens:
        return [part for g in _plan(lengths, batching)
                for part in _prepare_batch(model, items, [idx[j] for j in g], positions, exclude, pin, batching)]
    sel = position_mask(model, batch, positions, exclude)
    rows, pos = sel.nonzero(as_tuple=True)  # row-major: batch order, then position order
    meta = {"prompt_index": torch.as_tensor(idx, dtype=torch.long)[rows], "position": pos,
            "token_id": batch.input_ids[rows, pos]}
    return [((batch.to("cpu", pin=True) if pin else batch), sel, meta)]


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


def _run_shards(model: Model, items: list[Prompt], todo: list[tuple[int, int]], layers: list[int],
                positions: Positions, exclude: Sequence[str], out_dtype: torch.dtype, batching: _Batching,
                lengths: list[int] | None, folder: Path | None, manifest: dict | None, bar: tqdm, kept: _Kept,
                entry_files: bool) -> None:
    """Keep the device busy: batches are planned and tokenised ahead on one thread, rows come back on a side
    stream through a copier thread, and finished shards are written by a third and handed to ``kept``."""
    cuda = model.device.type == "cuda"
    stream = torch.cuda.Stream(model.device) if cuda else None
    tokeniser, copier, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    # Image preprocessing (PIL resizing to 896 px, normalising) is the slow part of encoding: with images,
    # batches are encoded on several threads (the planner's first tokenizer call, with the same settings,
    # comes first, so no thread changes the tokenizer's state while another uses it).
    images = any(p.image is not None for p in items)
    encoder = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) - 2))) if images else tokeniser

    def plan(span: tuple[int, int]) -> Future:
        return tokeniser.submit(_plan_shard, model, items, span, positions, exclude, cuda, batching, lengths,
                                encoder)

    writes: deque[tuple[tuple[int, int], Future]] = deque()
    try:
        planned = plan(todo[0])
        for k, span in enumerate(todo):
            jobs = planned.result()
            if k + 1 < len(todo):
                planned = plan(todo[k + 1])  # queued behind this shard's batches: one shard of look-ahead
            shard = _ShardBuffer(jobs, span, layers, model.d_model, out_dtype)
            copies, j = [], 0
            with torch.inference_mode():
                for job in jobs:
                    for batch, sel, _meta in job.result():
                        buffer, _ = _run_hooked(model, batch.to(model.device), layers, sel, out_dtype)
                        if cuda:
                            staged, done = _stage(buffer, stream)
                            copies.append(copier.submit(shard.copy, j, staged, done))
                        else:
                            shard.copy(j, buffer)
                        j += 1
                        bar.update(int(batch.lengths.numel()))
            writes.append((span, writer.submit(_finish_shard, copies, shard, folder, manifest, span, entry_files)))
            del shard, copies, jobs
            # Once nothing is kept (a lazy result), wait for older writes: host memory then holds a few shards
            # at most. A finished write also surfaces a failed copy or write now, not at the end.
            while writes and (writes[0][1].done() or (len(writes) > IN_FLIGHT and not kept.keeping)):
                kept.add(*_written(writes.popleft()))
                if not kept.keeping:
                    release_freed_memory()  # the written shard's buffers, back to the OS
        while writes:
            kept.add(*_written(writes.popleft()))
    finally:
        for pool in dict.fromkeys((tokeniser, encoder, copier, writer)):
            pool.shutdown(wait=True, cancel_futures=True)


class _FolderLock:
    """An advisory ``flock`` on ``folder/.lock`` for as long as a run uses the folder: exclusive for a
    capture (it writes), shared for `load_activations`. A second run waits for the first. The kernel
    drops the lock when its holder exits, even by kill -9, so a dead run never blocks the next, and a run
    holding the exclusive lock knows that any ``.tmp`` file in the folder is a dead run's leftover."""

    def __init__(self, folder: Path, *, shared: bool = False):
        self.folder, self.shared = folder, shared
        self.fd: int | None = None
        self.locked = False

    def __enter__(self) -> _FolderLock:
        if fcntl is None:
            return self
        path, writable = self.folder / LOCK_FILE, True
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:  # a read-only cache (shipped with a paper, say): flock works on a read-only descriptor too
                self.fd, writable = os.open(path, os.O_RDONLY), False
            except OSError:
                return self  # a folder nobody here can write to: no run of ours can be writing it
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                warnings.warn(f"another capture (pid {holder}) is using the cache folder '{self.folder}': waiting "
                              "for it to finish, then this run reads or completes what it wrote", CacheWarning,
                              stacklevel=3)
                fcntl.flock(self.fd, mode)
        except OSError as e:  # a file system without locks (some network mounts)
            warnings.warn(f"cannot lock the cache folder '{self.folder}' ({e.strerror or e}); runs into it at the "
                          "same time are not serialised, and leftover .tmp files are kept", CacheWarning,
                          stacklevel=3)
            return self
        except BaseException:  # interrupted while waiting
            self.__exit__()
            raise
        self.locked = True
        if writable and not self.shared:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            if self.locked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd, self.locked = None, False


SHARD_FIELDS = {"file": str, "prompts": list, "rows": int, "sha256": str}
MANIFEST_FIELDS = {"format": str, "key": str, "shards": list, "complete": bool, "n_prompts": int, "layers": list,
                   "positions": str, "exclude": list, "dtype": str, "model": str}


def _shard_name(span: tuple[int, int]) -> str:
    return f"shard_{span[0]:08d}_{span[1]:08d}.safetensors"


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_manifest(manifest: Any, path: Path, fix: str) -> dict:
    """A manifest read from disk is data, not trusted: its shape, its types, and every shard entry's file
    name (a plain name inside the folder, the one its prompt range is stored under) are checked."""
    if not isinstance(manifest, dict):
        raise CacheError(f"cache manifest '{path}' holds a JSON {type(manifest).__name__}, not an object; {fix}")
    for name, kind in MANIFEST_FIELDS.items():
        if name not in manifest:
            raise CacheError(f"cache manifest '{path}' has no '{name}' entry; {fix}")
        if not _is(manifest[name], kind):
            raise CacheError(f"cache manifest '{path}': '{name}' is {manifest[name]!r}, not a {kind.__name__}; {fix}")
    if manifest["format"] != FORMAT:
        raise CacheError(f"cache manifest '{path}' has format {manifest['format']!r}; this version of interp reads "
                         f"{FORMAT!r}; {fix}")
    if not all(_is(i, int) and i >= 0 for i in manifest["layers"]) or not manifest["layers"]:
        raise CacheError(f"cache manifest '{path}': 'layers' is {manifest['layers']!r}, not a list of layer "
                         f"numbers; {fix}")
    n, end = manifest["n_prompts"], 0
    for k, entry in enumerate(manifest["shards"]):
        shown = repr(entry) if len(repr(entry)) <= 160 else repr(entry)[:157] + "..."
        where = f"cache manifest '{path}', shards[{k}] = {shown}"
        if not isinstance(entry, dict):
            raise CacheError(f"{where} is not an object; {fix}")
        for name, kind in SHARD_FIELDS.items():
            if not _is(entry.get(name), kind):
                raise CacheError(f"{where}: '{name}' is missing or not a {kind.__name__}; {fix}")
        span = entry["prompts"]
        if len(span) != 2 or not all(_is(i, int) for i in span) or not 0 <= span[0] < span[1] <= n:
            raise CacheError(f"{where}: 'prompts' must be [first, end) inside 0-{n}; {fix}")
        file, expected = entry["file"], _shard_name(tuple(span))
        if file != expected:
            if Path(file).is_absolute() or Path(file).name != file or file in (".", ".."):
                raise CacheError(f"{where}: '{file}' points outside the cache folder; shard files are plain names "
                                 f"inside it (here '{expected}'); {fix}")
            raise CacheError(f"{where}: it names '{file}', but the rows of prompts {span[0]}-{span[1]} are stored in "
                             f"'{expected}'; {fix}")
        if entry["rows"] < 0:
            raise CacheError(f"{where}: 'rows' is negative; {fix}")
    spans = sorted(tuple(e["prompts"]) for e in manifest["shards"])
    for lo, hi in spans:
        if lo < end:
            raise CacheError(f"cache manifest '{path}' lists overlapping shards (prompts {lo}-{hi} and an earlier "
                             f"one ending at {end}); {fix}")
        end = hi
    if manifest["complete"] and (sum(hi - lo for lo, hi in spans) != n):
        raise CacheError(f"cache manifest '{path}' says complete, but its shards cover "
                         f"{sum(hi - lo for lo, hi in spans)} of {n} prompts; {fix}")
    return manifest


def _open_manifest(folder: Path, key: str, key_src: dict, model: Model, n: int, recompute: bool,
                   locked: bool = True, shards: Sequence[tuple[int, int]] = ()) -> dict:
    """The folder's manifest (checked), or a fresh one. Called with the folder's exclusive lock held
    (``locked=False`` where the file system has no locks: stray files are then left alone). Shard entries
    that the other processes of an interrupted multi-process run left beside their shards are taken in."""
    path = folder / "manifest.json"
    if locked:  # leftovers of a killed writer: no live run can own them, since we hold the lock
        for stray in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                stray.unlink()
    fix = "pass recompute=True to capture() to rebuild the cache"
    if path.is_file() and not recompute:
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"cache manifest '{path}' is not valid JSON ({e}); {fix}") from e
        _check_manifest(manifest, path, fix)
        if manifest["key"] != key or manifest["n_prompts"] != n or manifest["layers"] != key_src["layers"] \
                or manifest["dtype"] != key_src["dtype"]:
            raise CacheError(f"cache folder '{folder}' belongs to other inputs (its manifest's key, prompt count, "
                             f"layers or dtype differ from this run's); {fix}")
        if _adopt_entries(folder, manifest, shards):
            _atomic_json(path, manifest)
        return manifest
    for old in [*folder.glob("shard_*.safetensors"), *folder.glob(f"{ENTRY_PREFIX}*.json")]:
        old.unlink()
    manifest = {"format": FORMAT, "key": key, **key_src, "source": model.source, "n_prompts": n,
                "d_model": model.d_model, "versions": _versions(), "created": time.time(),
                "shards": [], "complete": False}
    _atomic_json(path, manifest)
    return manifest


def _entry_name(span: tuple[int, int]) -> str:
    return f"{ENTRY_PREFIX}{span[0]:08d}_{span[1]:08d}.json"


def _adopt_entries(folder: Path, manifest: dict, shards: Sequence[tuple[int, int]]) -> bool:
    """Move the ``.entry-*.json`` files other processes wrote beside their shards into ``manifest`` (in
    memory; the caller writes it), each checked as a manifest entry is; an entry that does not fit is
    dropped with a `CacheWarning` and its shard recomputed. Returns whether the manifest changed."""
    wanted = set(shards)
    listed = {tuple(e["prompts"]) for e in manifest["shards"]}
    added = []
    for file in sorted(folder.glob(f"{ENTRY_PREFIX}*.json")):
        try:
            entry = json.loads(file.read_bytes())
            _check_manifest({**manifest, "shards": [entry], "complete": False}, file, "")
            span = tuple(entry["prompts"])
            if span not in wanted or span in listed:
                raise CacheError(f"prompts {span[0]}-{span[1]} are not a missing shard of this run")
        except (OSError, ValueError) as e:  # CacheError and JSONDecodeError are ValueErrors
            warnings.warn(f"ignoring the shard entry '{file}' ({str(e).rstrip('; ')}); its shard is recomputed",
                          CacheWarning, stacklevel=3)
        else:
            added.append(entry)
            listed.add(span)
        with contextlib.suppress(OSError):
            file.unlink()
    if added:
        manifest["shards"] = sorted([*manifest["shards"], *added], key=lambda s: s["prompts"][0])
    return bool(added)


def _checked_manifest(folder: Path, fix: str) -> dict:
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"cache manifest '{path}' is not valid JSON ({e}); {fix}") from e
    except OSError as e:
        raise CacheError(f"cannot read the cache manifest '{path}' ({e.strerror or e}); {fix}") from e
    return _check_manifest(manifest, path, fix)


def _read_done_shards(folder: Path, manifest: dict, shards: list[tuple[int, int]], layers: list[int], d_model: int,
                      dtype: torch.dtype, load: bool = True) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Check every shard the manifest lists (its sha256 included) and read it (``load=False``: only its row
    metadata). A missing, truncated or corrupt one (the workbench wrote it) is dropped from the manifest
    with a `CacheWarning` so that this run recomputes it."""
    fix = "pass recompute=True to capture() to rebuild the cache"
    done, damaged = {}, []
    for entry in manifest["shards"]:
        span = tuple(entry["prompts"])
        if span not in shards:
            raise CacheError(f"cache manifest '{folder / 'manifest.json'}' lists prompts {span[0]}-{span[1]}, which is "
                             f"not a shard of this run; {fix}")
        try:
            done[span] = _read_shard(folder, entry, layers=layers, d_model=d_model, dtype=dtype, fix=fix,
                                     read=None if load else ())
        except _ShardDamaged as e:
            damaged.append(entry)
            warnings.warn(f"{e}; recomputing it", CacheWarning, stacklevel=3)
    if damaged:
        manifest["shards"] = [e for e in manifest["shards"] if e not in damaged]
        manifest["complete"] = False
        _atomic_json(folder / "manifest.json", manifest)
    return done


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _write_failed(folder: Path, what: str, e: Exception, need: int | None = None) -> CacheError:
    try:
        free = _human(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        size = f"; it needs about {_human(need)}" if need else ""
        return CacheError(f"no space left on the disk of cache folder '{folder}' while writing {what} ({free} free"
                          f"{size}). Free some space or pass cache= a folder on a larger disk, then rerun: shards "
                          "already written are kept and the run resumes from the first missing one")
    return CacheError(f"could not write {what} in cache folder '{folder}' ({e}; {free} free). Check that the folder "
                      "is writable, then rerun: shards already written are kept")


def _write_shard(folder: Path, manifest: dict, span: tuple[int, int], tensors: dict[str, Tensor],
                 entry_file: bool = False) -> None:
    """Write one shard and list it: in the manifest, or (``entry_file``: a process other than the main one,
    which alone writes the manifest) in an entry file beside it that the main process takes in."""
    name = _shard_name(span)
    tmp = folder / f".{name}.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp))
        digest = file_sha256(tmp)
        os.replace(tmp, folder / name)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        raise _write_failed(folder, f"shard '{name}'", e, need) from e
    entry = {"file": name, "prompts": list(span), "rows": int(tensors["prompt_index"].numel()), "sha256": digest}
    if entry_file:
        _atomic_json(folder / _entry_name(span), entry)
        return
    # the manifest lists the shard only once that listing is on disk: a failed write leaves no stale entry
    listed = sorted([*manifest["shards"], entry], key=lambda s: s["prompts"][0])
    _atomic_json(folder / "manifest.json", {**manifest, "shards": listed})
    manifest["shards"] = listed


def _atomic_json(path: Path, obj: Any) -> None:
    try:
        atomic_write_text(path, json.dumps(obj, indent=1))
    except OSError as e:
        for stray in path.parent.glob(f".{path.name}.tmp{os.getpid()}*"):
            stray.unlink(missing_ok=True)
        raise _write_failed(path.parent, f"'{path.name}'", e) from e


# safetensors' names of the dtypes a shard holds, as torch prints them
_ST_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
              "I64": "torch.int64", "I32": "torch.int32"}


def _read_shard(folder: Path, entry: dict, *, layers: Sequence[int], d_model: int | None, dtype: Any,
                fix: str, read: Sequence[int] | None = None, verify: bool = True) -> dict[str, Tensor]:
    """One shard's tensors, checked against its manifest entry (hash, keys, shapes, row count, prompt range).

    ``read``: the layers to load (default every one of ``layers``; ``()`` loads only the row metadata; the
    others are checked from the file's header). ``verify=False`` skips the sha256, for a lazy reader that
    checks it on first use."""
    path = folder / entry["file"]
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CacheError(f"cache shard '{path}' is not a plain file (the workbench writes only plain files); {fix}")
    if not path.is_file():
        raise _ShardDamaged(f"cache shard '{path}' is missing")
    if verify and file_sha256(path) != entry["sha256"]:
        raise _ShardDamaged(f"cache shard '{path}' is corrupt (sha256 mismatch: truncated or overwritten)")
    lo, hi = entry["prompts"]
    where = f"cache shard '{path}' (manifest entry for prompts {lo}-{hi})"
    need = [*META_KEYS, *(f"layer_{i}" for i in layers)]
    load = [*META_KEYS, *(f"layer_{i}" for i in (layers if read is None else read))]
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in need if k not in keys]
            if missing:
                raise CacheError(f"{where} has no tensor {missing[0]!r}; {fix}")
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in need}
            rows = entry["rows"]
            for k, (shape, kind) in header.items():
                if len(shape) != (2 if k.startswith("layer_") else 1) or shape[0] != rows:
                    raise CacheError(f"{where}: {k!r} has shape {shape}, but the entry records {rows} rows; {fix}")
                kind = _ST_DTYPES.get(kind, kind)
                if k.startswith("layer_") and ((d_model is not None and shape[1] != d_model)
                                               or (dtype is not None and kind != str(dtype))):
                    raise CacheError(f"{where}: {k!r} is {shape} {kind}, expected d_model={d_model} and {dtype}; "
                                     f"{fix}")
            tensors = {k: f.get_tensor(k) for k in load}
    except (SafetensorError, OSError) as e:
        raise _ShardDamaged(f"cache shard '{path}' is unreadable ({e})") from e
    index = tensors["prompt_index"]
    if rows and (int(index.min()) < lo or int(index.max()) >= hi or bool((index.diff() < 0).any())):
        raise CacheError(f"{where} holds rows of prompts {int(index.min())}-{int(index.max())}, outside {lo}-{hi - 1}: "
                         f"the file belongs to another shard; {fix}")
    return tensors


def load_activations(folder: str | os.PathLike, lazy: bool | None = None,
                     max_memory: int | str | None = None) -> Activations:
    """Read a cache folder written by `capture`; the manifest and every shard's rows, prompts and sha256 are
    checked (for a lazy result, each shard's sha256 on its first read).

    ``lazy``: None reads the activations into memory when they fit ``max_memory`` (bytes or ``"2GB"``;
    default a quarter of this machine's RAM) and returns lazy `Activations` otherwise; True or False forces
    either. A lazy result keeps ``prompt_index``, ``position`` and ``token_id`` in memory (24 bytes a row)."""
    folder = Path(folder)
    budget = _memory_bytes(max_memory)
    if lazy is not None and not isinstance(lazy, bool):
        raise InterpError(f"lazy={lazy!r}: pass True, False or None")
    path = folder / "manifest.json"
    if not path.is_file():
        raise CacheError(f"no manifest.json in '{folder}': not an activation cache folder")
    fix = "rebuild it by rerunning the capture() that wrote it with recompute=True"
    with _FolderLock(folder, shared=True):
        manifest = _checked_manifest(folder, fix)
        if not manifest["complete"]:
            raise CacheError(f"cache '{folder}' is incomplete (an interrupted run); rerun capture() to resume it")
        layers = manifest["layers"]
        dtype = getattr(torch, manifest["dtype"].removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CacheError(f"cache manifest '{path}': 'dtype' is {manifest['dtype']!r}, not a floating-point torch "
                             f"dtype; {fix}")
        entries = sorted(manifest["shards"], key=lambda e: e["prompts"][0])
        d_model = manifest.get("d_model") if _is(manifest.get("d_model"), int) else None
        if d_model is None and entries:  # an old manifest: the width from the first shard's header
            try:
                with safe_open(str(folder / entries[0]["file"]), framework="pt") as f:
                    d_model = int(f.get_slice(f"layer_{layers[0]}").get_shape()[-1])
            except (SafetensorError, OSError, IndexError) as e:
                raise CacheError(f"cannot read the width of the activations in '{folder}' ({e}); {fix}") from e
        rows = [int(e["rows"]) for e in entries]
        size = sum(rows) * len(layers) * (d_model or 0) * dtype.itemsize
        make_lazy = lazy if lazy is not None else size > budget
        parts = []
        for entry in entries:
            try:
                parts.append(_read_shard(folder, entry, layers=layers, d_model=d_model, dtype=manifest["dtype"],
                                         fix=fix, read=() if make_lazy else None, verify=not make_lazy))
            except _ShardDamaged as e:
                raise CacheError(f"{e}; rerun the capture() that wrote it: it recomputes damaged shards") from e
    info = {"n_prompts": manifest["n_prompts"], "positions": manifest["positions"], "model_name": manifest["model"],
            "path": folder, "meta": {"layers": layers, "exclude": manifest["exclude"], "dtype": manifest["dtype"],
                                     "shard_rows": rows}}

    def join(key: str) -> Tensor:
        return parts[0][key] if len(parts) == 1 else torch.cat([p[key] for p in parts])

    held = tuple(join(k) if parts else torch.empty(0, dtype=torch.long) for k in META_KEYS)
    if make_lazy:
        store = _ShardStore(folder, entries, layers, d_model or 0, dtype, budget, held)
        return Activations(acts=_LazyLayers(store), prompt_index=held[0], position=held[1], token_id=held[2],
                           _store=store, **info)
    acts = {}
    for i in layers:  # one layer at a time, each shard's copy freed once joined
        acts[i] = join(f"layer_{i}")
        for p in parts:
            del p[f"layer_{i}"]
    return Activations(acts=acts, prompt_index=held[0], position=held[1], token_id=held[2], **info)
