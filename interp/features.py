"""Stage 4 of the loop: SAE features that tell the formal and the lay phrasing of a question apart.

`register_features` ranks every feature of a sae-lens SAE by how differently it fires on the two phrasings
of each pair (paired tests, Benjamini-Hochberg FDR); `feature_card` shows what one feature reads;
`ablate_feature` splices the SAE into the forward pass, zeroes or clamps one feature, and reports the answers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp import stats as cluster_stats
from interp._errors import InterpError
from interp._results import Result
from interp.capture import Activations, capture, layer_output, position_mask
from interp.consistency import ConsistencyReport
from interp.data import ParaphrasePair, check_pairs
from interp.data import clusters as pair_clusters
from interp.models import Model, Prompt, _as_prompt, exclusive
from interp.scoring import last_hidden, project

Pool = Literal["question", "last"]
PairedTest = Literal["wilcoxon", "ttest"]
REGISTERS = ("formal", "lay")  # what question_a / question_b are in the built-in register pairs

_HOOK_LAYER = re.compile(r"(?:blocks|layers)\.(\d+)")
_NOT_RESIDUAL = ("hook_z", "attn", "mlp", "resid_mid")


# ---- checks shared with layers.py ----------------------------------------------------------------
def sae_layer(model: Model, sae: Any, layer: int | None = None) -> int:
    """The decoder layer whose residual stream (resid_post) ``sae`` reads, checked against the model.

    ``layer`` defaults to the layer named in ``sae.cfg.metadata.hook_name``; a contradiction, an SAE of
    another width or a non-residual hook site is an `InterpError`.
    """
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(sae, "encode") or not hasattr(sae, "decode"):
        raise InterpError(f"sae must be a sae-lens SAE (with .cfg, .encode, .decode), got {type(sae).__name__}; "
                          "load one with interp.load_sae(...)")
    hook = str(getattr(getattr(cfg, "metadata", None), "hook_name", None) or "")
    if any(site in hook for site in _NOT_RESIDUAL):
        raise InterpError(f"the SAE reads '{hook}', not the residual stream; layer profiles and splicing need a "
                          "residual-stream SAE (e.g. Gemma Scope '-res' releases)")
    found = _HOOK_LAYER.search(hook)
    hooked = None if found is None else int(found.group(1)) - (1 if "resid_pre" in hook else 0)
    if layer is None:
        if hooked is None:
            raise InterpError(f"cannot tell which layer the SAE reads (hook_name={hook!r}); pass layer=")
        layer = hooked
    elif hooked is not None and hooked != int(layer):
        raise InterpError(f"the SAE was trained on '{hook}' (layer {hooked}) but layer={layer}; pass "
                          f"layer={hooked} or the SAE for layer {layer}")
    layer = model.check_layers([int(layer)])[0]
    if int(cfg.d_in) != model.d_model:
        raise InterpError(f"SAE d_in={cfg.d_in} but layer {layer} of '{model.name}' has d_model={model.d_model}: "
                          "this SAE belongs to another model; load the SAE trained on this model's residual stream")
    return layer


def _pair_prompts(pairs: Sequence[ParaphrasePair]) -> list[Prompt]:
    """Phrasing a of every pair, then phrasing b of every pair."""
    return [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]


# ---- SAE activations per prompt --------------------------------------------------------------------
def _sae_encode(sae: Any, resid: Tensor, chunk: int = 4096) -> Tensor:
    """``sae.encode`` in row chunks, on the SAE's device and dtype: ``[rows, d_sae]`` float32 on the CPU."""
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    if resid.shape[0] == 0:
        return torch.zeros(0, int(sae.cfg.d_sae))
    with torch.inference_mode():
        return torch.cat([sae.encode(resid[s:s + chunk].to(dev, dt)).float().cpu()
                          for s in range(0, resid.shape[0], chunk)])


def _question_and_last(info: Any) -> Tensor:
    sel = info.question_mask.clone()
    sel[-1] = True
    return sel


def _pool_rows(rows: Tensor, acts: Activations, pools: Sequence[str]) -> dict[str, Tensor]:
    """Per-prompt pooling of per-token ``rows`` [tokens, k] (aligned with ``acts``): ``{pool: [n_prompts, k]}``."""
    n = acts.n_prompts
    prompt, pos = acts.prompt_index, acts.position
    last_pos = torch.full((n,), -1, dtype=pos.dtype).scatter_reduce(0, prompt, pos, "amax")
    is_last = pos == last_pos[prompt]
    out: dict[str, Tensor] = {}
    if "last" in pools:
        out["last"] = torch.zeros(n, rows.shape[1], dtype=rows.dtype).index_copy_(0, prompt[is_last], rows[is_last])
    if "question" in pools:
        q = ~is_last if acts.positions != "question" else torch.ones_like(is_last)
        counts = torch.bincount(prompt[q], minlength=n)
        if (counts == 0).any():
            i = int((counts == 0).nonzero()[0])
            raise InterpError(f"prompt {i} has no question tokens to pool over; check that its question text "
                              "appears in the formatted prompt, or use pool=('last',)")
        sums = torch.zeros(n, rows.shape[1], dtype=rows.dtype).index_add_(0, prompt[q], rows[q])
        out["question"] = sums / counts[:, None]
    return out


def pooled_features(sae: Any, acts: Activations, layer: int, pools: Sequence[str]) -> dict[str, Tensor]:
    """Per-prompt SAE activations ``{pool: [n_prompts, d_sae]}``: mean over question tokens and/or the last token.

    ``acts`` holds question tokens and each prompt's last token (the answer position); the encoding is per
    token, pooling comes after it (JumpReLU is not linear).
    """
    return _pool_rows(_sae_encode(sae, acts[layer]), acts, pools)


def pooled_residual(acts: Activations, layer: int, pools: Sequence[str]) -> dict[str, Tensor]:
    """The residual stream pooled the same way as `pooled_features`: ``{pool: [n_prompts, d_model]}`` float64."""
    return _pool_rows(acts[layer].double().cpu(), acts, pools)


WILCOXON_NAME = ("Wilcoxon signed-rank, normal approximation with tie correction and continuity correction, "
                 "zero differences dropped (zero_method='wilcox'), two-sided; the same method for every column")
TTEST_NAME = "paired t-test (scipy ttest_rel), two-sided"
D_Z_FORMULA = "d_z = mean(a - b) / SD(a - b), SD with ddof=1 (Cohen's paired effect size, unitless)"


def _test_name(test: str) -> str:
    return WILCOXON_NAME if test == "wilcoxon" else TTEST_NAME


def _paired_p(diff: np.ndarray, test: str) -> np.ndarray:
    """Two-sided p of every column of paired differences ``diff`` [n_pairs, k]; NaN where all are zero."""
    from scipy import stats

    tested = np.any(diff != 0, axis=0)
    p = np.full(diff.shape[1], np.nan)
    if tested.any():
        d = diff[:, tested]
        with np.errstate(divide="ignore", invalid="ignore"):
            if test == "wilcoxon":
                p[tested] = stats.wilcoxon(d, axis=0, method="asymptotic", correction=True,
                                           zero_method="wilcox").pvalue
            else:  # the paired t-test is the one-sample t-test of the differences
                p[tested] = stats.ttest_1samp(d, 0.0, axis=0).pvalue
        p[tested & np.isnan(p)] = 1.0  # a t-test on constant differences: no evidence either way
    return p


def _cluster_means(x: np.ndarray, codes: np.ndarray, g: int) -> np.ndarray:
    """Column means of the rows of ``x`` [n, k] within each of the ``g`` clusters ``codes`` [n]: ``[g, k]``."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=g)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.add.reduceat(x[order], starts, axis=0) / counts[:, None]


def paired_stats(xa: np.ndarray, xb: np.ndarray, test: str = "wilcoxon",
                 clusters: Sequence[Any] | None = None) -> pd.DataFrame:
    """Paired comparison of every column of ``xa`` [n_pairs, k] with ``xb``: means, d_z, p and BH q.

    Every column is tested by one method, so p-values rank columns consistently: ``"wilcoxon"`` is the
    signed-rank test by its normal approximation (tie-corrected variance, continuity correction, zero
    differences dropped), never the exact null for some columns and the normal one for others (the exact
    null gives smaller p at small n, which once ranked random directions above a planted feature).
    ``"ttest"`` is the paired t-test. Columns whose paired differences are all zero (never active on these
    prompts) are not tested: their p, q and d_z are NaN and they do not count towards the FDR correction.

    ``clusters``: one label per pair (`interp.data.clusters`). Pairs in one cluster (a shared question group,
    image, case, report or phrasing) are not independent, so when some cluster holds more than one pair the
    per-pair values and differences are first averaged within each cluster and the clusters are the units of
    the test, of d_z and of mean_a / mean_b / diff. Without clusters, or with one pair per cluster, the pairs
    are the units (the same numbers as without ``clusters``). ``n_nonzero``: units whose difference is not
    zero (the signed-rank test's n); ``n_clusters``: the units tested; ``active_a`` / ``active_b`` stay
    per phrasing.
    """
    from statsmodels.stats.multitest import multipletests

    if test not in ("wilcoxon", "ttest"):
        raise InterpError(f"test={test!r}: use 'wilcoxon' (signed-rank) or 'ttest' (paired t)")
    diff = xa - xb
    active_a, active_b = (xa > 0).mean(0), (xb > 0).mean(0)
    if clusters is not None:
        codes = cluster_stats.codes(clusters, diff.shape[0])
        g = int(codes.max() + 1) if len(codes) else 0
        if g < diff.shape[0]:  # the clusters are the units: each one the mean of its pairs
            xa, xb, diff = (_cluster_means(v, codes, g) for v in (xa, xb, diff))
    n = diff.shape[0]
    tested = np.any(diff != 0, axis=0)
    p = _paired_p(diff, test)
    q = np.full_like(p, np.nan)
    if tested.any():
        q[tested] = multipletests(p[tested], method="fdr_bh")[1]
    mean_diff = diff.mean(0)
    sd = diff.std(0, ddof=1) if n > 1 else np.full(diff.shape[1], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_z = np.where(tested, mean_diff / sd, np.nan)  # Cohen's d_z: mean paired difference / its SD
    return pd.DataFrame({"mean_a": xa.mean(0), "mean_b": xb.mean(0), "diff": mean_diff, "d_z": d_z, "p": p, "q": q,
                         "n_nonzero": (diff != 0).sum(0), "n_clusters": n, "active_a": active_a,
                         "active_b": active_b})


def random_directions(d_model: int, k: int, seed: int) -> np.ndarray:
    """``k`` random unit vectors of the residual stream ``[d_model, k]``, float64, from a seeded Gaussian."""
    g = np.random.default_rng(seed).standard_normal((d_model, k))
    return g / np.linalg.norm(g, axis=0, keepdims=True)


def random_direction_stats(ra: np.ndarray, rb: np.ndarray, *, k: int = 256, seed: int = 0,
                           test: str = "wilcoxon", clusters: Sequence[Any] | None = None) -> pd.DataFrame:
    """The control for a feature table: pooled residuals ``ra``/``rb`` [n_pairs, d_model] projected on ``k``
    seeded random unit directions, then `paired_stats` on the projections, one row per direction.

    A random direction means nothing; when many of them differ between the phrasings (p < alpha far above
    the nominal rate), the phrasings differ along most directions (length, wording) and "this feature
    differs" says little by itself. ``clusters``: as in `paired_stats` (the same units as the features).
    """
    u = random_directions(ra.shape[1], k, seed)
    out = paired_stats(ra @ u, rb @ u, test, clusters)
    out.insert(0, "direction", np.arange(k))
    return out


def sign_flip_pass_rates(ra: np.ndarray, rb: np.ndarray, *, k: int = 256, seed: int = 0, test: str = "wilcoxon",
                         alpha: float = 0.05, n_flips: int = 200,
                         clusters: Sequence[Any] | None = None) -> np.ndarray:
    """The null distribution of the random-direction pass rate: the share of the ``k`` random directions with
    p < ``alpha`` after swapping the two phrasings of a random half of the units, ``n_flips`` times.

    Under "no systematic difference between phrasing a and b" the swaps change nothing in distribution, so
    the observed rate's place among these rates is a permutation test of that hypothesis. ``clusters``: as in
    `paired_stats`; when pairs cluster, whole clusters (their mean differences) are swapped, the units of
    the observed test.
    """
    u = random_directions(ra.shape[1], k, seed)
    proj = (ra - rb) @ u  # [n_pairs, k]
    if clusters is not None:
        codes = cluster_stats.codes(clusters, proj.shape[0])
        g = int(codes.max() + 1) if len(codes) else 0
        if g < proj.shape[0]:
            proj = _cluster_means(proj, codes, g)  # [n_clusters, k]
    signs = np.where(np.random.default_rng(seed + 1).random((n_flips, proj.shape[0])) < 0.5, -1.0, 1.0)
    return np.array([float(np.nan_to_num(_paired_p(s[:, None] * proj, test), nan=1.0).__lt__(alpha).mean())
                     for s in signs])


def _clopper_pearson(count: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion; NaNs when n = 0."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return (math.nan, math.nan)
    lo, hi = proportion_confint(count, n, alpha=alpha, method="beta")
    return (float(0.0 if count == 0 else lo), float(1.0 if count == n else hi))


# ---- register features -----------------------------------------------------------------------------
FEATURE_COLUMNS = {
    "feature": "SAE feature index",
    "pool": "'question': mean activation over the question's tokens; 'last': activation at the answer position",
    "mean_a": ("mean pooled activation on phrasing a over the units (SAE activation units); units are the pairs, "
               "or, when pairs cluster (interp.data.clusters), the clusters, each the mean of its pairs"),
    "mean_b": "mean pooled activation on phrasing b over the same units (SAE activation units)",
    "diff": "mean(a - b) over the units (SAE activation units)",
    "d_z": D_Z_FORMULA + ", over the units",
    "p": ("two-sided p of the table's paired test (named in `test_name`) with the units in `units`, one method "
          "for every feature"),
    "q": "Benjamini-Hochberg FDR q over the tested features of the same pool (statsmodels fdr_bh)",
    "n_nonzero": "units (pairs, or clusters of pairs) with a non-zero a - b difference (the signed-rank test's n)",
    "n_clusters": ("units of the test: clusters of dependent pairs (shared question group, image, case, report or "
                   "phrasing; interp.data.clusters), equal to the number of pairs when no two pairs share one"),
    "p_random": ("empirical p against random residual directions: (1 + #{random |d_z| >= |d_z|}) / (1 + k), k "
                 "random unit directions of the same pooled residual stream; small = more register-selective "
                 "than a direction chosen at random"),
    "direction": "labels[0] when the feature fires more on phrasing a, labels[1] when more on b",
    "active_a": "fraction of the n_pairs phrasings a where the pooled activation is > 0 (per phrasing, not per unit)",
    "active_b": "fraction of the n_pairs phrasings b where the pooled activation is > 0 (per phrasing, not per unit)",
}


_TEST_NAMES = {"wilcoxon": "Wilcoxon signed-rank test", "ttest": "paired t-test"}


@dataclass(frozen=True, eq=False)
class FeatureTable(Result):
    """SAE features compared across the two phrasings of each pair; one row per (feature, pool).

    Columns (definitions in ``FEATURE_COLUMNS`` and ``to_dict()["columns"]``): feature, pool, mean_a,
    mean_b, diff (a - b), d_z (mean(a - b) / SD(a - b)), p (one paired test for every feature), q
    (Benjamini-Hochberg within each pool), n_nonzero, n_clusters, p_random (against random residual
    directions), direction, active_a/active_b. Sorted by q, then p, then |d_z| (the signed-rank test
    saturates when every unit moves the same way, so |d_z| orders those).

    Units (``units``): the ``n_clusters`` clusters of dependent pairs (`interp.data.clusters`: a shared question
    group, image, case, report or phrasing), each the mean of its pairs; the pairs themselves when no two
    share a cluster. ``selection_pairs`` keeps the pairs that selected the features, so `ablate_feature` can
    tell whether evaluation pairs share a cluster with them (not only an id).

    ``random``: the control, one row per (pool, random unit direction of the residual stream) with the same
    columns and test; `calibration()` says how often a random direction passes, beside how often a feature
    does. When random directions pass far above the nominal rate, the phrasings differ along most directions
    (length, wording) and "q < alpha" alone does not single out a register feature.
    """

    table: pd.DataFrame
    layer: int
    n_pairs: int
    test: str
    pools: tuple[str, ...]
    labels: tuple[str, str] = REGISTERS
    alpha: float = 0.05
    d_sae: int = 0
    model_name: str = ""
    sae_name: str = ""
    random: pd.DataFrame | None = None  # the random-direction control (pool, direction, stats columns)
    n_random: int = 0  # random directions per pool
    seed: int = 0  # seed of the random directions
    pair_ids: tuple[str, ...] = ()  # the pairs that selected these features (to check that evaluation is held out)
    test_name: str = ""  # the paired test in full
    random_null: dict[str, tuple[float, ...]] = field(default_factory=dict)  # sign-flip null of the pass rate
    n_clusters: int = 0  # units of the tests: clusters of dependent pairs (0: not recorded, an older table)
    units: str = ""  # what the units of the tests are, in words
    clusters: tuple[str, ...] = field(default=(), repr=False)  # cluster label of each pair, in pair_ids' order
    # the selection pairs themselves (their question texts, group, image, case and report): held-out checks
    # cluster them with the evaluation pairs; empty in a table from an older version (ids are checked then)
    selection_pairs: tuple[ParaphrasePair, ...] = field(default=(), repr=False)

    def significant(self, pool: str | None = None, *, beats_random: bool = False) -> pd.DataFrame:
        """Rows with q < alpha (of one pool, by default the first); ``beats_random``: also p_random < alpha."""
        t = self._pool(pool)
        keep = t["q"] < self.alpha
        if beats_random:
            keep &= t["p_random"] < self.alpha
        return t[keep]

    def top(self, n: int = 10, *, pool: str | None = None, direction: str | None = None) -> pd.DataFrame:
        """The ``n`` most significant features (of one pool, optionally one direction)."""
        t = self._pool(pool)
        if direction is not None:
            if direction not in self.labels:
                raise InterpError(f"direction={direction!r}: use one of {self.labels}")
            t = t[t["direction"] == direction]
        return t.head(n)

    def _pool(self, pool: str | None) -> pd.DataFrame:
        pool = pool or self.pools[0]
        if pool not in self.pools:
            raise InterpError(f"pool={pool!r} was not computed; this table has {self.pools}")
        return self.table[self.table["pool"] == pool]

    def calibration(self, pool: str | None = None) -> dict[str, Any]:
        """How often a feature passes q < alpha, beside how often a random residual direction passes the same
        cut, with exact (Clopper-Pearson) 95% intervals.

        ``p_cut``: the largest p that Benjamini-Hochberg rejected in this pool (alpha / n_tested when it
        rejected none); a random direction "passes" when its p is at or below it. ``random_p_rate``: random
        directions with p < alpha (about alpha when the phrasings do not differ systematically).
        The intervals take this table's data as fixed (directions drawn at random); how much the rate moves
        between datasets without any a/b difference is ``random_p_rate_null_*``, from swapping the phrasings of
        random halves of the pairs. ``confounded``: that sign-flip permutation test puts the observed rate
        above its null (``p_confounded`` < alpha).
        """
        pool = pool or self.pools[0]
        t = self._pool(pool)
        tested = t["p"].notna()
        n_tested, sig = int(tested.sum()), t["q"] < self.alpha
        n_sig = int(sig.sum())
        p_cut = float(t.loc[sig, "p"].max()) if n_sig else (self.alpha / n_tested if n_tested else math.nan)
        out: dict[str, Any] = {
            "pool": pool, "d_sae": self.d_sae, "n_tested": n_tested, "n_significant": n_sig,
            "frac_significant": n_sig / n_tested if n_tested else math.nan,
            "frac_significant_ci": _clopper_pearson(n_sig, n_tested), "p_cut": p_cut, "alpha": self.alpha,
            "n_random": 0, "random_n_pass": 0, "random_pass_rate": math.nan, "random_pass_rate_ci": (math.nan,) * 2,
            "random_n_p_below_alpha": 0, "random_p_rate": math.nan, "random_p_rate_ci": (math.nan,) * 2,
            "confounded": False, "n_significant_beating_random": int((sig & (t["p_random"] < self.alpha)).sum()),
            "interval": "exact Clopper-Pearson 95% (statsmodels proportion_confint, method='beta')",
            "n_pairs": self.n_pairs, "n_clusters": self.n_clusters or None, "units": self.units,
        }
        if self.random is not None and len(self.random):
            r = self.random[self.random["pool"] == pool]
            k = len(r)
            passed, below = int((r["p"] <= p_cut).sum()), int((r["p"] < self.alpha).sum())
            out.update(n_random=k, random_n_pass=passed, random_pass_rate=passed / k,
                       random_pass_rate_ci=_clopper_pearson(passed, k), random_n_p_below_alpha=below,
                       random_p_rate=below / k, random_p_rate_ci=_clopper_pearson(below, k),
                       random_median_abs_d_z=float(r["d_z"].abs().median()))
            null = np.asarray(self.random_null.get(pool, ()), dtype=float)
            if len(null):
                p_conf = float((1 + np.sum(null >= below / k)) / (1 + len(null)))
                out.update(random_p_rate_null_mean=float(null.mean()),
                           random_p_rate_null_q95=float(np.percentile(null, 95)), p_confounded=p_conf,
                           confounded=bool(p_conf < self.alpha),
                           confound_test=(f"sign-flip permutation test: the observed random_p_rate against {len(null)} "
                                          "re-randomised swaps of the phrasings within pairs, p = (1 + #{null >= "
                                          "observed}) / (1 + n_flips); confounded when p < alpha"))
        return out

    def to_dict(self) -> dict[str, Any]:
        from interp._results import jsonable

        return {**super().to_dict(), "columns": FEATURE_COLUMNS,
                "calibration": {pl: jsonable(self.calibration(pl)) for pl in self.pools}}

    def figure(self, pool: str | None = None):
        """Volcano plot: paired effect size d_z against -log10 p, significant features coloured by direction,
        the random residual directions (the control) in grey crosses."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        pools = [pool] if pool else list(self.pools)
        fig = make_subplots(rows=1, cols=len(pools), subplot_titles=[f"{p} pooling" for p in pools])
        colours = {self.labels[0]: "#1f77b4", self.labels[1]: "#d62728", "n.s.": "#bbbbbb"}
        for col, pl in enumerate(pools, start=1):
            t = self._pool(pl).dropna(subset=["p"])
            group = np.where(t["q"] < self.alpha, t["direction"], "n.s.")
            for name, colour in colours.items():
                s = t[group == name]
                fig.add_trace(go.Scattergl(
                    x=s["d_z"].clip(-20, 20), y=-np.log10(s["p"].clip(lower=1e-300)), mode="markers",
                    name=name if name == "n.s." else f"more on {name}", legendgroup=name, showlegend=col == 1,
                    marker=dict(color=colour, size=6 if name != "n.s." else 4),
                    customdata=np.stack([s["feature"], s["q"], s["mean_a"], s["mean_b"]], -1),
                    hovertemplate=("feature %{customdata[0]}<br>d_z %{x:.2f}<br>q %{customdata[1]:.2g}<br>"
                                   f"mean {self.labels[0]} %{{customdata[2]:.3g}}<br>"
                                   f"mean {self.labels[1]} %{{customdata[3]:.3g}}<extra></extra>")), row=1, col=col)
            if self.random is not None and len(self.random):
                r = self.random[(self.random["pool"] == pl) & self.random["p"].notna()]
                fig.add_trace(go.Scattergl(
                    x=r["d_z"].clip(-20, 20), y=-np.log10(r["p"].clip(lower=1e-300)), mode="markers",
                    name="random directions (control)", legendgroup="random", showlegend=col == 1,
                    marker=dict(color="#555555", symbol="x", size=5),
                    hovertemplate="random direction<br>d_z %{x:.2f}<br>-log10 p %{y:.2f}<extra></extra>"),
                    row=1, col=col)
            fig.update_xaxes(title_text=f"d_z ({self.labels[0]} - {self.labels[1]})", row=1, col=col)
        fig.update_yaxes(title_text="-log10 p", row=1, col=1)
        cal = self.calibration()
        ctrl = (f"; random directions pass {cal['random_pass_rate']:.0%}" if cal["n_random"] else "")
        fig.update_layout(title=dict(text=f"Register features at layer {self.layer} ({self._n_text()})",
                                     subtitle=dict(text=f"{_TEST_NAMES.get(self.test, self.test)}, BH q < "
                                                        f"{self.alpha} coloured{ctrl} (nominal 5%)")),
                          template="plotly_white", margin=dict(t=115))
        return fig

    def _n_text(self) -> str:
        return f"{self.n_pairs} pairs" + (f" in {self.n_clusters} clusters" if self.n_clusters else "")

    def __repr__(self) -> str:
        cal = self.calibration()
        lo, hi = cal["frac_significant_ci"]
        lines = [f"FeatureTable: layer {self.layer}, {self.d_sae} features x {len(self.pools)} pool(s), "
                 f"{self._n_text()} ({self.model_name}, {self.sae_name})",
                 f"  test: {self.test_name or self.test}; BH FDR within each pool; {D_Z_FORMULA}"
                 + (f"; units: {self.units}" if self.units else ""),
                 f"  {self.pools[0]} pooling: {cal['n_significant']} of {cal['n_tested']} tested features significant "
                 f"at q<{self.alpha} ({cal['frac_significant']:.1%}, exact 95% CI [{lo:.1%}, {hi:.1%}])"]
        if cal["n_random"]:
            rlo, rhi = cal["random_pass_rate_ci"]
            plo, phi = cal["random_p_rate_ci"]
            lines.append(f"  control: {cal['random_n_pass']} of {cal['n_random']} random residual directions pass the "
                         f"same cut p<={cal['p_cut']:.2g} ({cal['random_pass_rate']:.1%} [{rlo:.1%}, {rhi:.1%}]); "
                         f"{cal['random_n_p_below_alpha']} have p<{self.alpha} ({cal['random_p_rate']:.1%} "
                         f"[{plo:.1%}, {phi:.1%}], nominal {self.alpha:.0%}"
                         + (f"; {cal['random_p_rate_null_mean']:.1%} on average with the phrasings swapped at "
                            f"random, sign-flip p={cal['p_confounded']:.2g}" if "p_confounded" in cal else "")
                         + f"); {cal['n_significant_beating_random']} significant features also beat them "
                         f"(p_random<{self.alpha})")
            if cal["confounded"]:
                lines.append("  WARNING: random directions pass far above the nominal rate: the phrasings differ along "
                             "most directions (length, wording), so q<alpha alone does not make a feature "
                             "register-specific; look at p_random")
        else:
            lines.append("  control: none (n_random=0): how often a random direction would pass is unknown")
        top = ", ".join(f"{int(r.feature)} ({r.direction}, d_z={r.d_z:+.2f}, q={r.q:.2g}"
                        + (f", p_random={r.p_random:.2g}" if cal["n_random"] else "") + ")"
                        for r in self.significant().head(3).itertuples())
        if top:
            lines.append(f"  top {top}")
        return "\n".join(lines)


def _pair_cluster_labels(items: Sequence[ParaphrasePair], clusters: Sequence[Any] | None, where: str) -> list[str]:
    """One cluster label per pair: ``clusters`` as given, else `interp.data.clusters` of the pairs."""
    if clusters is None:
        return pair_clusters(items)
    if isinstance(clusters, str):
        raise InterpError(f"{where}: clusters={clusters!r} is one string; pass one label per pair")
    labels = [str(c) for c in clusters]
    if len(labels) != len(items):
        raise InterpError(f"{where}: {len(labels)} cluster labels for {len(items)} pairs; pass one label per pair "
                          "(or leave clusters= out for interp.data.clusters)")
    return labels


def _units_text(n: int, g: int) -> str:
    if g < n:
        return (f"the {g} clusters of the {n} pairs (pairs sharing a question group, image, case, report or "
                "phrasing, interp.data.clusters), each the mean of its pairs")
    return f"the {n} pairs (no two share a question group, image, case, report or phrasing)"


def _p_random(d_z: np.ndarray, random_d_z: np.ndarray) -> np.ndarray:
    """(1 + #{random |d_z| >= |d_z|}) / (1 + k) per feature; NaN for untested features or no random directions."""
    r = np.sort(np.abs(random_d_z[np.isfinite(random_d_z)]))
    if len(r) == 0:
        return np.full(len(d_z), np.nan)
    a = np.abs(d_z)
    ge = len(r) - np.searchsorted(r, a, side="left")
    return np.where(np.isfinite(a), (1 + ge) / (1 + len(r)), np.nan)


@exclusive
def register_features(model: Model, sae: Any, pairs: Sequence[ParaphrasePair], *, layer: int | None = None,
                      pool: Sequence[str] | str = ("question", "last"), test: PairedTest = "wilcoxon",
                      alpha: float = 0.05, labels: tuple[str, str] = REGISTERS, n_random: int = 256, seed: int = 0,
                      batch_size: int | None = None, progress: bool = True,
                      clusters: Sequence[str] | None = None) -> FeatureTable:
    """Every SAE feature's activation on both phrasings of every pair, with paired tests and FDR q-values.

    ``pool``: ``"question"`` (mean over the question's tokens) and/or ``"last"`` (the answer position).
    ``layer`` defaults to the one in the SAE's ``hook_name``. ``n_random`` seeded random unit directions of
    the residual stream, pooled and tested the same way, are the control (``n_random=0`` skips it).
    ``clusters``: one label per pair (default `interp.data.clusters`: shared question group, image, case,
    report or phrasing); pairs of one cluster are averaged and the clusters are the units of every test.
    Run it on the pairs that select features only (training pairs); evaluate elsewhere.
    """
    items = check_pairs(pairs, minimum=2)
    labels_cl = _pair_cluster_labels(items, clusters, "register_features")
    n_units = cluster_stats.n_clusters(labels_cl, len(items))
    if n_units < 2:
        raise InterpError(f"register_features: the {len(items)} pairs form {n_units} cluster of dependent pairs "
                          "(they share a question group, image, case, report or phrasing; interp.data.clusters), "
                          "and a paired test needs at least 2 independent units: pass pairs of more questions, "
                          "images or cases")
    layer = sae_layer(model, sae, layer)
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    if not pools or set(pools) - {"question", "last"}:
        raise InterpError(f"pool={pool!r}: use 'question', 'last' or both")
    if test not in ("wilcoxon", "ttest"):
        raise InterpError(f"test={test!r}: use 'wilcoxon' (signed-rank) or 'ttest' (paired t)")
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise InterpError(f"n_random={n_random!r}: pass a number of random directions >= 0 (256 by default)")
    if not 0 < alpha < 1:
        raise InterpError(f"alpha={alpha}: pass a level strictly between 0 and 1, e.g. 0.05")
    acts = capture(model, _pair_prompts(items), layers=[layer], positions=_question_and_last,
                   batch_size=batch_size, progress=progress)
    pooled = pooled_features(sae, acts, layer, pools)
    resid = pooled_residual(acts, layer, pools) if n_random else {}
    n = len(items)
    frames, controls = [], []
    null: dict[str, tuple[float, ...]] = {}
    for pl in pools:
        x = pooled[pl].numpy().astype(np.float64)
        stats = paired_stats(x[:n], x[n:], test, labels_cl)
        if n_random:
            r = resid[pl].numpy()
            rand = random_direction_stats(r[:n], r[n:], k=int(n_random), seed=seed, test=test, clusters=labels_cl)
            rand.insert(0, "pool", pl)
            controls.append(rand)
            null[pl] = tuple(sign_flip_pass_rates(r[:n], r[n:], k=int(n_random), seed=seed, test=test, alpha=alpha,
                                                  clusters=labels_cl))
            stats["p_random"] = _p_random(stats["d_z"].to_numpy(), rand["d_z"].to_numpy())
        else:
            stats["p_random"] = np.nan
        stats.insert(0, "pool", pl)
        stats.insert(0, "feature", np.arange(x.shape[1]))
        stats["direction"] = np.where(~stats["p"].isna(), np.where(stats["diff"] > 0, labels[0], labels[1]), "")
        frames.append(stats.assign(_abs=stats["d_z"].abs())
                      .sort_values(["q", "p", "_abs"], ascending=[True, True, False], na_position="last")
                      .drop(columns="_abs"))
    table = pd.concat(frames, ignore_index=True)
    random = pd.concat(controls, ignore_index=True) if controls else None
    meta = getattr(sae.cfg, "metadata", None)
    name = str(getattr(meta, "sae_id", None) or getattr(meta, "hook_name", None) or type(sae).__name__)
    return FeatureTable(table=table, layer=layer, n_pairs=n, test=test, pools=pools, labels=tuple(labels),
                        alpha=alpha, d_sae=int(sae.cfg.d_sae), model_name=model.name, sae_name=name,
                        random=random, n_random=int(n_random), seed=seed,
                        pair_ids=tuple(str(p.id) for p in items), test_name=_test_name(test),
                        random_null=null, n_clusters=n_units, units=_units_text(n, n_units),
                        clusters=tuple(labels_cl), selection_pairs=tuple(items))


# ---- one feature -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FeatureCard(Result):
    """What one SAE feature reads: its top prompts and tokens, and how it fires on each register."""

    feature: int
    layer: int
    top_prompts: pd.DataFrame  # prompt, register, question, max_act, token, position, context
    top_tokens: pd.DataFrame  # token, token_id, max_act, mean_act (where active), count, n_active
    by_register: dict[str, dict[str, float]]  # register -> n, mean_max, mean_act, frac_active
    per_prompt: pd.DataFrame  # prompt, register, max_act, mean_act, question
    model_name: str = ""

    def figure(self):
        """Per-prompt peak activation by register (top) and the top-activating prompts (below, each labelled
        with its peak token in context; a row of their own, so long labels never run into the box plot)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        tp = self.top_prompts.iloc[::-1]
        n_top = len(tp)
        fig = make_subplots(rows=2, cols=1, row_heights=[0.35, 0.65], vertical_spacing=0.12,
                            subplot_titles=["peak activation per prompt, by register",
                                            f"top {n_top} prompts (peak token in context)"])
        for reg, grp in self.per_prompt.groupby("register", sort=False):
            fig.add_trace(go.Box(x=grp["max_act"], name=str(reg), boxpoints="all", jitter=0.4, orientation="h",
                                 text=grp["question"], hovertemplate="%{text}<br>%{x:.3g}<extra></extra>"),
                          row=1, col=1)

        def short(text: str, n: int = 70) -> str:
            text = " ".join(str(text).split())
            return text if len(text) <= n else text[:n - 1] + "…"

        labels = [f"#{p} {short(c)}" for p, c in zip(tp["prompt"], tp["context"], strict=True)]
        fig.add_trace(go.Bar(x=tp["max_act"], y=labels, orientation="h", marker_color="#444", text=tp["register"],
                             textposition="inside", showlegend=False,
                             hovertemplate="%{y}<br>%{x:.3g}<extra></extra>"), row=2, col=1)
        fig.update_xaxes(title_text="peak activation", row=2, col=1)
        fig.update_yaxes(automargin=True)
        fig.update_layout(title=f"Feature {self.feature} at layer {self.layer} ({self.model_name})",
                          template="plotly_white", showlegend=False, height=max(520, 28 * n_top + 340), width=1000)
        return fig

    def __repr__(self) -> str:
        regs = ", ".join(f"{r}: fires on {v['frac_active']:.0%}, mean peak {v['mean_max']:.3g}"
                         for r, v in self.by_register.items())
        toks = ", ".join(repr(t) for t in self.top_tokens["token"].head(5))
        return f"FeatureCard(feature {self.feature} at layer {self.layer}; {regs}; top tokens {toks})"


@exclusive
def feature_card(model: Model, sae: Any, feature: int, prompts_or_pairs: Sequence[Any], *,
                 layer: int | None = None, top_k: int = 10, window: int = 6, batch_size: int | None = None,
                 progress: bool = True) -> FeatureCard:
    """One feature's card: top-activating prompts (with the peak token in context), top tokens, per-register stats.

    ``prompts_or_pairs``: paraphrase pairs (both phrasings, labelled formal/lay) or plain prompts.
    Special and image tokens are left out.
    """
    layer = sae_layer(model, sae, layer)
    if not 0 <= int(feature) < int(sae.cfg.d_sae):
        raise InterpError(f"feature={feature} is outside the SAE's {sae.cfg.d_sae} features")
    items = list(prompts_or_pairs)
    if not items:
        raise InterpError("prompts_or_pairs is empty: pass paraphrase pairs or prompts")
    if all(isinstance(p, ParaphrasePair) for p in items):
        prompts = _pair_prompts(items)
        registers = [REGISTERS[0]] * len(items) + [REGISTERS[1]] * len(items)
    else:
        prompts = [_as_prompt(p) for p in items]
        registers = ["prompt"] * len(prompts)
    acts = capture(model, prompts, layers=[layer], positions="all", exclude=("special", "image"),
                   batch_size=batch_size, progress=progress)
    act = _sae_encode(sae, acts[layer])[:, int(feature)]  # [rows]; only this column is kept
    prompt, pos, tok = acts.prompt_index, acts.position, acts.token_id
    n = len(prompts)
    peak = torch.full((n,), -float("inf")).scatter_reduce(0, prompt, act, "amax")
    mean = torch.zeros(n).index_add_(0, prompt, act) / torch.bincount(prompt, minlength=n).clamp(min=1)
    per_prompt = pd.DataFrame({"prompt": np.arange(n), "register": registers, "max_act": peak.numpy(),
                               "mean_act": mean.numpy(), "question": [p.question for p in prompts]})

    decode = model.tokenizer.decode
    counts = torch.bincount(prompt, minlength=n)
    starts = torch.cumsum(counts, 0) - counts  # capture() returns rows grouped by prompt, in prompt order
    rows = []
    for i in per_prompt.sort_values("max_act", ascending=False).head(top_k)["prompt"]:
        lo, hi = int(starts[i]), int(starts[i] + counts[i])
        j = lo + int(torch.argmax(act[lo:hi]))
        a, b = max(lo, j - window), min(hi, j + window + 1)
        context = (decode(tok[a:j].tolist()) + "[[" + decode([int(tok[j])]) + "]]" + decode(tok[j + 1:b].tolist()))
        rows.append({"prompt": int(i), "register": registers[i], "question": prompts[i].question,
                     "max_act": float(act[j]), "token": decode([int(tok[j])]), "position": int(pos[j]),
                     "context": context.replace("\n", " ")})
    top_prompts = pd.DataFrame(rows, columns=["prompt", "register", "question", "max_act", "token", "position",
                                              "context"])

    tokens = pd.DataFrame({"token_id": tok.numpy(), "act": act.numpy()})
    grouped = tokens.groupby("token_id")["act"]
    top_tokens = pd.DataFrame({"max_act": grouped.max(), "count": grouped.size(),
                               "n_active": grouped.agg(lambda a: int((a > 0).sum())),
                               "mean_act": grouped.agg(lambda a: float(a[a > 0].mean()) if (a > 0).any() else 0.0)})
    top_tokens = top_tokens[top_tokens["max_act"] > 0].sort_values("max_act", ascending=False).head(top_k)
    top_tokens = top_tokens.reset_index()
    top_tokens.insert(0, "token", [decode([int(t)]) for t in top_tokens["token_id"]])

    by_register = {}
    for reg, grp in per_prompt.groupby("register", sort=False):
        by_register[str(reg)] = {"n": int(len(grp)), "mean_max": float(grp["max_act"].mean()),
                                 "mean_act": float(grp["mean_act"].mean()),
                                 "frac_active": float((grp["max_act"] > 0).mean())}
    return FeatureCard(feature=int(feature), layer=layer, top_prompts=top_prompts, top_tokens=top_tokens,
                       by_register=by_register, per_prompt=per_prompt, model_name=model.name)


# ---- causal check: the SAE spliced into the forward pass -------------------------------------------
def _splice_hook(sae: Any, feature: int, sel: Tensor, target: float | None):
    """Forward hook replacing the resid with (edited SAE reconstruction + SAE error) at the selected positions.

    Written as ``x + decode(f_edit) - decode(f)``, which is the reconstruction-plus-error splice rearranged:
    without an edit it adds exactly zero, so the forward pass is bit-for-bit unchanged.
    """
    dev, dt = sae.W_dec.device, sae.W_dec.dtype

    def hook(_module, _inputs, output):
        resid = layer_output(output)  # [batch, pos, d_model]
        mask = sel.to(resid.device)
        x = resid[mask].to(dev, dt)
        f = sae.encode(x)
        edited = f.clone()
        edited[:, feature] = 0.0 if target is None else target
        delta = sae.decode(edited) - sae.decode(f)
        resid[mask] = resid[mask] + delta.to(resid.device, resid.dtype)
        return output

    return hook


def _margin(model: Model, hidden: Tensor) -> Tensor:
    """logit(yes) - logit(no) of final-norm hidden states ``[rows, d_model]``: ``[rows]`` float32 on the CPU."""
    logits = project(model, hidden, list(model.answer_ids)).float()
    return (logits[:, 0] - logits[:, 1]).cpu()


def _answer_margins(model: Model, prompts: Sequence[Prompt], *, layer: int, hook_for: Any, positions: str,
                    batch_size: int, bar: tqdm) -> Tensor:
    """Margins of ``prompts`` with an optional per-batch hook on ``layer`` (``hook_for(sel) -> hook`` or None)."""
    exclude = ("special", "image") if positions == "all" else ()
    out = torch.empty(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].question) + len(prompts[i].context or ""))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = model.encode([prompts[i] for i in idx])
        handle = None
        if hook_for is not None:
            sel = position_mask(model, batch, positions, exclude)
            handle = model.layers[layer].register_forward_hook(hook_for(sel))
        try:
            out[idx] = _margin(model, last_hidden(model, batch))
        finally:
            if handle is not None:
                handle.remove()
        bar.update(len(idx))
    return out


def _newcombe_paired(table: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """95% interval for p_after - p_before of paired binary outcomes, Newcombe (1998) method 10: Wilson score
    intervals of both margins combined with a correction for their correlation (as in Altman et al. 2000,
    "Statistics with confidence", ch. 6). ``table[i, j]``: pairs with before = (i == 0), after = (j == 0)."""
    from statsmodels.stats.proportion import proportion_confint

    (r, s), (t, u) = np.asarray(table, dtype=float)
    n = r + s + t + u
    if n == 0:
        return (math.nan, math.nan)
    p1, p2 = (r + s) / n, (r + t) / n  # before, after
    l1, u1 = proportion_confint(r + s, n, alpha=alpha, method="wilson")
    l2, u2 = proportion_confint(r + t, n, alpha=alpha, method="wilson")
    phi = 0.0
    denom = (r + s) * (t + u) * (r + t) * (s + u)
    if denom > 0:
        b = r * u - s * t
        c = b - n / 2 if b > n / 2 else (b if b < 0 else 0.0)
        phi = c / math.sqrt(denom)
    d = p1 - p2
    lower = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = d + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return (float(-upper), float(-lower))  # after - before


def _signed_rank(change: np.ndarray) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p of per-pair changes and the method used (zeros dropped)."""
    from scipy import stats

    nz = change[change != 0]
    if len(nz) == 0:
        return 1.0, "no pair changed"
    exact = len(nz) <= 50 and len(np.unique(np.abs(nz))) == len(nz)
    method = "exact" if exact else "asymptotic"
    res = stats.wilcoxon(nz, method=method, correction=not exact)
    what = ("exact null" if exact else "normal approximation with tie and continuity correction")
    return float(res.pvalue), f"{what}, {len(nz)} non-zero changes (zeros dropped)"


def _boot_mean_ci(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int,
                  alpha: float = 0.05) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile bootstrap over pairs: 95% intervals of mean(after - before) and of mean(after)/mean(before) - 1."""
    n = len(before)
    if n < 2 or n_boot < 1:
        return (math.nan, math.nan), (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    mb, ma = before[idx].mean(1), after[idx].mean(1)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    change = tuple(float(v) for v in np.percentile(ma - mb, q))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = ma / mb - 1
    rel = rel[np.isfinite(rel)]
    relative = tuple(float(v) for v in np.percentile(rel, q)) if len(rel) else (math.nan, math.nan)
    return change, relative  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class FeatureAblation(Result):
    """Margins, flips and accuracy of every evaluation pair before and after editing one SAE feature inside the
    forward pass, with intervals, named paired tests and a random-feature control.

    Flip rate: share of pairs whose decisions differ after polarity correction; margin diff: mean over pairs
    of |margin_a - corrected margin_b| in logits (margin = logit(yes) - logit(no)); all on ``n_pairs`` pairs
    in ``n_clusters`` clusters of dependent pairs, named in ``evaluated_on``. When pairs cluster, the clusters
    are the units of every test and interval; ``tests`` names the test or interval behind every number.
    """

    feature: int
    layer: int
    mode: str
    positions: str
    n_pairs: int
    flip_rate_before: float
    flip_rate_after: float
    margin_diff_before: float  # mean |margin_a - corrected margin_b|, logits
    margin_diff_after: float
    accuracy_before: float | None
    accuracy_after: float | None
    p_flip: float  # exact McNemar test on the paired flips (its cluster sign-flip version when pairs cluster)
    p_margin_diff: float  # Wilcoxon signed-rank on the per-pair change of |margin diff| (cluster sign-flip: clusters)
    pairs: pd.DataFrame  # id, cluster, margin_a/b before/after (b polarity-corrected), flip and diff before/after
    clamp_values: dict[str, float] = field(default_factory=dict)  # mode="clamp": value set on each register
    model_name: str = ""
    evaluated_on: str = ""  # which pairs were used, and whether they are held out from the selection
    held_out: bool | None = None  # None: the selection pairs were not given
    flip_rate_ci_before: tuple[float, float] = (math.nan, math.nan)  # Clopper-Pearson 95% (Korn-Graubard n_eff)
    flip_rate_ci_after: tuple[float, float] = (math.nan, math.nan)
    flips_removed: int = 0  # pairs that flipped before and not after
    flips_added: int = 0  # pairs that flipped after and not before
    flip_rate_change: float = math.nan  # after - before
    flip_rate_change_ci: tuple[float, float] = (math.nan, math.nan)  # Newcombe paired (cluster bootstrap), 95%
    margin_diff_change: float = math.nan  # mean over pairs of (|diff| after - |diff| before), logits
    margin_diff_change_ci: tuple[float, float] = (math.nan, math.nan)  # bootstrap over pairs (clusters), 95%
    margin_diff_relative: float = math.nan  # margin_diff_after / margin_diff_before - 1
    margin_diff_relative_ci: tuple[float, float] = (math.nan, math.nan)
    random_control: pd.DataFrame | None = None  # feature, size, margin_diff_change, flip_rate_change per random arm
    p_random: float = math.nan  # (1 + #{random margin_diff_change <= this one}) / (1 + k), one-sided
    rank_among_random: int = 0  # 1 = the largest reduction of mean |margin diff| among the feature and k random
    tests: dict[str, str] = field(default_factory=dict)
    n_boot: int = 0
    seed: int = 0
    n_clusters: int = 0  # clusters of dependent pairs (interp.data.clusters); 0: not recorded

    def _names(self) -> dict[str, str]:
        """Short names of the tests and intervals behind the printed numbers."""
        g = self.n_clusters
        if 0 < g < self.n_pairs:
            boot = f"paired cluster bootstrap over {g} clusters, 95%"
            return {"n": f"{self.n_pairs} pairs in {g} clusters", "flip_ci": f"Clopper-Pearson 95%, Korn-Graubard "
                    f"effective n over {g} clusters", "change_ci": boot, "margin_ci": boot,
                    "flip_test": f"exact clustered McNemar (sign-flip test over {g} clusters)",
                    "margin_test": f"cluster sign-flip test over {g} clusters"}
        return {"n": f"{self.n_pairs} pairs" + (f" in {g} clusters" if g else ""), "flip_ci": "Clopper-Pearson 95%",
                "change_ci": "Newcombe paired 95%", "margin_ci": "bootstrap over pairs 95%",
                "flip_test": "exact McNemar", "margin_test": "Wilcoxon signed-rank"}

    def figure(self):
        """Per-pair |margin difference| before vs after (left); the change in mean |margin diff| of this feature
        against the random-feature control (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        t = self.pairs
        fig = make_subplots(rows=1, cols=2, subplot_titles=["|margin difference| per pair (logits)",
                                                            "change in mean |margin diff|: feature vs random"])
        top = float(max(t["diff_before"].max(), t["diff_after"].max(), 1e-6))
        fig.add_trace(go.Scatter(x=t["diff_before"], y=t["diff_after"], mode="markers", text=t["id"],
                                 marker=dict(color=np.where(t["flip_before"] != t["flip_after"], "#d62728",
                                                            "#1f77b4")),
                                 hovertemplate="%{text}<br>before %{x:.3g}<br>after %{y:.3g}<extra></extra>",
                                 name="pairs"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dot", color="#999"),
                                 showlegend=False), row=1, col=1)
        if self.random_control is not None and len(self.random_control):
            fig.add_trace(go.Box(y=self.random_control["margin_diff_change"], name="random features",
                                 boxpoints="all", marker_color="#888"), row=1, col=2)
        lo, hi = self.margin_diff_change_ci
        fig.add_trace(go.Scatter(x=[f"feature {self.feature}"], y=[self.margin_diff_change], mode="markers",
                                 marker=dict(symbol="diamond", size=12, color="black"), name="this feature (95% CI)",
                                 error_y=dict(type="data", symmetric=False, array=[hi - self.margin_diff_change],
                                              arrayminus=[self.margin_diff_change - lo])), row=1, col=2)
        fig.update_xaxes(title_text="before", row=1, col=1)
        fig.update_yaxes(title_text="after", row=1, col=1)
        fig.update_yaxes(title_text="after - before (logits)", row=1, col=2)
        import textwrap

        ml, mh = self.margin_diff_change_ci
        names = self._names()
        sub = "<br>".join(textwrap.wrap(
            f"{names['n']}: mean |margin diff| change {self.margin_diff_change:+.3g} [{ml:+.3g}, {mh:+.3g}] logits "
            f"({names['margin_ci']}), {names['margin_test']} p={self.p_margin_diff:.2g}, random-feature control "
            f"p={self.p_random:.2g}; flip rate {self.flip_rate_before:.1%} -> {self.flip_rate_after:.1%}, "
            f"{names['flip_test']} p={self.p_flip:.2g}; {self.evaluated_on}", 120))
        n_lines = sub.count("<br>") + 1
        fig.update_layout(title=dict(text=f"{self.mode} feature {self.feature} at layer {self.layer}",
                                     subtitle=dict(text=sub, font=dict(size=12)), yref="container", y=1,
                                     yanchor="top", pad=dict(t=14)),
                          margin=dict(t=80 + 16 * n_lines), height=520 + 16 * n_lines, width=1000,
                          legend=dict(orientation="h", y=-0.15), template="plotly_white")
        return fig

    def __repr__(self) -> str:
        fb, fa = self.flip_rate_ci_before, self.flip_rate_ci_after
        cl, ch = self.flip_rate_change_ci
        ml, mh = self.margin_diff_change_ci
        rl, rh = self.margin_diff_relative_ci
        names = self._names()
        lines = [f"FeatureAblation: {self.mode} feature {self.feature} at layer {self.layer} ({self.positions} "
                 f"positions), {names['n']}; {self.evaluated_on}",
                 f"  flip rate (share of pairs) {self.flip_rate_before:.1%} [{fb[0]:.1%}, {fb[1]:.1%}] -> "
                 f"{self.flip_rate_after:.1%} [{fa[0]:.1%}, {fa[1]:.1%}] ({names['flip_ci']}); change "
                 f"{self.flip_rate_change:+.1%} [{cl:+.1%}, {ch:+.1%}] ({names['change_ci']}); {self.flips_removed} "
                 f"flips removed, {self.flips_added} added (pairs): {names['flip_test']} p={self.p_flip:.2g}",
                 f"  mean |margin diff| {self.margin_diff_before:.3f} -> {self.margin_diff_after:.3f} logits, change "
                 f"{self.margin_diff_change:+.3f} [{ml:+.3f}, {mh:+.3f}] ({self.margin_diff_relative:+.1%} "
                 f"[{rl:+.1%}, {rh:+.1%}]; {names['margin_ci']}): {names['margin_test']} p={self.p_margin_diff:.2g}"]
        if self.random_control is not None and len(self.random_control):
            r = self.random_control["margin_diff_change"]
            lines.append(f"  random-feature control ({len(r)} alive features of similar size): change in mean |margin "
                         f"diff| median {r.median():+.3f} [{r.min():+.3f}, {r.max():+.3f}] logits; this feature ranks "
                         f"{self.rank_among_random} of {len(r) + 1}, p_random={self.p_random:.2g} (one-sided, "
                         f"(1 + #random <= it) / (1 + k))")
        else:
            lines.append(f"  random-feature control: {self.tests.get('random_control', 'not run')}")
        return "\n".join(lines)


def _feature_means(sae: Any, acts: Activations, layer: int, is_a: Tensor,
                   chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Mean activation of every feature over phrasing-a rows and phrasing-b rows, and each feature's count of
    rows where it fires: three ``[d_sae]`` float64 tensors, streamed (never ``[rows, d_sae]`` at once)."""
    rows = acts[layer]
    d_sae = int(sae.cfg.d_sae)
    sum_a, sum_b, fired = (torch.zeros(d_sae, dtype=torch.float64) for _ in range(3))
    for s in range(0, rows.shape[0], chunk):
        f = _sae_encode(sae, rows[s:s + chunk]).double()  # [chunk, d_sae]
        a = is_a[s:s + chunk]
        sum_a += f[a].sum(0)
        sum_b += f[~a].sum(0)
        fired += (f != 0).sum(0)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    return sum_a / max(n_a, 1), sum_b / max(n_b, 1), fired


_LINKS = "a question group, image, case, report or phrasing"  # what interp.data.clusters links pairs by


def _selection_overlap(items: list[ParaphrasePair], selection: Any,
                       chosen: str = "the feature") -> tuple[bool | None, str]:
    """Whether the evaluation pairs are held out from the pairs that selected ``chosen``, in words.

    ``selection``: a `FeatureTable`, a `LayerSelection` (its ``selection_pairs``) or the pairs themselves. An
    evaluation pair is in-sample when it has a selection pair's id or shares a cluster with one:
    `interp.data.clusters` over the selection and evaluation pairs together (a shared question group, image,
    case, report or phrasing), so a renamed copy of a selection pair, or another phrasing of its question,
    is caught. A `FeatureTable` from an older version records only ids: those are compared, with a warning.
    """
    from interp.layers import LayerSelection

    n = len(items)
    if selection is None:
        return None, (f"evaluated on {n} pairs; selection pairs not given (selection=), so whether they are held out "
                      "is unknown")
    if isinstance(selection, LayerSelection):
        if not selection.selection_pairs:
            return None, (f"evaluated on {n} pairs; the layers were chosen by hand or the LayerSelection records no "
                          "pairs, so whether they are held out is unknown")
        selection = list(selection.selection_pairs)
    if isinstance(selection, FeatureTable) and not selection.selection_pairs:
        sel_ids = set(selection.pair_ids)
        if not sel_ids:
            return None, f"evaluated on {n} pairs; the FeatureTable records no pair ids, held out unknown"
        warnings.warn("ablate_feature: this FeatureTable records only the ids of the pairs that selected its features "
                      "(it was made by an older interp version or by hand), so held-out is checked by pair id "
                      f"alone: a renamed pair, or one sharing {_LINKS} with a selection pair, is not caught. Pass "
                      "selection=<the selection pairs> or rebuild the table with register_features", stacklevel=3)
        overlap = [p.id for p in items if str(p.id) in sel_ids]
        m, how = len(sel_ids), " (checked by pair id only: the FeatureTable records no selection pairs)"
        if not overlap:
            return True, f"held out: {n} evaluation pairs, none among the {m} pairs that selected {chosen}{how}"
    else:
        sel = list(selection.selection_pairs) if isinstance(selection, FeatureTable) else check_pairs(selection)
        m, how = len(sel), ""
        sel_ids = {str(p.id) for p in sel}
        # ids play no part in the clustering; unique ones keep the labels of the two sets apart
        labels = pair_clusters([dataclasses.replace(p, id=f"selection-{i}") for i, p in enumerate(sel)]
                               + [dataclasses.replace(p, id=f"evaluation-{i}") for i, p in enumerate(items)])
        shared = set(labels[:m])
        overlap = [p.id for p, c in zip(items, labels[m:], strict=True) if c in shared or str(p.id) in sel_ids]
    if overlap:
        return False, (f"IN-SAMPLE: {len(overlap)} of the {n} evaluation pairs share an id or a cluster ({_LINKS}) "
                       f"with the {m} pairs that selected {chosen} (e.g. {overlap[:3]}){how}; pass held-out pairs "
                       "(interp.data.split keeps clusters on one side)")
    return True, (f"held out: {n} evaluation pairs, none among the {m} pairs that selected {chosen} or sharing "
                  f"{_LINKS} with them{how}")


@exclusive
def ablate_feature(model: Model, sae: Any, pairs: Sequence[ParaphrasePair], *, feature: int,
                   layer: int | None = None, mode: Literal["zero", "clamp"] = "zero",
                   positions: Literal["all", "question", "last"] = "all", selection: Any = None,
                   n_random: int = 20, n_boot: int = 2000, seed: int = 0, batch_size: int | None = None,
                   progress: bool = True, clusters: Sequence[str] | None = None) -> FeatureAblation:
    """Zero one SAE feature (or clamp it to the other register's mean) inside the forward pass; report answers.

    ``pairs`` are the evaluation pairs; ``selection`` (the `FeatureTable` or the pairs that chose the feature)
    lets the result say whether they are held out (evaluating on the selecting pairs is in-sample and warns).
    The SAE is spliced in at ``layer`` as reconstruction + error term, so only the edited feature changes the
    residual stream. ``positions``: where to edit ("all" real tokens except special/image ones, the
    "question" tokens, or the "last" token). ``clamp`` sets phrasing a's feature to its mean on phrasing b
    (over the same positions of these prompts) and vice versa. Control: ``n_random`` alive features of
    similar size (mean activation x decoder norm at the edited positions) are edited the same way.

    ``clusters``: one label per pair (default `interp.data.clusters`: shared question group, image, case,
    report or phrasing). When pairs cluster, clusters are the units: flip-rate intervals take the Korn-Graubard
    effective n, flips and |margin diff| changes are tested by the cluster sign-flip test (the exact McNemar
    test over clusters), and change intervals come from a paired cluster bootstrap. With one pair per cluster
    the pairs are the units (exact McNemar, Clopper-Pearson, Newcombe, Wilcoxon, bootstrap over pairs).
    """
    from statsmodels.stats.contingency_tables import mcnemar

    items = check_pairs(pairs)
    layer = sae_layer(model, sae, layer)
    feature = int(feature)
    if not 0 <= feature < int(sae.cfg.d_sae):
        raise InterpError(f"feature={feature} is outside the SAE's {sae.cfg.d_sae} features")
    if mode not in ("zero", "clamp"):
        raise InterpError(f"mode={mode!r}: use 'zero' or 'clamp' (to the other register's mean)")
    if positions not in ("all", "question", "last"):
        raise InterpError(f"positions={positions!r}: use 'all', 'question' or 'last'")
    for name, v in (("n_random", n_random), ("n_boot", n_boot)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InterpError(f"{name}={v!r}: pass a whole number >= 0")
    cl = _pair_cluster_labels(items, clusters, "ablate_feature")
    held_out, evaluated_on = _selection_overlap(items, selection)
    if held_out is False:
        warnings.warn(f"ablate_feature: {evaluated_on}", stacklevel=2)
    batch_size = batch_size or (16 if model.device.type == "cuda" else 8)
    prompts_a = [p.prompt_a() for p in items]
    prompts_b = [p.prompt_b() for p in items]
    n = len(items)

    mean_a = mean_b = fired = None
    if mode == "clamp" or n_random:
        exclude = ("special", "image") if positions == "all" else ()
        acts = capture(model, prompts_a + prompts_b, layers=[layer], positions=positions, exclude=exclude,
                       batch_size=batch_size, progress=progress)
        mean_a, mean_b, fired = _feature_means(sae, acts, layer, acts.prompt_index < n)

    def clamp_for(f: int) -> dict[str, float]:
        return {} if mode == "zero" else {"a": float(mean_b[f]), "b": float(mean_a[f])}

    g = cluster_stats.n_clusters(cl, n)
    clustered = g < n
    size = f"n = {n} pairs in {g} clusters"
    if clustered:
        boot_name = (f"95% paired cluster bootstrap percentile interval ({n_boot} resamples of the {g} clusters, seed "
                     f"{seed}; interp.stats.cluster_bootstrap), {size}")
        tests = {"p_flip": ("exact clustered McNemar: cluster sign-flip test on the per-pair flip changes after - "
                            f"before, cluster sums (interp.stats.sign_flip_test), two-sided, {size}; unit: clusters"),
                 "flip_rate_ci": f"{cluster_stats.proportion_ci_method(cl, n)} (interp.stats.proportion_ci), {size}",
                 "flip_rate_change_ci": f"{boot_name}, of the mean of flip after - flip before",
                 "margin_diff_change_ci": boot_name,
                 "margin_diff_relative_ci": "the same cluster bootstrap, of mean(after) / mean(before) - 1"}
    else:
        tests = {"p_flip": "exact McNemar test on the paired flips before/after (statsmodels mcnemar(exact=True)), "
                           f"two-sided, {size}; unit: pairs",
                 "flip_rate_ci": f"Clopper-Pearson exact 95% (statsmodels proportion_confint, method='beta'), {size}",
                 "flip_rate_change_ci": f"Newcombe (1998) method 10 for paired proportions, 95%, {size}",
                 "margin_diff_change_ci": f"95% percentile bootstrap over pairs ({n_boot} resamples, seed {seed}), {size}",
                 "margin_diff_relative_ci": "the same bootstrap, of mean(after) / mean(before) - 1"}

    bar = tqdm(total=4 * n, desc=f"ablate feature {feature}", unit="prompt", disable=not progress, leave=False)
    kw = dict(layer=layer, positions=positions, batch_size=batch_size, bar=bar)

    def edited(f: int) -> tuple[Tensor, Tensor]:
        c = clamp_for(f)
        return (_answer_margins(model, prompts_a, hook_for=lambda sel: _splice_hook(sae, f, sel, c.get("a")), **kw),
                _answer_margins(model, prompts_b, hook_for=lambda sel: _splice_hook(sae, f, sel, c.get("b")), **kw))

    with torch.inference_mode():
        before_a = _answer_margins(model, prompts_a, hook_for=None, **kw)
        before_b = _answer_margins(model, prompts_b, hook_for=None, **kw)
        after_a, after_b = edited(feature)
    bar.close()

    def consistency(ma: Tensor, mb: Tensor) -> Any:
        return ConsistencyReport.from_margins(items, ma.numpy(), mb.numpy(), n_boot=0)  # the study's definitions

    rep_before, rep_after = consistency(before_a, before_b), consistency(after_a, after_b)
    sign = torch.tensor([1.0 if p.same_polarity else -1.0 for p in items])
    t = pd.DataFrame({"id": [p.id for p in items], "cluster": cl,
                      "margin_a_before": before_a.numpy(), "margin_b_before": (before_b * sign).numpy(),
                      "margin_a_after": after_a.numpy(), "margin_b_after": (after_b * sign).numpy()})
    for when, rep in (("before", rep_before), ("after", rep_after)):
        t[f"flip_{when}"] = rep.table["flip"].to_numpy()
        t[f"diff_{when}"] = rep.table["margin_diff"].to_numpy()
    table = pd.crosstab(t["flip_before"], t["flip_after"]).reindex(index=[True, False], columns=[True, False],
                                                                  fill_value=0).to_numpy()
    d_before, d_after = t["diff_before"].to_numpy(float), t["diff_after"].to_numpy(float)
    flip_b, flip_a = t["flip_before"].to_numpy(float), t["flip_after"].to_numpy(float)
    n_flip_b, n_flip_a = int(flip_b.sum()), int(flip_a.sum())
    if clustered:  # clusters are the units, as in ConsistencyComparison
        p_flip = cluster_stats.sign_flip_test(flip_a - flip_b, cl, seed=seed).p
        margin = cluster_stats.sign_flip_test(d_after - d_before, cl, seed=seed)
        p_diff = margin.p
        tests["p_margin_diff"] = ("cluster sign-flip test on the per-pair change of |margin diff|, cluster sums "
                                  f"(interp.stats.sign_flip_test, {margin.method}; {margin.n_clusters} clusters "
                                  f"changed), two-sided, {size}; unit: clusters")
        nan2 = (math.nan, math.nan)
        ci_b, ci_a = (cluster_stats.proportion_ci(v, cl) or nan2 if g > 1 else nan2 for v in (flip_b, flip_a))
        boot = cluster_stats.cluster_bootstrap(
            np.stack([np.ones(n), flip_b, flip_a, d_before, d_after], 1), cl,
            {"flip": lambda s: (s[:, 2] - s[:, 1]) / s[:, 0], "change": lambda s: (s[:, 4] - s[:, 3]) / s[:, 0],
             "relative": lambda s: s[:, 4] / s[:, 3] - 1}, n_boot=n_boot, seed=seed)
        flip_change_ci, change_ci, rel_ci = (boot[k] or nan2 for k in ("flip", "change", "relative"))
        if not (flip_a != flip_b).any():  # the bootstrap's [0, 0]: a bound on the share of pairs that change
            bound, how = cluster_stats.no_change_interval((flip_a != flip_b).astype(float), cl, unit="pairs")
            flip_change_ci = bound or nan2
            tests["flip_rate_change_ci"] = f"{how} (interp.stats.no_change_interval), {size}"
    else:
        p_flip = float(mcnemar(table, exact=True).pvalue)
        p_diff, how = _signed_rank(d_after - d_before)
        tests["p_margin_diff"] = (f"Wilcoxon signed-rank on the per-pair change of |margin diff|, two-sided, {how}, "
                                  f"{size}; unit: pairs")
        ci_b, ci_a = _clopper_pearson(n_flip_b, n), _clopper_pearson(n_flip_a, n)
        flip_change_ci = _newcombe_paired(table)
        change_ci, rel_ci = _boot_mean_ci(d_before, d_after, n_boot, seed)
    change = float((d_after - d_before).mean())
    rel = float(d_after.mean() / d_before.mean() - 1) if d_before.mean() > 0 else math.nan

    control, p_random, rank = None, math.nan, 0
    if n_random and fired is not None:
        dec = sae.W_dec.detach().double().norm(dim=1).cpu()
        size = ((mean_a + mean_b) / 2 * dec).numpy()  # mean size of what the edit removes, residual units
        alive = np.flatnonzero((fired.numpy() > 0) & (np.arange(len(size)) != feature))
        if size[feature] <= 0:
            tests["random_control"] = f"not run: feature {feature} never fires at the edited positions of these pairs"
        elif len(alive) == 0:
            tests["random_control"] = "not run: no other feature fires at the edited positions"
        else:
            gap = np.abs(np.log(np.maximum(size[alive], 1e-300)) - math.log(size[feature]))
            window = alive[np.argsort(gap, kind="stable")[:max(3 * int(n_random), 30)]]
            chosen = np.sort(np.random.default_rng(seed).choice(window, size=min(int(n_random), len(window)),
                                                                replace=False))
            rows = []
            bar = tqdm(total=2 * n * len(chosen), desc="random-feature control", unit="prompt",
                       disable=not progress, leave=False)
            kw["bar"] = bar
            with torch.inference_mode():
                for f in chosen:
                    ra, rb = edited(int(f))
                    rep = consistency(ra, rb)
                    rows.append({"feature": int(f), "size": float(size[f]),
                                 "margin_diff_change": float(rep.table["margin_diff"].mean() - d_before.mean()),
                                 "flip_rate_change": float(rep.table["flip"].mean() - t["flip_before"].mean())})
            bar.close()
            control = pd.DataFrame(rows)
            r = control["margin_diff_change"].to_numpy()
            p_random = float((1 + np.sum(r <= change)) / (1 + len(r)))
            rank = int(1 + np.sum(r < change))
            tests["random_control"] = (f"{len(chosen)} alive features (not {feature}) drawn (seed {seed}) from the "
                                       f"{len(window)} nearest in log size = mean activation x ||W_dec row|| at the "
                                       "edited positions, edited the same way on the same pairs")
            tests["p_random"] = ("(1 + #{random change in mean |margin diff| <= this feature's}) / (1 + k), one-sided: "
                                 "small when this feature reduces inconsistency more than random features")
    return FeatureAblation(
        feature=feature, layer=layer, mode=mode, positions=positions, n_pairs=n,
        flip_rate_before=n_flip_b / n, flip_rate_after=n_flip_a / n,
        margin_diff_before=float(d_before.mean()), margin_diff_after=float(d_after.mean()),
        accuracy_before=rep_before.accuracy, accuracy_after=rep_after.accuracy, p_flip=p_flip,
        p_margin_diff=p_diff, pairs=t, clamp_values=clamp_for(feature), model_name=model.name,
        evaluated_on=evaluated_on, held_out=held_out,
        flip_rate_ci_before=ci_b, flip_rate_ci_after=ci_a,
        flips_removed=int(table[0, 1]), flips_added=int(table[1, 0]), flip_rate_change=(n_flip_a - n_flip_b) / n,
        flip_rate_change_ci=flip_change_ci, margin_diff_change=change, margin_diff_change_ci=change_ci,
        margin_diff_relative=rel, margin_diff_relative_ci=rel_ci, random_control=control, p_random=p_random,
        rank_among_random=rank, tests=tests, n_boot=n_boot, seed=seed, n_clusters=g)
