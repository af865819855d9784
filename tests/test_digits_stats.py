"""The confounded-digits statistics against scipy: t-tests, CIs, power, MDE, Holm, pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("scipy")
from msr_loss.benchmarks.digits_stats import (
    holm,
    minimum_detectable_effect,
    paired_difference,
    paired_test,
    pairs_needed,
    power,
    summarize,
    t_critical,
)
from scipy import stats


@pytest.mark.parametrize("n", [2, 3, 5, 8, 30])
@pytest.mark.parametrize("seed", range(3))
def test_paired_test_matches_scipy_ttest(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    before = rng.normal(50, 5, size=n)
    after = before + rng.normal(seed - 1, 2, size=n)
    mine = paired_test(list(after - before), "b", "a", "x")
    theirs = stats.ttest_rel(after, before)
    interval = stats.ttest_1samp(after - before, 0.0).confidence_interval(0.95)
    assert mine.df == n - 1 == theirs.df
    assert mine.t == pytest.approx(theirs.statistic, rel=1e-9)
    assert mine.p == pytest.approx(theirs.pvalue, rel=1e-9)
    assert mine.ci_low == pytest.approx(interval.low, rel=1e-9)
    assert mine.ci_high == pytest.approx(interval.high, rel=1e-9)
    assert mine.sd == pytest.approx(np.std(after - before, ddof=1), rel=1e-12)


def test_critical_values_of_few_degrees_of_freedom() -> None:
    assert t_critical(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_critical(3) == pytest.approx(3.182446, abs=1e-6)
    assert t_critical(1000) == pytest.approx(stats.norm.ppf(0.975), abs=1e-2)
    at_two_df = paired_test([2.0, 2.2, 4.0], "b", "a", "x")
    assert 2.5 < at_two_df.t < 4.30 and at_two_df.p > 0.05, "|t| 2.5-4.3 at 2 df is not p < .05"
    assert at_two_df.verdict == "not significant"


@pytest.mark.parametrize("n", [2, 3, 4, 8, 20])
@pytest.mark.parametrize("effect", [0.0, 0.3, 1.0, 2.5])
def test_power_matches_scipy_noncentral_t(n: int, effect: float) -> None:
    df, shift = n - 1, effect * math.sqrt(n) / 1.5
    critical = stats.t.ppf(0.975, df)
    right = stats.nct.sf(critical, df, shift)
    assert power(effect, 1.5, n) == pytest.approx(
        right + stats.nct.cdf(-critical, df, shift), abs=1e-8
    )
    assert power(effect, 1.5, n, signed=True) == pytest.approx(right, abs=1e-8)
    assert power(-effect, 1.5, n) == pytest.approx(power(effect, 1.5, n), abs=1e-12)


def test_power_is_the_size_at_no_effect_and_matches_simulation() -> None:
    assert power(0.0, 2.0, 5) == pytest.approx(0.05, abs=1e-9)
    rng = np.random.default_rng(0)
    samples = rng.normal(1.2, 2.0, size=(40_000, 4))
    p = stats.ttest_1samp(samples, 0.0, axis=1).pvalue
    assert power(1.2, 2.0, 4) == pytest.approx(float((p < 0.05).mean()), abs=0.01)


@pytest.mark.parametrize("n", [2, 3, 4, 9, 25])
def test_minimum_detectable_effect_has_eighty_percent_power(n: int) -> None:
    mde = minimum_detectable_effect(2.0, n)
    assert power(mde, 2.0, n) == pytest.approx(0.8, abs=1e-6)
    assert minimum_detectable_effect(4.0, n) == pytest.approx(2 * mde, rel=1e-6), "scales with sd"
    if n > 2:
        assert mde < minimum_detectable_effect(2.0, n - 1)
    assert paired_test([0.0, 2.0] * (n // 2) + [1.0] * (n % 2), "b", "a", "x").mde > 0


def test_pairs_needed_is_the_first_n_with_enough_power() -> None:
    n = pairs_needed(4.5, 3.8)
    assert power(4.5, 3.8, n, signed=True) >= 0.8 > power(4.5, 3.8, n - 1, signed=True)


def test_degenerate_inputs() -> None:
    single = paired_test([1.0], "b", "a", "x")
    assert single.n == 1 and single.df == 0
    assert all(math.isnan(v) for v in (single.sd, single.t, single.p, single.ci_low, single.mde))
    constant = paired_test([2.0, 2.0, 2.0], "b", "a", "x")
    assert constant.t == math.inf and constant.p == 0.0 and constant.mde == 0.0
    assert constant.ci_low == constant.ci_high == 2.0
    zero = paired_test([0.0, 0.0], "b", "a", "x")
    assert zero.t == 0.0 and zero.p == 1.0 and zero.verdict == "not significant"
    assert math.isnan(power(1.0, 1.0, 1))


def test_verdict_direction_follows_the_metric() -> None:
    drop = [-3.0, -3.5, -2.8, -3.1]
    assert paired_test(drop, "b", "a", "bg_decod").verdict == "better"
    assert paired_test(drop, "b", "a", "neutral_shift").verdict == "worse"
    assert paired_test(drop, "b", "a", "bg_gap").verdict == "better"


def test_holm_matches_hand_computation() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan"), 0.01]) == pytest.approx([0.5, float("nan"), 0.02], nan_ok=True)
    assert holm([0.6, 0.9]) == [1.0, 1.0]


def test_pairs_are_matched_by_seed_and_draw_not_by_order() -> None:
    rows = [
        {"method": "a", "seed": 0, "draw": 0, "x": 10.0},
        {"method": "a", "seed": 1, "draw": 0, "x": 20.0},
        {"method": "a", "seed": 0, "draw": 1, "x": 30.0},
        {"method": "b", "seed": 0, "draw": 1, "x": 31.0},
        {"method": "b", "seed": 1, "draw": 0, "x": 23.0},
        {"method": "b", "seed": 0, "draw": 0, "x": 12.0},
        {"method": "c", "seed": 0, "draw": 0, "x": 1.0},
    ]
    difference = paired_difference(rows, "b", "a", "x")
    assert difference is not None and difference.n == 3
    assert difference.mean == pytest.approx(2.0)
    partial = paired_difference(rows, "c", "a", "x")
    assert partial is not None and partial.n == 1
    assert paired_difference(rows, "d", "a", "x") is None


def test_summarize_skips_nan_and_keeps_method_order() -> None:
    rows = [
        {"method": "z", "x": 1.0},
        {"method": "y", "x": float("nan")},
        {"method": "z", "x": 2.0},
        {"method": "y", "x": 4.0},
    ]
    found = summarize(rows, ["x"])
    assert [(s.method, s.n, s.mean) for s in found] == [("z", 2, 1.5), ("y", 1, 4.0)]
    assert math.isnan(found[1].sd)
