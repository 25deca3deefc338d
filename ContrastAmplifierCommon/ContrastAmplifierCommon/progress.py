"""Progress reporting and cancellation shared by every long-running function.

A long function takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``.
It reports ``(stage, fraction, message)`` with ``fraction`` in [0, 1] for the whole job and
calls ``cancel.raise_if_cancelled()`` between steps. The CLI turns the callback into a tqdm
bar or into JSON lines (``--progress json``: one ``{"stage", "fraction", "message"}`` object
per line on stdout), which is the protocol the Slicer modules read from their child process.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Callable, Optional, Protocol


class Cancelled(RuntimeError):
    """Raised inside a job when its :class:`CancelToken` was set; nothing partial is kept."""


class ProgressCallback(Protocol):
    def __call__(self, stage: str, fraction: float, message: str = "") -> None: ...


@dataclass
class CancelToken:
    """Thread-safe cancel flag (wraps a :class:`threading.Event`)."""

    event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.event.is_set():
            raise Cancelled("cancelled by the user")


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set (``None`` never cancels)."""
    if cancel is not None:
        cancel.raise_if_cancelled()


def null_progress(stage: str, fraction: float, message: str = "") -> None:
    """A progress callback that ignores everything."""


class SubProgress:
    """Maps a sub-job's [0, 1] onto ``[start, stop]`` of a parent callback."""

    def __init__(self, parent: Optional[ProgressCallback], start: float, stop: float):
        self.parent = parent or null_progress
        self.start = float(start)
        self.stop = float(stop)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.parent(stage, self.start + (self.stop - self.start) * f, message)


class JsonLinesProgress:
    """Writes one JSON object per call: the protocol read by the Slicer modules."""

    def __init__(self, stream: Optional[IO[str]] = None):
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        line = json.dumps({"stage": stage, "fraction": round(float(fraction), 4), "message": message})
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class TqdmProgress:
    """A tqdm bar (on stderr) driven by fractions; the stage is shown as the description."""

    def __init__(self, total: int = 1000, **tqdm_kwargs):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="‰", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}", **tqdm_kwargs)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        target = int(round(min(max(fraction, 0.0), 1.0) * self.total))
        self.bar.set_description_str(stage if not message else f"{stage} ({message})"[:60])
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def parse_json_progress_line(line: str) -> Optional[dict]:
    """Parse one line of ``--progress json`` output; ``None`` for lines that are not progress."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not {"stage", "fraction"} <= obj.keys():
        return None
    return obj


def make_progress(kind: str) -> Callable[..., None]:
    """``"bar"`` -> :class:`TqdmProgress`, ``"json"`` -> :class:`JsonLinesProgress`, ``"none"``."""
    if kind == "json":
        return JsonLinesProgress()
    if kind == "bar":
        return TqdmProgress()
    if kind == "none":
        return null_progress
    raise ValueError(f"--progress must be one of bar, json, none (got {kind!r})")
