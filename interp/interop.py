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
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from interp._errors import ForeignFilesError, InterpError
from interp._io import OUTPUT_MARKER, atomic_write_text, has_marker, mark_folder, shown, usable_folder
from interp.capture import Activations, load_activations

META_FILE = "interp_sae_lens.json"  # our metadata beside the dataset; sae-lens never reads it
_SAE_LENS_FILES = ("dataset_info.json", "state.json")  # what `Dataset.save_to_disk` writes (plus data-*.arrow)
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
    rows. Refuses a non-empty ``out_dir`` the workbench did not write; replaces one it did.
    """
    import datasets

    acts = acts_or_folder if isinstance(acts_or_folder, Activations) else load_activations(acts_or_folder)
    if layer not in acts.layers:
        raise InterpError(f"layer {layer} is not in the capture {acts!r}: captured layers are {acts.layers}; "
                          f"pass layer= one of those, or capture layer {layer} first")
    out = usable_folder(out_dir, what="sae-lens export folder")
    if out.exists() and any(out.iterdir()) and not has_marker(out):
        names = sorted(p.name for p in out.iterdir())
        raise ForeignFilesError(f"sae-lens export folder '{out_dir}' holds files the workbench did not write "
                                f"({shown(names)}); nothing was changed. Choose a new or empty folder")

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
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = out.parent / f".{out.name}.arrow{os.getpid()}"
    try:
        # a fingerprint of our own: datasets would otherwise hash the generator, and with it the capture
        ds = datasets.Dataset.from_generator(sequences, features=features, cache_dir=str(scratch),
                                             fingerprint=uuid.uuid4().hex)
        ds.save_to_disk(str(tmp), num_shards=1)
        del ds
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        mark_folder(tmp, what="sae-lens export folder", kind="sae-lens export", layer=layer)
        _swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        raise InterpError(f"sae-lens export folder '{out_dir}' could not be written ({e.strerror or e}); "
                          "free space or choose another folder") from None
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def import_sae_lens(folder: str | os.PathLike, *, hook_name: str | None = None) -> Activations:
    """Read a sae-lens cached-activations folder (ours or one `CacheActivationsRunner` wrote) as `Activations`.

    ``hook_name`` picks the column when the folder holds more than one ``blocks.{L}.hook_*``. Without our
    ``prompt_index``/``position`` columns each sequence counts as one prompt and positions run 0..context_size-1;
    without ``token_ids`` the token ids are -1.
    """
    import datasets

    path = Path(folder)
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
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

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
    n_prompts = int(meta.get("n_prompts", int(prompt_index.max()) + 1 if prompt_index.numel() else 0))
    return Activations(acts={layer: rows}, prompt_index=prompt_index, position=position, token_id=token_id,
                       n_prompts=n_prompts, positions=meta.get("positions", "all"),
                       model_name=meta.get("model", ""), path=path,
                       meta={"layers": [layer], "hook_name": hook_name, "context_size": ctx,
                             "format": "sae-lens", "dtype": str(rows.dtype),
                             "rows_dropped": meta.get("rows_dropped")})


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


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``; an empty ``out`` or one we wrote is replaced."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    if not (out / OUTPUT_MARKER).is_file():  # checked before writing too; a race must not clobber foreign files
        raise ForeignFilesError(f"'{out}' gained files the workbench did not write; the export is left in '{tmp}'")
    old = out.parent / f".{out.name}.old{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
