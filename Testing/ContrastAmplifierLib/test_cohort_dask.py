"""predict-cohort on a real Dask LocalCluster (2 worker processes, one declaring GPU=1, so the CPU/GPU
routing runs on this CPU-only machine): same bytes as the serial run, a killed worker, reruns, the
bundle loaded once per worker, the CLI's dashboard line; the SLURM cluster built from its file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("distributed")

from ContrastAmplifierCommon.progress import parse_json_progress_line  # noqa: E402
from ContrastAmplifierLib import cohort_dask  # noqa: E402
from ContrastAmplifierLib.cluster import (  # noqa: E402
    CLUSTER_EXTRA,
    ClusterError,
    check_cluster_request,
    local_cluster,
    parse_cluster,
    read_slurm_config,
    slurm_cluster,
)
from ContrastAmplifierLib.cohort import SUMMARY_COLUMNS, predict_cohort  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = REPO / "ContrastAmplifier" / "Resources" / "Models" / "phantom-demo"
#: One ITK and one torch thread per case (serial and on the workers): the setting under which two
#: runs give the same bytes (see test_cluster_output_is_bit_identical_to_the_serial_run).
SETTINGS = dict(bundle=DEMO_BUNDLE, folds=[0, 1], n_mirrorings=1, device="cpu", threads=1, brain_mask="brain_mask")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two 3 mm phantom cases (test seeds) with their brain masks: no HD-BET, so each case costs seconds."""
    from ContrastAmplifierLib.phantom import generate_cohort

    root = tmp_path_factory.mktemp("dask-cohort")
    generate_cohort(root / "cases", cases=2, seed=61, spacing=3.0)
    return root / "cases"


@pytest.fixture(scope="module")
def serial(cases, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("serial") / "out"
    rows = predict_cohort(cases, out, **SETTINGS)
    assert [r["status"] for r in rows] == ["done", "done"], rows
    return out, rows


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2, gpu_workers=1) as handle:
        yield handle


def _pixels(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _summary(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _worker_addresses(cluster) -> dict[str, str]:
    return {w["name"]: address for address, w in cluster.client.scheduler_info()["workers"].items()}


@pytest.mark.slow  # serial and Dask runs of 2 cases: 25-30 s each on the loaded 2-core machine
def test_cluster_output_is_bit_identical_to_the_serial_run(cases, serial, cluster, tmp_path):
    """Same voxels to the bit, same summary, preprocessing on the CPU worker and ensembles on the GPU
    one, the bundle loaded once on the GPU worker, a rerun that skips everything.

    Bit-identical holds with one ITK thread per case (``threads=1``, both paths): with more, ITK's
    threaded registration metric sums in a varying order, and two *serial* runs of the same case
    differ too (measured on a 3 mm phantom: 6.1e-5 max abs in T1c units between three runs with
    ITK's default threads; 0 with one thread). The test pins the thread count instead of a tolerance.
    """
    serial_out, serial_rows = serial
    out = tmp_path / "out"
    events: list[tuple] = []
    rows = predict_cohort(cases, out, cluster=cluster, progress=lambda *e: events.append(e), **SETTINGS)

    assert [r["status"] for r in rows] == ["done", "done"], rows
    for row in rows:
        mine, reference = _pixels(Path(str(row["output"]))), _pixels(serial_out / str(row["case"]) / "T1c-pro.nii.gz")
        assert mine[1] == reference[1]
        assert mine[0].dtype == reference[0].dtype and np.array_equal(mine[0], reference[0]), row["case"]
    keep = [c for c in SUMMARY_COLUMNS if c not in ("seconds", "output")]
    assert [{k: r[k] for k in keep} for r in _summary(out / "summary.csv")] == \
        [{k: r[k] for k in keep} for r in _summary(serial_out / "summary.csv")]
    assert [r["n_predictions"] for r in rows] == [r["n_predictions"] for r in serial_rows] == [2, 2]

    assert {r["preprocess_worker"] for r in rows} == {"cpu-0"}  # CPU work on the CPU worker only
    assert {r["ensemble_worker"] for r in rows} == {"gpu-0"}  # ensembles on the GPU worker only
    assert all(r["preprocess_s"] > 0 and r["ensemble_s"] > 0 for r in rows)
    assert sum(bool(r["model_loaded"]) for r in rows) <= 1  # once per worker (0: loaded by an earlier cohort)
    loads = cluster.client.run(lambda: cohort_dask.model_loads)
    addresses = _worker_addresses(cluster)
    assert loads[addresses["gpu-0"]] == 1 and loads[addresses["cpu-0"]] == 0

    stages = [e[0] for e in events]
    assert stages[0] == "dashboard" and events[0][2].startswith("http://")
    fractions = [e[1] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    for case in ("case_000", "case_001"):  # per case stages, relayed from both workers
        mine = {e[0] for e in events if e[2].startswith(f"{case}: ")}
        assert {"register", "load model", "ensemble", "write", "done"} <= mine, mine
    finished = [e[2] for e in events if e[0] == "case done"]
    assert len(finished) == 2 and finished[0].startswith("1/2 cases (") and finished[1].startswith("2/2 cases (")

    written = {p: p.stat().st_mtime_ns for p in out.rglob("T1c-pro.nii.gz")}
    again: list[tuple] = []
    rerun = predict_cohort(cases, out, cluster=cluster, progress=lambda *e: again.append(e), **SETTINGS)
    assert [r["status"] for r in rerun] == ["skipped", "skipped"]
    assert [e[0] for e in again] == ["skip", "skip"]  # nothing submitted
    assert {p: p.stat().st_mtime_ns for p in out.rglob("T1c-pro.nii.gz")} == written
    assert [r["status"] for r in _summary(out / "summary.csv")] == ["skipped", "skipped"]


@pytest.mark.slow  # serial and Dask runs of 2 cases: 25-30 s each on the loaded 2-core machine
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(cases, serial, cluster, tmp_path):
    """SIGKILL the CPU worker while it registers the second case: its nanny restarts it, Dask runs the
    lost work again, and every case is written once, the same as the serial run, with no temporaries."""
    serial_out, _ = serial
    addresses = _worker_addresses(cluster)
    victim = cluster.client.run(os.getpid)[addresses["cpu-0"]]
    killed: list[str] = []
    events: list[tuple] = []

    def progress(stage: str, fraction: float, message: str = "") -> None:
        events.append((stage, fraction, message))
        if not killed and stage == "register" and message.startswith("case_001: "):
            os.kill(victim, signal.SIGKILL)
            killed.append(message)

    out = tmp_path / "out"
    rows = predict_cohort(cases, out, cluster=cluster, progress=progress, **SETTINGS)

    assert killed, "the worker was never killed"
    assert cluster.client.run(os.getpid)[_worker_addresses(cluster)["cpu-0"]] != victim  # restarted
    # the killed preprocessing ran again from its start
    assert sum(1 for e in events if e[0] == "read" and e[2].startswith("case_001: ")) >= 2
    assert [r["status"] for r in rows] == ["done", "done"], rows
    summary = _summary(out / "summary.csv")
    assert sorted(r["case"] for r in summary) == ["case_000", "case_001"]  # each case exactly once
    assert all(r["status"] == "done" and r["error"] == "" for r in summary)
    for row in rows:
        mine, reference = _pixels(Path(str(row["output"]))), _pixels(serial_out / str(row["case"]) / "T1c-pro.nii.gz")
        assert np.array_equal(mine[0], reference[0]) and mine[1] == reference[1], row["case"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "case_000", "case_000/T1c-pro.nii.gz", "case_001", "case_001/T1c-pro.nii.gz", "summary.csv"]


def test_cancel_stops_the_cohort_and_writes_no_output(cases, cluster, tmp_path):
    """The cancel token (the Slicer module's Stop, Ctrl-C) ends the run at the next look: Cancelled is
    raised, the pending tasks are cancelled, no T1c-pro is written."""
    from ContrastAmplifierCommon.progress import CancelToken, Cancelled

    token = CancelToken()

    def progress(stage: str, fraction: float, message: str = "") -> None:
        if stage == "read":  # a case has started on a worker
            token.cancel()

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        predict_cohort(cases, out, cluster=cluster, progress=progress, cancel=token, **SETTINGS)
    assert token.cancelled and not list(out.rglob("T1c-pro.nii.gz"))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_cli_prints_the_dashboard_and_reports_a_bad_case(cases, serial, tmp_path):
    """``--cluster local:2 --progress json``: the dashboard link as a JSON event, a finished case
    skipped, a case without its ADC failed in its row (exit 1) while the cohort completes."""
    import shutil

    serial_out, _ = serial
    cohort = tmp_path / "cases"
    shutil.copytree(cases / "case_000", cohort / "a_done")
    shutil.copytree(cases / "case_001", cohort / "b_no_adc")
    (cohort / "b_no_adc" / "adc.nii.gz").unlink()
    out = tmp_path / "out"
    (out / "a_done").mkdir(parents=True)
    shutil.copy(serial_out / "case_000" / "T1c-pro.nii.gz", out / "a_done" / "T1c-pro.nii.gz")
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict-cohort", str(cohort), str(out), "--cluster", "local:2",
           "--model", str(DEMO_BUNDLE), "--folds", "0", "--flips", "1", "--device", "cpu", "--threads", "1",
           "--brain-mask-name", "brain_mask", "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    events = [parse_json_progress_line(line) for line in done.stdout.splitlines()]
    assert events and all(e is not None for e in events), done.stdout
    assert events[0]["stage"] == "skip" and events[0]["message"] == "a_done: already done"
    dashboard = [e for e in events if e["stage"] == "dashboard"]
    assert len(dashboard) == 1 and dashboard[0]["message"].startswith("http://127.0.0.1:")
    assert f"Dask dashboard: {dashboard[0]['message']}" in done.stderr
    assert events[-1]["stage"] == "case done" and events[-1]["fraction"] == 1.0
    assert "b_no_adc failed: ImageValidationError: ADC is missing" in events[-1]["message"]
    assert "2 cases: 0 done, 1 skipped, 1 failed" in done.stderr
    assert [(r["case"], r["status"]) for r in _summary(out / "summary.csv")] == [("a_done", "skipped"), ("b_no_adc", "failed")]


def test_cluster_values_are_parsed_or_refused_with_the_forms():
    assert parse_cluster("local").kind == "local" and parse_cluster("local").workers is None
    assert parse_cluster("local:3").workers == 3
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert parse_cluster("slurm").kind == "slurm"
    for bad in ("local:0", "local:two", "tcp://host", "tcp://host:99999", "sge", ""):
        with pytest.raises(ClusterError, match="local, local:N .* tcp://HOST:PORT .* slurm"):
            parse_cluster(bad)


def test_missing_dask_is_one_line_naming_the_extra(monkeypatch, tmp_path, small_case_dir, random_bundle_dir):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ClusterError, match=r"needs the distributed package.*" + CLUSTER_EXTRA.replace("[", r"\[").replace("]", r"\]")):
        check_cluster_request("local:2")
    (tmp_path / "cases" / "a").mkdir(parents=True)
    with pytest.raises(ClusterError, match="distributed"):
        predict_cohort(tmp_path / "cases", tmp_path / "out", bundle=random_bundle_dir, cluster="local:2")
    assert not (tmp_path / "out").exists()  # refused before any work


SLURM_YAML = """\
slurm:
  queue: gpu
  account: radiology
  cores: 8
  processes: 1
  memory: 32GB
  walltime: "02:00:00"
  job_extra_directives: ["--gres=gpu:1"]
  worker_extra_args: ["--resources", "GPU=1,CPU=7"]
adapt:
  minimum_jobs: 0
  maximum_jobs: 4
"""


def test_slurm_cluster_is_built_from_its_config_file(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    path = tmp_path / "slurm.yaml"
    path.write_text(SLURM_YAML, encoding="utf-8")
    config = read_slurm_config(path)
    assert (config.minimum_jobs, config.maximum_jobs, config.resources, config.slots) == (0, 4, {"GPU": 1.0, "CPU": 7.0}, 32)
    jobs = slurm_cluster(config)  # real dask-jobqueue; no job is submitted
    try:
        script = jobs.job_script()
    finally:
        jobs.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A radiology", "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:00:00",
                 "#SBATCH --gres=gpu:1"):
        assert line in script, script
    assert "--nthreads 8" in script and "--resources GPU=1,CPU=7" in script and sys.executable in script

    as_json = tmp_path / "slurm.json"
    as_json.write_text('{"slurm": {"cores": 2, "memory": "4GB"}, "adapt": {"maximum_jobs": 2}}', encoding="utf-8")
    assert read_slurm_config(as_json).cluster == {"cores": 2, "memory": "4GB"}
    for text, message in (("slurm: [1]\n", "must hold a 'slurm:' mapping"),
                          ("slurm: {cores: 2}\nworkers: 3\n", "unknown key"),
                          ("slurm: {cores: 2}\nadapt: {minimum_jobs: 3, maximum_jobs: 1}\n", "0 <= minimum_jobs <= maximum_jobs"),
                          ("slurm: {cores: 2, worker_extra_args: [--resources, GPU]}\n", "is not NAME=NUMBER"),
                          ("slurm: {cores: 2\n", "is not valid YAML")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ClusterError, match=message):
            read_slurm_config(path)

    path.write_text(SLURM_YAML, encoding="utf-8")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="sbatch, which is not on the PATH.*--num-parts N --part-id K"):
        check_cluster_request("slurm", path)
    with pytest.raises(ClusterError, match="needs --cluster-config FILE"):
        check_cluster_request("slurm")
    with pytest.raises(ClusterError, match="does not apply to --cluster local:2"):
        check_cluster_request("local:2", path)
