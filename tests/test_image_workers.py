"""Image preprocessing in worker processes (`interp._imageworkers`) gives the bits the threads give, raises
the errors they raise, never runs the user's script again, and falls back to threads when a worker dies;
and what decides whether a vision pass may become a CUDA graph (`interp._graphs.prepare`)."""

from __future__ import annotations

import copy
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import interp
from interp import _graphs, _imageworkers
from interp.models import ImageCache, Prompt

capture_mod = importlib.import_module("interp.capture")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not _imageworkers.available(), reason="no forkserver on this platform")


def _pictures(n: int, size: int = 80, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7 * k, 3), dtype=np.uint8)) for k in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _stop_workers():
    yield
    _imageworkers.shutdown()


@pytest.fixture
def workers():
    pool = _imageworkers.pool(wait=True)  # at once when it runs; started afresh after a test stopped it
    assert pool is not None, "the worker pool did not start"
    return pool


def _both(model, image):
    a, b = ImageCache(model, workers=True), ImageCache(model, workers=False)
    pa, ra = a._process(image)
    pb, rb = b._process(image)
    assert (a.in_workers, b.in_workers) == (1, 0)
    return (pa, ra), (pb, rb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_pixels_are_the_threads_bits(workers, medgemma, tmp_path, dtype):
    model = medgemma
    if dtype != medgemma.dtype:
        model = copy.deepcopy(medgemma)
        model.hf.to(dtype)
    assert model.dtype == dtype
    pics = _pictures(3)
    path = tmp_path / "x.png"
    pics[0].save(path)
    for image in [*pics, str(path), np.asarray(pics[1])]:
        (pa, ra), (pb, rb) = _both(model, image)
        assert ra == rb and pa.dtype == pb.dtype == dtype and pa.shape == pb.shape
        assert torch.equal(pa.view(torch.int16) if dtype == torch.bfloat16 else pa,
                           pb.view(torch.int16) if dtype == torch.bfloat16 else pb)


def test_worker_errors_are_the_threads_errors(workers, medgemma, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    seen = {}
    for image in (str(tmp_path / "missing.png"), str(bad)):
        errors = []
        for use in (True, False):
            with pytest.raises(Exception) as e:
                ImageCache(medgemma, workers=use)._process(image)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], errors
        seen[Path(image).name] = errors[0]
    assert seen["missing.png"][0] is interp.InterpError and "image file not found" in seen["missing.png"][1]
    assert "not_an_image.png" in seen["not_an_image.png"][1]


def test_an_unguarded_script_is_not_run_again_by_the_workers(tmp_path):
    marker = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        with open({str(marker)!r}, "a") as f:
            f.write("ran\\n")
        from interp import _imageworkers
        pool = _imageworkers.pool(wait=True)
        print("pool", pool is not None, pool.submit(_imageworkers._warm).result() > 0)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "pool True True" in out.stdout, out.stderr[-2000:]
    assert marker.read_text() == "ran\n"  # once: no worker imported the script


def test_a_dead_worker_means_threads_from_then_on(medgemma):
    _imageworkers.shutdown()
    pool = _imageworkers.pool(wait=True)
    assert pool is not None
    try:
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
        pic = _pictures(1, seed=5)[0]
        cache = ImageCache(medgemma, workers=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pixels, replacement = cache._process(pic)
        assert any("image worker process died" in str(w.message) for w in caught), [str(w.message) for w in caught]
        ref, ref_replacement = ImageCache(medgemma, workers=False)._process(pic)
        assert torch.equal(pixels, ref) and replacement == ref_replacement and cache.in_workers == 0
        assert _imageworkers.pool() is None  # given up for the session
    finally:
        _imageworkers.shutdown()  # back to idle: a later pool() starts afresh


def test_image_job_only_for_transformers_own_image_processors(medgemma):
    from interp.models import split_processor

    split = split_processor(medgemma).split
    assert split.image_job() is not None

    class Own(type(split.processor)):
        def _process_images(self, images, **kwargs):  # a processor with its own image half
            return super()._process_images(images, **kwargs)

    proc = split.processor
    try:
        proc.__class__ = Own
        assert split.image_job() is None
    finally:
        proc.__class__ = Own.__mro__[1]
    ip = proc.image_processor
    base = type(ip)
    remote = type("Remote", (base,), {"__module__": "transformers_modules.someone.processor"})
    try:
        ip.__class__ = remote
        assert split.image_job() is None
    finally:
        ip.__class__ = base


def test_capture_with_workers_equals_capture_with_threads(workers, medgemma, monkeypatch):
    pics = _pictures(4, seed=2)
    prompts = [Prompt(f"Is there an effusion {'?' * (k % 5)}", pics[k % 4] if k % 3 else None) for k in range(18)]
    calls = []
    real = _imageworkers.tensors
    monkeypatch.setattr(_imageworkers, "tensors", lambda r: calls.append(1) or real(r))
    monkeypatch.setattr(ImageCache, "workers", True)
    fast = interp.capture(medgemma, prompts, layers=[1], positions="all", batch_size=4, progress=False)
    assert len(calls) == 4  # every distinct image, once, in a worker
    monkeypatch.setattr(ImageCache, "workers", False)
    plain = interp.capture(medgemma, prompts, layers=[1], positions="all", batch_size=4, progress=False)
    assert len(calls) == 4
    assert torch.equal(fast[1], plain[1]) and torch.equal(fast.prompt_index, plain.prompt_index)


def test_image_cache_ready(medgemma):
    from concurrent.futures import ThreadPoolExecutor

    cache = ImageCache(medgemma, workers=False)
    pic = _pictures(1, seed=7)[0]
    with ThreadPoolExecutor(1) as pool:
        key = cache.submit(pic, pool, hold=True)
        assert key is not None
        cache._entries[key].result()
    assert cache.ready(key) and not cache.ready("never asked")


# ---- which vision passes may become CUDA graphs ------------------------------------------------------------
def test_graph_prepare_rules(medgemma):
    body = medgemma.hf.model
    cuda = torch.device("cuda")  # the rules only: nothing here runs on a device
    assert _graphs.prepare(body, torch.device("cpu")) is None
    fp = _graphs.prepare(body, cuda)
    assert fp is not None and fp == _graphs._fingerprint(body)
    handle = body.vision_tower.encoder.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert _graphs.prepare(body, cuda) is None  # a graph would skip the user's hook
    finally:
        handle.remove()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert _graphs.prepare(body, cuda) is None
    finally:
        glob.remove()
    body.vision_tower.train()
    try:
        assert _graphs.prepare(body, cuda) is None
    finally:
        body.vision_tower.eval()
    w = body.vision_tower.encoder.layers[0].mlp.fc1.weight
    saved = w.data
    try:
        w.data = saved.clone()  # a new address: a graph built before would read the old weights
        assert _graphs.prepare(body, cuda) != fp
    finally:
        w.data = saved
    assert _graphs.prepare(body, cuda) == fp
    saved_flag = _graphs.GRAPHS
    _graphs.GRAPHS = False
    try:
        assert _graphs.prepare(body, cuda) is None
    finally:
        _graphs.GRAPHS = saved_flag


def test_no_graph_and_no_side_stream_on_the_cpu(medgemma):
    feats = capture_mod._ImageFeatures(medgemma, ImageCache(medgemma, workers=False))
    assert feats.fingerprint is None and feats.side is None
    feats.prefetch(["anything"])  # a no-op without a side stream
    assert feats.prefetched == 0
