"""The positive control's verdict and the report's tables, on synthetic runs."""

from __future__ import annotations

import pytest

pytest.importorskip("scipy")

from msr_loss.benchmarks.digits_report import (
    control_verdict,
    detectable_table,
    multiplicity_note,
    paired_differences,
    paired_table,
)
from msr_loss.benchmarks.digits_stats import Row, power

METRICS = ("bg_decod", "neutral_shift", "neutral_fg", "paper_lin_same", "paper_lin_full")


def _rows(bg_shift: list[float], neutral_shift: list[float]) -> list[Row]:
    rows: list[Row] = []
    for seed, (bg, shift) in enumerate(zip(bg_shift, neutral_shift, strict=True)):
        base: dict[str, float] = {m: 50.0 + seed for m in METRICS}
        base |= {"paper_lin_corr": 70.0, "paper_lin_fg": 30.0, "paper_lin_bg": 40.0}
        base |= {f"paper_knn_{t}": 20.0 + seed for t in ("corr", "full", "fg")}
        base["bg_gap"] = base["paper_lin_same"] - base["paper_lin_full"]
        rows.append({"method": "simclr", "seed": seed, "draw": 0, **base})
        moved = base | {"bg_decod": base["bg_decod"] + bg}
        moved |= {"neutral_shift": base["neutral_shift"] + shift}
        rows.append({"method": "simclr_fg", "seed": seed, "draw": 0, **moved})
    return rows


def _control(bg: list[float], shift: list[float]) -> str:
    line = control_verdict(paired_differences(_rows(bg, shift)))
    assert line is not None
    return line


def test_control_accepted_when_both_tests_pass_in_their_direction() -> None:
    line = _control([-6.0, -5.5, -6.4, -5.9], [4.0, 5.0, 4.4, 4.8])
    assert line.endswith("-> ACCEPTED")
    assert "4 pairs" in line and "bg_decod -6.0 [" in line


def test_control_rejected_when_one_test_fails_or_points_the_wrong_way() -> None:
    assert "REJECTED" in _control([-6.0, -5.5, -6.4, -5.9], [4.0, -5.0, 9.4, 0.8])
    assert "REJECTED" in _control([6.0, 5.5, 6.4, 5.9], [4.0, 5.0, 4.4, 4.8])
    wrong_way = _control([6.0, 5.5, 6.4, 5.9], [4.0, 5.0, 4.4, 4.8])
    assert "estimated power 0.00" in wrong_way


def test_control_power_is_the_product_of_the_signed_powers() -> None:
    bg, shift = [-6.0, -4.0, -7.0], [2.0, 6.0, 4.0]
    line = _control(bg, shift)
    expected = power(-17 / 3, 1.5275252316519468, 3, signed=True) * power(4.0, 2.0, 3, signed=True)
    assert f"estimated power {expected:.2f}" in line


def test_no_control_line_without_both_arms() -> None:
    rows = [row for row in _rows([-6.0, -5.0], [4.0, 5.0]) if row["method"] == "simclr"]
    assert control_verdict(paired_differences(rows)) is None


def test_tables_list_each_comparison_once() -> None:
    differences = paired_differences(_rows([-6.0, -5.5, -6.4], [4.0, 5.0, 4.4]))
    assert {(d.method, d.reference) for d in differences} == {("simclr_fg", "simclr")}
    assert all(d.p <= d.p_holm for d in differences)
    table = paired_table(differences)
    assert table.count("simclr_fg - simclr") == 1 and "p=" in table
    assert detectable_table(differences).count("simclr_fg - simclr") == 1
    assert f"{len(differences)} tests (1 comparisons" in multiplicity_note(differences)
