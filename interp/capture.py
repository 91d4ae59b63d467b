"""Stage 2 of the loop: residual-stream activations, captured with hooks and cached on disk.

`capture()` hooks the decoder layers you name, keeps only the token positions you ask for, stops the
forward pass after the last requested layer, and (with ``cache=``) writes safetensors shards plus a
``manifest.json`` so that a rerun reads them back and an interrupted run resumes.
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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp._errors import InterpError
from interp._io import atomic_write_text, file_sha256
from interp.models import Batch, Model, Prompt, _as_prompt, as_dtype

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent runs into one folder are not serialised
    fcntl = None

FORMAT = "interp.activations/1"
DEFAULT_CACHE_ROOT = Path("sae_cache")
LOCK_FILE = ".lock"  # flock()ed by the run using a cache folder; never deleted (see `_FolderLock`)
Positions = Literal["last", "all", "question"] | Callable[..., Any]


class TokenInfo(NamedTuple):
    """What a ``positions=`` callable sees for one prompt (all tensors are [pos], padding removed)."""

    input_ids: Tensor
    tokens: list[str]
    question_mask: Tensor
    special_mask: Tensor
    image_mask: Tensor


class CacheError(InterpError):
    """The on-disk activation cache is missing a piece or is corrupt."""


class _ShardDamaged(CacheError):
    """A listed shard is missing, truncated or fails its hash. The workbench wrote it, so `capture`
    recomputes it (with a `CacheWarning`) instead of failing."""


class CacheWarning(UserWarning):
    """A cache shard was recomputed, or a run waited for another run on the same cache folder."""


@dataclass(frozen=True, eq=False)
class Activations:
    """Captured activations: ``acts[layer]`` is ``[n_rows, d_model]``; each row knows its prompt and position."""

    acts: dict[int, Tensor]
    prompt_index: Tensor  # [n_rows] index into the prompt list
    position: Tensor  # [n_rows] token position inside that prompt's input
    token_id: Tensor  # [n_rows] the token at that position
    n_prompts: int
    positions: str
    model_name: str = ""
    path: Path | None = None  # the cache folder, when cached
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.acts)

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.acts:
            raise InterpError(f"layer {layer} was not captured; captured layers are {self.layers}")
        return self.acts[layer]

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    def per_prompt(self, layer: int) -> list[Tensor]:
        """Rows of ``layer`` split by prompt (a list of ``[n_pos_i, d_model]`` tensors)."""
        counts = torch.bincount(self.prompt_index, minlength=self.n_prompts).tolist()
        return list(torch.split(self[layer], counts))

    def summary(self, groups: dict[str, Sequence[int]] | None = None):
        """Per layer (and group of prompt indices): rows, mean L2 norm, and the cosine between group means.

        ``groups`` like ``{"medical": range(0, 100), "general": range(100, 200)}``; default one group."""
        import pandas as pd

        groups = groups or {"all": range(self.n_prompts)}
        member = {name: torch.isin(self.prompt_index, torch.as_tensor(list(idx))) for name, idx in groups.items()}
        records = []
        for layer in self.layers:
            x = self[layer].double()
            means = {}
            for name, m in member.items():
                if not m.any():
                    raise InterpError(f"group {name!r} selects no captured rows")
                means[name] = x[m].mean(0)
                records.append({"layer": layer, "group": name, "rows": int(m.sum()),
                                "mean_norm": float(x[m].norm(dim=-1).mean())})
            if len(means) == 2:
                a, b = means.values()
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
                "path": str(self.path) if self.path else None, "d_model": self.d_model}

    @property
    def d_model(self) -> int:
        return int(next(iter(self.acts.values())).shape[-1]) if self.acts else 0

    def __repr__(self) -> str:
        where = f", cached at '{self.path}'" if self.path else ""
        dtype = next(iter(self.acts.values())).dtype if self.acts else None
        return (f"Activations({self.model_name!r}, layers={self.layers}, rows={len(self)} from "
                f"{self.n_prompts} prompts, positions={self.positions!r}, d_model={self.d_model}, {dtype}{where})")


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


def capture(model: Model, prompts: Sequence[Prompt | str], *, layers: Any, positions: Positions = "last",
            cache: str | os.PathLike | bool | None = None, batch_size: int | None = None,
            exclude: Sequence[str] | str = (), dtype: Any = None, shard_size: int = 256,
            recompute: bool = False, progress: bool = True) -> Activations:
    """Capture residual-stream activations (``blocks.{L}.hook_resid_post``) at the chosen positions.

    ``cache``: ``True`` for ``sae_cache/``, or a folder; each (model, prompts, layers, positions, dtype)
    gets its own subfolder of safetensors shards and a ``manifest.json``. A run holds a lock on that
    subfolder, so a second run with the same inputs waits and then reads what the first wrote; a shard
    found damaged is recomputed with a `CacheWarning`. ``exclude`` (with ``positions="all"``) drops
    ``"special"`` and/or ``"image"`` tokens; padding is never kept.
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
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    batch_size, shard_size = _count("batch_size", batch_size), _count("shard_size", shard_size)
    label = _positions_label(positions)
    shards = [(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)]

    folder = None
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

    with _FolderLock(folder) if folder is not None else contextlib.nullcontext() as lock:
        manifest: dict[str, Any] | None = None
        results: dict[tuple[int, int], dict[str, Tensor]] = {}
        if folder is not None:
            manifest = _open_manifest(folder, key, key_src, model, len(items), recompute, locked=lock.locked)
            results = _read_done_shards(folder, manifest, shards, layer_list, model.d_model, out_dtype)
        todo = [s for s in shards if s not in results]
        if todo:
            bar = tqdm(total=sum(e - s for s, e in todo), desc=f"capture {model.name}", unit="prompt",
                       disable=not progress, leave=False)
            try:
                results.update(_run_shards(model, items, todo, layer_list, positions, exclude, out_dtype,
                                           batch_size, folder, manifest, bar))
            finally:
                bar.close()
        if manifest is not None and not manifest["complete"]:
            manifest["complete"] = True
            _atomic_json(folder / "manifest.json", manifest)
    parts = [results[s] for s in shards]
    join = (lambda key: parts[0][key]) if len(parts) == 1 else (lambda key: torch.cat([p[key] for p in parts]))
    return Activations(acts={i: join(f"layer_{i}") for i in layer_list}, prompt_index=join("prompt_index"),
                       position=join("position"), token_id=join("token_id"), n_prompts=len(items),
                       positions=label, model_name=model.name, path=folder,
                       meta={"layers": layer_list, "exclude": sorted(exclude), "dtype": str(out_dtype)})


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


_COUNT_MEANS = {"batch_size": "prompts per forward pass; None picks 16 on a GPU, 8 on the CPU",
                "shard_size": "prompts per cache shard; the default is 256"}


def _count(name: str, value: Any) -> int:
    """A whole number >= 1 (ints of any integer type), or an `InterpError` naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise InterpError(f"{name}={value!r}: pass a whole number >= 1 ({_COUNT_MEANS[name]})") from None
    if n < 1:
        raise InterpError(f"{name}={n}: must be >= 1 ({_COUNT_MEANS[name]})")
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


def _prepare_batch(model: Model, items: list[Prompt], lo: int, hi: int, positions: Positions,
                   exclude: Sequence[str], pin: bool) -> tuple[Batch, Tensor, dict[str, Tensor]]:
    """Tokenise prompts ``lo:hi`` on the host: (batch, selection, row metadata)."""
    batch = model.encode(items[lo:hi], device="cpu", first_index=lo)
    sel = position_mask(model, batch, positions, exclude)
    rows, pos = sel.nonzero(as_tuple=True)  # row-major: prompt order, then position order
    meta = {"prompt_index": rows + lo, "position": pos, "token_id": batch.input_ids[rows, pos]}
    return (batch.to("cpu", pin=True) if pin else batch), sel, meta


class _ShardBuffer:
    """Host tensors of one shard, allocated once every batch of it is tokenised (rows are then known).

    Only the copier (or, on the CPU, the main thread) calls `copy`; it allocates on first use, so the
    device starts on the first batch without waiting for the whole shard to be tokenised."""

    def __init__(self, batches: list[Future], layers: list[int], d_model: int, dtype: torch.dtype):
        self.batches, self.layers, self.d_model, self.dtype = batches, layers, d_model, dtype
        self.out: dict[str, Tensor] | None = None
        self.starts: list[int] = []

    def _allocate(self) -> dict[str, Tensor]:
        metas = [f.result()[2] for f in self.batches]
        counts = [int(m["position"].numel()) for m in metas]
        self.starts = [sum(counts[:j]) for j in range(len(counts) + 1)]
        out = {key: torch.cat([m[key] for m in metas]) for key in ("prompt_index", "position", "token_id")}
        out |= {f"layer_{i}": torch.empty(self.starts[-1], self.d_model, dtype=self.dtype) for i in self.layers}
        return out

    def copy(self, j: int, rows: Tensor, done: Any = None) -> None:
        """Copy batch ``j``'s rows ``[n_layers, n_rows, d_model]`` into this shard's host tensors.

        On a GPU, ``rows`` is a page-locked staging tensor that a side stream is filling; ``done`` is the
        event recorded after that copy, and is waited on here before the rows are read."""
        if self.out is None:
            self.out = self._allocate()
        if done is not None:
            done.synchronize()
        lo, hi = self.starts[j], self.starts[j + 1]
        for k, i in enumerate(self.layers):
            self.out[f"layer_{i}"][lo:hi].copy_(rows[k])


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
                  span: tuple[int, int]) -> dict[str, Tensor]:
    for f in copies:
        f.result()
    if shard.out is None:
        shard.out = shard._allocate()
    if folder is not None:
        _write_shard(folder, manifest, span, shard.out)
    return shard.out


def _run_shards(model: Model, items: list[Prompt], todo: list[tuple[int, int]], layers: list[int],
                positions: Positions, exclude: Sequence[str], out_dtype: torch.dtype, batch_size: int,
                folder: Path | None, manifest: dict | None, bar: tqdm) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Keep the device busy: batches are tokenised ahead on one thread, rows come back on a side stream
    through a copier thread, and finished shards are written by a third."""
    cuda = model.device.type == "cuda"
    stream = torch.cuda.Stream(model.device) if cuda else None
    tokeniser, copier, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def queue(span: tuple[int, int]) -> list[Future]:
        return [tokeniser.submit(_prepare_batch, model, items, b, min(b + batch_size, span[1]), positions, exclude,
                                 cuda) for b in range(span[0], span[1], batch_size)]

    finished: dict[tuple[int, int], Future] = {}
    try:
        queued = queue(todo[0])
        for k, span in enumerate(todo):
            batches = queued
            if k + 1 < len(todo):
                queued = queue(todo[k + 1])  # one shard of look-ahead bounds host memory
            shard = _ShardBuffer(batches, layers, model.d_model, out_dtype)
            copies = []
            with torch.inference_mode():
                for j, prepared in enumerate(batches):
                    batch, sel, _meta = prepared.result()
                    buffer, _ = _run_hooked(model, batch.to(model.device), layers, sel, out_dtype)
                    if cuda:
                        staged, done = _stage(buffer, stream)
                        copies.append(copier.submit(shard.copy, j, staged, done))
                    else:
                        shard.copy(j, buffer)
                    bar.update(int(batch.lengths.numel()))
            finished[span] = writer.submit(_finish_shard, copies, shard, folder, manifest, span)
            for f in [f for f in finished.values() if f.done()]:
                f.result()  # surface a failed copy or write now, not at the end
        return {span: f.result() for span, f in finished.items()}
    finally:
        for pool in (tokeniser, copier, writer):
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
                   locked: bool = True) -> dict:
    """The folder's manifest (checked), or a fresh one. Called with the folder's exclusive lock held
    (``locked=False`` where the file system has no locks: stray files are then left alone)."""
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
        return manifest
    for old in folder.glob("shard_*.safetensors"):
        old.unlink()
    manifest = {"format": FORMAT, "key": key, **key_src, "source": model.source, "n_prompts": n,
                "d_model": model.d_model, "versions": _versions(), "created": time.time(),
                "shards": [], "complete": False}
    _atomic_json(path, manifest)
    return manifest


def _read_done_shards(folder: Path, manifest: dict, shards: list[tuple[int, int]], layers: list[int], d_model: int,
                      dtype: torch.dtype) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Read every shard the manifest lists. A missing, truncated or corrupt one (the workbench wrote it) is
    dropped from the manifest with a `CacheWarning` so that this run recomputes it."""
    fix = "pass recompute=True to capture() to rebuild the cache"
    done, damaged = {}, []
    for entry in manifest["shards"]:
        span = tuple(entry["prompts"])
        if span not in shards:
            raise CacheError(f"cache manifest '{folder / 'manifest.json'}' lists prompts {span[0]}-{span[1]}, which is "
                             f"not a shard of this run; {fix}")
        try:
            done[span] = _read_shard(folder, entry, layers=layers, d_model=d_model, dtype=dtype, fix=fix)
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


def _write_shard(folder: Path, manifest: dict, span: tuple[int, int], tensors: dict[str, Tensor]) -> None:
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


def _read_shard(folder: Path, entry: dict, *, layers: Sequence[int], d_model: int | None, dtype: Any,
                fix: str) -> dict[str, Tensor]:
    """One shard's tensors, checked against its manifest entry (hash, keys, row count, prompt range)."""
    path = folder / entry["file"]
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CacheError(f"cache shard '{path}' is not a plain file (the workbench writes only plain files); {fix}")
    if not path.is_file():
        raise _ShardDamaged(f"cache shard '{path}' is missing")
    if file_sha256(path) != entry["sha256"]:
        raise _ShardDamaged(f"cache shard '{path}' is corrupt (sha256 mismatch: truncated or overwritten)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _ShardDamaged(f"cache shard '{path}' is unreadable ({e})") from e
    lo, hi = entry["prompts"]
    where = f"cache shard '{path}' (manifest entry for prompts {lo}-{hi})"
    need = ["prompt_index", "position", "token_id", *(f"layer_{i}" for i in layers)]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise CacheError(f"{where} has no tensor {missing[0]!r}; {fix}")
    rows = entry["rows"]
    for k in need:
        t = tensors[k]
        if t.dim() != (2 if k.startswith("layer_") else 1) or t.shape[0] != rows:
            raise CacheError(f"{where}: {k!r} has shape {tuple(t.shape)}, but the entry records {rows} rows; {fix}")
        if k.startswith("layer_") and ((d_model is not None and t.shape[1] != d_model)
                                       or (dtype is not None and str(t.dtype) != str(dtype))):
            raise CacheError(f"{where}: {k!r} is {tuple(t.shape)} {t.dtype}, expected d_model={d_model} and {dtype}; "
                             f"{fix}")
    index = tensors["prompt_index"]
    if rows and (int(index.min()) < lo or int(index.max()) >= hi or bool((index.diff() < 0).any())):
        raise CacheError(f"{where} holds rows of prompts {int(index.min())}-{int(index.max())}, outside {lo}-{hi - 1}: "
                         f"the file belongs to another shard; {fix}")
    return tensors


def load_activations(folder: str | os.PathLike) -> Activations:
    """Read a cache folder written by `capture` (checks the manifest and every shard's hash, rows and prompts)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CacheError(f"no manifest.json in '{folder}': not an activation cache folder")
    fix = "rebuild it by rerunning the capture() that wrote it with recompute=True"
    with _FolderLock(folder, shared=True):
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"cache manifest '{path}' is not valid JSON ({e}); {fix}") from e
        _check_manifest(manifest, path, fix)
        if not manifest["complete"]:
            raise CacheError(f"cache '{folder}' is incomplete (an interrupted run); rerun capture() to resume it")
        d_model = manifest.get("d_model") if _is(manifest.get("d_model"), int) else None
        parts = []
        for entry in sorted(manifest["shards"], key=lambda e: e["prompts"][0]):
            try:
                parts.append(_read_shard(folder, entry, layers=manifest["layers"], d_model=d_model,
                                         dtype=manifest["dtype"], fix=fix))
            except _ShardDamaged as e:
                raise CacheError(f"{e}; rerun the capture() that wrote it: it recomputes damaged shards") from e
    acts = {i: torch.cat([p[f"layer_{i}"] for p in parts]) for i in manifest["layers"]}
    return Activations(acts=acts, prompt_index=torch.cat([p["prompt_index"] for p in parts]),
                       position=torch.cat([p["position"] for p in parts]),
                       token_id=torch.cat([p["token_id"] for p in parts]), n_prompts=manifest["n_prompts"],
                       positions=manifest["positions"], model_name=manifest["model"], path=folder,
                       meta={"layers": manifest["layers"], "exclude": manifest["exclude"], "dtype": manifest["dtype"]})
