"""Run by tests/test_distributed.py under torchrun (two CPU processes, gloo): every process runs every case and
writes what it got to OUT/rank{r}.json (numbers) and OUT/rank{r}.safetensors (tensors); the test compares each
process's results with a one-process run. The cases' inputs live here, so both sides build them the same way.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT CACHE

A case that raises is written as {"error": traceback} and the others still run (a case that fails on one
process only can leave the other waiting in a collective: the test's timeout ends that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

WORLD = 2  # the test launches this many processes; the interp.dist cases are written for it
# layer_profile cases: 9 pairs (some without a report, so lengths differ), batches that do not divide evenly
PROFILES: dict[str, dict[str, Any]] = {
    "patching-cache-last": dict(method="patching", strategy="cache", positions="last", batch_size=2),
    "patching-cache-suffix": dict(method="patching", strategy="cache", positions="suffix", batch_size=2),
    "patching-full-suffix": dict(method="patching", strategy="full", positions="suffix", batch_size=2),
    "residual-question": dict(method="residual", positions="question", batch_size=3),
    "residual-last": dict(method="residual", positions="last", batch_size=4),
    "sae-question": dict(method="sae", positions="question", batch_size=3, alpha=0.5),
    # one batch in all: process 1 runs nothing and still returns the profile
    "patching-one-batch": dict(method="patching", strategy="cache", positions="last", batch_size=16),
    "residual-one-batch": dict(method="residual", positions="question", batch_size=32),
}
SAE_LAYERS = (1, 3)
_PROFILE_META = ("margin_a", "margin_b", "margin_patched", "pair_ids", "patched_tokens", "within", "between",
                 "embedding_ratio", "n_significant")
GATHER_ROWS = {"uneven": (3, 5), "first-empty": (0, 2), "all-empty": (0, 0)}  # rows process 0, 1 send
GATHER_DTYPES = ("float32", "bfloat16", "bool", "int64")
SHARE_LENGTHS = (0, 1, 5, 7)
BROADCAST = [7, -3, 0, 2**40]
CAPTURE = dict(layers=[1, 3], positions="all", batch_size=3, shard_size=4)
# evaluate cases: the plain loop in batches of 4 (5 batches), and the fast path on 12 image pairs in blocks of 8
# images (scoring.BLOCK_IMAGES, 64 by default): two blocks, one per process
EVALUATE: dict[str, dict[str, Any]] = {"evaluate-naive": dict(n_boot=100, batch_size=4, fast=False),
                                       "evaluate-fast-images": dict(n_boot=100, images=12)}


def pairs():
    from interp.data import builtin

    base = builtin("register")[:9]
    return [dataclasses.replace(p, context=None) if i % 3 == 1 else p for i, p in enumerate(base)]


def saes(d_model: int) -> dict[int, Any]:
    from conftest import planted_jumprelu_sae

    return {layer: planted_jumprelu_sae(d_model, layer, seed=layer, threshold=0.05, avoid=[]) for layer in SAE_LAYERS}


def gather_part(dtype: str, n: int, rank: int) -> Tensor:
    """What process ``rank`` sends to `gather_rows`: ``[n, 2, 3]``; floats include NaN, -0.0 and inf."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * n + GATHER_DTYPES.index(dtype))
    if dtype == "bool":
        return torch.rand(n, 2, 3, generator=g) > 0.5
    if dtype == "int64":
        return torch.randint(-2**62, 2**62, (n, 2, 3), generator=g)
    x = torch.randn(n, 2, 3, generator=g)
    if n:
        x[0, 0] = torch.tensor([float("nan"), -0.0, float("inf")])
    return x.to(getattr(torch, dtype))


# ---- cases: each returns (numbers for JSON, tensors for safetensors) ---------------------------------------
def profile_case(model, name: str) -> tuple[dict, dict]:
    from interp.layers import layer_profile

    kw = dict(PROFILES[name])
    if kw["method"] == "sae":
        kw["saes"] = saes(model.d_model)
    with counting_rows(model) as rows:
        prof = layer_profile(model, pairs(), progress=False, **kw)
    meta = {k: v for k, v in prof.meta.items() if k in _PROFILE_META}
    return {"values": list(prof.values), "scores": list(prof.scores), **meta, "rows_run": rows[0]}, {}


@contextlib.contextmanager
def counting_rows(model):
    """Counts the sequences decoder layer 0 runs (``[count]``): how the work was split between processes."""
    from interp.capture import layer_output

    rows = [0]

    def hook(_module, _inputs, output):
        rows[0] += layer_output(output).shape[0]

    handle = model.layers[0].register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


def image_pairs(n: int, folder: Path):
    """``n`` pairs, each with its own small PNG (written once; every process writes the same bytes)."""
    import numpy as np
    from PIL import Image

    from interp.data import builtin

    folder.mkdir(parents=True, exist_ok=True)
    base, out = builtin("register"), []
    for i in range(n):
        path = folder / f"img{i}.png"
        if not path.exists():
            tmp = folder / f".img{i}.{id(out)}.png"
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp)
            tmp.replace(path)
        out.append(dataclasses.replace(base[i % len(base)], id=f"img{i}", image=str(path)))
    return out


def evaluate_case(model, name: str, folder: Path) -> tuple[dict, dict]:
    import interp

    kw = dict(EVALUATE[name])
    n_images = kw.pop("images", 0)
    ps = image_pairs(n_images, folder) if n_images else pairs()
    from interp import scoring

    default, scoring.BLOCK_IMAGES = scoring.BLOCK_IMAGES, 8
    try:
        with counting_rows(model) as rows:
            report = interp.evaluate(model, ps, progress=False, **kw)
    finally:
        scoring.BLOCK_IMAGES = default
    return {"margin_a": report.table["margin_a"].tolist(), "margin_b": report.table["margin_b"].tolist(),
            "ids": report.table["id"].tolist(), "flip_rate": report.flip_rate,
            "mean_margin_diff": report.mean_margin_diff, "rows_run": rows[0]}, {}


def capture_prompts():
    ps = pairs()
    return [p.prompt_a() for p in ps] + [p.prompt_b() for p in ps]


def capture_case(model, cache: str | None) -> tuple[dict, dict]:
    import interp

    acts = interp.capture(model, capture_prompts(), cache=cache, progress=False, **CAPTURE)
    tensors = {f"layer_{i}": acts[i] for i in acts.layers}
    tensors.update(prompt_index=acts.prompt_index, position=acts.position, token_id=acts.token_id)
    return {"n_prompts": acts.n_prompts}, tensors


def _dist_cases() -> dict[str, tuple[dict, dict]]:
    from accelerate import PartialState

    from interp import dist

    rank, _ = dist.rank_and_world()
    tensors = {f"{case}/{dtype}": dist.gather_rows(gather_part(dtype, rows[rank], rank))
               for case, rows in GATHER_ROWS.items() for dtype in GATHER_DTYPES}
    state = PartialState()
    share, accelerate = {}, {}
    for n in SHARE_LENGTHS:
        share[n] = list(dist.share(n))
        with state.split_between_processes(list(range(n))) as part:
            accelerate[n] = list(part)
    main = dist.is_main()
    ints = {"length_known": dist.broadcast_ints(BROADCAST if main else None, n=len(BROADCAST)),
            "length_sent": dist.broadcast_ints(BROADCAST if main else [1]),
            "empty": dist.broadcast_ints([] if main else None)}
    return {"gather_rows": ({}, tensors), "share": ({"share": share, "accelerate": accelerate}, {}),
            "broadcast_ints": (ints, {})}


def main(out: Path, cache: Path) -> None:
    warnings.filterwarnings("ignore")
    from accelerate import PartialState

    # As `accelerate launch --cpu` does: without cpu=True, accelerate's state sees one process on CPUs under
    # torchrun (interp.dist then joins the group itself), and split_between_processes would not split.
    PartialState(cpu=not torch.cuda.is_available())
    import interp
    from interp import dist

    rank, world = dist.rank_and_world()
    results: dict[str, tuple[dict, dict]] = {}

    def run(name: str, fn, *args) -> None:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = ({"error": traceback.format_exc()}, {})

    try:
        results.update(_dist_cases())
    except Exception:
        results["dist"] = ({"error": traceback.format_exc()}, {})
    model = interp.load("tiny-medgemma")
    run("capture", capture_case, model, str(cache))
    for name in PROFILES:
        run(name, profile_case, model, name)
    for name in EVALUATE:
        run(name, evaluate_case, model, name, cache.parent / "images")

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    numbers = {"world": world, "cases": {name: r[0] for name, r in results.items()}}
    (out / f"rank{rank}.json").write_text(json.dumps(numbers))
    save_file({f"{name}/{k}": t.contiguous() for name, r in results.items() for k, t in r[1].items()},
              str(out / f"rank{rank}.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
