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

Cancel ends the whole process tree, not just the direct child: inside Slicer the child is
``PythonSlicer``, a launcher whose own child ``python-real`` does the work, so ending the
launcher alone would leave the work running (and holding the output pipes). The tree is reached
three ways, whichever the platform offers: the child's own process group (POSIX,
``start_new_session``), a Windows job object plus ``taskkill /T /F``, and ``psutil`` when it is
importable (Slicer 5.6/5.8 do not ship it) for descendants that left the group or the job. Every
wait is bounded: once the tree has been killed, the pipe readers get :data:`KILL_WAIT_S` seconds,
then they are abandoned and the call returns.
"""

from __future__ import annotations

import atexit
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
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .progress import CancelToken, parse_json_progress_line

try:  # optional: Slicer 5.6/5.8 do not ship psutil (the process group and the job object do without it)
    import psutil as _psutil
except ImportError:  # pragma: no cover - depends on the environment
    _psutil = None

#: Seconds between a polite terminate and a kill when cancelling.
DEFAULT_CANCEL_GRACE_S = 3.0

#: Seconds the process tree gets to disappear after the kill; then the pipe readers are abandoned
#: (a process that survived still holds the pipes) and the job counts as ended.
KILL_WAIT_S = 3.0

#: Seconds the pipe readers may keep draining after the direct child exited on its own; a
#: descendant still holding the pipes after that is killed and the readers abandoned.
DRAIN_AFTER_EXIT_S = 3.0

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


def _kernel32() -> Any:  # pragma: no cover - Windows only
    """``kernel32`` with the signatures the job object needs (handles are pointer-sized)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, wintypes.LPCWSTR]
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.SetInformationJobObject.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
    kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
    kernel32.TerminateJobObject.argtypes = [wintypes.HANDLE, wintypes.UINT]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    return kernel32


class _WindowsJob:
    """A Windows job object holding the child: terminating it ends every process the child started
    (children join their parent's job), and closing its last handle does too (KILL_ON_JOB_CLOSE),
    so even a crash of Slicer takes the work down. Best effort: ``None`` where it cannot be made
    (the launcher may also have started its child before it was assigned: ``taskkill /T`` and
    psutil cover that)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    @classmethod
    def create(cls, pid: int) -> Optional[_WindowsJob]:  # pragma: no cover - Windows only
        if sys.platform != "win32":
            return None
        import ctypes
        from ctypes import wintypes

        class _IoCounters(ctypes.Structure):
            _fields_ = [(name, ctypes.c_ulonglong) for name in (
                "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

        class _BasicLimits(ctypes.Structure):
            _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                        ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                        ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                        ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                        ("SchedulingClass", wintypes.DWORD)]

        class _ExtendedLimits(ctypes.Structure):
            _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", _IoCounters),
                        ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                        ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

        try:
            kernel32 = _kernel32()
        except (OSError, AttributeError):
            return None
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return None
        limits = _ExtendedLimits()
        limits.BasicLimitInformation.LimitFlags = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        process = kernel32.OpenProcess(0x0100 | 0x0001, False, pid)  # PROCESS_SET_QUOTA | PROCESS_TERMINATE
        try:
            if (process and kernel32.SetInformationJobObject(job, 9, ctypes.byref(limits), ctypes.sizeof(limits))
                    and kernel32.AssignProcessToJobObject(job, process)):  # 9: JobObjectExtendedLimitInformation
                return cls(job)
        finally:
            if process:
                kernel32.CloseHandle(process)
        kernel32.CloseHandle(job)
        return None

    def terminate(self) -> None:  # pragma: no cover - Windows only
        if self.handle:
            _kernel32().TerminateJobObject(self.handle, 1)

    def close(self) -> None:  # pragma: no cover - Windows only
        if self.handle:
            _kernel32().CloseHandle(self.handle)
            self.handle = 0


class ProcessTree:
    """The child process and every process it started, ended together on every OS.

    * POSIX: the child leads its own process group (``start_new_session``); signals go to the
      group, which still reaches the grandchildren after the child (a launcher) has exited.
    * Windows: there is no signal a console-less child can catch, so "terminate" already ends the
      tree: the job object the child was put in, ``taskkill /T /F /PID`` while the child lives
      (it walks the tree by parent id), then the child itself.
    * Everywhere, when ``psutil`` is importable: the descendants seen while the child was alive
      are signalled too (a grandchild that started its own session or broke away from the job).

    Args:
        proc: the started child.
        windows: use the Windows way (default: on Windows); tests pass it to check the commands.
        run: runs ``taskkill`` (default ``subprocess.run``).
    """

    def __init__(self, proc: subprocess.Popen, windows: Optional[bool] = None,
                 run: Callable[..., Any] = subprocess.run) -> None:
        self.proc = proc
        self.windows = (sys.platform == "win32") if windows is None else windows
        self._run = run
        self._job = _WindowsJob.create(proc.pid) if self.windows else None
        self._known: dict[int, Any] = {}  # pid -> psutil.Process seen as a descendant

    def snapshot(self) -> None:
        """Remember the child's current descendants (psutil only; a no-op without it)."""
        if _psutil is None or self.proc.poll() is not None:
            return
        try:
            for child in _psutil.Process(self.proc.pid).children(recursive=True):
                self._known.setdefault(child.pid, child)
        except _psutil.Error:
            pass

    def signal(self, kill: bool) -> None:
        """Terminate (``kill=False``: SIGTERM on POSIX) or kill the whole tree; never raises."""
        self.snapshot()
        if self.windows:
            self._end_windows_tree()
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except (ProcessLookupError, PermissionError, OSError):
                pass  # the group is empty (everything ended) or gone
        for known in list(self._known.values()):
            try:
                if known.is_running():  # also guards against a recycled pid
                    known.kill() if kill else known.terminate()
            except Exception:  # psutil.Error: already gone, or not ours
                pass
        if self.proc.poll() is None:
            try:
                self.proc.kill() if kill else self.proc.terminate()
            except OSError:
                pass

    def _end_windows_tree(self) -> None:
        if self._job is not None:
            self._job.terminate()
        if self.proc.poll() is None:
            try:
                self._run(["taskkill", "/T", "/F", "/PID", str(self.proc.pid)], capture_output=True, check=False,
                          timeout=10, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            except (OSError, subprocess.SubprocessError):
                pass

    def alive(self) -> bool:
        """True while the child or a known descendant (POSIX: any member of its group) runs."""
        if self.proc.poll() is None:
            return True
        for known in self._known.values():
            try:
                if known.is_running() and known.status() != _psutil.STATUS_ZOMBIE:
                    return True
            except Exception:
                continue
        if not self.windows:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError, OSError):
                return False
            return True
        return False

    def close(self) -> None:
        if self._job is not None:
            self._job.close()


#: Jobs still running, ended when the interpreter exits (closing Slicer must not leave work running).
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_running_trees() -> None:
    for job in list(_RUNNING):
        try:
            job.kill_tree()
        except Exception:
            pass


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
        self._tree: Optional[ProcessTree] = None
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False
        self._kill_deadline: Optional[float] = None  # when the terminated tree gets killed
        self._abandon_at: Optional[float] = None  # when the readers are given up on
        self._killed = False  # the tree has been sent the kill
        #: True when the job ended with its pipe readers abandoned (a killed process kept the pipes).
        self.readers_abandoned = False
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
            # No console window; own process group; the tree is ended through a job object (ProcessTree).
            creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
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
        self._tree = ProcessTree(self._proc)
        self.state = ProcessState.RUNNING
        self.started_at = time.monotonic()
        _RUNNING.add(self)
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
        if self._proc is None:
            return []
        if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
            # Whether or not the direct child is still there: after a launcher has exited, its child
            # may be the one still running (and ignoring the polite request).
            self.kill_tree()
        events = self._drain()
        if self.state is not ProcessState.RUNNING:
            return events
        if self._proc.poll() is None:
            if self._killed and self._abandon_at is not None and time.monotonic() >= self._abandon_at:
                self._abandon_readers()  # the child outlived its kill (it cannot be reached): stop waiting
        elif any(t.is_alive() for t in self._threads):
            self._check_lingering_pipes()
        elif self._queue.empty():
            self._finish()
        else:  # the readers finished between our drain and now: take the rest next time
            events.extend(self.poll())
        return events

    def _drain(self) -> list[ProgressEvent]:
        """Hand every queued line to its place: progress events, log lines, stderr."""
        events: list[ProgressEvent] = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return events
            if line is None:
                continue
            if name == "stdout":
                event = self._progress_event(line)
                if event is not None:
                    events.append(event)
                    if self.on_progress:
                        self.on_progress(event)
                    continue
                self.log_lines.append(line)
            else:
                self._stderr.append(line)
            if self.on_log:
                self.on_log(line)

    def _progress_event(self, line: str) -> Optional[ProgressEvent]:
        parsed = parse_json_progress_line(line)
        if parsed is None:
            return None
        try:
            fraction = min(max(float(parsed["fraction"]), 0.0), 1.0)
        except (TypeError, ValueError):
            fraction = self.fraction
        extra = {k: v for k, v in parsed.items() if k not in ("stage", "fraction", "message")}
        self.latest = ProgressEvent(str(parsed["stage"]), fraction, str(parsed.get("message", "") or ""), extra)
        return self.latest

    def _check_lingering_pipes(self) -> None:
        """The direct child has exited but a descendant still holds the pipes: give it
        :data:`DRAIN_AFTER_EXIT_S` seconds to finish writing, then kill what is left of the tree,
        and :data:`KILL_WAIT_S` seconds after that stop waiting for the readers."""
        if self._kill_deadline is not None:
            return  # a cancel's grace period is running: poll() kills when it ends
        now = time.monotonic()
        if self._abandon_at is None:
            self._abandon_at = now + DRAIN_AFTER_EXIT_S
        if now < self._abandon_at:
            return
        if not self._killed:
            self.kill_tree()
            return
        self._abandon_readers()

    def _abandon_readers(self) -> None:
        """End the job although the pipe readers have not seen end-of-file (bounded waits only)."""
        if self.state is not ProcessState.RUNNING:
            return
        self.readers_abandoned = True
        self._drain()  # whatever the readers queued so far still counts
        self._finish(close_streams=False)  # closing a pipe a reader thread blocks on could block us too

    def _finish(self, close_streams: bool = True) -> None:
        proc = self._proc
        assert proc is not None, "_finish runs only after start()"
        self.returncode = proc.poll()
        self.finished_at = time.monotonic()
        _RUNNING.discard(self)
        if self._tree is not None:
            self._tree.close()
        for stream in (proc.stdout, proc.stderr) if close_streams else ():
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

    def kill_tree(self) -> None:
        """Kill the child and all its descendants now (no grace); the readers get :data:`KILL_WAIT_S` more seconds."""
        if self._tree is None:
            return
        self._tree.signal(kill=True)
        self._killed = True
        self._kill_deadline = None
        now = time.monotonic()
        if self._abandon_at is None or self._abandon_at < now + KILL_WAIT_S:
            self._abandon_at = now + KILL_WAIT_S

    def cancel(self, grace_s: float = DEFAULT_CANCEL_GRACE_S, wait: bool = False) -> None:
        """Ask the child's whole tree to stop (terminate), and kill it if it is still alive after ``grace_s``.

        Args:
            grace_s: seconds between terminate and kill.
            wait: block until the tree is gone (batch mode, widget cleanup), at most ``grace_s +``
                :data:`KILL_WAIT_S` seconds (a little more on a loaded machine): past that, the pipe
                readers are abandoned and the job counts as cancelled. Otherwise the kill happens in
                a later :meth:`poll`, so a GUI never waits.
        """
        if self._proc is None or self._tree is None or self.state is not ProcessState.RUNNING:
            return
        self._cancel_requested = True
        self._tree.signal(kill=False)
        self._kill_deadline = time.monotonic() + max(grace_s, 0.0)
        if wait:
            self._wait_bounded(self._kill_deadline + KILL_WAIT_S + 1.0)

    def close(self, timeout: float = KILL_WAIT_S) -> None:
        """End the job at once, for widget cleanup and application exit: kill the tree (no grace)
        and wait at most ``timeout`` seconds for it; then the readers are abandoned. Never raises."""
        if self._proc is None or self.state is not ProcessState.RUNNING:
            return
        self._cancel_requested = True
        self.kill_tree()
        self._abandon_at = time.monotonic() + max(timeout, 0.0)
        self._wait_bounded(self._abandon_at + 1.0)

    def _wait_bounded(self, deadline: float) -> None:
        while self.state is ProcessState.RUNNING and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.02)
        if self.state is ProcessState.RUNNING:  # the child itself did not exit after the kill
            self._abandon_readers()

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
            if self._tree is not None and self.state is ProcessState.RUNNING and self._tree.alive():
                self._tree.signal(kill=True)
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
