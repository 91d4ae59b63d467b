"""Residual-stream capture: values, position masks, early stop, padding, and the on-disk cache."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import interp
from interp.capture import CacheError, load_activations
from interp.models import Prompt

capture_mod = importlib.import_module("interp.capture")  # the module; `interp.capture` is the function

QUESTIONS = ["Is there a right pleural effusion?", "heart looks big?", "Any pneumothorax on the left side of the chest?",
             "Is the endotracheal tube in a good position?", "lungs clear?"]


def _hidden_states(model, prompts):
    batch = model.encode(prompts)
    with torch.no_grad():
        hs = model.hf(**batch.inputs, output_hidden_states=True).hidden_states
    return batch, hs


def _check_against_hidden_states(model, prompts):
    acts = interp.capture(model, prompts, layers="all", positions="all", batch_size=2, progress=False)
    batch, hs = _hidden_states(model, prompts)
    real = ~batch.pad_mask
    for i in range(model.n_layers - 1):
        torch.testing.assert_close(acts[i], hs[i + 1][real], rtol=1e-5, atol=1e-5)
    # HF's last entry has the final norm applied; the residual stream itself does not
    last = model.final_norm()(acts[model.n_layers - 1])
    torch.testing.assert_close(last, hs[-1][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(acts.token_id, batch.input_ids[real].cpu())


def test_capture_equals_hidden_states_on_tiny_medgemma_with_images(tiny_medgemma, xray_images):
    prompts = [Prompt(QUESTIONS[0], xray_images[0]), Prompt(QUESTIONS[1]),
               Prompt(QUESTIONS[2], xray_images[1], "Findings: small apical pneumothorax.")]
    _check_against_hidden_states(tiny_medgemma, prompts)


def test_capture_equals_hidden_states_on_tiny_llava(tiny_llava, xray_images):
    _check_against_hidden_states(tiny_llava, [Prompt(QUESTIONS[0], xray_images[2]), Prompt(QUESTIONS[3])])


@pytest.mark.slow
def test_capture_equals_hidden_states_and_transformerlens_on_gemma3_270m(gemma270m):
    prompts = QUESTIONS[:3]
    _check_against_hidden_states(gemma270m, prompts)
    os.environ.setdefault("PIP_NO_INDEX", "1")  # TransformerBridge may try to pip-install a processor
    from transformer_lens.model_bridge import TransformerBridge

    from interp.models import gemma3_270m_path

    bridge = TransformerBridge.boot_transformers(str(gemma3_270m_path()), device="cpu", dtype=torch.float32)
    layers = [0, 5, 11, 17]
    acts = interp.capture(gemma270m, prompts, layers=layers, positions="all", progress=False)
    batch = gemma270m.encode(prompts)
    for k in range(len(prompts)):
        _, cache = bridge.run_with_cache(batch.input_ids[k:k + 1, : int(batch.lengths[k])])
        for i in layers:
            ref = cache[f"blocks.{i}.hook_resid_post"][0]
            got = acts[i][acts.prompt_index == k]
            # the bridge runs eager attention: equal up to float32 rounding of ~1e5-sized activations
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()) / 1e3)


def test_last_position_is_the_last_real_token(tiny_medgemma):
    acts = interp.capture(tiny_medgemma, QUESTIONS, layers=[2], positions="last", batch_size=2, progress=False)
    batch = tiny_medgemma.encode(QUESTIONS)
    assert acts[2].shape == (len(QUESTIONS), tiny_medgemma.d_model)
    assert torch.equal(acts.position, batch.last_index)
    assert torch.equal(acts.prompt_index, torch.arange(len(QUESTIONS)))
    _, hs = _hidden_states(tiny_medgemma, QUESTIONS)
    torch.testing.assert_close(acts[2], hs[3][torch.arange(len(QUESTIONS)), batch.last_index])


def test_question_positions_pick_only_question_text(tiny_medgemma, xray_images):
    prompts = [Prompt(q, xray_images[0] if i % 2 else None, "Findings: clear lungs." if i == 2 else None)
               for i, q in enumerate(QUESTIONS)]
    acts = interp.capture(tiny_medgemma, prompts, layers=[1], positions="question", progress=False)
    tok = tiny_medgemma.tokenizer
    for k, p in enumerate(prompts):
        assert tok.decode(acts.token_id[acts.prompt_index == k]).strip() == p.question


def test_all_positions_can_drop_special_and_image_tokens(tiny_medgemma, xray_images):
    prompts = [Prompt(QUESTIONS[0], xray_images[0])]
    everything = interp.capture(tiny_medgemma, prompts, layers=[0], positions="all", progress=False)
    plain = interp.capture(tiny_medgemma, prompts, layers=[0], positions="all", exclude=("special", "image"),
                           progress=False)
    special = set(tiny_medgemma.tokenizer.all_special_ids) | {tiny_medgemma.hf.config.image_token_index}
    assert any(int(t) in special for t in everything.token_id)
    assert not any(int(t) in special for t in plain.token_id)
    assert len(everything) - len(plain) == 4 + 2 + 1 + 3  # image soft tokens, delimiters, bos, 3 turn markers


def test_callable_positions(tiny_llava):
    acts = interp.capture(tiny_llava, QUESTIONS[:2], layers=[1], positions=lambda info: [0, -1], progress=False)
    assert acts.position.tolist()[:2] == [0, int(tiny_llava.encode(QUESTIONS[:1]).lengths[0]) - 1]
    with pytest.raises(interp.InterpError, match="mask of shape"):
        interp.capture(tiny_llava, QUESTIONS[:1], layers=[1], positions=lambda info: torch.ones(3, dtype=torch.bool))


def test_padding_does_not_change_activations(tiny_medgemma):
    one = interp.capture(tiny_medgemma, QUESTIONS, layers=[0, 5], positions="all", batch_size=1, progress=False)
    many = interp.capture(tiny_medgemma, QUESTIONS, layers=[0, 5], positions="all", batch_size=5, progress=False)
    torch.testing.assert_close(one[5], many[5], rtol=1e-5, atol=1e-5)
    assert torch.equal(one.position, many.position)


def test_forward_stops_after_the_last_requested_layer(tiny_medgemma):
    calls = []
    handle = tiny_medgemma.layer(3).register_forward_hook(lambda *a: calls.append(1))
    try:
        interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[1, 2], progress=False)
        assert calls == []
        interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[3], progress=False)
        assert calls == [1]
    finally:
        handle.remove()


def test_output_dtype(tiny_llava):
    acts = interp.capture(tiny_llava, QUESTIONS[:2], layers=[0], dtype="bfloat16", progress=False)
    assert acts[0].dtype == torch.bfloat16


def _count_forwards(monkeypatch):
    calls = []
    real = capture_mod._run_hooked

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(capture_mod, "_run_hooked", counting)
    return calls


def test_cache_is_reused(tiny_medgemma, tmp_path, monkeypatch):
    first = interp.capture(tiny_medgemma, QUESTIONS, layers=[1, 4], cache=tmp_path, shard_size=2, progress=False)
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3 and manifest["layers"] == [1, 4]
    assert manifest["weights"] == tiny_medgemma.fingerprint and "torch" in manifest["versions"]
    calls = _count_forwards(monkeypatch)
    again = interp.capture(tiny_medgemma, QUESTIONS, layers=[1, 4], cache=tmp_path, shard_size=2, progress=False)
    assert calls == [] and again.path == first.path
    assert torch.equal(again[4], first[4]) and torch.equal(again.position, first.position)
    assert torch.equal(load_activations(first.path)[1], first[1])
    # other prompts or layers get their own folder
    other = interp.capture(tiny_medgemma, QUESTIONS[:3], layers=[1, 4], cache=tmp_path, shard_size=2, progress=False)
    assert other.path != first.path and len(calls) == 2


def test_interrupted_capture_resumes_without_recomputing(tiny_medgemma, tmp_path, monkeypatch):
    real = capture_mod._run_hooked
    calls = []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(capture_mod, "_run_hooked", dies_on_third)
    with pytest.raises(KeyboardInterrupt):  # batch_size 1, shard_size 2: dies inside the second shard
        interp.capture(tiny_medgemma, QUESTIONS, layers=[2], cache=tmp_path, shard_size=2, batch_size=1,
                       progress=False)
    folder = next(tmp_path.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and [s["prompts"] for s in manifest["shards"]] == [[0, 2]]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard_00000000_00000002.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        load_activations(folder)
    calls.clear()
    monkeypatch.setattr(capture_mod, "_run_hooked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = interp.capture(tiny_medgemma, QUESTIONS, layers=[2], cache=tmp_path, shard_size=2, batch_size=1,
                             progress=False)
    assert len(calls) == 3  # prompts 2..4 only
    fresh = interp.capture(tiny_medgemma, QUESTIONS, layers=[2], batch_size=1, progress=False)
    torch.testing.assert_close(resumed[2], fresh[2])


def test_missing_or_corrupt_shard_is_a_clear_error(tiny_llava, tmp_path):
    acts = interp.capture(tiny_llava, QUESTIONS, layers=[0], cache=tmp_path, shard_size=2, progress=False)
    shard = acts.path / "shard_00000002_00000004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard_00000002_00000004.safetensors' is corrupt"):
        interp.capture(tiny_llava, QUESTIONS, layers=[0], cache=tmp_path, shard_size=2, progress=False)
    shard.unlink()
    with pytest.raises(CacheError, match="is missing"):
        interp.capture(tiny_llava, QUESTIONS, layers=[0], cache=tmp_path, shard_size=2, progress=False)
    rebuilt = interp.capture(tiny_llava, QUESTIONS, layers=[0], cache=tmp_path, shard_size=2, recompute=True,
                             progress=False)
    assert shard.is_file() and len(rebuilt) == len(QUESTIONS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=QUESTIONS, layers=[6]), "layer 6 is out of range: 'tiny-medgemma' has 6 decoder layers"),
    (dict(prompts=[], layers=[0]), "prompts is empty"),
    (dict(prompts=QUESTIONS, layers=[0], positions="first"), "positions='first'"),
    (dict(prompts=["  "], layers=[0]), "question is empty"),
    (dict(prompts=QUESTIONS, layers=[0], exclude=("pad",)), "exclude=\\['pad'\\]"),
])
def test_bad_capture_input_is_named(tiny_medgemma, kwargs, message):
    with pytest.raises(interp.InterpError, match=message):
        interp.capture(tiny_medgemma, **kwargs)


def test_image_given_to_text_only_model_and_missing_image(tiny_medgemma, xray_images, tmp_path):
    text_only = interp.Model.wrap(tiny_medgemma.hf.model.language_model, tiny_medgemma.tokenizer, name="txt")
    with pytest.raises(interp.InterpError, match="prompt 1 has an image, but 'txt' is a text-only model"):
        interp.capture(text_only, [Prompt("a?"), Prompt("b?", xray_images[0])], layers=[0])
    with pytest.raises(interp.InterpError, match="image file not found"):
        interp.capture(tiny_medgemma, [Prompt("a?", str(tmp_path / "nope.png"))], layers=[0])
