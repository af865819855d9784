"""Statistics of the confounded-digits runs: per-method means and paired seed differences."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Row = dict[str, float | int | str]

LOWER_IS_BETTER = frozenset({"bg_decod"})
NO_EFFECT_T = 2.5
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
    """``method - reference`` on runs paired by seed and data draw, with its t-value.

    Attributes:
        method: The method compared.
        reference: The method it is compared against.
        metric: The metric.
        n: Number of pairs.
        mean: Mean paired difference.
        sd: Sample standard deviation of the differences.
        t: ``mean / (sd / sqrt(n))``; NaN for fewer than two pairs or identical differences.
        verdict: ``"no effect"`` when ``|t| < 2.5``, else ``"better"`` or ``"worse"``.
    """

    method: str
    reference: str
    metric: str
    n: int
    mean: float
    sd: float
    t: float
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


def _t_value(mean: float, sd: float, n: int) -> float:
    if n < 2 or math.isnan(sd):
        return float("nan")
    if sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / (sd / math.sqrt(n))


def _verdict(metric: str, t: float) -> str:
    if math.isnan(t) or abs(t) < NO_EFFECT_T:
        return "no effect"
    improved = t < 0 if metric in LOWER_IS_BETTER else t > 0
    return "better" if improved else "worse"


def paired_difference(
    rows: Sequence[Row], method: str, reference: str, metric: str
) -> PairedDifference | None:
    """``method - reference`` on ``metric`` over the (seed, draw) pairs both ran; None if none.

    Examples:
        >>> rows = [{"method": m, "seed": s, "draw": 0, "x": float(s + (m == "b"))}
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
    mean, sd = _mean_sd(diffs)
    t = _t_value(mean, sd, len(diffs))
    return PairedDifference(method, reference, metric, len(diffs), mean, sd, t, _verdict(metric, t))
