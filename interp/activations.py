"""The activation store: the on-disk cache format (safetensors shards, a checked ``manifest.json``, a folder
lock) and `Activations`, the result type, held in memory or read lazily one shard at a time. `interp.capture`
writes its shards through these functions; `load_activations` reads a folder back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import operator
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from interp._errors import InterpError
from interp._io import _path, atomic_write_text, file_sha256, release_freed_memory
from interp.models import Model

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent runs into one folder are not serialised
    fcntl = None

FORMAT = "interp.activations/1"
LOCK_FILE = ".lock"  # flock()ed by the run using a cache folder; never deleted (see `_FolderLock`)
ENTRY_PREFIX = ".entry-"  # a shard's manifest entry, written by a process other than the main one
META_KEYS = ("prompt_index", "position", "token_id")


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


def _count(name: str, value: Any, means: str) -> int:
    """A whole number >= 1 (ints of any integer type), or an `InterpError` naming ``name``."""
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


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from interp import __version__

    return {"interp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


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
    folder = _path(folder, "folder")
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
