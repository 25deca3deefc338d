"""``lesion-reader init / status / export`` end to end (in-process runner and the real console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from LesionReaderLib import ReaderSession
from LesionReaderLib.cli import app
from LesionReaderLib.study import load_study

runner = CliRunner()


def test_init_status_export(case_folders, tmp_path, clock):
    study_dir = tmp_path / "study"
    args = ["init", str(study_dir), "--readers", "R1", "--readers", "R2", "--seed", "7", "--washout-days", "14"]
    for folder in case_folders:
        args += ["--cases", str(folder)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "6 cases, readers R1, R2, phases T1c -> T1c-pro -> T1c-vfa (14 days apart)" in result.output
    study = load_study(study_dir)
    assert study.seed == 7 and study.washout_days == 14 and study.reference_reader == "R2"

    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.grade(2)
    session.add_lesion(((0, 0, 0), (10, 0, 0)), ((5, -2, 0), (5, 2, 0)))
    session.next_case()
    session.close()

    result = runner.invoke(app, ["status", str(study_dir)])
    assert result.exit_code == 0, result.output
    assert "R1      T1c      in progress  1 / 6" in result.output
    result = runner.invoke(app, ["status", str(study_dir), "--json"])
    rows = json.loads(result.output)
    assert {(r["reader"], r["phase"]) for r in rows} == {(r, p) for r in ("R1", "R2") for p in ("T1c", "T1c-pro", "T1c-vfa")}

    result = runner.invoke(app, ["export", str(study_dir), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "grades.csv").read_text(encoding="utf-8").count("\n") == 2
    assert (tmp_path / "out" / "lesions.csv").read_text(encoding="utf-8").count("\n") == 2


def test_custom_phases_and_errors(case_folders, tmp_path):
    study_dir = tmp_path / "s"
    args = ["init", str(study_dir), "--readers", "A", "--phases", "T1c=T1c+T2-FLAIR", "--phases", "T1c-pro"]
    args += [x for f in case_folders[:2] for x in ("--cases", str(f))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    study = load_study(study_dir)
    assert [p.name for p in study.phases] == ["T1c", "T1c-pro"] and study.reference_phase is None

    result = runner.invoke(app, args)  # exists already
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    result = runner.invoke(app, ["status", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no study at" in result.output
    result = runner.invoke(app, ["init", str(tmp_path / "x"), "--readers", "A", "--cases", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "neither a case folder nor a .csv manifest" in result.output


def test_console_script(case_folders, tmp_path, subprocess_env):
    exe = Path(sys.executable).with_name("lesion-reader")  # the venv's console script, when installed
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "LesionReaderLib.cli"]
    study_dir = tmp_path / "study"
    init = subprocess.run(
        command + ["init", str(study_dir), "--readers", "R1", "--cases", str(case_folders[0])],
        capture_output=True, text=True, env=subprocess_env, timeout=120,
    )
    assert init.returncode == 0, init.stderr
    status = subprocess.run(command + ["status", str(study_dir)], capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert status.returncode == 0 and "not opened" in status.stdout


def _reads_folder(folder: Path) -> Path:
    """A minimal valid grades.csv + lesions.csv pair (R2 marks the reference on T1c-vfa, R1 reads T1c)."""
    folder.mkdir(parents=True)
    (folder / "grades.csv").write_text(
        "reader,phase,case,grade,seconds,excluded\nR1,T1c,c1,3,60,0\nR2,T1c-vfa,c1,4,90,0\n", encoding="utf-8")
    axes = "-4,0,0,4,0,0,0,-2,0,0,2,0"
    (folder / "lesions.csv").write_text(
        "reader,phase,case,lesion,long_mm,short_mm,long_x1,long_y1,long_z1,long_x2,long_y2,long_z2,"
        "short_x1,short_y1,short_z1,short_x2,short_y2,short_z2,center_x,center_y,center_z\n"
        f"R2,T1c-vfa,c1,1,8,4,{axes},0,0,0\nR1,T1c,c1,1,8,4,{axes},0,0,0\n", encoding="utf-8")
    return folder


def test_analyze_refuses_bad_inputs_with_exit_2_and_no_traceback(tmp_path):
    reads = _reads_folder(tmp_path / "reads")
    out = tmp_path / "new" / "out"
    common = ["--out", str(out), "--no-contrast", "--n-boot", "0"]
    ok = runner.invoke(app, ["analyze", str(reads), *common])
    assert ok.exit_code == 0, ok.output
    (out / "detection.csv").unlink()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    before = sorted(p.name for p in out.iterdir())
    lesions = (reads / "lesions.csv").read_text(encoding="utf-8")
    (reads / "lesions.csv").write_text(lesions.replace("R2,T1c-vfa,c1,1,8,4,-4,", "R2,T1c-vfa,c1,1,8,4,nan,"), encoding="utf-8")
    result = runner.invoke(app, ["analyze", str(reads), *common])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{reads / 'lesions.csv'}, line 2, column 'long_x1': holds 'nan', not a finite number" in result.output
    assert sorted(p.name for p in out.iterdir()) == before  # nothing added, nothing removed
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me"
    (reads / "lesions.csv").write_text(lesions, encoding="utf-8")
    (reads / "grades.csv").write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["analyze", str(reads), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "grades.csv, line 1: holds a NUL byte" in result.output
    assert not (tmp_path / "other").exists()
    result = runner.invoke(app, ["analyze", str(reads), "--out", str(reads / "grades.csv")])
    assert result.exit_code == 2 and "is an existing file; name a folder" in result.output


def test_init_refuses_a_file_and_an_unwritable_parent(case_folders, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine", encoding="utf-8")
    for study_dir, message in ((target, "is an existing file; name a folder"), (target / "study", "taken is a file, not a folder")):
        result = runner.invoke(app, ["init", str(study_dir), "--readers", "R1", "--cases", str(case_folders[0])])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    (case_folders[1] / "flair.nii.gz").unlink()
    result = runner.invoke(app, ["init", str(tmp_path / "s" / "study"), "--readers", "R1", "--cases", str(case_folders[1])])
    assert result.exit_code == 2 and "lacks T2-FLAIR" in result.output
    assert not (tmp_path / "s").exists() and target.read_text(encoding="utf-8") == "mine"


def test_console_script_errors_exit_2_without_traceback(case_folders, tmp_path, subprocess_env):
    exe = Path(sys.executable).with_name("lesion-reader")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "LesionReaderLib.cli"]
    reads = _reads_folder(tmp_path / "reads")
    (reads / "grades.csv").write_bytes(b"\x1f\x8b" + bytes(range(200)))  # a gzip file renamed
    run = subprocess.run(command + ["analyze", str(reads), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "grades.csv is gzip-compressed" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
    run = subprocess.run(command + ["init", str(reads / "lesions.csv"), "--readers", "R1", "--cases", str(case_folders[0])],
                         capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "is an existing file; name a folder" in run.stderr, run.stderr
