"""``analyze`` on simulated studies whose detection counts are known by construction."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from LesionReaderLib.analysis import (
    COMPARISON_COLUMNS,
    DETECTION_COLUMNS,
    GRADES_COLUMNS,
    LESIONS_COLUMNS,
    AnalysisError,
    analyze,
)
from simulated_reads import lesion_row, simulate_reads

def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _row(rows, **match):
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


@pytest.fixture
def simulated(tmp_path):
    return simulate_reads(tmp_path / "reads", seed=3)


def test_detection_counts_known_by_construction(simulated, tmp_path):
    out = tmp_path / "out"
    result = analyze(simulated.folder, out)
    assert result.reference_reader == "R2" and result.reference_phase == "T1c-vfa"
    header, rows = read_csv(out / "detection.csv")
    assert tuple(header) == DETECTION_COLUMNS
    for t in (0.0, 5.0, 10.0):
        for r in ("R1", "R2"):
            for p in ("T1c", "T1c-pro"):
                n_ref, tp, fp, fp_case = simulated.expected(r, p, t)
                row = _row(rows, threshold_mm=f"{t:g}", reader=r, phase=p)
                assert (int(row["tp"]), int(row["fn"]), int(row["fp"]), int(row["n_cases"])) == (tp, n_ref - tp, fp, len(simulated.cases) - 1)
                assert float(row["sensitivity"]) == pytest.approx(tp / n_ref)
                lo, hi = st.beta.ppf(0.025, tp, n_ref - tp + 1) if tp else 0.0, st.beta.ppf(0.975, tp + 1, n_ref - tp) if tp < n_ref else 1.0
                assert (float(row["sensitivity_ci_low"]), float(row["sensitivity_ci_high"])) == pytest.approx((lo, hi))
                assert float(row["fdr_per_case"]) == pytest.approx(fp_case.mean())
                if fp_case.std() > 0:
                    ci = st.t.interval(0.95, len(fp_case) - 1, loc=fp_case.mean(), scale=st.sem(fp_case))
                    assert (float(row["fdr_ci_low"]), float(row["fdr_ci_high"])) == pytest.approx(ci)
                ppv = tp / (tp + fp)
                assert float(row["ppv"]) == pytest.approx(ppv)
                assert float(row["f1"]) == pytest.approx(2 * (tp / n_ref) * ppv / ((tp / n_ref) + ppv))
            # reader average rows: mean TP over the reference count, CI on the non-integer count
        for p in ("T1c", "T1c-pro"):
            e1, e2 = simulated.expected("R1", p, t), simulated.expected("R2", p, t)
            row = _row(rows, threshold_mm=f"{t:g}", reader="average", phase=p)
            mean_tp = (e1[1] + e2[1]) / 2
            assert float(row["tp"]) == pytest.approx(mean_tp)
            assert float(row["sensitivity"]) == pytest.approx(mean_tp / e1[0])
            assert float(row["sensitivity_ci_low"]) == pytest.approx(st.beta.ppf(0.025, mean_tp, e1[0] - mean_tp + 1))
            avg_fp = (e1[3] + e2[3]) / 2
            assert float(row["fdr_per_case"]) == pytest.approx(avg_fp.mean())
    # the reference itself and R1's grade-only T1c-vfa read are not evaluated
    assert not [r for r in rows if r["phase"] == "T1c-vfa"]


def test_comparisons_match_independent_tests(simulated, tmp_path):
    out = tmp_path / "out"
    analyze(simulated.folder, out)
    header, rows = read_csv(out / "comparisons.csv")
    assert tuple(header) == COMPARISON_COLUMNS
    cases = [c for c in simulated.cases if c not in simulated.excluded]
    keys = [(c, j) for c in cases for j, l in enumerate(simulated.reference[c]) if l >= 5.0]
    a = [simulated.outcome[("R1", "T1c")][k] == "hit" for k in keys]
    b = [simulated.outcome[("R1", "T1c-pro")][k] == "hit" for k in keys]
    nb, nc = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    n = nb + nc
    expected = st.binomtest(min(nb, nc), n, 0.5).pvalue - st.binom.pmf(min(nb, nc), n, 0.5) if nb != nc else 1 - 0.5 * st.binom.pmf(nb, n, 0.5)
    row = _row(rows, table="table5", threshold_mm="5", metric="sensitivity", reader_a="R1", reader_b="R1", phase_a="T1c", phase_b="T1c-pro")
    assert row["test"] == "mcnemar_midp" and float(row["p_value"]) == pytest.approx(expected)
    # reader vs reader, same phase
    row = _row(rows, table="table5", threshold_mm="0", metric="fdr_per_case", reader_a="R1", reader_b="R2", phase_a="T1c", phase_b="T1c")
    fa, fb = simulated.expected("R1", "T1c", 0)[3], simulated.expected("R2", "T1c", 0)[3]
    assert row["test"] == "wilcoxon"
    assert float(row["p_value"]) == pytest.approx(1.0 if np.all(fa == fb) else st.wilcoxon(fa, fb).pvalue)
    # pooled reader-average McNemar exists
    _row(rows, table="table5", threshold_mm="10", metric="sensitivity", reader_a="average", phase_a="T1c", phase_b="T1c-pro")
    # grades: paired t-test per reader between phases, on the non-excluded cases
    g1 = [simulated.grades[("R1", "T1c")][c][0] for c in cases]
    g2 = [simulated.grades[("R1", "T1c-pro")][c][0] for c in cases]
    row = _row(rows, table="table3", metric="grade", reader_a="R1", phase_a="T1c", phase_b="T1c-pro")
    assert row["test"] == "ttest_rel" and float(row["p_value"]) == pytest.approx(st.ttest_rel(g1, g2).pvalue)
    # grade-only reads count in Table 3 (R1 graded T1c-vfa) but not in the reading times (Table 6)
    _row(rows, table="table3", metric="grade", reader_a="R1", reader_b="R2", phase_a="T1c-vfa", phase_b="T1c-vfa")
    assert not [r for r in rows if r["table"] == "table6" and r["phase_a"] == "T1c-vfa" and r["reader_a"] == "R1"]
    s1 = [simulated.grades[("R1", "T1c")][c][1] for c in cases]
    s2 = [simulated.grades[("R2", "T1c")][c][1] for c in cases]
    row = _row(rows, table="table6", metric="seconds", reader_a="R1", reader_b="R2", phase_a="T1c", phase_b="T1c")
    assert float(row["p_value"]) == pytest.approx(st.ttest_rel(s1, s2).pvalue)
    assert {r["test"] for r in rows} <= {"mcnemar_midp", "wilcoxon", "ttest_rel", "ttest_ind"}
    assert {r["metric"] for r in rows} <= {"sensitivity", "fdr_per_case", "grade", "seconds", "cnr", "lbr", "cep"}


def test_quality_and_times_tables(simulated, tmp_path):
    out = tmp_path / "out"
    analyze(simulated.folder, out)
    cases = [c for c in simulated.cases if c not in simulated.excluded]
    _, quality = read_csv(out / "quality.csv")
    g = np.array([simulated.grades[("R2", "T1c-pro")][c][0] for c in cases], float)
    row = _row(quality, reader="R2", phase="T1c-pro")
    assert float(row["mean_grade"]) == pytest.approx(g.mean()) and float(row["sd_grade"]) == pytest.approx(g.std(ddof=1))
    assert sum(int(row[f"n_grade_{k}"]) for k in range(1, 5)) == len(cases)
    avg = np.mean([[simulated.grades[(r, "T1c")][c][0] for c in cases] for r in ("R1", "R2")], axis=0)
    row = _row(quality, reader="average", phase="T1c")
    assert float(row["mean_grade"]) == pytest.approx(avg.mean()) and float(row["sd_grade"]) == pytest.approx(avg.std(ddof=1))
    _, times = read_csv(out / "times.csv")
    row = _row(times, reader="R1", phase="T1c")
    sec = np.array([simulated.grades[("R1", "T1c")][c][1] for c in cases])
    n_marks = sum(simulated.outcome[("R1", "T1c")][(c, j)] != "miss" for c in cases for j in range(len(simulated.reference[c])))
    n_marks += sum(len(v) for c, v in simulated.extra_fp[("R1", "T1c")].items() if c in cases)
    assert float(row["mean_seconds"]) == pytest.approx(sec.mean())
    assert float(row["n_marks"]) == n_marks
    assert float(row["seconds_per_mark"]) == pytest.approx(sec.sum() / n_marks)
    assert float(row["paper_seconds_per_lesion"]) == pytest.approx(sec.mean() / n_marks)
    assert not [r for r in times if r["reader"] == "R1" and r["phase"] == "T1c-vfa"]


def test_report_files_and_contrast_skipped_note(simulated, tmp_path):
    out = tmp_path / "out"
    result = analyze(simulated.folder, out)
    for name in ("report.md", "report.html", "sensitivity_by_threshold.png", "grades.png", "reading_times.png", "contrast.csv", "matches.csv", "analysis.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Table 5: lesion detection" in md and "Table 3" in md and "Table 6" in md
    assert "Contrast metrics (Table 4) skipped" in md
    assert any("skipped" in n for n in result.notes)


def test_reference_options_and_errors(tmp_path):
    sim = simulate_reads(tmp_path / "reads", reference=("R9", "T1c-vfa"), readers=("R1", "R2"), seed=1)
    grades = (sim.folder / "grades.csv").read_text(encoding="utf-8").splitlines()
    (sim.folder / "grades.csv").write_text("\n".join(g for g in grades if not g.startswith("R9,")) + "\n", encoding="utf-8")
    # R9 has marks but no grades rows: refused with a fix
    with pytest.raises(AnalysisError, match="grades.csv row"):
        analyze(sim.folder, tmp_path / "o1", report=False)
    with pytest.raises(AnalysisError, match="reference phase 'T2'"):
        analyze(sim.folder, tmp_path / "o2", reference_phase="T2", report=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused: no empty output folder
    # explicit reference on another phase works (R1 on T1c-pro as the reference)
    res = analyze(sim.folder, tmp_path / "o3", reference_phase="T1c-pro", reference_reader="R1", report=False)
    assert res.reference_reader == "R1" and all(r["phase"] != "T1c-pro" or r["reader"] != "R1" for r in res.detection)
    with pytest.raises(AnalysisError, match="lacks column"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "grades.csv").write_text("reader,phase,case,grade\n", encoding="utf-8")
        (tmp_path / "bad" / "lesions.csv").write_text(",".join(LESIONS_COLUMNS) + "\n", encoding="utf-8")
        analyze(tmp_path / "bad", tmp_path / "o4")
    with pytest.raises(AnalysisError, match="missing"):
        analyze(tmp_path / "o3", tmp_path / "o5")


def test_ambiguous_reference_reader(tmp_path):
    sim = simulate_reads(tmp_path / "reads", phases=("T1c", "T1c-vfa"), seed=2)
    with pytest.raises(AnalysisError, match="--reference-reader"):
        analyze(sim.folder, tmp_path / "out", report=False)


def test_paper_table5_reader_average_interval(tmp_path):
    """79 cases, 187 reference lesions; R1 finds 106 and R2 111 on T1c (Table 5, >= 0 mm)."""
    folder = tmp_path / "t5"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per_case = np.zeros(79, int)
    per_case[:52] = 1
    per_case[rng.choice(52, 187 - 52, replace=True)] += 0
    extra = 187 - 52
    while extra:
        i = rng.integers(52)
        if per_case[i] < 15:
            per_case[i] += 1
            extra -= 1
    lesions, grades = [], []
    ids = [(f"c{i:02d}", j) for i in range(79) for j in range(per_case[i])]
    assert len(ids) == 187
    found = {"R1": set(rng.choice(187, 106, replace=False)), "R2": set(rng.choice(187, 111, replace=False))}
    for n, (c, j) in enumerate(ids):
        lesions.append(lesion_row("R2", "T1c-vfa", c, j, (50.0 * j, 0, 0), 9.0, 5.0))
        for r in ("R1", "R2"):
            if n in found[r]:
                lesions.append(lesion_row(r, "T1c", c, j, (50.0 * j + 0.5, 0, 0), 9.0, 5.0))
    for r, p in (("R1", "T1c"), ("R2", "T1c"), ("R2", "T1c-vfa")):
        for i in range(79):
            grades.append({"reader": r, "phase": p, "case": f"c{i:02d}", "grade": 3, "seconds": 100, "excluded": 0})
    for name, cols, rows in (("grades.csv", GRADES_COLUMNS, grades), ("lesions.csv", LESIONS_COLUMNS, lesions)):
        with open(folder / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            w.writerows(rows)
    res = analyze(folder, tmp_path / "out")
    avg = next(d for d in res.detection if d["reader"] == "average" and d["threshold_mm"] == 0)
    assert avg["tp"] == 108.5
    assert (round(100 * avg["sensitivity_ci_low"]), round(100 * avg["sensitivity_ci_high"])) == (51, 65)  # paper: [51; 65]
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "58% [51; 65]" in md and "57% (106/187)" in md and "59% (111/187)" in md


def test_cli_analyze_bare_csv_folder(simulated, tmp_path):
    from typer.testing import CliRunner

    from LesionReaderLib.cli import app

    out = tmp_path / "cli-out"
    res = CliRunner().invoke(app, ["analyze", str(simulated.folder), "--out", str(out), "--reference-phase", "T1c-vfa", "--reference-reader", "R2"])
    assert res.exit_code == 0, res.output
    assert (out / "detection.csv").is_file() and (out / "report.html").is_file()
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "nowhere"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_analyze_part1_study_reads_study_json_and_database(make_study, clock, tmp_path):
    """A real part-1 study (study.json + SQLite reads): reference taken from study.json."""
    from LesionReaderLib.session import ReaderSession

    study_dir = make_study(n_cases=4, readers=("R1", "R2"), phases=None, washout_days=10)
    import json

    study = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    assert study["reference"] == {"phase": "T1c-vfa", "reader": "R2"}
    phases = [p["name"] for p in study["phases"]]

    def lesion_at(x):
        return ((x - 4.0, 0.0, 0.0), (x + 4.0, 0.0, 0.0)), ((x, -2.0, 0.0), (x, 2.0, 0.0))

    found_by_r1 = {}
    for reader in ("R1", "R2"):
        for phase in phases:
            session = ReaderSession.open(study_dir, reader, phase, clock=clock)
            for _ in range(session.total):
                case = session.volumes()["T1c"].parent.name
                index = int(case[3:7]) - 1000
                session.grade(3)
                if session.marks_lesions:
                    if reader == "R2" and phase == "T1c-vfa":
                        session.add_lesion(*lesion_at(10.0 * index))
                    elif phase == "T1c" and reader == "R1" and index % 2 == 0:
                        session.add_lesion(*lesion_at(10.0 * index + 1.0))  # within 3 mm: a hit
                        found_by_r1[case] = True
                    elif phase == "T1c" and reader == "R1":
                        session.add_lesion(*lesion_at(10.0 * index + 5.0))  # 5 mm off: FN + FP
                clock.advance(minutes=1)
                session.next_case()
            session.submit_phase()
            session.close()
            clock.advance(days=11)
    out = tmp_path / "out"
    result = analyze(study_dir, out)
    assert (result.reference_reader, result.reference_phase) == ("R2", "T1c-vfa")
    assert (out / "reads" / "grades.csv").is_file()
    r1 = next(d for d in result.detection if d["reader"] == "R1" and d["phase"] == "T1c" and d["threshold_mm"] == 0)
    assert (r1["tp"], r1["fn"], r1["fp"], r1["n_cases"]) == (2, 2, 2, 4)
    assert any("Contrast metrics skipped" in n for n in result.notes)  # fixture volumes have no T1


def test_beyond_the_paper_outputs(simulated, tmp_path):
    from LesionReaderLib import stats as lr_stats

    out = tmp_path / "out"
    result = analyze(simulated.folder, out, n_boot=300, seed=1)
    header, rows = read_csv(out / "agreement.csv")
    row = _row(rows, phase="T1c", reader_a="R1", reader_b="R2")
    cases = [c for c in simulated.cases if c not in simulated.excluded]
    a = [simulated.grades[("R1", "T1c")][c][0] for c in cases]
    b = [simulated.grades[("R2", "T1c")][c][0] for c in cases]
    assert float(row["kappa_quadratic"]) == pytest.approx(lr_stats.weighted_kappa(a, b))
    header, rows = read_csv(out / "bootstrap.csv")
    assert len(rows) == 3 * 2  # thresholds x phases with a reader average
    boot = _row(rows, threshold_mm="0", phase="T1c-pro")
    det = next(d for d in result.detection if d["reader"] == "average" and d["phase"] == "T1c-pro" and d["threshold_mm"] == 0)
    assert float(boot["sensitivity"]) == pytest.approx(det["sensitivity"])
    assert float(boot["ci_low"]) <= det["sensitivity"] <= float(boot["ci_high"])
    assert "case-level bootstrap" in (out / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- input validation


def _tiny_reads(folder: Path) -> Path:
    """Two cases; R2 marks the reference on T1c-vfa, R1 reads T1c. Line numbers used below:

    grades.csv: 2 R1/T1c/c1, 3 R1/T1c/c2, 4 R2/T1c-vfa/c1, 5 R2/T1c-vfa/c2;
    lesions.csv: 2 R2 reference c1, 3 R2 reference c2, 4 R1 mark c1.
    """
    folder.mkdir(parents=True, exist_ok=True)
    grades = [{"reader": r, "phase": p, "case": c, "grade": 3, "seconds": 60, "excluded": 0}
              for r, p in (("R1", "T1c"), ("R2", "T1c-vfa")) for c in ("c1", "c2")]
    lesions = [lesion_row("R2", "T1c-vfa", "c1", 1, (0.0, 0.0, 0.0), 8.0, 4.0),
               lesion_row("R2", "T1c-vfa", "c2", 1, (0.0, 0.0, 0.0), 8.0, 4.0),
               lesion_row("R1", "T1c", "c1", 1, (1.0, 0.0, 0.0), 8.0, 4.0)]
    for name, cols, rows in (("grades.csv", GRADES_COLUMNS, grades), ("lesions.csv", LESIONS_COLUMNS, lesions)):
        with open(folder / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, cols, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return folder


def _set_cells(path: Path, line: int, **cells) -> None:
    """Overwrite cells of the row on ``line`` (1-based, header = line 1) of a CSV file."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
        header = list(rows[0])
    rows[line - 2].update({k: str(v) for k, v in cells.items()})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _analyze_quick(folder: Path, out: Path, **kwargs):
    return analyze(folder, out, contrast=False, report=False, n_boot=0, **kwargs)


@pytest.mark.parametrize("name, line, cells, column, problem", [
    # nan/inf reference coordinates used to turn a hit into a miss silently
    ("lesions.csv", 2, {"center_x": "nan"}, "center_x", "not a finite number"),
    ("lesions.csv", 2, {"long_x1": "inf"}, "long_x1", "not a finite number"),
    ("lesions.csv", 3, {"long_y2": "1e308"}, "long_y2", "above the maximum 10000"),
    ("lesions.csv", 4, {"short_z1": "-20000"}, "short_z1", "below the minimum -10000"),
    ("lesions.csv", 2, {"long_mm": "-8"}, "long_mm", "below the minimum 0"),
    ("lesions.csv", 4, {"short_mm": "-4"}, "short_mm", "below the minimum 0"),
    ("lesions.csv", 2, {"long_mm": "20"}, "long_mm", "8.000 mm apart"),
    ("lesions.csv", 2, {"short_x1": "0", "short_y1": "-6", "short_x2": "0", "short_y2": "6", "short_mm": "12"}, "short_mm",
     "longer than the long axis"),
    ("lesions.csv", 2, {"center_x": "50"}, "center_x", "farther than the long axis"),
    ("lesions.csv", 2, {"center_z": ""}, "center_z", "is empty while other centre columns are not"),
    ("lesions.csv", 3, {"long_x1": "abc"}, "long_x1", "not a number"),
    ("grades.csv", 3, {"grade": "nan"}, "grade", "not a finite number"),
    ("grades.csv", 3, {"grade": "5"}, "grade", "above the maximum 4"),
    ("grades.csv", 3, {"grade": "2.5"}, "grade", "not a whole grade"),
    ("grades.csv", 2, {"grade": ""}, "grade", "is empty"),
    ("grades.csv", 4, {"seconds": "-1"}, "seconds", "below the minimum 0"),
    ("grades.csv", 4, {"seconds": "inf"}, "seconds", "not a finite number"),
    ("grades.csv", 4, {"seconds": "1e308"}, "seconds", "above the maximum"),
    ("grades.csv", 5, {"excluded": "maybe"}, "excluded", "'maybe'"),
])
def test_impossible_values_are_refused_with_file_line_and_column(tmp_path, name, line, cells, column, problem):
    folder = _tiny_reads(tmp_path / "reads")
    _set_cells(folder / name, line, **cells)
    out = tmp_path / "a" / "out"
    with pytest.raises(AnalysisError) as err:
        _analyze_quick(folder, out)
    message = str(err.value)
    assert f"{folder / name}, line {line}, column '{column}': " in message and problem in message, message
    assert not (tmp_path / "a").exists()  # refused before any output folder is created


def test_valid_tiny_reads_and_allowed_blanks(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    res = _analyze_quick(folder, tmp_path / "o1")
    r1 = next(d for d in res.detection if d["reader"] == "R1" and d["threshold_mm"] == 0)
    assert (r1["tp"], r1["fn"], r1["fp"]) == (1, 1, 0)
    # Empty lengths and centre: taken from the end points (same result). Empty seconds: noted.
    _set_cells(folder / "lesions.csv", 4, long_mm="", short_mm="", center_x="", center_y="", center_z="")
    _set_cells(folder / "grades.csv", 3, seconds="")
    res = _analyze_quick(folder, tmp_path / "o2")
    assert next(d for d in res.detection if d["reader"] == "R1" and d["threshold_mm"] == 0)["tp"] == 1
    assert any("1 grades row(s) have no reading time" in n and "line 3" in n for n in res.notes)
    # An empty grade is allowed in an excluded case (more than 20 lesions: not graded, left out).
    _set_cells(folder / "grades.csv", 3, grade="", excluded="1")
    res = _analyze_quick(folder, tmp_path / "o3")
    assert res.excluded_cases == ["c2"]


def test_lesions_of_ungraded_cases_are_noted(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    with open(folder / "lesions.csv", "a", newline="", encoding="utf-8") as fh:
        csv.DictWriter(fh, LESIONS_COLUMNS, lineterminator="\n").writerow(lesion_row("R1", "T1c", "c9", 1, (0.0, 0.0, 0.0), 8.0, 4.0))
    res = _analyze_quick(folder, tmp_path / "out")
    assert any("1 lesion row(s) of cases without a grades row" in n and "line 5" in n and "case c9" in n for n in res.notes)


def _gzip_of_csv(path: Path) -> bytes:
    import gzip

    return gzip.compress(path.read_bytes())


@pytest.mark.parametrize("kind, expected", [
    ("random", "line 1: byte 0xd8 is not UTF-8 text (a binary file"),
    ("gzip", "is gzip-compressed"),
    ("latin1", "line 3: byte 0xe9 is not UTF-8 text"),
    ("nul", "line 2: holds a NUL byte"),
    ("folder", "is a folder, not a file"),
])
def test_binary_or_unreadable_grades_are_refused(tmp_path, kind, expected):
    folder = _tiny_reads(tmp_path / "reads")
    path = folder / "grades.csv"
    if kind == "random":
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(512)))
    elif kind == "gzip":
        path.write_bytes(_gzip_of_csv(path))
    elif kind == "latin1":
        path.write_bytes(path.read_bytes().replace(b"R1,T1c,c2", "Ré,T1c,c2".encode("latin-1")))
    elif kind == "nul":
        path.write_bytes(path.read_bytes().replace(b"R1,T1c,c1", b"R1\x00,T1c,c1"))
    else:
        path.unlink()
        path.mkdir()
    out = tmp_path / "out"
    with pytest.raises(AnalysisError, match="grades.csv") as err:
        _analyze_quick(folder, out)
    assert expected in str(err.value) and "UTF-8" in str(err.value)  # the fix
    assert not out.exists()


def test_binary_volumes_csv_and_bad_options_are_refused(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    with pytest.raises(AnalysisError, match="threshold"):
        _analyze_quick(folder, tmp_path / "o", thresholds=(0.0, math.nan))
    with pytest.raises(AnalysisError, match="brain-margin"):
        analyze(folder, tmp_path / "o", brain_margin_mm=math.inf, report=False, n_boot=0)
    (folder / "volumes.csv").write_bytes(_gzip_of_csv(folder / "grades.csv"))
    with pytest.raises(AnalysisError, match=r"volumes\.csv is gzip-compressed"):
        _analyze_quick(folder, tmp_path / "o")
    (folder / "volumes.csv").write_text("case,T1c\nc1,a.nii.gz\n,b.nii.gz\n", encoding="utf-8")
    with pytest.raises(AnalysisError, match=r"volumes\.csv, line 3, column 'case': is empty"):
        _analyze_quick(folder, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    target = tmp_path / "results.txt"
    target.write_text("mine", encoding="utf-8")
    with pytest.raises(AnalysisError, match="is an existing file; name a folder"):
        _analyze_quick(folder, target)
    with pytest.raises(AnalysisError, match=r"cannot create --out .*: .*results\.txt is a file, not a folder"):
        _analyze_quick(folder, target / "sub")  # a parent that is a file: unwritable, even for root
    assert target.read_text(encoding="utf-8") == "mine"


def test_existing_out_folder_keeps_other_files(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    out = tmp_path / "out"
    out.mkdir()
    (out / "my-notes.txt").write_text("keep me", encoding="utf-8")
    (out / "detection.csv").write_text("old", encoding="utf-8")
    res = analyze(folder, out, contrast=False, n_boot=0)
    assert (out / "my-notes.txt").read_text(encoding="utf-8") == "keep me"
    assert (out / "detection.csv").read_text(encoding="utf-8").startswith("threshold_mm,")
    written = {p.name for p in res.files.values()}
    assert {p.name for p in out.iterdir()} == written | {"my-notes.txt"}  # its own file names only, no staging left
    assert all(p.parent == out and p.is_file() for p in res.files.values())


def test_failed_write_leaves_nothing_and_keeps_existing_files(tmp_path):
    folder = _tiny_reads(tmp_path / "reads")
    out = tmp_path / "out"
    (out / "detection.csv").mkdir(parents=True)  # a folder where a result must go: the write fails, even as root
    (out / "detection.csv" / "inside.txt").write_text("x", encoding="utf-8")
    (out / "keep.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(AnalysisError, match=r"cannot write the results: .*out[/\\]detection\.csv: "):
        _analyze_quick(folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["detection.csv", "keep.txt"]
    assert (out / "detection.csv" / "inside.txt").is_file() and (out / "keep.txt").read_text(encoding="utf-8") == "keep me"


def test_failed_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    import errno

    from LesionReaderLib import report

    def disk_full(result):
        path = Path(result.out_dir) / "report.md"
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "write_report", disk_full)  # simulates a full disk after the tables were written
    folder = _tiny_reads(tmp_path / "reads")
    with pytest.raises(AnalysisError, match=r"new[/\\]out[/\\]report\.md: No space left on device"):
        analyze(folder, tmp_path / "new" / "out", contrast=False, n_boot=0)
    assert not (tmp_path / "new").exists()


def test_study_database_values_are_validated(make_study, clock, tmp_path):
    import sqlite3

    from LesionReaderLib.session import ReaderSession

    study_dir = make_study(n_cases=2)
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.grade(3)
    session.next_case()
    session.close()
    with sqlite3.connect(str(study_dir / "reads.sqlite")) as db:
        db.execute("UPDATE case_reads SET seconds = -5")
    out = tmp_path / "out"
    with pytest.raises(AnalysisError, match=r"reads\.sqlite exported as grades\.csv .*, line 2, column 'seconds': holds -5"):
        analyze(study_dir, out)
    assert not out.exists()
    (study_dir / "reads.sqlite").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (study_dir / f"reads.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(AnalysisError, match=r"reads\.sqlite cannot be read"):
        analyze(study_dir, out)
    (study_dir / "study.json").write_bytes(b"\x1f\x8b\x08\x00binary")
    with pytest.raises(AnalysisError, match=r"study\.json is gzip-compressed"):
        analyze(study_dir, out)
    assert not out.exists()
