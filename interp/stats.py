"""Statistics behind the consistency report: exact intervals, a cluster bootstrap and paired, clustered tests.

Pairs that share a question group, an image or a report are not independent units, so every interval and
test here takes one cluster label per unit (`interp.data.clusters`). docs/STATISTICS.md lists each quantity.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

LEVEL = 0.95  # every interval in the workbench is a 95% interval unless a caller asks otherwise
_BLOCK = 256  # bootstrap replicates drawn at a time (bounds memory at many clusters)


def codes(clusters: Sequence[Any] | None, n: int) -> np.ndarray:
    """Integer cluster codes 0..G-1 for ``n`` units (``None``: every unit is its own cluster)."""
    if clusters is None:
        return np.arange(n)
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} cluster labels for {n} units")
    _, inv = np.unique(np.asarray([str(c) for c in labels], dtype=object), return_inverse=True)
    return inv.reshape(-1)


def n_clusters(clusters: Sequence[Any] | None, n: int) -> int:
    return int(codes(clusters, n).max() + 1) if n else 0


# ---- proportions ---------------------------------------------------------------------------------------
def design_effect(values: Sequence[float], clusters: Sequence[Any] | None) -> float:
    """Kish design effect of a proportion: its cluster-robust (linearised ratio) variance over the binomial
    variance p(1-p)/n, truncated below at 1; 1 when every unit is its own cluster or p is 0 or 1."""
    y = np.asarray(values, dtype=float)
    n = len(y)
    c = codes(clusters, n)
    g = int(c.max() + 1) if n else 0
    p = float(y.mean()) if n else 0.0
    if g in (0, 1, n) or p in (0.0, 1.0):
        return 1.0
    y_g = np.bincount(c, weights=y, minlength=g)
    m_g = np.bincount(c, minlength=g).astype(float)
    var = g / (g - 1) * float(((y_g - p * m_g) ** 2).sum()) / n**2
    return max(1.0, var / (p * (1 - p) / n))


def _units(values: Sequence[float], what: str, binary: bool = False) -> np.ndarray:
    """``values`` as a float array, refused when a value is not finite (or, for a share, not 0 or 1): a NaN
    dropped or counted silently would change n or the count behind a printed number."""
    y = np.asarray(values, dtype=float).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(y))
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} non-finite value(s) (first at unit {bad[0]}); every unit needs a "
                         "number: drop the units whose values are missing, and say so beside the result")
    if binary:
        odd = np.flatnonzero((y != 0) & (y != 1))
        if len(odd):
            raise ValueError(f"{what}: value {y[odd[0]]:g} at unit {odd[0]} is not 0 or 1; a share counts "
                             "units that are 1 (True) among units that are 0 or 1")
    return y


def proportion_ci(values: Sequence[float], clusters: Sequence[Any] | None = None, *, method: str = "beta",
                  level: float = LEVEL) -> tuple[float, float] | None:
    """Interval for the share of 1s in ``values``: Clopper-Pearson (``"beta"``, exact) or Wilson.

    With clusters (some cluster holding more than one unit) the count and n are scaled by the design effect
    and the degrees-of-freedom factor (z / t_{G-1})^2 of Korn & Graubard (1998) before the interval is taken,
    so k successes in G clusters are not read as k independent ones. At 0 or n successes the design effect
    cannot be estimated and is taken as 1, the degrees-of-freedom factor still applied (the convention of
    NCHS's Data Presentation Standards for Proportions, Parker et al. 2017). One cluster holding every unit
    gives no interval (``None``): nothing measures the variation between clusters. Without clusters: the
    plain interval (statsmodels ``proportion_confint``): 0/36 -> [0, 9.7%], 1/36 -> [0.07%, 14.5%].
    Values must be 0 or 1 (a ValueError names the first that is not, or is NaN).
    """
    from scipy.stats import norm, t
    from statsmodels.stats.proportion import proportion_confint

    y = _units(values, "proportion_ci", binary=True)
    n = len(y)
    if n == 0:
        return None
    k = float(y.sum())
    c = codes(clusters, n)
    g = int(c.max() + 1)
    if g == 1 and n > 1:
        return None
    n_eff = float(n)
    if 1 < g < n:
        if 0 < k < n:
            n_eff = n / design_effect(y, c)
        n_eff *= (norm.ppf(0.5 + level / 2) / t.ppf(0.5 + level / 2, g - 1)) ** 2
        n_eff = min(n_eff, float(n))
    k_eff = k / n * n_eff
    lo, hi = proportion_confint(k_eff, n_eff, alpha=1 - level, method=method)
    return (float(max(0.0, lo)), float(min(1.0, hi)))


def proportion_ci_method(clusters: Sequence[Any] | None, n: int, method: str = "beta", *,
                         successes: float | None = None) -> str:
    """How `proportion_ci` computed its interval for ``n`` units in ``clusters`` (``successes``: the count,
    which decides whether a design effect could be estimated)."""
    name = {"beta": "Clopper-Pearson exact", "wilson": "Wilson score"}.get(method, method)
    g = n_clusters(clusters, n)
    if g == 0:
        return "none (no units)"
    if g == 1 and n > 1:
        return f"none (all {n} units in one cluster: no variation between clusters to measure)"
    if g == n:
        return f"{name} 95% interval"
    if successes is not None and successes in (0, n):
        return (f"{name} 95% interval, Korn-Graubard effective n over {g} clusters (design effect taken as 1 at "
                f"{int(successes)} of {n}, degrees of freedom adjusted)")
    return f"{name} 95% interval, Korn-Graubard effective n over {g} clusters"


def no_change_interval(changed: Sequence[float], clusters: Sequence[Any] | None = None, *, unit: str = "units",
                       level: float = LEVEL) -> tuple[tuple[float, float] | None, str]:
    """95% interval for the change of a share (before -> after, paired) when no unit changed, and its name.

    A paired (cluster) bootstrap then resamples nothing but zeros and gives [0, 0], a certainty the data cannot
    give. The change of a share is at most the share of units that change, so ``-u .. u``, where ``u`` is the
    upper limit of `proportion_ci` on that share (0 of n; Clopper-Pearson, or Korn-Graubard with clusters), holds
    the change with at least the stated confidence: 0 of 36 unclustered pairs gives +-9.7%. ``changed``: 0/1 per
    unit (all 0 here; a ValueError otherwise). None where `proportion_ci` gives none (one cluster)."""
    y = _units(changed, "no_change_interval", binary=True)
    if y.any():
        raise ValueError(f"no_change_interval: {int(y.sum())} of {len(y)} {unit} changed; bootstrap the change")
    bound = proportion_ci(y, clusters, level=level)
    method = proportion_ci_method(clusters, len(y), successes=0)
    if bound is None:
        return None, method
    return (-bound[1], bound[1]), (f"no {unit} changed (0 of {len(y)}): +- the upper limit of the {method} on the "
                                   f"share of {unit} that change (the change of a share cannot exceed it)")


# ---- the cluster bootstrap -----------------------------------------------------------------------------
def cluster_bootstrap(columns: np.ndarray | Sequence[Sequence[float]], clusters: Sequence[Any] | None,
                      statistics: Mapping[str, Callable[[np.ndarray], np.ndarray]], *, n_boot: int = 1000,
                      seed: int = 0, level: float = LEVEL) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of ``statistics`` under resampling whole clusters with replacement.

    ``columns`` is ``[n_units, k]``; each statistic maps the column sums of a resample (``[B, k]``, a column of
    ones gives the resampled n) to ``B`` values, so means, differences of means and ratios of means of paired
    columns are all resampled with the same clusters (a paired bootstrap). Every statistic shares one set of
    draws. Undefined (``None``) with fewer than two clusters, ``n_boot < 1`` or when most resamples give
    a non-finite value.
    """
    x = np.asarray(columns, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n = len(x)
    c = codes(clusters, n)
    g = int(c.max() + 1) if n else 0
    if n_boot < 1 or g < 2:
        return dict.fromkeys(statistics)
    sums = np.zeros((g, x.shape[1]))
    np.add.at(sums, c, x)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for start in range(0, n_boot, _BLOCK):
        w = rng.multinomial(g, np.full(g, 1.0 / g), size=min(_BLOCK, n_boot - start))  # [B, G] draws per cluster
        s = w @ sums  # [B, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, stat in statistics.items():
                draws[name].append(np.asarray(stat(s), dtype=float).reshape(-1))
    out: dict[str, tuple[float, float] | None] = {}
    for name, parts in draws.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        if len(v) < n_boot / 2:
            out[name] = None
            continue
        lo, hi = np.quantile(v, [0.5 - level / 2, 0.5 + level / 2])
        out[name] = (float(lo), float(hi))
    return out


def mean_ci(values: Sequence[float], clusters: Sequence[Any] | None = None, *, n_boot: int = 1000, seed: int = 0,
            level: float = LEVEL) -> tuple[float, float] | None:
    """Cluster-bootstrap percentile interval of the mean of ``values`` (units pooled within clusters)."""
    v = _units(values, "mean_ci")
    if len(v) < 2:
        return None
    return cluster_bootstrap(np.stack([v, np.ones_like(v)], 1), clusters, {"m": lambda s: s[:, 0] / s[:, 1]},
                             n_boot=n_boot, seed=seed, level=level)["m"]


# ---- paired tests --------------------------------------------------------------------------------------
class McNemar(NamedTuple):
    """Exact McNemar test on ``b`` pairs that changed one way and ``c`` the other."""

    b: int
    c: int
    p: float  # two-sided exact binomial (statsmodels ``mcnemar(exact=True)``)
    p_mid: float  # mid-p: the exact p less the probability of the observed split (Fagerland et al. 2013)


def mcnemar_exact(b: int, c: int) -> McNemar:
    """Exact McNemar (binomial test of b vs c at 1/2) and its mid-p version; 23 -> 7 flips as 16/0
    discordant pairs gives p = 2 * 0.5^16 = 3.1e-5."""
    from scipy.stats import binom
    from statsmodels.stats.contingency_tables import mcnemar

    b, c = int(b), int(c)
    if b + c == 0:
        return McNemar(b, c, 1.0, 1.0)
    p = float(mcnemar([[0, b], [c, 0]], exact=True).pvalue)
    lo = min(b, c)
    p_mid = 2 * float(binom.cdf(lo, b + c, 0.5)) - float(binom.pmf(lo, b + c, 0.5))
    return McNemar(b, c, p, float(min(1.0, p_mid)))


class SignFlip(NamedTuple):
    """Cluster sign-flip (randomisation) test of a paired difference."""

    statistic: float  # sum over units of the paired difference (other - baseline)
    p: float  # two-sided: P(|S*| >= |S|) when every cluster's difference has a random sign
    p_mid: float  # P(|S*| > |S|) + P(|S*| = |S|) / 2 (exact method only; else equal to p)
    n_clusters: int  # clusters with a non-zero difference (the others carry no information)
    method: str  # "exact" (convolution or enumeration) or "Monte Carlo, N sign draws"


def sign_flip_test(diff: Sequence[float], clusters: Sequence[Any] | None = None, *, n_perm: int = 20000,
                   seed: int = 0) -> SignFlip:
    """Paired test that the mean of ``diff`` is 0, resampling the sign of each cluster's summed difference.

    Under the null the two conditions are exchangeable within every cluster, so each cluster sum D_g is as
    likely to be -D_g. With integer differences (flips, correct answers: -1/0/1 per unit) the null law of
    S = sum_g e_g D_g is computed exactly by convolution; with one unit per cluster this is the exact McNemar
    test. Real-valued differences are enumerated exactly up to 16 non-zero clusters, else Monte Carlo.
    """
    d = _units(diff, "sign_flip_test")
    c = codes(clusters, len(d))
    g = int(c.max() + 1) if len(d) else 0
    dg = np.bincount(c, weights=d, minlength=g) if g else np.zeros(0)
    dg = dg[np.abs(dg) > 1e-12]
    s = float(dg.sum())
    m = len(dg)
    if m == 0:
        return SignFlip(s, 1.0, 1.0, 0, "exact")
    rounded = np.rint(dg)
    total = int(np.abs(rounded).sum())
    if np.allclose(dg, rounded, atol=1e-9) and m * (2 * total + 1) <= 5e7:
        law = np.zeros(2 * total + 1)  # P(S* = v) at index v + total
        law[total] = 1.0
        for v in np.abs(rounded).astype(int):
            new = np.zeros_like(law)
            new[v:] += 0.5 * law[:len(law) - v]
            new[:len(law) - v] += 0.5 * law[v:]
            law = new
        values = np.abs(np.arange(-total, total + 1))
        obs = abs(int(round(s)))
        p = float(law[values >= obs].sum())
        p_mid = float(law[values > obs].sum() + 0.5 * law[values == obs].sum())
        return SignFlip(s, min(1.0, p), min(1.0, p_mid), m, "exact")
    tol = 1e-9 * max(1.0, float(np.abs(dg).sum()))
    if m <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=m)))
        null = np.abs(signs @ dg)
        p = float((null >= abs(s) - tol).mean())
        p_mid = float((null > abs(s) + tol).mean() + 0.5 * (np.abs(null - abs(s)) <= tol).mean())
        return SignFlip(s, p, p_mid, m, "exact")
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 4096):
        signs = rng.choice((-1.0, 1.0), size=(min(4096, n_perm - start), m))
        hits += int((np.abs(signs @ dg) >= abs(s) - tol).sum())
    p = (1 + hits) / (1 + n_perm)  # the observed assignment counts as one draw (never p = 0)
    return SignFlip(s, p, p, m, f"Monte Carlo, {n_perm} sign draws")


def two_proportion_ztest(count_a: int, count_b: int, n_a: int, n_b: int) -> tuple[float, float]:
    """Unpaired two-proportion z-test with pooled variance (statsmodels ``proportions_ztest``), the study's test;
    equal proportions at 0 or 1 give z = 0, p = 1. 23 vs 7 of 158 gives p = 0.0021."""
    from statsmodels.stats.proportion import proportions_ztest

    pooled = (count_a + count_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        return 0.0, 1.0
    z, p = proportions_ztest(np.array([count_a, count_b]), np.array([n_a, n_b]))
    return float(z), float(p)


def fmt_ci(ci: tuple[float, float] | None, pct: bool) -> str:
    """`` [lo, hi]`` for a repr (empty when there is no interval)."""
    if ci is None:
        return ""
    return f" [{ci[0]:.1%}, {ci[1]:.1%}]" if pct else f" [{ci[0]:.3g}, {ci[1]:.3g}]"


__all__ = ["LEVEL", "McNemar", "SignFlip", "cluster_bootstrap", "design_effect", "fmt_ci", "mcnemar_exact",
           "mean_ci", "no_change_interval", "proportion_ci", "proportion_ci_method", "sign_flip_test",
           "two_proportion_ztest"]
