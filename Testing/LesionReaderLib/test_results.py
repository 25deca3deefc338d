"""Result types and shared helpers (LesionReaderLib.results)."""

from __future__ import annotations

from LesionReaderLib import analysis, stats
from LesionReaderLib.geometry import LesionGeometry
from LesionReaderLib.results import (
    COMPARISON_COLUMNS,
    CONTRAST_VOLUMES,
    LESIONS_COLUMNS,
    AnalysisError,
    Mark,
    Reference,
    comparison_row,
    ordered_volumes,
)


def test_ordered_volumes():
    assert ordered_volumes(["X", "T1c-pro", "T1c", "X", "T1c-low"]) == ["T1c-low", "T1c", "T1c-pro", "X"]
    assert ordered_volumes(reversed(CONTRAST_VOLUMES)) == list(CONTRAST_VOLUMES)


def test_comparison_row_has_the_comparisons_columns():
    row = comparison_row("table5", 5.0, "sensitivity", "T1c", "R1", "T1c-pro", "R1", stats.TestResult("mcnemar_midp", 1.0, 0.25, 4))
    assert tuple(row) == COMPARISON_COLUMNS
    assert (row["test"], row["statistic"], row["p_value"]) == ("mcnemar_midp", 1.0, 0.25)


def test_mark_and_reference():
    axis = ((0.0, 0.0, 0.0), (8.0, 0.0, 0.0))
    big = Mark("R2", "T1c-vfa", "c1", LesionGeometry(axis, axis, "1", 8.0, 4.0, (4.0, 0.0, 0.0)))
    small = Mark("R2", "T1c-vfa", "c1", LesionGeometry(axis, axis, "2", 3.0, 2.0, (40.0, 0.0, 0.0)))
    lesion = big.as_lesion()
    assert (lesion.center, lesion.long_mm, lesion.short_mm, lesion.lesion_id) == ((4.0, 0.0, 0.0), 8.0, 4.0, "1")
    ref = Reference("T1c-vfa", "R2", ["c1", "c2"], {"c1": [big, small], "c2": []})
    assert (ref.key, ref.n_lesions, ref.long_mm()) == (("R2", "T1c-vfa"), 2, [8.0, 3.0])
    assert ref.keys(["c1", "c2", "c3"], 5.0) == [("c1", "1")]


def test_analysis_re_exports_the_names_it_always_had():
    assert analysis.AnalysisError is AnalysisError and analysis.LESIONS_COLUMNS == LESIONS_COLUMNS
    for name in analysis.__all__:
        assert hasattr(analysis, name), name
