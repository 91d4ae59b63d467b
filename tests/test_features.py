"""Register features, feature cards and feature ablation on tiny-medgemma with a planted register direction,
checked against per-prompt Hugging Face forwards, scipy and statsmodels."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import planted_jumprelu_sae
from sae_lens import JumpReLUSAE
from scipy import stats
from statsmodels.stats.multitest import multipletests

import interp
from interp.data import builtin
from interp.features import ablate_feature, feature_card, register_features

K = 3  # layer of tiny-medgemma (6 layers) where the register direction is planted
PLANTED = 5  # the SAE feature that reads it
N_PAIRS = 16  # > 13, so scipy's per-feature Wilcoxon uses the exact or the normal null, never a permutation


def _sae(model, reads: torch.Tensor, writes: torch.Tensor, *, layer: int = K, d_in: int | None = None,
         threshold: float = 5.0) -> JumpReLUSAE:
    """Random JumpReLU features orthogonal to ``reads`` and ``writes``, plus feature PLANTED that reads the
    unit vector ``reads`` (firing above ``threshold``) and decodes to ``writes``."""
    d = d_in or model.d_model
    if d != model.d_model:  # an SAE for another width: nothing planted
        return planted_jumprelu_sae(d, layer, seed=1, threshold=0.2, avoid=[])
    return planted_jumprelu_sae(d, layer, seed=1, threshold=0.2, avoid=[reads, writes], feature=PLANTED,
                                reads=reads, writes=writes, feature_threshold=threshold)


@pytest.fixture(scope="module")
def plant(tiny_medgemma):
    """tiny-medgemma whose layer K adds ``size * (answer + tag)`` to every non-special token of prompts holding the
    marker token (the 'lay' phrasings): ``answer`` = unembed(yes) - unembed(no) (unit, signed to push the lay
    answers across zero), ``tag`` a unit vector orthogonal to it that the model itself hardly uses. SAE
    feature PLANTED reads ``tag`` and
    decodes to ``answer + tag``, so it carries the plant and (almost) nothing else."""
    model = tiny_medgemma
    marker = model.tokenizer.convert_tokens_to_ids("Ġjust")
    pairs = [dataclasses.replace(p, question_b=p.question_a.replace(" ", " just ", 1), same_polarity=True)
             for p in builtin()[:N_PAIRS]]
    yes, no = model.answer_ids
    head = model.hf.get_output_embeddings().weight.detach()
    formal = interp.consistency.margins(model, [p.prompt_a() for p in pairs])
    answer = -float(np.sign(formal.median())) * (head[yes] - head[no]) / (head[yes] - head[no]).norm()
    natural = interp.capture(model, [p.prompt_a() for p in pairs], layers=[K], positions="all",
                             exclude=("special",), progress=False)[K]  # [tokens, d]
    # tag: the direction (orthogonal to answer) that the model's own residual stream uses least, so that
    # reading it picks up the plant and next to nothing else
    flat = natural - (natural @ answer)[:, None] * answer
    tag = torch.linalg.svd(flat, full_matrices=False).Vh[-2]
    tag -= answer * (answer @ tag)
    tag /= tag.norm()
    size = 20 * float(natural.norm(dim=-1).median())
    push = size * (answer + tag)
    lay = {"on": True}

    sample = model.encode([p.prompt_b() for p in pairs])
    special = torch.unique(sample.input_ids[sample.special_mask])  # BOS and turn markers, as encode() marks them

    def remember(_module, args):  # lay prompts' non-special tokens (BOS stays clean, as SAE splicing skips it)
        ids = args[0]
        lay["where"] = (ids == marker).any(1, keepdim=True) & ~torch.isin(ids, special)

    def add(_module, _inputs, output):
        resid = output[0] if isinstance(output, tuple) else output
        if lay["on"]:
            resid += push * lay["where"][..., None].to(resid.dtype)

    handles = [model.hf.get_input_embeddings().register_forward_pre_hook(remember),
               model.layers[K].register_forward_hook(add)]
    def unplanted(prompts) -> np.ndarray:
        lay["on"] = False
        try:
            return interp.consistency.margins(model, prompts).numpy()
        finally:
            lay["on"] = True

    yield model, pairs, _sae(model, tag, answer + tag, threshold=size / 2), unplanted
    for h in handles:
        h.remove()


def _one_by_one(model, prompts, layer: int):
    """Per prompt: the layer's output ``[pos, d]`` and the batch masks, from a single unbatched forward."""
    out = []
    for prompt in prompts:
        batch = model.encode([prompt])
        kept = {}
        h = model.layers[layer].register_forward_hook(
            lambda _m, _i, o, kept=kept: kept.__setitem__("x", (o[0] if isinstance(o, tuple) else o).clone()))
        with torch.no_grad():
            model.hf(**batch.inputs)
        h.remove()
        out.append((kept["x"][0], batch))
    return out


def test_the_plant_flips_answers(plant):
    model, pairs, _, _ = plant
    ma = interp.consistency.margins(model, [p.prompt_a() for p in pairs])
    mb = interp.consistency.margins(model, [p.prompt_b() for p in pairs])
    assert (torch.sign(ma) != torch.sign(mb)).float().mean() > 0.6


def test_register_features_ranks_the_planted_feature_first(plant):
    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs, progress=False)
    assert table.layer == K and table.pools == ("question", "last")
    for pool in table.pools:
        top = table.top(1, pool=pool).iloc[0]
        assert top["feature"] == PLANTED and top["direction"] == "lay" and top["q"] < 1e-3
        assert top["mean_a"] == 0 and top["active_b"] == 1.0
    assert table.top(3, direction="formal")["direction"].eq("formal").all()
    assert PLANTED in table.significant()["feature"].tolist()


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_p_and_q_values_match_scipy_and_statsmodels(plant, test):
    """Pooled activations recomputed one prompt at a time; p from scipy per feature; q from statsmodels."""
    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs, test=test, progress=False)
    prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
    pooled = {"question": [], "last": []}
    for resid, batch in _one_by_one(model, prompts, K):
        feats = sae.encode(resid).detach().numpy()
        pooled["question"].append(feats[batch.question_mask[0].numpy()].mean(0))
        pooled["last"].append(feats[int(batch.last_index[0])])
    n = len(pairs)
    for pool, rows in pooled.items():
        x = np.stack(rows).astype(np.float64)
        a, b = x[:n], x[n:]
        got = table.table[table.table["pool"] == pool].set_index("feature").sort_index()
        np.testing.assert_allclose(got["mean_a"], a.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["mean_b"], b.mean(0), rtol=1e-4, atol=1e-6)
        tested = np.flatnonzero((a != b).any(0))
        assert got["p"].notna().sum() == len(tested)
        p = np.array([(stats.wilcoxon(a[:, j], b[:, j]) if test == "wilcoxon" else stats.ttest_rel(a[:, j], b[:, j]))
                      .pvalue for j in tested])
        np.testing.assert_allclose(got["p"].to_numpy()[tested], p, rtol=1e-4)
        np.testing.assert_allclose(got["q"].to_numpy()[tested], multipletests(p, method="fdr_bh")[1], rtol=1e-4)
        d = a[:, tested] - b[:, tested]
        np.testing.assert_allclose(got["d_z"].to_numpy()[tested], d.mean(0) / d.std(0, ddof=1), rtol=1e-3)
    # Sorted: q ascending within each pool.
    for _, grp in table.table.groupby("pool"):
        q = grp["q"].dropna().to_numpy()
        assert (np.diff(q) >= 0).all()


def test_feature_card_shows_the_planted_feature_on_lay_prompts_only(plant):
    model, pairs, sae, _ = plant
    card = feature_card(model, sae, PLANTED, pairs, top_k=5, progress=False)
    assert (card.top_prompts["register"] == "lay").all() and len(card.top_prompts) == 5
    assert card.by_register["formal"]["frac_active"] == 0 and card.by_register["lay"]["frac_active"] == 1
    assert card.by_register["lay"]["n"] == len(pairs)
    top = card.top_prompts.iloc[0]
    prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
    (resid, batch), = _one_by_one(model, [prompts[int(top["prompt"])]], K)
    acts = sae.encode(resid)[:, PLANTED].detach()
    keep = ~batch.special_mask[0] & ~batch.image_mask[0]
    assert float(acts[keep].max()) == pytest.approx(top["max_act"], rel=1e-4)
    assert int(top["position"]) == int(torch.nonzero(keep)[acts[keep].argmax()])
    assert "[[" in top["context"] and len(card.top_tokens) > 0


def _spliced_margins(model, prompts, sae, feature: int, value: float) -> np.ndarray:
    """Margins with the SAE spliced in at layer K (feature set to ``value``), one unbatched forward each."""
    yes, no = model.answer_ids
    out = []
    for prompt in prompts:
        batch = model.encode([prompt])
        keep = (~batch.special_mask[0] & ~batch.image_mask[0])

        def splice(_m, _i, o, keep=keep):
            resid = o[0] if isinstance(o, tuple) else o
            x = resid[0, keep]
            f = sae.encode(x)
            g = f.clone()
            g[:, feature] = value
            resid[0, keep] = sae.decode(g) + (x - sae.decode(f))  # reconstruction + error term

        h = model.layers[K].register_forward_hook(splice)
        with torch.no_grad():
            logits = model.hf(**batch.inputs).logits[0, -1]
        h.remove()
        out.append(float(logits[yes] - logits[no]))
    return np.array(out)


def test_zeroing_the_planted_feature_removes_the_plant(plant):
    model, pairs, sae, unplanted = plant
    result = ablate_feature(model, sae, pairs, feature=PLANTED, progress=False)
    t = result.pairs
    prompts_a, prompts_b = [p.prompt_a() for p in pairs], [p.prompt_b() for p in pairs]
    np.testing.assert_allclose(t["margin_a_after"], _spliced_margins(model, prompts_a, sae, PLANTED, 0.0), atol=1e-4)
    np.testing.assert_allclose(t["margin_b_after"], _spliced_margins(model, prompts_b, sae, PLANTED, 0.0), atol=1e-4)
    np.testing.assert_allclose(t["margin_b_before"], interp.consistency.margins(model, prompts_b), atol=1e-4)
    # The feature carries the plant: without it the lay answers return to (near) their unplanted values.
    # Not exactly: zeroing the feature also removes the small natural part of the residual along its
    # encoder direction.
    clean = unplanted(prompts_b)
    err_before, err_after = np.abs(t["margin_b_before"] - clean), np.abs(t["margin_b_after"] - clean)
    assert err_after.max() < 0.3 and err_after.mean() < 0.1 * err_before.mean()
    np.testing.assert_allclose(t["margin_a_after"], t["margin_a_before"], atol=1e-6)  # never fires on formal
    assert result.flip_rate_before > 0.6 and result.flip_rate_after < result.flip_rate_before
    assert result.margin_diff_after < 0.2 * result.margin_diff_before and result.p_margin_diff < 0.01


def test_splicing_without_an_edit_leaves_the_forward_pass_unchanged(plant):
    model, pairs, sae, _ = plant
    with torch.no_grad():
        sae.threshold[0] = 1e9  # feature 0 never fires: zeroing it is no edit at all
    try:
        result = ablate_feature(model, sae, pairs[:4], feature=0, progress=False)
    finally:
        with torch.no_grad():
            sae.threshold[0] = 0.2
    t = result.pairs
    assert np.array_equal(t["margin_a_after"], t["margin_a_before"])
    assert np.array_equal(t["margin_b_after"], t["margin_b_before"])
    assert result.p_flip == 1.0 and result.p_margin_diff == 1.0


def test_clamping_swaps_the_registers(plant):
    model, pairs, sae, unplanted = plant
    result = ablate_feature(model, sae, pairs, feature=PLANTED, mode="clamp", progress=False)
    lay_tokens = np.concatenate([sae.encode(resid)[:, PLANTED].detach().numpy()[
        (~batch.special_mask[0] & ~batch.image_mask[0]).numpy()]
        for resid, batch in _one_by_one(model, [p.prompt_b() for p in pairs], K)])
    assert result.clamp_values["a"] == pytest.approx(lay_tokens.mean(), rel=1e-4)
    assert result.clamp_values["b"] == 0.0  # the feature never fires on the formal phrasing
    t = result.pairs
    prompts_b = [p.prompt_b() for p in pairs]
    np.testing.assert_allclose(t["margin_a_after"], t["margin_b_before"], atol=0.05)  # formal now answers as lay
    clean = unplanted(prompts_b)  # and lay lost the plant (up to the feature's natural part, as above)
    assert np.abs(t["margin_b_after"] - clean).mean() < 0.1 * np.abs(t["margin_b_before"] - clean).mean()


def test_bad_input_gets_a_clear_error(plant, tiny_llava):
    model, pairs, sae, _ = plant
    with pytest.raises(interp.InterpError, match="d_model=64"):
        register_features(model, _sae(model, None, None, d_in=640), pairs, progress=False)
    with pytest.raises(interp.InterpError, match=r"layer 3\)"):
        register_features(model, sae, pairs, layer=2, progress=False)
    with pytest.raises(interp.InterpError, match="at least 2 pairs"):
        register_features(model, sae, pairs[:1], progress=False)
    with pytest.raises(interp.InterpError, match="pool="):
        register_features(model, sae, pairs, pool="mean", progress=False)
    with pytest.raises(interp.InterpError, match="test="):
        register_features(model, sae, pairs, test="anova", progress=False)
    with pytest.raises(interp.InterpError, match="feature=99"):
        feature_card(model, sae, 99, pairs)
    with pytest.raises(interp.InterpError, match="mode="):
        ablate_feature(model, sae, pairs, feature=PLANTED, mode="mean")
    with pytest.raises(interp.InterpError, match="out of range"):
        register_features(tiny_llava, _sae(model, None, None, d_in=640, layer=5), pairs)  # tiny-llava has 4 layers


def test_results_print_plot_and_serialise(plant):
    model, pairs, sae, _ = plant
    small = pairs[:6]
    table = register_features(model, sae, small, test="ttest", progress=False)
    card = feature_card(model, sae, PLANTED, [p.prompt_b() for p in small], top_k=3, progress=False)
    ablation = ablate_feature(model, sae, small, feature=PLANTED, progress=False)
    assert f"top {PLANTED} (lay" in repr(table)
    assert "prompt: fires on 100%" in repr(card)
    assert "zero feature 5 at layer 3" in repr(ablation)
    for result in (table, card, ablation):
        assert result.figure().data
        json.loads(json.dumps(result.to_dict()))
