"""Where a training run stands: the run folder's layout, read back cheaply, and the fit CLI's progress.

``contrast-amplifier-train fit`` writes (see :mod:`.fit` and :mod:`.trainer`)::

    OUT_DIR/
      plan.json                 written first: its presence makes OUT_DIR a run (Start resumes it)
      fold_<K>/log.csv          one row per finished (checkpointed) epoch, rewritten after each epoch
      fold_<K>/done.json        once the fold's last epoch is done, with its requested epochs
      fold_<K>/checkpoint.pt  fold_<K>/final.safetensors

The file names are defined here, once, and imported by the writers. This module imports only
the standard library (no torch, no numpy): the Slicer module reads run folders and follows the
child's progress with it in the GUI process, before the training packages are installed.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from ContrastAmplifierCommon.process import ProgressEvent

#: The run's plan (split, geometry, settings), in OUT_DIR.
PLAN_FILE = "plan.json"
#: Per-epoch log of a fold (columns: ``trainer.LOG_COLUMNS``), in ``fold_<K>/``.
LOG_FILE = "log.csv"
#: Written when a fold has finished all its epochs, in ``fold_<K>/``.
DONE_FILE = "done.json"
#: Model + Adam state + history after every epoch, in ``fold_<K>/``.
CHECKPOINT_FILE = "checkpoint.pt"
#: A finished fold's weights, in ``fold_<K>/``.
FINAL_WEIGHTS_FILE = "final.safetensors"
#: Prefix of the fold folders: ``fold_0``, ``fold_1`` ...
FOLD_DIR_PREFIX = "fold_"

#: :attr:`FoldStatus.state` values.
WAITING, RUNNING, FINISHED, STOPPED = "waiting", "running", "finished", "stopped"

PathLike = Union[str, os.PathLike]


def fold_dir(run_dir: PathLike, fold: int) -> Path:
    """The folder of fold ``fold`` in a run folder: ``run_dir/fold_<K>``."""
    return Path(run_dir) / f"{FOLD_DIR_PREFIX}{int(fold)}"


def fold_of_dir(path: PathLike) -> Optional[int]:
    """The fold index of a ``fold_<K>`` folder name, ``None`` for any other name."""
    name = Path(path).name
    suffix = name[len(FOLD_DIR_PREFIX):]
    if not name.startswith(FOLD_DIR_PREFIX) or not suffix.isdigit():
        return None
    return int(suffix)


def to_float(value: Any) -> Optional[float]:
    """``float(value)``, or ``None`` for ``None``, an empty cell or text that is not a number."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class FoldStatus:
    """Where one fold stands: epochs done and its latest per-epoch metrics.

    Attributes:
        fold: fold index.
        epochs: epochs requested for the fold (0 if unknown).
        epochs_done: epochs finished (checkpointed).
        state: :data:`WAITING`, :data:`RUNNING`, :data:`FINISHED` or :data:`STOPPED`.
        train_loss, val_loss: MSE of the last finished epoch (``None`` before the first).
        val_psnr, val_ssim: held-out PSNR (dB) and SSIM of the last finished epoch.
        seconds_per_epoch: duration of the last finished epoch.
    """

    fold: int
    epochs: int = 0
    epochs_done: int = 0
    state: str = WAITING
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    val_psnr: Optional[float] = None
    val_ssim: Optional[float] = None
    seconds_per_epoch: Optional[float] = None

    def take_metrics(self, row: Mapping[str, Any]) -> None:
        """Take the losses and metrics of one epoch's row (``log.csv`` or the CLI's ``epoch`` line)."""
        self.train_loss = to_float(row.get("train_loss"))
        self.val_loss = to_float(row.get("val_loss"))
        self.val_psnr = to_float(row.get("val_psnr"))
        self.val_ssim = to_float(row.get("val_ssim"))
        self.seconds_per_epoch = to_float(row.get("seconds"))

    def losses_text(self) -> str:
        """``"train 0.01234, val 0.01500, PSNR 31.20 dB, SSIM 0.9120"`` (or ``""`` before the first epoch)."""
        if self.train_loss is None:
            return ""
        parts = [f"train {self.train_loss:.5f}"]
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.5f}")
        if self.val_psnr is not None:
            parts.append(f"PSNR {self.val_psnr:.2f} dB")
        if self.val_ssim is not None:
            parts.append(f"SSIM {self.val_ssim:.4f}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RunStatus:
    """What a run folder holds, read from disk.

    Attributes:
        run_dir: the folder read (``None`` when no folder was given).
        has_plan: ``plan.json`` exists: ``fit`` on this folder resumes the run.
        folds: fold index -> :class:`FoldStatus`, for every ``fold_<K>`` folder (empty for a new run).
        n_folds: folds of the run's split (``plan.json``'s ``n_folds``; ``None`` without a readable plan).
    """

    run_dir: Optional[Path]
    has_plan: bool = False
    folds: dict[int, FoldStatus] = field(default_factory=dict)
    n_folds: Optional[int] = None

    def finished_folds(self) -> list[int]:
        """The folds whose last epoch is done (``done.json``), in order."""
        return [k for k, status in self.folds.items() if status.state == FINISHED]

    def missing_folds(self, folds: Optional[Sequence[int]] = None) -> list[int]:
        """The folds of ``folds`` (default: every fold of the split) that have not finished.

        Without a readable plan and without ``folds`` nothing is known to be missing: callers
        check :attr:`has_plan` first.
        """
        wanted = list(range(self.n_folds or 0)) if folds is None else [int(k) for k in folds]
        done = set(self.finished_folds())
        return [k for k in wanted if k not in done]


def _log_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a fold's ``log.csv``; none when it is missing or unreadable (e.g. being rewritten)."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_log_rows(folder: PathLike) -> list[dict[str, Any]]:
    """The finished epochs of a fold's ``log.csv`` (folder ``fold_<K>``), numbers as numbers.

    ``fold``, ``epoch`` and ``rollbacks`` are ints, the other columns floats (``None`` when empty);
    rows without an epoch are skipped. Used to follow fold jobs that run in other processes.
    """
    rows = []
    for raw in _log_rows(Path(folder) / LOG_FILE):
        row: dict[str, Any] = {key: to_float(value) for key, value in raw.items()}
        if row.get("epoch") is None:
            continue
        for key in ("fold", "epoch", "rollbacks"):
            if row.get(key) is not None:
                row[key] = int(row[key])
        rows.append(row)
    return rows


def read_fold_status(folder: PathLike, fold: int) -> FoldStatus:
    """A fold's state from its ``log.csv`` (last row) and ``done.json``.

    A fold with ``done.json`` is finished (its ``epochs`` is the requested count); one with log rows
    but no ``done.json`` stopped before its last epoch (Resume continues it); otherwise it waits.
    """
    folder = Path(folder)
    status = FoldStatus(int(fold))
    rows = _log_rows(folder / LOG_FILE)
    if rows:
        last = rows[-1]
        epoch = to_float(last.get("epoch"))
        status.epochs_done = int(epoch) if epoch is not None else len(rows)
        status.take_metrics(last)
    done = folder / DONE_FILE
    if done.is_file():
        try:
            record = json.loads(done.read_text(encoding="utf-8"))
            status.epochs = int(record.get("epochs", status.epochs_done))
        except (OSError, ValueError, TypeError, AttributeError):
            status.epochs = status.epochs_done
        status.state = FINISHED
    elif rows:
        status.state = STOPPED
    return status


def read_run_status(run_dir: Optional[PathLike]) -> RunStatus:
    """Read a run folder (no torch, cheap: two small files per fold).

    Args:
        run_dir: the ``fit`` output folder; ``None``, ``""`` or a missing folder gives an empty status.

    Returns:
        :class:`RunStatus` with one :class:`FoldStatus` per ``fold_<K>`` folder.
    """
    if run_dir is None or not str(run_dir).strip():
        return RunStatus(None)
    folder = Path(run_dir)
    if not folder.is_dir():
        return RunStatus(folder)
    folds: dict[int, FoldStatus] = {}
    for path in sorted(folder.iterdir()):
        fold = fold_of_dir(path)
        if fold is not None and path.is_dir():
            folds[fold] = read_fold_status(path, fold)
    has_plan = (folder / PLAN_FILE).is_file()
    return RunStatus(folder, has_plan=has_plan, folds=dict(sorted(folds.items())),
                     n_folds=_plan_fold_count(folder / PLAN_FILE) if has_plan else None)


def _plan_fold_count(path: Path) -> Optional[int]:
    """``n_folds`` of a ``plan.json``; ``None`` when it is unreadable or lacks it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("n_folds")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


#: The files of a run folder whose change changes :func:`read_run_status`'s answer.
_STATUS_FILES = (LOG_FILE, DONE_FILE)


def run_folder_signature(run_dir: Optional[PathLike]) -> tuple:
    """What :func:`read_run_status` depends on, from ``stat`` alone (no file is opened).

    The folder itself, ``plan.json`` and each ``fold_<K>/`` with its ``log.csv`` and ``done.json``
    (name, size, modification time in ns, inode): equal signatures mean an unchanged status. A
    file rewritten in place within the same nanosecond with the same size is the blind spot.
    """
    if run_dir is None or not str(run_dir).strip():
        return ()
    folder = Path(run_dir)

    def stat(path: Path) -> tuple:
        try:
            info = path.stat()
        except OSError:
            return (path.name, None)
        return (path.name, info.st_size, info.st_mtime_ns, info.st_ino)

    if not folder.is_dir():
        return (str(folder), None)
    parts: list[tuple] = [(str(folder),), stat(folder / PLAN_FILE)]
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return (str(folder), None)
    for path in entries:
        if fold_of_dir(path) is not None and path.is_dir():
            parts.append((path.name, *(stat(path / name) for name in _STATUS_FILES)))
    return tuple(parts)


class RunStatusCache:
    """:func:`read_run_status` read again only when the run folder's files changed (size, mtime).

    For a GUI that refreshes often (on every parameter change): :meth:`read` costs a few ``stat``
    calls while nothing changed, and :attr:`reads` counts the real reads.
    """

    def __init__(self) -> None:
        self._signature: Optional[tuple] = None
        self._status = RunStatus(None)
        self.reads = 0

    def read(self, run_dir: Optional[PathLike]) -> RunStatus:
        """The status of ``run_dir``: the cached one while :func:`run_folder_signature` is unchanged."""
        signature = (str(run_dir) if run_dir is not None else None, run_folder_signature(run_dir))
        if signature != self._signature:
            self._status = read_run_status(run_dir)
            self._signature = signature
            self.reads += 1
        return self._status

    def clear(self) -> None:
        """Forget the cached status: the next :meth:`read` reads the folder."""
        self._signature = None


def has_run(run_dir: Optional[PathLike]) -> bool:
    """True when ``run_dir`` holds a run started by ``fit`` (its ``plan.json``): ``fit`` there resumes it."""
    return run_dir is not None and bool(str(run_dir).strip()) and (Path(run_dir) / PLAN_FILE).is_file()


class TrainingMonitor:
    """Turns the fit CLI's progress events into per-fold status and the latest losses.

    The CLI (``contrast-amplifier-train fit --progress json``) prints ``"stage": "fit"`` lines
    while a fold trains (message ``"fold K epoch E/N case i/n"``, from :func:`.trainer.fit_fold`),
    one ``"stage": "epoch"`` line per finished epoch with ``fold``, ``epoch``, ``epochs``,
    ``train_loss``, ``val_loss``, ``val_psnr``, ``val_ssim``, ``seconds``, and ends with
    ``"done"``, ``"cancelled"`` or ``"error"``.

    Attributes:
        folds: the folds of this run, in order.
        epochs: epochs requested per fold.
        fold_status: fold -> :class:`FoldStatus`.
        stage, message, fraction: of the last event.
        latest_fold: the fold that reported last (``None`` before any).
    """

    _FIT_MESSAGE = re.compile(r"fold (\d+) epoch (\d+)/(\d+)")

    def __init__(self, folds: Sequence[int], epochs: int, initial: Optional[Mapping[int, FoldStatus]] = None) -> None:
        """Start from ``initial`` (e.g. :func:`read_run_status` of the folder a Resume continues)."""
        self.folds: list[int] = [int(k) for k in folds]
        self.epochs = int(epochs)
        self.fold_status: dict[int, FoldStatus] = {}
        for fold in self.folds:
            known = (initial or {}).get(fold)
            status = FoldStatus(fold, self.epochs) if known is None else replace(known, epochs=self.epochs)
            if status.epochs_done >= self.epochs and status.epochs:
                status.state = FINISHED
            elif status.state != FINISHED:
                status.state = WAITING
            self.fold_status[fold] = status
        self.stage = ""
        self.message = ""
        self.fraction = 0.0
        self.latest_fold: Optional[int] = None

    def update(self, event: ProgressEvent) -> None:
        """Take one progress event from the child."""
        self.stage, self.message, self.fraction = event.stage, event.message, event.fraction
        extra = dict(event.extra or {})
        if event.stage == "fit":
            match = self._FIT_MESSAGE.search(event.message)
            if match:
                self._running(int(match.group(1)))
        elif event.stage == "epoch" and "fold" in extra:
            status = self._running(int(extra["fold"]))
            status.epochs = int(extra.get("epochs", status.epochs) or status.epochs)
            status.epochs_done = int(extra.get("epoch", status.epochs_done))
            status.take_metrics(extra)
            if status.epochs and status.epochs_done >= status.epochs:
                status.state = FINISHED
        elif event.stage == "done":
            for fold in extra.get("folds", self.folds) or self.folds:
                if int(fold) in self.fold_status:
                    self.fold_status[int(fold)].state = FINISHED
        elif event.stage in ("cancelled", "error"):
            self.mark_stopped()

    def mark_stopped(self) -> None:
        """The child ended early: a running fold becomes "stopped" (it resumes from its checkpoint)."""
        for status in self.fold_status.values():
            if status.state == RUNNING:
                status.state = STOPPED

    def _running(self, fold: int) -> FoldStatus:
        status = self.fold_status.setdefault(fold, FoldStatus(fold, self.epochs))
        if status.state != FINISHED:
            status.state = RUNNING
        self.latest_fold = fold
        return status

    def ordered(self) -> list[FoldStatus]:
        """The status of each fold of the run, in :attr:`folds` order."""
        return [self.fold_status[k] for k in self.folds]

    def latest_losses(self) -> str:
        """``"fold 2, epoch 37/300: train ..., val ..., PSNR ..., SSIM ..."`` for the fold trained last."""
        if self.latest_fold is None:
            return ""
        status = self.fold_status[self.latest_fold]
        losses = status.losses_text()
        head = f"fold {status.fold}, epoch {status.epochs_done}/{status.epochs or '?'}"
        return f"{head}: {losses}" if losses else head
