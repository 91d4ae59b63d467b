"""interp.stats against independent computations: exact intervals, McNemar, cluster sign-flip, cluster bootstrap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from interp import stats


@pytest.mark.parametrize("k, n, want", [(0, 36, (0.0, 0.0974)), (1, 36, (0.0007, 0.1453))])
def test_clopper_pearson_known_answers_at_small_counts(k, n, want):
    ci = stats.proportion_ci([1] * k + [0] * (n - k))
    assert ci == pytest.approx(want, abs=1e-4)
    exact = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert ci == pytest.approx((exact.low, exact.high), abs=1e-9)


def test_wilson_matches_scipy():
    ci = stats.proportion_ci([1] * 7 + [0] * 29, method="wilson")
    w = binomtest(7, 36).proportion_ci(0.95, method="wilson")
    assert ci == pytest.approx((w.low, w.high), abs=1e-9)


def test_clustered_proportion_interval_widens_with_the_design_effect():
    rng = np.random.default_rng(1)
    flips = np.repeat(rng.random(32) < 0.3, 5).astype(float)  # 32 clusters of 5 that flip together
    cl = np.repeat(np.arange(32), 5)
    assert stats.design_effect(flips, cl) == pytest.approx(5 * 32 / 31, rel=1e-9)  # all-or-none clusters
    assert stats.design_effect(flips, None) == 1.0
    naive, clustered = stats.proportion_ci(flips), stats.proportion_ci(flips, cl)
    assert clustered[0] < naive[0] and clustered[1] > naive[1]
    # close to the interval of 32 independent clusters (the effective sample), a little wider (t with 31 df)
    per_cluster = binomtest(int(flips[::5].sum()), 32).proportion_ci(0.95, method="exact")
    width = clustered[1] - clustered[0]
    assert (per_cluster.high - per_cluster.low) <= width < 1.15 * (per_cluster.high - per_cluster.low)
    assert "Korn-Graubard" in stats.proportion_ci_method(cl, len(cl))
    assert stats.proportion_ci_method(None, 10) == "Clopper-Pearson exact 95% interval"


def test_mcnemar_exact_and_mid_p():
    r = stats.mcnemar_exact(16, 0)  # 23 -> 7 flips on the same pairs, no pair newly flipping
    assert r.p == pytest.approx(2 * 0.5**16) and r.p == pytest.approx(3.1e-5, abs=1e-6)
    for b, c in [(16, 0), (5, 9), (12, 30), (4, 4), (0, 0)]:
        r = stats.mcnemar_exact(b, c)
        want = binomtest(b, b + c).pvalue if b + c else 1.0
        lo = min(b, c)
        mid = min(1.0, 2 * binom.cdf(lo, b + c, 0.5) - binom.pmf(lo, b + c, 0.5)) if b + c else 1.0
        assert (r.p, r.p_mid) == (pytest.approx(want), pytest.approx(mid))


def test_unpaired_z_test_known_answer():
    z, p = stats.two_proportion_ztest(23, 7, 158, 158)
    assert p == pytest.approx(0.0021, abs=5e-5) and z > 0
    assert stats.two_proportion_ztest(0, 0, 10, 10) == (0.0, 1.0)


@pytest.mark.parametrize("b, c", [(16, 0), (5, 9), (30, 31), (1, 0)])
def test_sign_flip_on_single_units_is_exact_mcnemar(b, c):
    diff = np.array([-1.0] * b + [1.0] * c + [0.0] * 20)
    r = stats.sign_flip_test(diff)
    m = stats.mcnemar_exact(b, c)
    assert r.method == "exact" and r.statistic == c - b and r.n_clusters == b + c
    assert (r.p, r.p_mid) == (pytest.approx(m.p), pytest.approx(m.p_mid))


def brute_force_sign_flip(diff, clusters):
    """Enumerate all 2^m sign assignments of the cluster sums (the definition of the test)."""
    sums = {}
    for d, c in zip(diff, clusters, strict=True):
        sums[c] = sums.get(c, 0.0) + d
    dg = np.array([v for v in sums.values() if abs(v) > 1e-12])
    null = np.array([abs(np.dot(s, dg)) for s in itertools.product((1, -1), repeat=len(dg))])
    obs = abs(dg.sum())
    return float((null >= obs - 1e-9).mean())


def test_sign_flip_over_clusters_matches_enumeration():
    rng = np.random.default_rng(0)
    diff = rng.choice([-1.0, 0.0, 0.0, 1.0], size=60)
    diff[:12] = -1.0  # a net improvement
    cl = rng.integers(0, 14, size=60)
    r = stats.sign_flip_test(diff, cl)
    assert r.method == "exact" and r.p == pytest.approx(brute_force_sign_flip(diff, cl))
    # clustering matters: 6 discordant units in 6 clusters vs in 3 clusters of 2
    six = np.array([-1.0] * 6 + [0.0] * 10)
    assert stats.sign_flip_test(six, list(range(16))).p == pytest.approx(2 * 0.5**6)
    assert stats.sign_flip_test(six, [0, 0, 1, 1, 2, 2, *range(3, 13)]).p == pytest.approx(2 * 0.5**3)


def test_sign_flip_real_valued_exact_and_monte_carlo():
    rng = np.random.default_rng(3)
    small = rng.normal(0.4, 1, 12)
    assert stats.sign_flip_test(small).p == pytest.approx(brute_force_sign_flip(small, range(12)))
    big = rng.normal(0.2, 1, 18)
    r = stats.sign_flip_test(big, n_perm=40000, seed=1)
    assert r.method.startswith("Monte Carlo") and r.p == pytest.approx(brute_force_sign_flip(big, range(18)), abs=0.01)
    assert stats.sign_flip_test(np.zeros(5)).p == 1.0


def test_cluster_bootstrap_resamples_whole_clusters():
    rng = np.random.default_rng(2)
    cluster_means = rng.normal(0, 1, 40)
    values = np.repeat(cluster_means, 6) + rng.normal(0, 0.05, 240)  # nearly constant within a cluster
    cl = np.repeat(np.arange(40), 6)
    lo, hi = stats.mean_ci(values, cl, n_boot=4000, seed=0)
    se = cluster_means.std(ddof=1) / np.sqrt(40)  # the standard error of 40 independent cluster means
    assert lo < values.mean() < hi and (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    naive = stats.mean_ci(values, None, n_boot=4000, seed=0)
    assert (naive[1] - naive[0]) < 0.6 * (hi - lo)  # ignoring the clusters understates the uncertainty
    assert stats.mean_ci(values, cl, n_boot=500, seed=4) == stats.mean_ci(values, cl, n_boot=500, seed=4)
    assert stats.mean_ci(values, np.zeros(240), n_boot=100) is None  # one cluster: no interval
    assert stats.mean_ci(values, cl, n_boot=0) is None


def test_paired_bootstrap_of_a_ratio_of_means():
    rng = np.random.default_rng(5)
    a = rng.gamma(2.0, 1.0, 300)
    b = 0.5 * a  # every value halved: the relative change is exactly -50% in every resample
    cols = np.stack([np.ones(300), a, b], 1)
    ci = stats.cluster_bootstrap(cols, None, {"rel": lambda s: s[:, 2] / s[:, 1] - 1,
                                              "delta": lambda s: (s[:, 2] - s[:, 1]) / s[:, 0]}, n_boot=300)
    assert ci["rel"] == pytest.approx((-0.5, -0.5))
    assert ci["delta"][0] < -0.5 * a.mean() < ci["delta"][1]


def test_one_cluster_holding_every_unit_gives_no_interval():
    y = [1] * 5 + [0] * 15
    assert stats.proportion_ci(y, ["img"] * 20) is None  # there was the plain interval, labelled Korn-Graubard
    assert stats.proportion_ci_method(["img"] * 20, 20).startswith("none (all 20 units in one cluster")
    assert stats.proportion_ci([1], ["img"]) == stats.proportion_ci([1])  # one unit: its own cluster


def test_zero_successes_in_clusters_keep_the_degrees_of_freedom_factor():
    """0 of 128 in 32 clusters: the design effect cannot be estimated (taken as 1), but the interval still
    takes t with 31 df, not the 128 units at face value: n_eff = 128 (z / t_31)^2, Clopper-Pearson at 0."""
    from scipy.stats import norm, t

    cl = np.repeat(np.arange(32), 4)
    n_eff = 128 * (norm.ppf(0.975) / t.ppf(0.975, 31)) ** 2
    hi = 1 - 0.025 ** (1 / n_eff)  # Clopper-Pearson upper bound at 0 successes, written out
    assert stats.proportion_ci(np.zeros(128), cl) == pytest.approx((0.0, hi), rel=1e-9)
    assert stats.proportion_ci(np.zeros(128), cl)[1] > stats.proportion_ci(np.zeros(128))[1]
    assert stats.proportion_ci(np.ones(128), cl) == pytest.approx((1 - hi, 1.0), rel=1e-9)
    assert "design effect taken as 1 at 0 of 128" in stats.proportion_ci_method(cl, 128, successes=0)


@pytest.mark.parametrize("fn, values, match", [
    (stats.proportion_ci, [1, 0, np.nan, 1], "non-finite value.*unit 2"),
    (stats.proportion_ci, [2, 0, 1], "value 2 at unit 0 is not 0 or 1"),
    (stats.sign_flip_test, [1.0, np.nan, 2.0], "non-finite value.*unit 1"),
    (stats.mean_ci, [1.0, np.inf, 2.0], "non-finite value.*unit 1")])
def test_missing_or_impossible_values_are_refused_not_dropped(fn, values, match):
    with pytest.raises(ValueError, match=match):
        fn(values)
