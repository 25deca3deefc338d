"""One fold's training as a submitit job: the callable the job runs, its locks and its attempt record.

``contrast-amplifier-train fit --executor local|slurm`` (:mod:`.fold_jobs`) submits one
:class:`FoldJob` call per fold. In the job it loads the cached cases in ``plan.json``'s order and
calls :func:`.fit.fit_cases` for its one fold: the code path of the serial ``fit``, so with the
same seeds, device and thread count the weights are the serial run's, bit for bit.

Preemption and time limits: submitit sends SIGUSR2 (SLURM ``--signal=USR2@90``; the local
executor at its time limit) and requeues a job whose callable has a ``checkpoint`` method (the
protocol of ``submitit.helpers.Checkpointable``; duck-typed here so that this module imports
without submitit). The requeued job runs :class:`FoldJob` again, and :func:`.trainer.fit_fold`
resumes from the fold's last ``checkpoint.pt`` (written after every epoch): at most the epoch in
progress is redone. A job SLURM requeues by itself (``PreemptMode=REQUEUE``) resumes the same way.

The job folder ``OUT_DIR/jobs/`` (see :mod:`.fold_jobs`) gets from each job:

* ``locks/fold_K.lock``: held (``flock``) while a job owns fold K, so a second job for the same
  fold stops at once instead of writing into the same ``fold_K/``;
* ``locks/slot_I.lock``: one of ``slots`` run slots (the local executor's parallelism cap; SLURM
  caps an array itself with ``--array=0-4%N``);
* ``fold_K.json``: one entry per attempt (job id, host, pid, epoch it started from, end, outcome).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ContrastAmplifierCommon.atomicfile import write_text_atomic

from .run_status import fold_dir, read_fold_status

if TYPE_CHECKING:  # torch only where a job trains: `status` reads runs without it
    from .trainer import TrainConfig

#: The run folder's sub-folder for job logs, ``jobs.json``, locks and attempt records.
JOBS_DIR = "jobs"
LOCKS_DIR = "locks"
#: Seconds between two tries for a free run slot.
SLOT_POLL_S = 1.0


def jobs_dir(out_dir: Path) -> Path:
    """``OUT_DIR/jobs``."""
    return Path(out_dir) / JOBS_DIR


def fold_lock_path(out_dir: Path, fold: int) -> Path:
    return jobs_dir(out_dir) / LOCKS_DIR / f"fold_{int(fold)}.lock"


def attempts_path(out_dir: Path, fold: int) -> Path:
    return jobs_dir(out_dir) / f"fold_{int(fold)}.json"


def now_iso(precise: bool = False) -> str:
    """The current UTC time, ISO 8601 (to the second, or to the microsecond with ``precise``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds" if precise else "seconds")


# -- locks (flock: released by the kernel when the process ends, however it ends) -----------------

#: errno values of a file system that cannot lock (some NFS and Lustre mounts): run unlocked.
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def try_lock(path: Path) -> Optional[int]:
    """An exclusive ``flock`` on ``path`` without waiting: the open descriptor, or ``None`` if another
    process holds it. On a file system without locking the descriptor comes back unlocked (a warning
    on stderr): the job runs, without the guard."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        if exc.errno not in _NO_LOCKING:
            os.close(fd)
            raise
        print(f"warning: {path.parent} cannot be locked ({exc.strerror}); two jobs for one fold would not be "
              "stopped", file=sys.stderr, flush=True)
    return fd


def release(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def lock_is_held(path: Path) -> bool:
    """True when another process holds the lock at ``path`` (a fold's job is alive)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # Windows: no fold jobs run there (submitit is POSIX), so none holds a lock
        return False
    if not path.is_file():
        return False
    fd = try_lock(path)
    release(fd)
    return fd is None


def acquire_slot(out_dir: Path, slots: int) -> tuple[int, Optional[int]]:
    """Wait for one of ``slots`` run slots; returns (slot index, descriptor to release)."""
    waited = False
    while True:
        for slot in range(int(slots)):
            fd = try_lock(jobs_dir(out_dir) / LOCKS_DIR / f"slot_{slot}.lock")
            if fd is not None:
                return slot, fd
        if not waited:
            print(f"waiting for one of {slots} run slots (--parallel {slots})", flush=True)
            waited = True
        time.sleep(SLOT_POLL_S)


# -- attempt records ----------------------------------------------------------------------------------


def read_attempts(out_dir: Path, fold: int) -> list[dict[str, Any]]:
    """The attempts of fold ``fold``'s jobs, oldest first (none when the record is missing or unreadable)."""
    try:
        record = json.loads(attempts_path(out_dir, fold).read_text(encoding="utf-8"))
        return [dict(a) for a in record.get("attempts", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _write_attempts(out_dir: Path, fold: int, attempts: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(json.dumps({"fold": int(fold), "attempts": list(attempts)}, indent=2) + "\n",
                      attempts_path(out_dir, fold))


def _submitit_job_id() -> Optional[str]:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job (a direct call), or submitit missing
        return None


# -- the job -------------------------------------------------------------------------------------------

#: The fold this process is training (its attempt is recorded); read by the preemption handler.
_training: dict[str, int] = {}


@dataclass(frozen=True)
class FoldJob:
    """The callable a fold job runs: ``FoldJob(...)(fold)`` trains fold ``fold`` into ``out_dir``.

    Attributes:
        out_dir: the run folder; its ``plan.json`` (written before submission) is the contract.
        cache_dir: folder of the cached ``*.npz`` cases (``OUT_DIR/cache`` or a cache given as MANIFEST).
        n_folds, split_seed, simulate_low_dose, source, percentile_levels: as given to ``fit``
            (:func:`.fit.fit_cases` checks them against the plan).
        config: training settings (the serial ``fit``'s :class:`.trainer.TrainConfig`).
        threads: ``torch.set_num_threads`` in the job (``None``: torch's default).
        slots: run slots shared by the run's jobs (local parallelism cap); ``None``: no slot.
    """

    out_dir: str
    cache_dir: str
    n_folds: int
    split_seed: int
    config: TrainConfig
    simulate_low_dose: bool = False
    source: str = ""
    percentile_levels: tuple[float, float] = (1.0, 99.0)
    threads: Optional[int] = None
    slots: Optional[int] = None

    def __call__(self, fold: int) -> dict[str, Any]:
        """Train (or resume) the fold; returns its epochs, weights path and last metrics."""
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        out_dir = Path(self.out_dir)
        fold_lock = try_lock(fold_lock_path(out_dir, fold))
        if fold_lock is None:
            raise RuntimeError(f"fold {fold} of {out_dir} is being trained by another job (it holds "
                               f"{fold_lock_path(out_dir, fold)}); this job stops without touching it.")
        slot_fd: Optional[int] = None
        try:
            slot = 0
            if self.slots:
                slot, slot_fd = acquire_slot(out_dir, self.slots)
            return self._train(out_dir, int(fold), self._device_for_slot(slot))
        finally:
            release(slot_fd)
            release(fold_lock)

    def checkpoint(self, fold: int) -> Any:
        """submitit calls this on SIGUSR2 (preemption, time limit): requeue this same call.

        The fold's state is already on disk (``checkpoint.pt`` after every epoch), so the
        resubmitted call resumes from it; nothing is pickled but these settings."""
        from submitit.helpers import DelayedSubmission

        print(f"fold {fold}: preempted or out of time; requeued, it resumes from its last finished epoch", flush=True)
        if _training.get("fold") == fold:  # not while it waited for a run slot: no attempt of its own yet
            _mark_last_attempt(Path(self.out_dir), fold, "requeued (preempted or time limit)")
        return DelayedSubmission(self, fold)

    def _device_for_slot(self, slot: int) -> TrainConfig:
        """With several visible GPUs, the job in run slot I trains on GPU I mod count (local executor)."""
        import torch

        if self.config.device not in ("auto", "cuda") or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            return self.config
        return replace(self.config, device=f"cuda:{slot % torch.cuda.device_count()}")

    def _train(self, out_dir: Path, fold: int, config: TrainConfig) -> dict[str, Any]:
        from .fit import fit_cases

        cases = plan_cases(out_dir, Path(self.cache_dir))
        attempts = read_attempts(out_dir, fold)
        if attempts and attempts[-1].get("outcome") == "running":  # that job died without a word (SIGKILL, node lost)
            attempts[-1]["outcome"] = "ended without a word (killed, or its node was lost)"
        start = read_fold_status(fold_dir(out_dir, fold), fold).epochs_done
        attempts.append({"job_id": _submitit_job_id(), "host": socket.gethostname(), "pid": os.getpid(),
                         "device": str(config.resolved_device()), "threads": self.threads, "from_epoch": start,
                         "started": now_iso(precise=True), "ended": None, "outcome": "running"})
        _write_attempts(out_dir, fold, attempts)
        _training["fold"] = fold
        print(f"fold {fold}: epochs {start + 1}-{config.epochs} on {socket.gethostname()} "
              f"({config.resolved_device()}, {self.threads or 'default'} threads)", flush=True)
        try:
            (result,) = fit_cases(cases, out_dir, folds=[fold], n_folds=self.n_folds, split_seed=self.split_seed,
                                  config=config, simulate_low_dose=self.simulate_low_dose, source=self.source,
                                  on_epoch=_print_epoch, percentile_levels=self.percentile_levels)
        except BaseException as exc:
            how = "failed" if isinstance(exc, Exception) else "stopped"  # KeyboardInterrupt, SystemExit
            _mark_last_attempt(out_dir, fold, f"{how}: {type(exc).__name__}: {exc}".rstrip(": "), keep_requeued=True)
            raise
        finally:
            _training.pop("fold", None)
        _mark_last_attempt(out_dir, fold, "finished")
        return {"fold": result.fold, "epochs": result.epochs, "weights": str(result.weights), "metrics": result.metrics}


def _print_epoch(row: dict[str, Any]) -> None:
    print(f"fold {row['fold']} epoch {row['epoch']}: train {row['train_loss']:.5f}, val {row['val_loss']:.5f}, "
          f"PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.4f} ({row['seconds']:.1f} s)", flush=True)


def _mark_last_attempt(out_dir: Path, fold: int, outcome: str, keep_requeued: bool = False) -> None:
    """Close the running attempt of this fold with ``outcome`` (the job holds the fold's lock)."""
    attempts = read_attempts(out_dir, fold)
    if not attempts:
        return
    last = attempts[-1]
    if keep_requeued and str(last.get("outcome", "")).startswith("requeued"):
        return  # the SystemExit that follows a requeue is not a failure
    last.update(outcome=outcome, ended=now_iso(precise=True), to_epoch=read_fold_status(fold_dir(out_dir, fold), fold).epochs_done)
    _write_attempts(out_dir, fold, attempts)


def plan_cases(out_dir: Path, cache_dir: Path) -> list[Any]:
    """The cached cases of ``plan.json``, in its order (the order the serial ``fit`` trained them in).

    Raises:
        FileNotFoundError: no plan; ValueError: a case of the plan is not in ``cache_dir``.
    """
    from .data import load_cache_folder
    from .fit import read_plan

    plan = read_plan(out_dir)
    by_id = {case.case_id: case for case in load_cache_folder(cache_dir)}
    wanted = [str(c["case_id"]) for c in plan["cases"]]
    missing = [case_id for case_id in wanted if case_id not in by_id]
    if missing:
        raise ValueError(f"{cache_dir} lacks the cached cases {missing[:5]} of {out_dir / 'plan.json'}; "
                         "run `contrast-amplifier-train prepare` (or fit) on the cohort again.")
    return [by_id[case_id] for case_id in wanted]
