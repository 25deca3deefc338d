"""One lesion's geometry: its long and short axes in RAS millimetres (paper, "Reader study protocol").

Readers "marked the major and minor axes of all visible enhancing lesions": a lesion is two
segments, the long (major) axis and the short (minor) axis, each given by its two end points in
RAS mm (3D Slicer world coordinates). :class:`LesionGeometry` is that value everywhere: in a
reading session (:class:`~.session.LesionRecord`), in the parsed ``lesions.csv``
(:class:`~.results.Mark`), in the matching (:mod:`.matching`) and in the contrast ROIs
(:mod:`.contrast`). It derives the axis lengths, the centre, the angle and gap between the two
axes and the lesion's parallelogram ROI, and it holds the checks of a bidirectional measurement.

A file written by another tool may state the lengths and the centre itself (``long_mm``,
``short_mm`` and ``center_x..center_z`` in ``lesions.csv``, validated against the end points
by :mod:`.reads`); those stated values are kept (``recorded_*``) and are what :attr:`long_mm`,
:attr:`short_mm` and :attr:`center` return, while ``measured_*`` always derive from the end points.

Standard library only at import time (the reading study needs no NumPy); the parallelogram ROI
imports NumPy when it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import numpy as np

Point = tuple[float, float, float]
#: The two end points of a lesion axis, RAS mm.
Axis = tuple[Point, Point]

#: Short axis: angle to the long axis must be within 90 deg +/- this tolerance ("roughly perpendicular").
PERPENDICULAR_TOLERANCE_DEG = 20.0
#: Shortest axis accepted (mm): below this a click was taken for a drag.
MIN_AXIS_MM = 0.5
#: The two axes are taken as parallel when |u x v| < this * |u| |v| (sine of the angle between them).
PARALLEL_SINE = 1e-9


class LesionGeometryError(ValueError):
    """Lesion axes that do not describe a lesion; the message says which rule failed and how to redraw."""


def as_point(value: Any, name: str) -> Point:
    """``value`` as a finite 3D point of floats.

    Raises:
        LesionGeometryError: not three numbers, or one of them is not finite.
    """
    try:
        point = tuple(float(c) for c in value)
    except (TypeError, ValueError):
        raise LesionGeometryError(f"{name} must be a RAS point (x, y, z) in mm, got {value!r}") from None
    if len(point) != 3 or not all(math.isfinite(c) for c in point):
        raise LesionGeometryError(f"{name} must be a finite 3D point in RAS mm, got {value!r}")
    return (point[0], point[1], point[2])


def as_axis(value: Any, name: str) -> Axis:
    """``value`` as an axis: two finite 3D points of floats.

    Raises:
        LesionGeometryError: not two points of three finite numbers (the message names ``name``).
    """
    try:
        p1, p2 = value
        points = (tuple(float(c) for c in p1), tuple(float(c) for c in p2))
    except (TypeError, ValueError):
        raise LesionGeometryError(f"{name} must be two RAS points ((x1, y1, z1), (x2, y2, z2)) in mm, got {value!r}") from None
    if any(len(p) != 3 for p in points) or not all(math.isfinite(c) for p in points for c in p):
        raise LesionGeometryError(f"{name} must be two finite 3D points in RAS mm, got {value!r}")
    (a, b) = points
    return ((a[0], a[1], a[2]), (b[0], b[1], b[2]))


def axis_length(axis: Axis) -> float:
    """Distance between an axis' two end points (mm)."""
    return math.dist(axis[0], axis[1])


def _dot(u: tuple[float, ...], v: tuple[float, ...]) -> float:
    return sum(u[i] * v[i] for i in range(3))


def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def segment_distance(a: Axis, b: Axis) -> float:
    """Shortest distance between two 3D segments (clamped closest points; a zero-length segment is a point)."""
    p, q = a[0], b[0]
    d1 = tuple(a[1][i] - a[0][i] for i in range(3))
    d2 = tuple(b[1][i] - b[0][i] for i in range(3))
    r = tuple(p[i] - q[i] for i in range(3))
    aa, ee, ff = _dot(d1, d1), _dot(d2, d2), _dot(d2, r)
    c = _dot(d1, r)
    if aa == 0.0 and ee == 0.0:
        s, t = 0.0, 0.0
    elif aa == 0.0:
        s, t = 0.0, _clamp01(ff / ee)
    elif ee == 0.0:
        s, t = _clamp01(-c / aa), 0.0
    else:
        bb = _dot(d1, d2)
        denom = aa * ee - bb * bb
        s = _clamp01((bb * ff - c * ee) / denom) if denom > 1e-12 else 0.0
        t = (bb * s + ff) / ee
        if t < 0.0:
            t, s = 0.0, _clamp01(-c / aa)
        elif t > 1.0:
            t, s = 1.0, _clamp01((bb - c) / aa)
    c1 = [p[i] + d1[i] * s for i in range(3)]
    c2 = [q[i] + d2[i] * t for i in range(3)]
    return math.sqrt(sum((c1[i] - c2[i]) ** 2 for i in range(3)))


def _length_or_none(value: Optional[float], name: str) -> Optional[float]:
    if value is None:
        return None
    try:
        length = float(value)
    except (TypeError, ValueError):
        raise LesionGeometryError(f"{name} must be a length in mm, got {value!r}") from None
    if not math.isfinite(length) or length < 0:
        raise LesionGeometryError(f"{name} must be a finite length >= 0 mm, got {value!r}")
    return length


@dataclass(frozen=True, eq=False)
class Parallelogram:
    """A lesion's ROI (paper, "Performance metrics": "the parallelograms built from the reference
    long and short axes"), in the frame of the points it was built from (RAS mm, or an image's
    continuous voxel indices: an affine map takes the parallelogram of the axes to the
    parallelogram of the mapped axes).

    It is bounded by the two lines parallel to the short axis through the long-axis end points
    and the two lines parallel to the long axis through the short-axis end points, so the four
    end points lie on its sides (when the axes bisect each other it is centred on their
    crossing). A point ``origin + a u + b v + c normal`` projects into it when
    ``a0 <= a <= a0 + 1`` and ``b0 <= b <= b0 + 1``.

    Attributes:
        origin: the mean of the four end points.
        u: the long axis as a vector (second end point minus first).
        v: the short axis as a vector.
        normal: ``u x v``, normal to the plane of the axes (its length is the area).
        a0: the first long-axis end point's coordinate along ``u`` from ``origin``.
        b0: the first short-axis end point's coordinate along ``v`` from ``origin``.
    """

    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    normal: np.ndarray
    a0: float
    b0: float

    @classmethod
    def spanning(cls, long_start: Any, long_end: Any, short_start: Any, short_end: Any) -> Parallelogram:
        """The parallelogram of a long axis (``long_start`` to ``long_end``) and a short axis.

        Raises:
            LesionGeometryError: an axis of zero length, or the two axes parallel
                (``|u x v| < PARALLEL_SINE |u| |v|``).
        """
        import numpy as np

        pts = np.array([long_start, long_end, short_start, short_end], dtype=float)
        l1, l2, s1, s2 = pts
        u, v = l2 - l1, s2 - s1
        m = np.cross(u, v)
        if np.linalg.norm(u) == 0 or np.linalg.norm(v) == 0 or np.linalg.norm(m) < PARALLEL_SINE * np.linalg.norm(u) * np.linalg.norm(v):
            raise LesionGeometryError("long and short axes are degenerate or parallel")
        origin = pts.mean(axis=0)
        basis = np.stack([u, v, m], axis=1)
        a0 = float(np.linalg.solve(basis, l1 - origin)[0])
        b0 = float(np.linalg.solve(basis, s1 - origin)[1])
        return cls(origin=origin, u=u, v=v, normal=m, a0=a0, b0=b0)

    @property
    def basis(self) -> np.ndarray:
        """The 3 x 3 matrix whose columns are ``u``, ``v`` and ``normal``."""
        import numpy as np

        return np.stack([self.u, self.v, self.normal], axis=1)

    @property
    def area(self) -> float:
        """The parallelogram's area (``|u x v|``), in the squared unit of its frame."""
        import numpy as np

        return float(np.linalg.norm(self.normal))

    def corners(self) -> np.ndarray:
        """The four corners (4 x 3): (a0, b0), (a0, b0 + 1), (a0 + 1, b0), (a0 + 1, b0 + 1) in (u, v) units."""
        import numpy as np

        return np.array([self.origin + (self.a0 + a) * self.u + (self.b0 + b) * self.v for a in (0, 1) for b in (0, 1)])

    def coordinates(self, points: Any, *, from_origin: bool = False) -> np.ndarray:
        """``(a, b, c)`` of each point (N x 3) with ``point = origin + a u + b v + c normal``.

        ``from_origin``: the points are already vectors from :attr:`origin`.
        """
        import numpy as np

        r = np.atleast_2d(np.asarray(points, dtype=float))
        if not from_origin:
            r = r - self.origin
        return np.linalg.solve(self.basis, r.T).T

    def _inside(self, ab: np.ndarray, eps: float) -> np.ndarray:
        return (
            (ab[:, 0] >= self.a0 - eps) & (ab[:, 0] <= self.a0 + 1 + eps)
            & (ab[:, 1] >= self.b0 - eps) & (ab[:, 1] <= self.b0 + 1 + eps)
        )

    def covers(self, points: Any, *, from_origin: bool = False, eps: float = 1e-9) -> np.ndarray:
        """Whether each point's orthogonal projection onto the plane lies in the parallelogram
        (``eps``: tolerance in ``(a, b)`` units, so points on the sides count)."""
        return self._inside(self.coordinates(points, from_origin=from_origin), eps)

    def contains(self, points: Any, max_offset: float = 1e-6, eps: float = 1e-9) -> np.ndarray:
        """Whether each point lies in the parallelogram: covered (:meth:`covers`) and at most
        ``max_offset`` (frame units) from its plane."""
        import numpy as np

        abc = self.coordinates(points)
        return self._inside(abc, eps) & (np.abs(abc[:, 2]) * self.area <= max_offset)


@dataclass(frozen=True)
class LesionGeometry:
    """One lesion measured by two axes, end points in RAS mm (the paper's "major and minor axes").

    Construction checks that each axis is two finite 3D points (:func:`as_axis`) and turns them
    into float tuples; it does not judge the measurement (see :meth:`check_bidirectional`), so
    data written by other tools can be carried and refused where it is used, with that place's
    message.

    Attributes:
        long_axis: ``((x1, y1, z1), (x2, y2, z2))``, the long (major) axis.
        short_axis: the short (minor) axis, same form.
        lesion_id: the lesion's identifier where it has one (the ``lesion`` column of
            ``lesions.csv``, the number a reader sees), for messages and audit rows.
        recorded_long_mm, recorded_short_mm, recorded_center: lengths and centre as a file
            stated them (``None``: derived from the end points).
    """

    long_axis: Axis
    short_axis: Axis
    lesion_id: str = ""
    recorded_long_mm: Optional[float] = None
    recorded_short_mm: Optional[float] = None
    recorded_center: Optional[Point] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "long_axis", as_axis(self.long_axis, "long_axis"))
        object.__setattr__(self, "short_axis", as_axis(self.short_axis, "short_axis"))
        object.__setattr__(self, "lesion_id", str(self.lesion_id))
        object.__setattr__(self, "recorded_long_mm", _length_or_none(self.recorded_long_mm, "recorded_long_mm"))
        object.__setattr__(self, "recorded_short_mm", _length_or_none(self.recorded_short_mm, "recorded_short_mm"))
        if self.recorded_center is not None:
            object.__setattr__(self, "recorded_center", as_point(self.recorded_center, "recorded_center"))

    # -- derived quantities -------------------------------------------------------------------
    @property
    def end_points(self) -> tuple[Point, Point, Point, Point]:
        """Long-axis start and end, then short-axis start and end."""
        return (*self.long_axis, *self.short_axis)

    @property
    def measured_long_mm(self) -> float:
        """Long-axis length from its end points (mm)."""
        return axis_length(self.long_axis)

    @property
    def measured_short_mm(self) -> float:
        """Short-axis length from its end points (mm)."""
        return axis_length(self.short_axis)

    @property
    def measured_center(self) -> Point:
        """Centroid of the four end points (= mean of the two axes' midpoints)."""
        pts = self.end_points
        return (sum(p[0] for p in pts) / 4.0, sum(p[1] for p in pts) / 4.0, sum(p[2] for p in pts) / 4.0)

    @property
    def long_mm(self) -> float:
        """The lesion size (paper: the long-axis length): as recorded, else measured."""
        return self.measured_long_mm if self.recorded_long_mm is None else self.recorded_long_mm

    @property
    def short_mm(self) -> float:
        """Short-axis length: as recorded, else measured."""
        return self.measured_short_mm if self.recorded_short_mm is None else self.recorded_short_mm

    @property
    def center(self) -> Point:
        """The lesion centre used by the matching: as recorded, else :attr:`measured_center`."""
        return self.measured_center if self.recorded_center is None else self.recorded_center

    @property
    def angle_deg(self) -> float:
        """Angle between the two axes' directions, 0 to 90 deg (``nan`` when an axis has zero length)."""
        long_mm, short_mm = self.measured_long_mm, self.measured_short_mm
        if long_mm == 0 or short_mm == 0:
            return math.nan
        (l1, l2), (s1, s2) = self.long_axis, self.short_axis
        u = [(l2[i] - l1[i]) / long_mm for i in range(3)]
        v = [(s2[i] - s1[i]) / short_mm for i in range(3)]
        return math.degrees(math.acos(min(1.0, abs(sum(u[i] * v[i] for i in range(3))))))

    @property
    def axis_gap_mm(self) -> float:
        """Shortest distance between the long and the short axis (0 when they cross)."""
        return segment_distance(self.long_axis, self.short_axis)

    def center_distance_mm(self, other: LesionGeometry) -> float:
        """Distance between this lesion's centre and ``other``'s (what the matching compares)."""
        a, b = self.center, other.center
        return math.sqrt(sum((a[i] - b[i]) * (a[i] - b[i]) for i in range(3)))

    def parallelogram(self, to_frame: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Parallelogram:
        """The lesion's parallelogram ROI (:class:`Parallelogram`), in RAS mm or, with
        ``to_frame``, in the frame the end points (a 4 x 3 array) are mapped to (e.g. an image's
        continuous voxel indices, where the ROI is voxelised).

        Raises:
            LesionGeometryError: degenerate or parallel axes (the message gives their lengths).
        """
        import numpy as np

        pts = np.array(self.end_points, dtype=float)
        if to_frame is not None:
            pts = to_frame(pts)
        try:
            return Parallelogram.spanning(*pts)
        except LesionGeometryError:
            raise LesionGeometryError(
                f"long and short axes are degenerate or parallel (long {self.measured_long_mm:.2f} mm, "
                f"short {self.measured_short_mm:.2f} mm); redraw the short axis across the long axis."
            ) from None

    # -- validation ---------------------------------------------------------------------------
    def check_bidirectional(self, tolerance_deg: float = PERPENDICULAR_TOLERANCE_DEG) -> None:
        """Check a reader's bidirectional measurement (the paper's "major and minor axes").

        Rules: both axes at least :data:`MIN_AXIS_MM` long; the short axis no longer than the
        long one; roughly perpendicular (90 deg +/- ``tolerance_deg``); and the short axis
        crosses or nearly touches the long one (within half the long axis), so the two belong to
        the same lesion. Lengths are measured from the end points.

        Raises:
            LesionGeometryError: which rule failed, with the measured values and how to redraw.
        """
        long_mm, short_mm = self.measured_long_mm, self.measured_short_mm
        if long_mm < MIN_AXIS_MM:
            raise LesionGeometryError(f"long axis is {long_mm:.2f} mm long (< {MIN_AXIS_MM} mm); drag across the lesion's largest extent")
        if short_mm < MIN_AXIS_MM:
            raise LesionGeometryError(f"short axis is {short_mm:.2f} mm long (< {MIN_AXIS_MM} mm); drag across the lesion's width")
        if short_mm > long_mm * (1 + 1e-9):
            raise LesionGeometryError(
                f"short axis ({short_mm:.1f} mm) is longer than the long axis ({long_mm:.1f} mm); "
                "draw the lesion's largest extent first, or swap the two lines"
            )
        angle = self.angle_deg
        if angle < 90.0 - tolerance_deg:
            raise LesionGeometryError(
                f"short axis makes {angle:.0f} deg with the long axis; it must be roughly perpendicular "
                f"(90 +/- {tolerance_deg:g} deg): redraw it across the lesion, at right angles to the long axis"
            )
        gap = self.axis_gap_mm
        if gap > 0.5 * long_mm:
            raise LesionGeometryError(
                f"short axis passes {gap:.1f} mm from the long axis (more than half its {long_mm:.1f} mm); "
                "draw both axes on the same lesion, the short one crossing the long one"
            )


class MeasuredLesion:
    """Mixin for records that carry a ``geometry`` (a stored lesion, a lesions.csv row): its axes,
    lengths and centre as plain attributes, read from the geometry (one definition for all)."""

    geometry: LesionGeometry

    @property
    def long_axis(self) -> Axis:
        """``((x1, y1, z1), (x2, y2, z2))`` in RAS mm."""
        return self.geometry.long_axis

    @property
    def short_axis(self) -> Axis:
        return self.geometry.short_axis

    @property
    def long_mm(self) -> float:
        return self.geometry.long_mm

    @property
    def short_mm(self) -> float:
        return self.geometry.short_mm

    @property
    def center(self) -> Point:
        """Centroid of the four end points (= mean of the two axes' midpoints), used for matching."""
        return self.geometry.center

