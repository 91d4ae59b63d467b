"""Stage 7 of the loop: paraphrase consistency (flip rate, margin difference, accuracy) and its report.

The margin of a phrasing is logit(yes) - logit(no) at the first answer token. `evaluate()` scores pairs
through `interp.scoring` (fast by default; ``fast=False`` is the naive one-forward-per-phrasing reference)
and turns the margins into a `ConsistencyReport`; `compare()` runs paired, cluster-aware tests (`interp.stats`,
docs/STATISTICS.md) and keeps the study's unpaired z-tests, labelled as such.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from interp import stats
from interp._errors import InterpError
from interp._results import Result, jsonable
from interp.data import ParaphraseGroup, ParaphrasePair, _components, check_image_files, polarity_suspects
from interp.data import clusters as pair_clusters
from interp.models import Model, exclusive
from interp.scoring import answer_logits, last_hidden, margins, project, score


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


_NAN = float("nan")


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.1%}"


def _num(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def _p(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.2g}"


def _measures(t: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    """The report's quantities on a per-pair table ``t`` (one cluster label per row), with 95% intervals:
    proportions by Clopper-Pearson (Korn-Graubard effective n when pairs cluster), means and ratios of
    means by a cluster bootstrap (percentile)."""
    n = len(t)
    cl = t["cluster"].astype(str).to_numpy()
    flip = t["flip"].to_numpy(bool).astype(float)
    diff = t["margin_diff"].to_numpy(float)
    absm = t["abs_margin"].to_numpy(float)
    yes = np.concatenate([t["yes_a"].to_numpy(bool), t["yes_b"].to_numpy(bool)]).astype(float)
    gold = t["correct_a"].notna().to_numpy()
    n_gold = int(gold.sum())
    correct = np.concatenate([t.loc[gold, "correct_a"].astype(bool).to_numpy(),
                              t.loc[gold, "correct_b"].astype(bool).to_numpy()]).astype(float)
    boot = stats.cluster_bootstrap(np.stack([np.ones(n), diff, absm], 1), cl, {
        "mean_margin_diff": lambda s: s[:, 1] / s[:, 0], "mean_abs_margin": lambda s: s[:, 2] / s[:, 0],
        "relative_margin_diff": lambda s: s[:, 1] / s[:, 2]}, n_boot=n_boot, seed=seed) if n >= 2 else {}
    mean_absm = float(absm.mean()) if n else _NAN
    ci = {"flip_rate": stats.proportion_ci(flip, cl),
          "mean_margin_diff": boot.get("mean_margin_diff"),
          "accuracy": stats.proportion_ci(correct, np.concatenate([cl[gold], cl[gold]])) if n_gold else None,
          "relative_margin_diff": boot.get("relative_margin_diff"),
          "mean_abs_margin": boot.get("mean_abs_margin"),
          "yes_rate": stats.proportion_ci(yes, np.concatenate([cl, cl]))}
    g = int(len(set(cl)))
    boot_method = (f"cluster bootstrap percentile 95% ({n_boot} resamples of {g} clusters)" if ci["mean_margin_diff"]
                   else "none (n_boot=0 or fewer than two clusters)")
    methods = {"flip_rate": stats.proportion_ci_method(cl, n, successes=flip.sum()),
               "mean_margin_diff": boot_method, "relative_margin_diff": boot_method, "mean_abs_margin": boot_method,
               "yes_rate": stats.proportion_ci_method(np.concatenate([cl, cl]), 2 * n, successes=yes.sum()),
               "accuracy": stats.proportion_ci_method(np.concatenate([cl[gold], cl[gold]]), 2 * n_gold,
                                                      successes=correct.sum()) if n_gold else "none (no gold answers)"}
    return dict(n=n, n_flips=int(flip.sum()), flip_rate=float(flip.mean()) if n else _NAN,
                mean_margin_diff=float(diff.mean()) if n else _NAN,
                accuracy=float(correct.mean()) if n_gold else None, n_gold=n_gold,
                relative_margin_diff=float(diff.mean() / mean_absm) if n and mean_absm > 0 else _NAN,
                mean_abs_margin=mean_absm, yes_rate=float(yes.mean()) if n else _NAN,
                n_clusters=g, ci=ci, methods=methods)


# quantity -> (unit, definition); docs/STATISTICS.md says the same at more length
_DEFINITIONS: dict[str, tuple[str, str]] = {
    "flip_rate": ("share of pairs", "pairs whose decision (margin > 0 means yes) differs between phrasing A and "
                  "polarity-corrected phrasing B"),
    "mean_margin_diff": ("logits", "mean over pairs of |m_a - m_b'|; m = logit(yes) - logit(no) at the first "
                         "answer token, m_b' = m_b, or -m_b when B inverts the answer"),
    "relative_margin_diff": ("ratio (scale-free)", "mean |m_a - m_b'| / mean |m| over all phrasings; unchanged "
                             "when every margin is scaled by the same factor"),
    "mean_abs_margin": ("logits", "mean |m| over all 2n phrasings (confidence; shrinks when margins shrink)"),
    "yes_rate": ("share of phrasings", "phrasings decided yes (raw m > 0, no polarity correction); near 0 or 1 "
                 "means a collapse toward one answer"),
    "accuracy": ("share of phrasings", "phrasings of pairs with a gold answer whose decision matches it (B "
                 "against its own, polarity-flipped gold answer)"),
}


@dataclass(frozen=True, eq=False)
class ConsistencyReport(Result):
    """Paraphrase consistency of one model on a set of pairs (flip rate, margin difference, accuracy), with
    scale-free and collapse measures beside them and a 95% interval on each (see docs/STATISTICS.md)."""

    model: str
    n: int  # pairs
    flip_rate: float  # share of pairs whose yes/no decision differs after polarity correction
    n_flips: int
    mean_margin_diff: float  # mean |margin_a - corrected margin_b| (logits)
    accuracy: float | None  # share of phrasings with a gold answer decided correctly; None without gold
    n_gold: int  # pairs with a gold answer (each contributes two phrasings to accuracy)
    ci: dict[str, tuple[float, float] | None]  # 95% intervals; the method of each in ``ci_method``
    by_kind: dict[str, dict[str, Any]]  # kind -> the measures below (n, n_flips, flip_rate, ..., ci) on its pairs
    table: pd.DataFrame = field(repr=False)  # one row per pair
    n_boot: int = 1000
    seed: int = 0
    method: str = ""  # how margins were computed
    seconds: float = 0.0  # wall time of the scoring
    relative_margin_diff: float = _NAN  # mean |margin diff| / mean |margin| (scale-free)
    mean_abs_margin: float = _NAN  # mean |margin| over all phrasings (logits)
    yes_rate: float = _NAN  # share of phrasings decided yes (raw margins)
    n_clusters: int = 0  # clusters of dependent pairs (`interp.data.clusters`) the intervals resample
    by_polarity: dict[str, dict[str, Any]] = field(default_factory=dict)  # "same" / "inverted" -> measures
    ci_method: dict[str, str] = field(default_factory=dict)  # quantity -> how its interval was computed
    polarity_suspects: tuple[str, ...] = ()  # same-polarity pairs with a negation cue on one side only

    @classmethod
    def from_margins(cls, pairs: Sequence[ParaphrasePair], margin_a: Sequence[float], margin_b: Sequence[float],
                     *, model: str = "", n_boot: int = 1000, seed: int = 0, method: str = "given margins",
                     seconds: float = 0.0, clusters: Sequence[str] | None = None) -> ConsistencyReport:
        """A report from per-pair margins already computed (``margin_b`` raw, before polarity correction).
        ``clusters``: one label per pair (default `interp.data.clusters`: shared group, image, case, report)."""
        pairs = _as_pairs(pairs)
        m_a = np.asarray(margin_a, dtype=float).reshape(-1)
        m_b = np.asarray(margin_b, dtype=float).reshape(-1)
        if len(m_a) != len(pairs) or len(m_b) != len(pairs):
            raise InterpError(f"{len(pairs)} pairs but {len(m_a)} margin_a and {len(m_b)} margin_b values")
        labels = pair_clusters(pairs) if clusters is None else [str(c) for c in clusters]
        if len(labels) != len(pairs):
            raise InterpError(f"{len(pairs)} pairs but {len(labels)} cluster labels; give one label per pair")
        bad = np.flatnonzero(~(np.isfinite(m_a) & np.isfinite(m_b)))
        if len(bad):
            raise InterpError(f"non-finite margins for {len(bad)} pair(s), e.g. {[pairs[i].id for i in bad[:3]]}: "
                              "every pair needs two finite margins (NaN/inf logits come from float16 overflow in "
                              "Gemma 3: use bfloat16 or float32), or drop those pairs and say so")
        same = np.array([p.same_polarity for p in pairs])
        corrected = np.where(same, m_b, -m_b)
        # decisions: yes when m > 0. B's decision is polarity-corrected as a decision (an inverted B at
        # m_b = 0 decides "no", which agrees with A's "yes"), not by the sign of -m_b (-0.0 is not > 0)
        yes_b_as_a = np.where(same, m_b > 0, ~(m_b > 0))  # B's decision read in A's polarity

        def correct(margin: np.ndarray, answers: list[str | None]) -> list[bool | None]:
            return [None if a is None else bool((m > 0) == (a == "yes")) for m, a in zip(margin, answers, strict=True)]

        table = pd.DataFrame({
            "id": [p.id for p in pairs], "group": [p.group for p in pairs], "kind": [p.kind for p in pairs],
            "question_a": [p.question_a for p in pairs], "question_b": [p.question_b for p in pairs],
            "answer": [p.answer for p in pairs], "same_polarity": same,
            "margin_a": m_a, "margin_b": m_b, "margin_b_corrected": corrected,
            "margin_diff": np.abs(m_a - corrected), "flip": (m_a > 0) != yes_b_as_a,
            "correct_a": pd.Series(correct(m_a, [p.answer for p in pairs]), dtype=object),
            "correct_b": pd.Series(correct(m_b, [p.answer_b for p in pairs]), dtype=object),
            "cluster": labels, "polarity": np.where(same, "same", "inverted"),
            "yes_a": m_a > 0, "yes_b": m_b > 0, "abs_margin": (np.abs(m_a) + np.abs(m_b)) / 2,
        })
        s = _measures(table, n_boot, seed)
        by_kind = {str(k): _measures(t, n_boot, seed) for k, t in table.groupby("kind", sort=True)}
        by_polarity = {str(k): _measures(t, n_boot, seed) for k, t in table.groupby("polarity", sort=True)}
        ci, ci_method = s.pop("ci"), s.pop("methods")
        return cls(model=model, ci=ci, by_kind=by_kind, table=table, n_boot=n_boot, seed=seed, method=method,
                   seconds=seconds, by_polarity=by_polarity, ci_method=ci_method,
                   polarity_suspects=tuple(p.id for p in polarity_suspects(pairs)), **s)

    def measures(self) -> pd.DataFrame:
        """One row per reported quantity: value, 95% interval and its method, n, unit and definition."""
        rows = []
        for name, (unit, definition) in _DEFINITIONS.items():
            value = getattr(self, name)
            ci = self.ci.get(name)
            # n of the units the quantity averages: pairs, or phrasings (two a pair; accuracy: pairs with gold)
            n_units = 2 * self.n_gold if name == "accuracy" else (
                2 * self.n if unit == "share of phrasings" or name == "mean_abs_margin" else self.n)
            rows.append({"quantity": name, "value": value, "ci_low": None if ci is None else ci[0],
                         "ci_high": None if ci is None else ci[1], "interval": self.ci_method.get(name, ""),
                         "n": n_units, "n_clusters": self.n_clusters, "unit": unit, "definition": definition})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["measures"] = jsonable(self.measures())
        return out

    def __repr__(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.1%}{stats.fmt_ci(self.ci.get('accuracy'), True)}"
        return (f"ConsistencyReport({self.model!r}, n={self.n}: flip rate {self.flip_rate:.1%}"
                f"{stats.fmt_ci(self.ci.get('flip_rate'), True)} ({self.n_flips} flips), mean |margin diff| "
                f"{self.mean_margin_diff:.3g}{stats.fmt_ci(self.ci.get('mean_margin_diff'), False)} logits, "
                f"|margin diff| / mean |margin| {_num(self.relative_margin_diff)}"
                f"{stats.fmt_ci(self.ci.get('relative_margin_diff'), False)}, mean |margin| "
                f"{_num(self.mean_abs_margin)}{stats.fmt_ci(self.ci.get('mean_abs_margin'), False)}, yes rate "
                f"{_pct(self.yes_rate)}{stats.fmt_ci(self.ci.get('yes_rate'), True)}, accuracy {acc}; "
                f"{self.n_clusters} clusters, 95% intervals)")

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
        fr = stats.fmt_ci(self.ci.get("flip_rate"), True)
        fig.update_layout(title=f"{self.model}: flip rate {self.flip_rate:.1%}{fr} (n={self.n} pairs, "
                                f"{self.n_clusters} clusters)<br><sup>mean |margin diff| {self.mean_margin_diff:.3g}, "
                                f"scale-free |diff| / mean |margin| {_num(self.relative_margin_diff)}, mean |margin| "
                                f"{_num(self.mean_abs_margin)} logits, yes rate {_pct(self.yes_rate)}</sup>",
                          xaxis_title="margin A = logit(yes) - logit(no)",
                          yaxis_title="margin B (polarity-corrected)", template="plotly_white")
        return fig

    def compare(self, other: ConsistencyReport) -> ConsistencyComparison:
        """Compare with another report on the same pairs (``self`` = baseline): paired tests first."""
        return ConsistencyComparison.of(self, other)


def _truthy(column: pd.Series) -> np.ndarray:
    """1.0 where a correct_a/correct_b cell is True, 0.0 where False or missing (no gold answer)."""
    return np.array([v is not None and v == v and bool(v) for v in column], dtype=float)


def _merge_labels(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Connected components of units linked by a shared label in ``a`` or in ``b``."""
    roots = _components([(("a", str(x)), ("b", str(y))) for x, y in zip(a, b, strict=True)])
    return [str(a[r]) for r in roots]


@dataclass(frozen=True, eq=False)
class ConsistencyComparison(Result):
    """Baseline vs another model on the same pairs. Headline tests are paired: exact McNemar on flips (over
    clusters when pairs cluster), a clustered paired test on accuracy, Wilcoxon and a cluster sign-flip test
    on margin differences; the study's unpaired two-proportion z-tests are kept and labelled as such. Every
    change carries a paired cluster-bootstrap 95% interval (``ci``)."""

    baseline: str
    other: str
    n: int
    flip_rate: tuple[float, float]  # (baseline, other)
    flip_rate_delta: float  # other - baseline
    z: float  # unpaired two-proportion z-test on flip counts (statsmodels proportions_ztest), as in the study
    p_z: float
    p_mcnemar: float  # paired: exact McNemar (binomial) on per-pair flips, pairs as independent units
    discordant: tuple[int, int]  # (pairs that flip only in baseline, only in other)
    mean_margin_diff: tuple[float, float]
    margin_diff_delta: float
    margin_diff_relative: float  # (other - baseline) / baseline; the study reports -0.795
    wilcoxon: float  # paired: Wilcoxon signed-rank statistic on per-pair |margin diff|
    p_wilcoxon: float
    accuracy: tuple[float, float] | None
    accuracy_delta: float | None
    z_accuracy: float | None  # unpaired two-proportion z-test on correct phrasings, as in the study
    p_accuracy: float | None  # its p-value (the paired test is ``p_accuracy_paired``)
    table: pd.DataFrame = field(repr=False)  # per pair: both models' margins, diffs and flips
    p_flip: float = _NAN  # headline flip test: ``p_flip_cluster`` (= exact McNemar when no pairs cluster)
    flip_test: str = ""  # name of the headline flip test
    p_mcnemar_midp: float = _NAN  # mid-p exact McNemar, pairs as independent units
    p_flip_midp: float = _NAN  # mid-p of the headline flip test (the clustered one when pairs cluster)
    p_margin: float = _NAN  # headline test on |margin diff| changes: ``p_margin_cluster`` when pairs cluster
    margin_test: str = ""  # its name
    p_flip_cluster: float = _NAN  # exact cluster sign-flip test on per-pair flip changes (clustered McNemar)
    p_accuracy_paired: float | None = None  # headline accuracy test: exact cluster sign-flip on per-phrasing
    accuracy_test: str = ""  # correctness changes, clusters of pairs as units; its name here
    accuracy_discordant: tuple[int, int] | None = None  # phrasings correct only in baseline, only in other
    p_accuracy_mcnemar: float | None = None  # exact McNemar on phrasings as independent units (no clusters)
    p_margin_cluster: float = _NAN  # cluster sign-flip test on per-pair |margin diff| changes
    relative_margin_diff: tuple[float, float] = (_NAN, _NAN)  # scale-free |diff| / mean |margin|
    relative_margin_diff_delta: float = _NAN
    mean_abs_margin: tuple[float, float] = (_NAN, _NAN)  # logits
    mean_abs_margin_relative: float = _NAN  # (other - baseline) / baseline: margins shrinking or growing
    yes_rate: tuple[float, float] = (_NAN, _NAN)
    yes_rate_delta: float = _NAN
    n_clusters: int = 0
    ci: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # paired cluster-bootstrap 95% CIs
    ci_method: dict[str, str] = field(default_factory=dict)  # quantity -> how its CI was taken, if not so
    ci_levels: dict[str, Any] = field(default_factory=dict)  # quantity -> (baseline CI, other CI) from reports
    n_boot: int = 1000
    n_gold: int = 0  # pairs with a gold answer (2 phrasings each in the accuracy tests)
    n_clusters_gold: int = 0  # clusters among them

    @classmethod
    def of(cls, base: ConsistencyReport, other: ConsistencyReport) -> ConsistencyComparison:
        """Run the tests; both reports must cover the same pair ids (and the same questions)."""
        from scipy.stats import wilcoxon

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
        cl = np.array(_merge_labels(list(a["cluster"]), list(b["cluster"])), dtype=object)
        g = len(set(cl))
        n_boot, seed = base.n_boot, base.seed
        sa, sb = _measures(a.assign(cluster=cl), 0, seed), _measures(b.assign(cluster=cl), 0, seed)

        # flips: exact McNemar on pairs, its cluster version, and the study's unpaired z-test
        fa, fb = a["flip"].to_numpy(bool), b["flip"].to_numpy(bool)
        z, p_z = stats.two_proportion_ztest(int(fa.sum()), int(fb.sum()), n, n)
        only_base, only_other = int((fa & ~fb).sum()), int((~fa & fb).sum())
        mc = stats.mcnemar_exact(only_base, only_other)
        flip_cluster = stats.sign_flip_test(fb.astype(float) - fa.astype(float), cl, seed=seed)
        if g == n:
            p_flip, p_flip_mid, flip_test = mc.p, mc.p_mid, "exact McNemar (binomial), pairs as units"
        else:
            p_flip, p_flip_mid = flip_cluster.p, flip_cluster.p_mid
            flip_test = f"exact clustered McNemar (sign-flip test over {g} clusters of pairs)"

        # margin differences: Wilcoxon on pairs (the study) and a cluster sign-flip test
        da, db = a["margin_diff"].to_numpy(), b["margin_diff"].to_numpy()
        if np.allclose(da, db, rtol=0, atol=0):
            w, p_w = _NAN, 1.0
        else:
            res = wilcoxon(da, db)
            w, p_w = float(res.statistic), float(res.pvalue)
        p_margin_cluster = stats.sign_flip_test(db - da, cl, seed=seed).p
        if g == n:
            p_margin, margin_test = p_w, "Wilcoxon signed-rank, pairs as units"
        else:  # the signed-rank test takes pairs as independent: with clusters it is shown, not headlined
            p_margin, margin_test = p_margin_cluster, f"cluster sign-flip test over {g} clusters of pairs"

        # accuracy: per-phrasing correctness, paired, clustered by pair (and by cluster of pairs)
        acc = za = pa = acc_delta = p_acc_paired = p_acc_mc = acc_disc = None
        acc_test = ""
        gold = a["correct_a"].notna().to_numpy()
        if sa["accuracy"] is not None and sb["accuracy"] is not None:
            acc = (sa["accuracy"], sb["accuracy"])
            acc_delta = acc[1] - acc[0]
            ca = np.concatenate([a.loc[gold, "correct_a"].astype(bool), a.loc[gold, "correct_b"].astype(bool)])
            cb = np.concatenate([b.loc[gold, "correct_a"].astype(bool), b.loc[gold, "correct_b"].astype(bool)])
            m = 2 * sa["n_gold"]
            za, pa = stats.two_proportion_ztest(int(ca.sum()), int(cb.sum()), m, m)
            acc_disc = (int((ca & ~cb).sum()), int((~ca & cb).sum()))
            p_acc_mc = stats.mcnemar_exact(*acc_disc).p
            cl_phr = np.concatenate([cl[gold], cl[gold]])
            p_acc_paired = stats.sign_flip_test(cb.astype(float) - ca.astype(float), cl_phr, seed=seed).p
            acc_test = (f"exact clustered McNemar on phrasings (sign-flip test over {len(set(cl_phr))} clusters; "
                        "a pair's two phrasings always share one)")

        # paired cluster bootstrap: the same resampled clusters for both models
        gold_f = gold.astype(float)

        def per_pair_acc(t: pd.DataFrame) -> np.ndarray:
            return (_truthy(t["correct_a"]) + _truthy(t["correct_b"])) / 2 * gold_f

        cols = np.stack([np.ones(n), fa, fb, da, db, a["abs_margin"], b["abs_margin"],
                         (a["yes_a"].astype(float) + a["yes_b"].astype(float)) / 2,
                         (b["yes_a"].astype(float) + b["yes_b"].astype(float)) / 2,
                         gold_f, per_pair_acc(a), per_pair_acc(b)], 1).astype(float)
        statistics = {
            "flip_rate_delta": lambda s: (s[:, 2] - s[:, 1]) / s[:, 0],
            "margin_diff_delta": lambda s: (s[:, 4] - s[:, 3]) / s[:, 0],
            "margin_diff_relative": lambda s: s[:, 4] / s[:, 3] - 1,
            "relative_margin_diff_delta": lambda s: s[:, 4] / s[:, 6] - s[:, 3] / s[:, 5],
            "mean_abs_margin_relative": lambda s: s[:, 6] / s[:, 5] - 1,
            "yes_rate_delta": lambda s: (s[:, 8] - s[:, 7]) / s[:, 0]}
        if acc is not None:
            statistics["accuracy_delta"] = lambda s: (s[:, 11] - s[:, 10]) / s[:, 9]
        ci = stats.cluster_bootstrap(cols, cl, statistics, n_boot=n_boot, seed=seed)
        ci.setdefault("accuracy_delta", None)
        # a share that no unit changed: the bootstrap's [0, 0] is replaced by a bound (stats.no_change_interval)
        ci_method: dict[str, str] = {}
        yes = [np.concatenate([_truthy(t["yes_a"]), _truthy(t["yes_b"])]).astype(bool) for t in (a, b)]
        shares = {"flip_rate_delta": (fa != fb, cl, "pairs"),
                  "yes_rate_delta": (yes[0] != yes[1], np.concatenate([cl, cl]), "phrasings")}
        if acc is not None:
            shares["accuracy_delta"] = (ca != cb, cl_phr, "phrasings with a gold answer")
        for key, (changed, units_cl, unit) in shares.items():
            if ci.get(key) is not None and not changed.any():
                ci[key], ci_method[key] = stats.no_change_interval(changed.astype(float), list(units_cl), unit=unit)

        def ratio(x: float, y: float) -> float:
            return x / y - 1 if y > 0 else _NAN

        levels = {k: (base.ci.get(k), other.ci.get(k)) for k in _DEFINITIONS}
        keep = ["margin_a", "margin_b_corrected", "margin_diff", "flip"]
        table = a[["kind", "cluster", *keep]].join(b[keep], lsuffix="_base", rsuffix="_other").reset_index()
        return cls(baseline=base.model, other=other.model, n=n, flip_rate=(sa["flip_rate"], sb["flip_rate"]),
                   flip_rate_delta=sb["flip_rate"] - sa["flip_rate"], z=z, p_z=p_z, p_mcnemar=mc.p,
                   discordant=(only_base, only_other),
                   mean_margin_diff=(sa["mean_margin_diff"], sb["mean_margin_diff"]),
                   margin_diff_delta=sb["mean_margin_diff"] - sa["mean_margin_diff"],
                   margin_diff_relative=ratio(sb["mean_margin_diff"], sa["mean_margin_diff"]),
                   wilcoxon=w, p_wilcoxon=p_w, accuracy=acc, accuracy_delta=acc_delta, z_accuracy=za,
                   p_accuracy=pa, table=table, p_flip=p_flip, flip_test=flip_test, p_mcnemar_midp=mc.p_mid,
                   p_flip_midp=p_flip_mid, p_margin=p_margin, margin_test=margin_test,
                   p_flip_cluster=flip_cluster.p, p_accuracy_paired=p_acc_paired, accuracy_test=acc_test,
                   accuracy_discordant=acc_disc, p_accuracy_mcnemar=p_acc_mc, p_margin_cluster=p_margin_cluster,
                   relative_margin_diff=(sa["relative_margin_diff"], sb["relative_margin_diff"]),
                   relative_margin_diff_delta=sb["relative_margin_diff"] - sa["relative_margin_diff"],
                   mean_abs_margin=(sa["mean_abs_margin"], sb["mean_abs_margin"]),
                   mean_abs_margin_relative=ratio(sb["mean_abs_margin"], sa["mean_abs_margin"]),
                   yes_rate=(sa["yes_rate"], sb["yes_rate"]), yes_rate_delta=sb["yes_rate"] - sa["yes_rate"],
                   n_clusters=g, ci=ci, ci_method=ci_method, ci_levels=levels, n_boot=n_boot, n_gold=sa["n_gold"],
                   n_clusters_gold=len(set(cl[gold])))

    def tests(self) -> pd.DataFrame:
        """Every test run, one row each: quantity, test, paired or not, statistic, p (mid-p), n and unit."""
        g, n, m, g_gold = self.n_clusters, self.n, 2 * self.n_gold, self.n_clusters_gold
        rows = [
            ("flip rate", self.flip_test, True, f"discordant pairs {self.discordant[0]}/{self.discordant[1]}",
             self.p_flip, self.p_flip_midp, n, g, "pairs", True),
            *([("flip rate", "exact McNemar (binomial), pairs as independent units (ignores clusters)", True,
                f"discordant pairs {self.discordant[0]}/{self.discordant[1]}", self.p_mcnemar, self.p_mcnemar_midp,
                n, n, "pairs", False)] if g != n else []),
            ("flip rate", "unpaired two-proportion z-test (as in the study)", False, f"z={self.z:.3f}", self.p_z,
             None, 2 * n, 2 * n, "pairs (counted twice, as independent)", False),
            ("mean |margin diff|", "Wilcoxon signed-rank, pairs as units (as in the study)"
             + ("" if g == n else "; ignores clusters"), True,
             f"W={self.wilcoxon:.4g}", self.p_wilcoxon, None, n, n, "pairs", g == n),
            ("mean |margin diff|", f"cluster sign-flip test on |margin diff| changes ({g} clusters)", True,
             f"{self.margin_diff_delta:+.4g} logits", self.p_margin_cluster, None, n, g, "pairs", g != n),
        ]
        if self.accuracy is not None and self.accuracy_discordant is not None:
            rows += [
                ("accuracy", self.accuracy_test, True,
                 f"discordant phrasings {self.accuracy_discordant[0]}/{self.accuracy_discordant[1]}",
                 self.p_accuracy_paired, None, m, g_gold, "phrasings", True),
                ("accuracy", "exact McNemar on phrasings as independent units", True,
                 f"discordant phrasings {self.accuracy_discordant[0]}/{self.accuracy_discordant[1]}",
                 self.p_accuracy_mcnemar, None, m, m, "phrasings", False),
                ("accuracy", "unpaired two-proportion z-test (as in the study)", False, f"z={self.z_accuracy:.3f}",
                 self.p_accuracy, None, 2 * m, 2 * m, "phrasings (counted twice, as independent)", False)]
        cols = ["quantity", "test", "paired", "statistic", "p", "p_mid", "n", "n_clusters", "unit", "headline"]
        return pd.DataFrame(rows, columns=cols)

    def changes(self) -> pd.DataFrame:
        """Each quantity before and after, its change and the change's paired cluster-bootstrap 95% CI."""
        n, m = self.n, 2 * self.n  # pairs; phrasings (two a pair)
        rows = [("flip rate", *self.flip_rate, "difference", self.flip_rate_delta, "flip_rate_delta",
                 "share of pairs"),
                ("accuracy", *(self.accuracy or (None, None)), "difference", self.accuracy_delta, "accuracy_delta",
                 "share of phrasings"),
                ("mean |margin diff|", *self.mean_margin_diff, "difference", self.margin_diff_delta,
                 "margin_diff_delta", "logits"),
                ("mean |margin diff|", *self.mean_margin_diff, "relative change", self.margin_diff_relative,
                 "margin_diff_relative", "ratio - 1"),
                ("|margin diff| / mean |margin|", *self.relative_margin_diff, "difference",
                 self.relative_margin_diff_delta, "relative_margin_diff_delta", "ratio (scale-free)"),
                ("mean |margin|", *self.mean_abs_margin, "relative change", self.mean_abs_margin_relative,
                 "mean_abs_margin_relative", "ratio - 1"),
                ("yes rate", *self.yes_rate, "difference", self.yes_rate_delta, "yes_rate_delta",
                 "share of phrasings")]
        units = {"accuracy": 2 * self.n_gold, "yes rate": m, "mean |margin|": m}
        out = []
        for name, before, after, kind, change, key, unit in rows:
            ci = self.ci.get(key)
            out.append({"quantity": name, "baseline": before, "other": after, "change": kind, "value": change,
                        "ci_low": None if ci is None else ci[0], "ci_high": None if ci is None else ci[1],
                        "interval": self.ci_method.get(key) or (
                            f"paired cluster bootstrap percentile 95% ({self.n_boot} resamples of "
                            f"{self.n_clusters} clusters)" if ci is not None else "none"),
                        "n": units.get(name, n), "unit": unit})
        return pd.DataFrame(out)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["tests"] = jsonable(self.tests())
        out["changes"] = jsonable(self.changes())
        return out

    def __repr__(self) -> str:
        def delta(key: str, value: float | None, pct: bool) -> str:
            ci = self.ci.get(key)
            if value is None or not np.isfinite(value):
                return "n/a"
            if pct:
                return f"{value * 100:+.1f} pp" + ("" if ci is None else f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]")
            return f"{value:+.1%}" + ("" if ci is None else f" [{ci[0]:+.1%}, {ci[1]:+.1%}]")

        if self.n_clusters == self.n:
            margins = f"Wilcoxon signed-rank p={_p(self.p_wilcoxon)}"
        else:
            margins = (f"cluster sign-flip p={_p(self.p_margin_cluster)}; Wilcoxon, pairs as units as in the study, "
                       f"p={_p(self.p_wilcoxon)}")
        acc = "" if self.accuracy is None else (
            f", accuracy {self.accuracy[0]:.1%} -> {self.accuracy[1]:.1%} ({delta('accuracy_delta', self.accuracy_delta, True)}; "
            f"paired clustered p={_p(self.p_accuracy_paired)}; unpaired z-test as in the study p={_p(self.p_accuracy)})")
        return (f"ConsistencyComparison({self.baseline!r} -> {self.other!r}, n={self.n} pairs in {self.n_clusters} "
                f"clusters: flip rate {self.flip_rate[0]:.1%} -> {self.flip_rate[1]:.1%} "
                f"({delta('flip_rate_delta', self.flip_rate_delta, True)}; {self.flip_test} "
                f"{self.discordant[0]}/{self.discordant[1]} p={_p(self.p_flip)}, mid-p={_p(self.p_flip_midp)}; "
                f"unpaired z-test as in the study p={_p(self.p_z)}){acc}, mean |margin diff| "
                f"{self.mean_margin_diff[0]:.3g} -> {self.mean_margin_diff[1]:.3g} "
                f"({delta('margin_diff_relative', self.margin_diff_relative, False)}; {margins}), "
                f"|margin diff| / mean |margin| "
                f"{_num(self.relative_margin_diff[0])} -> {_num(self.relative_margin_diff[1])}, mean |margin| "
                f"{_num(self.mean_abs_margin[0])} -> {_num(self.mean_abs_margin[1])} "
                f"({delta('mean_abs_margin_relative', self.mean_abs_margin_relative, False)}), yes rate "
                f"{_pct(self.yes_rate[0])} -> {_pct(self.yes_rate[1])}; 95% paired cluster-bootstrap intervals"
                f"{self._bounds_note()})")

    def _bounds_note(self) -> str:
        """Which changes carry a bound in place of the bootstrap's interval (no unit changed)."""
        names = {"flip_rate_delta": "flip rate", "accuracy_delta": "accuracy", "yes_rate_delta": "yes rate"}
        shown = [names.get(k, k) for k in self.ci_method]
        return (f"; {', '.join(shown)}: no unit changed, +- the upper 95% limit on the share that changes"
                if shown else "")

    def figure(self):
        """Plotly bars with each model's 95% interval, baseline vs other: flip rate, accuracy and yes rate;
        mean |margin diff|, its scale-free version and mean |margin|. Above each panel: the change with its
        paired cluster-bootstrap 95% interval and the headline paired test."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        def change(key: str, value: float | None, pct: bool, fmt: str = "{:+.0%}") -> str:
            if value is None or not np.isfinite(value):
                return "change n/a"
            ci = self.ci.get(key)
            if pct:
                return f"{value * 100:+.1f} pp" + ("" if ci is None else f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]")
            return fmt.format(value) + ("" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]")

        acc_test = (f"clustered McNemar p={_p(self.p_accuracy_paired)}" if self.accuracy is not None
                    else "no gold answers")
        panels = [
            ("flip_rate", self.flip_rate, "flip rate",
             f"{change('flip_rate_delta', self.flip_rate_delta, True)}, "
             f"{'McNemar' if self.n_clusters == self.n else 'clustered McNemar'} p={_p(self.p_flip)}"),
            ("accuracy", self.accuracy or (_NAN, _NAN), "accuracy",
             f"{change('accuracy_delta', self.accuracy_delta, True)}, {acc_test}"),
            ("yes_rate", self.yes_rate, "yes rate", change("yes_rate_delta", self.yes_rate_delta, True)),
            ("mean_margin_diff", self.mean_margin_diff, "mean |margin diff| (logits)",
             f"{change('margin_diff_relative', self.margin_diff_relative, False)}, "
             f"{'Wilcoxon' if self.n_clusters == self.n else 'cluster sign-flip'} p={_p(self.p_margin)}"),
            ("relative_margin_diff", self.relative_margin_diff, "scale-free: |margin diff| / mean |margin|",
             change("relative_margin_diff_delta", self.relative_margin_diff_delta, False, "{:+.3g}")),
            ("mean_abs_margin", self.mean_abs_margin, "mean |margin| (logits)",
             change("mean_abs_margin_relative", self.mean_abs_margin_relative, False))]
        fig = make_subplots(rows=2, cols=3, vertical_spacing=0.2, horizontal_spacing=0.08,
                            subplot_titles=[f"<b>{t}</b><br><span style='font-size:11px'>{c}</span>"
                                            for _, _, t, c in panels])
        names = [self.baseline, self.other]
        for k, (key, values, _, _) in enumerate(panels):
            row, col = divmod(k, 3)
            cis = self.ci_levels.get(key) or (None, None)
            hi = [None if c is None else c[1] - v for c, v in zip(cis, values, strict=True)]
            lo = [None if c is None else v - c[0] for c, v in zip(cis, values, strict=True)]
            err = dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#333") \
                if any(h is not None for h in hi) else None
            fig.add_trace(go.Bar(x=names, y=list(values), marker_color=["#4C78A8", "#F58518"], error_y=err,
                                 showlegend=False), row + 1, col + 1)
            if key in ("flip_rate", "accuracy", "yes_rate"):
                fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=row + 1, col=col + 1)
        fig.update_annotations(font_size=13)
        fig.update_layout(template="plotly_white", height=680, width=1100, margin=dict(t=120),
                          title=dict(text=f"{self.baseline} vs {self.other}: {self.n} pairs in {self.n_clusters} "
                                          "clusters<br><sup>bars: each model with its 95% interval; above each "
                                          "panel: the change [paired cluster-bootstrap 95%] and the paired test; "
                                          f"unpaired z-test as in the study p={_p(self.p_z)}"
                                          f"{'<br>' + self._bounds_note()[2:] if self.ci_method else ''}</sup>",
                                     y=0.97))
        return fig


def _ztest(count_a: int, count_b: int, n_a: int, n_b: int) -> tuple[float, float]:
    """Two-proportion z-test (pooled variance); see `interp.stats.two_proportion_ztest`."""
    return stats.two_proportion_ztest(count_a, count_b, n_a, n_b)


@exclusive
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
    logits, method = score(model, prompts, batch_size=batch_size, progress=progress, fast=fast)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    m = (logits[:, 0] - logits[:, 1]).double().numpy()
    n = len(pairs)
    return ConsistencyReport.from_margins(pairs, m[:n], m[n:], model=model.name, n_boot=n_boot, seed=seed,
                                          method=method, seconds=seconds)


__all__ = ["ConsistencyComparison", "ConsistencyReport", "answer_logits", "evaluate", "last_hidden", "margins",
           "project"]
