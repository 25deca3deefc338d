"""Fold training as submitit jobs (fold_job.py, fold_jobs.py, ``fit --executor``, ``status``), with submitit's
real local executor: the jobs' weights against the serial fit, preemption and a killed job, failures, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

pytest.importorskip("submitit")

from ContrastAmplifierLib.bundle import load_bundle  # noqa: E402
from ContrastAmplifierLib.network import NetworkConfig  # noqa: E402
from ContrastAmplifierTrainingLib.data import load_cache_folder, save_cached_case  # noqa: E402
from ContrastAmplifierTrainingLib.fit import fit_cases  # noqa: E402
from ContrastAmplifierTrainingLib.fold_job import read_attempts  # noqa: E402
from ContrastAmplifierTrainingLib.fold_jobs import ExecutorSettings, job_alive, read_jobs, slurm_parameters  # noqa: E402
from ContrastAmplifierTrainingLib.run_status import read_log_rows  # noqa: E402
from ContrastAmplifierTrainingLib.toy import toy_cohort  # noqa: E402
from ContrastAmplifierTrainingLib.trainer import TrainConfig  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="submitit's executors and flock are POSIX")

#: The tiny network and CPU settings of every run here (the CLI's and the in-process reference's).
TINY = ["--base-channels", "4", "--levels", "2", "--device", "cpu", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_config(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, network=NetworkConfig(base_channels=4, levels=2), device="cpu")


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> Path:
    """Four cached toy cases at 16^3 (a folder of *.npz is a valid MANIFEST)."""
    cache = tmp_path_factory.mktemp("fold-jobs") / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=5):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    return cache


def _run(cmd: list[str], code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == code, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def _events(done: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def _wait_for(found: Callable[[], Optional[Any]], what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_local_fold_jobs_give_the_serial_weights_and_status_follows_them(tmp_path, toy_cache, train_cli, fold_weights):
    """2 folds x 2 epochs as local jobs, one at a time (--parallel 1), submitted with --no-wait, followed with
    `status`, then waited for (the rerun attaches, it does not submit again) and exported: the weights are
    the serial fit's, tensor for tensor."""
    run = tmp_path / "run"
    fit = ["fit", str(toy_cache), str(run), "--n-folds", "2", "--epochs", "2", *TINY, "--executor", "local", "--parallel", "1"]
    (submitted,) = _events(_run(train_cli(*fit, "--no-wait", "--progress", "json")))
    recorded = read_jobs(run)["folds"]
    assert submitted["stage"] == "submitted" and submitted["waiting"] is False and submitted["finished"] == []
    assert submitted["jobs"] == {k: v["job_id"] for k, v in recorded.items()} and set(recorded) == {"0", "1"}
    assert submitted["status_command"] == f"contrast-amplifier-train status {run}"

    status = _status_events(run)
    assert [(e["stage"], e["fold"], e["job_id"], e["executor"], e["epochs"]) for e in status[:-1]] == [
        ("fold", 0, recorded["0"]["job_id"], "local", 2), ("fold", 1, recorded["1"]["job_id"], "local", 2)]
    assert status[-1]["stage"] == "done"

    bundle_dir = tmp_path / "bundle"
    events = _events(_run(train_cli(*fit, "--bundle-dir", str(bundle_dir), "--progress", "json")))
    followed = events[0]
    assert followed["stage"] == "submitted" and set(followed["jobs"]) | {str(k) for k in followed["finished"]} == {"0", "1"}
    assert all(recorded[k]["job_id"] == job for k, job in followed["jobs"].items())  # the same jobs, not new ones
    assert read_jobs(run)["folds"] == recorded
    assert events[-1]["stage"] == "done" and events[-1]["folds"] == [0, 1] and events[-1]["bundle"] == str(bundle_dir)
    assert load_bundle(bundle_dir).folds == [0, 1]

    serial = tmp_path / "serial"
    fit_cases(load_cache_folder(toy_cache), serial, n_folds=2, config=tiny_config(2))
    for fold in (0, 1):
        assert _same_weights(fold_weights(run, fold), fold_weights(serial, fold)), f"fold {fold} differs from the serial fit"
        assert read_log_rows(run / f"fold_{fold}")[-1]["val_loss"] == read_log_rows(serial / f"fold_{fold}")[-1]["val_loss"]

    # --parallel 1: the second job trained only once the first had finished.
    first, second = sorted((read_attempts(run, 0)[-1], read_attempts(run, 1)[-1]), key=lambda a: a["started"])
    assert first["outcome"] == second["outcome"] == "finished" and second["started"] >= first["ended"]

    final = _status_events(run)
    assert [(e["fold"], e["state"], e["epochs_done"], e["job_state"]) for e in final[:-1]] == [
        (0, "finished", 2, "ENDED"), (1, "finished", 2, "ENDED")]
    assert final[0]["val_psnr"] == pytest.approx(read_log_rows(run / "fold_0")[-1]["val_psnr"])
    assert final[-1]["finished"] == [0, 1] and final[-1]["fraction"] == 1.0


def _invoke_in_process(args: list[str]) -> Any:
    """``contrast-amplifier-train ARGS`` in this process (typer's runner); fit's SIGTERM handler is undone afterwards."""
    from typer.testing import CliRunner

    from ContrastAmplifierTrainingLib import cli

    handler = signal.getsignal(signal.SIGTERM)
    try:
        return CliRunner().invoke(cli.app, args)
    finally:
        signal.signal(signal.SIGTERM, handler)


def _status_events(run: Path) -> list[dict[str, Any]]:
    """``status RUN --progress json``: one object per fold, then the done line."""
    done = _invoke_in_process(["status", str(run), "--progress", "json"])
    assert done.exit_code == 0, done.output
    return [json.loads(line) for line in done.stdout.splitlines()]


def _status_lines(run: Path) -> list[str]:
    done = _invoke_in_process(["status", str(run)])
    assert done.exit_code == 0, done.output
    return done.stdout.splitlines()


def _running_attempt(run: Path, fold: int, number: int, min_epochs: int) -> Optional[dict[str, Any]]:
    """Attempt ``number`` (1-based) of the fold while it runs, once it has finished ``min_epochs`` of its own epochs."""
    attempts = read_attempts(run, fold)
    if len(attempts) < number or attempts[number - 1]["outcome"] != "running":
        return None
    attempt = attempts[number - 1]
    rows = read_log_rows(run / f"fold_{fold}")
    return attempt if rows and rows[-1]["epoch"] >= attempt["from_epoch"] + min_epochs else None


def test_preempted_job_is_requeued_and_a_killed_one_resumes_from_its_checkpoint(tmp_path, toy_cache, train_cli, fold_weights):
    """SIGUSR2 (SLURM's preemption / time-limit signal, submitit's local executor's too) requeues the fold job, which
    resumes from its last epoch checkpoint; SIGKILL ends it, and rerunning fit submits a job that resumes too.
    After both the fold's weights are those of an uninterrupted run."""
    epochs = 12
    run = tmp_path / "run"
    fit = ["fit", str(toy_cache), str(run), "--folds", "1", "--n-folds", "2", "--epochs", str(epochs), *TINY, "--executor", "local"]
    _run(train_cli(*fit, "--no-wait", "--progress", "none"))
    job_id = read_jobs(run)["folds"]["1"]["job_id"]
    serial = _invoke_in_process(["fit", str(toy_cache), str(run), "--folds", "1", "--n-folds", "2", "--epochs", str(epochs), *TINY])
    assert serial.exit_code == 2 and f"folds [1] of {run} are being trained by fold jobs (fold 1: job {job_id})" in serial.output

    first = _wait_for(lambda: _running_attempt(run, 1, 1, min_epochs=2), "two epochs of the first attempt")
    os.kill(first["pid"], signal.SIGUSR2)
    second = _wait_for(lambda: _running_attempt(run, 1, 2, min_epochs=1), "an epoch of the requeued job")
    os.kill(second["pid"], signal.SIGKILL)
    record = read_jobs(run)["folds"]["1"]
    _wait_for(lambda: job_alive(run, 1, record) is False, "the killed job's end")
    stopped_at = read_log_rows(run / "fold_1")[-1]["epoch"]
    assert stopped_at < epochs

    events = _events(_run(train_cli(*fit, "--progress", "json")))  # a new job: the old one ended
    assert events[0]["stage"] == "submitted" and events[0]["jobs"]["1"] != record["job_id"]
    reported = [e["epoch"] for e in events if e["stage"] == "epoch"]
    assert reported == list(range(stopped_at + 1, epochs + 1)) and events[-1]["stage"] == "done"

    attempts = read_attempts(run, 1)
    assert [a["outcome"].split(" ")[0] for a in attempts] == ["requeued", "ended", "finished"]
    assert attempts[0]["job_id"] == attempts[1]["job_id"] == record["job_id"] != attempts[2]["job_id"]
    assert attempts[0]["from_epoch"] == 0 and 2 <= attempts[1]["from_epoch"] < attempts[2]["from_epoch"] == stopped_at
    assert [row["epoch"] for row in read_log_rows(run / "fold_1")] == list(range(1, epochs + 1))

    reference = tmp_path / "uninterrupted"
    fit_cases(load_cache_folder(toy_cache), reference, folds=[1], n_folds=2, config=tiny_config(epochs))
    assert _same_weights(fold_weights(run, 1), fold_weights(reference, 1))


def test_a_failed_fold_job_names_its_error_its_log_and_the_command_to_resume(tmp_path, toy_cache, train_cli, malicious_checkpoint):
    """A fold job that fails (here on a tampered checkpoint, refused unread as in the serial fit) is one error line."""
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    (run / "fold_0" / "checkpoint.pt").write_bytes(malicious_checkpoint("torch-zip", marker))
    def fit(epochs: int) -> list[str]:
        return train_cli("fit", str(toy_cache), str(run), "--folds", "0", "--n-folds", "2", "--epochs", str(epochs), *TINY,
                         "--executor", "local")

    failed = _run(fit(2) + ["--progress", "none"], code=1)
    record = read_jobs(run)["folds"]["0"]
    assert f"error: fold 0 (job {record['job_id']}) failed: " in failed.stderr
    assert f"CheckpointError: {run / 'fold_0' / 'checkpoint.pt'} was refused" in failed.stderr and not marker.exists()
    assert f"(log: {record['stderr']})" in failed.stderr and Path(record["stderr"]).is_file()
    assert "to resume, rerun: contrast-amplifier-train fit " in failed.stderr and "Traceback" not in failed.stderr
    (line, _, summary) = _status_lines(run)
    assert line.startswith(f"fold 0: 0/2 epochs, waiting; job {record['job_id']} (local): ENDED")
    assert "it ended: failed: CheckpointError" in line and summary == "0/2 folds finished, 0/2 epochs"

    # Stop (SIGTERM, the Slicer module's Stop) while waiting: the local jobs are stopped too, even when fit was
    # started with SIGINT ignored (a script's `cmd &`), and rerunning resumes from the checkpoint left.
    shutil.rmtree(run / "fold_0")
    waiting = subprocess.Popen(fit(60) + ["--progress", "json"], env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    events = []
    for text in waiting.stdout:
        events.append(json.loads(text))
        if events[-1]["stage"] == "epoch":
            waiting.send_signal(signal.SIGTERM)
            break
    assert waiting.wait(timeout=60) == 130 and "stopped the fold jobs; rerun the same command" in waiting.stderr.read()
    record = read_jobs(run)["folds"]["0"]
    assert job_alive(run, 0, record) is False
    (failed_attempt, attempt) = read_attempts(run, 0)
    assert failed_attempt["outcome"].startswith("failed: CheckpointError: ") and attempt["job_id"] == record["job_id"] and attempt["outcome"] == "stopped: KeyboardInterrupt"
    assert 1 <= attempt["to_epoch"] < 60 and (run / "fold_0" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (run / "fold_0").iterdir()) == ["checkpoint.pt", "log.csv"]  # no temporary file left


@pytest.mark.parametrize("options, message", [
    (["--executor", "slurm"], "--executor slurm needs SLURM's sbatch and srun on PATH"),
    (["--executor", "pbs"], "--executor 'pbs' is not an executor: choose local or slurm."),
    (["--no-wait"], "--no-wait: only with --executor local or slurm"),
    (["--executor", "local", "--partition", "gpu"], "--partition: SLURM options, for --executor slurm"),
    (["--executor", "slurm", "--slurm-option", "account"], "--slurm-option 'account': write KEY=VALUE"),
])
def test_bad_executor_options_are_refused_before_anything_is_written(tmp_path, toy_cache, options, message, monkeypatch):
    bare = tmp_path / "bin"  # a PATH without sbatch/srun (this machine has none anyway)
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    done = _invoke_in_process(["fit", str(toy_cache), str(tmp_path / "run"), "--epochs", "1", *TINY, *options])
    assert done.exit_code == 2 and f"error: {message}" in " ".join(done.output.split()), done.output
    assert not (tmp_path / "run").exists()


def test_status_of_a_folder_without_a_run_is_one_error_line(tmp_path):
    done = _invoke_in_process(["status", str(tmp_path)])
    assert done.exit_code == 2 and f"error: {tmp_path} holds no run (no plan.json)" in " ".join(done.output.split())


def test_slurm_array_script_carries_the_cap_resources_and_preemption_signal(tmp_path):
    """The sbatch script submitit writes from fit's SLURM options (rendered without a cluster)."""
    from submitit.slurm.slurm import _make_sbatch_string

    settings = ExecutorSettings("slurm", parallel=2, partition="gpu", mem_gb=24, minutes=600,
                                slurm_options=("account=proj42", "--qos=long"), setup=("module load cuda",))
    params = slurm_parameters(settings, n_jobs=5, device="auto", threads=settings.threads(None, 5))
    script = _make_sbatch_string(command="python -m submitit.core._submit", folder=tmp_path / "%j", map_count=5, **params)
    for line in ("#SBATCH --array=0-4%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=24GB", "#SBATCH --time=600", "#SBATCH --signal=USR2@90", "#SBATCH --account=proj42",
                 "#SBATCH --qos=long", "module load cuda"):
        assert line in script.splitlines(), (line, script)
    cpu = slurm_parameters(ExecutorSettings("slurm", cpus_per_job=16), n_jobs=5, device="cpu", threads=16)
    assert "gpus_per_node" not in cpu and cpu["cpus_per_task"] == 16 and cpu["array_parallelism"] == 5
    assert ExecutorSettings("local", parallel=8).cap(2) == 2 and ExecutorSettings("local", parallel=1).threads(None, 2) == os.cpu_count()
