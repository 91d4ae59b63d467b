"""The vision pass as a CUDA graph (`interp._graphs`) and image preprocessing in worker processes
(`interp._imageworkers`) give the same bits as the eager pass and the preprocessing threads, on the GPU."""

from __future__ import annotations

import pytest
import torch

import interp
from interp import _graphs, _imageworkers, hf
from interp.models import ImageCache, Prompt

from .conftest import DEVICE


def _body(model):
    return hf.base_model(model.hf).model


def _pixels(model, images):
    cache = ImageCache(model, workers=False)
    return [cache.get(img)[0].to(model.device) for img in images]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_vision_graph_replays_the_eager_pass_bit_for_bit(medgemma, cxr_images, record):
    body = _body(medgemma)
    pixels = _pixels(medgemma, cxr_images[:6])
    _graphs.clear()
    fp = _graphs.prepare(body, medgemma.device)
    assert fp is not None
    with torch.inference_mode():
        eager = [hf.image_features(body, p) for p in pixels]
        first = _graphs.vision_pass(body, pixels[0], fp)  # builds the graph, returns its own eager pass
        graph = _graphs._graphs[body][(tuple(pixels[0].shape), pixels[0].dtype)]
        assert graph is not None, "the graph did not reproduce the eager pass (see the warning)"
        replayed = [_graphs.vision_pass(body, p, fp) for p in pixels]
    assert torch.equal(first, eager[0])
    worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(replayed, eager, strict=True))
    record("vision graph vs eager, 6 images", max_abs_diff=worst)
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager, strict=True))
    # distinct images give distinct features: the replay reads each new input, not the first one again
    assert not torch.equal(replayed[0], replayed[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_vision_graph_follows_replaced_and_edited_weights(medgemma, cxr_images):
    body = _body(medgemma)
    pixels = _pixels(medgemma, cxr_images[:1])[0]
    weight = body.vision_tower.encoder.layers[1].mlp.fc1.weight
    saved = weight.data
    _graphs.clear()
    try:
        with torch.inference_mode():
            _graphs.vision_pass(body, pixels, _graphs.prepare(body, medgemma.device))
            weight.data = saved.clone() * 1.5  # a new tensor: the graph read the old one's address
            fp = _graphs.prepare(body, medgemma.device)
            out = _graphs.vision_pass(body, pixels, fp)  # rebuilt for the new address
            assert torch.equal(out, hf.image_features(body, pixels))
            weight.data.mul_(0.5)  # edited in place: same address, the graph reads the new values
            assert torch.equal(_graphs.vision_pass(body, pixels, fp), hf.image_features(body, pixels))
    finally:
        weight.data = saved
        _graphs.clear()


@pytest.mark.skipif(DEVICE != "cuda", reason="worker processes and graphs are the GPU defaults")
def test_capture_with_workers_and_graphs_equals_threads_and_eager(medgemma, cxr_images, record):
    assert _imageworkers.pool(wait=True) is not None
    questions = ["Is there a pleural effusion?", "Any pneumothorax on this radiograph?"]
    prompts = [Prompt(questions[k % 2] * (1 + k % 3), image=img if k % 3 else None)
               for k, img in enumerate(cxr_images * 2)]
    layers = [5, 17]
    import importlib

    cap = importlib.import_module("interp.capture")
    real, prefetched = cap._ImageFeatures.prefetch, []

    def spy(self, keys):
        real(self, keys)
        prefetched.append(self.prefetched)

    _graphs.clear()
    cap._ImageFeatures.prefetch = spy
    try:
        fast = interp.capture(medgemma, prompts, layers=layers, positions="all", batch_size=8, progress=False)
        fast2 = interp.capture(medgemma, prompts, layers=layers, positions="all", batch_size=8, progress=False)
    finally:
        cap._ImageFeatures.prefetch = real
    graphs = [g for per in _graphs._graphs.values() for g in per.values()]
    assert graphs and all(g is not None for g in graphs)
    assert max(prefetched) > 0, "no vision pass was queued ahead on the side stream"
    saved = _graphs.GRAPHS
    _graphs.GRAPHS, ImageCache.workers = False, False
    try:
        plain = interp.capture(medgemma, prompts, layers=layers, positions="all", batch_size=8, progress=False)
    finally:
        _graphs.GRAPHS, ImageCache.workers = saved, None
    worst = max(float((fast[i].float() - plain[i].float()).abs().max()) for i in layers)
    record("capture: worker processes + vision graph vs threads + eager", max_abs_diff=worst, rows=len(plain),
           prefetched=max(prefetched))
    for i in layers:
        assert torch.equal(fast[i], plain[i]) and torch.equal(fast2[i], plain[i])
    assert torch.equal(fast.prompt_index, plain.prompt_index) and torch.equal(fast.position, plain.position)
