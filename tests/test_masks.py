"""Attention masks built from the batch (`hf.causal_masks`, `hf.prepared_masks`): element for element the masks
Gemma 3's own forward builds (recorded on their way into the decoder), and the same activations bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import interp
from interp import hf
from interp.models import Prompt

BODY = interp.prompts.medical()


def _pictures(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * k, 50, 3), dtype=np.uint8)) for k in range(n)]


def _own_masks(model: interp.Model, inputs: dict) -> dict:
    """The masks the model's forward builds for ``inputs``, as its decoder receives them (transformers' code)."""
    body = model.hf.model
    seen = {}

    def record(_m, _a, kwargs):
        seen["masks"] = kwargs["attention_mask"]

    handle = body.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.hf(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["masks"]


def _ours(model: interp.Model, inputs: dict, padded: bool) -> dict:
    text = model.hf.config.get_text_config()
    return hf.causal_masks(inputs["attention_mask"], inputs.get("token_type_ids"), text.sliding_window,
                           text.layer_types, padded)


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        if t is None:
            assert ours[k] is None, k
        else:
            assert ours[k] is not None and ours[k].shape == t.shape and ours[k].dtype == t.dtype, k
            assert torch.equal(ours[k], t), f"{k}: {(ours[k] != t).sum().item()} elements differ"


def _checks(model: interp.Model) -> dict:
    """The prepared-mask checks made for ``model``'s body: {(images?, padded?, window reached?, ...): passed}."""
    return dict(hf._MASKS_CHECKED.get(model.hf.model, {}))


@pytest.fixture(autouse=True)
def _fresh_checks():
    hf._MASKS_CHECKED.clear()
    yield
    hf._MASKS_CHECKED.clear()


def test_image_batch_masks_equal_the_forwards_own(medgemma):
    """Padding, an image at the start of a row, two images in one row, rows without images, rows longer than the
    16-token window (tiny-medgemma's): every element of both masks as transformers builds them."""
    a, b = _pictures(2)
    cases = [
        [Prompt(BODY[0], a), Prompt(" ".join(BODY[:4]), None), Prompt(BODY[3], b)],
        [Prompt(" ".join(BODY[:3]), a, " ".join(BODY[3:6])), Prompt(BODY[1], a)],
    ]
    for prompts in cases:
        batch = medgemma.encode(prompts)
        assert "token_type_ids" in batch.inputs and int(batch.inputs["token_type_ids"].sum()) > 0
        padded = bool((batch.lengths < batch.lengths.max()).any())
        _assert_same(_ours(medgemma, batch.inputs, padded), _own_masks(medgemma, batch.inputs))
    # two image blocks in one row: blocks are numbered per run of soft tokens, each bidirectional only inside itself
    batch = medgemma.encode([Prompt(BODY[0], a)])
    types = batch.inputs["token_type_ids"]
    ids, attn = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    start = int(types[0].nonzero()[0])
    n_img = int(types[0].sum())
    doubled = {"input_ids": torch.cat([ids, ids[:, start:start + n_img], ids[:, -3:]], 1),
               "attention_mask": torch.ones(1, ids.shape[1] + n_img + 3, dtype=attn.dtype),
               "token_type_ids": torch.cat([types, types[:, start:start + n_img], torch.zeros_like(ids[:, -3:])], 1)}
    text = medgemma.hf.config.get_text_config()
    own = _own_masks(medgemma, {**doubled, "pixel_values": torch.cat([batch.inputs["pixel_values"]] * 2)})
    _assert_same(hf.causal_masks(doubled["attention_mask"], doubled["token_type_ids"], text.sliding_window,
                                 text.layer_types, False), own)
    q, kv = ids.shape[1] + 1, start + 1  # a soft token of the second image, one of the first: causal only
    assert own["full_attention"][0, 0, q, kv] and not own["full_attention"][0, 0, kv, q]


def test_text_batch_masks_equal_the_forwards_own_none_included(medgemma):
    """Without images the forward skips a mask where SDPA's causal path gives the same: no padding, and on sliding
    layers a batch shorter than the window. The prepared masks make the same decision from the host's padding."""
    long, short = " ".join(BODY[:4]), "Is it?"
    for prompts in ([long, BODY[0]], [long, long], [short, short]):
        batch = medgemma.encode(prompts)
        padded = bool((batch.lengths < batch.lengths.max()).any())
        own = _own_masks(medgemma, batch.inputs)
        _assert_same(_ours(medgemma, batch.inputs, padded), own)
    assert own == {"full_attention": None, "sliding_attention": None}  # the short unpadded batch


def _capture(model, prompts, **kw):
    """Padded batches (``pack=False``): the masks under test are those of padded batches (packed rows:
    tests/test_packing.py)."""
    return interp.capture(model, prompts, layers=[1, model.n_layers - 1], positions="all", progress=False,
                          pack=False, **kw)


def test_capture_with_prepared_masks_equals_the_forwards_own_bit_for_bit(medgemma, monkeypatch):
    a, b = _pictures(2)
    prompts = [Prompt(" ".join(BODY[(3 * k + j) % len(BODY)] for j in range(1 + k % 4)), [None, a, b][k % 3])
               for k in range(10)] + [" ".join(BODY[:5]), BODY[2], "Is it?", "Is it?"]
    layers = [1, medgemma.n_layers - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _capture(medgemma, prompts, batch_size=4)  # checks each kind of batch (images, text) once
        assert {k[0] for k, ok in _checks(medgemma).items() if ok} == {False, True}
        used = []
        real = hf.causal_masks
        monkeypatch.setattr(hf, "causal_masks", lambda *a, **k: used.append(1) or real(*a, **k))
        second = _capture(medgemma, prompts, batch_size=4)
        assert used, "the checked masks were never used"
    monkeypatch.setattr(hf, "_mask_plan", lambda body: None)  # transformers' own masks everywhere
    plain = _capture(medgemma, prompts, batch_size=4)
    for layer in layers:
        assert torch.equal(first[layer], plain[layer]) and torch.equal(second[layer], plain[layer])


def test_masks_that_differ_are_never_used(medgemma, monkeypatch):
    """A formula that disagrees with the forward's own (as a transformers release could make it) is caught by the
    first forward's check: one warning, and the forward's own masks from then on (the same values)."""
    a = _pictures(1)[0]
    prompts = [Prompt(BODY[0], a), Prompt(" ".join(BODY[:3]), a), BODY[1]]
    plain = _capture(medgemma, prompts, batch_size=3)
    hf._MASKS_CHECKED.clear()  # that capture checked the real formula: check the broken one
    real = hf.causal_masks

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.get("sliding_attention") is not None:
            out["sliding_attention"] = out["sliding_attention"].clone()
            out["sliding_attention"][0, 0, -1, 0] ^= True
        return out

    monkeypatch.setattr(hf, "causal_masks", off_by_one)
    with pytest.warns(RuntimeWarning, match="attention masks built for image batches differ"):
        got = _capture(medgemma, prompts, batch_size=3)
    assert False in _checks(medgemma).values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _capture(medgemma, prompts, batch_size=3)  # no second warning, still the forward's own masks
    for layer in (1, medgemma.n_layers - 1):
        assert torch.equal(got[layer], plain[layer]) and torch.equal(again[layer], plain[layer])


def test_masks_are_left_to_the_forward_where_they_cannot_be_prepared(medgemma, tiny_llava):
    batch = medgemma.encode([Prompt(BODY[0], _pictures(1)[0]), BODY[1]])
    body = medgemma.hf.model
    for inputs, kw in [({**batch.inputs, "cache": object()}, {}), ({**batch.inputs, "use_cache": True}, {}),
                       ({**batch.inputs, "position_ids": torch.arange(3)}, {}),
                       ({k: v for k, v in batch.inputs.items() if k != "token_type_ids"}, {})]:  # padding unknown
        with hf.prepared_masks(body, inputs, **kw) as run:
            assert run is inputs
    llava = tiny_llava.encode(["Is it?"]).inputs
    with hf.prepared_masks(tiny_llava.hf.model, llava, padded=False) as run:
        assert run is llava  # not a Gemma 3 body
    eager = medgemma.hf.config.get_text_config()
    saved = eager._attn_implementation
    try:
        eager._attn_implementation = "eager"  # float masks there: not these
        with hf.prepared_masks(body, batch.inputs, padded=True) as run:
            assert run is batch.inputs
    finally:
        eager._attn_implementation = saved


@pytest.mark.slow
def test_text_body_masks_checked_and_used_on_gemma3_270m(gemma270m, monkeypatch):
    """Gemma 3 270M's text body builds its masks inside its forward: they are recorded at the first layer of each
    type, and the capture is the same bit for bit."""
    prompts = [" ".join(BODY[:6]), BODY[0], BODY[1], " ".join(BODY[2:4])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = interp.capture(gemma270m, prompts, layers=[3, 8], positions="all", progress=False, pack=False)
        assert _checks(gemma270m) and all(_checks(gemma270m).values())
        second = interp.capture(gemma270m, prompts, layers=[3, 8], positions="all", progress=False, pack=False)
    monkeypatch.setattr(hf, "_mask_plan", lambda body: None)
    plain = interp.capture(gemma270m, prompts, layers=[3, 8], positions="all", progress=False, pack=False)
    for layer in (3, 8):
        assert torch.equal(first[layer], plain[layer]) and torch.equal(second[layer], plain[layer])


@pytest.mark.parametrize("with_images", [False, True])
def test_a_checked_capture_reads_nothing_back_in_transformers_code(medgemma, with_images, monkeypatch):
    """Once checked, the forward's masks cost no device-to-host read: the text batches' "is a mask needed?" test
    read the padding mask back (twice per mask, each draining the GPU's kernel queue), and no longer runs."""
    import traceback

    a, b = _pictures(2)
    prompts = [Prompt(" ".join(BODY[(3 * k + j) % len(BODY)] for j in range(1 + k % 4)),
                      [None, a, b][k % 3] if with_images else None) for k in range(9)]
    _capture(medgemma, prompts, batch_size=3)  # the check
    reads = []
    real_item, real_bool = torch.Tensor.item, torch.Tensor.__bool__

    def noted(real):
        def call(self):
            stack = traceback.extract_stack()
            if any("modeling_" in f.filename or "masking_utils" in f.filename for f in stack):
                reads.append(stack[-2])
            return real(self)

        return call

    monkeypatch.setattr(torch.Tensor, "item", noted(real_item))
    monkeypatch.setattr(torch.Tensor, "__bool__", noted(real_bool))
    _capture(medgemma, prompts, batch_size=3)
    monkeypatch.undo()
    assert reads == []


def test_a_batch_whose_masks_are_all_left_out_does_not_check_the_padded_ones(medgemma, monkeypatch):
    """An unpadded batch shorter than the window needs no mask at all, so its check says nothing about the masks
    of a padded batch: those are checked on the first padded batch, and a wrong formula is caught there."""
    capture_short = _capture(medgemma, ["Is it?", "Is it?"], batch_size=2)
    assert [k[:3] for k in _checks(medgemma)] == [(False, False, False)] and all(_checks(medgemma).values())
    real = hf.causal_masks

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return {k: None if v is None else ~v for k, v in out.items()}

    monkeypatch.setattr(hf, "causal_masks", wrong)
    prompts = [" ".join(BODY[:3]), BODY[0]]
    with pytest.warns(RuntimeWarning, match="attention masks built for text batches differ"):
        got = _capture(medgemma, prompts, batch_size=2)
    monkeypatch.setattr(hf, "_mask_plan", lambda body: None)
    plain = _capture(medgemma, prompts, batch_size=2)
    assert torch.equal(got[1], plain[1]) and len(capture_short) > 0


def test_each_class_of_batch_is_checked_before_its_masks_are_used(medgemma, monkeypatch):
    """Image batches padded or not, within the sliding window or reaching it, use different branches of the
    formula: each class is checked on its first batch. A formula wrong only where the window cuts (as a release
    that moved the window's edge would make it) is caught on the first batch that reaches the window, though a
    shorter batch of the same kind passed its check."""
    import copy
    import dataclasses

    model = dataclasses.replace(medgemma, hf=copy.deepcopy(medgemma.hf))
    model.hf.config.get_text_config().sliding_window = 30  # the forward's own masks read it too
    a = _pictures(1)[0]
    short, long = [Prompt("Is it?", a)], [Prompt(" ".join(BODY[:4]), a)]  # 25 and 80+ tokens, one row each
    assert model.encode(short).lengths.item() < 30 < model.encode(long).lengths.item()
    _capture(model, short, batch_size=1)
    assert list(_checks(model).items()) == [(next(iter(_checks(model))), True)]
    assert next(iter(_checks(model)))[:3] == (True, False, False)
    real = hf.causal_masks

    def window_moved(attention_mask, token_type_ids, sliding_window, layer_types, padded):
        return real(attention_mask, token_type_ids, sliding_window + 1, layer_types, padded)

    monkeypatch.setattr(hf, "causal_masks", window_moved)
    with pytest.warns(RuntimeWarning, match="differ"):
        got = _capture(model, long, batch_size=1)
    assert sorted((k[:3], ok) for k, ok in _checks(model).items()) == [((True, False, False), True),
                                                                       ((True, False, True), False)]
    monkeypatch.setattr(hf, "_mask_plan", lambda body: None)
    plain = _capture(model, long, batch_size=1)
    assert torch.equal(got[1], plain[1]) and torch.equal(got[model.n_layers - 1], plain[model.n_layers - 1])


def test_another_threads_forward_is_not_taken_for_the_checked_one(medgemma):
    """The check records the masks on their way into the decoder: a forward of the same model on another thread
    while a check is open must not be recorded in its place."""
    import threading

    a = _pictures(1)[0]
    image_batch = medgemma.encode([Prompt(BODY[0], a), Prompt(" ".join(BODY[:2]), None)])
    text_batch = medgemma.encode([" ".join(BODY[:3]), BODY[1]])
    body = medgemma.hf.model
    with torch.inference_mode(), hf.prepared_masks(body, image_batch.inputs, padded=True) as run:
        worker = threading.Thread(target=lambda: medgemma.hf(**text_batch.inputs, use_cache=False))
        worker.start()
        worker.join()
        medgemma.hf(**run, use_cache=False)
    assert list(_checks(medgemma).values()) == [True]


def test_checks_go_with_their_model():
    import gc

    model = interp.load("tiny-medgemma")
    _capture(model, ["Is it?", " ".join(BODY[:2])], batch_size=2)
    assert len(hf._MASKS_CHECKED) == 1
    del model
    gc.collect()
    assert len(hf._MASKS_CHECKED) == 0
