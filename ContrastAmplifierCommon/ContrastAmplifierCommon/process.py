"""Run a Lib command line as a non-blocking child process and follow its ``--progress json`` output.

Slicer's GUI must never freeze, so long work (preprocessing, inference, training) runs in a
child Python process: the Lib's own CLI (``python -m ContrastAmplifierLib.cli ...``). The
child prints one JSON object per line on stdout (``{"stage", "fraction", "message"}``, see
:mod:`ContrastAmplifierCommon.progress`); anything else on stdout is log text, and stderr is kept
for the error message.

:class:`BackgroundProcess` is poll-based and imports no Qt: a module widget calls
:meth:`BackgroundProcess.poll` from a ``qt.QTimer``; batch scripts and tests call
:func:`run_to_completion`. Two reader threads drain the pipes so the child never blocks on a
full pipe, whatever the caller's polling rate.
"""

from __future__ import annotations

import collections
import enum
import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .progress import CancelToken, parse_json_progress_line

#: Seconds between a polite terminate and a kill when cancelling.
DEFAULT_CANCEL_GRACE_S = 3.0

#: stderr lines kept for error messages (the tail matters: tracebacks end with the cause).
STDERR_LINES_KEPT = 400


class ProcessState(enum.Enum):
    """Lifecycle of a :class:`BackgroundProcess`."""

    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report from the child: ``fraction`` in [0, 1] of the whole job.

    ``extra`` holds any further keys of the JSON line (e.g. the training CLI's per-epoch losses).
    """

    stage: str
    fraction: float
    message: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # decoded JSON values


class ProcessError(RuntimeError):
    """The child process failed; the message is its own error text (or its exit status)."""

    def __init__(self, message: str, returncode: Optional[int] = None, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class ProcessCancelled(ProcessError):
    """The child process was cancelled on request."""


def python_executable() -> str:
    """The Python interpreter for child processes.

    Inside Slicer ``sys.executable`` is ``PythonSlicer`` (a launcher that sets up Slicer's
    environment); very old Slicer versions pointed it at the Slicer application instead, which
    cannot run ``-m module``, hence the fallback.
    """
    executable = sys.executable or ""
    if Path(executable).name.lower().startswith("slicer"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return executable


def lib_search_paths() -> list[str]:
    """Folders that hold this package and the modules' ``*Lib`` packages, for a child's ``PYTHONPATH``.

    Installed in Slicer, all of them sit in one ``qt-scripted-modules`` folder (the one holding
    this package). In a source checkout each module folder sits next to this package's folder and
    is recognised by the ``<folder>/<folder>Lib/__init__.py`` it holds, so no module is named here.
    """
    home = Path(__file__).resolve().parent.parent  # the folder holding ContrastAmplifierCommon/
    paths = [str(home)]
    for folder in sorted(p for p in home.parent.iterdir() if p.is_dir()):
        if (folder / f"{folder.name}Lib" / "__init__.py").is_file():
            paths.append(str(folder))
    return paths


def child_environment(extra_env: Optional[Mapping[str, str]] = None, extra_paths: Iterable[str] = ()) -> dict[str, str]:
    """Environment for a child: ours, plus the Lib folders on ``PYTHONPATH`` and unbuffered UTF-8 output."""
    env = dict(os.environ)
    paths = [*map(str, extra_paths), *lib_search_paths()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra_env:
        env.update({str(k): str(v) for k, v in extra_env.items()})
    return env


def python_module_command(module: str, *args: object) -> list[str]:
    """``[python, "-m", module, *args]`` with every argument turned into a string."""
    return [python_executable(), "-m", module, *(str(a) for a in args)]


def available_cli_commands(module: str) -> set[str]:
    """Sub-command names of a Lib CLI module (a typer/click app called ``app``), or an empty set.

    Lets a module widget say "this command line does not exist yet" instead of starting a
    child process that would fail. Imports the CLI module in-process: it is light by design
    (heavy imports happen inside the commands).

    Raises:
        ImportError: the CLI module exists but cannot be imported (e.g. a dependency is missing).
    """
    try:
        cli = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return set()
        raise
    app = getattr(cli, "app", None)
    if app is None:
        return set()
    try:
        import typer.main

        command = typer.main.get_command(app)
    except Exception:  # not a typer app: maybe already a click command
        command = app
    commands = getattr(command, "commands", None)
    if isinstance(commands, dict):
        return set(commands)
    name = getattr(command, "name", None)
    return {name} if name else set()


#: Frame characters of the error boxes typer/rich print (stripped from messages).
_BOX_CHARS = " \u2502\u256d\u256e\u2570\u256f\u2500"


def _boxed_error(lines: list[str]) -> str:
    """The text inside the last ``Error`` box of a typer/rich usage error, or ``""``."""
    starts = [i for i, line in enumerate(lines) if line.startswith("\u256d") and "Error" in line]
    if not starts:
        return ""
    content = []
    for line in lines[starts[-1] + 1:]:
        if line.startswith("\u2570"):
            break
        content.append(line.strip(_BOX_CHARS))
    return " ".join(part for part in content if part)


class BackgroundProcess:
    """A child process whose JSON-lines progress is collected by polling (no Qt, no blocking).

    Example (Slicer widget)::

        self.job = BackgroundProcess(python_module_command("ContrastAmplifierLib.cli", "preprocess", ...))
        self.job.start()
        self.timer.timeout.connect(self.onTimer)  # every 200 ms:
        ...
        def onTimer(self):
            for event in self.job.poll():
                self.ui.progressBar.value = int(100 * event.fraction)
            if not self.job.running:
                self.timer.stop()

    Attributes:
        command: argument list (no shell).
        state: a :class:`ProcessState`.
        returncode: exit status once finished.
        latest: the last :class:`ProgressEvent` seen (``None`` before the first).
        log_lines: stdout lines that were not progress (bounded).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[os.PathLike] = None,
        on_progress: Optional[Callable[[ProgressEvent], None]] = None,
        on_log: Optional[Callable[[str], None]] = None,
    ) -> None:
        """Prepare (not start) the child.

        Args:
            command: program and arguments, e.g. from :func:`python_module_command`.
            env: full environment; default :func:`child_environment`.
            cwd: working folder of the child.
            on_progress: called from :meth:`poll` for each progress event, in order.
            on_log: called from :meth:`poll` for each non-progress stdout line and each stderr line.
        """
        if not command:
            raise ValueError("command is empty; pass the program and its arguments as a list.")
        self.command: list[str] = [str(c) for c in command]
        self.env = dict(env) if env is not None else child_environment()
        self.cwd = cwd
        self.on_progress = on_progress
        self.on_log = on_log
        self.state = ProcessState.NOT_STARTED
        self.returncode: Optional[int] = None
        self.latest: Optional[ProgressEvent] = None
        self.log_lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._queue: queue.Queue[tuple] = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False
        self._kill_deadline: Optional[float] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> BackgroundProcess:
        """Start the child and the pipe readers; returns self."""
        if self.state is not ProcessState.NOT_STARTED:
            raise RuntimeError(f"process already {self.state.value}; create a new BackgroundProcess to run again.")
        creationflags = 0
        start_new_session = False
        if sys.platform == "win32":
            # No console window; own process group so cancel can end the whole tree.
            creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            start_new_session = True  # own process group: cancel reaches grandchildren too
        try:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self.env, cwd=None if self.cwd is None else str(self.cwd),
                text=True, encoding="utf-8", errors="replace", bufsize=1,
                creationflags=creationflags, start_new_session=start_new_session,
            )
        except OSError as exc:
            self.state = ProcessState.FAILED
            raise ProcessError(f"could not start {self.command[0]!r}: {exc}. Check that the program exists.") from exc
        self.state = ProcessState.RUNNING
        self.started_at = time.monotonic()
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            thread = threading.Thread(target=self._pump, args=(name, stream), name=f"child-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):  # stream closed under us during a kill
            pass
        finally:
            self._queue.put((name, None))

    @property
    def running(self) -> bool:
        """True until the child has exited and its output has been drained by :meth:`poll`."""
        return self.state is ProcessState.RUNNING

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    @property
    def fraction(self) -> float:
        """Latest reported fraction (0 before the first report)."""
        return 0.0 if self.latest is None else self.latest.fraction

    @property
    def stderr_text(self) -> str:
        """The kept tail of the child's stderr."""
        return "\n".join(self._stderr)

    def poll(self) -> list[ProgressEvent]:
        """Drain what the child wrote since the last call; update :attr:`state` when it has ended.

        Never blocks. Call it from a GUI timer (every 100-500 ms) or a loop.

        Returns:
            The new progress events, oldest first (also passed to ``on_progress``).
        """
        events: list[ProgressEvent] = []
        if self._proc is None:
            return events
        if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline and self._proc.poll() is None:
            self._signal(kill=True)
            self._kill_deadline = None
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            if name == "stdout":
                parsed = parse_json_progress_line(line)
                if parsed is not None:
                    try:
                        fraction = min(max(float(parsed["fraction"]), 0.0), 1.0)
                    except (TypeError, ValueError):
                        fraction = self.fraction
                    extra = {k: v for k, v in parsed.items() if k not in ("stage", "fraction", "message")}
                    event = ProgressEvent(str(parsed["stage"]), fraction, str(parsed.get("message", "") or ""), extra)
                    self.latest = event
                    events.append(event)
                    if self.on_progress:
                        self.on_progress(event)
                    continue
                self.log_lines.append(line)
            else:
                self._stderr.append(line)
            if self.on_log:
                self.on_log(line)
        if self.state is ProcessState.RUNNING and self._proc.poll() is not None and not any(t.is_alive() for t in self._threads):
            if self._queue.empty():
                self._finish()
            else:  # the readers finished between our drain and now: take the rest next time
                events.extend(self.poll())
        return events

    def _finish(self) -> None:
        proc = self._proc
        assert proc is not None, "_finish runs only after start()"
        self.returncode = proc.returncode
        self.finished_at = time.monotonic()
        for stream in (proc.stdout, proc.stderr):
            if stream is None:
                continue
            try:
                stream.close()
            except Exception:
                pass
        if self._cancel_requested:
            self.state = ProcessState.CANCELLED
        elif self.returncode == 0:
            self.state = ProcessState.SUCCEEDED
        else:
            self.state = ProcessState.FAILED

    def _signal(self, kill: bool) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if sys.platform == "win32":
                if kill:
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
                else:
                    proc.terminate()
            else:
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.kill() if kill else proc.terminate()
            except OSError:
                pass

    def cancel(self, grace_s: float = DEFAULT_CANCEL_GRACE_S, wait: bool = False) -> None:
        """Ask the child to stop (terminate), and kill it if it is still alive after ``grace_s``.

        Args:
            grace_s: seconds between terminate and kill.
            wait: block until the child is gone (batch mode); otherwise the kill happens in a
                later :meth:`poll`, so a GUI never waits.
        """
        if self._proc is None or self.state is not ProcessState.RUNNING:
            return
        self._cancel_requested = True
        self._signal(kill=False)
        self._kill_deadline = time.monotonic() + max(grace_s, 0.0)
        if wait:
            try:
                self._proc.wait(timeout=max(grace_s, 0.0))
            except subprocess.TimeoutExpired:
                self._signal(kill=True)
                self._proc.wait()
            self.wait()

    def wait(self, timeout: Optional[float] = None, poll_interval: float = 0.05) -> ProcessState:
        """Block until the child has finished (calling :meth:`poll`); returns the final state.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the child is left running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.state is not ProcessState.RUNNING:
                return self.state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.command[:4])} ... still running after {timeout} s")
            time.sleep(poll_interval)

    def error_message(self) -> str:
        """A one-paragraph explanation of a failure, taken from the child's own stderr.

        Prefers the CLI's ``error: ...`` lines (which name the input and the fix), then the last
        line of a traceback, then the exit status.
        """
        if self.state is ProcessState.CANCELLED:
            return "Cancelled by the user."
        lines = [line.strip() for line in self._stderr if line.strip()]
        errors = [line for line in lines if line.lower().startswith("error:")]
        if errors:
            return "\n".join(line[len("error:"):].strip() for line in errors)
        boxed = _boxed_error(lines)
        if boxed:
            return boxed
        lines = [line for line in (line.strip(_BOX_CHARS) for line in lines) if line]
        if lines:
            return lines[-1]
        if self.returncode is not None and self.returncode < 0:
            return f"The process was ended by signal {-self.returncode}."
        return f"The process exited with status {self.returncode} and no error message."

    def raise_for_state(self) -> None:
        """Raise :class:`ProcessCancelled` / :class:`ProcessError` unless the child succeeded."""
        if self.state is ProcessState.SUCCEEDED:
            return
        if self.state is ProcessState.CANCELLED:
            raise ProcessCancelled(self.error_message(), self.returncode, self.stderr_text)
        if self.state is ProcessState.RUNNING:
            raise RuntimeError("process is still running; call wait() first.")
        raise ProcessError(self.error_message(), self.returncode, self.stderr_text)

    def __del__(self) -> None:  # never leave an orphan computing in the background
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._signal(kill=True)
        except Exception:
            pass


@dataclass
class ProcessResult:
    """What a finished child left behind."""

    returncode: int
    progress: list[ProgressEvent] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    stderr: str = ""
    seconds: float = 0.0


def run_to_completion(
    command: Sequence[str],
    on_progress: Optional[Callable[[ProgressEvent], None]] = None,
    on_log: Optional[Callable[[str], None]] = None,
    cancel: Optional[CancelToken] = None,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[os.PathLike] = None,
    poll_interval: float = 0.1,
) -> ProcessResult:
    """Run a child synchronously (batch mode, tests), forwarding its progress.

    Args:
        command: program and arguments.
        on_progress: called for each progress event.
        on_log: called for each other output line.
        cancel: a :class:`CancelToken`; when set, the child is terminated (then killed).
        timeout: seconds before the child is cancelled and :class:`TimeoutError` raised.
        env, cwd: as for :class:`BackgroundProcess`.
        poll_interval: seconds between polls.

    Raises:
        ProcessCancelled: ``cancel`` was set.
        ProcessError: non-zero exit; the message is the child's error text.
        TimeoutError: ran past ``timeout``.
    """
    job = BackgroundProcess(command, env=env, cwd=cwd, on_progress=on_progress, on_log=on_log).start()
    events: list[ProgressEvent] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while job.running:
            events.extend(job.poll())
            if cancel is not None and cancel.cancelled:
                job.cancel(wait=True)
                break
            if deadline is not None and time.monotonic() > deadline:
                job.cancel(wait=True)
                raise TimeoutError(f"{' '.join(map(str, command[:4]))} ... ran past {timeout} s and was stopped")
            time.sleep(poll_interval)
        events.extend(job.poll())
    except BaseException:
        job.cancel(grace_s=1.0, wait=True)
        raise
    job.raise_for_state()
    return ProcessResult(
        returncode=job.returncode or 0, progress=events, log_lines=list(job.log_lines),
        stderr=job.stderr_text, seconds=(job.finished_at or time.monotonic()) - (job.started_at or 0.0),
    )
