"""The clinical registration bench's summary and table, on rows with hand-worked numbers."""

from __future__ import annotations

import pytest

from ContrastAmplifierLib.bench import registration_table, summarise_registration


def _row(case, modality, method, mean_mm, max_mm, seconds, suspect=None, other=None):
    row = {"case": case, "modality": modality, "method": method, "mean_mm": mean_mm, "max_mm": max_mm, "seconds": seconds}
    if suspect is not None:
        row["suspect"] = suspect
    if other is not None:
        row["other_findings"] = other
    return row


def test_summary_counts_errors_flags_and_other_warnings_per_method_and_modality():
    rows = [
        _row("a", "flair", "multi", 0.2, 0.5, 1.0, False, []),
        _row("b", "flair", "multi", 0.4, 0.9, 3.0, False, ["overlap.fov"]),
        _row("c", "flair", "multi", 5.0, 9.0, 2.0, True, ["motion.translation", "similarity.gradient"]),
        _row("a", "flair", "ants_rigid", 0.1, 0.3, 4.0),
        _row("a", "t1c", "affine_to_atlas", 0.5, 1.5, 0.9),
    ]
    summary = summarise_registration(rows)
    multi = summary["multi"]["flair"]
    assert multi["cases"] == 3
    assert multi["mean_mm"] == pytest.approx(5.6 / 3) and multi["median_mm"] == pytest.approx(0.4)
    assert multi["max_mm"] == 5.0 and multi["worst_point_mm"] == 9.0 and multi["cases_over_3mm"] == 1
    assert multi["median_seconds"] == 2.0
    assert (multi["flagged"], multi["flagged_over_3mm"], multi["warned"]) == (1, 1, 2)
    assert "flagged" not in summary["ants_rigid"]["flair"] and "warned" not in summary["ants_rigid"]["flair"]
    assert list(summary) == ["multi", "ants_rigid", "affine_to_atlas"] and list(summary["affine_to_atlas"]) == ["t1c"]
    lines = registration_table(summary).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == 12
    assert lines[2] == "| multi | flair | 3 | 1.87 | 0.40 | 5.00 | 9.00 | 1 | 1 (1) | 2 | 2.00 |"
    assert lines[3] == "| ants_rigid | flair | 1 | 0.10 | 0.10 | 0.10 | 0.30 | 0 | - | - | 4.00 |"
