"""Consistency evaluation: metrics vs hand computation, polarity, statistics, and fast == naive scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import interp
from interp import InterpError
from interp.consistency import ConsistencyReport, answer_logits, evaluate
from interp.data import ParaphraseGroup, ParaphrasePair, builtin
from interp.models import Model, tiny_tokenizer

QUESTIONS = ("Is there a pleural effusion?", "Is there fluid around the lungs?", "Can an effusion be ruled out?",
             "Do you see any effusion on this film?", "Is the costophrenic angle blunted?")
POLARITY = (True, True, False, True, True)


@pytest.fixture(scope="module")
def tiny_text() -> Model:
    """A text-only Gemma 3 decoder (Gemma3ForCausalLM, 5 local : 1 global, window 8) with the base-model prompt."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        hf = Gemma3ForCausalLM(cfg).eval()
    return Model(hf=hf, tokenizer=tok, name="tiny-text", chat=False, answer_words=(" yes", " no"))


def image_pairs(images: list[str]) -> list[ParaphrasePair]:
    """Groups of five phrasings on each image (two with a report), one inverted; plus a text-only pair."""
    contexts = ("Findings: small left pleural effusion.", None, "Findings: lungs are clear.")
    groups = [ParaphraseGroup(f"g{k}", QUESTIONS, POLARITY, answer=("yes", "no", None)[k], image=img,
                              kind=("lexical", "negation", "register")[k], context=contexts[k])
              for k, img in enumerate(images)]
    pairs = [p for g in groups for p in g.pairs()]
    pairs.append(ParaphrasePair("t1", "Is the heart enlarged?", "Is my heart big?", answer="no",
                                context="Findings: normal heart size.", kind="register"))
    return pairs


def plain_margin(model: Model, question: str, image=None, context=None) -> float:
    """logit(yes) - logit(no) from the model's own forward on one prompt (lm_head over every position)."""
    with torch.inference_mode():
        logits = model.hf(**model.inputs(question, image, context=context)).logits[0, -1].float()
    yes, no = model.answer_ids
    return float(logits[yes] - logits[no])


def assert_same_margins(a: ConsistencyReport, b: ConsistencyReport, atol: float = 2e-5) -> None:
    assert list(a.table["id"]) == list(b.table["id"])
    np.testing.assert_allclose(a.table[["margin_a", "margin_b"]].to_numpy(),
                               b.table[["margin_a", "margin_b"]].to_numpy(), atol=atol, rtol=1e-4)


def test_fast_equals_naive_with_images_groups_and_sliding_window(medgemma, xray_images):
    pairs = image_pairs(xray_images)
    naive = evaluate(medgemma, pairs, fast=False, n_boot=0, progress=False)
    fast = evaluate(medgemma, pairs, n_boot=0, progress=False)
    assert "KV cache" in fast.method and naive.method.startswith("naive")
    assert_same_margins(fast, naive)
    assert_same_margins(evaluate(medgemma, pairs, batch_size=2, n_boot=0, progress=False), naive)
    # the images matter: the same question on three images gets three different margins
    by_image = fast.table[fast.table["id"].str.endswith("#1")]["margin_a"].to_numpy()
    assert np.ptp(by_image) > 1e-3


def test_fast_path_in_several_blocks_equals_one_block(medgemma, xray_images, monkeypatch):
    """Blocks of one image each: each block's images are queued while the one before runs, and its vision pass
    starts before its phrasings are tokenised; the margins are those of one block."""
    from interp import scoring

    pairs = image_pairs(xray_images)
    one = evaluate(medgemma, pairs, n_boot=0, progress=False)
    monkeypatch.setattr(scoring, "BLOCK_IMAGES", 1)
    calls = []
    real = scoring._FastScorer._score_block
    monkeypatch.setattr(scoring._FastScorer, "_score_block", lambda self, *a: calls.append(1) or real(self, *a))
    several = evaluate(medgemma, pairs, n_boot=0, progress=False)
    assert len(calls) == len(xray_images)
    assert_same_margins(several, one, atol=1e-6)


def test_fast_path_takes_the_processors_full_call_when_its_split_differs(medgemma, xray_images, monkeypatch):
    """A processor split that does not reproduce the full call (here: perturbed pixels) is never used."""
    import weakref

    from interp import hf, models

    monkeypatch.setattr(models, "_SPLITS", weakref.WeakKeyDictionary())  # check this processor afresh
    real = hf.ProcessorSplit.process_image
    monkeypatch.setattr(hf.ProcessorSplit, "process_image", lambda self, im: (lambda pv, r: (pv + 1e-3, r))(
        *real(self, im)))
    assert models.split_processor(medgemma) is None
    pairs = image_pairs(xray_images)
    assert_same_margins(evaluate(medgemma, pairs, n_boot=0, progress=False),
                        evaluate(medgemma, pairs, fast=False, n_boot=0, progress=False))


def test_fast_equals_naive_on_llava(tiny_llava, xray_images):
    pairs = image_pairs(xray_images)
    fast = evaluate(tiny_llava, pairs, n_boot=0, progress=False)
    assert_same_margins(fast, evaluate(tiny_llava, pairs, fast=False, n_boot=0, progress=False))
    assert np.ptp(fast.table[fast.table["id"].str.endswith("#1")]["margin_a"].to_numpy()) > 1e-4


@pytest.mark.parametrize("which", ["tiny_text", "tiny_medgemma"])
def test_fast_equals_naive_text_only(which, request):
    model = request.getfixturevalue(which)
    pairs = builtin("register")[:12] + builtin("register")[150:154]  # reports as context, and none
    assert_same_margins(evaluate(model, pairs, n_boot=0, progress=False),
                        evaluate(model, pairs, fast=False, n_boot=0, progress=False))
    prompts = [p.prompt_b() for p in pairs]
    full = answer_logits(model, prompts, full_vocab=True, fast=True)
    np.testing.assert_allclose(full.numpy(), answer_logits(model, prompts, full_vocab=True).numpy(), atol=2e-5)


def test_each_image_and_phrasing_is_computed_once(medgemma, xray_images):
    pairs = image_pairs(xray_images)
    counts = {"images": 0, "tokens": 0}

    def count_images(_mod, args, kwargs):
        counts["images"] += (kwargs.get("pixel_values", args[0] if args else None)).shape[0]

    def count_tokens(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        counts["tokens"] += hidden.shape[0] * hidden.shape[1]

    hooks = [medgemma.hf.model.vision_tower.register_forward_pre_hook(count_images, with_kwargs=True),
             medgemma.layers[0].register_forward_pre_hook(count_tokens, with_kwargs=True)]
    try:
        evaluate(medgemma, pairs, n_boot=0, progress=False)
        fast = dict(counts)
        counts.update(images=0, tokens=0)
        evaluate(medgemma, pairs, fast=False, n_boot=0, progress=False)
        naive = dict(counts)
    finally:
        for h in hooks:
            h.remove()
    assert fast["images"] == len(xray_images)
    assert naive["images"] == 2 * sum(p.image is not None for p in pairs)
    assert fast["tokens"] < naive["tokens"] / 2  # prefixes (image, report) run once per group


def test_metrics_equal_hand_computation_from_plain_forwards(medgemma, xray_images):
    pairs = image_pairs(xray_images)
    report = evaluate(medgemma, pairs, n_boot=0, progress=False)
    m_a = np.array([plain_margin(medgemma, p.question_a, p.image, p.context) for p in pairs])
    m_b = np.array([plain_margin(medgemma, p.question_b, p.image, p.context) for p in pairs])
    np.testing.assert_allclose(report.table["margin_a"], m_a, atol=2e-5)
    np.testing.assert_allclose(report.table["margin_b"], m_b, atol=2e-5)
    corrected = np.array([mb if p.same_polarity else -mb for p, mb in zip(pairs, m_b, strict=True)])
    flips = np.sign(m_a) != np.sign(corrected)
    assert 0 < flips.sum() < len(pairs)  # the check below means something
    assert report.n == len(pairs) and report.n_flips == flips.sum()
    assert report.flip_rate == pytest.approx(flips.mean())
    assert report.mean_margin_diff == pytest.approx(np.abs(m_a - corrected).mean(), abs=1e-5)
    right = [(ma > 0) == (p.answer == "yes") for p, ma in zip(pairs, m_a, strict=True) if p.answer]
    right += [(mb > 0) == (p.answer_b == "yes") for p, mb in zip(pairs, m_b, strict=True) if p.answer]
    assert report.n_gold == len(right) / 2 and report.accuracy == pytest.approx(np.mean(right))
    neg = np.array([p.kind == "negation" for p in pairs])
    assert report.by_kind["negation"]["flip_rate"] == pytest.approx(flips[neg].mean())
    assert report.by_kind["negation"]["n"] == neg.sum()
    assert report.by_kind["register"]["accuracy"] is None or 0 <= report.by_kind["register"]["accuracy"] <= 1


def test_polarity_correction_and_accuracy_use_the_flipped_answer():
    pairs = [ParaphrasePair("p1", "Q?", "R?", answer="yes"),
             ParaphrasePair("p2", "Q?", "Not R?", answer="yes", same_polarity=False),
             ParaphrasePair("p3", "Q?", "Not R?", answer="no", same_polarity=False),
             ParaphrasePair("p4", "Q?", "R?", kind="other")]
    r = ConsistencyReport.from_margins(pairs, [2.0, 2.0, -1.0, 1.0], [1.0, -1.5, -0.5, -1.0], n_boot=0)
    t = r.table.set_index("id")
    assert list(t["margin_b_corrected"]) == [1.0, 1.5, 0.5, -1.0]
    assert list(t["flip"]) == [False, False, True, True]
    assert list(t["margin_diff"]) == [1.0, 0.5, 1.5, 2.0]
    assert list(t["correct_b"]) == [True, True, False, None]
    assert (r.flip_rate, r.mean_margin_diff, r.accuracy, r.n_gold) == (0.5, 1.25, pytest.approx(5 / 6), 3)
    assert r.by_kind["other"]["accuracy"] is None and r.by_kind[""]["n"] == 3
    no_gold = ConsistencyReport.from_margins(pairs[3:], [1.0], [2.0], n_boot=0)
    assert no_gold.accuracy is None and no_gold.ci["accuracy"] is None


def random_report(n: int, seed: int, name: str, flip_p: float, scale: float) -> ConsistencyReport:
    rng = np.random.default_rng(seed)
    pairs = [ParaphrasePair(f"p{i}", f"Q{i}?", f"R{i}?", answer=("yes", "no", None)[i % 3],
                            same_polarity=i % 5 != 0, kind=("a", "b")[i % 2]) for i in range(n)]
    m_a = rng.normal(0, 2, n)
    agree = rng.random(n) > flip_p
    corrected = np.where(agree, np.sign(m_a), -np.sign(m_a)) * np.abs(rng.normal(0, scale, n))
    m_b = np.array([c if p.same_polarity else -c for p, c in zip(pairs, corrected, strict=True)])
    return ConsistencyReport.from_margins(pairs, m_a, m_b, model=name, n_boot=200, seed=1)


def test_compare_uses_the_studys_z_test_and_paired_tests():
    from scipy.stats import wilcoxon
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportions_ztest

    base, lora = random_report(158, 0, "base", 0.15, 2.0), random_report(158, 1, "lora", 0.05, 0.5)
    c = base.compare(lora)
    fa, fb = base.table["flip"].to_numpy(), lora.table["flip"].to_numpy()
    z, p = proportions_ztest([fa.sum(), fb.sum()], [158, 158])
    assert (c.z, c.p_z) == (pytest.approx(z), pytest.approx(p))
    assert c.flip_rate == (pytest.approx(fa.mean()), pytest.approx(fb.mean())) and c.flip_rate_delta < 0
    b, d = int((fa & ~fb).sum()), int((~fa & fb).sum())
    assert c.discordant == (b, d)
    table = [[int((fa & fb).sum()), b], [d, int((~fa & ~fb).sum())]]
    assert c.p_mcnemar == pytest.approx(mcnemar(table, exact=True).pvalue)  # exact at any count
    assert c.p_flip == c.p_mcnemar and "McNemar" in c.flip_test  # no clusters: the headline is exact McNemar
    da, db = base.table["margin_diff"].to_numpy(), lora.table["margin_diff"].to_numpy()
    res = wilcoxon(da, db)
    assert (c.wilcoxon, c.p_wilcoxon) == (pytest.approx(res.statistic), pytest.approx(res.pvalue))
    assert c.margin_diff_relative == pytest.approx((db.mean() - da.mean()) / da.mean())
    k = 2 * base.n_gold
    za, pa = proportions_ztest([round(base.accuracy * k), round(lora.accuracy * k)], [k, k])
    assert (c.z_accuracy, c.p_accuracy) == (pytest.approx(za), pytest.approx(pa))
    assert "flip rate" in repr(c) and len(c.figure().data) == 6 and len(c.table) == 158
    d = json.loads(c.to_json())
    assert {r["test"] for r in d["tests"]} >= {"unpaired two-proportion z-test (as in the study)"}
    assert all(r["ci_low"] is not None and r["interval"].startswith("paired cluster bootstrap")
               for r in d["changes"])


@pytest.mark.parametrize("clustered", [False, True])
def test_a_share_no_pair_changed_gets_a_bound_not_the_bootstraps_zero_interval(clustered):
    """Margins halved: no flip, yes or correctness changes, so every bootstrap resample gives 0 and the percentile
    interval is [0, 0]. The change of a share cannot exceed the share of units that change: its interval is
    +- the upper limit on that share (0 of n), Clopper-Pearson, or Korn-Graubard over the clusters."""
    from statsmodels.stats.proportion import proportion_confint

    from interp import stats

    rng = np.random.default_rng(0)
    pairs = [ParaphrasePair(f"p{i}", f"Q{i}?", f"R{i}?", answer=("yes", "no", None)[i % 3],
                            same_polarity=i % 5 != 0, kind=("a", "b")[i % 2]) for i in range(60)]
    m_a, m_b = rng.normal(0, 2, 60), rng.normal(0, 2, 60)
    clusters = [f"q{i // 4}" for i in range(60)] if clustered else [p.id for p in pairs]
    base = ConsistencyReport.from_margins(pairs, m_a, m_b, model="base", n_boot=200, seed=1, clusters=clusters)
    shrunk = ConsistencyReport.from_margins(pairs, m_a / 2, m_b / 2, model="shrunk", n_boot=200, seed=1,
                                            clusters=clusters)
    c = base.compare(shrunk)
    assert c.flip_rate_delta == 0 and c.yes_rate_delta == 0 and c.accuracy_delta == 0
    if clustered:
        u_pairs = stats.proportion_ci(np.zeros(60), clusters)[1]
        assert u_pairs > proportion_confint(0, 60, method="beta")[1]  # 15 clusters count for less than 60 pairs
    else:
        u_pairs = proportion_confint(0, 60, method="beta")[1]
    assert c.ci["flip_rate_delta"] == (pytest.approx(-u_pairs), pytest.approx(u_pairs))
    m = 2 * 60
    u_yes = stats.proportion_ci(np.zeros(m), clusters + clusters)[1]
    if not clustered:  # each pair its own cluster: a pair's two phrasings are one cluster of 2
        assert u_yes > proportion_confint(0, m, method="beta")[1]
    assert c.ci["yes_rate_delta"] == (pytest.approx(-u_yes), pytest.approx(u_yes))
    rows = c.changes().set_index("quantity")
    assert rows.loc["flip rate", "interval"].startswith("no pairs changed (0 of 60)")
    assert rows.loc["accuracy", "interval"].startswith("no phrasings with a gold answer changed")
    assert rows.loc["mean |margin|", "interval"].startswith("paired cluster bootstrap")
    lo, hi = c.ci["margin_diff_delta"]
    assert lo < c.margin_diff_delta < hi and lo < 0  # margins do change: the bootstrap as before
    assert "flip rate, yes rate, accuracy: no unit changed" in repr(c)
    assert "no unit changed" in c.figure().layout.title.text


def test_compare_requires_the_same_pairs():
    base = random_report(20, 0, "base", 0.1, 1.0)
    with pytest.raises(InterpError, match="cover different pairs: 5 id"):
        base.compare(random_report(15, 1, "other", 0.1, 1.0))
    other = random_report(20, 1, "other", 0.1, 1.0)
    pairs = [ParaphrasePair(i, qa + " really", qb)
             for i, qa, qb in other.table[["id", "question_a", "question_b"]].itertuples(index=False)]
    changed = ConsistencyReport.from_margins(pairs, other.table["margin_a"], other.table["margin_b"], n_boot=0)
    with pytest.raises(InterpError, match="different questions"):
        base.compare(changed)


def test_intervals_exact_for_proportions_and_bootstrap_for_means():
    r = random_report(300, 3, "m", 0.2, 1.0)
    lo, hi = r.ci["flip_rate"]
    assert r.ci_method["flip_rate"] == "Clopper-Pearson exact 95% interval"
    assert r.ci_method["mean_margin_diff"].startswith("cluster bootstrap percentile 95% (200 resamples of 300")
    p = r.flip_rate
    half = 1.96 * np.sqrt(p * (1 - p) / r.n)  # the normal approximation the bootstrap should be near
    assert lo < p < hi and abs((hi - lo) / 2 - half) < 0.3 * half
    lo, hi = r.ci["mean_margin_diff"]
    sd = r.table["margin_diff"].std() / np.sqrt(r.n)
    assert lo < r.mean_margin_diff < hi and abs((hi - lo) / 2 - 1.96 * sd) < 0.3 * 1.96 * sd
    assert r.ci["accuracy"][0] < r.accuracy < r.ci["accuracy"][1]
    again = random_report(300, 3, "m", 0.2, 1.0)
    assert again.ci == r.ci  # seeded


def test_report_repr_json_and_figure():
    r = random_report(40, 5, "demo", 0.3, 1.0)
    assert repr(r).startswith("ConsistencyReport('demo', n=40: flip rate") and "%" in repr(r)
    d = json.loads(r.to_json())
    assert len(d["table"]) == 40 and d["flip_rate"] == r.flip_rate
    fig = r.figure()
    names = [t.name for t in fig.data]
    assert names[0].startswith("consistent") and names[1].startswith("flip") and names[2] == "A = B"
    assert len(fig.data[1].x) == r.n_flips and len(fig.data[0].x) == r.n - r.n_flips


def test_evaluate_rejects_bad_input_before_model_work(tiny_medgemma, tiny_text, xray_images):
    missing = [ParaphrasePair("a", "Q?", "R?", image=xray_images[0]),
               ParaphrasePair("b", "Q?", "R?", image="/no/such/cxr.png")]
    with pytest.raises(InterpError, match=r"1 image file\(s\) not found:\n  /no/such/cxr.png"):
        evaluate(tiny_medgemma, missing, progress=False)
    with pytest.raises(InterpError, match="text-only model"):
        evaluate(tiny_text, missing[:1], progress=False)
    with pytest.raises(InterpError, match="pairs is empty"):
        evaluate(tiny_text, [], progress=False)
    with pytest.raises(InterpError, match="occurs twice"):
        evaluate(tiny_text, [missing[0], missing[0]], progress=False)
    with pytest.raises(InterpError, match="ParaphrasePair or ParaphraseGroup"):
        evaluate(tiny_text, ["Is there?"], progress=False)


def test_groups_are_accepted_directly(tiny_text):
    g = ParaphraseGroup("g", QUESTIONS, POLARITY, answer="yes", context="Findings: effusion.")
    a = evaluate(tiny_text, [g], n_boot=0, progress=False)
    b = evaluate(tiny_text, g.pairs(), n_boot=0, progress=False)
    assert list(a.table["id"]) == ["g#1", "g#2", "g#3", "g#4"] and a.table["group"].eq("g").all()
    assert_same_margins(a, b, atol=0)


@pytest.mark.slow
def test_gemma3_270m_on_builtin_pairs(gemma270m):
    pairs = builtin("register")[:40]
    report = evaluate(gemma270m, pairs, progress=False, n_boot=200)
    assert report.n == 40 and 0 <= report.flip_rate <= 1 and 0 <= report.accuracy <= 1
    assert report.ci["flip_rate"][0] <= report.flip_rate <= report.ci["flip_rate"][1]
    assert np.isfinite(report.table[["margin_a", "margin_b"]].to_numpy()).all()
    assert report.table["margin_a"].abs().mean() > 0.01  # a real model has real margins
    naive = evaluate(gemma270m, pairs[:10], fast=False, n_boot=0, progress=False)
    np.testing.assert_allclose(report.table[["margin_a", "margin_b"]].to_numpy()[:10],
                               naive.table[["margin_a", "margin_b"]].to_numpy(), atol=1e-3, rtol=1e-4)


def test_public_names_importable():
    from interp import consistency, data

    for name in ("evaluate", "ConsistencyReport", "ConsistencyComparison", "answer_logits", "margins",
                 "last_hidden", "project"):
        assert hasattr(consistency, name)
    for name in ("load_pairs", "ParaphrasePair", "ParaphraseGroup", "groups_of", "builtin", "normalize_answer"):
        assert hasattr(data, name)
    assert isinstance(interp.Prompt("q"), tuple)


# ---- the statistics a reviewer accepts (issue 11) --------------------------------------------------------
def flips_report(n: int, flipping: list[int], name: str, scale: float = 1.0, pairs=None) -> ConsistencyReport:
    """Pairs with a gold 'yes' and margins (2, 2), except that pairs in ``flipping`` answer B with -1."""
    pairs = pairs or [ParaphrasePair(f"p{i}", f"Q{i}?", f"R{i}?", answer="yes") for i in range(n)]
    m_a, m_b = np.full(n, 2.0), np.full(n, 2.0)
    m_b[flipping] = -1.0
    return ConsistencyReport.from_margins(pairs, scale * m_a, scale * m_b, model=name, n_boot=400)


def test_23_to_7_flips_on_the_same_pairs_is_exact_mcnemar_not_the_z_test():
    from scipy.stats import binomtest
    from statsmodels.stats.proportion import proportions_ztest

    base, after = flips_report(158, list(range(23)), "base"), flips_report(158, list(range(7)), "lora")
    c = base.compare(after)
    assert c.discordant == (16, 0) and (base.n_flips, after.n_flips) == (23, 7)
    assert c.p_mcnemar == pytest.approx(binomtest(0, 16).pvalue) and c.p_mcnemar == pytest.approx(3.1e-5, abs=1e-6)
    assert c.p_mcnemar_midp == pytest.approx(0.5**16)
    assert c.p_z == pytest.approx(proportions_ztest([23, 7], [158, 158])[1]) and c.p_z == pytest.approx(0.0021, abs=1e-4)
    assert c.p_flip == c.p_mcnemar and c.flip_test.startswith("exact McNemar")
    assert "exact McNemar" in repr(c) and "p=3.1e-05" in repr(c) and "unpaired z-test as in the study p=0.0021" in repr(c)
    assert "McNemar p=3.1e-05" in c.figure().layout.annotations[0].text  # the headline panel shows the paired test
    tests = c.tests()
    assert tests.loc[tests["headline"] & (tests["quantity"] == "flip rate"), "p"].item() == pytest.approx(3.05e-5, rel=1e-2)
    assert "unpaired two-proportion z-test (as in the study)" in set(tests["test"])
    lo, hi = c.ci["flip_rate_delta"]
    assert lo < -16 / 158 < hi < 0


def accuracy_reports(pairs_hit: list[int], both: bool):
    """266 -> 260 of 316 phrasings correct (84.2% -> 82.3%); the 6 newly wrong phrasings lie in 6 pairs or, with
    ``both``, in 3 pairs (both phrasings of each)."""
    n = 158
    pairs = [ParaphrasePair(f"p{i}", f"Q{i}?", f"R{i}?", answer="yes") for i in range(n)]
    m_a, m_b = np.full(n, 2.0), np.full(n, 2.0)
    m_a[:25] = m_b[:25] = -1.0  # 50 phrasings wrong in both models
    base = ConsistencyReport.from_margins(pairs, m_a, m_b, model="base", n_boot=200)
    m_a2, m_b2 = m_a.copy(), m_b.copy()
    m_a2[pairs_hit] = -1.0
    if both:
        m_b2[pairs_hit] = -1.0
    return base, ConsistencyReport.from_margins(pairs, m_a2, m_b2, model="lora", n_boot=200)


def test_accuracy_is_tested_paired_and_clustered_by_pair():
    from scipy.stats import binomtest
    from statsmodels.stats.proportion import proportions_ztest

    base, after = accuracy_reports(list(range(25, 31)), both=False)
    c = base.compare(after)
    assert c.accuracy == (pytest.approx(266 / 316), pytest.approx(260 / 316)) and c.accuracy_discordant == (6, 0)
    assert c.p_accuracy == pytest.approx(proportions_ztest([266, 260], [316, 316])[1])  # the study's: p = 0.52
    assert c.p_accuracy == pytest.approx(0.52, abs=0.01)
    assert c.p_accuracy_paired == pytest.approx(binomtest(0, 6).pvalue) == pytest.approx(0.03125)
    assert "clustered McNemar" in c.accuracy_test and "paired clustered p=0.031" in repr(c)
    # the same 6 phrasings in 3 pairs are 3 independent units, not 6
    base, after = accuracy_reports(list(range(25, 28)), both=True)
    c = base.compare(after)
    assert c.accuracy_discordant == (6, 0) and c.p_accuracy_mcnemar == pytest.approx(0.03125)
    assert c.p_accuracy_paired == pytest.approx(binomtest(0, 3).pvalue) == pytest.approx(0.25)


def rescored(report: ConsistencyReport, m_a, m_b, name: str) -> ConsistencyReport:
    """The same pairs as ``report`` with other margins."""
    pairs = [ParaphrasePair(r.id, r.question_a, r.question_b, answer=r.answer if isinstance(r.answer, str) else None,
                            same_polarity=bool(r.same_polarity), kind=r.kind) for r in report.table.itertuples()]
    return ConsistencyReport.from_margins(pairs, m_a, m_b, model=name, n_boot=200, seed=1)


def test_halving_every_margin_leaves_the_scale_free_measure_unchanged():
    base = random_report(120, 4, "base", 0.2, 1.5)
    half = rescored(base, base.table["margin_a"] / 2, base.table["margin_b"] / 2, "half")
    assert half.flip_rate == base.flip_rate and half.yes_rate == base.yes_rate
    assert half.relative_margin_diff == pytest.approx(base.relative_margin_diff)
    assert half.mean_margin_diff == pytest.approx(base.mean_margin_diff / 2)
    assert half.mean_abs_margin == pytest.approx(base.mean_abs_margin / 2)
    c = base.compare(half)
    assert c.margin_diff_relative == pytest.approx(-0.5) and c.p_wilcoxon < 1e-3  # the raw measure "improves"
    assert c.relative_margin_diff_delta == pytest.approx(0, abs=1e-12)
    assert c.ci["relative_margin_diff_delta"] == pytest.approx((0, 0), abs=1e-12)
    assert c.mean_abs_margin_relative == pytest.approx(-0.5) and c.ci["mean_abs_margin_relative"] == pytest.approx((-0.5, -0.5))
    assert c.ci["margin_diff_relative"] == pytest.approx((-0.5, -0.5))
    assert "mean |margin| " in repr(c) and "(-50.0% [-50.0%, -50.0%])" in repr(c)
    titles = [a.text for a in c.figure().layout.annotations]
    assert any("scale-free" in t and "+0 [+0, +0]" in t for t in titles)
    assert any("mean |margin| (logits)" in t and "-50% [-50%, -50%]" in t for t in titles)


def test_collapse_toward_yes_is_visible():
    base = random_report(100, 6, "base", 0.2, 1.0)
    t = base.table
    collapsed = rescored(base, np.abs(t["margin_a"]) + 0.1, np.abs(t["margin_b"]) + 0.1, "yes")
    assert collapsed.yes_rate == 1.0 and collapsed.ci["yes_rate"][1] == 1.0
    c = base.compare(collapsed)
    assert c.yes_rate == (pytest.approx(base.yes_rate), 1.0) and c.ci["yes_rate_delta"][0] > 0
    assert "yes rate" in repr(collapsed) and "yes rate" in repr(c)


def test_small_counts_get_exact_intervals():
    from scipy.stats import binomtest

    none = flips_report(36, [], "m")
    assert none.ci["flip_rate"] == pytest.approx((0.0, 0.0974), abs=1e-4)
    one = flips_report(36, [5], "m")
    want = binomtest(1, 36).proportion_ci(0.95, method="exact")
    assert one.ci["flip_rate"] == pytest.approx((want.low, want.high)) and one.ci["flip_rate"][0] == pytest.approx(0.0007, abs=1e-4)
    assert one.ci["flip_rate"][1] == pytest.approx(0.145, abs=1e-3)


def test_clustered_pairs_widen_intervals_and_tests():
    """32 groups of 5 phrasings (4 pairs each) that flip as a group: the cluster is the unit."""
    rng = np.random.default_rng(7)
    groups = [ParaphraseGroup(f"g{k}", (f"Is there effusion {k}?", f"Fluid {k}?", f"Any fluid {k}?", f"Effusion {k}?",
                                        f"Wet lungs {k}?")) for k in range(32)]
    pairs = [p for g in groups for p in g.pairs()]
    flip_group = rng.random(32) < 0.35
    m_a = np.full(128, 2.0) + rng.normal(0, 0.1, 128)
    m_b = np.where(np.repeat(flip_group, 4), -1.0, 2.0) + rng.normal(0, 0.1, 128)
    r = ConsistencyReport.from_margins(pairs, m_a, m_b, n_boot=2000, seed=0)
    flat = ConsistencyReport.from_margins(pairs, m_a, m_b, n_boot=2000, seed=0, clusters=[p.id for p in pairs])
    assert (r.n_clusters, flat.n_clusters) == (32, 128) and set(r.table["cluster"]) == {f"g{k}#1" for k in range(32)}
    width = np.diff(r.ci["flip_rate"])[0]
    assert width > 1.6 * np.diff(flat.ci["flip_rate"])[0]
    # an independent cluster bootstrap of the flip rate (resample the 32 groups) has about the same width
    group_rate = flip_group.astype(float)
    boots = [group_rate[rng.integers(0, 32, 32)].mean() for _ in range(4000)]
    ref = np.subtract(*np.quantile(boots, [0.975, 0.025]))
    assert 0.9 * ref < width < 1.35 * ref
    assert "Korn-Graubard effective n over 32 clusters" in r.ci_method["flip_rate"]
    # a paired comparison: the headline flip test is over clusters (4 groups stop flipping = 16 pairs)
    fixed = np.flatnonzero(flip_group)[:4]
    m_b2 = m_b.copy()
    for k in fixed:
        m_b2[4 * k:4 * k + 4] = 2.0
    c = r.compare(ConsistencyReport.from_margins(pairs, m_a, m_b2, model="after", n_boot=500))
    assert c.discordant == (16, 0) and c.p_mcnemar == pytest.approx(2 * 0.5**16)
    assert c.p_flip == pytest.approx(2 * 0.5**4) and "clustered McNemar" in c.flip_test and c.n_clusters == 32


def test_breakdown_by_polarity_and_kind_with_intervals():
    r = random_report(200, 8, "m", 0.25, 1.0)
    t = r.table
    for pol, same in (("same", True), ("inverted", False)):
        part = t[t["same_polarity"] == same]
        d = r.by_polarity[pol]
        assert d["n"] == len(part) and d["flip_rate"] == pytest.approx(part["flip"].mean())
        assert d["mean_margin_diff"] == pytest.approx(part["margin_diff"].mean())
        assert d["ci"]["flip_rate"][0] <= d["flip_rate"] <= d["ci"]["flip_rate"][1]
        assert d["ci"]["mean_margin_diff"] is not None and d["ci"]["accuracy"] is not None
    assert r.by_polarity["inverted"]["n"] == 40 and set(r.by_kind) == {"a", "b"}
    assert all(v["ci"]["flip_rate"] is not None for v in r.by_kind.values())
    json.loads(r.to_json())


def test_report_flags_negation_rewrites_scored_as_same_polarity():
    pairs = [ParaphrasePair("neg", "Is there an effusion?", "Is there no effusion?"),
             ParaphrasePair("ok", "Is there an effusion?", "Is there fluid?"),
             ParaphrasePair("inv", "Is there an effusion?", "Can effusion be ruled out?", same_polarity=False)]
    r = ConsistencyReport.from_margins(pairs, [2.0, 2.0, 2.0], [-2.0, 2.0, -2.0], n_boot=0)
    assert r.polarity_suspects == ("neg",) and r.n_flips == 1  # a consistent model "flips" on the unmarked one


def test_every_exported_number_names_its_unit_n_and_interval():
    r = random_report(60, 9, "m", 0.2, 1.0)
    d = json.loads(r.to_json())
    names = {m["quantity"] for m in d["measures"]}
    assert names == {"flip_rate", "mean_margin_diff", "relative_margin_diff", "mean_abs_margin", "yes_rate", "accuracy"}
    for m in d["measures"]:
        assert m["unit"] and m["n"] > 0 and m["definition"] and m["interval"] and m["ci_low"] <= m["value"] <= m["ci_high"]
    assert "<table" in r._repr_html_() and "Clopper-Pearson" in r._repr_html_()
    c = r.compare(random_report(60, 10, "n", 0.1, 1.0))
    for row in json.loads(c.to_json())["tests"]:
        assert row["test"] and row["unit"] and row["n"] and row["p"] is not None
    assert "<table" in c._repr_html_()


def _grouped_flips() -> tuple[list[ParaphrasePair], ConsistencyReport, ConsistencyReport]:
    """8 groups of 4 pairs; the baseline flips in 4 whole groups, the other model nowhere."""
    pairs = [ParaphrasePair(f"p{g}-{i}", f"Is there finding {g}?", f"Any finding {g}, variant {i}?", answer="yes",
                            group=f"g{g}") for g in range(8) for i in range(4)]
    ones = np.ones(32)
    base = ConsistencyReport.from_margins(pairs, ones, np.where(np.arange(32) < 16, -1.0, 1.0), model="base")
    return pairs, base, ConsistencyReport.from_margins(pairs, ones, ones, model="lora")


def test_clustered_comparison_headlines_clustered_p_and_mid_p():
    _, base, other = _grouped_flips()
    c = base.compare(other)
    # by hand: 4 clusters changed by -4 each, S = -16; under the null each sign is +-, |S| = 16 only when all
    # four agree (2 of 16 sign patterns): p = 1/8, mid-p = P(|S| > 16) + P(|S| = 16) / 2 = 1/16
    assert (c.p_flip, c.p_flip_midp) == pytest.approx((0.125, 0.0625))
    assert c.p_mcnemar_midp == pytest.approx(0.5**16)  # pairs as units: kept, not headlined
    assert "p=0.12, mid-p=0.062" in repr(c)
    t = c.tests().set_index("test")
    head = t[t["headline"]]
    assert head.loc[head["quantity"] == "flip rate", "p_mid"].item() == pytest.approx(0.0625)
    # margin differences: the cluster sign-flip test is the headline, Wilcoxon (pairs as units) is labelled
    margin = t[t["quantity"] == "mean |margin diff|"]
    assert margin.loc[margin["headline"], "p"].item() == pytest.approx(0.125)
    wil = margin[margin.index.str.startswith("Wilcoxon")]
    assert not wil["headline"].item() and wil.index[0].endswith("ignores clusters")
    assert c.p_margin == pytest.approx(0.125) and "cluster sign-flip" in c.margin_test
    assert "cluster sign-flip p=0.12; Wilcoxon, pairs as units" in repr(c)
    assert "<th>n_clusters</th>" in c._repr_html_().split("<caption>tests")[1]


def test_unclustered_comparison_keeps_mcnemar_and_wilcoxon_as_headlines():
    pairs = [ParaphrasePair(f"p{i}", f"Is there x{i}?", f"Any x{i}?", answer="yes") for i in range(20)]
    base = ConsistencyReport.from_margins(pairs, np.ones(20), np.r_[-np.ones(8), np.ones(12)], n_boot=0)
    other = ConsistencyReport.from_margins(pairs, np.ones(20), np.r_[-np.ones(1), np.ones(19)] * 0.9, n_boot=0)
    c = base.compare(other)
    assert c.n_clusters == 20 and (c.p_flip, c.p_flip_midp) == (c.p_mcnemar, c.p_mcnemar_midp)
    assert c.p_margin == c.p_wilcoxon and c.margin_test.startswith("Wilcoxon")


def test_a_zero_margin_on_an_inverted_pair_is_a_decision_not_a_flip():
    """B inverts the answer and decides "no" (m_b = 0 is not > 0): consistent with A's "yes"."""
    pairs = [ParaphrasePair("x", "Is there an effusion?", "Can an effusion be ruled out?", answer="yes",
                            same_polarity=False),
             ParaphrasePair("y", "Is there a mass?", "Is a mass present?", answer="yes")]
    r = ConsistencyReport.from_margins(pairs, [2.0, 1.0], [0.0, 0.0], n_boot=0)
    assert r.table["flip"].tolist() == [False, True]  # y: A yes, B (same polarity) no
    assert r.table["correct_b"].tolist() == [True, False]


def test_non_finite_margins_name_the_pairs():
    pairs = [ParaphrasePair(f"p{i}", f"Is there x{i}?", f"Any x{i}?") for i in range(3)]
    with pytest.raises(InterpError, match=r"non-finite margins for 1 pair\(s\), e.g. \['p1'\]"):
        ConsistencyReport.from_margins(pairs, [1.0, np.nan, 1.0], [1.0, 1.0, 1.0])


def test_each_change_and_measure_counts_its_own_units():
    pairs = [ParaphrasePair(f"p{i}", f"Is there x{i}?", f"Any x{i}?", answer="yes" if i < 6 else None)
             for i in range(10)]
    ones = np.ones(10)
    base = ConsistencyReport.from_margins(pairs, ones, ones, n_boot=0)  # no margin differences at all
    other = ConsistencyReport.from_margins(pairs, ones, np.r_[ones[:9], -1.0], n_boot=0)
    n = base.compare(other).changes().set_index(["quantity", "change"])["n"]
    assert n[("flip rate", "difference")] == 10 and n[("accuracy", "difference")] == 12  # 6 gold pairs x 2
    assert n[("yes rate", "difference")] == 20 and n[("mean |margin|", "relative change")] == 20
    m = base.measures().set_index("quantity")["n"]
    assert (m["flip_rate"], m["mean_abs_margin"], m["yes_rate"], m["accuracy"]) == (10, 20, 20, 12)
    text = repr(base.compare(other))
    assert "nan" not in text and "mean |margin diff| 0 -> 0.2 (n/a" in text  # relative change of a zero
