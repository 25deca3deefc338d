"""Fold training as job arrays through submitit: ``fit --executor local|slurm`` and ``status``.

One job per fold (``executor.map_array``): on SLURM a job array capped at ``--parallel`` tasks
running at once (``--array=0-4%N``), on this machine one process per fold, at most ``--parallel``
of them training at once (run slots, :mod:`.fold_job`). Each job runs :class:`.fold_job.FoldJob`,
the serial ``fit``'s code path for its fold, and is requeued on preemption or time limit, resuming
from the fold's last epoch checkpoint. Everything lands in the run folder::

    OUT_DIR/jobs/
      jobs.json            executor and job id of each fold's latest submission (rewritten atomically)
      <job id>/            submitit's pickles and the job's stdout/stderr (``<id>_0_log.out/.err``)
      fold_K.json          the fold's attempts (written by its job, :mod:`.fold_job`)
      locks/               fold and run-slot locks

Before submitting, the parent writes ``plan.json`` (so the jobs never race to write it); a rerun
skips finished folds and attaches to fold jobs still alive instead of submitting them twice.
Standard library only at import; submitit and torch are imported when jobs are submitted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel, null_progress

from .fold_job import FoldJob, fold_lock_path, jobs_dir, lock_is_held, now_iso, read_attempts
from .run_status import FINISHED, RUNNING, WAITING, FoldStatus, fold_dir, read_fold_status, read_log_rows

#: ``--executor`` values.
EXECUTORS = ("local", "slurm")
#: The record of submitted jobs, in ``OUT_DIR/jobs``.
JOBS_FILE = "jobs.json"
CLUSTER_INSTALL = "pip install 'slicer-contrast-amplifier[cluster]'"
#: CPUs (and torch threads) of a SLURM fold job unless ``--cpus-per-job`` says otherwise.
DEFAULT_SLURM_CPUS = 4
#: SLURM states of a job that has not ended (``sacct``).
SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "PREEMPTED")
#: Where the local executor's controller processes write (their jobs write to their own logs).
LOCAL_CONTROLLER_LOG = "local-controllers.log"
#: Seconds between two looks at the fold folders while waiting.
POLL_S = 1.0
#: Seconds a job may take to exit once its fold has finished before waiting stops anyway (SLURM may report
#: COMPLETING for a while; a local job exits within a second).
END_GRACE_S = 60.0


@dataclass(frozen=True)
class ExecutorSettings:
    """Where and how the fold jobs run (``fit``'s executor options).

    Attributes:
        kind: ``local`` (processes on this machine) or ``slurm`` (a job array).
        parallel: fold jobs training at once (default: SLURM all; local one per visible GPU, else 1).
        partition, gpus_per_job, cpus_per_job, mem_gb, slurm_options, setup: SLURM only; ``slurm_options``
            are ``KEY=VALUE`` sbatch options (``account=proj42``), ``setup`` shell lines run first in
            the job (``module load cuda``).
        minutes: time limit of one job; at the limit the job is requeued and resumes.
    """

    kind: str
    parallel: Optional[int] = None
    partition: Optional[str] = None
    gpus_per_job: Optional[int] = None
    cpus_per_job: Optional[int] = None
    mem_gb: Optional[float] = None
    minutes: int = 24 * 60
    slurm_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is written or submitted.

        Raises:
            ValueError: unknown executor, SLURM options for the local executor, a malformed
                ``--slurm-option``, submitit missing, or SLURM's ``sbatch``/``srun`` not on PATH.
        """
        if self.kind not in EXECUTORS:
            raise ValueError(f"--executor {self.kind!r} is not an executor: choose local or slurm.")
        if self.kind == "local":
            given = [name for name, value in (("--partition", self.partition), ("--gpus-per-job", self.gpus_per_job),
                                              ("--cpus-per-job", self.cpus_per_job), ("--mem-gb", self.mem_gb),
                                              ("--slurm-option", self.slurm_options), ("--job-setup", self.setup))
                     if value not in (None, ())]
            if given:
                raise ValueError(f"{', '.join(given)}: SLURM options, for --executor slurm (the local executor runs "
                                 "its jobs on this machine, with every visible GPU).")
        self.sbatch_options()
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError(f"--executor {self.kind} needs the submitit package: {CLUSTER_INSTALL}") from None
        if self.kind == "slurm":
            missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
            if missing:
                raise ValueError(f"--executor slurm needs SLURM's {' and '.join(missing)} on PATH, and this machine has "
                                 "none: run the command on a login node of the cluster, or use --executor local. "
                                 "Nothing was submitted.")

    def sbatch_options(self) -> dict[str, str]:
        """``--slurm-option KEY=VALUE`` as a dict (sbatch's ``--KEY=VALUE``)."""
        options: dict[str, str] = {}
        for text in self.slurm_options:
            key, sep, value = str(text).partition("=")
            if not sep or not key.strip().lstrip("-") or not value.strip():
                raise ValueError(f"--slurm-option {text!r}: write KEY=VALUE, e.g. --slurm-option account=proj42.")
            options[key.strip().lstrip("-")] = value.strip()
        return options

    def cap(self, n_jobs: int, device: str = "auto") -> int:
        """Fold jobs training at once (of ``n_jobs``, training on ``device``)."""
        if self.parallel:
            return max(1, min(int(self.parallel), n_jobs))
        return n_jobs if self.kind == "slurm" else max(1, min(len(local_gpus(device)), n_jobs))

    def threads(self, threads: Optional[int], n_jobs: int, device: str = "auto") -> int:
        """torch threads per job: ``--threads``, else the SLURM job's CPUs, else this machine's cores / cap."""
        if threads:
            return int(threads)
        if self.kind == "slurm":
            return int(self.cpus_per_job or DEFAULT_SLURM_CPUS)
        return max(1, (os.cpu_count() or 1) // self.cap(n_jobs, device))


def local_gpus(device: str) -> list[int]:
    """GPU indices the local executor passes to its jobs (``CUDA_VISIBLE_DEVICES``): none for ``--device cpu``."""
    if device == "cpu" or device == "mps":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(torch.cuda.device_count()))
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r} names GPUs by UUID; --executor local hands GPUs to its "
                         "jobs by index: set it to indices (e.g. 0,1) or unset it.")
    return [int(p) for p in parts]


def slurm_parameters(settings: ExecutorSettings, n_jobs: int, device: str, threads: int) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` of the fold array (one GPU per job unless ``--device cpu``)."""
    gpus = settings.gpus_per_job if settings.gpus_per_job is not None else (0 if device == "cpu" else 1)
    params: dict[str, Any] = {"job_name": "contrast-amplifier-fold", "time": int(settings.minutes),
                              "cpus_per_task": int(settings.cpus_per_job or threads), "array_parallelism": settings.cap(n_jobs, device)}
    if gpus:
        params["gpus_per_node"] = int(gpus)
    if settings.partition:
        params["partition"] = settings.partition
    if settings.mem_gb:
        mem = float(settings.mem_gb)
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if settings.setup:
        params["setup"] = list(settings.setup)
    options = settings.sbatch_options()
    if options:
        params["additional_parameters"] = options
    return params


def make_executor(settings: ExecutorSettings, out_dir: Path, n_jobs: int, device: str, threads: int) -> Any:
    """The submitit executor writing into ``OUT_DIR/jobs/<job id>/``."""
    import submitit

    folder = str(jobs_dir(out_dir) / "%j")
    if settings.kind == "local":
        local = submitit.LocalExecutor(folder=folder)
        gpus = local_gpus(device)
        local.update_parameters(timeout_min=int(settings.minutes), gpus_per_node=len(gpus), visible_gpus=tuple(gpus))
        return local
    slurm = submitit.SlurmExecutor(folder=folder)
    slurm.update_parameters(**slurm_parameters(settings, n_jobs, device, threads))
    return slurm


# -- jobs.json --------------------------------------------------------------------------------------


def read_jobs(out_dir: Path) -> dict[str, Any]:
    """``OUT_DIR/jobs/jobs.json`` (``{"folds": {}}`` when there is none or it is unreadable)."""
    try:
        record = json.loads((jobs_dir(out_dir) / JOBS_FILE).read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("folds"), dict):
            return record
    except (OSError, ValueError):
        pass
    return {"format_version": 1, "folds": {}}


def record_jobs(out_dir: Path, kind: str, jobs: Mapping[int, Any], epochs: int, command: Optional[str]) -> dict[str, Any]:
    """Add the folds' new jobs to ``jobs.json`` (atomically; other folds' entries are kept)."""
    record = read_jobs(out_dir)
    for fold, job in jobs.items():
        record["folds"][str(fold)] = {
            "executor": kind, "job_id": str(job.job_id), "submitted": now_iso(), "epochs": int(epochs),
            "folder": str(jobs_dir(out_dir) / "%j"), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        }
    if command:
        record["command"] = command
    write_text_atomic(json.dumps(record, indent=2) + "\n", jobs_dir(out_dir) / JOBS_FILE)
    return record


# -- whether a fold's job is alive ------------------------------------------------------------------


def _local_process_alive(job_id: str) -> bool:
    """The local job's controller process (its pid is the job id) still runs."""
    if os.name == "nt":  # os.kill would terminate the process there; no local jobs run on Windows anyway
        return False
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError, OverflowError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:  # a reused pid is another program
        return b"submitit" in cmdline.read_bytes() if cmdline.parent.is_dir() else True
    except OSError:
        return False


def slurm_state(job_id: str) -> Optional[str]:
    """The SLURM state of a job (``sacct``), ``None`` where ``sacct`` is missing or does not answer."""
    if shutil.which("sacct") is None:
        return None
    try:
        done = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return lines[0].upper() if done.returncode == 0 and lines else None


def job_alive(out_dir: Path, fold: int, record: Mapping[str, Any]) -> Optional[bool]:
    """Whether the fold's recorded job has not ended; ``None`` when it cannot be known here."""
    if lock_is_held(fold_lock_path(out_dir, fold)):
        return True
    if record.get("executor") == "local":
        return _local_process_alive(str(record.get("job_id")))
    state = slurm_state(str(record.get("job_id")))
    return None if state is None else state in SLURM_ALIVE


def fold_finished(out_dir: Path, fold: int, epochs: int) -> bool:
    status = read_fold_status(fold_dir(out_dir, fold), fold)
    return status.state == FINISHED and status.epochs >= epochs


def live_jobs(out_dir: Path, folds: Sequence[int]) -> dict[int, str]:
    """Fold -> job id of the ``folds`` whose recorded job still runs (the serial ``fit`` must not train them)."""
    recorded = read_jobs(out_dir)["folds"]
    return {k: str(recorded[str(k)]["job_id"]) for k in folds
            if str(k) in recorded and job_alive(out_dir, k, recorded[str(k)])}


# -- submission and waiting ---------------------------------------------------------------------------


@dataclass
class FoldHandle:
    """A fold's job, as submitted now (``job`` set) or found alive from an earlier submission."""

    fold: int
    record: dict[str, Any]
    job: Any = None

    @property
    def job_id(self) -> str:
        return str(self.record.get("job_id"))

    def running(self, out_dir: Path) -> bool:
        if self.job is not None:
            return not self.job.done()
        return bool(job_alive(out_dir, self.fold, self.record))

    def error(self) -> str:
        """The job's error in one line: the last line of its traceback (submitit's ``job.exception()``,
        else its stderr log), or what submitit says of a job that never completed (killed, cancelled)."""
        text, never = "", "the job ended without finishing the fold and without an error message"
        if self.job is not None:
            try:
                exception = self.job.exception()
                text = str(exception) if exception is not None else ""
            except Exception as exc:  # UncompletedJobError: killed or cancelled, no result
                never = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "-" * 20 in text:  # FailedJobError: "...with trace:\n----\n<traceback>\n----\nYou can check full logs..."
            text = text.split("-" * 20)[1]
        if not text.strip():
            try:
                text = Path(str(self.record.get("stderr"))).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
        lines = [line.strip() for line in text.splitlines()
                 if line.strip().strip("-^~") and not line.startswith(("submitit ", "srun: ", " "))]
        return lines[-1][:400] if lines else never

    def cancel(self) -> None:
        if self.job is not None and self.record.get("executor") == "local":
            self.job.cancel(check=False)


@dataclass
class Submission:
    """What ``submit_folds`` did: jobs to wait for and folds that had already finished."""

    handles: list[FoldHandle] = field(default_factory=list)
    submitted: list[int] = field(default_factory=list)
    attached: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)


def submit_folds(job: FoldJob, folds: Sequence[int], settings: ExecutorSettings, command: Optional[str] = None,
                 device: str = "auto") -> Submission:
    """Submit one job per unfinished fold of ``folds`` (``job``'s run folder must hold its plan).

    Folds finished with ``job.config.epochs`` are skipped; a fold whose recorded job is still
    alive is attached to, not submitted again. ``job``'s ``threads`` and ``slots`` are filled in.
    """
    out_dir = Path(job.out_dir)
    epochs = job.config.epochs
    result = Submission()
    recorded = read_jobs(out_dir)["folds"]
    todo: list[int] = []
    for fold in folds:
        record = recorded.get(str(fold))
        if fold_finished(out_dir, fold, epochs):
            result.finished.append(fold)
        elif record is not None and job_alive(out_dir, fold, record):
            result.handles.append(FoldHandle(fold, dict(record), _reattach(record)))
            result.attached.append(fold)
        else:
            todo.append(fold)
    if todo:
        threads = settings.threads(job.threads, len(todo), device)
        job = replace(job, threads=threads, slots=settings.cap(len(todo), device) if settings.kind == "local" else None)
        executor = make_executor(settings, out_dir, len(todo), device, threads)
        if settings.kind == "local":
            with _stdio_to(jobs_dir(out_dir) / LOCAL_CONTROLLER_LOG), _children_take_sigint():
                jobs = executor.map_array(job, todo)
        else:
            jobs = executor.map_array(job, todo)
        with contextlib.suppress(OSError):  # submitit's folder for pickles before the job id is known, left empty
            (jobs_dir(out_dir) / "%j").rmdir()
        records = record_jobs(out_dir, settings.kind, dict(zip(todo, jobs)), epochs, command)["folds"]
        result.handles += [FoldHandle(fold, dict(records[str(fold)]), submitted) for fold, submitted in zip(todo, jobs)]
        result.submitted = list(todo)
    result.handles.sort(key=lambda h: h.fold)
    return result


@contextlib.contextmanager
def _stdio_to(path: Path) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at ``path`` for the block.

    submitit starts each local job's controller process with this process's descriptors: without
    this, a pipe reading ``fit --no-wait`` (a script, ``| tee``, the tests) would stay open until the
    jobs end, and ``--no-wait`` would wait. The controllers' own output goes to ``path`` instead
    (each job's output goes to its log files anyway).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)


@contextlib.contextmanager
def _children_take_sigint() -> Iterator[None]:
    """Start child processes with SIGINT at its default, even when this process ignores it.

    A local job is stopped with SIGINT (submitit's ``LocalJob.cancel``, and Ctrl-C); an ignored
    signal is inherited through ``exec``, so a ``fit`` started in the background of a script (``&``)
    or under ``nohup`` would otherwise start jobs that nothing but SIGKILL stops.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reattach(record: Mapping[str, Any]) -> Any:
    """A submitit job object for a SLURM job of an earlier submission (local ones are followed by pid and lock)."""
    if record.get("executor") != "slurm":
        return None
    import submitit

    return submitit.SlurmJob(folder=str(record["folder"]), job_id=str(record["job_id"]))


def wait_for_folds(out_dir: Path, handles: Sequence[FoldHandle], epochs: int, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
                   poll_s: float = POLL_S) -> dict[int, Optional[str]]:
    """Follow the fold jobs until each has ended; fold -> ``None`` (finished) or the job's error.

    A job whose fold has finished is waited for until its process ends (so that ``status`` run
    next says ENDED), at most :data:`END_GRACE_S` after the fold's ``done.json`` appeared.

    Every epoch a job finishes (its ``log.csv`` row) goes to ``on_epoch``; ``progress`` gets the
    share of all epochs done. ``cancel`` stops the waiting (the jobs are not touched).
    """
    progress = progress or null_progress
    out_dir = Path(out_dir)
    shown = {h.fold: read_fold_status(fold_dir(out_dir, h.fold), h.fold).epochs_done for h in handles}
    outcome: dict[int, Optional[str]] = {}
    finished_seen: dict[int, float] = {}
    while True:
        for handle in handles:
            if handle.fold in outcome:
                continue
            ended = not handle.running(out_dir)  # before reading the log: rows written before the end are seen
            for row in read_log_rows(fold_dir(out_dir, handle.fold)):
                if row["epoch"] > shown[handle.fold]:
                    shown[handle.fold] = row["epoch"]
                    if on_epoch is not None:
                        on_epoch(row)
            finished = fold_finished(out_dir, handle.fold, epochs)
            if finished:  # the job exits moments after its fold's done.json: wait for that, within a grace
                finished_seen.setdefault(handle.fold, time.monotonic())
            if ended or (finished and time.monotonic() - finished_seen[handle.fold] > END_GRACE_S):
                outcome[handle.fold] = None if finished else handle.error()
        done = sum(min(shown[h.fold], epochs) for h in handles)
        progress("fit", done / max(1, epochs * len(handles)),
                 f"{len(outcome)}/{len(handles)} fold jobs ended; " + ", ".join(f"fold {h.fold} {shown[h.fold]}/{epochs}" for h in handles))
        if len(outcome) == len(handles):
            return outcome
        check_cancel(cancel)
        if cancel is not None:
            cancel.event.wait(poll_s)
        else:
            time.sleep(poll_s)


def stop_local_jobs(handles: Sequence[FoldHandle], timeout_s: float = 10.0) -> None:
    """Stop the local jobs this process submitted (SIGINT; the epoch in progress is lost) and wait for them."""
    for handle in handles:
        handle.cancel()
    deadline = time.monotonic() + timeout_s
    for handle in handles:
        while handle.job is not None and handle.record.get("executor") == "local" and not handle.job.done():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)


# -- status -------------------------------------------------------------------------------------------


@dataclass
class FoldJobStatus:
    """One fold's progress (from its folder) and its job (from ``jobs.json``)."""

    progress: FoldStatus
    epochs: Optional[int] = None
    record: dict[str, Any] = field(default_factory=dict)
    job_state: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        """``fold 1: 20/30 epochs, running; last epoch: train ..., val ...; job 123 (local): RUNNING, attempt 2 from epoch 3 ...``"""
        p = self.progress
        total = p.epochs if p.state == FINISHED and p.epochs else self.epochs
        parts = [f"fold {p.fold}: {p.epochs_done}/{total or '?'} epochs, {p.state}"]
        if p.losses_text():
            parts.append(f"last epoch: {p.losses_text()}")
        if self.record:
            job = f"job {self.record.get('job_id')} ({self.record.get('executor')}): {self.job_state}"
            if self.attempts:
                last = self.attempts[-1]
                job += f", attempt {len(self.attempts)} from epoch {last.get('from_epoch')}"
                if len(self.attempts) > 1:
                    job += f" (attempt {len(self.attempts) - 1}: {self.attempts[-2].get('outcome')})"
                if p.state != FINISHED and last.get("outcome") not in ("running", "finished"):
                    job += f"; it ended: {last.get('outcome')}"
            parts.append(job)
            if p.state != FINISHED and self.job_state == "ENDED":
                parts.append(f"log {self.record.get('stderr')}")
        return "; ".join(parts)


def _job_state(out_dir: Path, fold: int, record: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]]) -> str:
    if record.get("executor") == "slurm":
        state = slurm_state(str(record.get("job_id")))
        if state is not None:
            return state
        if lock_is_held(fold_lock_path(out_dir, fold)):
            return "RUNNING (its fold lock is held; no sacct here)"
        return "unknown: no sacct on this machine; progress is read from the fold folder"
    if not job_alive(out_dir, fold, record):
        return "ENDED"
    running = bool(attempts) and attempts[-1].get("outcome") == "running"
    return "RUNNING" if running else "PENDING (starting, or waiting for a run slot)"


def fold_job_status(out_dir: Path, n_folds: Optional[int] = None) -> list[FoldJobStatus]:
    """Every fold of the run (the plan's folds, those with a folder and those with a job), in order."""
    from .run_status import read_run_status

    out_dir = Path(out_dir)
    run = read_run_status(out_dir)
    recorded = read_jobs(out_dir)["folds"]
    folds = set(run.folds) | {int(k) for k in recorded} | set(range(n_folds or run.n_folds or 0))
    statuses = []
    for fold in sorted(folds):
        progress = run.folds.get(fold, FoldStatus(fold))
        record = dict(recorded.get(str(fold), {}))
        attempts = read_attempts(out_dir, fold)
        epochs = int(record["epochs"]) if record.get("epochs") else (progress.epochs or None)
        state = _job_state(out_dir, fold, record, attempts) if record else ""
        if progress.state != FINISHED and state.startswith(("RUNNING", "PENDING")):
            progress = replace(progress, state=RUNNING if state.startswith("RUNNING") else WAITING)
        statuses.append(FoldJobStatus(progress, epochs, record, state, attempts))
    return statuses
