"""Packed rows in `capture` (several prompts end to end in one row, each its own segment): the planner keeps its
limits and never costs more than padded batches, the packed masks equal each prompt's own mask as transformers
builds it, the values equal each prompt run alone, and packing runs only once checked."""

from __future__ import annotations

import importlib
import random
import warnings

import numpy as np
import pytest
import torch
from test_masks import _own_masks  # the masks the model's whole forward builds, as its decoder gets them

import interp
from interp import hf
from interp.models import Prompt

C = importlib.import_module("interp.capture")


def _pictures(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (48 + 5 * k, 40, 3), dtype=np.uint8)) for k in range(n)]


def _ragged(n: int, pictures: list | None = None) -> list[Prompt]:
    """``n`` prompts of 1-12 repeats of a clinical question; every third with a picture where given."""
    rng = random.Random(3)
    words = "Is there a pneumothorax or a pleural effusion on this film".split()
    out = []
    for k in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.choice([rng.randint(2, 12), rng.randint(40, 150)]))) + "?"
        out.append(Prompt(text, pictures[k % len(pictures)] if pictures and k % 3 == 0 else None))
    return out


@pytest.fixture(autouse=True)
def _fresh_checks():
    hf._MASKS_CHECKED.clear()
    yield
    hf._MASKS_CHECKED.clear()


@pytest.fixture
def forwards(monkeypatch) -> dict[str, int]:
    """How many forwards ran with each kind of masks ("packed", "prepared": padded), and how many probes of the
    model's own masks ran ("own", `hf.probe_masks`)."""
    calls = {"packed": 0, "own": 0, "prepared": 0}
    real, probe = C._run_hooked, hf.probe_masks

    def spy(*args, masks="prepared", **kwargs):
        calls[masks] += 1
        return real(*args, masks=masks, **kwargs)

    def probed(*args, **kwargs):
        calls["own"] += 1
        return probe(*args, **kwargs)

    monkeypatch.setattr(C, "_run_hooked", spy)
    monkeypatch.setattr(hf, "probe_masks", probed)
    return calls


# ---- the planner -----------------------------------------------------------------------------------------

def _cost(lengths, groups, overhead):
    return C._plan_cost(lengths, groups, C._Batching(1, 1, True, overhead))


def test_packed_plans_keep_every_limit_and_never_cost_more_than_padded_batches():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 120)
        lengths = [rng.randint(1, rng.choice([30, 300, 1000])) for _ in range(n)]
        b = C._Batching(rng.choice([1, 3, 16, 64]), rng.choice([200, 1000, 4096, 16384]), True,
                        rng.choice([0, 64, 256, 1024]), True)
        first = rng.choice([None, b.batch_tokens // 4])
        groups = C._plan(lengths, b, first_tokens=first)
        plain = C._plan(lengths, b._replace(pack=False), first_tokens=first)
        assert _cost(lengths, groups, b.overhead) <= _cost(lengths, plain, b.overhead)
        seen = sorted(j for g in groups for j in C._group_indices(g))
        assert seen == list(range(n))  # each prompt once
        width = max(lengths)
        for k, g in enumerate(groups):
            cap = first if first is not None and k == 0 else b.batch_tokens
            rows = list(g) if isinstance(g, C._Rows) else [[j] for j in g]
            used = [sum(lengths[j] for j in row) for row in rows]
            assert len(C._group_indices(g)) <= b.batch_size
            if isinstance(g, C._Rows):
                assert max(used) <= width and any(len(r) > 1 for r in rows)
                assert len(rows) == 1 or len(rows) * max(used) <= cap
            else:
                assert g == sorted(g)
                assert len(g) == 1 or len(g) * max(used) <= cap


def test_prompts_of_one_length_are_not_packed_and_get_the_padded_plan():
    b = C._Batching(16, 4096, True, 256, True)
    same = [300] * 40
    assert C._plan(same, b) == C._plan(same, b._replace(pack=False))
    assert not any(isinstance(g, C._Rows) for g in C._plan(same, b))


def test_short_prompts_fill_the_rows_beside_long_ones():
    b = C._Batching(64, 4000, True, 256, True)
    lengths = [1000, 900, 800, 700] + [10] * 60
    groups = C._plan(lengths, b)
    assert all(isinstance(g, C._Rows) for g in groups)
    assert len(groups) == 1 and len(groups[0]) == 4  # four rows of 1000: every short prompt beside a long one
    assert _cost(lengths, groups, 0) == 4000


# ---- the masks ---------------------------------------------------------------------------------------------

def _own_masks_alone(model: interp.Model, prompt: Prompt) -> dict:
    return _own_masks(model, model.encode([prompt]).inputs)


def test_the_probe_records_the_masks_of_the_whole_forward(medgemma):
    inputs = medgemma.encode(_ragged(6, _pictures(2))).inputs
    theirs = _own_masks(medgemma, inputs)
    probe = {k: inputs[k] for k in ("attention_mask", "token_type_ids")}
    with torch.inference_mode():
        probed = hf.probe_masks(medgemma.hf, medgemma.hf.model, probe)
    assert set(probed) == set(theirs)
    for kind, mask in theirs.items():
        assert torch.equal(probed[kind], mask), kind


def test_packed_masks_are_each_prompts_own_mask_as_transformers_builds_it(medgemma):
    """Per prompt, its block of the packed mask is the mask transformers' forward builds for it alone (images:
    the bidirectional image block; tiny-medgemma's 16-token window: reached), and it attends to nothing else."""
    prompts = _ragged(7, _pictures(2))
    batch = medgemma.encode(prompts, device="cpu", images=interp.models.ImageCache(medgemma), pixel_values=False)
    sel = C.position_mask(medgemma, batch, "all", ())
    lengths = batch.lengths.tolist()
    rows = [[0, 1], [2, 3, 4], [5], [6]]
    packed = C._pack(batch, rows, sel, 0)
    text = medgemma.hf.config.get_text_config()
    ours = hf.packed_masks(packed.inputs["position_ids"], packed.inputs.get("token_type_ids"), text.sliding_window,
                           text.layer_types)
    assert packed.inputs.get("token_type_ids") is not None
    for k, r, s, n in packed.places:
        assert n == lengths[k]
        theirs = _own_masks_alone(medgemma, prompts[k])
        for kind, mask in ours.items():
            # None: SDPA's own causal path (a text prompt alone, within the window)
            want = theirs[kind][0, 0] if theirs[kind] is not None else torch.ones(n, n, dtype=torch.bool).tril()
            assert want.shape == (n, n)
            block = mask[r, 0, s:s + n]
            assert torch.equal(block[:, s:s + n], want), kind
            assert int(block.sum()) == int(want.sum()), f"{kind}: prompt {k} attends outside its segment"
    # the selection's rows, in the padded batch's order, land on the same tokens in the packed rows
    at, pos = sel.nonzero(as_tuple=True)
    assert torch.equal(packed.inputs["input_ids"].reshape(-1)[packed.flat], batch.input_ids[at, pos])


# ---- capture ---------------------------------------------------------------------------------------------

def _alone(model, prompts, layers, positions):
    out = []
    for p in prompts:
        a = interp.capture(model, [p], layers=layers, positions=positions, pack=False, progress=False)
        out.append({i: a.acts[i] for i in layers})
    return out


@pytest.mark.parametrize("positions", ["all", "last", "question"])
def test_packed_capture_equals_each_prompt_alone_with_images(medgemma, forwards, positions):
    prompts = _ragged(14, _pictures(3))
    layers = [0, 1]
    got = interp.capture(medgemma, prompts, layers=layers, positions=positions, batch_tokens=400, pack=True, progress=False)
    assert forwards["packed"] >= 1 and forwards["own"] >= 1  # checked against the model's own, then packed
    ref = _alone(medgemma, prompts, layers, positions)
    for i in layers:
        want = torch.cat([r[i] for r in ref])
        assert got.acts[i].shape == want.shape
        torch.testing.assert_close(got.acts[i], want, rtol=1e-4, atol=1e-5)
    plain = interp.capture(medgemma, prompts, layers=layers, positions=positions, pack=False, progress=False)
    assert torch.equal(got.prompt_index, plain.prompt_index) and torch.equal(got.position, plain.position)
    assert torch.equal(got.token_id, plain.token_id)


def test_a_positions_callable_sees_each_prompt_and_gets_its_rows(medgemma, forwards):
    prompts = _ragged(10)
    pick = lambda info: torch.arange(0, len(info.tokens), 3)  # noqa: E731
    got = interp.capture(medgemma, prompts, layers=[1], positions=pick, batch_tokens=300, pack=True, progress=False)
    assert forwards["packed"] >= 1
    want = interp.capture(medgemma, prompts, layers=[1], positions=pick, pack=False, progress=False)
    torch.testing.assert_close(got.acts[1], want.acts[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(got.position, want.position)


def test_each_class_of_packed_batch_is_checked_once_per_model(medgemma, forwards):
    prompts = _ragged(12, _pictures(2))
    interp.capture(medgemma, prompts, layers=[1], positions="last", batch_tokens=300, pack=True, progress=False)
    checks = {k: v for k, v in hf._MASKS_CHECKED[medgemma.hf.model].items() if k[0] == "packed"}
    assert checks and all(checks.values())
    assert forwards["own"] == len(checks)  # one check per class
    before = dict(forwards)
    interp.capture(medgemma, prompts, layers=[1], positions="last", batch_tokens=300, pack=True, progress=False)
    assert forwards["own"] == before["own"]  # checked once per model
    assert forwards["packed"] > before["packed"]


def test_packed_masks_that_differ_are_never_used(medgemma, forwards, monkeypatch):
    real = hf.packed_masks

    def wrong(position_ids, *args, **kwargs):  # every prompt may see the one before it
        out = real(position_ids, *args, **kwargs)
        return {k: v | torch.roll(v, 1, dims=-1) for k, v in out.items()}

    monkeypatch.setattr(hf, "packed_masks", wrong)
    prompts = _ragged(12)
    with pytest.warns(RuntimeWarning, match="packed attention masks"):
        got = interp.capture(medgemma, prompts, layers=[1], positions="all", batch_tokens=300, pack=True, progress=False)
    assert forwards["packed"] == 0
    want = interp.capture(medgemma, prompts, layers=[1], positions="all", pack=False, progress=False)
    torch.testing.assert_close(got.acts[1], want.acts[1], rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the outcome is kept for the model
        interp.capture(medgemma, prompts, layers=[1], positions="all", batch_tokens=300, pack=True, progress=False)


def test_packing_on_the_real_gemma3_270m_text_body(gemma270m, forwards):
    """The text-only body builds its masks inside: recorded on each layer type's first layer (its first global
    layer is 5), also for a capture that stops before it."""
    prompts = _ragged(12)
    got = interp.capture(gemma270m, prompts, layers=[2], positions="all", batch_tokens=300, pack=True, progress=False)
    assert forwards["packed"] >= 1 and forwards["own"] >= 1
    checks = {k: v for k, v in hf._MASKS_CHECKED[gemma270m.hf.model].items() if k[0] == "packed"}
    assert checks and all(checks.values())
    got = interp.capture(gemma270m, prompts, layers=[2, 6], positions="all", batch_tokens=300, pack=True, progress=False)
    assert forwards["packed"] >= 1
    want = interp.capture(gemma270m, prompts, layers=[2, 6], positions="all", pack=False, progress=False)
    for i in (2, 6):
        scale = want.acts[i].abs().max()
        assert (got.acts[i] - want.acts[i]).abs().max() <= 1e-4 * scale


def test_pack_arguments_are_checked(medgemma, tiny_llava):
    with pytest.raises(interp.InterpError, match="pack=True needs sort=True"):
        interp.capture(medgemma, ["Is it?"], layers=[0], pack=True, sort=False, progress=False)
    with pytest.raises(interp.InterpError, match="cannot take packed rows"):
        interp.capture(tiny_llava, ["Is it?"], layers=[0], pack=True, progress=False)
    with pytest.raises(interp.InterpError, match="pack='yes'"):
        interp.capture(medgemma, ["Is it?"], layers=[0], pack="yes", progress=False)
    # pack=None: text-only calls pack where the model can, calls with an image do not, other models never
    seen = []
    real = C._run_shards

    def spy(model, items, todo, layers, positions, exclude, out_dtype, batching, *a, **k):
        seen.append(batching.pack)
        return real(model, items, todo, layers, positions, exclude, out_dtype, batching, *a, **k)

    C._run_shards = spy
    try:
        interp.capture(medgemma, _ragged(4), layers=[0], progress=False)
        interp.capture(medgemma, _ragged(4, _pictures(1)), layers=[0], progress=False)
        interp.capture(tiny_llava, _ragged(4), layers=[0], progress=False)
        interp.capture(medgemma, _ragged(4), layers=[0], sort=False, progress=False)
    finally:
        C._run_shards = real
    assert seen == [True, False, False, False]


def test_packed_forwards_stay_within_batch_tokens_and_a_longer_prompt_runs_alone(tiny_medgemma, monkeypatch):
    words = "Is there a small right pleural effusion on this film".split()
    prompts = [" ".join(words[: 2 + k % 8]) + "?" for k in range(30)]
    prompts[7] = "Is there " + "a small effusion and " * 60 + "anything else?"  # ~430 tokens
    lengths = tiny_medgemma.encode(prompts).lengths.tolist()
    assert lengths[7] > 256 > max(lengths[:7] + lengths[8:])
    shapes, real = [], C._run_hooked

    def recording(model, batch, *a, **k):
        shapes.append((*batch.input_ids.shape, int(batch.lengths.numel()), k.get("masks", "prepared")))
        return real(model, batch, *a, **k)

    monkeypatch.setattr(C, "_run_hooked", recording)
    acts = interp.capture(tiny_medgemma, prompts, layers=[1], batch_size=6, batch_tokens=256, pack=True, progress=False)
    assert any(m == "packed" for *_, m in shapes)
    assert sum(n for _, _, n, _ in shapes) == len(prompts)
    assert all(n <= 6 and (r * w <= 256 or r == 1) for r, w, n, _ in shapes), shapes
    assert (1, lengths[7], 1, "prepared") in shapes  # the long prompt alone
    assert acts.prompt_index.tolist() == list(range(len(prompts)))
    want = interp.capture(tiny_medgemma, prompts, layers=[1], pack=False, progress=False)
    torch.testing.assert_close(acts[1], want[1], rtol=1e-4, atol=1e-5)
