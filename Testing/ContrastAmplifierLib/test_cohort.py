"""predict-cohort: skips finished cases, reports a bad case without stopping; CLI JSON progress protocol."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ContrastAmplifierLib.cohort import predict_cohort
from ContrastAmplifierLib.progress import parse_json_progress_line

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
