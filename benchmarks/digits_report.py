"""Tables, CSV files and the figure of the confounded-digits benchmark."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .digits_data import NUM_CLASSES
from .digits_stats import (
    ALPHA,
    PairedDifference,
    Row,
    Summary,
    holm_adjusted,
    paired_difference,
    power,
    summarize,
    t_critical,
)

PRIMARY = ("bg_decod", "neutral_shift")
PAPER = tuple(
    f"paper_{probe}_{test}" for probe in ("lin", "knn") for test in ("corr", "full", "fg")
)
CHALLENGE = {
    "Original": "paper_lin_corr",
    "Only-FG": "paper_lin_fg",
    "Mixed-Same": "paper_lin_same",
    "Mixed-Rand": "paper_lin_full",
    "Only-BG-T": "paper_lin_bg",
    "BG-Gap": "bg_gap",
}
CHALLENGE_ONLY = ("paper_lin_same", "paper_lin_bg", "bg_gap")
FULL_READINGS = {"corr": "correlated", "full": "shifted"}
TABLE_METRICS = (
    *PRIMARY,
    "neutral_fg",
    *PAPER,
    *CHALLENGE_ONLY,
    "strata_shift_mean",
    "strata_shift_max",
)
PAIRED_METRICS = (*PRIMARY, "neutral_fg", *PAPER, *CHALLENGE_ONLY)
CONTROL = ("simclr_fg", "simclr")
CONTROL_METRICS = {"bg_decod": -1, "neutral_shift": 1}
COMPARISONS = (
    ("simclr_fg", "simclr"),
    ("random", "simclr"),
    ("icl_msr", "simclr"),
    ("icl_fixed", "simclr"),
    ("icl_msr", "icl_fixed"),
    ("patch_neg", "simclr"),
    ("metamask", "simclr"),
    ("barlow_icl", "barlow"),
)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in [header, *body]
    ]
    lines.insert(1, "| " + " | ".join("-" * width for width in widths) + " |")
    return "\n".join(lines)


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    digits = 3 if summary.metric.startswith("strata") else 1
    sd = "" if math.isnan(summary.sd) else f" ± {summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"


def summary_table(rows: Sequence[Row]) -> str:
    """Markdown table: mean ± sd of every metric per method."""
    summaries = summarize(rows, TABLE_METRICS)
    lookup = {(s.method, s.metric): s for s in summaries}
    methods = list(dict.fromkeys(s.method for s in summaries))
    body = [
        [method, str(lookup[(method, PRIMARY[0])].n)]
        + [_cell(lookup.get((method, metric))) for metric in TABLE_METRICS]
        for method in methods
    ]
    return _table(["method", "runs", *TABLE_METRICS], body)


def challenge_table(rows: Sequence[Row]) -> str:
    """Markdown table: the Background Challenge's splits and BG-Gap, mean ± sd per method."""
    summaries = summarize(rows, list(CHALLENGE.values()))
    lookup = {(s.method, s.metric): s for s in summaries}
    methods = list(dict.fromkeys(s.method for s in summaries))
    body = [
        [method, *(_cell(lookup.get((method, metric))) for metric in CHALLENGE.values())]
        for method in methods
    ]
    return _table(["method", *CHALLENGE], body)


def paired_differences(rows: Sequence[Row]) -> list[PairedDifference]:
    """Every comparison of :data:`COMPARISONS` whose two methods both ran, Holm-adjusted."""
    found = (
        paired_difference(rows, method, reference, metric)
        for method, reference in COMPARISONS
        for metric in PAIRED_METRICS
    )
    return holm_adjusted([difference for difference in found if difference is not None])


def _p_text(p: float) -> str:
    if math.isnan(p):
        return "=n/a"
    return f"={p:.3f}" if p >= 0.001 else "<0.001"


def _difference_text(d: PairedDifference) -> str:
    if math.isnan(d.ci_low):
        return f"{d.mean:+.1f} (n=1)"
    return f"{d.mean:+.1f} [{d.ci_low:+.1f}, {d.ci_high:+.1f}] p{_p_text(d.p)}"


def _by_comparison(
    differences: Sequence[PairedDifference],
) -> dict[tuple[str, str], dict[str, PairedDifference]]:
    grouped: dict[tuple[str, str], dict[str, PairedDifference]] = {}
    for d in differences:
        grouped.setdefault((d.method, d.reference), {})[d.metric] = d
    return grouped


def paired_table(differences: Sequence[PairedDifference]) -> str:
    """Markdown table: per comparison, ``mean diff [95% CI] p`` per metric."""
    body = [
        [
            f"{method} - {reference}",
            str(next(iter(found.values())).n),
            *(_difference_text(found[m]) if m in found else "-" for m in PAIRED_METRICS),
        ]
        for (method, reference), found in _by_comparison(differences).items()
    ]
    return _table(["paired difference", "pairs", *PAIRED_METRICS], body)


def detectable_table(differences: Sequence[PairedDifference]) -> str:
    """Markdown table: the minimum detectable effect (80% power, 5% two-sided) per comparison."""
    body = [
        [
            f"{method} - {reference}",
            *(f"{found[m].mde:.1f}" if m in found else "-" for m in PAIRED_METRICS),
        ]
        for (method, reference), found in _by_comparison(differences).items()
    ]
    return _table(["minimum detectable effect", *PAIRED_METRICS], body)


def multiplicity_note(differences: Sequence[PairedDifference]) -> str:
    """One paragraph on how many tests the paired table holds and how to read them."""
    comparisons = len(_by_comparison(differences))
    return (
        f"{len(differences)} tests ({comparisons} comparisons x up to {len(PAIRED_METRICS)} "
        "metrics); p-values are per test, two-sided, t distribution with pairs - 1 degrees of "
        f"freedom. At {ALPHA:.0%} per test about {ALPHA * len(differences):.1f} would come out "
        "significant by chance alone: paired.csv's p_holm controls the family-wise error over "
        "the metrics of each comparison (Holm). The positive control needs every one of its "
        "tests to pass (an intersection-union test), which needs no adjustment."
    )


def seed_checks(rows: Sequence[Row], differences: Sequence[PairedDifference]) -> list[str]:
    """The seed's two inequalities under both readings of "full", and the positive control.

    The seed says: trained on full images, accuracy on full images > on foregrounds; trained on
    foregrounds, accuracy on full images < on foregrounds. "Full" is read as correlated test
    images (the paper's natural images keep their backgrounds) and as shifted ones.
    """
    means = {(s.method, s.metric): s.mean for s in summarize(rows, PAPER)}
    lines = []
    for method, relation in (("simclr", ">"), ("simclr_fg", "<"), ("random", "")):
        for probe, test in itertools.product(("lin", "knn"), ("corr", "full")):
            full = means.get((method, f"paper_{probe}_{test}"))
            fg = means.get((method, f"paper_{probe}_fg"))
            if full is None or fg is None:
                continue
            verdict = ""
            if relation:
                holds = full > fg if relation == ">" else full < fg
                verdict = f" (seed: {relation}) -> " + ("holds" if holds else "FAILS")
            lines.append(
                f"{method:<10} {probe} {FULL_READINGS[test]:<11} {full:5.1f} "
                f"vs foreground {fg:5.1f}{verdict}"
            )
    control = control_verdict(differences)
    if control is not None:
        lines.append(control)
    return lines


def control_verdict(differences: Sequence[PairedDifference]) -> str | None:
    """The positive control's line: each test, the estimated power and the verdict.

    The control (SimCLR on foregrounds against SimCLR on full images) is accepted when every
    metric of :data:`CONTROL_METRICS` differs in its direction at p < 0.05. The power is the
    probability of that outcome if the true effects and sds were the ones observed (the tests
    taken as independent), from the noncentral t distribution.
    """
    found = {d.metric: d for d in differences if (d.method, d.reference) == CONTROL}
    if not all(metric in found for metric in CONTROL_METRICS):
        return None
    parts, accepted, joint = [], True, 1.0
    for metric, sign in CONTROL_METRICS.items():
        d = found[metric]
        accepted &= d.p < ALPHA and d.mean * sign > 0
        joint *= power(d.mean, d.sd, d.n, signed=True) if d.mean * sign > 0 else 0.0
        parts.append(f"{metric} {_difference_text(d)}")
    verdict = "ACCEPTED" if accepted else "REJECTED: the benchmark cannot see the confound"
    power_text = "n/a" if math.isnan(joint) else f"{joint:.2f}"
    return (
        f"positive control ({CONTROL[0]} - {CONTROL[1]}, {found['bg_decod'].n} pairs): "
        + "; ".join(parts)
        + f"; estimated power {power_text} -> {verdict}"
    )


def write_csv(path: Path, records: Sequence[Mapping[str, object]]) -> None:
    """Writes ``records`` (dicts with the same keys) as CSV."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)


KEYS = ("method", "seed", "draw")


def _run_row(record: Mapping[str, str], path: Path) -> Row:
    try:
        return {
            "method": record["method"],
            "seed": int(record["seed"]),
            "draw": int(record["draw"]),
            **{key: float(value) for key, value in record.items() if key not in KEYS},
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a runs.csv row of msr-loss digits ({error})") from error


def read_runs(paths: Sequence[Path]) -> list[Row]:
    """The rows of one or more ``runs.csv`` files, numbers parsed; each run may appear once.

    Raises:
        ValueError: If a file is not a ``runs.csv`` of ``msr-loss digits``, if its columns differ
            from the first file's, or if a (method, seed, draw) appears twice.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.csv"
        >>> write_csv(path, [{"method": "simclr", "seed": 0, "draw": 1, "bg_decod": 80.5}])
        >>> read_runs([path])
        [{'method': 'simclr', 'seed': 0, 'draw': 1, 'bg_decod': 80.5}]
    """
    rows: list[Row] = []
    origin: dict[tuple[object, ...], Path] = {}
    columns: list[str] | None = None
    for path in paths:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if columns is not None and reader.fieldnames != columns:
                raise ValueError(f"{path}: its columns differ from those of {paths[0]}")
            columns = list(reader.fieldnames or [])
            for record in reader:
                row = _run_row(record, path)
                key = tuple(row[name] for name in KEYS)
                if key in origin:
                    raise ValueError(f"{path}: run {key} is already in {origin[key]}")
                origin[key] = path
                rows.append(row)
    return rows


def _half_width(summary: Summary) -> float:
    if summary.n < 2 or math.isnan(summary.sd):
        return 0.0
    return t_critical(summary.n - 1) * summary.sd / math.sqrt(summary.n)


def _bars(
    axis: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    colors: Sequence[str],
) -> None:
    width = 0.8 / max(len(series), 1)
    for index, ((label, values), color) in enumerate(zip(series.items(), colors, strict=True)):
        axis.bar(
            [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))],
            [mean for mean, _ in values],
            width,
            yerr=[half for _, half in values],
            capsize=3,
            label=label,
            color=color,
        )
    axis.set_xticks(range(len(groups)), list(groups), rotation=20, fontsize=8)


def _legend_below(axis: Any, columns: int) -> None:
    """The axis's legend under its tick labels, where it covers no bar."""
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=columns)


def plot(rows: Sequence[Row], differences: Sequence[PairedDifference], path: Path) -> None:
    """Bar chart with 95% confidence intervals: neutral probes, the Background Challenge's
    splits, and each method's paired differences against SimCLR on the primary metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = {(s.method, s.metric): s for s in summarize(rows, TABLE_METRICS)}
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    color = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (
        ("neutral probes", {m: m for m in (*PRIMARY, "neutral_fg")}),
        ("Background Challenge (paper-protocol linear probe)", CHALLENGE),
    )
    for axis, (title, metrics) in zip(axes[:2], panels, strict=True):
        series = {
            method: [
                (summaries[(method, m)].mean, _half_width(summaries[(method, m)]))
                for m in metrics.values()
            ]
            for method in methods
        }
        _bars(axis, list(metrics), series, [color[method] for method in methods])
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("accuracy (%); BG-Gap in points")
        axis.axhline(100 / NUM_CLASSES, color="gray", linestyle=":", linewidth=1)
    axes[0].set_ylim(0, 100)
    _legend_below(axes[0], columns=3)
    versus = {
        method: found
        for (method, reference), found in _by_comparison(differences).items()
        if reference == "simclr"
    }
    shown = (*PRIMARY, "bg_gap")
    _bars(
        axes[2],
        list(shown),
        {
            f"{method} - simclr": [
                (
                    found[m].mean,
                    0.0 if math.isnan(found[m].ci_low) else found[m].mean - found[m].ci_low,
                )
                for m in shown
            ]
            for method, found in versus.items()
        },
        [color[method] for method in versus],
    )
    axes[2].axhline(0, color="black", linewidth=0.8)
    axes[2].set_title("paired differences against SimCLR (95% CI)", fontsize=10)
    axes[2].set_ylabel("points")
    if versus:
        _legend_below(axes[2], columns=2)
    figure.suptitle(
        "Confounded digits: means with 95% CIs (bg_decod, Only-BG-T, BG-Gap: lower is better)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)
