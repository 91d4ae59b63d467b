"""Stage 2 of the loop: residual-stream activations, captured with hooks and cached on disk.

`capture()` hooks the decoder layers you name, keeps only the token positions you ask for, stops the
forward pass after the last requested layer, and (with ``cache=``) writes safetensors shards plus a
``manifest.json`` so that a rerun reads them back and an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
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

FORMAT = "interp.activations/1"
DEFAULT_CACHE_ROOT = Path("sae_cache")
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


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "model"


def capture(model: Model, prompts: Sequence[Prompt | str], *, layers: Any, positions: Positions = "last",
            cache: str | os.PathLike | bool | None = None, batch_size: int | None = None,
            exclude: Sequence[str] = (), dtype: Any = None, shard_size: int = 256,
            recompute: bool = False, progress: bool = True) -> Activations:
    """Capture residual-stream activations (``blocks.{L}.hook_resid_post``) at the chosen positions.

    ``cache``: ``True`` for ``sae_cache/``, or a folder; each (model, prompts, layers, positions, dtype)
    gets its own subfolder of safetensors shards and a ``manifest.json``. ``exclude`` (with
    ``positions="all"``) drops ``"special"`` and/or ``"image"`` tokens; padding is never kept.
    """
    items = [_as_prompt(p) for p in prompts]
    if not items:
        raise InterpError("prompts is empty: pass at least one prompt to capture")
    layer_list = model.check_layers(layers)
    if not (callable(positions) or positions in ("last", "all", "question")):
        raise InterpError(f"positions={positions!r}: use 'last', 'all', 'question' or a callable")
    bad = set(exclude) - {"special", "image"}
    if bad:
        raise InterpError(f"exclude={sorted(bad)}: only 'special' and 'image' can be excluded")
    out_dtype = as_dtype(dtype) if dtype is not None else model.dtype
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    if batch_size < 1 or shard_size < 1:
        raise InterpError("batch_size and shard_size must be >= 1")
    label = _positions_label(positions)
    shards = [(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)]

    folder = None
    manifest: dict[str, Any] | None = None
    if cache not in (None, False):
        root = DEFAULT_CACHE_ROOT if cache is True else Path(cache)
        key_src = {"model": model.name, "weights": model.fingerprint, "prompts": _prompt_digest(items),
                   "layers": layer_list, "positions": label, "exclude": sorted(exclude),
                   "dtype": str(out_dtype), "shard_size": shard_size, "format": FORMAT}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
        folder = root / f"{_slug(model.name)}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = _open_manifest(folder, key, key_src, model, len(items), recompute)

    done = {tuple(s["prompts"]): s for s in manifest["shards"]} if manifest else {}
    todo = [s for s in shards if s not in done]
    results: dict[tuple[int, int], dict[str, Tensor]] = {}
    if todo:
        bar = tqdm(total=sum(e - s for s, e in todo), desc=f"capture {model.name}", unit="prompt",
                   disable=not progress, leave=False)
        try:
            results.update(_run_shards(model, items, todo, layer_list, positions, exclude, out_dtype, batch_size,
                                       folder, manifest, bar))
        finally:
            bar.close()
    if manifest is not None:
        manifest["complete"] = True
        _atomic_json(folder / "manifest.json", manifest)
    for s, e in shards:
        if (s, e) not in results:
            results[(s, e)] = _read_shard(folder, done[(s, e)])
    parts = [results[s] for s in shards]
    join = (lambda key: parts[0][key]) if len(parts) == 1 else (lambda key: torch.cat([p[key] for p in parts]))
    return Activations(acts={i: join(f"layer_{i}") for i in layer_list}, prompt_index=join("prompt_index"),
                       position=join("position"), token_id=join("token_id"), n_prompts=len(items),
                       positions=label, model_name=model.name, path=folder,
                       meta={"layers": layer_list, "exclude": sorted(exclude), "dtype": str(out_dtype)})


def _prepare_batch(model: Model, items: list[Prompt], lo: int, hi: int, positions: Positions,
                   exclude: Sequence[str], pin: bool) -> tuple[Batch, Tensor, dict[str, Tensor]]:
    """Tokenise prompts ``lo:hi`` on the host: (batch, selection, row metadata)."""
    batch = model.encode(items[lo:hi], device="cpu")
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


def _open_manifest(folder: Path, key: str, key_src: dict, model: Model, n: int, recompute: bool) -> dict:
    path = folder / "manifest.json"
    for stray in folder.glob(".*.tmp*"):  # leftovers of a killed writer: never trusted
        stray.unlink(missing_ok=True)
    if path.is_file() and not recompute:
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"cache manifest '{path}' is corrupt ({e}); delete '{folder}' or pass "
                             "recompute=True") from e
        if manifest.get("key") != key:
            raise CacheError(f"cache folder '{folder}' belongs to other inputs; delete it or pass recompute=True")
        for s in manifest["shards"]:
            f = folder / s["file"]
            if not f.is_file():
                raise CacheError(f"cache shard '{f}' is missing (manifest lists it); delete '{folder}' or pass "
                                 "recompute=True to rebuild it")
        return manifest
    for old in folder.glob("shard_*.safetensors"):
        old.unlink()
    manifest = {"format": FORMAT, "key": key, **key_src, "source": model.source, "n_prompts": n,
                "d_model": model.d_model, "versions": _versions(), "created": time.time(),
                "shards": [], "complete": False}
    _atomic_json(path, manifest)
    return manifest


def _write_shard(folder: Path, manifest: dict, span: tuple[int, int], tensors: dict[str, Tensor]) -> None:
    name = f"shard_{span[0]:08d}_{span[1]:08d}.safetensors"
    tmp = folder / f".{name}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    digest = file_sha256(tmp)
    os.replace(tmp, folder / name)
    manifest["shards"].append({"file": name, "prompts": list(span), "rows": int(tensors["prompt_index"].numel()),
                               "sha256": digest})
    manifest["shards"].sort(key=lambda s: s["prompts"][0])
    _atomic_json(folder / "manifest.json", manifest)


def _read_shard(folder: Path, entry: dict) -> dict[str, Tensor]:
    path = folder / entry["file"]
    if not path.is_file():
        raise CacheError(f"cache shard '{path}' is missing; delete '{folder}' or pass recompute=True")
    if file_sha256(path) != entry["sha256"]:
        raise CacheError(f"cache shard '{path}' is corrupt (sha256 mismatch); delete it and rerun to "
                         "recompute it, or pass recompute=True")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CacheError(f"cache shard '{path}' is corrupt ({e}); delete it or pass recompute=True") from e


def load_activations(folder: str | os.PathLike) -> Activations:
    """Read a cache folder written by `capture` (checks every shard's hash)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CacheError(f"no manifest.json in '{folder}': not an activation cache folder")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise CacheError(f"cache '{folder}' is incomplete (an interrupted run); rerun capture() to resume it")
    parts = [_read_shard(folder, s) for s in manifest["shards"]]
    acts = {i: torch.cat([p[f"layer_{i}"] for p in parts]) for i in manifest["layers"]}
    return Activations(acts=acts, prompt_index=torch.cat([p["prompt_index"] for p in parts]),
                       position=torch.cat([p["position"] for p in parts]),
                       token_id=torch.cat([p["token_id"] for p in parts]), n_prompts=manifest["n_prompts"],
                       positions=manifest["positions"], model_name=manifest["model"], path=folder,
                       meta={"layers": manifest["layers"], "exclude": manifest["exclude"], "dtype": manifest["dtype"]})
