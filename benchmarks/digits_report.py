"""Tables, CSV files and the figure of the confounded-digits benchmark."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .digits_data import NUM_CLASSES
from .digits_stats import (
    NO_EFFECT_T,
    PairedDifference,
    Row,
    Summary,
    paired_difference,
    summarize,
)

PRIMARY = ("bg_decod", "neutral_shift")
PAPER = tuple(
    f"paper_{probe}_{test}" for probe in ("lin", "knn") for test in ("corr", "full", "fg")
)
FULL_READINGS = {"corr": "correlated", "full": "shifted"}
TABLE_METRICS = (*PRIMARY, "neutral_fg", *PAPER, "strata_shift_mean", "strata_shift_max")
PAIRED_METRICS = (*PRIMARY, "neutral_fg", *PAPER)
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


def paired_differences(rows: Sequence[Row]) -> list[PairedDifference]:
    """Every comparison of :data:`COMPARISONS` whose two methods both ran."""
    found = (
        paired_difference(rows, method, reference, metric)
        for method, reference in COMPARISONS
        for metric in PAIRED_METRICS
    )
    return [difference for difference in found if difference is not None]


def _t_text(t: float) -> str:
    if math.isnan(t):
        return "n/a"
    return f"{t:+.1f}" if abs(t) < 100 else ("+" if t > 0 else "-") + ">99"


def paired_table(differences: Sequence[PairedDifference]) -> str:
    """Markdown table: one row per comparison, ``mean diff ± sd (t)`` per metric."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for d in differences:
        cells.setdefault((d.method, d.reference), {})[d.metric] = (
            f"{d.mean:+.1f} ± {d.sd:.1f} (t={_t_text(d.t)})"
        )
    body = [
        [f"{method} - {reference}", *(found.get(metric, "-") for metric in PAIRED_METRICS)]
        for (method, reference), found in cells.items()
    ]
    return _table(["paired difference", *PAIRED_METRICS], body)


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
    control = {
        d.metric: d for d in differences if (d.method, d.reference) == ("simclr_fg", "simclr")
    }
    if all(metric in control for metric in PRIMARY):
        decod, shift = control["bg_decod"], control["neutral_shift"]
        accepted = decod.t <= -NO_EFFECT_T and shift.t >= NO_EFFECT_T
        lines.append(
            "positive control (simclr_fg - simclr): "
            f"bg_decod {decod.mean:+.1f} (t={decod.t:+.1f}), "
            f"neutral_shift {shift.mean:+.1f} (t={shift.t:+.1f}) -> "
            + ("ACCEPTED" if accepted else "REJECTED: the benchmark cannot see the confound")
        )
    return lines


def write_csv(path: Path, records: Sequence[Mapping[str, object]]) -> None:
    """Writes ``records`` (dicts with the same keys) as CSV."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Bar chart (mean, sd error bars) of the neutral and paper-protocol metrics per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("neutral probes", ("bg_decod", "neutral_shift", "neutral_fg")),
        ("paper protocol, linear", PAPER[:3]),
        ("paper protocol, 5-NN", PAPER[3:]),
    )
    summaries = {(s.method, s.metric): s for s in summarize(rows, TABLE_METRICS)}
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.8 / len(methods)
    for axis, (title, metrics) in zip(axes, panels, strict=True):
        for index, method in enumerate(methods):
            found = [summaries[(method, metric)] for metric in metrics]
            axis.bar(
                [m + (index - (len(methods) - 1) / 2) * width for m in range(len(metrics))],
                [s.mean for s in found],
                width,
                yerr=[0.0 if math.isnan(s.sd) else s.sd for s in found],
                capsize=3,
                label=method,
            )
        axis.set_xticks(range(len(metrics)), list(metrics))
        axis.set_title(title)
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(0, 100)
        axis.axhline(100 / NUM_CLASSES, color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    figure.suptitle("Confounded digits (bg_decod: lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
