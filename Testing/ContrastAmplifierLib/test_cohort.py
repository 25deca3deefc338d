"""predict-cohort: skips finished cases, reports a bad case without stopping; CLI JSON progress protocol."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ContrastAmplifierLib.cohort import predict_cohort
from ContrastAmplifierCommon.progress import parse_json_progress_line

torch.set_num_threads(1)


def _cohort(tmp_path: Path, case_dir: Path) -> Path:
    cases = tmp_path / "cases"
    good = cases / "a_good"
    good.mkdir(parents=True)
    for m in ("t1", "flair", "adc", "t1c", "brain_mask"):
        shutil.copy(case_dir / f"{m}.nii.gz", good / f"{m}.nii.gz")
    bad = cases / "b_no_adc"
    shutil.copytree(good, bad)
    (bad / "adc.nii.gz").unlink()
    return cases


def test_bad_case_is_reported_and_finished_cases_are_skipped(tmp_path, small_case_dir, random_bundle_dir, monkeypatch):
    cases = _cohort(tmp_path, small_case_dir)
    out = tmp_path / "out"
    rows = predict_cohort(cases, out, bundle=random_bundle_dir, n_mirrorings=1, device="cpu", folds=[0])
    status = {r["case"]: r for r in rows}
    assert status["a_good"]["status"] == "done" and (out / "a_good" / "T1c-pro.nii.gz").is_file()
    assert status["b_no_adc"]["status"] == "failed" and "ADC is missing" in status["b_no_adc"]["error"]
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        summary = list(csv.DictReader(handle))
    assert [r["status"] for r in summary] == ["done", "failed"]

    again = predict_cohort(cases, out, bundle=random_bundle_dir, n_mirrorings=1, device="cpu", folds=[0])
    assert [r["status"] for r in again] == ["skipped", "failed"]


def test_predict_cli_emits_the_json_progress_protocol(tmp_path, small_case_dir, random_bundle_dir):
    out = tmp_path / "pro.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict", *[
        arg for m in ("t1", "flair", "adc", "t1c") for arg in (f"--{m}", str(small_case_dir / f"{m}.nii.gz"))],
        "--out", str(out), "--model", str(random_bundle_dir), "--flips", "2", "--folds", "1", "--device", "cpu",
        "--brain-mask", str(small_case_dir / "brain_mask.nii.gz"), "--threads", "1", "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [parse_json_progress_line(line) for line in done.stdout.splitlines()]
    assert events and all(e is not None for e in events), done.stdout  # stdout holds only protocol lines
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"skull-strip", "ensemble", "done"} - {e["stage"] for e in events} == {"skull-strip"}  # mask given: no HD-BET
    assert out.is_file()


def test_predict_cli_names_the_missing_input(tmp_path, small_case_dir, random_bundle_dir):
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict", "--t1", str(small_case_dir / "t1.nii.gz"),
           "--flair", str(small_case_dir / "flair.nii.gz"), "--adc", str(tmp_path / "nope.nii.gz"),
           "--t1c", str(small_case_dir / "t1c.nii.gz"), "--out", str(tmp_path / "x.nii.gz"), "--model", str(random_bundle_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "ADC volume not found" in done.stderr and "nope.nii.gz" in done.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def _predict_cli(case_dir: Path, bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict", *[
        arg for m in ("t1", "flair", "adc", "t1c") for arg in (f"--{m}", str(case_dir / f"{m}.nii.gz"))],
        "--out", str(out), "--model", str(bundle), "--flips", "1", "--folds", "0", "--device", "cpu",
        "--brain-mask", str(case_dir / "brain_mask.nii.gz"), "--threads", "1", "--progress", "json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_predict_output_is_checked_before_any_work(tmp_path, small_case_dir, random_bundle_dir):
    """Issue: `--out x.txt` failed after 31 s leaving an empty folder; `--out DIR` and unwritable folders too."""
    case = tmp_path / "case"
    shutil.copytree(small_case_dir, case)
    (tmp_path / "report.txt").write_text("keep", encoding="utf-8")
    before = {p: p.read_bytes() for p in case.iterdir()}
    refusals = {
        tmp_path / "new" / "x.txt": "has an unsupported ending; use one of .nii.gz, .nii, .nrrd, .mha",
        tmp_path / "new" / "x.mhd": "has an unsupported ending",
        tmp_path: "is an existing folder; give a file name",
        case / "t1c.nii.gz": "is one of the inputs",
        tmp_path / "report.txt" / "pro.nii.gz": "report.txt is a file, not a folder",
    }
    for out, message in refusals.items():
        done = _predict_cli(case, random_bundle_dir, out, "--overwrite")
        assert done.returncode == 2 and message in done.stderr, (out, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == "", f"{out}: work started before the output was checked"
    assert not (tmp_path / "new").exists()  # no empty folder left behind
    assert {p: p.read_bytes() for p in case.iterdir()} == before

    out = tmp_path / "pro.nii.gz"
    assert _predict_cli(case, random_bundle_dir, out).returncode == 0
    written = out.read_bytes()
    again = _predict_cli(case, random_bundle_dir, out)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr and again.stdout == ""
    assert out.read_bytes() == written
    assert _predict_cli(case, random_bundle_dir, out, "--overwrite").returncode == 0


def test_cohort_output_may_not_be_the_cases_folder(tmp_path, small_case_dir, random_bundle_dir):
    import pytest

    from ContrastAmplifierCommon.outputs import OutputPathError

    cases = _cohort(tmp_path, small_case_dir)
    before = sorted(p.relative_to(cases) for p in cases.rglob("*"))
    for out in (cases, tmp_path):
        with pytest.raises(OutputPathError, match="cohort output folder"):
            predict_cohort(cases, out, bundle=random_bundle_dir, n_mirrorings=1, device="cpu", folds=[0])
    assert sorted(p.relative_to(cases) for p in cases.rglob("*")) == before


def test_parts_cover_every_case_exactly_once():
    """--num-parts N --part-id K: round robin over the sorted folders; the union of the parts is the
    cohort, no case is in two parts, and the parts' sizes differ by one at most."""
    import pytest

    from ContrastAmplifierLib.cohort import select_part

    for n_cases in range(0, 12):
        folders = [Path(f"/cohort/case_{i:03d}") for i in range(n_cases)][::-1]  # any order in, sorted out
        for num_parts in range(1, 7):
            parts = [select_part(folders, num_parts, k) for k in range(num_parts)]
            taken = [p for part in parts for p in part]
            assert sorted(taken) == sorted(folders) and len(set(taken)) == len(taken) == n_cases
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert select_part([Path("b"), Path("a")], None, None) == [Path("a"), Path("b")]
    for num_parts, part_id, message in ((3, 3, "out of range for --num-parts 3: use 0 to 2"),
                                        (3, -1, "out of range"), (0, 0, "1 or more"),
                                        (3, None, "go together"), (None, 1, "go together")):
        with pytest.raises(ValueError, match=message):
            select_part([Path("a")], num_parts, part_id)


def test_each_part_writes_its_own_summary(tmp_path, random_bundle_dir):
    """Three parts of five cases in one output folder (as an sbatch array writes them): each part's
    summary-part-K-of-3.csv holds its cases, together every case once; no part writes summary.csv.
    The cases lack their images, so each fails at once (a failure is a row like any other)."""
    import pytest
    from typer.testing import CliRunner

    from ContrastAmplifierLib import cli

    cases = tmp_path / "cases"
    names = [f"case_{i}" for i in range(5)]
    for name in names:
        (cases / name).mkdir(parents=True)
    out = tmp_path / "out"
    seen = []
    for part in range(3):
        rows = predict_cohort(cases, out, bundle=random_bundle_dir, num_parts=3, part_id=part)
        with open(out / f"summary-part-{part}-of-3.csv", newline="", encoding="utf-8") as handle:
            summary = list(csv.DictReader(handle))
        assert [r["case"] for r in summary] == [r["case"] for r in rows] == names[part::3]
        assert all(r["status"] == "failed" and "T1 is missing" in r["error"] for r in summary)
        seen += [r["case"] for r in summary]
    assert sorted(seen) == names and not (out / "summary.csv").exists()

    with pytest.raises(ValueError, match="--part-id 3 is out of range"):
        predict_cohort(cases, tmp_path / "never", bundle=random_bundle_dir, num_parts=3, part_id=3)
    assert not (tmp_path / "never").exists()  # refused before any work
    done = CliRunner().invoke(cli.app, ["predict-cohort", str(cases), str(tmp_path / "never"), "--num-parts", "2",
                                        "--part-id", "2", "--model", str(random_bundle_dir), "--progress", "none"])
    assert done.exit_code == 2 and "--part-id 2 is out of range for --num-parts 2: use 0 to 1" in done.output
    done = CliRunner().invoke(cli.app, ["predict-cohort", str(cases), str(out), "--num-parts", "2", "--part-id", "1",
                                        "--model", str(random_bundle_dir), "--progress", "none"])
    assert done.exit_code == 1 and "2 cases (part 1 of 2): 0 done, 0 skipped, 2 failed" in done.output
    assert "summary-part-1-of-2.csv" in done.output
