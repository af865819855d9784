"""``msr-loss digits`` / ``msr-loss demo``: the confounded-digits benchmark.

Pretrains a small CNN (or a timm backbone) with each method on digits whose background family is
correlated with the label, evaluates frozen features on neutral test splits and the Background
Challenge's splits (see :mod:`digits_eval`), and writes the per-run CSV, the paired-difference CSV
(t-tests, CIs, minimum detectable effects), a PNG figure and the printed tables to ``--out``. Runs
are paired by seed: same initialisation, batches and views for every method.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from . import digits_report as report
from .digits_data import DATASETS, ConfoundedDigits, Dataset, build_confounded_digits
from .digits_eval import evaluate
from .digits_models import check_backbone
from .digits_stats import Row
from .digits_train import (
    METHODS,
    RELATIVE_COST,
    TRAINED_ON_FOREGROUNDS,
    TrainConfig,
    train,
)


@dataclass(frozen=True)
class Preset:
    """The methods, paired seeds, data draws and backgrounds per evaluation digit of a mode."""

    methods: tuple[str, ...]
    seeds: int
    draws: int
    backgrounds: int


FULL_METHODS = (
    "random",
    "simclr",
    "simclr_fg",
    "icl_msr",
    "icl_fixed",
    "patch_neg",
    "metamask",
    "barlow",
    "barlow_icl",
)
PRESETS = {
    "quick": Preset(("random", "simclr", "simclr_fg", "icl_msr"), seeds=4, draws=1, backgrounds=5),
    "full": Preset(FULL_METHODS, seeds=4, draws=2, backgrounds=5),
}
DEFAULT_OUT = Path("msr-loss-out") / "digits"


@dataclass(frozen=True)
class DataConfig:
    """The dataset of a run (see :func:`build_confounded_digits`)."""

    dataset: Dataset
    correlation: float
    backgrounds: int
    max_samples: int | None


@dataclass(frozen=True)
class Job:
    """One pretraining run: a method, a seed and a data draw."""

    method: str
    seed: int
    draw: int
    data: DataConfig
    config: TrainConfig


@functools.lru_cache(maxsize=2)
def _dataset(draw: int, data: DataConfig) -> ConfoundedDigits:
    return build_confounded_digits(
        seed=draw,
        dataset=data.dataset,
        correlation=data.correlation,
        backgrounds_per_digit=data.backgrounds,
        max_samples=data.max_samples,
    )


def run_job(job: Job) -> Row:
    """Trains and evaluates one run; returns its CSV row."""
    data = _dataset(job.draw, job.data)
    result = train(job.method, data, job.seed, job.config)
    scores = evaluate(
        result.encoder, data, trained_on_foregrounds=job.method in TRAINED_ON_FOREGROUNDS
    )
    return {
        "method": job.method,
        "seed": job.seed,
        "draw": job.draw,
        **scores,
        "strata_shift_mean": result.strata_shift_mean,
        "strata_shift_max": result.strata_shift_max,
        "train_seconds": round(result.seconds, 1),
    }


def _single_thread() -> None:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)


def _run_all(jobs: Sequence[Job], workers: int, partial: Path) -> list[Row]:
    """Runs every job; ``partial`` holds the rows finished so far, for interrupted runs."""
    from tqdm import tqdm

    ordered = sorted(jobs, key=lambda job: -RELATIVE_COST.get(job.method, 1.0))
    rows = []
    with tqdm(total=len(ordered), desc="pretraining runs", unit="run") as bar:
        if workers == 1:
            _single_thread()
            for job in ordered:
                rows.append(run_job(job))
                report.write_csv(partial, rows)
                bar.update()
        else:
            pool = ProcessPoolExecutor(workers, get_context("spawn"), initializer=_single_thread)
            with pool:
                for future in as_completed([pool.submit(run_job, job) for job in ordered]):
                    rows.append(future.result())
                    report.write_csv(partial, rows)
                    bar.set_postfix_str(f"{rows[-1]['method']} seed {rows[-1]['seed']}")
                    bar.update()
    order = {(job.method, job.seed, job.draw): i for i, job in enumerate(jobs)}
    return sorted(
        rows, key=lambda row: order[(str(row["method"]), int(row["seed"]), int(row["draw"]))]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msr-loss digits",
        description="Confounded digits: SimCLR with and without ICL-MSR on digits whose "
        "background is correlated with the label in training and not in testing.",
        epilog="methods:\n" + "\n".join(f"  {name:<11} {text}" for name, text in METHODS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode (default)")
    mode.add_argument("--full", action="store_true", help="the full mode of benchmarks/RESULTS.md")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), metavar="METHOD", help="see below"
    )
    parser.add_argument("--seeds", type=int, help="number of paired seeds")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="first seed (default 0: seeds 0, 1, ...)"
    )
    parser.add_argument("--draws", type=int, help="number of data draws (0, 1, ...)")
    parser.add_argument(
        "--draw-offset", type=int, default=0, help="first data draw (default 0: draws 0, 1, ...)"
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    parser.add_argument(
        "--dataset", choices=DATASETS, default="digits", help="scikit-learn's digits or MNIST"
    )
    parser.add_argument(
        "--correlation", type=float, default=0.9, help="P(family c | class c) in training"
    )
    parser.add_argument(
        "--backgrounds-per-digit",
        type=int,
        help="independent backgrounds per digit in the evaluation splits (quick and full: 5)",
    )
    parser.add_argument(
        "--max-samples", type=int, help="use only the first N digits (for smoke tests)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            help=f"default {getattr(defaults, field.name)}",
        )
    return parser


def _jobs(args: argparse.Namespace) -> list[Job]:
    preset = PRESETS["full" if args.full else "quick"]
    methods = args.methods or preset.methods
    seeds = preset.seeds if args.seeds is None else args.seeds
    draws = preset.draws if args.draws is None else args.draws
    backgrounds = (
        preset.backgrounds if args.backgrounds_per_digit is None else (args.backgrounds_per_digit)
    )
    if seeds < 1 or draws < 1 or args.workers < 1 or backgrounds < 1:
        raise ValueError("--seeds, --draws, --workers and --backgrounds-per-digit must be >= 1")
    for name in ("seed_offset", "draw_offset"):
        if getattr(args, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.correlation <= 1.0:
        raise ValueError(f"--correlation must be in [0, 1], got {args.correlation}")
    config = TrainConfig(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    )
    check_backbone(config.backbone)
    data = DataConfig(args.dataset, args.correlation, backgrounds, args.max_samples)
    return [
        Job(method, seed, draw, data, config)
        for draw in range(args.draw_offset, args.draw_offset + draws)
        for seed in range(args.seed_offset, args.seed_offset + seeds)
        for method in methods
    ]


def main(argv: list[str]) -> int:
    """Runs the benchmark; ``msr-loss digits --help`` lists the options.

    Args:
        argv: Command-line arguments after ``digits``.

    Returns:
        The exit code (0 on success, 2 on bad arguments).

    Examples:
        >>> main(["--seeds", "1", "--epochs", "1", "--out", "/tmp/digits"])  # doctest: +SKIP
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return 0 if stop.code is None else int(stop.code)
    try:
        jobs = _jobs(args)
    except ValueError as error:
        parser.print_usage(sys.stderr)
        print(f"msr-loss digits: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(
        f"{len(jobs)} runs on {args.workers} processes; {jobs[0].data}; {jobs[0].config}",
        flush=True,
    )
    rows = _run_all(jobs, args.workers, args.out / "runs.partial.csv")
    _write_report(rows, args.out)
    (args.out / "runs.partial.csv").unlink()
    minutes = (time.perf_counter() - start) / 60
    print(f"\nwrote runs.csv, paired.csv, tables.md, digits.png to {args.out} ({minutes:.1f} min)")
    return 0


def _write_report(rows: Sequence[Row], out: Path) -> None:
    """Prints the tables and writes runs.csv, paired.csv, tables.md and digits.png to ``out``."""
    differences = report.paired_differences(rows)
    text = "\n\n".join(
        [
            "Mean ± sd over runs (accuracies in %; bg_decod, paper_lin_bg, bg_gap: lower is "
            "better):",
            report.summary_table(rows),
            "The Background Challenge's splits (Xiao et al. 2021), paper-protocol linear probe:",
            report.challenge_table(rows),
            "Paired differences, mean [95% CI] and two-sided p (t test, pairs - 1 df):",
            report.paired_table(differences),
            report.multiplicity_note(differences),
            "Minimum detectable effect at this run's size (80% power, 5% two-sided), in points:",
            report.detectable_table(differences),
            "The seed's 2x2 (paper protocol) and the positive control:",
            "\n".join(report.seed_checks(rows, differences)),
        ]
    )
    print("\n" + text)
    report.write_csv(out / "runs.csv", rows)
    report.write_csv(out / "paired.csv", [dataclasses.asdict(d) for d in differences])
    (out / "tables.md").write_text(text + "\n")
    report.plot(rows, differences, out / "digits.png")


def report_main(argv: list[str]) -> int:
    """``msr-loss digits-report RUNS.csv [RUNS.csv ...] --out DIR``: the report of finished runs.

    Merges the ``runs.csv`` files of several ``msr-loss digits`` runs (for example the data draws
    of a ``--full`` run made in pieces with ``--draw-offset``) and writes the same tables, CSV
    files and figure as ``msr-loss digits``, without training.

    Returns:
        The exit code (0 on success, 2 on bad arguments or unreadable files).

    Examples:
        >>> report_main(["draw0/runs.csv", "draw1/runs.csv", "--out", "full"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="msr-loss digits-report",
        description="The tables, CSV files and figure of msr-loss digits for finished runs.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="runs.csv files of msr-loss digits")
    parser.add_argument("--out", type=Path, required=True, help="where to write the report")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return 0 if stop.code is None else int(stop.code)
    try:
        rows = report.read_runs(args.runs)
    except (OSError, ValueError) as error:
        parser.print_usage(sys.stderr)
        print(f"msr-loss digits-report: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    _write_report(rows, args.out)
    print(f"\nwrote runs.csv, paired.csv, tables.md, digits.png to {args.out} ({len(rows)} runs)")
    return 0


def demo_main(argv: list[str]) -> int:
    """The README's main job: the benchmark's quick mode (a few minutes on 2 CPU cores).

    Examples:
        >>> demo_main([])  # doctest: +SKIP
        0
    """
    return main(["--quick", *argv])
