"""Capture at corpus scale: batches by token length, results larger than memory read lazily, several processes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

import interp
from interp.capture import ActivationChunk, CacheError, load_activations
from interp.models import Prompt

capture_mod = importlib.import_module("interp.capture")  # the module; `interp.capture` is the function
store_mod = importlib.import_module("interp.activations")  # the cache format: shard reads and writes

BODY = interp.prompts.medical()


def ragged(images: list[str] | None, n: int = 12) -> list[Prompt]:
    """Prompts whose lengths differ a lot (contexts of 0-5 report lines), every third with an image."""
    out = []
    for k in range(n):
        context = " ".join(BODY[(k * 7 + j) % len(BODY)] for j in range((k * 5) % 6)) or None
        image = images[k % len(images)] if images and k % 3 == 1 else None
        out.append(Prompt(BODY[k % len(BODY)], image, context))
    return out


def _recording(monkeypatch) -> list[tuple[int, int]]:
    """Record (prompts, padded width) of every forward pass capture makes."""
    shapes, real = [], capture_mod._run_hooked

    def recording(model, batch, *a, **k):
        shapes.append(tuple(batch.input_ids.shape))
        return real(model, batch, *a, **k)

    monkeypatch.setattr(capture_mod, "_run_hooked", recording)
    return shapes


def _question_or_last(info):
    mask = info.question_mask.clone()
    mask[-1] = True
    return mask


def _in_caller_order(acts) -> bool:
    pi, pos = acts.prompt_index, acts.position
    same = pi[1:] == pi[:-1]
    return bool((pi.diff() >= 0).all() and (pos[1:][same] > pos[:-1][same]).all())


@pytest.mark.parametrize("which", ["tiny_medgemma", "tiny_llava"])
@pytest.mark.parametrize("positions", ["last", "all", "question", _question_or_last])
def test_sorted_batches_give_what_caller_order_batches_give(request, which, positions, xray_images, monkeypatch):
    model = request.getfixturevalue(which)
    prompts = ragged(xray_images)
    kw = dict(layers=[0, model.n_layers - 1], positions=positions, batch_size=4, progress=False)
    shapes = _recording(monkeypatch)
    plain = interp.capture(model, prompts, sort=False, batch_tokens=10**6, **kw)
    plain_shapes = list(shapes)
    shapes.clear()
    sorted_ = interp.capture(model, prompts, batch_tokens=400, **kw)
    assert shapes != plain_shapes and max(r * w for r, w in shapes) <= 400  # the batches really differ
    for layer in plain.layers:
        torch.testing.assert_close(sorted_[layer], plain[layer])
    for key in ("prompt_index", "position", "token_id"):
        assert torch.equal(getattr(sorted_, key), getattr(plain, key)), key
    assert _in_caller_order(sorted_) and sorted_.prompt_index.unique().tolist() == list(range(len(prompts)))


def test_batches_stay_within_batch_tokens_and_a_longer_prompt_runs_alone(tiny_medgemma, monkeypatch):
    prompts = [p.question for p in ragged(None, 20)]
    prompts[7] = "Is there " + "a small effusion and " * 60 + "anything else?"  # ~430 tokens
    lengths = tiny_medgemma.encode(prompts).lengths.tolist()
    assert lengths[7] > 256 > max(lengths[:7] + lengths[8:])
    shapes = _recording(monkeypatch)
    acts = interp.capture(tiny_medgemma, prompts, layers=[1], batch_size=6, batch_tokens=256, progress=False,
                          pack=False)  # padded batches (packed rows: tests/test_packing.py)
    assert sum(r for r, _ in shapes) == len(prompts)
    assert all(r <= 6 and (r * w <= 256 or r == 1) for r, w in shapes), shapes
    assert (1, lengths[7]) in shapes
    widths = [w for _, w in shapes]
    assert widths == sorted(widths)  # shortest first: each batch pads to about its own length
    assert acts.prompt_index.tolist() == list(range(len(prompts)))


def test_an_image_that_expands_more_than_estimated_splits_its_batch(tiny_medgemma, xray_images, monkeypatch):
    prompts = [Prompt("Is there an effusion?", xray_images[k % 3]) for k in range(6)]
    real = int(tiny_medgemma.encode(prompts[:1]).lengths[0])
    reference = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", progress=False)
    monkeypatch.setattr(capture_mod, "_image_tokens", lambda model: 0)  # the estimate now misses the image
    shapes = _recording(monkeypatch)
    cap = 3 * real - 1  # three fit by the estimate, only two once encoded
    acts = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", batch_tokens=cap, progress=False)
    assert all(r * w <= cap for r, w in shapes) and sum(r for r, _ in shapes) == 6, shapes
    torch.testing.assert_close(acts[2], reference[2])
    assert torch.equal(acts.position, reference.position)


def test_the_cache_does_not_depend_on_batching(tiny_medgemma, xray_images, tmp_path, monkeypatch):
    prompts = ragged(xray_images)
    kw = dict(layers=[3], positions="all", cache=tmp_path, shard_size=5, progress=False)
    first = interp.capture(tiny_medgemma, prompts, sort=False, batch_size=2, **kw)
    shapes = _recording(monkeypatch)
    again = interp.capture(tiny_medgemma, prompts, batch_size=64, batch_tokens=10_000, **kw)
    assert shapes == [] and again.path == first.path and len(list(tmp_path.iterdir())) == 1
    assert torch.equal(again[3], first[3]) and torch.equal(again.position, first.position)


def test_entries_another_process_left_are_taken_in_when_the_run_resumes(tiny_medgemma, tmp_path, monkeypatch):
    kw = dict(layers=[2], positions="all", cache=tmp_path, shard_size=4, progress=False)
    first = interp.capture(tiny_medgemma, BODY[:12], **kw)
    path = first.path / "manifest.json"
    manifest = json.loads(path.read_text())
    *listed, last = manifest["shards"]
    # what a killed two-process run leaves: the other process's shard, its entry beside it, not in the manifest
    (first.path / store_mod._entry_name(tuple(last["prompts"]))).write_text(json.dumps(last))
    (first.path / ".entry-00000099_00000100.json").write_text("{not json")
    path.write_text(json.dumps({**manifest, "shards": listed, "complete": False}))
    shapes = _recording(monkeypatch)
    with pytest.warns(capture_mod.CacheWarning, match="ignoring the shard entry .*entry-00000099_00000100.json"):
        again = interp.capture(tiny_medgemma, BODY[:12], **kw)
    assert shapes == [] and torch.equal(again[2], first[2])
    assert json.loads(path.read_text())["shards"] == manifest["shards"] and not list(first.path.glob(".entry-*"))


# ---- results larger than memory ------------------------------------------------------------------
KW = dict(layers=[1, 4], positions="all", shard_size=3, progress=False)


@pytest.fixture(scope="module")
def big(tiny_medgemma, xray_images, tmp_path_factory):
    """The same capture whole in memory and lazy (max_memory far below its size), in two cache folders."""
    prompts = ragged(xray_images, 14)
    root = tmp_path_factory.mktemp("big")
    whole = interp.capture(tiny_medgemma, prompts, cache=root / "whole", **KW)
    lazy = interp.capture(tiny_medgemma, prompts, cache=root / "lazy", max_memory=4096, **KW)
    return prompts, whole, lazy


def test_capture_over_max_memory_returns_lazy_activations_equal_to_the_whole(big, monkeypatch):
    _, whole, lazy = big
    assert lazy.lazy and not whole.lazy and len(lazy.meta["shard_rows"]) == 5
    reads = []
    real = store_mod._read_shard
    monkeypatch.setattr(store_mod, "_read_shard", lambda *a, **k: (reads.append(1), real(*a, **k))[1])
    assert (len(lazy), lazy.d_model, lazy.dtype, lazy.layers) == (len(whole), 64, torch.float32, [1, 4])
    assert 1 in lazy.acts and 2 not in lazy.acts and "lazy" in repr(lazy) and lazy.to_dict()["lazy"]
    assert reads == []  # nothing above read a shard
    chunks = list(lazy.chunks())
    assert len(chunks) == 5 and all(isinstance(c, ActivationChunk) for c in chunks) and len(reads) == 5
    for layer in (1, 4):
        assert torch.equal(torch.cat([c.acts[layer] for c in chunks]), whole[layer])
    for key in ("prompt_index", "position", "token_id"):
        assert torch.equal(torch.cat([getattr(c, key) for c in chunks]), getattr(whole, key))
        assert torch.equal(getattr(lazy, key), getattr(whole, key))
    with pytest.raises(interp.InterpError, match=r"more than max_memory=4.0 KiB: iterate it with \.chunks\(\[1\]\)"):
        lazy[1]
    # read back with a larger budget: whole, or still lazy on request, and the whole-layer views work
    assert not load_activations(lazy.path, max_memory="1GB").lazy
    again = load_activations(lazy.path, lazy=True, max_memory="1GB")
    assert again.lazy and torch.equal(again[4], whole[4]) and torch.equal(again.acts[1], whole[1])
    assert all(torch.equal(a, b) for a, b in zip(again.per_prompt(1), whole.per_prompt(1), strict=True))
    groups = {"first": range(0, 7), "rest": range(7, 14)}
    assert again.summary(groups).equals(whole.summary(groups))  # both summed shard by shard


def test_a_rerun_of_a_lazy_capture_reads_nothing_into_memory(tiny_medgemma, big, monkeypatch):
    prompts, whole, lazy = big
    shapes = _recording(monkeypatch)
    again = interp.capture(tiny_medgemma, prompts, cache=lazy.path.parent, max_memory=4096, **KW)
    assert shapes == [] and again.lazy and again.path == lazy.path
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: (hashed.append(p), real(p))[1])
    assert torch.equal(torch.cat([c.acts[4] for c in again.chunks([4])]), whole[4])
    assert hashed == []  # this capture checked every shard already


def test_lazy_reads_check_each_shard_once_and_name_a_damaged_one(big, monkeypatch):
    _, whole, lazy = big
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: (hashed.append(p), real(p))[1])
    fresh = load_activations(lazy.path, lazy=True)
    assert hashed == []  # deferred to the first read of each shard
    for _ in range(2):
        assert torch.equal(torch.cat([c.acts[1] for c in fresh.chunks(1)]), whole[1])
    assert len(hashed) == len(set(hashed)) == 5
    shard = lazy.path / fresh._store.entries[2]["file"]
    data = bytearray(shard.read_bytes())
    original = bytes(data)
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        damaged = load_activations(lazy.path, lazy=True)
        with pytest.raises(CacheError, match=f"{shard.name}' is corrupt .*rerun the capture\\(\\) that wrote it"):
            list(damaged.chunks())
    finally:
        shard.write_bytes(original)


def test_capture_holds_a_few_shards_at_a_time(tiny_medgemma, tmp_path, monkeypatch):
    alive, most = [], []
    real = capture_mod._ShardBuffer._allocate

    def allocate(self):
        out = real(self)
        alive.append(weakref.ref(out["layer_2"]))
        most.append(sum(r() is not None for r in alive))
        return out

    monkeypatch.setattr(capture_mod._ShardBuffer, "_allocate", allocate)
    write = capture_mod._write_shard

    def slow_disk(*args, **kwargs):  # a writer slower than the forwards: shards queue behind it
        time.sleep(0.1)
        return write(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "_write_shard", slow_disk)
    prompts = BODY[:24]
    for lazy, budget in ((True, None), (None, 2000)):  # lazy from the start; lazy once past max_memory
        alive.clear(), most.clear()
        acts = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", shard_size=2, cache=tmp_path,
                              lazy=lazy, max_memory=budget, recompute=True, progress=False)
        assert acts.lazy and len(most) == 12 and max(most) <= 3, most
        assert sum(r() is not None for r in alive) == 0


def test_without_a_cache_a_capture_over_max_memory_is_refused(tiny_medgemma, monkeypatch):
    shapes = _recording(monkeypatch)
    with pytest.raises(interp.InterpError, match="more than max_memory=100 B: pass cache=True"):
        interp.capture(tiny_medgemma, BODY[:8], layers=[1], positions="all", max_memory=100)
    assert shapes == []  # known before any forward pass
    with pytest.raises(interp.InterpError, match="exceed max_memory=.*: pass cache=True"):
        interp.capture(tiny_medgemma, BODY[:8], layers=[1], positions="question", max_memory=4000, shard_size=2,
                       progress=False)
    assert shapes  # 'question' rows are known once tokenised: refused as the budget is crossed
    with pytest.raises(interp.InterpError, match="lazy=True reads the shards back from a cache folder"):
        interp.capture(tiny_medgemma, BODY[:2], layers=[1], lazy=True)
    assert not interp.capture(tiny_medgemma, BODY[:4], layers=[1], positions="all", lazy=False, max_memory=1,
                              progress=False).lazy


@pytest.mark.parametrize("given, expected", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", 1.5e9),
                                             (4096, 4096), ("100", 100)])
def test_max_memory_sizes(given, expected):
    assert capture_mod._memory_bytes(given) == expected


@pytest.mark.parametrize("bad", ["lots", "2 GBs", -1, 0, True, 2.5])
def test_a_bad_max_memory_is_named(tiny_medgemma, bad):
    with pytest.raises(interp.InterpError, match=f"max_memory={bad!r}: pass a number of bytes"):
        interp.capture(tiny_medgemma, BODY[:2], layers=[0], max_memory=bad)


# ---- training batches ---------------------------------------------------------------------------
def _multiset(rows: torch.Tensor):
    return torch.unique(rows, dim=0, return_counts=True)


def _same_multiset(a: torch.Tensor, b: torch.Tensor) -> bool:
    (ua, ca), (ub, cb) = _multiset(a), _multiset(b)
    return torch.equal(ua, ub) and torch.equal(ca, cb)


@pytest.mark.parametrize("kind", ["whole", "lazy"])
def test_batches_yield_every_row_once_per_pass_in_a_seeded_order(big, kind):
    _, whole, lazy = big
    acts = {"whole": whole, "lazy": lazy}[kind]
    rows = whole[4]
    n = rows.shape[0]
    got = list(acts.batches(4, 7, drop_last=False, shards_in_memory=2))
    assert [b.shape[0] for b in got[:-1]] == [7] * (len(got) - 1) and sum(b.shape[0] for b in got) == n
    assert _same_multiset(torch.cat(got), rows) and not torch.equal(torch.cat(got), rows)
    full = list(acts.batches(4, 7, shards_in_memory=2))
    assert len(full) == n // 7 and all(b.shape == (7, 64) for b in full)
    same = list(acts.batches(4, 7, shards_in_memory=2))
    other = list(acts.batches(4, 7, seed=1, shards_in_memory=2))
    assert all(torch.equal(a, b) for a, b in zip(full, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(full, other, strict=True))
    # the lazy reader and the in-memory one mix the same shards the same way
    twin = {"whole": lazy, "lazy": whole}[kind]
    assert all(torch.equal(a, b) for a, b in zip(full, twin.batches(4, 7, shards_in_memory=2), strict=True))
    per_pass = -(-n // 5)
    stream = acts.batches(4, 5, repeat=True, drop_last=False, seed=3)
    passes = [torch.cat([next(stream) for _ in range(per_pass)]) for _ in range(2)]
    assert all(_same_multiset(p, rows) for p in passes) and not torch.equal(passes[0], passes[1])
    in_order = torch.cat(list(acts.batches(4, 5, shuffle=False, drop_last=False)))
    assert torch.equal(in_order, rows)


def test_batches_refuse_what_they_cannot_yield(big):
    _, whole, lazy = big
    with pytest.raises(interp.InterpError, match="layer 2 was not captured"):
        lazy.batches(2, 8)
    with pytest.raises(interp.InterpError, match=f"batch_size=100000 is more than the {len(whole)} rows"):
        whole.batches(1, 100_000)
    with pytest.raises(interp.InterpError, match="shards_in_memory=0: must be >= 1"):
        lazy.batches(1, 8, shards_in_memory=0)


# ---- several processes ---------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import interp
    from interp.dist import rank_and_world
    from interp.models import Prompt
    from safetensors.torch import save_file
    out, images = sys.argv[1], json.loads(sys.argv[2])
    body = interp.prompts.medical()
    prompts = [Prompt(body[k], images[k % len(images)] if k % 4 == 1 else None,
                      " ".join(body[k + 30:k + 30 + k % 5]) or None) for k in range(24)]
    model = interp.load("tiny-medgemma")
    capture_mod, calls = sys.modules["interp.capture"], []
    real = capture_mod._run_hooked
    capture_mod._run_hooked = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    acts = interp.capture(model, prompts, layers=[1, 4], positions="all", shard_size=5, batch_size=4,
                          batch_tokens=300, progress=False)
    rank, world = rank_and_world()
    save_file({"layer_1": acts[1], "layer_4": acts[4], "prompt_index": acts.prompt_index,
               "position": acts.position, "token_id": acts.token_id}, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": world, "path": str(acts.path) if acts.path else None, "lazy": acts.lazy,
                   "forwards": len(calls)}, f)
""")


def test_two_processes_share_the_shards_and_each_returns_what_one_returns(xray_images, tmp_path):
    """Two CPU processes under torchrun (gloo) split the shards into one cache folder (sae_cache/, as no
    cache= is given); each returns, bit for bit, what one process returns without any cache."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels, so the same bits, in every run
    runs = {}
    for name, launcher in (("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
                           ("one", [])):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run([sys.executable, *launcher, str(script), str(folder), json.dumps(xray_images)],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = folder
    one = load_file(str(runs["one"] / "rank0.safetensors"))
    single = json.loads((runs["one"] / "rank0.json").read_text())
    assert (single["world"], single["path"], single["lazy"]) == (1, None, False)
    forwards = []
    for rank in (0, 1):
        info = json.loads((runs["two"] / f"rank{rank}.json").read_text())
        assert info["world"] == 2 and not info["lazy"] and info["path"].startswith("sae_cache/")
        forwards.append(info["forwards"])
        got = load_file(str(runs["two"] / f"rank{rank}.safetensors"))
        assert got.keys() == one.keys() and all(torch.equal(got[k], one[k]) for k in one), rank
    assert sum(forwards) == single["forwards"] and min(forwards) > 0  # each ran its share, nothing twice
    folder = runs["two"] / info["path"]
    manifest = json.loads((folder / "manifest.json").read_text())
    spans = [[s, min(s + 5, 24)] for s in range(0, 24, 5)]
    assert manifest["complete"] and [e["prompts"] for e in manifest["shards"]] == spans
    assert {p.name for p in folder.iterdir()} == {".lock", "manifest.json", *(e["file"] for e in manifest["shards"])}
    stored = load_activations(folder)
    assert torch.equal(stored[4], one["layer_4"]) and torch.equal(stored.prompt_index, one["prompt_index"])
