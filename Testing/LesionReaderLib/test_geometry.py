"""LesionGeometry: lengths, centre, angle, gaps, the parallelogram ROI and validation, on hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LesionReaderLib import contrast
from LesionReaderLib.geometry import (
    LesionGeometry,
    LesionGeometryError,
    Parallelogram,
    as_axis,
    axis_length,
    segment_distance,
)
from LesionReaderLib.results import Mark
from LesionReaderLib.session import LesionRecord, lesion_from_row

# A 3-4-5 lesion in the z = 0 plane: long axis (0,0,0)-(6,8,0) is 10 mm; short axis (5,1.5,0)-(1,4.5,0)
# is (-4, 3, 0), 5 mm, perpendicular to (6, 8, 0); it crosses the long axis at (2.52, 3.36, 0).
LONG = ((0.0, 0.0, 0.0), (6.0, 8.0, 0.0))
SHORT = ((5.0, 1.5, 0.0), (1.0, 4.5, 0.0))
# A 10 x 6 mm rectangle lesion on the x axis.
RECT_LONG = ((0.0, 0.0, 0.0), (10.0, 0.0, 0.0))
RECT_SHORT = ((5.0, -3.0, 0.0), (5.0, 3.0, 0.0))


def test_lengths_centre_angle_and_gap():
    g = LesionGeometry(LONG, SHORT, "7")
    assert (g.long_mm, g.short_mm) == (10.0, 5.0)
    assert (g.measured_long_mm, g.measured_short_mm) == (10.0, 5.0)
    # Centroid of the end points: x (0 + 6 + 5 + 1) / 4 = 3, y (0 + 8 + 1.5 + 4.5) / 4 = 3.5.
    assert g.center == g.measured_center == (3.0, 3.5, 0.0)
    assert g.end_points == (*LONG, *SHORT)
    assert g.angle_deg == pytest.approx(90.0)
    assert g.axis_gap_mm == 0.0  # the axes cross
    assert g.lesion_id == "7"
    assert axis_length(LONG) == 10.0


def test_recorded_lengths_and_centre_win_over_the_measured_ones():
    g = LesionGeometry(LONG, SHORT, "1", recorded_long_mm=10.2, recorded_short_mm=4.9, recorded_center=(3, 3, 0))
    assert (g.long_mm, g.short_mm, g.center) == (10.2, 4.9, (3.0, 3.0, 0.0))
    assert (g.measured_long_mm, g.measured_short_mm, g.measured_center) == (10.0, 5.0, (3.0, 3.5, 0.0))


def test_angle_between_the_axes():
    # Short axis (3,-2,0)-(7,2,0) runs along (1, 1, 0): 45 deg to the x axis, whichever way it is drawn.
    assert LesionGeometry(RECT_LONG, ((3, -2, 0), (7, 2, 0))).angle_deg == pytest.approx(45.0)
    assert LesionGeometry(RECT_LONG, ((7, 2, 0), (3, -2, 0))).angle_deg == pytest.approx(45.0)
    assert math.isnan(LesionGeometry(RECT_LONG, ((1, 1, 1), (1, 1, 1))).angle_deg)


def test_center_distance():
    a = LesionGeometry(LONG, SHORT)
    b = LesionGeometry(*(tuple((x + 3.0, y + 4.0, z) for x, y, z in axis) for axis in (LONG, SHORT)))
    assert b.center == (6.0, 7.5, 0.0)
    assert a.center_distance_mm(b) == b.center_distance_mm(a) == 5.0  # (3, 4, 0) apart


@pytest.mark.parametrize("a,b,expected", [
    # Closest points (5,0,0) and (5,3,4): a 3-4-5 triangle.
    (RECT_LONG, ((5, 3, 4), (5, 3, 10)), 5.0),
    # Parallel segments 3 mm apart, overlapping along x.
    (RECT_LONG, ((2, 0, 3), (8, 0, 3)), 3.0),
    # Parallel and beyond the end: (10,0,0) to (13,4,0).
    (RECT_LONG, ((13, 4, 0), (20, 4, 0)), 5.0),
    # Crossing segments.
    (RECT_LONG, RECT_SHORT, 0.0),
    # Skew lines whose closest points lie inside both segments: (4,0,0) and (4,0,2).
    (RECT_LONG, ((4, -5, 2), (4, 5, 2)), 2.0),
    # A zero-length segment is a point: (4,3,0) is 3 mm above (4,0,0); (-3,-4,0) is 5 mm from (0,0,0).
    (RECT_LONG, ((4, 3, 0), (4, 3, 0)), 3.0),
    (((-3, -4, 0), (-3, -4, 0)), RECT_LONG, 5.0),
    (((0, 0, 0), (0, 0, 0)), ((3, 4, 0), (3, 4, 0)), 5.0),
])
def test_segment_distance(a, b, expected):
    a, b = as_axis(a, "a"), as_axis(b, "b")
    assert segment_distance(a, b) == pytest.approx(expected, abs=1e-12)
    assert segment_distance(b, a) == pytest.approx(expected, abs=1e-12)


def test_axis_gap_of_a_short_axis_beside_the_long_one():
    assert LesionGeometry(RECT_LONG, ((5, 20, 0), (5, 26, 0))).axis_gap_mm == 20.0


def test_rectangle_roi_corners_area_and_containment():
    roi = LesionGeometry(RECT_LONG, RECT_SHORT).parallelogram()
    assert sorted(map(tuple, roi.corners())) == [(0, -3, 0), (0, 3, 0), (10, -3, 0), (10, 3, 0)]
    assert roi.area == 60.0  # 10 x 6 mm
    assert tuple(roi.origin) == (5.0, 0.0, 0.0) and (roi.a0, roi.b0) == (-0.5, -0.5)
    points = [(5, 0, 0), (0, 3, 0), (10, -3, 0), (9.9, 2.9, 0), (10.1, 0, 0), (5, 3.1, 0), (-0.1, 0, 0), (5, 0, 0.5), (5, 0, 1e-9)]
    assert roi.contains(points).tolist() == [True, True, True, True, False, False, False, False, True]
    assert roi.contains([(5, 0, 0.5)], max_offset=0.5).tolist() == [True]
    # covers: the projection onto the plane is inside, whatever the distance to it.
    assert roi.covers([(5, 0, 7), (11, 0, 7)]).tolist() == [True, False]
    # The short axis off-centre (at x = 2) bounds the same rectangle.
    off = LesionGeometry(RECT_LONG, ((2, -3, 0), (2, 3, 0))).parallelogram()
    assert sorted(map(tuple, off.corners())) == sorted(map(tuple, roi.corners()))


def test_sheared_roi_of_oblique_axes():
    # Long axis (0,0,0)-(4,0,0); short axis (1,-1,0)-(3,1,0) along (1, 1, 0). The sides through the
    # long-axis end points run along (1, 1, 0) and meet y = -1 and y = 1 at (-1,-1), (1,1), (3,-1) and (5,1):
    # base 4, height 2, area 8. At y = 0.9 the parallelogram spans x from 0.9 to 4.9.
    roi = LesionGeometry(((0, 0, 0), (4, 0, 0)), ((1, -1, 0), (3, 1, 0))).parallelogram()
    assert sorted(map(tuple, np.round(roi.corners(), 12) + 0.0)) == [(-1, -1, 0), (1, 1, 0), (3, -1, 0), (5, 1, 0)]
    assert roi.area == pytest.approx(8.0)
    inside = roi.contains([(4.5, 0.9, 0), (0.5, 0.9, 0), (-0.9, -0.9, 0), (5.0, 0.9, 0), (2, 0, 0)])
    assert inside.tolist() == [True, False, True, False, True]


def test_roi_in_another_frame():
    # An affine map takes the parallelogram of the axes to the parallelogram of the mapped axes:
    # doubling every coordinate doubles the corners and quadruples the area.
    g = LesionGeometry(RECT_LONG, RECT_SHORT)
    roi = g.parallelogram(lambda pts: 2.0 * pts)
    assert sorted(map(tuple, roi.corners())) == [(0, -6, 0), (0, 6, 0), (20, -6, 0), (20, 6, 0)]
    assert roi.area == 240.0
    assert isinstance(Parallelogram.spanning(*g.end_points), Parallelogram)


def test_degenerate_roi_is_refused_with_the_lengths():
    parallel = LesionGeometry(RECT_LONG, ((0, 1, 0), (5, 1, 0)))
    with pytest.raises(LesionGeometryError, match=r"degenerate or parallel \(long 10.00 mm, short 5.00 mm\); redraw"):
        parallel.parallelogram()
    with pytest.raises(LesionGeometryError, match=r"short 0.00 mm"):
        LesionGeometry(RECT_LONG, ((5, 1, 0), (5, 1, 0))).parallelogram()


def test_construction_checks_points_and_makes_floats():
    g = LesionGeometry(((0, 0, 0), (10, 0, 0)), [np.array([5, -3, 0]), [5, 3, 0]], 3, recorded_long_mm=10, recorded_center=[5, 0, 0])
    assert g.long_axis == RECT_LONG and g.short_axis == RECT_SHORT and g.lesion_id == "3"
    assert all(type(c) is float for p in g.end_points for c in p)
    assert type(g.recorded_long_mm) is float and g.recorded_center == (5.0, 0.0, 0.0)
    assert g == LesionGeometry(RECT_LONG, RECT_SHORT, "3", 10.0, None, (5.0, 0.0, 0.0))
    assert len({g, LesionGeometry(RECT_LONG, RECT_SHORT, "3", 10.0, None, (5.0, 0.0, 0.0))}) == 1  # hashable value
    with pytest.raises(AttributeError):
        g.lesion_id = "4"  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,message", [
    ({"long_axis": 5}, r"long_axis must be two RAS points \(\(x1, y1, z1\), \(x2, y2, z2\)\) in mm, got 5"),
    ({"long_axis": ((0, 0), (1, 0, 0))}, "long_axis must be two finite 3D points in RAS mm"),
    ({"long_axis": ((0, 0, 0), (1, 0, 0), (2, 0, 0))}, "long_axis must be two RAS points"),
    ({"short_axis": ((0, 0, float("nan")), (1, 0, 0))}, "short_axis must be two finite 3D points"),
    ({"short_axis": ((0, 0, 0), (float("inf"), 0, 0))}, "short_axis must be two finite 3D points"),
    ({"short_axis": (("a", 0, 0), (1, 0, 0))}, "short_axis must be two RAS points"),
    ({"recorded_long_mm": -1.0}, r"recorded_long_mm must be a finite length >= 0 mm, got -1.0"),
    ({"recorded_short_mm": float("nan")}, "recorded_short_mm must be a finite length"),
    ({"recorded_center": (0, float("nan"), 0)}, "recorded_center must be a finite 3D point"),
    ({"recorded_center": (0, 0)}, "recorded_center must be a finite 3D point"),
])
def test_construction_refuses_what_is_not_two_finite_3d_axes(kwargs, message):
    args = {"long_axis": RECT_LONG, "short_axis": RECT_SHORT, **kwargs}
    with pytest.raises(LesionGeometryError, match=message):
        LesionGeometry(**args)
    assert issubclass(LesionGeometryError, ValueError)


def test_bidirectional_rules():
    LesionGeometry(RECT_LONG, RECT_SHORT).check_bidirectional()
    LesionGeometry(RECT_LONG, ((4, -3, 0), (6, 3, 0))).check_bidirectional()  # ~72 deg: roughly perpendicular
    cases = [
        (((1, 1, 1), (1, 1, 1)), RECT_SHORT, r"long axis is 0.00 mm long \(< 0.5 mm\)"),
        (RECT_LONG, ((5, 0, 0), (5, 0.3, 0)), r"short axis is 0.30 mm long \(< 0.5 mm\)"),
        (RECT_LONG, ((5, -6, 0), (5, 6, 0)), r"short axis \(12.0 mm\) is longer than the long axis \(10.0 mm\)"),
        (RECT_LONG, ((3, -2, 0), (7, 2, 0)), r"short axis makes 45 deg with the long axis; it must be roughly perpendicular \(90 \+/- 20 deg\)"),
        (RECT_LONG, ((5, 20, 0), (5, 26, 0)), r"short axis passes 20.0 mm from the long axis \(more than half its 10.0 mm\)"),
    ]
    for long_axis, short_axis, message in cases:
        with pytest.raises(LesionGeometryError, match=message):
            LesionGeometry(long_axis, short_axis).check_bidirectional()
    # The perpendicularity tolerance is a parameter; a short axis exactly as long as the long one is fine.
    LesionGeometry(RECT_LONG, ((3, -2, 0), (7, 2, 0))).check_bidirectional(tolerance_deg=50)
    LesionGeometry(RECT_LONG, ((5, -5, 0), (5, 5, 0))).check_bidirectional()
    # A gap of exactly half the long axis is allowed: short axis from (5,5,0) to (5,11,0) is 5 mm away.
    LesionGeometry(RECT_LONG, ((5, 5, 0), (5, 11, 0))).check_bidirectional()


def test_old_names_read_the_geometry():
    assert contrast.LesionAxes is LesionGeometry
    g = LesionGeometry(LONG, SHORT, "2", 10.1, 5.0, (3.0, 3.4, 0.0))
    mark = Mark("R1", "T1c", "c1", g)
    assert mark.as_lesion() is g and mark.lesion == "2"
    assert (mark.long_mm, mark.short_mm, mark.long_axis, mark.short_axis, mark.center) == (10.1, 5.0, LONG, SHORT, (3.0, 3.4, 0.0))
    row = {"id": 9, **{f"long_{c}{i}": LONG[i - 1][k] for i in (1, 2) for k, c in enumerate("xyz")},
           **{f"short_{c}{i}": SHORT[i - 1][k] for i in (1, 2) for k, c in enumerate("xyz")}}
    record = lesion_from_row(row, 4)
    assert record == LesionRecord(9, 4, LesionGeometry(LONG, SHORT, "4"))
    assert (record.long_axis, record.short_axis, record.long_mm, record.short_mm, record.center) == (LONG, SHORT, 10.0, 5.0, (3.0, 3.5, 0.0))
    assert record.to_dict() == {"id": 9, "number": 4, "long_mm": 10.0, "short_mm": 5.0, "long_axis": [list(p) for p in LONG],
                                "short_axis": [list(p) for p in SHORT], "center": [3.0, 3.5, 0.0]}
