"""Faults a long capture meets: kill -9 at a random point, two runs on one cache folder, a full disk.

Each test ends the same way: the cache is complete, every listed shard is valid, and the activations
equal a fresh capture bit for bit."""

from __future__ import annotations

import errno
import importlib
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import interp
from interp.capture import CacheError, load_activations

capture_mod = importlib.import_module("interp.capture")  # the module; `interp.capture` is the function
store_mod = importlib.import_module("interp.activations")  # the cache format: shard reads and writes

PROMPTS = interp.prompts.medical()[:24]
KW = dict(layers=[0, 3], positions="all", shard_size=4, batch_size=2, progress=False)
N_SHARDS, BATCHES_PER_SHARD = 6, 2

# A separate process that loads the same tiny model and captures PROMPTS into the folder argv[1].
CHILD = textwrap.dedent(f"""
    import sys, torch, interp
    torch.set_num_threads(int(sys.argv[2]))
    model = interp.load("tiny-medgemma")
    print("ready", flush=True)
    interp.capture(model, interp.prompts.medical()[:24], cache=sys.argv[1], **{KW!r})
    print("done", flush=True)
""")


def _child(cache: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, text=True, **kw)


def _manifest(cache: Path) -> dict | None:
    found = list(cache.glob("*/manifest.json"))
    return json.loads(found[0].read_text()) if found else None


def _listed(cache: Path) -> int:
    m = _manifest(cache)
    return len(m["shards"]) if m else 0


def _count_forwards(monkeypatch) -> list:
    calls, real = [], capture_mod._run_hooked
    monkeypatch.setattr(capture_mod, "_run_hooked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def _assert_complete_and_equal(acts, fresh) -> None:
    manifest = json.loads((acts.path / "manifest.json").read_text())
    assert manifest["complete"] and [s["prompts"] for s in manifest["shards"]] == [
        [s, s + 4] for s in range(0, len(PROMPTS), 4)]
    assert not list(acts.path.glob(".*.tmp*")), "a leftover .tmp file"
    assert {p.name for p in acts.path.glob("shard_*")} == {s["file"] for s in manifest["shards"]}
    stored = load_activations(acts.path)
    for got in (acts, stored):
        for layer in KW["layers"]:
            assert torch.equal(got[layer], fresh[layer])
        assert torch.equal(got.prompt_index, fresh.prompt_index) and torch.equal(got.position, fresh.position)


@pytest.fixture(scope="module")
def fresh(tiny_medgemma):
    return interp.capture(tiny_medgemma, PROMPTS, **KW)


def test_kill_9_at_random_points_resumes_bit_for_bit(tiny_medgemma, fresh, tmp_path, monkeypatch):
    rng = random.Random(1234)
    for trial in range(3):
        cache = tmp_path / f"trial{trial}"
        proc = _child(cache)
        assert proc.stdout.readline().strip() == "ready"
        target = rng.randint(0, N_SHARDS - 2)  # die after this many shards are listed, plus a random delay
        deadline = time.monotonic() + 300
        while _listed(cache) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        if proc.returncode != -9:
            pytest.fail(f"the capture ended (rc {proc.returncode}) before it could be killed")
        kept = _listed(cache)
        print(f"trial {trial}: killed after {kept} of {N_SHARDS} shards (target {target})")
        calls = _count_forwards(monkeypatch)
        resumed = interp.capture(tiny_medgemma, PROMPTS, cache=cache, **KW)
        monkeypatch.undo()
        assert len(calls) == (N_SHARDS - kept) * BATCHES_PER_SHARD, f"trial {trial}: kept {kept} shards"
        _assert_complete_and_equal(resumed, fresh)


def test_two_processes_capturing_into_one_folder_both_finish(fresh, tmp_path):
    procs = [_child(tmp_path, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.split() == ["ready", "done"], err[-2000:]
    folder = next(tmp_path.iterdir())
    _assert_complete_and_equal(load_activations(folder), fresh)


def test_two_threads_capturing_into_one_folder_both_finish(tiny_medgemma, fresh, tmp_path, monkeypatch):
    real_save = store_mod.save_file

    def slow_save(tensors, path):  # widen the window in which the second run starts
        time.sleep(0.05)
        real_save(tensors, path)

    monkeypatch.setattr(store_mod, "save_file", slow_save)
    calls = _count_forwards(monkeypatch)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = interp.capture(tiny_medgemma, PROMPTS, cache=tmp_path, **KW)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    while _listed(tmp_path) < 1 and first.is_alive():
        time.sleep(0.002)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join()
    second.join()
    assert not errors, errors
    assert len(calls) == N_SHARDS * BATCHES_PER_SHARD  # the second run read what the first wrote
    for acts in results.values():
        _assert_complete_and_equal(acts, fresh)


def test_a_live_runs_tmp_files_survive_another_runs_start(tiny_medgemma, tmp_path):
    folder = interp.capture(tiny_medgemma, PROMPTS, cache=tmp_path, **KW).path
    stray = folder / ".shard_00000000_00000004.safetensors.tmp99999"
    done = []
    with capture_mod._FolderLock(folder):  # a live run holds the folder and is writing `stray`
        stray.write_bytes(b"half a shard")
        other = threading.Thread(target=lambda: done.append(
            interp.capture(tiny_medgemma, PROMPTS, cache=tmp_path, recompute=True, **KW)))
        with pytest.warns(capture_mod.CacheWarning, match="another capture .* is using the cache folder"):
            other.start()
            time.sleep(0.5)
        assert stray.is_file() and not done and other.is_alive()  # it waits; nothing of ours was deleted
    other.join()
    assert done and not stray.exists()  # once no run holds the lock, the leftover is cleared


@pytest.mark.parametrize("fails", ["shard", "manifest"])
def test_disk_full_names_folder_and_free_space_and_a_rerun_completes(tiny_medgemma, fresh, tmp_path, monkeypatch,
                                                                     fails):
    real = store_mod.save_file if fails == "shard" else store_mod.atomic_write_text
    writes = []

    def full_after_a_while(obj, path):
        writes.append(path)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path)

    monkeypatch.setattr(store_mod, "save_file" if fails == "shard" else "atomic_write_text", full_after_a_while)
    with pytest.raises(CacheError, match="no space left on the disk of cache folder '.*' while writing .* free.*"
                                         "Free some space or pass cache= a folder on a larger disk, then rerun"):
        interp.capture(tiny_medgemma, PROMPTS, cache=tmp_path, **KW)
    monkeypatch.undo()
    folder = next(tmp_path.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < len(manifest["shards"]) < N_SHARDS
    assert not list(folder.glob(".*.tmp*"))
    for entry in manifest["shards"]:  # everything listed is whole
        capture_mod._read_shard(folder, entry, layers=KW["layers"], d_model=64, dtype=torch.float32, fix="")
    kept = len(manifest["shards"])
    calls = _count_forwards(monkeypatch)  # space freed: the rerun computes only what is missing
    resumed = interp.capture(tiny_medgemma, PROMPTS, cache=tmp_path, **KW)
    assert len(calls) == (N_SHARDS - kept) * BATCHES_PER_SHARD
    _assert_complete_and_equal(resumed, fresh)


def test_unwritable_cache_folder_is_named(tiny_medgemma, tmp_path):
    with pytest.raises(CacheError, match="cannot create the cache folder '/proc/.*'"):
        interp.capture(tiny_medgemma, PROMPTS[:2], layers=[0], cache="/proc/interp-cache", progress=False)
