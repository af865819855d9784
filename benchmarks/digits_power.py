"""Power of the positive control from measured runs: ``python -m msr_loss.benchmarks.digits_power``.

Reads one or more ``runs.csv`` files of ``msr-loss digits``, pairs the control's two arms by seed
and data draw, and prints for each metric the mean paired difference, its sd and the sign-aware
power of the two-sided 5% t-test at 2-10 pairs, with the number of pairs that reaches 80%.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .digits_report import CONTROL, PAIRED_METRICS, read_runs
from .digits_stats import Row, paired_difference, pairs_needed, power

SIZES = range(2, 11)


def power_table(rows: Sequence[Row], metrics: Sequence[str] = PAIRED_METRICS) -> str:
    """One line per metric: effect, sd, pairs measured, power at 2-10 pairs, pairs for 80%.

    Examples:
        >>> rows = [{"method": m, "seed": s, "draw": 0, "x": s + (m == "simclr_fg") * (5 + s % 2)}
        ...         for m in ("simclr", "simclr_fg") for s in range(4)]
        >>> print(power_table(rows, ["x"]).splitlines()[1])
        x                +5.50    0.58    4 | 0.71 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 |   3
    """
    header = f"{'metric':<15} {'effect':>6} {'sd':>7} {'n':>4} | " + " ".join(
        f"{n:>4}" for n in SIZES
    )
    lines = [header + " | n(80%)"]
    for metric in metrics:
        found = paired_difference(rows, *CONTROL, metric)
        if found is None or found.n < 2:
            continue
        powers = " ".join(f"{power(found.mean, found.sd, n, signed=True):4.2f}" for n in SIZES)
        needed = pairs_needed(found.mean, found.sd) if found.sd > 0 or found.mean else 0
        lines.append(
            f"{metric:<15} {found.mean:+6.2f} {found.sd:7.2f} {found.n:>4} | {powers} | {needed:>3}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints :func:`power_table` for the ``runs.csv`` files given."""
    parser = argparse.ArgumentParser(prog="python -m msr_loss.benchmarks.digits_power")
    parser.add_argument("runs", nargs="+", type=Path, help="runs.csv files of msr-loss digits")
    args = parser.parse_args(argv)
    print(f"control {CONTROL[0]} - {CONTROL[1]}; sign-aware power of the 5% two-sided t-test")
    print(power_table(read_runs(args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
