"""SAEs: Gemma Scope folders load without the hub and encode as the JumpReLU formula says; R^2 matches numpy
and sae-lens; the CE splice is exact for an identity SAE; training lowers the error; bad input is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import interp
import interp.prompts
from interp.saes import check_sae, load_sae, train_sae, transfer_report

LAYER = 3  # tiny-medgemma has 6 layers, d_model 64
EXCLUDE = ("special", "image")


def _gemma_scope_folder(root, params: dict[str, torch.Tensor], *, layer: int = LAYER, config: dict | None = None,
                        name: str | None = None):
    """A folder laid out like google/gemma-scope-2-*/resid_post/layer_<L>_width_<W>_l0_<size>/."""
    width = params["w_enc"].shape[1] if "w_enc" in params else 0
    folder = root / "resid_post" / (name or f"layer_{layer}_width_{width}_l0_small")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(folder / "params.safetensors"))
    if config is None:  # the real Gemma Scope 2 config.json fields
        config = {"width": width, "model_name": "google/gemma-3-4b-pt", "architecture": "jump_relu", "l0": 20,
                  "affine_connection": False, "hf_hook_point_in": f"model.layers.{layer}.output",
                  "hf_hook_point_out": f"model.layers.{layer}.output", "type": "sae"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _random_params(d_in: int = 64, d_sae: int = 96, seed: int = 0, mean: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    return {"w_enc": w_dec.T * 0.8, "w_dec": w_dec, "b_enc": 0.1 * torch.randn(d_sae, generator=g),
            "b_dec": torch.zeros(d_in) if mean is None else mean,
            "threshold": 0.2 + 0.1 * torch.rand(d_sae, generator=g)}


def _identity_params(d_in: int = 64):
    """relu(x) - relu(-x) = x exactly: a JumpReLU SAE that reconstructs perfectly."""
    eye = torch.eye(d_in)
    return {"w_enc": torch.cat([eye, -eye], 1), "w_dec": torch.cat([eye, -eye], 0), "b_enc": torch.zeros(2 * d_in),
            "b_dec": torch.zeros(d_in), "threshold": torch.zeros(2 * d_in)}


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    return {"medical": interp.prompts.medical()[:6], "general": interp.prompts.general()[:6]}


@pytest.fixture(scope="module")
def medical_acts(tiny_medgemma, corpora) -> interp.Activations:
    return interp.capture(tiny_medgemma, corpora["medical"], layers=[LAYER], positions="all", exclude=EXCLUDE,
                          progress=False)


@pytest.fixture(scope="module")
def medical_text_acts(tiny_medgemma, corpora) -> interp.Activations:
    """The corpus text only (transfer_report's default mask): no template, no special tokens."""
    return interp.capture(tiny_medgemma, corpora["medical"], layers=[LAYER], positions="question", progress=False)


@pytest.fixture(scope="module")
def train_acts(tiny_medgemma) -> interp.Activations:
    return interp.capture(tiny_medgemma, interp.prompts.general()[10:40], layers=[LAYER], positions="all",
                          exclude=EXCLUDE, progress=False)


# ---- corpora ------------------------------------------------------------------------------------
def test_bundled_corpora_have_120_distinct_prompts_each():
    med, gen = interp.prompts.medical(), interp.prompts.general()
    assert len(med) == len(gen) == 120
    assert len(set(med)) == 120 and len(set(gen)) == 120 and not set(med) & set(gen)
    assert all(p == p.strip() and p for p in med + gen)
    assert interp.prompts.corpora() == {"medical": med, "general": gen}


# ---- loading ------------------------------------------------------------------------------------
def test_gemma_scope_folder_loads_offline_and_encodes_as_jumprelu(tmp_path, tiny_medgemma, medical_acts):
    params = _random_params()
    sae = load_sae(_gemma_scope_folder(tmp_path, params), device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE"
    assert sae.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert sae.cfg.metadata.hf_hook_name == f"model.layers.{LAYER}.output"
    assert sae.cfg.metadata.model_name == "google/gemma-3-4b-pt"
    assert not sae.cfg.apply_b_dec_to_input  # Gemma Scope feeds raw activations to the encoder

    x = medical_acts[LAYER][:50]
    p = {k: v.double().numpy() for k, v in params.items()}
    pre = x.double().numpy() @ p["w_enc"] + p["b_enc"]
    assert np.abs(pre - p["threshold"]).min() > 1e-4  # no unit sits on its threshold: float32 cannot flip it
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    with torch.no_grad():
        feats = sae.encode(x)
        np.testing.assert_allclose(feats.numpy(), f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sae.decode(feats).numpy(), f @ p["w_dec"] + p["b_dec"], rtol=1e-5, atol=1e-4)
    assert 0 < (feats != 0).float().mean() < 1

    site = check_sae(tiny_medgemma, sae)
    assert site == (LAYER, f"blocks.{LAYER}.hook_resid_post", f"model.language_model.layers.{LAYER}")
    assert tiny_medgemma.layers[site.layer] is tiny_medgemma.hf.get_submodule(site.module_path)


def test_gemma_scope_layer_from_folder_name_or_declared(tmp_path):
    folder = _gemma_scope_folder(tmp_path, _random_params(), name="layer_5_width_96_l0_big",
                                 config={"width": 96, "architecture": "jump_relu", "model_name": "gemma-v3-1b-it"})
    sae = load_sae(folder, device="cpu")
    assert sae.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    assert sae.cfg.metadata.model_name == "google/gemma-3-1b-it"
    assert load_sae(folder, device="cpu", layer=5).cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    with pytest.raises(interp.InterpError, match="reads layer 5 but layer=2 was asked for"):
        load_sae(folder, device="cpu", layer=2)  # never a silent relabel
    odd = _gemma_scope_folder(tmp_path / "x", _random_params(), name="my_sae", config={"width": 96})
    with pytest.raises(interp.InterpError, match="pass layer="):
        load_sae(odd)
    assert load_sae(odd, layer=1, dtype="bfloat16").W_enc.dtype == torch.bfloat16


def test_bad_sae_folders_get_clear_errors(tmp_path):
    no_threshold = {k: v for k, v in _random_params().items() if k != "threshold"}
    with pytest.raises(interp.InterpError, match="threshold"):
        load_sae(_gemma_scope_folder(tmp_path / "a", no_threshold))
    transposed = {**_random_params(), "w_dec": _random_params()["w_enc"]}
    with pytest.raises(interp.InterpError, match=r"w_dec \(64, 96\) \(expected \(96, 64\)\)"):
        load_sae(_gemma_scope_folder(tmp_path / "b", transposed))
    wrong_width = _gemma_scope_folder(tmp_path / "c", _random_params(), config={"width": 16384, "hf_hook_point_in": "model.layers.3.output"})
    with pytest.raises(interp.InterpError, match="width=16384"):
        load_sae(wrong_width)
    transcoder = {"width": 96, "architecture": "jump_relu", "type": "transcoder",
                  "hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
                  "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output"}
    with pytest.raises(interp.InterpError, match="transcoder"):
        load_sae(_gemma_scope_folder(tmp_path / "d", _random_params(), config=transcoder))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "weights.bin").write_bytes(b"0")
    with pytest.raises(interp.InterpError, match="not an SAE folder.*weights.bin"):
        load_sae(tmp_path / "e")
    with pytest.raises(interp.InterpError, match="SAE folder not found"):
        load_sae(tmp_path / "missing")


def test_corrupt_truncated_or_mismatched_sae_files_name_the_file_and_the_fix(tmp_path):
    from interp.saes import SAEFileError

    truncated = _gemma_scope_folder(tmp_path / "a", _random_params())
    data = (truncated / "params.safetensors").read_bytes()
    (truncated / "params.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match=r"params.safetensors' is corrupt or truncated.*download the folder"):
        load_sae(truncated)
    garbage = _gemma_scope_folder(tmp_path / "b", _random_params())
    (garbage / "params.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(SAEFileError, match="corrupt or truncated"):
        load_sae(garbage)
    bad_json = _gemma_scope_folder(tmp_path / "c", _random_params())
    (bad_json / "config.json").write_text("{width: 96")
    with pytest.raises(SAEFileError, match=r"config.json' is not valid JSON"):
        load_sae(bad_json)

    sae = load_sae(_gemma_scope_folder(tmp_path / "d", _random_params()), device="cpu")
    sae.save_model(tmp_path / "cut")
    w = tmp_path / "cut" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SAEFileError, match=r"sae_weights.safetensors' is corrupt or truncated.*save_model"):
        load_sae(tmp_path / "cut")
    sae.save_model(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "cfg.json").read_text())
    (tmp_path / "other" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 32}))
    with pytest.raises(SAEFileError, match=r"cfg.json' and .*sae_weights.safetensors' disagree.*size mismatch"):
        load_sae(tmp_path / "other")
    assert issubclass(SAEFileError, interp.InterpError)


def test_sae_lens_saved_folder_round_trips(tmp_path):
    sae = load_sae(_gemma_scope_folder(tmp_path, _random_params()), device="cpu")
    sae.save_model(tmp_path / "saved")
    back = load_sae(tmp_path / "saved")
    assert back.cfg.metadata.hook_name == sae.cfg.metadata.hook_name
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name))


def test_registry_names_are_checked_locally_and_hub_failure_says_what_to_do(monkeypatch):
    with pytest.raises(interp.InterpError, match="gemma-scope-2-4b-it-res"):
        load_sae("gemma-scope-2-4b-it-rez", "layer_17_width_16k_l0_medium")
    with pytest.raises(interp.InterpError, match="layer_17_width_16k_l0_medium"):
        load_sae("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_mediun")
    with pytest.raises(interp.InterpError, match="sae_id is missing"):
        load_sae("gemma-scope-2-4b-it-res")

    import requests
    from sae_lens import SAE

    def offline(*_a, **_k):
        raise requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(SAE, "from_pretrained", offline)
    with pytest.raises(interp.InterpError, match=r"no hub is reachable.*resid_post/layer_17_width_16k_l0_medium"
                                                 r".*google/gemma-scope-2-4b-it.*local path"):
        load_sae("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_medium")


def test_check_sae_refuses_wrong_width_layer_and_site(tmp_path, tiny_medgemma):
    sae = load_sae(_gemma_scope_folder(tmp_path / "a", _random_params()), device="cpu")
    with pytest.raises(interp.InterpError, match=r"reads blocks.3.hook_resid_post \(layer 3\) but layer=4"):
        check_sae(tiny_medgemma, sae, 4)
    wide = load_sae(_gemma_scope_folder(tmp_path / "b", _random_params(d_in=32)), device="cpu")
    with pytest.raises(interp.InterpError, match="SAE d_in=32 but layer 3 of 'tiny-medgemma' has d_model=64"):
        check_sae(tiny_medgemma, wide)
    far = load_sae(_gemma_scope_folder(tmp_path / "c", _random_params(), layer=17), device="cpu")
    with pytest.raises(interp.InterpError, match="layer 17 is out of range"):
        check_sae(tiny_medgemma, far)
    mlp = {"width": 96, "hf_hook_point_in": "model.layers.3.post_feedforward_layernorm.output"}
    mlp_sae = load_sae(_gemma_scope_folder(tmp_path / "d", _random_params(), config=mlp), device="cpu")
    assert mlp_sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_out"
    with pytest.raises(interp.InterpError, match="residual-stream SAEs"):
        check_sae(tiny_medgemma, mlp_sae)
    with pytest.raises(interp.InterpError, match="d_model=64"):
        transfer_report(tiny_medgemma, wide, {"medical": ["Is there effusion?"]}, progress=False)


# ---- R^2 and friends ----------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", ["text", "all"])
def test_r2_l0_dead_match_numpy_sae_lens_and_statsmodels(tmp_path, tiny_medgemma, corpora, medical_acts,
                                                         medical_text_acts, tokens):
    from sae_lens.evals import ExplainedVarianceCalculator
    from statsmodels.stats.weightstats import DescrStatsW

    acts = medical_text_acts if tokens == "text" else medical_acts
    x_t = acts[LAYER]
    params = _random_params(mean=x_t.mean(0))
    sae = load_sae(_gemma_scope_folder(tmp_path, params), device="cpu")
    rep = transfer_report(tiny_medgemma, sae, {"medical": corpora["medical"]}, threshold=0.5, ce=False,
                          n_boot=300, tokens=tokens, progress=False)
    got = rep["medical"]

    # independent numpy: JumpReLU from the raw params, the formula over tokens, per prompt by a loop
    x, p = x_t.double().numpy(), {k: v.double().numpy() for k, v in params.items()}
    pre = x @ p["w_enc"] + p["b_enc"]
    assert np.abs(pre - p["threshold"]).min() > 1e-4
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    x_hat = f @ p["w_dec"] + p["b_dec"]

    def r2(a, b):
        return 1 - ((a - b) ** 2).sum(1).mean() / ((a ** 2).sum(1).mean() - (a.mean(0) ** 2).sum())

    assert got.n_tokens == len(x) and got.n_prompts == 6
    assert got.r2 == pytest.approx(r2(x, x_hat), abs=1e-6)
    idx = acts.prompt_index.numpy()
    per_prompt = [r2(x[idx == i], x_hat[idx == i]) for i in range(6)]
    np.testing.assert_allclose(got.r2_prompt, per_prompt, atol=1e-6)
    assert got.r2_prompt_mean == pytest.approx(np.mean(per_prompt), abs=1e-6)
    assert got.l0 == pytest.approx((f != 0).sum(1).mean(), abs=1e-9)
    assert got.dead_fraction == pytest.approx(((f != 0).sum(0) == 0).mean(), abs=1e-12)
    cos = (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert got.cosine == pytest.approx(cos.mean(), abs=1e-6)

    calc = ExplainedVarianceCalculator()  # sae-lens' own streaming explained variance
    with torch.no_grad():
        for chunk in torch.split(x_t, 64):
            calc.add_batch(sae_output=sae.decode(sae.encode(chunk)), hidden_acts=chunk)
    assert got.r2 == pytest.approx(calc.compute(), abs=1e-5)

    d = DescrStatsW(np.array(per_prompt))
    assert got.p_ttest == pytest.approx(d.ttest_mean(0.5, alternative="larger")[1], rel=1e-6)
    np.testing.assert_allclose(got.r2_prompt_mean_ci, d.tconfint_mean(0.05), atol=1e-6)
    assert got.r2_ci[0] <= got.r2 <= got.r2_ci[1]
    # the bootstrap re-pools the rows of resampled prompts: a naive loop over the same resamples agrees,
    # for R^2 and for L0, dead fraction and cosine
    counts = np.random.default_rng(0).multinomial(6, np.full(6, 1 / 6), size=300)
    take = [np.concatenate([np.flatnonzero(idx == i) for i in range(6) for _ in range(c[i])]) for c in counts]
    boot = [r2(x[t], x_hat[t]) for t in take]
    np.testing.assert_allclose(got.r2_ci, np.percentile(boot, [2.5, 97.5]), atol=1e-6)
    assert got.p_bootstrap == pytest.approx((1 + np.sum(np.array(boot) <= 0.5)) / 301)
    np.testing.assert_allclose(got.l0_ci, np.percentile([(f[t] != 0).sum(1).mean() for t in take], [2.5, 97.5]),
                               rtol=1e-9)
    np.testing.assert_allclose(got.dead_fraction_ci, np.percentile(
        [((f[t] != 0).sum(0) == 0).mean() for t in take], [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(got.cosine_ci, np.percentile([cos[t].mean() for t in take], [2.5, 97.5]), rtol=1e-6)
    # the verdict is the lower ends of the intervals against the threshold
    assert got.passed == (got.r2_ci[0] > 0.5 and got.r2_prompt_mean_ci[0] > 0.5)
    strict = transfer_report(tiny_medgemma, sae, {"medical": corpora["medical"]}, threshold=0.999, ce=False,
                             n_boot=300, tokens=tokens, progress=False)["medical"]
    assert strict.p_bootstrap == pytest.approx(1.0, abs=0.01) and not strict.passed
    assert rep.n_boot == 300 and "special" in rep.token_mask and "float64" in rep.r2_formula
    assert rep.tokens == tokens and ("template" in rep.token_mask)


def test_default_mask_scores_the_corpus_text_without_the_template(tmp_path, tiny_medgemma, corpora):
    """tokens='text' scores exactly the question tokens (the corpus text); the template tokens it leaves out
    are counted, and with them the two masks add up to every non-special token."""
    sae = load_sae(_gemma_scope_folder(tmp_path, _random_params()), device="cpu")
    text = transfer_report(tiny_medgemma, sae, {"medical": corpora["medical"]}, ce=False, n_boot=20,
                           progress=False)
    every = transfer_report(tiny_medgemma, sae, {"medical": corpora["medical"]}, ce=False, n_boot=20,
                            tokens="all", progress=False)
    t, a = text["medical"], every["medical"]
    batch = tiny_medgemma.encode(corpora["medical"])
    keep = ~batch.pad_mask & ~batch.special_mask & ~batch.image_mask
    assert t.n_tokens == int(batch.question_mask.sum()) and a.n_tokens == int(keep.sum())
    assert t.n_template_tokens == a.n_tokens - t.n_tokens > 0 and a.n_template_tokens == 0
    scored = tiny_medgemma.tokenizer.decode(batch.input_ids[0][batch.question_mask[0]].tolist())
    assert scored.strip() == corpora["medical"][0].strip()  # the prompt's own text, nothing of the template
    assert "corpus text only" in repr(text) and "template" in repr(text)
    assert text.tokens == "text" and "pooled R^2" in text.estimands["r2"]
    assert "mean over prompts" in text.estimands["r2_prompt_mean"]


def test_perfect_reconstruction_gives_1_and_mean_gives_0_and_identity_splice_changes_nothing(
        tmp_path, tiny_medgemma, corpora, medical_text_acts):
    ident = load_sae(_gemma_scope_folder(tmp_path / "id", _identity_params()), device="cpu")
    rep = transfer_report(tiny_medgemma, ident, corpora, n_boot=200, progress=False)
    for c in rep.corpora:
        assert c.r2 == 1.0 and all(v == 1.0 for v in c.r2_prompt) and c.cosine == pytest.approx(1.0)
        assert c.kl == 0.0 and c.ce_sae == c.ce_orig and c.ce_score == 1.0
        assert c.ce_zero != c.ce_orig and c.kl_zero > 0 and c.n_predicted > 0
        assert c.p_bootstrap == pytest.approx(1 / 201) and c.p_ttest == 0.0 and c.passed
        assert c.r2_ci == (1.0, 1.0) and c.r2_prompt_mean_ci == (1.0, 1.0)
        assert c.ce_score_ci == (1.0, 1.0) and c.kl_ci == (0.0, 0.0)
    assert rep.passed
    assert "<= 1/201 (floor)" in repr(rep) and "<0.001" not in repr(rep)  # the bootstrap floor, said as such

    mean = medical_text_acts[LAYER].double().mean(0).float()  # the mean of the scored (text) tokens
    flat = {"w_enc": torch.zeros(64, 8), "w_dec": torch.randn(8, 64), "b_enc": torch.zeros(8), "b_dec": mean,
            "threshold": torch.full((8,), 1e6)}
    mean_sae = load_sae(_gemma_scope_folder(tmp_path / "mean", flat), device="cpu")
    c = transfer_report(tiny_medgemma, mean_sae, {"medical": corpora["medical"]}, ce=False, n_boot=50,
                        progress=False)["medical"]
    assert c.r2 == pytest.approx(0.0, abs=1e-6) and c.l0 == 0 and c.dead_fraction == 1.0 and not c.passed


@pytest.mark.parametrize("tokens", ["text", "all"])
def test_ce_orig_matches_a_per_prompt_forward(tmp_path, tiny_medgemma, corpora, tokens):
    """CE at the scored predictions, one unbatched forward per prompt: with tokens='text' a corpus-text token
    predicting the next corpus-text token; with 'all' every non-special token predicting whatever follows.
    Its bootstrap interval over prompts agrees with a loop over the same resamples."""
    sae = load_sae(_gemma_scope_folder(tmp_path, _random_params()), device="cpu")
    rep = transfer_report(tiny_medgemma, sae, {"general": corpora["general"]}, n_boot=20, batch_size=4,
                          tokens=tokens, progress=False)["general"]
    nll, n = np.zeros(6), np.zeros(6)
    with torch.no_grad():
        for i, prompt in enumerate(corpora["general"]):
            batch = tiny_medgemma.encode([prompt])
            logp = torch.log_softmax(tiny_medgemma.hf(**batch.inputs).logits[0].double(), -1)
            ids, q = batch.input_ids[0], batch.question_mask[0]
            for t in range(len(ids) - 1):
                scored = bool(q[t] and q[t + 1]) if tokens == "text" else not batch.special_mask[0, t]
                if scored:
                    nll[i] -= float(logp[t, ids[t + 1]])
                    n[i] += 1
    assert rep.n_predicted == n.sum() > 0
    assert rep.ce_orig == pytest.approx(nll.sum() / n.sum(), rel=1e-5)
    assert rep.kl > 0 and math.isfinite(rep.ce_score)
    assert rep.ce_score_ci[0] <= rep.ce_score_ci[1] and rep.kl_ci[0] <= rep.kl <= rep.kl_ci[1] + 1e-12


def test_transfer_report_bad_input(tmp_path, tiny_medgemma):
    sae = load_sae(_gemma_scope_folder(tmp_path, _random_params()), device="cpu")
    with pytest.raises(interp.InterpError, match="corpus 'medical' is empty"):
        transfer_report(tiny_medgemma, sae, {"medical": [], "general": ["Hello there."]}, progress=False)
    with pytest.raises(interp.InterpError, match="corpora is empty"):
        transfer_report(tiny_medgemma, sae, {}, progress=False)
    with pytest.raises(interp.InterpError, match="threshold"):
        transfer_report(tiny_medgemma, sae, ["Is there effusion?"], threshold=95, progress=False)

    def poison(_module, _inputs, output):
        return output * float("nan")

    handle = tiny_medgemma.layers[1].register_forward_hook(poison)
    try:
        with pytest.raises(interp.InterpError, match="corpus 'x'.*NaN"):
            transfer_report(tiny_medgemma, sae, {"x": ["Is the heart enlarged?"]}, ce=False, progress=False)
    finally:
        handle.remove()


def test_report_serialises_prints_and_plots(tmp_path, tiny_medgemma, corpora):
    sae = load_sae(_gemma_scope_folder(tmp_path, _random_params()), device="cpu")
    rep = transfer_report(tiny_medgemma, sae, corpora, ce=False, n_boot=50, progress=False)
    d = json.loads(rep.to_json(tmp_path / "report.json"))
    assert [c["name"] for c in d["corpora"]] == ["medical", "general"] and d["passed"] is False
    assert len(d["corpora"][0]["r2_prompt"]) == 6
    text = repr(rep)
    assert "1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)" in text and "excluded" in text and "medical" in text
    fig = rep.figure()
    assert [t.type for t in fig.data] == ["box", "box", "scatter"]
    assert list(fig.data[0].y) == [v for v in rep["medical"].r2_prompt if math.isfinite(v)]
    assert any(s.y0 == rep.threshold for s in fig.layout.shapes)
    with pytest.raises(KeyError):
        rep["radiology"]


# ---- training -----------------------------------------------------------------------------------
def test_train_sae_lowers_reconstruction_error_and_is_seeded(tiny_medgemma, train_acts, medical_acts):
    from interp.saes import _r2, _recon_stats

    def r2(sae, acts):
        s = _recon_stats(sae, acts[LAYER], acts.prompt_index, acts.n_prompts)
        return float(_r2(s.n.sum(), s.sum_x.sum(0), s.sq_norm.sum(), s.sq_resid.sum()))

    start = train_sae(train_acts, d_sae=128, steps=1, device="cpu", progress=False)
    sae = train_sae(train_acts, d_sae=128, steps=150, device="cpu", progress=False)
    assert sae.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny-medgemma" and type(sae).__name__ == "JumpReLUSAE"
    check_sae(tiny_medgemma, sae)
    before, after = r2(start, train_acts), r2(sae, train_acts)
    assert after > before + 0.3 and after > 0.6
    assert r2(sae, medical_acts) > 0.3  # held-out prompts from another corpus

    again = train_sae(train_acts[LAYER], layer=LAYER, d_sae=128, steps=150, device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values(), strict=True))
    other = train_sae(train_acts, d_sae=128, steps=5, seed=1, device="cpu", progress=False)
    assert not torch.equal(other.W_enc, start.W_enc)

    # inputs are normalised while training and the scale folded back: 100x activations train the same SAE
    rows, idx = train_acts[LAYER], train_acts.prompt_index
    small = train_sae(rows, layer=LAYER, d_sae=64, steps=40, device="cpu", progress=False)
    big = train_sae(100 * rows, layer=LAYER, d_sae=64, steps=40, device="cpu", progress=False)
    s1, s2 = _recon_stats(small, rows, idx, train_acts.n_prompts), _recon_stats(big, 100 * rows, idx, train_acts.n_prompts)
    assert float(_r2(s2.n.sum(), s2.sum_x.sum(0), s2.sq_norm.sum(), s2.sq_resid.sum())) == pytest.approx(
        float(_r2(s1.n.sum(), s1.sum_x.sum(0), s1.sq_norm.sum(), s1.sq_resid.sum())), abs=1e-3)

    topk = train_sae(train_acts, d_sae=128, architecture="topk", k=8, steps=60, device="cpu", progress=False)
    with torch.no_grad():
        assert (topk.encode(medical_acts[LAYER]) != 0).sum(-1).max() <= 8
    assert r2(topk, train_acts) > before


def test_train_sae_bad_input(train_acts):
    with pytest.raises(interp.InterpError, match="pass layer="):
        train_sae(train_acts[LAYER], d_sae=16)
    with pytest.raises(interp.InterpError, match="k= is for architecture='topk'"):
        train_sae(train_acts, d_sae=16, k=4)
    with pytest.raises(interp.InterpError, match="NaN"):
        train_sae(torch.full((64, 8), float("nan")), layer=0, d_sae=16)
    with pytest.raises(interp.InterpError, match="only 3 activation rows"):
        train_sae(torch.randn(3, 8), layer=0, d_sae=16)
    with pytest.raises(interp.InterpError, match="architecture="):
        train_sae(train_acts, d_sae=16, architecture="gated")
    for layer in (-3, True, 1.7, "3"):  # never blocks.-3.hook_resid_post, never True meaning layer 1
        with pytest.raises(interp.InterpError, match=r"layer=.*whole number >= 0"):
            train_sae(torch.randn(64, 8), layer=layer, d_sae=16, steps=1, progress=False)
        with pytest.raises(interp.InterpError, match=r"layer=.*whole number >= 0"):
            train_sae(train_acts, layer=layer, d_sae=16, steps=1, progress=False)


# ---- the real Gemma 3 270M ----------------------------------------------------------------------
@pytest.mark.slow
def test_gemma270m_small_sae_trained_on_general_text_reports_transfer_to_medical(gemma270m):
    layer = 6
    general = interp.prompts.general()
    acts = interp.capture(gemma270m, general[:30], layers=[layer], positions="all", exclude=EXCLUDE, progress=False)
    sae = train_sae(acts, d_sae=256, steps=80, device="cpu", progress=False)
    rep = transfer_report(gemma270m, sae, {"medical": interp.prompts.medical()[:4], "general": general[30:34]},
                          n_boot=200, batch_size=4, progress=False)
    assert rep.layer == layer and rep.module_path == f"model.layers.{layer}"
    for c in rep.corpora:
        assert 0 < c.r2 <= 1 and c.r2_ci[0] <= c.r2 <= c.r2_ci[1]
        assert all(math.isfinite(v) and v <= 1 for v in c.r2_prompt)
        assert 0 < c.l0 < 256 and 0 <= c.dead_fraction < 1
        assert c.ce_zero > c.ce_orig > 0 and math.isfinite(c.ce_score) and c.ce_score <= 1.05
        assert c.kl > 0 and c.kl_zero > c.kl


# ---- SAEs named by Hugging Face module paths; Gemma Scope 2 from local copies and the hub ------------------
@pytest.mark.parametrize("hook", ["model.language_model.layers.3", "model.layers.3", "model.layers.3.output",
                                  "model.language_model.layers.3.hook_resid_post"])
def test_sae_lens_sae_with_a_hugging_face_module_hook_loads_as_its_block_hook(tmp_path, tiny_medgemma, hook):
    """HookedProxyLM / AutoModel-based sae-lens runners name the module they read; the layer comes from it."""
    sae = load_sae(_gemma_scope_folder(tmp_path / "src", _random_params()), device="cpu")
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.hf_hook_name = None
    sae.save_model(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "cfg.json").read_text())["metadata"]["hook_name"] == hook
    back = load_sae(tmp_path / "saved", device="cpu")
    assert back.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert back.cfg.metadata.hf_hook_name == hook
    assert check_sae(tiny_medgemma, back).layer == LAYER
    assert load_sae(tmp_path / "saved", device="cpu", layer=LAYER).cfg.metadata.hook_name.startswith("blocks.3.")
    with pytest.raises(interp.InterpError, match=r"reads .*layer 3\) but layer=2"):
        load_sae(tmp_path / "saved", device="cpu", layer=2)
    sae.cfg.metadata.hook_name = hook  # an SAE built in Python, never saved, is mapped by check_sae too
    assert check_sae(tiny_medgemma, sae).hook_name == f"blocks.{LAYER}.hook_resid_post"


def test_hugging_face_hooks_off_the_residual_stream_or_in_the_vision_tower_are_refused(tmp_path, tiny_medgemma):
    sae = load_sae(_gemma_scope_folder(tmp_path / "src", _random_params()), device="cpu")
    for hook, match in [("model.vision_tower.vision_model.encoder.layers.3", "vision tower"),
                        ("model.layers.3.self_attn.q_proj", "site 'self_attn.q_proj' is not one"),
                        ("model.layers.3.post_feedforward_layernorm.output", "residual-stream SAEs")]:
        sae.cfg.metadata.hook_name = hook
        folder = tmp_path / hook.replace(".", "_")
        sae.save_model(folder)
        with pytest.raises(interp.InterpError, match=match):
            check_sae(tiny_medgemma, load_sae(folder, device="cpu"))


def _empty_hf_cache(monkeypatch, tmp_path):
    """Point the Hugging Face cache at an empty folder (the machine's own may hold real SAEs)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def _gemma_scope_270m(root, layer: int = 9, d_sae: int = 48):
    """A folder in the real Gemma Scope 2 format for Gemma 3 270M (d_model 640), random weights."""
    params = _random_params(d_in=640, d_sae=d_sae, seed=layer)
    config = {"width": d_sae, "model_name": "gemma-v3-270m-pt", "architecture": "jump_relu", "l0": 60,
              "affine_connection": False, "hf_hook_point_in": f"model.layers.{layer}.output",
              "hf_hook_point_out": f"model.layers.{layer}.output", "type": "sae"}
    return _gemma_scope_folder(root, params, layer=layer, config=config,
                               name=f"layer_{layer}_width_16k_l0_medium"), params


def test_a_registry_release_is_read_from_a_local_copy_without_the_hub(tmp_path, monkeypatch):
    from sae_lens import SAE

    from interp.saes import local_sae_copy

    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    _empty_hf_cache(monkeypatch, tmp_path)
    release, sae_id = "gemma-scope-2-270m-pt-res", "layer_9_width_16k_l0_medium"
    assert local_sae_copy(release, sae_id) is None
    folder, params = _gemma_scope_270m(tmp_path / "home" / "saes" / "google" / "gemma-scope-2-270m-pt")
    assert folder.parent.name == "resid_post"  # the hub's own layout, as `hf download` leaves it
    assert local_sae_copy(release, sae_id) == folder

    def no_hub(*_a, **_k):
        raise AssertionError("a local copy must not touch the hub")

    monkeypatch.setattr(SAE, "from_pretrained", no_hub)
    sae = load_sae(release, sae_id, device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_in == 640
    assert sae.cfg.metadata.hook_name == "blocks.9.hook_resid_post"
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m"  # sae-lens' gemma_3 naming for the 270M
    assert (sae.cfg.metadata.release, sae.cfg.metadata.sae_id) == (release, sae_id)
    assert torch.equal(sae.W_enc, params["w_enc"]) and torch.equal(sae.threshold, params["threshold"])
    # the same folder by hub repo id + folder, and a copy filed under the release name
    by_repo = load_sae("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium", device="cpu")
    assert torch.equal(by_repo.W_dec, sae.W_dec)
    other, _ = _gemma_scope_270m(tmp_path / "x", layer=5)
    (tmp_path / "home" / "saes" / release).mkdir(parents=True)
    other.rename(tmp_path / "home" / "saes" / release / other.name)
    assert load_sae(release, "layer_5_width_16k_l0_medium", device="cpu").cfg.metadata.hook_name == \
        "blocks.5.hook_resid_post"


def test_a_gemma_scope_2_release_in_the_hugging_face_cache_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "hf" / "models--google--gemma-scope-2-270m-pt" / "snapshots" / ("0" * 40)
    _gemma_scope_270m(snapshot, layer=12)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    sae = load_sae("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium", device="cpu")
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert "snapshots" in sae.cfg.metadata.source_path


@pytest.mark.parametrize("offline", ["env", "network"])
def test_offline_hub_attempts_fail_at_once_with_what_to_download(tmp_path, monkeypatch, offline):
    import socket
    import time

    from sae_lens import SAE

    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    _empty_hf_cache(monkeypatch, tmp_path)
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def refused(*_a, **_k):
            raise OSError("[Errno -2] Name or service not known")

        monkeypatch.setattr(socket, "create_connection", refused)

    def slow_retries(*_a, **_k):
        raise AssertionError("no hub attempt when the hub is known to be unreachable")

    monkeypatch.setattr(SAE, "from_pretrained", slow_retries)
    for release, sae_id in [("gemma-scope-2-270m-pt-res", "layer_9_width_16k_l0_medium"),
                            ("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium")]:
        t0 = time.perf_counter()
        with pytest.raises(interp.InterpError, match=r"no hub is reachable from here \((HF_HUB_OFFLINE|huggingface.co"
                                                     r":443 is not reachable).*hf download google/gemma-scope-2-270m-pt "
                                                     r"--include 'resid_post/layer_9_width_16k_l0_medium/\*'"):
            load_sae(release, sae_id, device="cpu")
        assert time.perf_counter() - t0 < 5


def test_a_gemma_scope_2_hub_repo_id_uses_sae_lens_gemma_3_loader(monkeypatch, tmp_path):
    """The default sae-lens loader wants cfg.json; Gemma Scope 2 folders ship config.json."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import gemma_3_sae_huggingface_loader

    import interp.saes

    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    _empty_hf_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(interp.saes, "hub_unreachable", lambda *a, **k: None)
    seen = {}
    real = load_sae(_gemma_scope_folder(tmp_path / "s", _random_params()), device="cpu")

    def fake(release, sae_id, **kw):
        seen.update(release=release, sae_id=sae_id, converter=kw.get("converter"))
        return real

    monkeypatch.setattr(SAE, "from_pretrained", fake)
    load_sae("google/gemma-scope-2-270m-pt", "layer_9_width_16k_l0_medium", device="cpu")  # a registry id
    assert seen == {"release": "google/gemma-scope-2-270m-pt", "sae_id": "resid_post/layer_9_width_16k_l0_medium",
                    "converter": gemma_3_sae_huggingface_loader}
    load_sae("gemma-scope-2-270m-pt-res", "layer_9_width_16k_l0_medium", device="cpu")
    assert seen["sae_id"] == "layer_9_width_16k_l0_medium" and seen["converter"] is gemma_3_sae_huggingface_loader


def test_the_demo_uses_the_published_gemma_scope_2_sae_when_a_copy_is_on_disk(tmp_path, monkeypatch):
    from interp.demo import GEMMA_SCOPE_LAYERS, choose_sae, demo_config

    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _empty_hf_cache(monkeypatch, tmp_path)
    config = demo_config()
    assert config.sae.layer in GEMMA_SCOPE_LAYERS
    said = choose_sae(config)
    assert config.sae.release is None and said.startswith("SAE: a TopK SAE trained here")
    assert "HF_HUB_OFFLINE" in said and "gemma-scope-2-270m-pt-res/layer_9_width_16k_l0_medium" in said
    folder, _ = _gemma_scope_270m(tmp_path / "home" / "saes" / "gemma-scope-2-270m-pt-res", layer=config.sae.layer)
    config = demo_config(quick=True)
    said = choose_sae(config)
    assert config.sae.release == str(folder) and config.sae.sae_id is None
    assert "published Gemma Scope 2" in said and str(folder) in said
    config.check(resources=False)
    sae = load_sae(config.sae.release, device="cpu", layer=config.sae.layer)
    assert sae.cfg.metadata.hook_name == f"blocks.{config.sae.layer}.hook_resid_post" and sae.cfg.d_in == 640


def test_sae_for_says_whether_its_sae_is_published_or_trained_here(tmp_path, tiny_medgemma):
    folder = _gemma_scope_folder(tmp_path, _random_params())
    published = interp.sae_for(tiny_medgemma, str(folder), layer=LAYER, progress=False)
    assert published.cfg.metadata.interp_source == f"published: {folder}"
    trained = interp.sae_for(tiny_medgemma, None, layer=LAYER, train_prompts=interp.prompts.general()[:8], d_sae=32,
                             k=4, steps=5, progress=False)
    assert trained.cfg.metadata.interp_source.startswith("trained here: TopK d_sae=32, k=4, 5 steps on 8 prompts (")
