"""Statistics of the confounded-digits runs: per-method means and paired seed differences.

A paired difference over ``n`` pairs is tested with the one-sample t-test on the differences
(``n - 1`` degrees of freedom): two-sided p-value, 95% confidence interval, and the minimum
detectable effect (the true mean difference that the test at 5% would detect with 80% power,
given the observed sd), from the t and noncentral t distributions. Holm's step-down adjustment
controls the family-wise error across the metric columns of one comparison.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import integrate, optimize
from scipy import stats as distributions

Row = dict[str, float | int | str]

LOWER_IS_BETTER = frozenset({"bg_decod", "bg_gap", "paper_lin_bg"})
ALPHA = 0.05
TARGET_POWER = 0.8
DECIMALS = 9


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of one metric of one method over its runs."""

    method: str
    metric: str
    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class PairedDifference:
    """``method - reference`` on runs paired by seed and data draw, with its t-test.

    Attributes:
        method: The method compared.
        reference: The method it is compared against.
        metric: The metric.
        n: Number of pairs.
        mean: Mean paired difference.
        sd: Sample standard deviation of the differences.
        df: Degrees of freedom, ``n - 1``.
        t: ``mean / (sd / sqrt(n))``; NaN for fewer than two pairs.
        p: Two-sided p-value of ``t`` under the t distribution with ``df`` degrees of freedom.
        ci_low: Lower end of the 95% confidence interval of the mean difference.
        ci_high: Upper end of that interval.
        mde: Minimum detectable effect: the |mean difference| that a two-sided 5% test on ``n``
            pairs with this sd detects with 80% power.
        p_holm: ``p`` after Holm's adjustment over the metrics of the same comparison (NaN until
            :func:`holm_adjusted` sets it).
        verdict: ``"better"`` or ``"worse"`` when ``p < 0.05``, else ``"not significant"``.
    """

    method: str
    reference: str
    metric: str
    n: int
    mean: float
    sd: float
    df: int
    t: float
    p: float
    ci_low: float
    ci_high: float
    mde: float
    p_holm: float
    verdict: str


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(rows: Iterable[Row], metrics: Sequence[str]) -> list[Summary]:
    """Mean and sd of each metric per method, methods in order of first appearance.

    Examples:
        >>> rows = [{"method": "a", "x": 1.0}, {"method": "a", "x": 3.0}]
        >>> summarize(rows, ["x"])[0].mean
        2.0
    """
    by_method: dict[str, list[Row]] = {}
    for row in rows:
        by_method.setdefault(str(row["method"]), []).append(row)
    summaries = []
    for method, runs in by_method.items():
        for metric in metrics:
            values = [float(run[metric]) for run in runs if not math.isnan(float(run[metric]))]
            if values:
                summaries.append(Summary(method, metric, len(values), *_mean_sd(values)))
    return summaries


def t_critical(df: int, alpha: float = ALPHA) -> float:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom.

    Examples:
        >>> round(t_critical(2), 2)
        4.3
    """
    return float(distributions.t.ppf(1 - alpha / 2, df))


def _t_value(mean: float, sd: float, n: int) -> float:
    if n < 2 or math.isnan(sd):
        return float("nan")
    if sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / (sd / math.sqrt(n))


def power(effect: float, sd: float, n: int, alpha: float = ALPHA, *, signed: bool = False) -> float:
    """Power of the two-sided paired t-test on ``n`` pairs for a true mean difference ``effect``.

    Args:
        effect: True mean difference.
        sd: Standard deviation of the differences.
        n: Number of pairs (>= 2 for a finite answer).
        alpha: Size of the test.
        signed: Count only rejections on the side of ``effect`` (a test that must also get the
            direction right).

    Returns:
        The probability of rejecting: the noncentral t distribution's tails, integrated over
        the chi-square law of the sample variance; NaN for ``n < 2``.

    Examples:
        >>> round(power(1.0, 1.0, 10), 3)
        0.803
    """
    if n < 2 or math.isnan(sd) or math.isnan(effect):
        return float("nan")
    if sd == 0:
        return 1.0 if effect != 0 else alpha
    df, shift = n - 1, abs(effect) / (sd / math.sqrt(n))
    critical = t_critical(df, alpha)

    log_normaliser = -(df / 2) * math.log(2) - math.lgamma(df / 2)

    def rejected(chi_square: float) -> float:
        if chi_square <= 0:
            return 0.0
        threshold = critical * math.sqrt(chi_square / df)
        right = 0.5 * math.erfc((threshold - shift) / math.sqrt(2))
        left = 0.0 if signed else 0.5 * math.erfc((threshold + shift) / math.sqrt(2))
        density = math.exp(log_normaliser + (df / 2 - 1) * math.log(chi_square) - chi_square / 2)
        return density * (right + left)

    total = integrate.quad(rejected, 0.0, math.inf, epsabs=1e-11, limit=200)[0]
    return min(1.0, max(0.0, total))


def minimum_detectable_effect(
    sd: float, n: int, alpha: float = ALPHA, target: float = TARGET_POWER
) -> float:
    """The |mean difference| a two-sided paired t-test on ``n`` pairs detects with ``target`` power.

    Examples:
        >>> round(minimum_detectable_effect(1.0, 10), 3)
        0.996
    """
    if n < 2 or math.isnan(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    upper = sd
    while power(upper, sd, n, alpha) < target:
        upper *= 2
    return float(optimize.brentq(lambda e: power(e, sd, n, alpha) - target, 0.0, upper, xtol=1e-9))


def pairs_needed(effect: float, sd: float, target: float = TARGET_POWER, limit: int = 1000) -> int:
    """Smallest number of pairs whose sign-aware power against ``effect`` reaches ``target``.

    Examples:
        >>> pairs_needed(4.5, 3.8)
        8
    """
    for n in range(2, limit + 1):
        if power(effect, sd, n, signed=True) >= target:
            return n
    raise ValueError(f"more than {limit} pairs needed for effect {effect} with sd {sd}")


def _verdict(metric: str, mean: float, p: float) -> str:
    if math.isnan(p) or p >= ALPHA:
        return "not significant"
    improved = mean < 0 if metric in LOWER_IS_BETTER else mean > 0
    return "better" if improved else "worse"


def paired_test(
    differences: Sequence[float], method: str, reference: str, metric: str
) -> PairedDifference:
    """The t-test, 95% CI and minimum detectable effect of a list of paired differences.

    Examples:
        >>> test = paired_test([1.0, 2.0, 3.0], "b", "a", "x")
        >>> test.df, round(test.p, 4), round(test.ci_low, 3)
        (2, 0.0742, -0.484)
    """
    n = len(differences)
    mean, sd = _mean_sd(differences)
    t = _t_value(mean, sd, n)
    if n < 2:
        p = low = high = float("nan")
    else:
        p = float(2 * distributions.t.sf(abs(t), n - 1)) if math.isfinite(t) else 0.0
        half = t_critical(n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    mde = minimum_detectable_effect(sd, n)
    verdict = _verdict(metric, mean, p)
    nan = float("nan")
    return PairedDifference(
        method, reference, metric, n, mean, sd, n - 1, t, p, low, high, mde, nan, verdict
    )


def paired_difference(
    rows: Sequence[Row], method: str, reference: str, metric: str
) -> PairedDifference | None:
    """``method - reference`` on ``metric`` over the (seed, draw) pairs both ran; None if none.

    Examples:
        >>> rows = [{"method": m, "seed": s, "draw": 0, "x": float(s * s + (m == "b") * s)}
        ...         for m in "ab" for s in range(3)]
        >>> paired_difference(rows, "b", "a", "x").mean
        1.0
    """
    runs = {(row["method"], row["seed"], row["draw"]): float(row[metric]) for row in rows}
    keys = sorted((seed, draw) for (name, seed, draw) in runs if name == reference)
    diffs = [
        round(runs[(method, seed, draw)] - runs[(reference, seed, draw)], DECIMALS)
        for seed, draw in keys
        if (method, seed, draw) in runs
    ]
    if not diffs:
        return None
    return paired_test(diffs, method, reference, metric)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaNs stay NaN and do not count as tests).

    Examples:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[index] = round(running, 12)
    return adjusted


def holm_adjusted(differences: Sequence[PairedDifference]) -> list[PairedDifference]:
    """``differences`` with ``p_holm`` set, each comparison (method, reference) one family."""
    families: dict[tuple[str, str], list[int]] = {}
    for index, difference in enumerate(differences):
        families.setdefault((difference.method, difference.reference), []).append(index)
    adjusted = list(differences)
    for members in families.values():
        for index, p in zip(members, holm([differences[i].p for i in members]), strict=True):
            adjusted[index] = dataclasses.replace(differences[index], p_holm=p)
    return adjusted
