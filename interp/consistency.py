"""Stage 7 of the loop: paraphrase consistency (flip rate, margin difference, accuracy) and its report.

The margin of a phrasing is logit(yes) - logit(no) at the first answer token. `evaluate()` scores pairs
through `interp.scoring` (fast by default; ``fast=False`` is the naive one-forward-per-phrasing reference)
and turns the margins into a `ConsistencyReport` with the study's statistics.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from interp._errors import InterpError
from interp._results import Result
from interp.data import ParaphraseGroup, ParaphrasePair, check_image_files
from interp.models import Model
from interp.scoring import _FastScorer, _FastUnsupported, answer_logits, last_hidden, margins, project


# ---- evaluation and its report ----------------------------------------------------------------------------
def _as_pairs(pairs: Iterable[ParaphrasePair | ParaphraseGroup]) -> list[ParaphrasePair]:
    out: list[ParaphrasePair] = []
    for p in pairs:
        if isinstance(p, ParaphraseGroup):
            out.extend(p.pairs())
        elif isinstance(p, ParaphrasePair):
            out.append(p)
        else:
            raise InterpError(f"pairs must hold ParaphrasePair or ParaphraseGroup objects, got {type(p).__name__}; "
                              "load them with interp.data.load_pairs() or interp.data.builtin()")
    if not out:
        raise InterpError("pairs is empty: pass at least one ParaphrasePair")
    seen: set[str] = set()
    for p in out:
        if p.id in seen:
            raise InterpError(f"pair id {p.id!r} occurs twice; pair ids must be unique (compare() matches on them)")
        seen.add(p.id)
    return out


def _ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float] | None:
    """Percentile bootstrap 95% CI of the mean (resampling pairs), or None when it is undefined."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if n_boot < 1 or len(values) < 2:
        return None
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    res = bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _summary(t: pd.DataFrame) -> dict[str, Any]:
    gold = t["correct_a"].notna()
    n_gold = int(gold.sum())
    correct = (t.loc[gold, "correct_a"].astype(bool).sum() + t.loc[gold, "correct_b"].astype(bool).sum())
    return dict(n=len(t), n_flips=int(t["flip"].sum()), flip_rate=float(t["flip"].mean()),
                mean_margin_diff=float(t["margin_diff"].mean()),
                accuracy=float(correct / (2 * n_gold)) if n_gold else None, n_gold=n_gold)


def _fmt_ci(ci: tuple[float, float] | None, pct: bool) -> str:
    if ci is None:
        return ""
    return f" [{ci[0]:.1%}, {ci[1]:.1%}]" if pct else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


@dataclass(frozen=True, eq=False)
class ConsistencyReport(Result):
    """Paraphrase consistency of one model on a set of pairs (flip rate, margin difference, accuracy)."""

    model: str
    n: int  # pairs
    flip_rate: float  # share of pairs whose yes/no decision differs after polarity correction
    n_flips: int
    mean_margin_diff: float  # mean |margin_a - corrected margin_b| (logits)
    accuracy: float | None  # share of phrasings with a gold answer decided correctly; None without gold
    n_gold: int  # pairs with a gold answer (each contributes two phrasings to accuracy)
    ci: dict[str, tuple[float, float] | None]  # bootstrap 95% CIs (percentile, pairs resampled)
    by_kind: dict[str, dict[str, Any]]  # kind -> n, n_flips, flip_rate, mean_margin_diff, accuracy, n_gold
    table: pd.DataFrame = field(repr=False)  # one row per pair
    n_boot: int = 1000
    seed: int = 0
    method: str = ""  # how margins were computed
    seconds: float = 0.0  # wall time of the scoring

    @classmethod
    def from_margins(cls, pairs: Sequence[ParaphrasePair], margin_a: Sequence[float], margin_b: Sequence[float],
                     *, model: str = "", n_boot: int = 1000, seed: int = 0, method: str = "given margins",
                     seconds: float = 0.0) -> ConsistencyReport:
        """A report from per-pair margins already computed (``margin_b`` raw, before polarity correction)."""
        pairs = _as_pairs(pairs)
        m_a = np.asarray(margin_a, dtype=float).reshape(-1)
        m_b = np.asarray(margin_b, dtype=float).reshape(-1)
        if len(m_a) != len(pairs) or len(m_b) != len(pairs):
            raise InterpError(f"{len(pairs)} pairs but {len(m_a)} margin_a and {len(m_b)} margin_b values")
        same = np.array([p.same_polarity for p in pairs])
        corrected = np.where(same, m_b, -m_b)

        def correct(margin: np.ndarray, answers: list[str | None]) -> list[bool | None]:
            return [None if a is None else bool((m > 0) == (a == "yes")) for m, a in zip(margin, answers, strict=True)]

        table = pd.DataFrame({
            "id": [p.id for p in pairs], "group": [p.group for p in pairs], "kind": [p.kind for p in pairs],
            "question_a": [p.question_a for p in pairs], "question_b": [p.question_b for p in pairs],
            "answer": [p.answer for p in pairs], "same_polarity": same,
            "margin_a": m_a, "margin_b": m_b, "margin_b_corrected": corrected,
            "margin_diff": np.abs(m_a - corrected), "flip": (m_a > 0) != (corrected > 0),
            "correct_a": pd.Series(correct(m_a, [p.answer for p in pairs]), dtype=object),
            "correct_b": pd.Series(correct(m_b, [p.answer_b for p in pairs]), dtype=object),
        })
        s = _summary(table)
        gold = table["correct_a"].notna().to_numpy()
        per_pair_acc = (table.loc[gold, "correct_a"].astype(float) + table.loc[gold, "correct_b"].astype(float)) / 2
        ci = {"flip_rate": _ci(table["flip"].to_numpy(float), n_boot, seed),
              "mean_margin_diff": _ci(table["margin_diff"].to_numpy(), n_boot, seed),
              "accuracy": _ci(per_pair_acc.to_numpy(), n_boot, seed) if s["n_gold"] else None}
        by_kind = {str(k): _summary(t) for k, t in table.groupby("kind", sort=True)}
        return cls(model=model, ci=ci, by_kind=by_kind, table=table, n_boot=n_boot, seed=seed, method=method,
                   seconds=seconds, **s)

    def __repr__(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.1%}{_fmt_ci(self.ci.get('accuracy'), True)}"
        return (f"ConsistencyReport({self.model!r}, n={self.n}: flip rate {self.flip_rate:.1%}"
                f"{_fmt_ci(self.ci.get('flip_rate'), True)} ({self.n_flips} flips), mean |margin diff| "
                f"{self.mean_margin_diff:.2f}{_fmt_ci(self.ci.get('mean_margin_diff'), False)}, accuracy {acc})")

    def figure(self):
        """Plotly scatter: margin of phrasing A against polarity-corrected margin of B, flips highlighted."""
        import plotly.graph_objects as go

        t = self.table
        fig = go.Figure()
        for flipped, name, color in ((False, "consistent", "#4C78A8"), (True, "flip", "#E45756")):
            part = t[t["flip"] == flipped]
            fig.add_trace(go.Scatter(
                x=part["margin_a"], y=part["margin_b_corrected"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=color, size=8, opacity=0.8),
                customdata=np.stack([part["id"], part["question_a"], part["question_b"], part["kind"]], axis=-1),
                hovertemplate="%{customdata[0]} (%{customdata[3]})<br>A: %{customdata[1]}<br>B: %{customdata[2]}"
                              "<br>margin A %{x:.2f}, B %{y:.2f}<extra></extra>"))
        lim = float(np.nanmax(np.abs(t[["margin_a", "margin_b_corrected"]].to_numpy()))) * 1.05 or 1.0
        fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="A = B",
                                 line=dict(color="grey", dash="dash"), hoverinfo="skip"))
        fig.add_hline(y=0, line=dict(color="lightgrey", width=1))
        fig.add_vline(x=0, line=dict(color="lightgrey", width=1))
        fig.update_layout(title=f"{self.model}: flip rate {self.flip_rate:.1%}, mean |margin diff| "
                                f"{self.mean_margin_diff:.2f} (n={self.n})",
                          xaxis_title="margin A = logit(yes) - logit(no)",
                          yaxis_title="margin B (polarity-corrected)", template="plotly_white")
        return fig

    def compare(self, other: ConsistencyReport) -> ConsistencyComparison:
        """Compare with another report on the same pairs (``self`` = baseline): the study's tests."""
        return ConsistencyComparison.of(self, other)


@dataclass(frozen=True, eq=False)
class ConsistencyComparison(Result):
    """Baseline vs another model on the same pairs: flip-rate z-test (as in the study) and paired tests."""

    baseline: str
    other: str
    n: int
    flip_rate: tuple[float, float]  # (baseline, other)
    flip_rate_delta: float  # other - baseline
    z: float  # two-proportion z-test on flip counts (statsmodels proportions_ztest), the study's test
    p_z: float
    p_mcnemar: float  # paired: McNemar on per-pair flips (exact binomial when < 25 discordant pairs)
    discordant: tuple[int, int]  # (pairs that flip only in baseline, only in other)
    mean_margin_diff: tuple[float, float]
    margin_diff_delta: float
    margin_diff_relative: float  # (other - baseline) / baseline; the study reports -0.795
    wilcoxon: float  # paired: Wilcoxon signed-rank statistic on per-pair |margin diff|
    p_wilcoxon: float
    accuracy: tuple[float, float] | None
    accuracy_delta: float | None
    z_accuracy: float | None  # two-proportion z-test on correct phrasings
    p_accuracy: float | None
    table: pd.DataFrame = field(repr=False)  # per pair: both models' margins, diffs and flips

    @classmethod
    def of(cls, base: ConsistencyReport, other: ConsistencyReport) -> ConsistencyComparison:
        """Run the tests; both reports must cover the same pair ids (and the same questions)."""
        from scipy.stats import wilcoxon
        from statsmodels.stats.contingency_tables import mcnemar

        if not isinstance(other, ConsistencyReport):
            raise InterpError(f"compare() takes a ConsistencyReport, got {type(other).__name__}")
        a, b = base.table.set_index("id"), other.table.set_index("id")
        only_a, only_b = sorted(set(a.index) - set(b.index)), sorted(set(b.index) - set(a.index))
        if only_a or only_b:
            raise InterpError(f"the reports cover different pairs: {len(only_a)} id(s) only in {base.model!r} "
                              f"(e.g. {only_a[:3]}), {len(only_b)} only in {other.model!r} (e.g. {only_b[:3]}); "
                              "evaluate both models on the same pairs")
        b = b.loc[a.index]
        differ = [i for i in a.index if (a.at[i, "question_a"], a.at[i, "question_b"], a.at[i, "same_polarity"])
                  != (b.at[i, "question_a"], b.at[i, "question_b"], b.at[i, "same_polarity"])]
        if differ:
            raise InterpError(f"pair {differ[0]!r} has different questions or polarity in the two reports; "
                              "evaluate both models on the same pair file")
        n = len(a)
        fa, fb = a["flip"].to_numpy(bool), b["flip"].to_numpy(bool)
        z, p_z = _ztest(int(fa.sum()), int(fb.sum()), n, n)
        only_base, only_other = int((fa & ~fb).sum()), int((~fa & fb).sum())
        table2 = [[int((fa & fb).sum()), only_base], [only_other, int((~fa & ~fb).sum())]]
        p_mc = float(mcnemar(table2, exact=(only_base + only_other) < 25, correction=True).pvalue)
        da, db = a["margin_diff"].to_numpy(), b["margin_diff"].to_numpy()
        if np.allclose(da, db, rtol=0, atol=0):
            w, p_w = float("nan"), 1.0
        else:
            res = wilcoxon(da, db)
            w, p_w = float(res.statistic), float(res.pvalue)
        sa, sb = _summary(a.reset_index()), _summary(b.reset_index())
        acc = za = pa = acc_delta = None
        if sa["accuracy"] is not None and sb["accuracy"] is not None:
            acc = (sa["accuracy"], sb["accuracy"])
            acc_delta = acc[1] - acc[0]
            m = 2 * sa["n_gold"]
            za, pa = _ztest(round(acc[0] * m), round(acc[1] * m), m, m)
        rel = (sb["mean_margin_diff"] - sa["mean_margin_diff"]) / sa["mean_margin_diff"] \
            if sa["mean_margin_diff"] > 0 else float("nan")
        cols = ["margin_a", "margin_b_corrected", "margin_diff", "flip"]
        table = a[["kind", *cols]].join(b[cols], lsuffix="_base", rsuffix="_other").reset_index()
        return cls(baseline=base.model, other=other.model, n=n, flip_rate=(sa["flip_rate"], sb["flip_rate"]),
                   flip_rate_delta=sb["flip_rate"] - sa["flip_rate"], z=z, p_z=p_z, p_mcnemar=p_mc,
                   discordant=(only_base, only_other),
                   mean_margin_diff=(sa["mean_margin_diff"], sb["mean_margin_diff"]),
                   margin_diff_delta=sb["mean_margin_diff"] - sa["mean_margin_diff"], margin_diff_relative=rel,
                   wilcoxon=w, p_wilcoxon=p_w, accuracy=acc, accuracy_delta=acc_delta, z_accuracy=za,
                   p_accuracy=pa, table=table)

    def __repr__(self) -> str:
        acc = "" if self.accuracy is None else (f", accuracy {self.accuracy[0]:.1%} -> {self.accuracy[1]:.1%} "
                                                 f"(p={self.p_accuracy:.3g})")
        return (f"ConsistencyComparison({self.baseline!r} -> {self.other!r}, n={self.n}: flip rate "
                f"{self.flip_rate[0]:.1%} -> {self.flip_rate[1]:.1%} (z={self.z:.2f}, p={self.p_z:.3g}; McNemar "
                f"p={self.p_mcnemar:.3g}), mean |margin diff| {self.mean_margin_diff[0]:.2f} -> "
                f"{self.mean_margin_diff[1]:.2f} ({self.margin_diff_relative:+.1%}, Wilcoxon p={self.p_wilcoxon:.3g})"
                f"{acc})")

    def figure(self):
        """Plotly bars: flip rate and mean |margin difference| of both models."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=(f"flip rate (p={self.p_z:.3g})",
                                                            f"mean |margin diff| ({self.margin_diff_relative:+.1%})"))
        names = [self.baseline, self.other]
        fig.add_trace(go.Bar(x=names, y=list(self.flip_rate), marker_color=["#4C78A8", "#F58518"],
                             showlegend=False), 1, 1)
        fig.add_trace(go.Bar(x=names, y=list(self.mean_margin_diff), marker_color=["#4C78A8", "#F58518"],
                             showlegend=False), 1, 2)
        fig.update_yaxes(tickformat=".0%", row=1, col=1)
        fig.update_layout(template="plotly_white", title=f"{self.baseline} vs {self.other} (n={self.n} pairs)")
        return fig


def _ztest(count_a: int, count_b: int, n_a: int, n_b: int) -> tuple[float, float]:
    """Two-proportion z-test (pooled variance), statsmodels; equal proportions at 0 or 1 give z=0, p=1."""
    from statsmodels.stats.proportion import proportions_ztest

    pooled = (count_a + count_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        return 0.0, 1.0
    z, p = proportions_ztest(np.array([count_a, count_b]), np.array([n_a, n_b]))
    return float(z), float(p)


def evaluate(model: Model, pairs: Iterable[ParaphrasePair | ParaphraseGroup], *, batch_size: int | None = None,
             n_boot: int = 1000, seed: int = 0, progress: bool = True, fast: bool = True) -> ConsistencyReport:
    """Paraphrase consistency of ``model`` on ``pairs``: flip rate, mean |margin diff|, accuracy, CIs.

    ``fast=True`` scores each distinct phrasing once, encodes each image once, runs the shared prompt prefix
    (BOS, turn header, image, context) once through the KV cache and computes only the yes/no logits at the
    answer position; ``fast=False`` runs one plain forward per phrasing (the reference; same numbers).
    ``batch_size`` caps the sequences per forward (default: sized to the device).
    """
    pairs = _as_pairs(pairs)
    with_image = [p for p in pairs if p.image is not None]
    if with_image and not model.is_multimodal:
        raise InterpError(f"{len(with_image)} pair(s) have images (e.g. {with_image[0].id!r}), but '{model.name}' "
                          "is a text-only model; load a vision-language model or drop the images")
    check_image_files(pairs)  # before any model work
    prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
    t0 = time.perf_counter()
    method = "naive: one forward per phrasing"
    if fast:
        try:
            scorer = _FastScorer(model, batch_size)
            logits = scorer.logits(prompts, list(model.answer_ids), progress=progress)
            method = scorer.method
        except _FastUnsupported as e:
            warnings.warn(f"fast evaluation is not available for '{model.name}' ({e}); using one forward per "
                          "phrasing", stacklevel=2)
            fast = False
    if not fast:
        logits = answer_logits(model, prompts, batch_size=batch_size, progress=progress)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    m = (logits[:, 0] - logits[:, 1]).double().numpy()
    n = len(pairs)
    if not np.all(np.isfinite(m)):
        bad = [pairs[i % n].id for i in np.flatnonzero(~np.isfinite(m))[:3]]
        raise InterpError(f"non-finite margins for pairs {bad}; the model produced NaN/inf logits (check its "
                          "dtype: float16 overflows in Gemma 3, use bfloat16 or float32)")
    return ConsistencyReport.from_margins(pairs, m[:n], m[n:], model=model.name, n_boot=n_boot, seed=seed,
                                          method=method, seconds=seconds)


__all__ = ["ConsistencyComparison", "ConsistencyReport", "answer_logits", "evaluate", "last_hidden", "margins",
           "project"]
