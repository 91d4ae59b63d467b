"""sae-lens interop: a capture as the cached-activations dataset sae-lens trains from, and back.

The format is what sae-lens 6.54 writes in ``CacheActivationsRunner.run``/``_create_shard``
(``cache_activations_runner.py``) and reads in ``ActivationsStore.load_cached_activation_dataset`` and
``_load_raw_llm_batch_from_cached`` (``training/activations_store.py``): a Hugging Face ``datasets.Dataset``
saved with ``save_to_disk``, one row per sequence of ``context_size`` tokens, a column named by the hook
(``blocks.{L}.hook_resid_post``) of ``Array2D(shape=(context_size, d_in), dtype)`` and ``token_ids`` of
``Sequence(Value("int32"), length=context_size)``. We add two columns sae-lens ignores (``prompt_index``,
``position``, same shape as ``token_ids``) and ``interp_sae_lens.json`` so a round trip loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from interp._errors import ForeignFilesError, InterpError
from interp._io import (
    OUTPUT_MARKER,
    _path,
    atomic_write_text,
    mark_folder,
    read_json_object,
    read_marker,
    shown,
    usable_folder,
)
from interp.capture import Activations, load_activations
from interp.models import layer_arg

META_FILE = "interp_sae_lens.json"  # our metadata beside the dataset; sae-lens never reads it
_SAE_LENS_FILES = ("dataset_info.json", "state.json")  # what `Dataset.save_to_disk` writes (plus data-*.arrow)
EXPORT_KIND = "sae-lens export"  # the marker's ``kind`` in a folder export_sae_lens wrote
_ARROW_RE = re.compile(r"^data-\d{5}-of-\d{5}\.arrow$")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")
# Arrow has no bfloat16/float16-safe Array2D path in every reader; those are widened exactly to float32
_ARROW_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16"}


def hook_name(layer: int) -> str:
    """The TransformerLens / sae-lens name of the residual stream after decoder layer ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def export_sae_lens(acts_or_folder: Activations | str | os.PathLike, out_dir: str | os.PathLike, *, layer: int,
                    context_size: int | None = None) -> Path:
    """Write one layer of a capture as a sae-lens cached-activations folder (``cached_activations_path``).

    Rows are packed in capture order (prompt by prompt) into sequences of ``context_size`` tokens, as sae-lens
    packs a tokenized corpus; the last ``n_rows % context_size`` rows are dropped with a warning.
    ``context_size=None`` keeps one sequence per prompt, which needs every prompt to have the same number of
    rows. An ``out_dir`` that holds an earlier export (its marker says so, and it holds nothing else) is
    replaced; any other non-empty folder is refused with `ForeignFilesError`, a workbench folder of another kind
    (a train_lora run, a report folder) included.
    """
    import datasets

    acts = (acts_or_folder if isinstance(acts_or_folder, Activations)
            else load_activations(_path(acts_or_folder, "acts_or_folder")))
    layer = layer_arg(layer)
    if layer not in acts.layers:
        raise InterpError(f"layer {layer} is not in the capture {acts!r}: captured layers are {acts.layers}; "
                          f"pass layer= one of those, or capture layer {layer} first")
    out = usable_folder(out_dir, what="out_dir")
    _check_replaceable(out, out_dir)
    n_rows, d_model, dtype = len(acts), acts.d_model, acts.dtype
    ctx = _context_size(acts, context_size)
    n_seq = n_rows // ctx
    if n_seq == 0:
        raise InterpError(f"context_size={ctx} is more than the {n_rows} rows of the capture; pass a smaller "
                          "context_size (sae-lens needs at least one full sequence)")
    kept = n_seq * ctx
    if kept < n_rows:
        warnings.warn(f"export_sae_lens: {n_rows - kept} of {n_rows} rows do not fill a last sequence of "
                      f"context_size={ctx} and are dropped (sae-lens has no padding mask)", stacklevel=2)
    if dtype not in _ARROW_DTYPES and dtype != torch.bfloat16:
        raise InterpError(f"layer {layer} rows are {dtype}; export_sae_lens writes float16/32/64 or bfloat16 "
                          "(widened to float32). Capture with dtype=torch.float32")
    stored = dtype if dtype in _ARROW_DTYPES else torch.float32  # bf16 -> f32 is exact
    arrow_dtype = _ARROW_DTYPES[stored]
    if acts.token_id.numel() and (acts.token_id.min() < torch.iinfo(torch.int32).min
                                  or acts.token_id.max() > torch.iinfo(torch.int32).max):
        raise InterpError("token ids do not fit sae-lens' int32 token_ids column; this capture cannot be exported")

    name = hook_name(layer)
    features = datasets.Features({
        name: datasets.Array2D(shape=(ctx, d_model), dtype=arrow_dtype),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx),
        "prompt_index": datasets.Sequence(datasets.Value("int64"), length=ctx),
        "position": datasets.Sequence(datasets.Value("int64"), length=ctx),
    })

    def sequences():  # one shard at a time (a lazy capture is never read whole), packed across shard ends
        held: list[list[Tensor]] = [[], [], [], []]
        left = kept
        for chunk in acts.chunks([layer]):
            parts = (chunk.acts[layer].detach().cpu().to(stored), chunk.token_id.to(torch.int32),
                     chunk.prompt_index.to(torch.int64), chunk.position.to(torch.int64))
            for h, part in zip(held, parts, strict=True):
                h.append(part)
            buf = [torch.cat(h) for h in held]
            n = min(buf[0].shape[0] // ctx * ctx, left)
            for s in range(0, n, ctx):
                yield {name: buf[0][s:s + ctx].numpy(), "token_ids": buf[1][s:s + ctx].numpy(),
                       "prompt_index": buf[2][s:s + ctx].numpy(), "position": buf[3][s:s + ctx].numpy()}
            left -= n
            held = [[b[n:]] for b in buf]

    meta = {"format": "sae-lens cached activations (CacheActivationsRunner)", "sae_lens_tested": "6.54",
            "hook_name": name, "layer": layer, "context_size": ctx, "d_in": d_model, "n_sequences": n_seq,
            "dtype": arrow_dtype, "source_dtype": str(dtype), "rows_dropped": n_rows - kept,
            "n_prompts": acts.n_prompts, "positions": acts.positions, "model": acts.model_name,
            "source": str(acts.path) if acts.path else None}
    # everything is written inside a fresh hidden folder beside ``out`` (same file system, so the final renames
    # are atomic), and that folder, the only thing ever deleted, is removed whatever happens
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise InterpError(f"out_dir '{out_dir}' could not be written ({e.strerror or e}); choose another "
                          "folder") from None
    tmp, scratch = work / "export", work / "arrow"
    try:
        # a fingerprint of our own: datasets would otherwise hash the generator, and with it the capture
        ds = datasets.Dataset.from_generator(sequences, features=features, cache_dir=str(scratch),
                                             fingerprint=uuid.uuid4().hex)
        ds.save_to_disk(str(tmp), num_shards=1)
        del ds
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        mark_folder(tmp, what="sae-lens export folder", kind=EXPORT_KIND, layer=layer)
        _swap_in(tmp, out, out_dir, work)
    except OSError as e:
        raise InterpError(f"sae-lens export folder '{out_dir}' could not be written ({e.strerror or e}); "
                          "free space or choose another folder") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def import_sae_lens(folder: str | os.PathLike, *, hook_name: str | None = None) -> Activations:
    """Read a sae-lens cached-activations folder (ours or one `CacheActivationsRunner` wrote) as `Activations`.

    ``hook_name`` picks the column when the folder holds more than one ``blocks.{L}.hook_*``. Without our
    ``prompt_index``/``position`` columns each sequence counts as one prompt and positions run 0..context_size-1;
    without ``token_ids`` the token ids are -1.
    """
    import datasets

    path = _path(folder, "folder")
    if not (path / "state.json").is_file() or not (path / "dataset_info.json").is_file():
        raise InterpError(f"'{folder}' is not a sae-lens activation cache: no state.json/dataset_info.json from "
                          "datasets' save_to_disk. Pass the folder given to CacheActivationsRunner as "
                          "new_cached_activations_path, or one written by interp.export_sae_lens")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for a damaged folder
        raise InterpError(f"'{folder}' could not be read as a Hugging Face dataset ({type(e).__name__}: {e}); "
                          "re-export it or rerun the sae-lens CacheActivationsRunner that wrote it") from None
    if not isinstance(ds, datasets.Dataset):
        raise InterpError(f"'{folder}' holds a DatasetDict ({list(ds)}); pass the folder of one split")
    hooks = [c for c in ds.column_names if _HOOK_RE.match(c)]
    if hook_name is None:
        if len(hooks) != 1:
            raise InterpError(f"'{folder}' has {len(hooks)} hook columns ({shown(hooks) or 'none'}) among "
                              f"{ds.column_names}; pass hook_name= one of them" if hooks else
                              f"'{folder}' has no 'blocks.{{L}}.hook_*' column (columns {ds.column_names}): "
                              "not a sae-lens activation cache")
        hook_name = hooks[0]
    elif hook_name not in ds.column_names:
        raise InterpError(f"hook_name {hook_name!r} is not a column of '{folder}'; its columns are "
                          f"{ds.column_names}")
    m = _HOOK_RE.match(hook_name)
    if m is None:
        raise InterpError(f"hook_name {hook_name!r} has no layer number ('blocks.{{L}}.hook_...'); "
                          "interp Activations are per decoder layer")
    layer = int(m.group(1))
    feature = ds.features[hook_name]
    if not isinstance(feature, datasets.Array2D):
        raise InterpError(f"column {hook_name!r} of '{folder}' is {feature}, not the Array2D(context_size, d_in) "
                          "sae-lens writes")
    ctx, d_in = feature.shape
    meta = _read_meta(path / META_FILE)

    cols = [c for c in (hook_name, "token_ids", "prompt_index", "position") if c in ds.column_names]
    ds = ds.with_format("torch", columns=cols)
    n_seq = len(ds)
    data = ds[:] if n_seq else {}
    rows = data[hook_name].reshape(n_seq * ctx, d_in) if n_seq else torch.empty(0, d_in)
    src = meta.get("source_dtype")
    if src == "torch.bfloat16":
        rows = rows.to(torch.bfloat16)  # exported widened from bf16; narrowing back is exact

    def col(name: str, default: Tensor) -> Tensor:
        return data[name].reshape(-1).to(torch.int64) if name in data else default

    seq = torch.arange(n_seq).repeat_interleave(ctx)
    prompt_index = col("prompt_index", seq)
    position = col("position", torch.arange(ctx).repeat(n_seq))
    token_id = col("token_ids", torch.full((n_seq * ctx,), -1, dtype=torch.int64))
    seen = int(prompt_index.max()) + 1 if prompt_index.numel() else 0
    n_prompts = seen if meta.get("n_prompts") is None else meta["n_prompts"]
    if n_prompts < seen:
        raise InterpError(f"'{path / META_FILE}' says n_prompts={n_prompts}, but the rows reach prompt {seen - 1}: "
                          "the metadata belongs to another export; re-export the capture with "
                          "interp.export_sae_lens")
    return Activations(acts={layer: rows}, prompt_index=prompt_index, position=position, token_id=token_id,
                       n_prompts=n_prompts, positions=meta.get("positions") or "all",
                       model_name=meta.get("model") or "", path=path,
                       meta={"layers": [layer], "hook_name": hook_name, "context_size": ctx,
                             "format": "sae-lens", "dtype": str(rows.dtype),
                             "rows_dropped": meta.get("rows_dropped")})


# what import_sae_lens reads from our metadata file, and the types it needs them to have
_META_TYPES: dict[str, tuple[type, ...]] = {"n_prompts": (int,), "positions": (str,), "model": (str,),
                                            "source_dtype": (str,), "rows_dropped": (int,)}


def _read_meta(meta_path: Path) -> dict:
    """``interp_sae_lens.json`` (empty when there is none: a folder sae-lens wrote), checked: a JSON object whose
    keys that import_sae_lens reads have the types export_sae_lens writes."""
    if not meta_path.exists():
        return {}
    fix = (f"re-export the capture with interp.export_sae_lens, or delete '{meta_path.name}' to read the folder "
           "as a plain sae-lens cache (one prompt per sequence)")
    meta = read_json_object(meta_path, what="JSON", writer="export_sae_lens", fix=fix)
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, int) and value < 0):
            want = "a count >= 0" if types == (int,) else "text"
            raise InterpError(f"'{meta_path}': {key!r} is {value!r}, not {want}; {fix}")
    return meta


def _context_size(acts: Activations, context_size: int | None) -> int:
    if context_size is not None:
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
            raise InterpError(f"context_size must be a positive int, got {context_size!r}")
        return context_size
    counts = torch.bincount(acts.prompt_index, minlength=acts.n_prompts)
    counts = counts[counts > 0]
    if counts.numel() == 0:
        raise InterpError("the capture has no rows; nothing to export")
    if int(counts.min()) != int(counts.max()):
        raise InterpError(f"prompts have {int(counts.min())}..{int(counts.max())} rows each, and sae-lens needs one "
                          "context_size for every sequence; pass context_size=N to pack rows in order into "
                          "sequences of N (the last partial sequence is dropped)")
    return int(counts[0])


def _foreign_entries(out: Path, marker: dict | None) -> list[str] | None:
    """The entries of a non-empty ``out`` (whose marker says ``marker``) that stand in the way of replacing it:
    None when it is a folder an earlier `export_sae_lens` wrote (its marker's kind, and nothing but what an
    export writes), else the entries that make it not one (all of them when it carries no such marker)."""
    names = sorted(p.name for p in out.iterdir())
    if marker is None or marker.get("kind") != EXPORT_KIND:
        return names
    ours = {*_SAE_LENS_FILES, META_FILE, OUTPUT_MARKER}
    extra = [n for n in names if not ((n in ours or _ARROW_RE.match(n)) and (out / n).is_file())]
    return extra or None


def _check_replaceable(out: Path, out_dir: object) -> None:
    """Refuse (`ForeignFilesError`, changing nothing) an ``out`` that is neither new, empty, nor an earlier
    sae-lens export of ours: a user's files, and other workbench folders (a train_lora run, a report folder
    with notes in it), are never replaced."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = read_marker(out)
    foreign = _foreign_entries(out, marker)
    if foreign is None:
        return
    if marker is None:
        what = "holds files the workbench did not write"
    elif marker.get("kind") != EXPORT_KIND:
        by = marker.get("kind") or marker.get("by")
        what = (f"is another workbench folder ({by + ' output' if by else 'a run or report folder'}), not a "
                "sae-lens export")
    else:
        what = "is a sae-lens export that now also holds files the export did not write"
    raise ForeignFilesError(f"out_dir '{out_dir}' {what} ({shown(foreign)}); export_sae_lens replaces the whole "
                            "folder, so nothing was changed. Choose a new or empty folder for the export")


def _swap_in(tmp: Path, out: Path, out_dir: object, work: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``; an empty ``out``, or an earlier export of ours, is replaced
    (moved into ``work``, which the caller deletes)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    _check_replaceable(out, out_dir)  # checked before writing too; files that came meanwhile must not be lost
    os.replace(out, work / "previous")
    os.replace(tmp, out)
