"""Simulated reads whose detections are known by construction (the analysis and report tests).

Reference lesions sit 60 mm apart; every reader's mark is a hit, a miss or "far" by a drawn
outcome, so the expected sensitivity/FDR counts follow from the returned ground truth.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from LesionReaderLib.results import GRADES_COLUMNS, LESIONS_COLUMNS

SIZES = [3.0, 6.0, 12.0, 8.0, 4.0, 15.0, 5.0, 10.0, 2.5, 20.0]


def lesion_row(reader, phase, case, lesion, center, long_mm, short_mm):
    """A lesions.csv row for axes drawn in the axial plane, crossing at ``center`` (RAS mm)."""
    x, y, z = center
    return {
        "reader": reader, "phase": phase, "case": case, "lesion": str(lesion), "long_mm": long_mm, "short_mm": short_mm,
        "long_x1": x - long_mm / 2, "long_y1": y, "long_z1": z, "long_x2": x + long_mm / 2, "long_y2": y, "long_z2": z,
        "short_x1": x, "short_y1": y - short_mm / 2, "short_z1": z, "short_x2": x, "short_y2": y + short_mm / 2, "short_z2": z,
        "center_x": x, "center_y": y, "center_z": z,
    }


@dataclass
class SimulatedStudy:
    """Ground truth of a simulated study (what ``analyze`` must find)."""

    folder: Path
    cases: List[str]
    excluded: List[str]
    reference: Dict[str, List[float]]  # case -> reference long axes
    outcome: Dict[Tuple[str, str], Dict[Tuple[str, int], str]] = field(default_factory=dict)  # hit / miss / far
    extra_fp: Dict[Tuple[str, str], Dict[str, List[float]]] = field(default_factory=dict)  # case -> FP long axes
    grades: Dict[Tuple[str, str], Dict[str, Tuple[int, float]]] = field(default_factory=dict)

    def expected(self, reader, phase, threshold, cases=None):
        cases = [c for c in (cases or self.cases) if c not in self.excluded]
        out = self.outcome[(reader, phase)]
        n_ref = tp = fp = 0
        fp_case = []
        for c in cases:
            k = 0
            for i, long_mm in enumerate(self.reference[c]):
                if long_mm >= threshold:
                    n_ref += 1
                    tp += out[(c, i)] == "hit"
                    k += out[(c, i)] == "far"
            k += sum(1 for l in self.extra_fp[(reader, phase)].get(c, []) if l >= threshold)
            fp += k
            fp_case.append(k)
        return n_ref, tp, fp, np.array(fp_case, float)


def simulate_reads(folder: Path, n_cases: int = 16, readers=("R1", "R2"), phases=("T1c", "T1c-pro"),
                   reference=("R2", "T1c-vfa"), hit_rate=None, seed: int = 0, n_excluded: int = 1) -> SimulatedStudy:
    """Write grades.csv + lesions.csv of a study with known detections.

    Reference lesions sit 60 mm apart (no cross-talk). For every (reader, phase) and reference
    lesion the outcome is drawn: "hit" (a mark 0.4 x the matching radius away), "miss" (no mark)
    or "far" (a mark 1.25 x the radius away: one false negative plus one false positive). Extra
    false positives are placed 200 mm away from every lesion.
    """
    rng = random.Random(seed)
    hit_rate = hit_rate or {p: 0.5 + 0.3 * k for k, p in enumerate(phases)}
    folder.mkdir(parents=True, exist_ok=True)
    cases = [f"case_{i:03d}" for i in range(n_cases)]
    excluded = cases[-n_excluded:] if n_excluded else []
    sim = SimulatedStudy(folder, cases, excluded, {})
    lesions, grades = [], []
    s = 0
    for i, c in enumerate(cases):
        n = i % 4 if c not in excluded else 3
        sim.reference[c] = []
        for j in range(n):
            long_mm = SIZES[s % len(SIZES)]
            s += 1
            sim.reference[c].append(long_mm)
            lesions.append(lesion_row(*reference, c, j + 1, (60.0 * j, 0.0, 10.0 * i), long_mm, 0.6 * long_mm))
    all_reads = [(r, p) for r in readers for p in phases]
    for r, p in all_reads:
        out, extra = {}, {}
        for c in cases:
            for j, long_mm in enumerate(sim.reference[c]):
                u = rng.random()
                kind = "hit" if u < hit_rate[p] else ("far" if u < hit_rate[p] + 0.1 else "miss")
                out[(c, j)] = kind
                radius = 0.5 * (2 * long_mm + 2 * 0.6 * long_mm) / 4  # mark drawn with the lesion's size
                if kind != "miss":
                    off = 0.4 * radius if kind == "hit" else 1.25 * radius
                    lesions.append(lesion_row(r, p, c, f"m{j}", (60.0 * j + off, 0.0, 10.0 * i_of(c)), long_mm, 0.6 * long_mm))
            if rng.random() < 0.3:
                extra[c] = [rng.choice([3.0, 7.0, 11.0]) for _ in range(rng.choice([1, 2]))]
                for k, long_mm in enumerate(extra[c]):
                    lesions.append(lesion_row(r, p, c, f"fp{k}", (200.0 + 30 * k, 200.0, 10.0 * i_of(c)), long_mm, 0.5 * long_mm))
        sim.outcome[(r, p)] = out
        sim.extra_fp[(r, p)] = extra
    for r, p in dict.fromkeys(all_reads + [reference, (readers[0], reference[1])]):
        sim.grades[(r, p)] = {}
        for c in cases:
            g = min(4, max(1, round(rng.gauss(2.5 + 0.5 * (p == "T1c-pro") + 0.3 * (r == "R2"), 0.7))))
            sec = max(10.0, rng.gauss(100 + 60 * (p == "T1c-pro") + 10 * len(sim.reference[c]), 30))
            sim.grades[(r, p)][c] = (g, round(sec, 3))
            grades.append({"reader": r, "phase": p, "case": c, "grade": g, "seconds": round(sec, 3), "excluded": int(c in excluded)})
    write_csv(folder / "grades.csv", GRADES_COLUMNS, grades)
    write_csv(folder / "lesions.csv", LESIONS_COLUMNS, lesions)
    return sim


def i_of(case: str) -> int:
    return int(case.split("_")[1])


def write_csv(path: Path, columns, rows) -> None:
    """``rows`` (dicts) as a CSV file with header ``columns``, the way the reads exports write them."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
