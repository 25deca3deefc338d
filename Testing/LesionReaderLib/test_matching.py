"""The paper's lesion pairing rule on hand-built geometries."""

from __future__ import annotations

import pytest

from LesionReaderLib.geometry import LesionGeometry
from LesionReaderLib.matching import match_lesions, matching_radius


def L(x, y=0.0, z=0.0, long_mm=4.0, short_mm=4.0, name=""):
    """A lesion centred at (x, y, z): long axis along x, short axis along y, lengths and centre as stated."""
    long_axis = ((x - long_mm / 2, y, z), (x + long_mm / 2, y, z))
    short_axis = ((x, y - short_mm / 2, z), (x, y + short_mm / 2, z))
    return LesionGeometry(long_axis, short_axis, name, recorded_long_mm=long_mm, recorded_short_mm=short_mm, recorded_center=(x, y, z))


def test_radius_is_half_the_average_of_four_axes():
    a, b = L(0, long_mm=10, short_mm=6), L(0, long_mm=4, short_mm=4)
    assert matching_radius(a, b) == pytest.approx(0.5 * (10 + 6 + 4 + 4) / 4)  # 3.0 mm


def test_boundary_is_strict():
    ref = [L(0, long_mm=10, short_mm=6)]
    # radius 3.0 mm: a centre exactly 3 mm away does not match ("closer than"), 2.999 mm does.
    assert match_lesions(ref, [L(3.0, long_mm=4, short_mm=4)]).pairs == []
    res = match_lesions(ref, [L(0.0, 2.999, 0.0, long_mm=4, short_mm=4)])
    assert [(r, m) for r, m, _ in res.pairs] == [(0, 0)]
    assert res.pairs[0][2] == pytest.approx(2.999)
    # The mark's own size enlarges the radius: a 20 x 20 mm mark 5 mm away matches (radius 7.5).
    assert len(match_lesions(ref, [L(0, 0, 5.0, long_mm=20, short_mm=20)]).pairs) == 1


def test_one_to_one_and_unmatched_lists():
    ref = [L(0, name="a"), L(100, name="b")]
    marks = [L(0.5), L(0.7), L(50)]  # two marks on lesion a, one far from everything
    res = match_lesions(ref, marks)
    assert [(r, m) for r, m, _ in res.pairs] == [(0, 0)]  # closest mark wins
    assert res.unmatched_reference == [1]
    assert res.unmatched_marks == [1, 2]


def test_conflicts_resolved_optimally():
    # Two reference lesions 2 mm apart, radius 2 mm for all (4 mm axes). Mark p is 0.5 mm from
    # r0 and 1.5 mm from r1; mark q is 1.8 mm from r0 and 3.8 mm from r1 (ineligible).
    # Greedy nearest pairing would take (r0, p) and leave q and r1 unmatched; the optimal
    # assignment matches both: (r0, q) and (r1, p).
    ref = [L(0.0), L(2.0)]
    marks = [L(0.5), L(-1.8)]  # p, q
    res = match_lesions(ref, marks)
    assert sorted((r, m) for r, m, _ in res.pairs) == [(0, 1), (1, 0)]
    assert res.unmatched_reference == [] and res.unmatched_marks == []


def test_minimal_total_distance_among_maximal_matchings():
    ref = [L(0.0), L(10.0)]
    marks = [L(9.0), L(1.0), L(0.2)]
    res = match_lesions(ref, marks)
    assert sorted((r, m) for r, m, _ in res.pairs) == [(0, 2), (1, 0)]
    assert res.unmatched_marks == [1]


def test_empty_inputs():
    assert match_lesions([], [L(0)]).unmatched_marks == [0]
    assert match_lesions([L(0)], []).unmatched_reference == [0]
    assert match_lesions([], []).pairs == []


def test_three_dimensional_distance():
    ref = [L(0, 0, 0, long_mm=8, short_mm=8)]  # radius 3 with a 4 x 4 mark... (8+8+4+4)/8 = 3
    assert len(match_lesions(ref, [L(1.7, 1.7, 1.7)]).pairs) == 1  # |d| = 2.94
    assert match_lesions(ref, [L(1.8, 1.8, 1.8)]).pairs == []  # |d| = 3.12
