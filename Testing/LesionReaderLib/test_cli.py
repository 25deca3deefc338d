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
