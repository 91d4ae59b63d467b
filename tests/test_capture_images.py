"""Capture with images: each distinct image processed once and run through the vision tower once per call,
the values those of each prompt run alone; and the batch planner (least padding plus per-forward cost)."""

from __future__ import annotations

import gc
import importlib
import itertools
import os
import random
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import interp
from interp import hf
from interp.capture import layer_output
from interp.models import ImageCache, Prompt, image_key, split_processor

capture_mod = importlib.import_module("interp.capture")  # the module; `interp.capture` is the function
models_mod = importlib.import_module("interp.models")

BODY = interp.prompts.medical()


def _pictures(n: int, seed: int = 0) -> list:
    """``n`` distinct in-memory RGB images (PIL), of a size the processors resize."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * k, 50, 3), dtype=np.uint8)) for k in range(n)]


def paraphrase_corpus(images: list, n: int = 14) -> list[Prompt]:
    """Several questions of each image (some with a report as context), text-only prompts between them."""
    out = []
    for k in range(n):
        context = " ".join(BODY[(k * 3 + j) % len(BODY)] for j in range(k % 4)) or None
        image = images[k % len(images)] if k % 3 else None
        out.append(Prompt(BODY[(k * 5) % len(BODY)], image, context))
    return out


def alone(model: interp.Model, prompt: Prompt, layer: int) -> torch.Tensor:
    """``[pos, d_model]`` of ``layer`` from a plain forward of ``prompt`` by itself (the processor's full call)."""
    kept = {}
    handle = model.layer(layer).register_forward_hook(lambda _m, _a, o: kept.__setitem__(0, layer_output(o)[0]))
    try:
        with torch.inference_mode():
            model.hf(**model.encode([prompt]).inputs, use_cache=False)
    finally:
        handle.remove()
    return kept[0].float()


def _check_alone(model, prompts, acts, layer):
    for k, p in enumerate(prompts):
        want = alone(model, p, layer)
        m = acts.prompt_index == k
        assert torch.equal(acts.position[m], torch.arange(want.shape[0])), k
        torch.testing.assert_close(acts[layer][m], want, rtol=1e-5, atol=1e-5, msg=lambda s, k=k: f"prompt {k}: {s}")


def _body(model):
    return model.hf.model


def _count_vision(monkeypatch, model) -> list[int]:
    """Images per call of the vision tower (``get_image_features``)."""
    calls, body = [], _body(model)
    real = body.get_image_features

    def counting(pixel_values=None, *a, **k):
        calls.append(int(pixel_values.shape[0]))
        return real(pixel_values, *a, **k)

    monkeypatch.setattr(body, "get_image_features", counting)
    return calls


def _count_image_processing(monkeypatch, model) -> list[int]:
    """Calls of the image processor (resize, rescale, normalise), whoever makes them."""
    calls, ip = [], model.processor.image_processor
    real = ip.preprocess
    lock = threading.Lock()

    def counting(*a, **k):
        with lock:
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ip, "preprocess", counting)
    return calls


def _warm(model):
    """The once-per-model probes (image token count, the split check) before counting."""
    interp.capture(model, [Prompt("Is this a warm-up?", _pictures(1, seed=9)[0])], layers=[0], progress=False)


# ---- values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_medgemma", "tiny_llava"])
@pytest.mark.parametrize("sort", [True, False])
def test_rows_equal_each_prompt_run_alone_with_images_shared_by_many_prompts(request, which, sort, xray_images):
    model = request.getfixturevalue(which)
    prompts = paraphrase_corpus([*xray_images, *_pictures(2)])
    layer = model.n_layers - 2
    acts = interp.capture(model, prompts, layers=[layer], positions="all", batch_size=3, batch_tokens=400,
                          sort=sort, progress=False)
    _check_alone(model, prompts, acts, layer)


def test_rows_equal_alone_when_the_forward_takes_pixel_values_only(tiny_medgemma, xray_images, monkeypatch):
    """Older transformers (no ``mm_encoder_outputs``): pixel values go in every forward, processed once."""
    monkeypatch.setattr(capture_mod, "_takes_image_features", lambda model: False)
    prompts = paraphrase_corpus(xray_images)
    _warm(tiny_medgemma)
    vision, processing = _count_vision(monkeypatch, tiny_medgemma), _count_image_processing(monkeypatch, tiny_medgemma)
    acts = interp.capture(tiny_medgemma, prompts, layers=[3], positions="all", batch_size=4, progress=False)
    shown = [p for p in prompts if p.image is not None]
    assert len(processing) == len({p.image for p in shown}) and sum(vision) == len(shown)
    _check_alone(tiny_medgemma, prompts, acts, 3)


def test_rows_equal_alone_when_the_processor_cannot_be_split(tiny_llava, xray_images, monkeypatch):
    monkeypatch.setattr(models_mod, "split_processor", lambda model: None)
    prompts = paraphrase_corpus(xray_images, 8)
    _warm(tiny_llava)
    vision = _count_vision(monkeypatch, tiny_llava)
    acts = interp.capture(tiny_llava, prompts, layers=[2], positions="all", batch_size=3, progress=False)
    assert sum(vision) == sum(p.image is not None for p in prompts)  # the full call, as before
    _check_alone(tiny_llava, prompts, acts, 2)


@pytest.mark.parametrize("which", ["tiny_medgemma", "tiny_llava"])
def test_image_features_merged_into_the_embeddings_give_the_forwards_own_merge(request, which, xray_images):
    """`hf.embeds_with_image_features` (what capture passes) against the forward merging the same features
    itself (``mm_encoder_outputs``): the same layer outputs, bit for bit, on a padded batch of two images."""
    model = request.getfixturevalue(which)
    body = _body(model)
    batch = model.encode([Prompt(BODY[0], xray_images[0]), Prompt(BODY[1] + " " + BODY[2], xray_images[1]),
                          Prompt(BODY[3])])
    with torch.inference_mode():
        per_row = hf.image_features(body, batch.inputs["pixel_values"])
        merged = hf.embeds_with_image_features(body, batch.inputs, per_row, batch.input_ids)
        assert set(merged) >= {"inputs_embeds", "attention_mask"} and not {"input_ids", "pixel_values"} & set(merged)
        outs = []
        for inputs in (merged, hf.with_image_features(body, batch.inputs, per_row)):
            kept = {}
            h = model.layer(1).register_forward_hook(lambda _m, _a, o, kept=kept: kept.__setitem__(0, layer_output(o)))
            try:
                model.hf(**inputs, use_cache=False)
            finally:
                h.remove()
            outs.append(kept[0])
    assert torch.equal(outs[0], outs[1])


def test_image_features_that_do_not_fit_the_image_tokens_are_refused(tiny_medgemma, xray_images):
    body = _body(tiny_medgemma)
    batch = tiny_medgemma.encode([Prompt(BODY[0], xray_images[0])])
    with torch.inference_mode():
        per_row = hf.image_features(body, batch.inputs["pixel_values"])
        with pytest.raises(hf.Unsupported, match="image tokens"):
            hf.embeds_with_image_features(body, batch.inputs, per_row[:, 1:], batch.input_ids)


def test_capture_with_images_reads_nothing_back_from_the_device_inside_the_forward(tiny_medgemma, xray_images,
                                                                                    monkeypatch):
    """The forward's own image merge reads the image-token count back to the host (twice per forward: a sync
    that drains the GPU's kernel queue); capture merges the features itself, so transformers' modelling code
    reads nothing back during a capture."""
    import traceback

    prompts = paraphrase_corpus(xray_images)
    _warm(tiny_medgemma)
    reads = []
    real_item, real_bool = torch.Tensor.item, torch.Tensor.__bool__

    def noted(real):
        def call(self):
            if any("modeling_" in f.filename for f in traceback.extract_stack()):
                reads.append(traceback.extract_stack()[-2])
            return real(self)
        return call

    monkeypatch.setattr(torch.Tensor, "item", noted(real_item))
    monkeypatch.setattr(torch.Tensor, "__bool__", noted(real_bool))
    acts = interp.capture(tiny_medgemma, prompts, layers=[3], positions="all", batch_size=4, progress=False)
    monkeypatch.undo()
    assert reads == []
    _check_alone(tiny_medgemma, prompts, acts, 3)


def test_capture_falls_back_to_the_forwards_merge_when_the_counts_differ(tiny_medgemma, xray_images, monkeypatch):
    def mismatch(*a, **k):
        raise hf.Unsupported("image features and image tokens do not match")

    monkeypatch.setattr(capture_mod.hf, "embeds_with_image_features", mismatch)
    prompts = paraphrase_corpus(xray_images, 8)
    acts = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", batch_size=3, progress=False)
    _check_alone(tiny_medgemma, prompts, acts, 2)


# ---- each distinct image once --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_medgemma", "tiny_llava"])
def test_each_distinct_image_is_processed_and_encoded_once_per_call(request, which, xray_images, monkeypatch):
    model = request.getfixturevalue(which)
    pictures = _pictures(3)
    prompts = [Prompt(BODY[k], xray_images[(k // 2) % 2] if k % 2 else pictures[k % 3]) for k in range(24)]
    _warm(model)
    vision, processing = _count_vision(monkeypatch, model), _count_image_processing(monkeypatch, model)
    acts = interp.capture(model, prompts, layers=[1], batch_size=4, progress=False)
    assert len(processing) == 5  # 3 in memory + 2 files, for 24 prompts
    assert vision == [1] * 5  # one tower call per distinct image, each image alone
    ref = torch.stack([alone(model, p, 1)[-1] for p in prompts])
    torch.testing.assert_close(acts[1], ref, rtol=1e-5, atol=1e-5)
    vision.clear()
    interp.capture(model, prompts[:4], layers=[1], progress=False)
    assert len(vision) == 4  # the cache lives for one call: the next one encodes its images again


def test_features_dropped_for_room_are_computed_again_with_the_same_values(tiny_medgemma, xray_images, monkeypatch):
    prompts = [Prompt(BODY[k], xray_images[k % 3]) for k in range(12)]
    reference = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", batch_size=2, sort=False,
                               progress=False)
    monkeypatch.setattr(capture_mod, "FEATURE_CACHE_BYTES", 1)  # room for one image's features
    monkeypatch.setattr(capture_mod, "IMAGE_CACHE_BYTES", 1)  # and one image's pixels (but those queued batches hold)
    vision = _count_vision(monkeypatch, tiny_medgemma)
    acts = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", batch_size=2, sort=False,
                          progress=False)
    assert sum(vision) > 3
    assert torch.equal(acts[2], reference[2]) and torch.equal(acts.position, reference.position)


@pytest.mark.parametrize("which", ["tiny_medgemma", "tiny_llava"])
@pytest.mark.parametrize("features", [True, False])
def test_images_a_queued_batch_needs_are_not_dropped_for_room(request, which, features, monkeypatch):
    """With room for one image's pixels, every batch queued ahead still finds its images: each distinct image
    is processed once per call (not again on the forward's thread, nor when a later batch is planned or
    encoded), and the values are those of each prompt run alone."""
    model = request.getfixturevalue(which)
    if not features:  # older transformers: pixel values in every batch
        monkeypatch.setattr(capture_mod, "_takes_image_features", lambda model: False)
    pictures = _pictures(8, seed=3)
    # two shards with four images of their own, each image shown by three prompts in three batches
    prompts = [Prompt(BODY[k % len(BODY)], pictures[k % 4 + 4 * (k // 12)]) for k in range(24)]
    _warm(model)
    made = []

    class Recorded(ImageCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(capture_mod, "ImageCache", Recorded)
    monkeypatch.setattr(capture_mod, "IMAGE_CACHE_BYTES", 1)
    processing = _count_image_processing(monkeypatch, model)
    acts = interp.capture(model, prompts, layers=[2], positions="all", batch_size=2, sort=False, shard_size=12,
                          progress=False)
    assert len(processing) == 8 and made[0].processed == 8
    _check_alone(model, prompts, acts, 2)


def test_a_held_image_stays_until_released_and_the_bytes_count_it(tiny_medgemma):
    cache = ImageCache(tiny_medgemma, max_bytes=1)  # room for no image: each finished one drops the others
    a, b, c = _pictures(3, seed=4)
    with ThreadPoolExecutor(2) as pool:
        key_a = cache.submit(a, pool, hold=True)
        key_b = cache.submit(b, pool, hold=True)
        cache.submit(b, pool, hold=True)  # a second holder of b
    assert (key_a, key_b) == (image_key(a), image_key(b))
    with ThreadPoolExecutor(1) as pool:
        cache.submit(c, pool)  # not held, but the newest: it stays until another one finishes
    pa, pb = cache.get(a)[0], cache.get(b)[0]
    assert cache.processed == 3 and cache.nbytes == 3 * pa.nbytes == 3 * pb.nbytes  # past max_bytes, all counted
    cache.release([key_a, key_b])  # a's holder lets go: a and c drop for room, b has a holder left
    assert cache.nbytes == pb.nbytes
    assert cache.get(b)[0] is pb and cache.processed == 3
    cache.release([key_b])
    cache.get(a)
    assert cache.processed == 4  # a, dropped, processed again when asked for
    assert cache.get(b)[0] is not pb and cache.processed == 5  # and b, once nothing held it
    cache.clear()
    assert cache.nbytes == 0


def test_at_most_max_held_images_are_held_and_one_not_held_can_go(tiny_medgemma):
    """Holds are bounded by distinct images (``max_held``), so what queued batches pin stays bounded whatever
    the shard size; a second hold of an image already held is always taken, an image past the bound is not
    held (None) and may be dropped for room and processed again."""
    cache = ImageCache(tiny_medgemma, max_bytes=1, max_held=2)
    a, b, c = _pictures(3, seed=5)
    with ThreadPoolExecutor(1) as pool:
        keys = [cache.submit(x, pool, hold=True) for x in (a, b, c, a)]
    assert keys == [image_key(a), image_key(b), None, image_key(a)]
    cache.get(c)
    assert cache.processed == 3
    cache.release([image_key(b)])  # b and c are unheld now: both go for room (the bytes are past max_bytes)
    cache.get(c)
    assert cache.processed == 4  # c processed again; a (held twice) stays
    cache.get(a)
    assert cache.processed == 4


@pytest.mark.parametrize("held", [16, 8])
def test_every_image_distinct_and_shards_of_them_queued_ahead(tiny_medgemma, monkeypatch, held):
    """Each prompt with its own image, shards of 8, no room for unheld pixels: with room to hold two shards'
    images (16) each image is processed once; with room for one shard (8) the one planned ahead holds
    none, so some are processed twice, but never more than twice, and the values are right either way."""
    monkeypatch.setattr(capture_mod, "IMAGE_CACHE_BYTES", 1)
    monkeypatch.setattr(capture_mod, "HELD_IMAGES", held)
    prompts = [Prompt(BODY[k % len(BODY)], img) for k, img in enumerate(_pictures(32, seed=11))]
    _warm(tiny_medgemma)
    processing = _count_image_processing(monkeypatch, tiny_medgemma)
    acts = interp.capture(tiny_medgemma, prompts, layers=[2], positions="all", batch_size=2, shard_size=8,
                          progress=False)
    assert len(processing) == 32 if held == 16 else 32 <= len(processing) <= 64
    _check_alone(tiny_medgemma, prompts, acts, 2)


def test_unheld_pixels_alone_are_bounded_by_max_bytes(tiny_medgemma):
    """Held entries come on top of ``max_bytes``: holding images does not push the unheld ones out."""
    a, b, c = _pictures(3, seed=6)
    with ThreadPoolExecutor(1) as pool:
        probe = ImageCache(tiny_medgemma)
        size = probe.get(a)[0].nbytes
        cache = ImageCache(tiny_medgemma, max_bytes=size)  # room for one unheld image
        cache.submit(a, pool, hold=True)
        cache.submit(b, pool)
        cache.submit(c, pool)
    assert cache.processed == 3 and cache.nbytes == 2 * size  # a (held) and c, the newest unheld one
    cache.get(c)
    assert cache.processed == 3
    cache.get(b)
    assert cache.processed == 4  # b was the one dropped


def test_merged_features_of_another_width_are_refused(tiny_medgemma, xray_images):
    body = _body(tiny_medgemma)
    batch = tiny_medgemma.encode([Prompt(BODY[0], xray_images[0])])
    with torch.inference_mode():
        per_row = hf.image_features(body, batch.inputs["pixel_values"])
        n, d = per_row.shape[-2:]
        wider = torch.zeros(per_row.shape[0], n // 2, 2 * d)  # as many values, rows twice as wide
        with pytest.raises(hf.Unsupported, match="width"):
            hf.embeds_with_image_features(body, batch.inputs, wider, batch.input_ids)


def test_the_image_caches_are_freed_when_the_call_ends(tiny_medgemma, xray_images, monkeypatch):
    made = []

    class Recorded(ImageCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(capture_mod, "ImageCache", Recorded)
    interp.capture(tiny_medgemma, paraphrase_corpus(xray_images), layers=[1], progress=False)
    gc.collect()
    assert len(made) == 1 and made[0]() is None


def test_encode_with_an_image_cache_gives_the_inputs_of_the_full_call(tiny_medgemma, tiny_llava, xray_images):
    for model in (tiny_medgemma, tiny_llava):
        prompts = paraphrase_corpus([*xray_images, *_pictures(2)], 10)
        plain = model.encode(prompts)
        cache = ImageCache(model)
        cached = model.encode(prompts, images=cache)
        assert cache.split is not None and cache.processed == len({image_key(p.image) for p in prompts if p.image})
        assert plain.inputs.keys() == cached.inputs.keys()
        for k, v in plain.inputs.items():
            assert torch.equal(v, cached.inputs[k]), (model.name, k)
        for k in ("lengths", "question_mask", "special_mask", "image_mask"):
            assert torch.equal(getattr(plain, k), getattr(cached, k)), (model.name, k)
        assert cached.image_keys == tuple(image_key(p.image) for p in prompts)
        bare = model.encode(prompts, images=cache, pixel_values=False)
        assert "pixel_values" not in bare.inputs and torch.equal(bare.input_ids, plain.input_ids)
        assert cache.processed == len({image_key(p.image) for p in prompts if p.image})  # nothing processed again


def test_a_question_mask_that_cannot_be_carried_over_takes_the_full_call(tiny_medgemma, xray_images, monkeypatch):
    """If the expanded ids do not end in the unexpanded ones from the question on, the processor's own call
    gives the prompt's inputs (the mask is then its own)."""
    prompt = Prompt("Is there an effusion?", xray_images[0])
    plain = tiny_medgemma.encode([prompt])
    cache = ImageCache(tiny_medgemma)
    real = type(cache.split).expand
    monkeypatch.setattr(type(cache.split), "expand", lambda self, t, r: (lambda ids, ty: (ids[:-1] + [3], ty))(
        *real(self, t, r)))
    calls = _count_image_processing(monkeypatch, tiny_medgemma)
    got = tiny_medgemma.encode([prompt], images=cache)
    assert len(calls) == 2  # the cache's processing, then the full call
    assert torch.equal(got.input_ids, plain.input_ids) and torch.equal(got.question_mask, plain.question_mask)


def test_threads_asking_for_one_image_wait_for_one_processing(tiny_medgemma, xray_images, monkeypatch):
    cache = ImageCache(tiny_medgemma)
    assert cache.split is not None
    real, started = cache.split.split.process_image, threading.Barrier(8)
    gate = threading.Event()

    def slow(image):
        gate.wait(5)
        return real(image)

    monkeypatch.setattr(cache.split.split, "process_image", slow)
    pictures = _pictures(2)

    def shown(k):
        return xray_images[0] if k % 4 == 0 else pictures[k % 2]

    def ask(k):
        started.wait(5)
        return cache.get(shown(k))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, k) for k in range(8)]
        threading.Timer(0.2, gate.set).start()
        results = [f.result(10) for f in futures]
    assert cache.processed == 3  # two in memory and one file, for eight askers
    for j, k in itertools.combinations(range(8), 2):  # one processing, handed to every asker of that image
        assert (results[j][0] is results[k][0]) == (image_key(shown(j)) == image_key(shown(k)))
    with ThreadPoolExecutor(2) as pool:
        cache.submit(pictures[0], pool)  # already there: nothing queued
    assert cache.processed == 3


def test_image_key_names_a_file_by_path_and_version_and_an_object_by_identity(tmp_path, xray_images):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.open(xray_images[0]).save(path)
    first = image_key(str(path))
    assert first == image_key(path) == image_key(os.path.relpath(path))
    Image.open(xray_images[1]).resize((120, 90)).save(path)  # edited in place
    assert image_key(str(path)) != first
    a, b = _pictures(2)
    assert image_key(a) == image_key(a) != image_key(b) and image_key(None) is None


def test_split_processor_is_checked_against_the_full_call(monkeypatch):
    model = interp.load("tiny-medgemma")  # a processor of its own: no earlier answer for it
    real = hf.ProcessorSplit.process_image
    monkeypatch.setattr(hf.ProcessorSplit, "process_image", lambda self, im: (lambda pv, r: (pv + 1e-3, r))(
        *real(self, im)))
    assert split_processor(model) is None  # pixels differ from the processor's own: not trusted
    monkeypatch.undo()
    other = interp.load("tiny-medgemma")
    checked = split_processor(other)
    assert checked is not None and checked.token_types and split_processor(other) is checked
    assert split_processor(interp.Model.wrap(other.hf, other.tokenizer)) is None  # text-only: nothing to split
    prompts = paraphrase_corpus(_pictures(2), 6)
    with_cache = interp.capture(model, prompts, layers=[2], progress=False)  # falls back to the full call
    torch.testing.assert_close(with_cache[2], torch.stack([alone(model, p, 2)[-1] for p in prompts]),
                               rtol=1e-5, atol=1e-5)


def test_a_split_goes_with_its_processor_and_is_checked_once_while_it_lives(monkeypatch):
    """`split_processor`'s cache keeps neither the processor nor the model (a notebook loading several models
    would keep them all), and checks each processor once: for its models, and for threads asking at once."""
    checks, real = [], models_mod._check_split
    monkeypatch.setattr(models_mod, "_check_split", lambda model, *a, **k: checks.append(1) or real(model, *a, **k))
    model = interp.load("tiny-medgemma")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(split_processor, [model] * 8))
    checked = answers[0]
    assert checked is not None and all(a is checked for a in answers) and len(checks) == 1
    assert split_processor(model) is checked and len(checks) == 1  # a live model: not checked again
    rewrapped = interp.Model.wrap(model.hf, model.processor)  # as lora wraps an adapter: another Model, one processor
    assert split_processor(rewrapped) is checked and len(checks) == 1
    ids, types = checked.expand(model.format("Is it?", image=True), checked.process_image(_pictures(1)[0])[1])
    assert ids and types
    gone = [weakref.ref(model.processor), weakref.ref(model), weakref.ref(rewrapped)]
    del model, rewrapped, answers
    gc.collect()
    assert [r() for r in gone] == [None, None, None]  # the cache held none of them
    with pytest.raises(interp.InterpError, match="outlived its processor"):  # a split kept alone says why
        checked.process_image(_pictures(1)[0])
    other = interp.load("tiny-medgemma")
    assert split_processor(other) is not None and len(checks) == 2  # a new processor: checked once more


def test_the_first_batch_of_a_capture_is_small(tiny_medgemma, monkeypatch):
    prompts = [BODY[k % len(BODY)] for k in range(40)]
    shapes, real = [], capture_mod._run_hooked

    def recording(model, batch, *a, **k):
        shapes.append((*batch.input_ids.shape, int(batch.lengths.numel())))  # rows, width, prompts
        return real(model, batch, *a, **k)

    monkeypatch.setattr(capture_mod, "_run_hooked", recording)
    interp.capture(tiny_medgemma, prompts, layers=[0], batch_size=64, batch_tokens=1200, shard_size=20,
                   progress=False)
    rows, width, _ = shapes[0]
    assert rows * width <= 1200 // capture_mod.FIRST_BATCH_SHARE < max(r * w for r, w, _ in shapes[1:])
    assert sum(n for _, _, n in shapes) == 40


# ---- the batch planner -----------------------------------------------------------------------------------
def _cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[j] for j in g) + overhead for g in groups)


def _old_greedy(lengths, batching, order):
    """The planner before: fill each batch in ``order`` up to the limits (written out again here)."""
    groups, cur, longest = [], [], 0
    for j in order:
        if cur and (len(cur) >= batching.batch_size or (len(cur) + 1) * max(longest, lengths[j]) > batching.batch_tokens):
            groups.append(sorted(cur))
            cur, longest = [], 0
        cur.append(j)
        longest = max(longest, lengths[j])
    return groups + ([sorted(cur)] if cur else [])


def _valid(lengths, groups, batching, first=None):
    assert sorted(j for g in groups for j in g) == list(range(len(lengths)))  # each prompt exactly once
    for k, g in enumerate(groups):
        cap = first if first is not None and k == 0 else batching.batch_tokens
        assert g == sorted(g) and len(g) <= batching.batch_size
        assert len(g) == 1 or len(g) * max(lengths[j] for j in g) <= cap, (g, cap)


def _brute_force(lengths, batching):
    """The least cost over every cut of the length-sorted order into consecutive runs."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n, best = len(order), None
    for cuts in itertools.product([False, True], repeat=n - 1):
        groups, cur = [], [order[0]]
        for j, cut in zip(order[1:], cuts, strict=True):
            if cut:
                groups.append(cur)
                cur = []
            cur.append(j)
        groups.append(cur)
        try:
            _valid(lengths, [sorted(g) for g in groups], batching)
        except AssertionError:
            continue
        c = _cost(lengths, groups, batching.overhead)
        best = c if best is None else min(best, c)
    return best


def test_the_planner_costs_no_more_than_greedy_and_keeps_the_limits():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 300)
        lengths = [rng.randint(20, 1200) for _ in range(n)]
        b = capture_mod._Batching(rng.choice([1, 4, 16, 64]), rng.choice([600, 4096, 16384]), True,
                                  rng.choice([0, 256, 1024]))
        groups = capture_mod._plan(lengths, b)
        _valid(lengths, groups, b)
        order = sorted(range(n), key=lengths.__getitem__)
        assert _cost(lengths, groups, b.overhead) <= _cost(lengths, _old_greedy(lengths, b, order), b.overhead)
        first = b.batch_tokens // 4
        _valid(lengths, capture_mod._plan(lengths, b, first_tokens=first), b, first)


def test_the_planner_finds_the_least_cost_plan():
    rng = random.Random(1)
    for _ in range(150):
        n = rng.randint(1, 10)
        lengths = [rng.randint(5, 200) for _ in range(n)]
        b = capture_mod._Batching(rng.randint(1, 6), rng.choice([150, 300, 800]), True, rng.choice([0, 50, 300]))
        assert _cost(lengths, capture_mod._plan(lengths, b), b.overhead) == _brute_force(lengths, b)


def test_sort_false_keeps_the_caller_order_greedy_batches_and_one_length_gets_them_sorted_too():
    rng = random.Random(2)
    for _ in range(100):
        n = rng.randint(1, 80)
        lengths = [rng.randint(5, 500) for _ in range(n)]
        b = capture_mod._Batching(rng.randint(1, 16), rng.choice([200, 1000, 4000]), False, 256)
        assert capture_mod._plan(lengths, b) == _old_greedy(lengths, b, range(n))
        same = [rng.randint(5, 500)] * n
        assert capture_mod._plan(same, b._replace(sort=True)) == capture_mod._plan(same, b)


def test_the_planner_pads_less_than_greedy_on_a_ragged_corpus():
    rng = random.Random(3)
    lengths = [rng.randint(40, 600) + (256 if k % 2 else 0) for k in range(128)]
    b = capture_mod._Batching(64, 16384, True, capture_mod.BATCH_OVERHEAD_TOKENS["cuda"])
    order = sorted(range(128), key=lengths.__getitem__)
    dp, greedy = capture_mod._plan(lengths, b), _old_greedy(lengths, b, order)
    assert _cost(lengths, dp, b.overhead) < _cost(lengths, greedy, b.overhead)
    padded = sum(len(g) * max(lengths[j] for j in g) for g in dp)
    assert padded < sum(len(g) * max(lengths[j] for j in g) for g in greedy)
