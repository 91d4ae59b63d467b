"""Layer profiles and `find_layers`: a register direction planted at a known layer is found by every method;
batched, cached patching equals one patch per forward; `to_depth` and `lora_config` hand the window on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import planted_jumprelu_sae
from sae_lens import JumpReLUSAE

import interp
from interp import layers as layers_mod
from interp.data import builtin
from interp.layers import LayerSelection, find_layers, layer_profile, layers_pattern_of
from interp.models import GEMMA_CHAT_TEMPLATE, tiny_tokenizer

N_LAYERS, K = 8, 4  # the planted model's depth and the layer whose attention writes the register direction
MARKER = "Ġjust"  # one BPE token of the tiny tokenizer that no built-in question, report or template contains


def _planted_llama():
    """A random LLaMA decoder whose layer K copies a 'lay register' marker into every later position.

    Channel 0 of the residual stream holds the marker token (only its embedding writes it), channel 1 a
    constant; no layer reads or writes either, except one head of layer K: its query reads channel 1 and its
    key channel 0 (on the slowest rotary pair, so position barely matters), so every position after the
    marker attends to it, and its value writes a large vector along unembed(yes) - unembed(no) there. The
    plant lives in the weights, so it is an honest causal model (a KV cache of the prefix is exact for it).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=2, eos_token_id=1, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg).eval()
        model = interp.Model.wrap(hf, tok, name="planted-llama")
        marker = tok.convert_tokens_to_ids(MARKER)
        yes, no = model.answer_ids
        head = 16
        with torch.no_grad():
            emb = hf.model.embed_tokens.weight
            emb.normal_(0, 1.0)
            emb[:, :2] = 0
            emb[:, 1] = 1.0
            emb[marker] = 0
            emb[marker, :2] = torch.tensor([4.0, 1.0])
            for layer in hf.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                    lin.weight[:, :2] = 0
                for lin in (attn.o_proj, mlp.down_proj):
                    lin.weight[:2, :] = 0
            hf.lm_head.weight[:, :2] = 0
            direction = hf.lm_head.weight[yes] - hf.lm_head.weight[no]
            direction[:2] = 0
            direction /= direction.norm()
            attn = hf.model.layers[K].self_attn
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                lin.weight[:head] = 0
            attn.o_proj.weight[:, :head] = 0
            attn.q_proj.weight[head // 2 - 1, 1] = 30.0
            attn.k_proj.weight[head // 2 - 1, 0] = 30.0
            attn.v_proj.weight[0, 0] = 1.0
            # Push the lay margin to the side opposite the formal ones, so that the plant flips answers.
            formal = interp.consistency.margins(model, [builtin()[0].prompt_a()])
            attn.o_proj.weight[:, 0] = -40.0 * float(np.sign(formal[0])) * direction
    return model, marker, direction


def _lay_pairs(n: int):
    """Formal question a, and the same words with the marker inserted as the 'lay' question b."""
    return [dataclasses.replace(p, question_b=p.question_a.replace(" ", " just ", 1), same_polarity=True)
            for p in builtin()[:n]]


def _sae(layer: int, *, seed: int, orthogonal_to: torch.Tensor, planted: int | None = None) -> JumpReLUSAE:
    """A random JumpReLU SAE reading layer ``layer``; none of its features reads the planted direction,
    except feature ``planted`` (which reads only it)."""
    return planted_jumprelu_sae(64, layer, seed=seed, threshold=0.5, avoid=[orthogonal_to], feature=planted,
                                reads=orthogonal_to, writes=orthogonal_to, feature_threshold=50.0)


@pytest.fixture(scope="module")
def planted():
    model, marker, direction = _planted_llama()
    pairs = _lay_pairs(12)
    saes = {1: _sae(1, seed=1, orthogonal_to=direction), K: _sae(K, seed=2, orthogonal_to=direction, planted=7),
            6: _sae(6, seed=3, orthogonal_to=direction)}
    return model, pairs, saes, marker


def test_the_planted_model_flips_lay_answers_and_only_lay_prompts_hold_the_marker(planted):
    model, pairs, _, marker = planted
    a = model.encode([p.prompt_a() for p in pairs]).input_ids
    b = model.encode([p.prompt_b() for p in pairs]).input_ids
    assert (a == marker).sum() == 0 and ((b == marker).sum(1) == 1).all()
    ma = interp.consistency.margins(model, [p.prompt_a() for p in pairs])
    mb = interp.consistency.margins(model, [p.prompt_b() for p in pairs])
    assert (torch.sign(ma) != torch.sign(mb)).float().mean() > 0.8


@pytest.mark.parametrize("method", ["patching", "residual", "sae"])
def test_every_method_finds_a_window_around_the_planted_layer(planted, method):
    model, pairs, saes, _ = planted
    kw = {"saes": saes} if method == "sae" else {}
    sel = find_layers(model, pairs, width=3, method=method, progress=False, **kw)
    assert K in sel.layers and len(sel.layers) == 3
    assert sel.peak == K and sel.method == method
    assert len(sel.scores) == N_LAYERS and sel.layers_pattern == "model.layers"
    if method == "sae":
        assert sel.meta["missing"] == [i for i in range(N_LAYERS) if i not in saes]
        assert all(np.isnan(sel.scores[i]) for i in sel.meta["missing"])


def test_patching_carries_nothing_before_the_plant_and_everything_from_it(planted):
    model, pairs, _, _ = planted
    prof = layer_profile(model, pairs, method="patching", progress=False)
    values = np.array(prof.values)
    assert np.abs(values[:K]).max() < 0.05 and values[K:].min() > 0.95
    assert values[-1] == pytest.approx(1.0, abs=1e-5)  # patching the final layer's answer position copies a
    np.testing.assert_allclose(np.cumsum(prof.scores), values, atol=1e-9)  # scores are per-layer gains


def test_residual_profile_equals_a_direct_computation_from_hidden_states(tiny_medgemma):
    """Question-pooled distances recomputed one prompt at a time (embeddings from `output_hidden_states`;
    layer outputs from plain forward hooks, since HF's last hidden state is taken after the final norm)."""
    model, pairs = tiny_medgemma, builtin()[:5]
    prof = layer_profile(model, pairs, method="residual", positions="question", batch_size=3, progress=False)
    pooled = []
    for prompt in [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]:
        batch = model.encode([prompt])
        outs = {}
        hooks = [layer.register_forward_hook(lambda _m, _i, o, j=j, outs=outs: outs.__setitem__(j, o[0]))
                 for j, layer in enumerate(model.layers)]
        with torch.no_grad():
            embedded = model.hf(**batch.inputs, output_hidden_states=True).hidden_states[0][0]
        for h in hooks:
            h.remove()
        q = batch.question_mask[0]
        sites = [embedded] + [outs[j] for j in range(model.n_layers)]
        pooled.append(np.stack([h[q].mean(0).numpy() for h in sites]))  # [n_layers + 1, d]
    pooled = np.stack(pooled, 1)  # [sites, 2n, d]
    n = len(pairs)
    ratio = []
    for site in pooled:
        a, b = site[:n], site[n:]
        within = np.linalg.norm(a - b, axis=1).mean()
        off = ~np.eye(n, dtype=bool)
        between = (np.linalg.norm(a[:, None] - a[None], axis=-1)[off].mean()
                   + np.linalg.norm(b[:, None] - b[None], axis=-1)[off].mean()) / 2
        ratio.append(within / between)
    np.testing.assert_allclose(prof.values, ratio[1:], rtol=1e-4)
    np.testing.assert_allclose(prof.scores, np.diff(ratio), rtol=1e-4, atol=1e-6)


def _naive_patching(model, pairs, k: int) -> np.ndarray:
    """One forward per (pair, layer): b's prompt with a's last-k-token residual written at that layer."""
    yes, no = model.answer_ids
    out = np.zeros((len(pairs), model.n_layers))
    for i, p in enumerate(pairs):
        saved = {}
        hooks = [layer.register_forward_hook(
            lambda _m, _i, o, j=j, saved=saved: saved.__setitem__(j, o[0, -k:].clone()))
            for j, layer in enumerate(model.layers)]
        with torch.no_grad():
            model.hf(**model.encode([p.prompt_a()]).inputs)
        for h in hooks:
            h.remove()
        inputs = model.encode([p.prompt_b()]).inputs
        for layer in range(model.n_layers):
            def patch(_m, _i, o, src=saved[layer]):
                o[0, -k:] = src

            h = model.layers[layer].register_forward_hook(patch)
            with torch.no_grad():
                logits = model.hf(**inputs).logits[0, -1]
            h.remove()
            out[i, layer] = float(logits[yes] - logits[no])
    return out


@pytest.mark.parametrize("name", ["tiny_medgemma", "tiny_llava"])
@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_batched_patching_equals_one_patch_per_forward(request, name, positions, xray_images, monkeypatch):
    model = request.getfixturevalue(name)
    pairs = [dataclasses.replace(p, image=xray_images[i % 3]) for i, p in enumerate(builtin()[:4])]
    pairs[1] = dataclasses.replace(pairs[1], context=None)  # rows of different lengths in one batch
    k = 1 if positions == "last" else layers_mod._shared_tail(model, pairs, 8)
    assert k >= (1 if positions == "last" else 3)
    expected = _naive_patching(model, pairs, k)
    cached = layer_profile(model, pairs, method="patching", positions=positions, batch_size=3, progress=False)
    full = layer_profile(model, pairs, method="patching", positions=positions, batch_size=3, strategy="full",
                         progress=False)
    # Memory budgets so small that every patched layer gets a forward of its own: same answers.
    monkeypatch.setattr(layers_mod, "_memory_budget", lambda device: 1)
    monkeypatch.setattr(layers_mod, "_FULL_TOKENS_PER_FORWARD", {"cpu": 1, "cuda": 1})
    chunked = layer_profile(model, pairs, method="patching", positions=positions, batch_size=3, progress=False)
    full_chunked = layer_profile(model, pairs, method="patching", positions=positions, batch_size=3,
                                 strategy="full", progress=False)
    # opposite-polarity pairs are left out of the profile (patching would carry the opposite answer)
    kept = [i for i, p in enumerate(pairs) if p.same_polarity]
    assert 0 < len(kept) < len(pairs)
    for prof in (cached, full, chunked, full_chunked):
        np.testing.assert_allclose(np.array(prof.meta["margin_patched"]), expected[kept], atol=2e-5)
        assert prof.meta["patched_tokens"] == k and prof.n_pairs == len(kept)
        assert prof.meta["excluded_opposite_polarity"] == [p.id for p in pairs if not p.same_polarity]


def test_sae_profile_is_the_register_sensitive_share_of_activation_mass(planted):
    model, pairs, saes, _ = planted
    prof = layer_profile(model, pairs, method="sae", saes=saes, progress=False)
    assert prof.missing == tuple(i for i in range(N_LAYERS) if i not in saes)
    table = interp.features.register_features(model, saes[K], pairs, pool="question", progress=False).table
    dec = saes[K].W_dec.norm(dim=1).detach().numpy()[table["feature"]]
    sig = table["q"] < 0.05
    expected = (table["diff"].abs() * dec)[sig].sum() / (((table["mean_a"] + table["mean_b"]) / 2) * dec).sum()
    assert prof.values[K] == pytest.approx(expected, rel=1e-9)
    assert prof.values[K] > 5 * max(prof.values[1], prof.values[6])


def test_bad_input_gets_a_clear_error(planted, tiny_medgemma):
    model, pairs, saes, _ = planted
    with pytest.raises(interp.InterpError, match="width=9"):
        find_layers(model, pairs, width=9)
    with pytest.raises(interp.InterpError, match="width=0"):
        find_layers(model, pairs, width=0)
    with pytest.raises(interp.InterpError, match="pairs"):
        find_layers(model, [], method="residual")
    with pytest.raises(interp.InterpError, match="d_model=64"):  # an SAE of another model's width
        layer_profile(tiny_medgemma, pairs, method="sae", saes={2: _wide_sae(2)}, progress=False)
    with pytest.raises(interp.InterpError, match="layer 4"):  # filed under the wrong layer
        layer_profile(model, pairs, method="sae", saes={3: saes[K]}, progress=False)
    with pytest.raises(interp.InterpError, match="saes="):
        layer_profile(model, pairs, method="sae", progress=False)
    with pytest.raises(interp.InterpError, match="method="):
        layer_profile(model, pairs, method="logit-lens")
    with pytest.raises(interp.InterpError, match="positions="):
        layer_profile(model, pairs, method="patching", positions="question")


def _wide_sae(layer: int) -> JumpReLUSAE:
    return planted_jumprelu_sae(640, layer, seed=0, threshold=0.5, avoid=[], d_sae=16)


def test_a_lone_sae_layer_gets_the_window_centred_on_it():
    """Gemma Scope's MedGemma SAEs sit at layers 9, 17, 22, 29; with register features only at 17 the
    tied windows around it resolve to the centred one: the study's 15-19."""
    scores = [np.nan] * 34
    scores[9], scores[17], scores[22], scores[29] = 0.0, 0.4, 0.0, 0.0
    prof = layers_mod.LayerProfile("sae", tuple(scores), tuple(scores), 34, 100, "question", "medgemma",
                                   missing=tuple(i for i in range(34) if i not in (9, 17, 22, 29)))
    sel = prof.select(5)
    assert sel.layers == (15, 16, 17, 18, 19) and sel.peak == 17
    assert sel.to_depth(32).layers == (14, 15, 16, 17, 18)
    flat = dataclasses.replace(prof, scores=tuple(0.0 if np.isfinite(v) else v for v in scores))
    with pytest.warns(UserWarning, match="arbitrary"):
        flat.select(5)


def test_to_depth_maps_windows_by_relative_depth():
    study = LayerSelection((15, 16, 17, 18, 19), 34, peak=17)
    assert study.to_depth(32).layers == (14, 15, 16, 17, 18)  # the LLaVA-Rad replication
    assert study.relative_depth == pytest.approx((15 / 34, 19 / 34))
    assert LayerSelection((0, 1, 2, 3, 4), 34).to_depth(32).layers == (0, 1, 2, 3, 4)
    assert LayerSelection((29, 30, 31, 32, 33), 34).to_depth(32).layers == (27, 28, 29, 30, 31)
    assert study.to_depth(34).layers == study.layers
    with pytest.raises(interp.InterpError):
        study.to_depth(4)


def test_lora_config_adapts_exactly_the_language_decoder_window():
    from peft import get_peft_model

    model = interp.load("tiny-medgemma")  # a fresh copy: PEFT edits the model in place
    prof = layers_mod.LayerProfile("residual", (0.9, 0.5, 0.1, 0.0, 0.0, 0.0), (0.0,) * 6, 6, 2, "last",
                                   model.name, layers_pattern_of(model.layers_path))
    sel = prof.select(3)
    assert sel.layers == (0, 1, 2)  # indices the two-layer vision tower has too
    peft_model = get_peft_model(model.hf, sel.lora_config())
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
               and len(getattr(m, "lora_A", {})) > 0}
    expected = {f"model.language_model.layers.{i}.{part}" for i in (0, 1, 2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert adapted == expected
    assert not any("vision" in n for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


def test_profile_and_selection_print_plot_and_serialise(planted):
    model, pairs, saes, _ = planted
    prof = layer_profile(model, pairs, method="sae", saes=saes, progress=False)
    sel = prof.select(3)
    assert "3/8 layers measured" in repr(prof) and "layers 4-6 of 8" in repr(sel)
    for fig in (prof.figure(window=sel.layers), sel.figure()):
        assert fig.data and fig.data[0].type == "bar"
    text = json.dumps(prof.to_dict())
    assert json.loads(text)["scores"][0] is None  # NaN (no SAE) becomes null
    assert json.loads(json.dumps(sel.to_dict()))["layers"] == [4, 5, 6]
    with pytest.raises(interp.InterpError, match="no per-layer scores"):
        LayerSelection((1, 2), 8).figure()


@pytest.mark.slow
def test_real_270m_residual_profile_and_patching_window(gemma270m):
    pairs = builtin()[:24]
    prof = layer_profile(gemma270m, pairs, method="residual", progress=False)
    assert len(prof.values) == 18 and np.isfinite(prof.values).all() and min(prof.values) > 0
    sel = find_layers(gemma270m, pairs[:6], width=5, method="patching", progress=False)
    assert len(sel.layers) == 5 and sel.layers_pattern == "model.layers" and sel.n_layers == 18
    values = sel.meta["values"]
    assert values[-1] == pytest.approx(1.0, abs=1e-4)  # the last layer's answer position carries all of it
    assert abs(values[0]) < 0.2  # the first layer's answer position has seen almost nothing of the question


def test_lora_config_takes_one_module_name_as_a_string():
    from interp.layers import lora_config

    assert lora_config([1, 2], target_modules="q_proj").target_modules == {"q_proj"}  # not q, _, p, r, o, j
    assert lora_config([1, 2], target_modules=("q_proj", "v_proj")).target_modules == {"q_proj", "v_proj"}
