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


def _assert_rows_close(got, want, tol):
    assert got.shape == want.shape
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)
    assert rel.max().item() <= tol, f"row {int(rel.argmax())}: relative error {rel.max().item():.2e} > {tol:g}"


def _check_against_hidden_states(model, prompts):
    acts = interp.capture(model, prompts, layers="all", positions="all", batch_size=2, progress=False)
    batch, hs = _hidden_states(model, prompts)
    real = ~batch.pad_mask
    # float32, but batches of 2 against one batch of all: other padding, so other kernel blockings. Compared row by
    # row, relative to the row's norm: Gemma's residual stream has norms in the thousands, and elementwise 1e-5 was
    # passed by one CPU and failed by another (one element in 33,920; rows agree to 1e-6 to 4e-6 of their norm)
    for i in range(model.n_layers - 1):
        _assert_rows_close(acts[i], hs[i + 1][real], 1e-5)
    # HF's last entry has the final norm applied; the residual stream itself does not
    last = model.final_norm()(acts[model.n_layers - 1])
    _assert_rows_close(last, hs[-1][real], 1e-5)
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
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "manifest.json", "shard_00000000_00000002.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        load_activations(folder)
    calls.clear()
    monkeypatch.setattr(capture_mod, "_run_hooked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = interp.capture(tiny_medgemma, QUESTIONS, layers=[2], cache=tmp_path, shard_size=2, batch_size=1,
                             progress=False)
    assert len(calls) == 3  # prompts 2..4 only
    fresh = interp.capture(tiny_medgemma, QUESTIONS, layers=[2], batch_size=1, progress=False)
    torch.testing.assert_close(resumed[2], fresh[2])


def test_damaged_or_missing_shard_is_recomputed_with_a_warning(tiny_llava, tmp_path, monkeypatch):
    kw = dict(layers=[0], cache=tmp_path, shard_size=2, progress=False)
    acts = interp.capture(tiny_llava, QUESTIONS, **kw)
    shard = acts.path / "shard_00000002_00000004.safetensors"
    for damage in ("flip a byte", "truncate", "delete"):
        data = bytearray(shard.read_bytes())
        if damage == "flip a byte":
            data[-5] ^= 0xFF
            shard.write_bytes(bytes(data))
        elif damage == "truncate":
            shard.write_bytes(bytes(data[: len(data) // 2]))
        else:
            shard.unlink()
        # a reader without the model cannot recompute: a clear error whose advice works
        with pytest.raises(CacheError, match="shard_00000002_00000004.safetensors' is (corrupt|missing).*rerun the "
                                             "capture\\(\\) that wrote it"):
            load_activations(acts.path)
        calls = _count_forwards(monkeypatch)
        with pytest.warns(capture_mod.CacheWarning, match="shard_00000002_00000004.safetensors' is .*recomputing it"):
            again = interp.capture(tiny_llava, QUESTIONS, **kw)
        monkeypatch.undo()
        assert len(calls) == 1  # only the damaged shard (2 prompts, one batch) is recomputed
        assert torch.equal(again[0], acts[0]) and torch.equal(again.prompt_index, acts.prompt_index)
        assert torch.equal(load_activations(acts.path)[0], acts[0])
    rebuilt = interp.capture(tiny_llava, QUESTIONS, recompute=True, **kw)
    assert shard.is_file() and torch.equal(rebuilt[0], acts[0])


def _tamper(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def _swap_shard_content(folder):
    """Another shard's file (its hash updated to match) under this shard's name: rows of the wrong prompts."""
    a, b = folder / "shard_00000000_00000002.safetensors", folder / "shard_00000002_00000004.safetensors"
    a.write_bytes(b.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = manifest["shards"][1]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _set_shard(k, **fields):
    def edit(m):
        m["shards"][k].update(fields)
        return m
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set_shard(0, file="../../other/shard_00000000_00000002.safetensors"), "points outside the cache folder"),
    (_set_shard(0, file="/etc/passwd"), "points outside the cache folder"),
    (_set_shard(0, file="shard_00000002_00000004.safetensors"),
     "names 'shard_00000002_00000004.safetensors', but the rows of prompts 0-2 are stored in "
     "'shard_00000000_00000002.safetensors'"),
    ("swap", "holds rows of prompts 2-3, outside 0-1: the file belongs to another shard"),
    (_set_shard(1, rows=3), "'prompt_index' has shape \\(2,\\), but the entry records 3 rows"),
    (_set_shard(0, prompts=[0]), "'prompts' must be \\[first, end\\)"),
    (_set_shard(0, prompts=[0, 99]), "'prompts' must be \\[first, end\\) inside 0-5"),
    (_set_shard(0, rows="2"), "'rows' is missing or not a int"),
    (_set_shard(0, sha256=None), "'sha256' is missing or not a str"),
    (lambda m: [m], "holds a JSON list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "has no 'shards' entry"),
    (lambda m: m | {"shards": "all of them"}, "'shards' is 'all of them', not a list"),
    (lambda m: m | {"complete": "yes"}, "'complete' is 'yes', not a bool"),
    (lambda m: m | {"shards": m["shards"] + [42]}, "shards\\[3\\] = 42 is not an object"),
    (lambda m: m | {"shards": m["shards"][:1]}, "says complete, but its shards cover 2 of 5 prompts"),
    (lambda m: m | {"format": "interp.activations/9"}, "has format 'interp.activations/9'"),
])
def test_tampered_or_malformed_manifest_is_refused_by_name(tiny_llava, tmp_path, edit, message):
    kw = dict(layers=[0], cache=tmp_path, shard_size=2, progress=False)
    acts = interp.capture(tiny_llava, QUESTIONS, **kw)
    if edit == "swap":
        _swap_shard_content(acts.path)
    else:
        _tamper(acts.path, edit)
    for read in (lambda: interp.capture(tiny_llava, QUESTIONS, **kw), lambda: load_activations(acts.path)):
        with pytest.raises(CacheError, match=message) as err:
            read()
        assert "recompute=True" in str(err.value) and "manifest" in str(err.value)
    fixed = interp.capture(tiny_llava, QUESTIONS, recompute=True, **kw)  # the advice works
    assert torch.equal(fixed[0], acts[0]) and torch.equal(load_activations(acts.path)[0], acts[0])


def test_manifest_that_is_not_json_is_refused(tiny_llava, tmp_path):
    kw = dict(layers=[0], cache=tmp_path, shard_size=2, progress=False)
    acts = interp.capture(tiny_llava, QUESTIONS, **kw)
    (acts.path / "manifest.json").write_bytes(b"\xff{not json")
    with pytest.raises(CacheError, match="is not valid JSON.*recompute=True"):
        interp.capture(tiny_llava, QUESTIONS, **kw)
    assert torch.equal(interp.capture(tiny_llava, QUESTIONS, recompute=True, **kw)[0], acts[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=QUESTIONS, layers=[6]), "layer 6 is out of range: 'tiny-medgemma' has 6 decoder layers"),
    (dict(prompts=[], layers=[0]), "prompts is empty"),
    (dict(prompts=QUESTIONS, layers=[0], positions="first"), "positions='first'"),
    (dict(prompts=["  "], layers=[0]), "question is empty"),
    (dict(prompts=QUESTIONS, layers=[0], exclude=("pad",)), "exclude=\\['pad'\\]"),
    (dict(prompts=QUESTIONS, layers=[0], exclude="pad"), "exclude=\\['pad'\\]"),
    (dict(prompts=QUESTIONS, layers=[0], exclude="special"), "applies to positions='all' only"),
    (dict(prompts=QUESTIONS, layers=[0], exclude=3), "exclude=3: pass a list"),
    (dict(prompts=QUESTIONS, layers=[0], dtype="int8"), "dtype='int8': activations are stored in a floating-point"),
    (dict(prompts=QUESTIONS, layers=[0], dtype="float13"), "dtype='float13' is not a torch dtype"),
    (dict(prompts="Is there an effusion?", layers=[0]), "prompts is a single str .*pass a list, e.g. "
                                                        "capture\\(model, \\['Is there an effusion\\?'\\]"),
    (dict(prompts=Prompt("Is there an effusion?"), layers=[0]), "prompts is a single Prompt"),
    (dict(prompts=42, layers=[0]), "prompts must be a list of prompts"),
    (dict(prompts=[{"q": "a?"}], layers=[0]), "prompt 0 is a dict without a 'question' key"),
    (dict(prompts=["a?", ["Is there", "A?"]], layers=[0]), "prompt 1 must be a str, a Prompt"),
    (dict(prompts=[Prompt(["Is there", "A?"])], layers=[0]), "prompt 0: the question must be a str, got list"),
    (dict(prompts=QUESTIONS, layers=[1.7]), "layers=\\[1.7\\]: 1.7 is not a whole layer number"),
    (dict(prompts=QUESTIONS, layers=True), "layers=True: a bool is not a layer index"),
    (dict(prompts=QUESTIONS, layers="abc"), "layers='abc': 'abc' is not a layer number"),
    (dict(prompts=QUESTIONS, layers=[-1]), "negative layer indices are not accepted \\(is -1 meant as layer 5\\?\\)"),
    (dict(prompts=QUESTIONS, layers=None), "layers=None: pass an int"),
    (dict(prompts=QUESTIONS, layers=[0], batch_size=0), "batch_size=0: must be >= 1"),
    (dict(prompts=QUESTIONS, layers=[0], batch_size=-4), "batch_size=-4: must be >= 1"),
    (dict(prompts=QUESTIONS, layers=[0], batch_size=2.5), "batch_size=2.5: pass a whole number"),
    (dict(prompts=QUESTIONS, layers=[0], batch_size="8"), "batch_size='8': pass a whole number"),
    (dict(prompts=QUESTIONS, layers=[0], shard_size=0), "shard_size=0: must be >= 1"),
    (dict(prompts=QUESTIONS, layers=[0], cache=3), "cache=3: pass True"),
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


def test_capture_refuses_a_hugging_face_module(tiny_medgemma):
    with pytest.raises(interp.InterpError, match="capture\\(\\) takes an interp.Model, got "
                                                 "Gemma3ForConditionalGeneration.*Model.wrap"):
        interp.capture(tiny_medgemma.hf, QUESTIONS, layers=[0])


def test_layer_spellings_that_mean_one_layer(tiny_medgemma):
    import numpy as np

    ref = interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[2], progress=False)
    for layers in (2, [2.0], ["2"], np.int64(2), [np.int32(2)], torch.tensor([2]), (2, 2)):
        got = interp.capture(tiny_medgemma, QUESTIONS[:2], layers=layers, progress=False)
        assert got.layers == [2] and torch.equal(got[2], ref[2]), layers


def test_exclude_given_as_one_string_is_one_item(tiny_medgemma):
    one = interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[0], positions="all", exclude="special", progress=False)
    listed = interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[0], positions="all", exclude=["special"],
                            progress=False)
    assert torch.equal(one.token_id, listed.token_id) and one.meta["exclude"] == ["special"]


def test_prompt_longer_than_the_context_is_refused_by_index(tiny_medgemma):
    limit = tiny_medgemma.context_length
    assert limit == 1024  # the tiny model's max_position_embeddings; its tokenizer sets no limit
    long = "Is there " + "a small effusion and " * 400 + "anything else?"
    with pytest.raises(interp.InterpError, match=f"prompt 2 is [0-9]+ tokens long, but 'tiny-medgemma' takes at "
                                                 f"most {limit}"):
        interp.capture(tiny_medgemma, QUESTIONS[:2] + [long], layers=[0], batch_size=2, progress=False)


@pytest.mark.parametrize("fast", [True, False])
def test_evaluate_refuses_a_prompt_longer_than_the_context_by_index(tiny_medgemma, fast):
    from interp.data import ParaphrasePair

    long = "Is there " + "a small effusion and " * 400 + "anything else?"
    pairs = [ParaphrasePair("short", "Is there an effusion?", "Any fluid?"),
             ParaphrasePair("long", "Is there an effusion?", long)]
    with pytest.raises(interp.InterpError, match="tokens long, but 'tiny-medgemma' takes at most 1024"):
        interp.evaluate(tiny_medgemma, pairs, n_boot=0, progress=False, fast=fast)


def test_cache_path_that_is_a_file_is_named(tiny_medgemma, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="notes.txt' is a file, not a folder"):
        interp.capture(tiny_medgemma, QUESTIONS[:2], layers=[0], cache=tmp_path / "notes.txt", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
