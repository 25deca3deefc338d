"""Pairing a reader's lesion marks with the reference lesions (paper, "Performance metrics").

Paper: "Lesion tracking was automatically computed by pairing lesions whose centers were closer
than half the average of their long and short axes." For a reference lesion r and a mark m the
pair is eligible when

    ||c_r - c_m|| < (L_r + S_r + L_m + S_m) / 8

(half of the average of the four axis lengths), strictly. The paper does not say how a mark
close to two lesions (or two marks close to one lesion) is resolved; here matching is
one-to-one and optimal: the largest number of eligible pairs, and among those the smallest
total centre distance (Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`).

Lesions are :class:`~.geometry.LesionGeometry` values: their centre and long/short axis lengths
(as ``lesions.csv`` states them, else measured from the end points) are what is compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from .geometry import LesionGeometry


@dataclass
class MatchResult:
    """Outcome of :func:`match_lesions`.

    Attributes:
        pairs: (reference index, mark index, centre distance in mm), sorted by reference index.
        unmatched_reference: indices of reference lesions left undetected (false negatives).
        unmatched_marks: indices of marks matching no reference lesion (false positives).
    """

    pairs: list[tuple[int, int, float]] = field(default_factory=list)
    unmatched_reference: list[int] = field(default_factory=list)
    unmatched_marks: list[int] = field(default_factory=list)

    def mark_for_reference(self) -> dict:
        """Map reference index -> matched mark index."""
        return {r: m for r, m, _ in self.pairs}


def matching_radius(a: LesionGeometry, b: LesionGeometry) -> float:
    """Half the average of both lesions' long and short axes (paper, "Performance metrics")."""
    return 0.5 * (a.long_mm + a.short_mm + b.long_mm + b.short_mm) / 4.0


def eligible_pairs(reference: Sequence[LesionGeometry], marks: Sequence[LesionGeometry]) -> tuple[np.ndarray, np.ndarray]:
    """Centre distances and the eligibility mask (distance strictly below the matching radius).

    Returns:
        (distances, eligible), both of shape (len(reference), len(marks)).
    """
    n_ref, n_mark = len(reference), len(marks)
    if n_ref == 0 or n_mark == 0:
        return np.zeros((n_ref, n_mark)), np.zeros((n_ref, n_mark), dtype=bool)
    dist = np.array([[r.center_distance_mm(m) for m in marks] for r in reference], dtype=float)
    rs = np.array([r.long_mm + r.short_mm for r in reference], dtype=float)
    ms = np.array([m.long_mm + m.short_mm for m in marks], dtype=float)
    radius = (rs[:, None] + ms[None, :]) / 8.0
    return dist, dist < radius


def match_lesions(reference: Sequence[LesionGeometry], marks: Sequence[LesionGeometry]) -> MatchResult:
    """Match marks to reference lesions of one case, one-to-one, by the paper's centre rule.

    Eligible pairs get their centre distance as cost, ineligible ones a cost larger than any
    sum of eligible distances, so the optimal assignment first maximises the number of eligible
    pairs, then minimises their total distance; assigned ineligible pairs are dropped.

    Args:
        reference: the reference reader's lesions of the case (paper: marked on T1c-vfa).
        marks: the evaluated reader's lesions of the same case.

    Returns:
        MatchResult with the pairs, the false negatives and the false positives.
    """
    dist, ok = eligible_pairs(reference, marks)
    result = MatchResult()
    pairs: list[tuple[int, int, float]] = []
    if ok.any():
        big = float(dist[ok].sum()) + 1.0
        cost = np.where(ok, dist, big)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(r), int(c), float(dist[r, c])) for r, c in zip(rows, cols) if ok[r, c]]
    pairs.sort()
    result.pairs = pairs
    matched_ref = {r for r, _, _ in pairs}
    matched_mark = {m for _, m, _ in pairs}
    result.unmatched_reference = [i for i in range(len(reference)) if i not in matched_ref]
    result.unmatched_marks = [j for j in range(len(marks)) if j not in matched_mark]
    return result
