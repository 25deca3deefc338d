"""Reading a run folder and following the fit CLI's progress (run_status.py), on folders the real trainer wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ContrastAmplifierCommon.process import ProgressEvent
from ContrastAmplifierTrainingLib.run_status import (
    DONE_FILE,
    FINISHED,
    LOG_FILE,
    PLAN_FILE,
    RUNNING,
    STOPPED,
    WAITING,
    FoldStatus,
    RunStatusCache,
    TrainingMonitor,
    fold_dir,
    fold_of_dir,
    has_run,
    read_log_rows,
    read_run_status,
    run_folder_signature,
)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run the real trainer wrote: fold 0 finished (2 epochs), fold 1 stopped after 1, fold 2 not started.

    Returns the run folder, the per-epoch rows the trainer reported and its "fit" progress messages.
    """
    import torch
    from ContrastAmplifierLib.network import NetworkConfig
    from ContrastAmplifierCommon.progress import CancelToken, Cancelled
    from ContrastAmplifierTrainingLib.fit import fit_cases
    from ContrastAmplifierTrainingLib.toy import toy_cohort
    from ContrastAmplifierTrainingLib.trainer import TrainConfig

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("status") / "run"
    cases = toy_cohort(6, (16, 16, 16), seed=5)
    config = TrainConfig(epochs=2, seed=0, network=NetworkConfig(base_channels=4, levels=2), device="cpu")
    rows, messages = [], []

    def progress(stage, fraction, message=""):
        if stage == "fit":
            messages.append(message)

    fit_cases(cases, run, folds=[0], n_folds=3, config=config, on_epoch=rows.append, progress=progress)
    token = CancelToken()

    def stop_after_first_epoch(row):
        rows.append(row)
        token.cancel()

    with pytest.raises(Cancelled):
        fit_cases(cases, run, folds=[1], n_folds=3, config=config, on_epoch=stop_after_first_epoch, cancel=token)
    fold_dir(run, 2).mkdir()  # what fit leaves when it is stopped before a fold's first epoch ends
    return run, rows, messages


def test_a_new_or_missing_folder_has_no_run():
    for folder in (None, "", "   ", "/no/such/run/folder"):
        status = read_run_status(folder)
        assert status.folds == {} and not status.has_plan and not has_run(folder)


def test_fold_folder_names():
    assert fold_dir("/runs/a", 3) == Path("/runs/a/fold_3")
    assert [fold_of_dir(name) for name in ("fold_0", "fold_12", "fold_x", "fold_", "fold_-1", "cache", "fold0")] == [
        0, 12, None, None, None, None, None]


def test_the_writers_use_the_layout_names(real_run):
    run, _, _ = real_run
    assert (run / PLAN_FILE).is_file()
    assert (fold_dir(run, 0) / LOG_FILE).is_file() and (fold_dir(run, 0) / DONE_FILE).is_file()
    assert (fold_dir(run, 1) / LOG_FILE).is_file() and not (fold_dir(run, 1) / DONE_FILE).exists()


def test_status_of_a_real_run_folder(real_run):
    run, rows, _ = real_run
    status = read_run_status(run)
    assert status.run_dir == run and status.has_plan and has_run(run) and has_run(str(run))
    assert sorted(status.folds) == [0, 1, 2]
    done, stopped, waiting = status.folds[0], status.folds[1], status.folds[2]
    assert (done.state, done.epochs, done.epochs_done) == (FINISHED, 2, 2)
    last = [r for r in rows if r["fold"] == 0][-1]
    assert done.train_loss == pytest.approx(last["train_loss"], rel=1e-5)
    assert done.val_loss == pytest.approx(last["val_loss"], rel=1e-5)
    assert done.val_psnr == pytest.approx(last["val_psnr"], rel=1e-5)
    assert done.val_ssim == pytest.approx(last["val_ssim"], rel=1e-5)
    assert done.seconds_per_epoch == pytest.approx(last["seconds"], rel=1e-5)
    assert done.losses_text().startswith("train ") and "PSNR" in done.losses_text()
    assert (stopped.state, stopped.epochs, stopped.epochs_done) == (STOPPED, 0, 1)
    assert stopped.train_loss == pytest.approx([r for r in rows if r["fold"] == 1][-1]["train_loss"], rel=1e-5)
    assert waiting == FoldStatus(2)


def test_log_rows_come_back_as_the_trainer_reported_them(real_run, tmp_path):
    """read_log_rows (what `fit --executor` follows jobs by): every finished epoch, numbers parsed."""
    run, rows, _ = real_run
    for fold in (0, 1):
        logged = read_log_rows(fold_dir(run, fold))
        reported = [r for r in rows if r["fold"] == fold]
        assert [(r["fold"], r["epoch"], r["rollbacks"]) for r in logged] == [(fold, r["epoch"], 0) for r in reported]
        assert all(type(r["epoch"]) is int and r["val_psnr"] == pytest.approx(t["val_psnr"], rel=1e-5) for r, t in zip(logged, reported))
    assert read_log_rows(fold_dir(run, 2)) == [] and read_log_rows(tmp_path / "nowhere") == []


def test_a_resumed_monitor_starts_from_the_folder(real_run):
    run, _, _ = real_run
    monitor = TrainingMonitor([0, 1, 2], 2, initial=read_run_status(run).folds)
    assert [(s.fold, s.state, s.epochs_done) for s in monitor.ordered()] == [(0, FINISHED, 2), (1, WAITING, 1), (2, WAITING, 0)]


def test_the_monitor_reads_the_trainers_own_progress_messages(real_run):
    _, _, messages = real_run
    assert messages, "the trainer reported no fit progress"
    monitor = TrainingMonitor([0], 2)
    monitor.update(ProgressEvent("fit", 0.1, messages[0]))
    assert monitor.fold_status[0].state == RUNNING and monitor.latest_fold == 0


def test_unreadable_files_never_break_the_status(real_run, tmp_path):
    import shutil

    run, _, _ = real_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (fold_dir(copy, 0) / DONE_FILE).write_text("[not an object", encoding="utf-8")
    (fold_dir(copy, 1) / LOG_FILE).write_bytes(b"\xff\xfe\x00garbage")
    (copy / "fold_notes").mkdir()
    status = read_run_status(copy)
    assert sorted(status.folds) == [0, 1, 2]
    assert (status.folds[0].state, status.folds[0].epochs) == (FINISHED, 2)  # epochs fall back to the log
    assert status.folds[1].state == WAITING and status.folds[1].epochs_done == 0


def _event(stage, fraction=0.0, message="", **extra):
    return ProgressEvent(stage, fraction, message, extra)


def test_training_monitor_tracks_folds_and_latest_losses():
    monitor = TrainingMonitor([0, 1], epochs=2)
    monitor.update(_event("cache", 0.0, "case 1/4"))
    monitor.update(_event("fit", 0.1, "fold 0 epoch 1/2 case 1/3"))
    assert monitor.fold_status[0].state == "running" and monitor.fold_status[1].state == "waiting"
    monitor.update(_event("epoch", 0.25, "...", fold=0, epoch=1, epochs=2, train_loss=0.02, val_loss=0.03,
                          val_psnr=25.5, val_ssim=0.8, seconds=1.5))
    assert monitor.latest_losses() == "fold 0, epoch 1/2: train 0.02000, val 0.03000, PSNR 25.50 dB, SSIM 0.8000"
    monitor.update(_event("epoch", 0.5, "...", fold=0, epoch=2, epochs=2, train_loss=0.01, val_loss=0.02,
                          val_psnr=27.0, val_ssim=0.85, seconds=1.4))
    assert monitor.fold_status[0].state == "finished"
    monitor.update(_event("fit", 0.6, "fold 1 epoch 1/2 case 2/3"))
    monitor.update(_event("cancelled", 0.0, "stopped; rerun the same command to resume"))
    assert monitor.fold_status[1].state == "stopped" and monitor.fold_status[0].state == "finished"
    resumed = TrainingMonitor([0, 1], 2, initial={0: monitor.fold_status[0]})
    assert resumed.fold_status[0].state == "finished" and resumed.fold_status[1].epochs_done == 0
    resumed.update(_event("done", 1.0, "", folds=[0, 1]))
    assert all(p.state == "finished" for p in resumed.fold_status.values())


def test_reading_a_run_does_not_import_torch(tmp_path):
    """The Slicer module reads run folders in the GUI process, before torch may be installed."""
    run = tmp_path / "run"
    fold_dir(run, 0).mkdir(parents=True)
    (run / PLAN_FILE).write_text("{}", encoding="utf-8")
    (fold_dir(run, 0) / DONE_FILE).write_text(json.dumps({"fold": 0, "epochs": 3}), encoding="utf-8")
    code = ("import sys; from ContrastAmplifierTrainingLib.run_status import read_run_status, TrainingMonitor; "
            f"s = read_run_status({str(run)!r}); TrainingMonitor([0], 3, s.folds); "
            "print(s.has_plan, s.folds[0].state, 'torch' in sys.modules, 'numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "finished", "False", "False"]


def test_the_split_and_the_missing_folds_of_a_real_run(real_run):
    """fold 0 finished, fold 1 stopped, fold 2 not started, of a three-fold split."""
    run, _, _ = real_run
    status = read_run_status(run)
    assert status.n_folds == 3 and status.finished_folds() == [0]
    assert status.missing_folds() == [1, 2] and status.missing_folds([0]) == [] and status.missing_folds([0, 2]) == [2]
    assert read_run_status(None).n_folds is None and read_run_status(None).missing_folds() == []


def test_the_cache_reads_again_only_when_the_folder_changed(real_run, tmp_path, monkeypatch):
    import shutil

    from ContrastAmplifierTrainingLib import run_status

    run, _, _ = real_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    opened = []
    real_open = open
    counting_open = lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr("io.open", counting_open)  # pathlib's read_text
    cache = RunStatusCache()
    first = cache.read(copy)
    assert cache.reads == 1 and first.folds[1].epochs_done == 1 and opened
    opened.clear()
    for _ in range(5):
        assert cache.read(copy) is first
    assert cache.reads == 1 and opened == [], "an unchanged folder is not read (stat only)"
    log = fold_dir(copy, 1) / LOG_FILE
    log.write_text(log.read_text(encoding="utf-8") + log.read_text(encoding="utf-8").splitlines()[-1].replace(",1,", ",2,", 1) + "\n",
                   encoding="utf-8")
    assert cache.read(copy).folds[1].epochs_done == 2 and cache.reads == 2  # a log grew
    (fold_dir(copy, 1) / DONE_FILE).write_text(json.dumps({"fold": 1, "epochs": 2}), encoding="utf-8")
    assert cache.read(copy).folds[1].state == FINISHED and cache.reads == 3  # a fold finished
    fold_dir(copy, 3).mkdir()
    assert 3 in cache.read(copy).folds and cache.reads == 4  # a fold folder appeared
    assert cache.read(tmp_path / "other").folds == {} and cache.reads == 5  # another folder
    assert cache.read(copy).folds[1].state == FINISHED and cache.reads == 6
    cache.clear()
    cache.read(copy)
    assert cache.reads == 7
    assert run_folder_signature(copy) == run_folder_signature(str(copy)) != run_folder_signature(run)
    assert run_folder_signature(None) == run_folder_signature("") == ()
    assert run_status.read_run_status is read_run_status
