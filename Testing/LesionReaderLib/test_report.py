"""report.md / report.html / plots in the paper's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from LesionReaderLib.analysis import analyze
from LesionReaderLib.report import detection_table, format_minutes, quality_table, times_table
from simulated_reads import simulate_reads

@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sim = simulate_reads(root / "reads", n_cases=20, seed=11)
    return analyze(sim.folder, root / "out")


def test_format_minutes():
    assert format_minutes(108) == "1'48''"
    assert format_minutes(183.4) == "3'03''"
    assert format_minutes(float("nan")) == "n/a"


def test_table5_layout_and_cells(result):
    title, header, rows, caption = detection_table(result)
    assert header[:2] == ["", ""]
    assert header[2:6] == ["R1 T1c", "R1 T1c-pro", "R2 T1c", "R2 T1c-pro"]
    assert "R1 vs. R2 T1c" in header and "Average T1c" in header and "Average T1c vs. T1c-pro" in header
    assert [r[1] for r in rows] == ["SE", "FDR", "PPV", "F1"] * 3
    assert [r[0] for r in rows if r[0]] == ["≥0 mm", "≥5 mm", "≥10 mm"]
    det = {(d["threshold_mm"], d["reader"], d["phase"]): d for d in result.detection}
    d = det[(0.0, "R1", "T1c")]
    se_cell = rows[0][2]
    assert se_cell == f"{100 * d['sensitivity']:.0f}% ({d['tp']}/{d['tp'] + d['fn']})"
    avg = det[(0.0, "average", "T1c")]
    cell = rows[0][header.index("Average T1c")]
    assert cell == f"{100 * avg['sensitivity']:.0f}% [{100 * avg['sensitivity_ci_low']:.0f}; {100 * avg['sensitivity_ci_high']:.0f}]"
    fdr_cell = rows[1][header.index("Average T1c")]
    assert fdr_cell.startswith(f"{avg['fdr_per_case']:.2f} [±")
    assert rows[2][header.index("R1 vs. R2 T1c")] == "n/a"  # PPV is not tested (paper)
    p_cell = rows[0][header.index("Average T1c vs. T1c-pro")]
    assert p_cell.startswith("P")
    assert "McNemar mid-p" in caption and "Clopper-Pearson" in caption


def test_tables_3_and_6(result):
    _, header, rows, _ = quality_table(result)
    assert header == ["", "T1c", "T1c-pro", "T1c-vfa", "T1c vs. T1c-pro", "T1c vs. T1c-vfa", "T1c-pro vs. T1c-vfa"]
    assert [r[0] for r in rows] == ["Reader Average", "Reader R1", "Reader R2", "R1 vs. R2"]
    q = next(q for q in result.quality if q["reader"] == "R1" and q["phase"] == "T1c")
    assert rows[1][1] == f"{q['mean_grade']:.1f} (±{q['sd_grade']:.1f})"
    _, header, rows, _ = times_table(result)
    t = next(t for t in result.times if t["reader"] == "R2" and t["phase"] == "T1c-vfa")
    assert rows[2][3] == f"{format_minutes(t['mean_seconds'])} (±{format_minutes(t['sd_seconds'])})"
    assert rows[1][3] == "n/a"  # R1 only graded T1c-vfa: no reading time (paper, Table 6)


def test_report_files(result):
    out = Path(result.out_dir)
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "Reading time per lesion"):
        assert title in md and title in html
    for png in ("sensitivity_by_threshold.png", "grades.png", "reading_times.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in md and f'src="{png}"' in html
    assert "<table>" in html and html.count("<h3>") == 7  # Tables 3-6, time per lesion, kappa, bootstrap
    assert '<td class="sig">' in html or "*" not in md  # significant p-values are highlighted


def test_report_does_not_import_the_pipeline():
    """report.py renders a result (results.py) and never imports analysis.py, lazily or not: no cycle."""
    import ast

    import LesionReaderLib.report as report_module

    tree = ast.parse(Path(report_module.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m == "analysis" or m.endswith(".analysis")}, imported


def test_report_written_separately_after_analyze(tmp_path):
    from LesionReaderLib.report import write_report

    sim = simulate_reads(tmp_path / "reads", n_cases=8, seed=2)
    out = tmp_path / "out"
    result = analyze(sim.folder, out, report=False, n_boot=0)
    assert not (out / "report.md").exists() and not list(out.glob("*.png"))
    files = write_report(result)
    assert files["report_md"] == out / "report.md" and "Table 5: lesion detection" in files["report_md"].read_text(encoding="utf-8")
    assert (out / "report.html").is_file() and (out / "sensitivity_by_threshold.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporary file
