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


def _signed_rank_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p by the normal approximation, written out: zeros dropped, mid-ranks,
    tie-corrected variance, continuity correction 0.5 (an independent check of the table's one method)."""
    d = d[d != 0]
    n = len(d)
    ranks = stats.rankdata(np.abs(d))
    t_plus = ranks[d > 0].sum()
    _, ties = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (ties ** 3 - ties).sum() / 48
    dev = max(abs(t_plus - n * (n + 1) / 4) - 0.5, 0)
    return float(2 * stats.norm.sf(dev / np.sqrt(var)))


def test_register_features_ranks_the_planted_feature_first(plant):
    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs, progress=False)
    assert table.layer == K and table.pools == ("question", "last")
    n = len(pairs)
    for pool in table.pools:
        top = table.top(1, pool=pool).iloc[0]
        assert top["feature"] == PLANTED and top["direction"] == "lay" and top["q"] < 0.05
        assert top["mean_a"] == 0 and top["active_b"] == 1.0 and top["n_nonzero"] == n
        # every lay phrasing above its formal one: T- = n(n+1)/2, no ties; the normal approximation's p
        known = 2 * stats.norm.sf((n * (n + 1) / 4 - 0.5) / np.sqrt(n * (n + 1) * (2 * n + 1) / 24))
        assert top["p"] == pytest.approx(known, rel=1e-9)  # 4.8e-4 for n = 16
        assert top["p_random"] < 0.05  # beyond (nearly) every random direction
    assert table.top(1)["p_random"].iloc[0] == pytest.approx(1 / (1 + table.n_random))  # question pool: all 256
    assert table.top(3, direction="formal")["direction"].eq("formal").all()
    assert PLANTED in table.significant()["feature"].tolist()
    # The plant pushes every token of the lay prompts far along one direction, so every random residual
    # direction differs too: the control says so, and only the planted feature beats it.
    cal = table.calibration()
    assert cal["n_random"] == 256 and cal["random_p_rate"] > 0.9 and cal["confounded"]
    assert table.significant(beats_random=True)["feature"].tolist() == [PLANTED]
    assert "WARNING: random directions pass far above the nominal rate" in repr(table)


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_p_and_q_values_match_scipy_and_statsmodels(plant, test):
    """Pooled activations recomputed one prompt at a time; p by the signed-rank formula written out (or scipy's
    paired t) per feature; q from statsmodels."""
    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs, test=test, n_random=16, progress=False)
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
        p = np.array([_signed_rank_p(a[:, j] - b[:, j]) if test == "wilcoxon" else
                      stats.ttest_rel(a[:, j], b[:, j]).pvalue for j in tested])
        np.testing.assert_allclose(got["p"].to_numpy()[tested], p, rtol=1e-3)
        np.testing.assert_allclose(got["q"].to_numpy()[tested], multipletests(p, method="fdr_bh")[1], rtol=1e-3)
        d = a[:, tested] - b[:, tested]
        np.testing.assert_allclose(got["d_z"].to_numpy()[tested], d.mean(0) / d.std(0, ddof=1), rtol=1e-3)
    # Sorted: q ascending within each pool, then p.
    for _, grp in table.table.groupby("pool"):
        g = grp.dropna(subset=["q"])
        assert (np.diff(g["q"].to_numpy()) >= 0).all()
        same_q = g.groupby("q")["p"].apply(lambda s: bool((np.diff(s.to_numpy()) >= 0).all()))
        assert same_q.all()


def test_one_test_for_every_column_ranks_a_planted_column_first():
    """The old bug: exact Wilcoxon p for tie-free columns, normal-approximation p for the rest. 40 'random
    directions' shifted by a wording confound (every pair positive, no ties: exact p = 2/2^16 = 3.1e-5) then
    outranked a planted column with d_z = 8.4 whose values tie (normal p = 4.8e-4). One method: planted first."""
    from interp.features import paired_stats

    rng = np.random.default_rng(0)
    n = 16
    xb = rng.normal(size=(n, 41))
    xa = xb + 3.0 + rng.uniform(0, 1, size=(n, 41))  # confounded columns: all positive, tie-free
    planted = np.round(np.linspace(4.4, 5.6, n), 1)  # a few tied differences
    xa[:, 0] = xb[:, 0] + planted
    d_z = planted.mean() / planted.std(ddof=1)
    assert d_z > 8.4 and len(np.unique(planted)) < n
    assert stats.wilcoxon(planted, method="auto").pvalue > stats.wilcoxon(xa[:, 1] - xb[:, 1]).pvalue  # the old mix
    out = paired_stats(xa, xb, "wilcoxon")
    assert out["p"].nunique() <= 2  # every column saturates the statistic: only the tie correction differs
    assert out["p"][0] <= out["p"][1:].min()
    ranked = out.assign(a=-out["d_z"].abs()).sort_values(["q", "p", "a"])
    assert ranked.index[0] == 0


def test_random_directions_pass_at_the_nominal_rate_without_a_register_effect():
    """Known answer: with exchangeable phrasings (no register effect) a random direction has p < 0.05 about 5%
    of the time; a length-like shift of every phrasing b makes nearly all of them pass."""
    from interp.features import random_direction_stats

    rng = np.random.default_rng(1)
    rates = []
    for rep in range(200):
        ra, rb = rng.normal(size=(20, 32)), rng.normal(size=(20, 32))
        r = random_direction_stats(ra, rb, k=64, seed=rep)
        rates.append((r["p"] < 0.05).mean())
    assert 0.035 < np.mean(rates) < 0.065  # nominal 0.05; 200 x 64 directions
    shift = 2 * rng.normal(size=32)  # a confound that moves every coordinate (length, wording)
    ra, rb = rng.normal(size=(20, 32)), rng.normal(size=(20, 32)) + shift
    r = random_direction_stats(ra, rb, k=64, seed=0)
    assert (r["p"] < 0.05).mean() > 0.7
    u = np.random.default_rng(0).standard_normal((32, 64))  # the documented directions: seeded unit Gaussians
    proj = (ra - rb) @ (u / np.linalg.norm(u, axis=0))
    np.testing.assert_allclose(r["d_z"], proj.mean(0) / proj.std(0, ddof=1), rtol=1e-9)


def test_register_features_control_is_calibrated_on_unrelated_question_pairs(tiny_medgemma):
    """Pairs of two unrelated formal questions in random order have no register effect: the random residual
    directions pass near the nominal rate (averaged over re-randomised orders: the sign-flip null)."""
    from interp.data import ParaphrasePair
    from interp.features import _question_and_last, pooled_residual, random_direction_stats

    qs = [p.question_a for p in builtin()[:80]]
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(40):
        a, b = (qs[i], qs[i + 40]) if rng.random() < 0.5 else (qs[i + 40], qs[i])
        pairs.append(ParaphrasePair(id=f"null-{i}", question_a=a, question_b=b))
    sae = planted_jumprelu_sae(tiny_medgemma.d_model, K, seed=3, threshold=0.2, avoid=[])
    table = register_features(tiny_medgemma, sae, pairs, n_random=128, progress=False)
    cal = table.calibration()
    assert not cal["confounded"] and cal["random_p_rate"] < 0.25
    acts = interp.capture(tiny_medgemma, [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs],
                          layers=[K], positions=_question_and_last, progress=False)
    r = pooled_residual(acts, K, ("question",))["question"].numpy()
    rates = []
    for s in range(40):  # swap the phrasings of a random half of the pairs: the null the test assumes
        swap = np.random.default_rng(100 + s).random(40) < 0.5
        ra = np.where(swap[:, None], r[40:], r[:40])
        rb = np.where(swap[:, None], r[:40], r[40:])
        rates.append((random_direction_stats(ra, rb, k=128, seed=s)["p"] < 0.05).mean())
    assert 0.02 < np.mean(rates) < 0.10


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
    result = ablate_feature(model, sae, pairs, feature=PLANTED, n_random=6, progress=False)
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

    # Each number against an independent computation.
    n = len(pairs)
    fb, fa = t["flip_before"].to_numpy(bool), t["flip_after"].to_numpy(bool)
    gone, new = int((fb & ~fa).sum()), int((~fb & fa).sum())
    assert (result.flips_removed, result.flips_added) == (gone, new)
    exact = stats.binomtest(min(gone, new), gone + new, 0.5).pvalue  # exact McNemar = binomial test on discordants
    assert result.p_flip == pytest.approx(exact, rel=1e-9)
    k = int(fb.sum())
    cp = (stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0, stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0)
    np.testing.assert_allclose(result.flip_rate_ci_before, cp, rtol=1e-6)
    change = (t["diff_after"] - t["diff_before"]).to_numpy()
    assert result.margin_diff_change == pytest.approx(change.mean(), rel=1e-9)
    assert (change < 0).all()  # every pair more consistent: the exact signed-rank p is 2 / 2^16
    assert result.p_margin_diff == pytest.approx(2 / 2 ** n, rel=1e-9) and "exact null" in result.tests["p_margin_diff"]
    lo, hi = result.margin_diff_change_ci
    assert lo <= change.mean() <= hi < 0
    assert result.margin_diff_relative == pytest.approx(t["diff_after"].mean() / t["diff_before"].mean() - 1)
    lo, hi = result.flip_rate_change_ci
    assert lo <= result.flip_rate_change <= hi and hi < 0

    # Random-feature control: alive features of similar size, edited the same way, do next to nothing.
    ctrl = result.random_control
    assert len(ctrl) == 6 and PLANTED not in ctrl["feature"].tolist() and (ctrl["size"] > 0).all()
    assert result.rank_among_random == 1 and result.p_random == pytest.approx(1 / 7)
    assert ctrl["margin_diff_change"].abs().max() < 0.2 * abs(result.margin_diff_change)
    assert result.held_out is None and "not given" in result.evaluated_on
    text = repr(result)
    assert "exact McNemar" in text and "Newcombe" in text and "ranks 1 of 7" in text and "logits" in text


def test_ablation_says_which_pairs_it_was_evaluated_on(plant):
    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs[:8], n_random=0, progress=False)
    assert table.pair_ids == tuple(p.id for p in pairs[:8])
    held = ablate_feature(model, sae, pairs[8:12], feature=PLANTED, selection=table, n_random=0, progress=False)
    assert held.held_out is True and "held out: 4 evaluation pairs, none among the 8" in held.evaluated_on
    with pytest.warns(UserWarning, match="IN-SAMPLE: 2 of the 4 evaluation pairs"):
        leak = ablate_feature(model, sae, pairs[6:10], feature=PLANTED, selection=pairs[:8], n_random=0,
                              progress=False)
    assert leak.held_out is False and "IN-SAMPLE" in repr(leak)
    assert "not run" in repr(leak)  # no control asked for: the report says so


def test_paired_flip_rate_change_interval_covers_and_never_collapses():
    """Newcombe's paired interval: about 95% coverage by simulation, and no [0, 0] at zero flips (the
    percentile bootstrap's failure)."""
    from interp.features import _newcombe_paired

    lo, hi = _newcombe_paired(np.array([[0, 0], [0, 36]]))
    assert lo < 0 < hi and hi - lo > 0.15
    rng = np.random.default_rng(0)
    cells = np.array([0.05, 0.10, 0.03, 0.82])  # both flip, before only, after only, neither
    truth = cells[2] - cells[1]  # after - before
    tables = rng.multinomial(60, cells, size=2000).reshape(-1, 2, 2)
    covered = np.mean([lo <= truth <= hi for lo, hi in map(_newcombe_paired, tables)])
    assert 0.93 < covered < 0.98


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
    result = ablate_feature(model, sae, pairs, feature=PLANTED, mode="clamp", n_random=0, progress=False)
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
    ablation = ablate_feature(model, sae, small, feature=PLANTED, n_random=2, n_boot=200, progress=False)
    assert f"top {PLANTED} (lay" in repr(table)
    assert "prompt: fires on 100%" in repr(card)
    assert "zero feature 5 at layer 3" in repr(ablation)
    for result in (table, card, ablation):
        assert result.figure().data
        json.loads(json.dumps(result.to_dict()))


# ---- clusters of dependent pairs are the units ------------------------------------------------------------
def _by_hand_cluster_means(x: np.ndarray, labels: list[str]) -> np.ndarray:
    """Row means of ``x`` within each label, in order of first appearance (written out, no library helper)."""
    order = list(dict.fromkeys(labels))
    return np.stack([x[[i for i, c in enumerate(labels) if c == lab]].mean(0) for lab in order])


def test_paired_stats_tests_cluster_means_when_pairs_cluster():
    """24 pairs in 6 clusters of unequal size: p, d_z and means are those of scipy's tests on the 6 cluster means
    (the old code took the 24 pairs as independent); one pair per cluster gives the pair-level numbers exactly."""
    from interp.features import paired_stats

    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 4, 6, 8]
    labels = [f"q{g}" for g, m in enumerate(sizes) for _ in range(m)]
    n = len(labels)
    xb = rng.normal(size=(n, 5))
    xa = xb + 0.4 + rng.normal(size=(n, 5))
    xa[:, 4] = xb[:, 4]  # never differs: untested
    for test in ("wilcoxon", "ttest"):
        out = paired_stats(xa, xb, test, clusters=labels)
        da = _by_hand_cluster_means(xa - xb, labels)  # [6, 5]
        for j in range(4):
            want = (stats.wilcoxon(da[:, j], method="asymptotic", correction=True, zero_method="wilcox").pvalue
                    if test == "wilcoxon" else stats.ttest_1samp(da[:, j], 0.0).pvalue)
            assert out["p"][j] == pytest.approx(want, rel=1e-9)
        np.testing.assert_allclose(out["d_z"][:4], da[:, :4].mean(0) / da[:, :4].std(0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(out["mean_a"], _by_hand_cluster_means(xa, labels).mean(0), rtol=1e-9)
        np.testing.assert_allclose(out["q"][:4], multipletests(out["p"][:4], method="fdr_bh")[1], rtol=1e-12)
        assert np.isnan(out["p"][4]) and (out["n_clusters"] == 6).all() and out["n_nonzero"][0] == 6
        assert out["active_a"][0] == pytest.approx((xa[:, 0] > 0).mean())  # per phrasing, not per unit
        plain = paired_stats(xa, xb, test)
        assert (plain["n_clusters"] == n).all() and plain["p"][0] != out["p"][0]
        pd_testing = pytest.importorskip("pandas.testing")
        pd_testing.assert_frame_equal(paired_stats(xa, xb, test, clusters=[str(i) for i in range(n)]), plain,
                                      check_exact=True)
        diff = xa - xb  # the pair-level numbers, as before clusters were taken into account
        want = (stats.wilcoxon(diff[:, 0], method="asymptotic", correction=True, zero_method="wilcox").pvalue
                if test == "wilcoxon" else stats.ttest_rel(xa[:, 0], xb[:, 0]).pvalue)
        assert plain["p"][0] == pytest.approx(want, rel=1e-9)
        assert plain["d_z"][0] == pytest.approx(diff[:, 0].mean() / diff[:, 0].std(ddof=1), rel=1e-12)


def test_random_direction_control_uses_the_same_units_as_the_features():
    """The control's directions and its sign-flip null are computed on cluster means too (whole clusters
    swapped), so features and directions are compared like for like."""
    from interp.features import random_direction_stats, sign_flip_pass_rates

    rng = np.random.default_rng(4)
    labels = [f"g{i // 4}" for i in range(32)]  # 8 clusters of 4 pairs
    ra, rb = rng.normal(size=(32, 16)), rng.normal(size=(32, 16)) + 0.2
    ma, mb = _by_hand_cluster_means(ra, labels), _by_hand_cluster_means(rb, labels)
    got = random_direction_stats(ra, rb, k=32, seed=1, clusters=labels)
    want = random_direction_stats(ma, mb, k=32, seed=1)  # the 8 cluster means as 8 pairs
    np.testing.assert_allclose(got["p"], want["p"], rtol=1e-9)
    np.testing.assert_allclose(got["d_z"], want["d_z"], rtol=1e-9)
    assert (got["n_clusters"] == 8).all()
    np.testing.assert_allclose(sign_flip_pass_rates(ra, rb, k=32, seed=1, n_flips=50, clusters=labels),
                               sign_flip_pass_rates(ma, mb, k=32, seed=1, n_flips=50))


def _grouped(pairs, n_questions: int = 4, per: int = 4):
    """Each of ``n_questions`` questions asked in ``per`` pairs that share phrasing A and a question group."""
    ends = ["", " please", " now", " today"]
    return [dataclasses.replace(p, id=f"{p.id}-{k}", question_b=p.question_b + ends[k], group=p.id)
            for p in pairs[:n_questions] for k in range(per)]


def test_register_features_takes_question_groups_as_units(plant):
    """4 questions x 4 pairs: the planted feature is tested on 4 units (signed-rank p 0.10, not significant),
    not on 16 (p 4.8e-4, as the old code reported); p and d_z match scipy on cluster means computed by hand
    from per-prompt forwards."""
    model, pairs, sae, _ = plant
    grouped = _grouped(pairs)
    labels = [p.group for p in grouped]
    table = register_features(model, sae, grouped, pool="question", n_random=16, progress=False)
    top = table.table.set_index("feature").loc[PLANTED]
    n = 4
    known = 2 * stats.norm.sf((n * (n + 1) / 4 - 0.5) / np.sqrt(n * (n + 1) * (2 * n + 1) / 24))
    assert top["p"] == pytest.approx(known, rel=1e-9) and known == pytest.approx(0.100, abs=1e-3)
    assert top["n_clusters"] == 4 and top["n_nonzero"] == 4 and not top["q"] < 0.05
    assert table.n_pairs == 16 and table.n_clusters == 4 and "16 pairs in 4 clusters" in repr(table)
    assert "each the mean of its pairs" in table.units
    prompts = [p.prompt_a() for p in grouped] + [p.prompt_b() for p in grouped]
    x = np.stack([sae.encode(resid).detach().numpy()[batch.question_mask[0].numpy()].mean(0)
                  for resid, batch in _one_by_one(model, prompts, K)]).astype(np.float64)
    da = _by_hand_cluster_means(x[:16] - x[16:], labels)
    got = table.table.set_index("feature").sort_index()
    tested = np.flatnonzero((da != 0).any(0))
    p = [stats.wilcoxon(da[:, j], method="asymptotic", correction=True, zero_method="wilcox").pvalue for j in tested]
    np.testing.assert_allclose(got["p"].to_numpy()[tested], p, rtol=1e-3)
    np.testing.assert_allclose(got["d_z"].to_numpy()[tested], da[:, tested].mean(0) / da[:, tested].std(0, ddof=1),
                               rtol=1e-3)
    assert (table.random["n_clusters"] == 4).all()  # the control on the same units
    assert table.selection_pairs == tuple(grouped) and table.clusters == tuple(grouped[4 * (i // 4)].id
                                                                              for i in range(16))


def test_clustered_ablation_that_changes_no_flip_bounds_the_flip_rate_change(plant):
    """A feature whose ablation flips no pair either way: the cluster bootstrap would resample zeros and give
    [0, 0]; the interval is +- the Korn-Graubard upper limit on the share of pairs that change (0 of 16 in 4
    clusters), named as such."""
    from interp import stats as cstats

    model, pairs, sae, _ = plant
    grouped = _grouped(pairs)
    labels = [p.group for p in grouped]
    other = next(f for f in range(sae.cfg.d_sae) if f != PLANTED)
    result = ablate_feature(model, sae, grouped, feature=other, n_random=0, n_boot=200, progress=False)
    t = result.pairs
    assert (t["flip_before"] == t["flip_after"]).all(), "precondition: this feature's ablation flips no pair"
    u = cstats.proportion_ci(np.zeros(16), labels)[1]
    assert u > stats.beta.ppf(0.975, 1, 16)  # 4 clusters count for less than 16 independent pairs
    assert result.flip_rate_change == 0 and result.flip_rate_change_ci == (pytest.approx(-u), pytest.approx(u))
    assert result.tests["flip_rate_change_ci"].startswith("no pairs changed (0 of 16)")


def test_ablation_takes_clusters_as_units_when_pairs_cluster(plant):
    """The same 16 pairs in 4 clusters: flip-rate intervals with the Korn-Graubard effective n, the flip and
    margin tests as exact sign-flip tests over the 4 clusters (enumerated by hand here), change intervals from
    the cluster bootstrap; every test string names n pairs, clusters and the unit."""
    import itertools

    from interp import stats as cstats

    model, pairs, sae, _ = plant
    grouped = _grouped(pairs)
    labels = [p.group for p in grouped]
    result = ablate_feature(model, sae, grouped, feature=PLANTED, n_random=0, n_boot=400, progress=False)
    t = result.pairs

    def exact_sign_flip(d: np.ndarray) -> float:
        sums = np.array([d[[i for i, c in enumerate(labels) if c == g]].sum() for g in dict.fromkeys(labels)])
        null = [abs(np.dot(s, sums)) for s in itertools.product((1, -1), repeat=len(sums))]
        return float(np.mean([v >= abs(sums.sum()) - 1e-9 for v in null]))

    fb, fa = t["flip_before"].to_numpy(float), t["flip_after"].to_numpy(float)
    change = (t["diff_after"] - t["diff_before"]).to_numpy()
    assert result.p_flip == pytest.approx(exact_sign_flip(fa - fb), abs=1e-12)
    assert result.p_margin_diff == pytest.approx(exact_sign_flip(change), abs=1e-12)
    assert result.p_margin_diff == pytest.approx(2 / 2 ** 4)  # every cluster more consistent: 2 of 16 patterns
    assert result.n_clusters == 4 and t["cluster"].tolist() == [grouped[4 * (i // 4)].id for i in range(16)]
    assert result.flip_rate_ci_before == pytest.approx(cstats.proportion_ci(fb, labels))
    k = int(fb.sum())
    cp = (stats.beta.ppf(0.025, k, 16 - k + 1) if k else 0.0, stats.beta.ppf(0.975, k + 1, 16 - k) if k < 16 else 1.0)
    lo, hi = result.flip_rate_ci_before
    assert hi - lo > cp[1] - cp[0]  # 4 clusters carry less information than 16 independent pairs
    np.testing.assert_allclose(result.margin_diff_change_ci, cstats.mean_ci(change, labels, n_boot=400, seed=0),
                               rtol=1e-9)
    for key in ("p_flip", "p_margin_diff", "flip_rate_ci", "flip_rate_change_ci", "margin_diff_change_ci"):
        assert "16 pairs in 4 clusters" in result.tests[key], key
    assert "unit: clusters" in result.tests["p_flip"] and "sign_flip_test" in result.tests["p_margin_diff"]
    text = repr(result)
    assert "16 pairs in 4 clusters" in text and "exact clustered McNemar" in text and "Korn-Graubard" in text
    assert "Wilcoxon" not in text and "Newcombe" not in text
    json.loads(json.dumps(result.to_dict()))


# ---- held out means no shared cluster, not only no shared id ----------------------------------------------
def test_held_out_check_catches_renamed_pairs_and_shared_clusters(plant):
    """The review's case: the selection pairs renamed "eval-..." were reported held out. Now an evaluation
    pair that shares a cluster (interp.data.clusters over both sets) with a selection pair is in-sample."""
    from interp.data import clusters
    from interp.features import _selection_overlap

    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs[:8], pool="last", n_random=0, progress=False)
    renamed = [dataclasses.replace(p, id="eval-" + p.id) for p in pairs[:4]]
    with pytest.warns(UserWarning, match="IN-SAMPLE: 4 of the 4 evaluation pairs share an id or a cluster"):
        leak = ablate_feature(model, sae, renamed, feature=PLANTED, selection=table, n_random=0, n_boot=50,
                              progress=False)
    assert leak.held_out is False
    assert table.selection_pairs == tuple(pairs[:8])
    other = [dataclasses.replace(pairs[9], id="x1", context=pairs[0].context),  # a selection pair's report
             dataclasses.replace(pairs[10], id="x2", case="patient-7"),  # a selection pair's case
             dataclasses.replace(pairs[11], id="x3", group="q-12"),  # a selection pair's question group
             dataclasses.replace(pairs[12], id="x4")]  # nothing shared: held out
    sel = [*pairs[:7], dataclasses.replace(pairs[7], case="patient-7", group="q-12")]
    union = clusters(sel + other)  # the independent answer: which evaluation pairs join a selection cluster
    expect = [c in set(union[:8]) for c in union[8:]]
    assert expect == [True, True, True, False]
    held, text = _selection_overlap(other, sel)
    assert held is False and "IN-SAMPLE: 3 of the 4" in text
    assert _selection_overlap(other[3:], sel)[0] is True
    assert _selection_overlap(renamed, list(pairs[:8]))[0] is False  # pairs as selection: the same check


def test_an_old_feature_table_without_selection_pairs_falls_back_to_ids_and_says_so(plant):
    """A FeatureTable pickled by the previous version has pair_ids but no selection_pairs (nor n_clusters): the
    id check runs, with a warning that renamed or clustered pairs are not caught; repr still works."""
    import pickle
    import warnings

    from interp.features import FeatureTable, _selection_overlap

    model, pairs, sae, _ = plant
    table = register_features(model, sae, pairs[:6], pool="last", n_random=0, progress=False)
    old = FeatureTable.__new__(FeatureTable)
    state = {k: v for k, v in table.__dict__.items() if k not in ("selection_pairs", "clusters", "n_clusters", "units")}
    object.__setattr__(old, "__dict__", state)  # what unpickling an old file gives
    old = pickle.loads(pickle.dumps(old))
    assert old.selection_pairs == () and old.n_clusters == 0 and "6 pairs (" in repr(old)
    renamed = [dataclasses.replace(p, id="eval-" + p.id) for p in pairs[:2]]
    with pytest.warns(UserWarning, match="checked by pair id\\s+alone"):
        held, text = _selection_overlap(renamed, old)
    assert held is True and "checked by pair id only" in text  # the documented limit of an id-only table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held, text = _selection_overlap(list(pairs[:2]), old)
    assert held is False and "IN-SAMPLE: 2 of the 2" in text


def test_held_out_check_reads_a_layer_selections_pairs():
    from interp.data import ParaphrasePair
    from interp.features import _selection_overlap
    from interp.layers import LayerSelection

    pairs = [ParaphrasePair(f"p{i}", f"Is there finding {i}?", f"Any finding {i}?", group=f"g{i}") for i in range(6)]
    sel = LayerSelection((1, 2), 6, method="residual", selection_pairs=tuple(pairs[:3]))
    assert _selection_overlap(pairs[3:], sel, "the layers")[0] is True
    held, said = _selection_overlap([pairs[0], pairs[4]], sel, "the layers")
    assert held is False and "IN-SAMPLE: 1 of the 2 evaluation pairs" in said and "selected the layers" in said
    assert _selection_overlap(pairs[3:], LayerSelection((1, 2), 6), "the layers")[0] is None  # chosen by hand
