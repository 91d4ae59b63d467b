"""Consistency evaluation: metrics vs hand computation, polarity, statistics, and fast == naive scoring."""

from __future__ import annotations

import copy
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
def medgemma(tiny_medgemma) -> Model:
    """tiny-medgemma with a random image projector (the built-in one is zero-initialised, so images don't count)."""
    model = copy.deepcopy(tiny_medgemma)
    with torch.no_grad():
        w = model.hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return model


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
    assert c.p_mcnemar == pytest.approx(mcnemar(table, exact=(b + d) < 25).pvalue)
    da, db = base.table["margin_diff"].to_numpy(), lora.table["margin_diff"].to_numpy()
    res = wilcoxon(da, db)
    assert (c.wilcoxon, c.p_wilcoxon) == (pytest.approx(res.statistic), pytest.approx(res.pvalue))
    assert c.margin_diff_relative == pytest.approx((db.mean() - da.mean()) / da.mean())
    k = 2 * base.n_gold
    za, pa = proportions_ztest([round(base.accuracy * k), round(lora.accuracy * k)], [k, k])
    assert (c.z_accuracy, c.p_accuracy) == (pytest.approx(za), pytest.approx(pa))
    assert "flip rate" in repr(c) and len(c.figure().data) == 2 and len(c.table) == 158
    json.loads(c.to_json())


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


def test_bootstrap_cis_are_percentile_intervals_of_pair_resamples():
    r = random_report(300, 3, "m", 0.2, 1.0)
    lo, hi = r.ci["flip_rate"]
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
