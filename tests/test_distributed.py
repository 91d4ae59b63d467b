"""Several processes, one result: `tests/dist_worker.py` runs once under torchrun (two CPU processes, gloo, as
under ``accelerate launch``) and what every process returned is compared with a one-process run here, bitwise:
`interp.dist` itself, `layer_profile` (patching with a KV cache and without, residual, SAE), `evaluate` and a
cached `capture`. Also: `layer_profile` batches by token length and gives the unsorted result."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import dist_worker as W
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import interp
from interp import layers as layers_mod
from interp.data import builtin

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """Both processes' results: {rank: (numbers, tensors)}, and the capture cache folder they shared."""
    tmp = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W.WORLD),
           str(WORKER), str(tmp / "out"), str(tmp / "cache")]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the {W.WORLD}-process worker hung (a case failing on one process only leaves the other in a "
                    f"collective):\n{(e.stderr or b'')[-3000:]!r}")
    if proc.returncode:
        pytest.fail(f"the {W.WORLD}-process worker exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    ranks = {}
    for r in range(W.WORLD):
        numbers = json.loads((tmp / "out" / f"rank{r}.json").read_text())
        assert numbers["world"] == W.WORLD
        ranks[r] = (numbers["cases"], load_file(str(tmp / "out" / f"rank{r}.safetensors")))
    return {"ranks": ranks, "cache": tmp / "cache"}


@contextlib.contextmanager
def one_thread():
    """The reference runs as each worker process does (OMP_NUM_THREADS=1): what is compared is the split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> interp.Model:
    return interp.load("tiny-medgemma")  # a copy of its own: the worker's weights, untouched by other tests


def case(launched, name: str, rank: int) -> tuple[dict, dict]:
    numbers, tensors = launched["ranks"][rank]
    got = numbers.get(name, numbers.get("dist", {"error": f"the worker has no case {name!r}"}))
    if "error" in got:
        pytest.fail(f"case {name!r} failed on process {rank}:\n{got['error']}")
    prefix = f"{name}/"
    return got, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def as_json(numbers: dict) -> dict:
    """What the worker's JSON holds for ``numbers`` (Python floats round-trip exactly; int keys become str)."""
    return json.loads(json.dumps(numbers))


def assert_equal_numbers(got: dict, want: dict) -> None:
    """Every number ``==`` (NaN where NaN), key by key."""
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], list) and want[key] and not isinstance(want[key][0], str):
            np.testing.assert_array_equal(np.asarray(got[key], dtype=float), np.asarray(want[key], dtype=float),
                                          err_msg=key, strict=True)
        else:
            assert got[key] == want[key], key


# ---- interp.dist ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", range(W.WORLD))
def test_gather_rows_concatenates_uneven_shares_bitwise_in_every_dtype(launched, rank):
    _, tensors = case(launched, "gather_rows", rank)
    for name, rows in W.GATHER_ROWS.items():
        for dtype in W.GATHER_DTYPES:
            want = torch.cat([W.gather_part(dtype, rows[r], r) for r in range(W.WORLD)])
            assert same_bits(tensors[f"{name}/{dtype}"], want), (name, dtype)


@pytest.mark.parametrize("rank", range(W.WORLD))
def test_share_is_accelerates_split_between_processes(launched, rank):
    got, _ = case(launched, "share", rank)
    for n in W.SHARE_LENGTHS:
        assert got["share"][str(n)] == got["accelerate"][str(n)], n
    assert sum(len(case(launched, "share", r)[0]["share"][str(n)]) for r in range(W.WORLD)
               for n in W.SHARE_LENGTHS) == sum(W.SHARE_LENGTHS)  # every item in exactly one share


@pytest.mark.parametrize("rank", range(W.WORLD))
def test_broadcast_ints_gives_every_process_the_main_processes_list(launched, rank):
    got, _ = case(launched, "broadcast_ints", rank)
    assert got == {"length_known": W.BROADCAST, "length_sent": W.BROADCAST, "empty": []}


# ---- the stages -------------------------------------------------------------------------------------
def rows_split(launched, name: str, want: dict) -> tuple[int, list[int]]:
    """Check every process's numbers of case ``name`` against the one-process ``want`` (its "rows_run" count
    taken out first); returns (the one-process count, each process's count)."""
    rows = want.pop("rows_run")
    split = []
    for rank in range(W.WORLD):
        got, _ = case(launched, name, rank)
        split.append(got.pop("rows_run"))
        assert_equal_numbers(got, want)
    return rows, split


@pytest.fixture(scope="module")
def profiles(model) -> dict[str, dict]:
    with one_thread():
        return {name: as_json(W.profile_case(model, name)[0]) for name in W.PROFILES}


@pytest.mark.parametrize("name", list(W.PROFILES))
def test_layer_profile_on_two_processes_is_the_one_process_profile_bitwise(launched, profiles, name):
    want = dict(profiles[name])
    rows, split = rows_split(launched, name, want)
    if not name.startswith("sae"):  # the SAE profile's forwards are `capture`'s, split (or not) there
        assert sum(split) == rows, split  # every forward ran once, on one of the processes
        assert split[1] == 0 if "one-batch" in name else min(split) > 0, split
    assert np.isfinite(want["values"]).any()
    if name.startswith("sae"):
        assert max(np.nan_to_num(want["values"])) > 0  # some features passed the test: a non-trivial share


@pytest.mark.parametrize("name", list(W.EVALUATE))
def test_evaluate_on_two_processes_splits_the_forwards_and_gives_the_one_process_margins(launched, model, name):
    with one_thread():
        want = as_json(W.evaluate_case(model, name, launched["cache"].parent / "images")[0])
    rows, split = rows_split(launched, name, want)
    assert sum(split) == rows and min(split) > 0, split  # each forward ran once, and both processes ran some


def test_cached_capture_on_two_processes_gives_the_one_process_activations_and_one_manifest(launched, model):
    with one_thread():
        _, want = W.capture_case(model, None)
    for rank in range(W.WORLD):
        _, got = case(launched, "capture", rank)
        assert got.keys() == want.keys()
        for key in want:
            assert same_bits(got[key], want[key]), (rank, key)
    manifests = sorted(launched["cache"].rglob("manifest.json"))
    assert len(manifests) == 1, manifests
    assert json.loads(manifests[0].read_text())["complete"]
    back = interp.capture(model, W.capture_prompts(), cache=launched["cache"], progress=False, **W.CAPTURE)
    assert back.path == manifests[0].parent  # a rerun here reads the two processes' cache
    for layer in W.CAPTURE["layers"]:
        assert same_bits(back[layer], want[f"layer_{layer}"])


# ---- length-aware batching (one process) -----------------------------------------------------------------
def test_layer_profile_batches_by_token_length_and_keeps_the_callers_pair_order(model, monkeypatch):
    ps = [dataclasses.replace(p, context=None) if i % 2 else p for i, p in enumerate(builtin("register")[:10])]
    keys = layers_mod._length_keys(model, [p.prompt_b() for p in ps], [p.prompt_a() for p in ps])
    assert [k[1] for k in keys] == [int(n) for n in model.encode([p.prompt_b() for p in ps]).lengths]

    def padded(batches):
        return sum(len(b) * max(keys[i][1] for i in b) for b in batches)

    sorted_batches = layers_mod._batches(keys, 3)
    assert sorted(i for b in sorted_batches for i in b) == list(range(len(ps)))
    cases = {"cache": dict(method="patching"), "full": dict(method="patching", strategy="full"),
             "residual": dict(method="residual", positions="question")}
    runs = {}
    for by_length in (True, False):
        monkeypatch.setattr(layers_mod, "_BY_LENGTH", by_length)
        if not by_length:
            assert padded(layers_mod._batches(keys, 3)) > padded(sorted_batches)  # sorting saves padding
        runs[by_length] = {name: layers_mod.layer_profile(model, ps, batch_size=3, progress=False, **kw)
                           for name, kw in cases.items()}
    for name, prof in runs[True].items():
        other = runs[False][name]
        np.testing.assert_allclose(prof.values, other.values, rtol=1e-5, atol=1e-6, err_msg=name)
        for key in ("margin_a", "margin_b", "margin_patched", "within", "between"):
            if key in prof.meta:
                np.testing.assert_allclose(prof.meta[key], other.meta[key], rtol=1e-5, atol=1e-5, err_msg=key)
    patching = runs[True]["cache"]
    assert patching.meta["pair_ids"] == [p.id for p in ps if p.same_polarity]  # the caller's order
    assert patching.meta["processes"] == 1
