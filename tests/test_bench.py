"""`msr-loss bench` through the console command on tiny sizes, its table writer, and gpu-check."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch
from msr_loss.benchmarks import gpu_check, loss_kernel

TINY = ["--sizes", "16", "32", "--dims", "8", "--strata", "2", "--threads", "1"]
TINY += ["--repeats", "1", "--warmup", "1", "--rounds", "3"]


def run_bench(tmp_path, *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "msr_loss.cli", "bench", *TINY, "--out-dir", str(tmp_path)]
    done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cases ran with 1 threads" in done.stdout
    assert "ICL-MSR" not in done.stdout or "NT-Xent" in done.stdout
    assert loss_kernel.RATIO_NOTE in done.stdout
    for name in ("loss_kernel.csv", "loss_kernel.md", "loss_kernel.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "loss_kernel.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == loss_kernel.COLUMNS
    return rows


def check_row(row: dict, rounds: int) -> None:
    assert row["status"] == "ok", row
    assert row["threads"] == "1"
    assert row["cpu_flags"].split()[0] in ("amx", "no-amx")
    assert int(row["passes"]) == rounds
    low, mid, high = (float(row[c]) for c in ("min_ms", "median_ms", "max_ms"))
    assert 0 < low <= mid <= high < 60_000
    assert 0 < float(row["pct_of_floor"]) < 1e6
    assert float(row["tflops"]) > 0


def test_bench_runs_through_the_cli_in_one_process(tmp_path):
    rows = run_bench(
        tmp_path,
        "--impls",
        "msr-torch",
        "naive",
        "lightly",
        "--precision",
        "fp32",
        "bf16",
        "--isolation",
        "none",
    )
    keys = {(r["impl"], r["N"], r["precision"]) for r in rows}
    assert ("gemm-floor", "16", "bf16") in keys
    assert ("msr-torch", "32", "bf16") in keys
    assert ("naive", "32", "-") in keys
    assert len(rows) == 2 * (2 + 2 + 1 + 1)  # per N: floor and msr-torch twice, naive, lightly
    for row in rows:
        check_row(row, rounds=3)
        assert math.isnan(float(row["peak_mib"]))
        assert row["dtype"] == "float32" and row["tau"] == "0.2"
    floor = [r for r in rows if r["impl"] == "gemm-floor"]
    assert all(float(r["pct_of_floor"]) == pytest.approx(100.0) for r in floor)
    lightly = [r for r in rows if r["impl"] == "lightly"]
    assert all(float(r["x_lightly"]) == pytest.approx(1.0) for r in lightly)


def test_bench_in_subprocesses_measures_memory(tmp_path):
    rows = run_bench(tmp_path, "--impls", "msr-torch", "--sizes", "16")
    assert {r["impl"] for r in rows} == {"gemm-floor", "msr-torch"}
    for row in rows:
        check_row(row, rounds=3)
    assert float(next(r for r in rows if r["impl"] == "msr-torch")["peak_mib"]) >= 0


def test_the_markdown_table_says_what_its_ratios_compare():
    row = {column: 2.0 for column in loss_kernel.COLUMNS} | {"impl": "msr-torch", "n": 16}
    table = loss_kernel.markdown_table([row])
    header, rule, line = table.splitlines()[:3]
    assert header.split(" | ")[0] == "| impl"
    assert rule.count("---") == len(loss_kernel.TABLE_COLUMNS)
    assert line.startswith("| msr-torch |")
    assert "plain NT-Xent" in table and "strata" in table


def test_the_plot_has_a_panel_per_dimension_and_the_legend_outside(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self)
    )
    rows = [
        {
            "impl": impl,
            "N": size,
            "D": dim,
            "n": n,
            "precision": "fp32",
            "status": "ok",
            "median_ms": 1.0 + size,
            "peak_mib": 2.0,
        }
        for impl, n in (("msr-torch", 4), ("msr-torch", 16), ("lightly", "-"))
        for size in (16, 32)
        for dim in (8, 64)
    ]
    loss_kernel.plot(rows, tmp_path / "plot.png")
    (figure,) = saved
    panels = [axis for axis in figure.axes if axis.get_title().startswith("D = ")]
    assert sorted({axis.get_title() for axis in panels}) == ["D = 64", "D = 8"]
    (legend,) = figure.legends
    assert len(legend.get_texts()) == 3
    figure.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.x0 >= axis.get_window_extent().x1 for axis in panels)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_stops_with_a_clear_message_without_cuda(capsys):
    assert gpu_check.main(["--out-dir", "unused"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_check_plans_the_cuda_tests_and_the_full_comparison(tmp_path):
    commands = gpu_check.test_commands()
    assert any("tests/test_triton_kernel.py" in c for c in commands)
    assert any(c[-3:] == ["-m", "cuda", "tests"] for c in commands)
    args = loss_kernel._parser().parse_args(gpu_check.bench_arguments(tmp_path, 200))
    assert args.device == "cuda" and max(args.sizes) == 65536
    assert set(args.impls) == set(loss_kernel.IMPLEMENTATIONS)
    assert args.precision == ["fp32", "tf32", "bf16"] and args.rounds >= 3
