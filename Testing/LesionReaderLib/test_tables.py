"""Writing the CSV tables and analysis.json atomically in a staged folder (LesionReaderLib.tables)."""

from __future__ import annotations

import csv
import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest

from LesionReaderLib.results import DETECTION_COLUMNS, AnalysisError, AnalysisResult
from LesionReaderLib.tables import CSV_TABLES, format_cell, summary, write_csv, write_outputs


def _result(out_dir: Path) -> AnalysisResult:
    return AnalysisResult(
        out_dir=out_dir, reference_phase="T1c-vfa", reference_reader="R2", readers=["R1"], phases=["T1c", "T1c-vfa"],
        thresholds=[0.0, 5.0], n_reference_cases=2, n_reference_lesions=3, reference_long_mm=[4.0, 6.0, 12.0],
        excluded_cases=["c9"], detection=[{"threshold_mm": 0.0, "reader": "R1", "phase": "T1c", "tp": 2, "fn": 1, "fp": 0.5,
                                           "sensitivity": 2 / 3, "ppv": math.nan}],
        comparisons=[], quality=[], times=[], contrast=[], per_case={}, notes=["a note"],
        matches=[{"reader": "R1", "phase": "T1c", "case": "c1", "mark_lesion": "m1"}],
    )


def test_format_cell():
    assert [format_cell(v) for v in (None, "x", 3, np.int64(4), math.nan, math.inf, -math.inf, 0.1 + 0.2, 2.0)] == [
        "", "x", "3", "4", "", "inf", "-inf", "0.3", "2"]


def test_write_csv_leaves_no_temporary_file(tmp_path):
    path = write_csv(tmp_path / "t.csv", ("a", "b"), [{"a": 1, "c": 9}, {"b": 0.5}])
    assert path.read_bytes() == b"a,b\r\n1,\r\n,0.5\r\n"  # the csv module's line ends, as before
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_write_outputs_writes_every_table_and_summary(tmp_path):
    out = tmp_path / "new" / "out"
    result = _result(out)
    seen = {}

    def extra(res):
        seen["out_dir"] = Path(res.out_dir)
        (Path(res.out_dir) / "extra.txt").write_text("x", encoding="utf-8")
        return {"extra": Path(res.out_dir) / "extra.txt"}

    files = write_outputs(result, out, extra=[extra])
    assert list(files) == list(CSV_TABLES) + ["summary", "extra"]
    assert seen["out_dir"] != out and seen["out_dir"].name.startswith(".")  # the writers write into the staging folder
    assert result.out_dir == out and all(p.parent == out and p.is_file() for p in files.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())  # nothing else left
    with open(files["detection"], newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(DETECTION_COLUMNS)
    assert rows[1][:8] == ["0", "R1", "T1c", "2", "1", "0.5", "", "0.6666666667"]
    assert json.loads(files["summary"].read_text(encoding="utf-8")) == json.loads(json.dumps(summary(result)))
    assert json.loads(files["summary"].read_text(encoding="utf-8"))["notes"] == ["a note"]
    assert "mark_lesion" in files["matches"].read_text(encoding="utf-8")


def test_exported_reads_are_written_beside_the_tables(tmp_path):
    out = tmp_path / "out"
    grades = [["R1", "T1c", "c1", "3", "60", "0"]]
    write_outputs(_result(out), out, exported=(grades, []))
    assert (out / "reads" / "grades.csv").read_text(encoding="utf-8").splitlines()[1] == "R1,T1c,c1,3,60,0"
    assert (out / "reads" / "lesions.csv").is_file()


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out"

    def disk_full(res):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(res.out_dir) / "report.md"))

    with pytest.raises(AnalysisError, match=r"cannot write the results: .*new[/\\]out[/\\]report\.md: No space left on device"):
        write_outputs(_result(out), out, extra=[disk_full])
    assert not (tmp_path / "new").exists()
