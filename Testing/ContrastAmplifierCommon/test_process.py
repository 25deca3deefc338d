"""Child-process runner: real child processes, JSON-lines progress, errors, cancel mid-run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
import textwrap
import time

import pytest

from ContrastAmplifierCommon import process
from ContrastAmplifierCommon.progress import CancelToken

EMITTER = textwrap.dedent(
    """
    import json, sys, time
    steps = int(sys.argv[1]); delay = float(sys.argv[2]); fail = sys.argv[3] == "fail"
    print("starting (plain log line)", flush=True)
    for i in range(steps):
        print(json.dumps({"stage": "work", "fraction": (i + 1) / steps, "message": f"step {i + 1}"}), flush=True)
        print(f"stderr chatter {i}", file=sys.stderr, flush=True)
        time.sleep(delay)
    if fail:
        print("Traceback (most recent call last):", file=sys.stderr)
        print("error: T1c volume not found: /x/t1c.nii.gz. Check the path.", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"stage": "done", "fraction": 1.0, "message": ""}), flush=True)
    """
)

STUBBORN = textwrap.dedent(
    """
    import json, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignores the polite request: needs the kill
    print(json.dumps({"stage": "stubborn", "fraction": 0.1, "message": ""}), flush=True)
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture()
def emitter(tmp_path):
    path = tmp_path / "emit.py"
    path.write_text(EMITTER, encoding="utf-8")
    return path


def test_progress_events_in_order_and_success(emitter):
    seen, logs = [], []
    result = process.run_to_completion(
        [sys.executable, str(emitter), "5", "0.01", "ok"], on_progress=seen.append, on_log=logs.append, poll_interval=0.02
    )
    assert result.returncode == 0
    assert [e.fraction for e in seen] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert seen[0] == process.ProgressEvent("work", 0.2, "step 1") and seen[-1].stage == "done"
    assert result.progress == seen
    assert result.log_lines == ["starting (plain log line)"]
    assert "stderr chatter 4" in result.stderr and "stderr chatter 0" in logs


def test_failure_reports_the_cli_error_line(emitter):
    with pytest.raises(process.ProcessError) as info:
        process.run_to_completion([sys.executable, str(emitter), "2", "0", "fail"], poll_interval=0.02)
    assert str(info.value) == "T1c volume not found: /x/t1c.nii.gz. Check the path."
    assert info.value.returncode == 2 and not isinstance(info.value, process.ProcessCancelled)


def test_poll_api_never_blocks_and_cancel_mid_run(emitter):
    job = process.BackgroundProcess([sys.executable, str(emitter), "400", "0.05", "ok"]).start()
    assert job.running and job.pid
    t0 = time.monotonic()
    while job.fraction == 0.0:
        job.poll()
        assert time.monotonic() - t0 < 30, "no progress from the child"
        time.sleep(0.02)
    t_poll = time.monotonic()
    job.poll()
    assert time.monotonic() - t_poll < 0.5  # poll returns at once
    assert 0.0 < job.fraction < 0.5
    job.cancel()  # GUI style: returns immediately, finished by later polls
    assert job.wait(timeout=30) is process.ProcessState.CANCELLED
    assert job.error_message() == "Cancelled by the user."
    with pytest.raises(process.ProcessCancelled):
        job.raise_for_state()


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM cannot be ignored on Windows")
def test_cancel_kills_a_child_that_ignores_terminate(tmp_path):
    path = tmp_path / "stubborn.py"
    path.write_text(STUBBORN, encoding="utf-8")
    job = process.BackgroundProcess([sys.executable, str(path)]).start()
    while job.latest is None:
        job.poll()
        time.sleep(0.02)
    t0 = time.monotonic()
    job.cancel(grace_s=0.3)
    assert job.wait(timeout=20) is process.ProcessState.CANCELLED
    assert time.monotonic() - t0 < 10
    assert job.returncode == -9  # SIGKILL after the grace period


def test_run_to_completion_honours_cancel_token(emitter):
    token = CancelToken()

    def cancel_after_two(event):
        if event.fraction >= 0.02:
            token.cancel()

    t0 = time.monotonic()
    with pytest.raises(process.ProcessCancelled):
        process.run_to_completion(
            [sys.executable, str(emitter), "100", "0.1", "ok"], on_progress=cancel_after_two, cancel=token, poll_interval=0.02
        )
    assert time.monotonic() - t0 < 8  # not the 10 s the child would have taken


def test_error_box_of_a_cli_library_is_read(tmp_path):
    """typer/click usage errors come in a box: the message is its content, not the frame."""
    script = tmp_path / "box.py"
    script.write_text(
        "import sys\n"
        "print('Usage: x phantom [OPTIONS]', file=sys.stderr)\n"
        "print('\u256d\u2500 Error \u2500\u2500\u256e', file=sys.stderr)\n"
        "print('\u2502 Invalid value for --size: not an  \u2502', file=sys.stderr)\n"
        "print('\u2502 integer                            \u2502', file=sys.stderr)\n"
        "print('\u2570\u2500\u2500\u2500\u256f', file=sys.stderr)\n"
        "sys.exit(2)\n",
        encoding="utf-8",
    )
    with pytest.raises(process.ProcessError) as info:
        process.run_to_completion([sys.executable, str(script)], poll_interval=0.02)
    assert str(info.value) == "Invalid value for --size: not an integer"


def test_missing_program_is_a_clear_error(tmp_path):
    with pytest.raises(process.ProcessError, match="could not start"):
        process.BackgroundProcess([str(tmp_path / "no-such-program")]).start()


def test_child_environment_finds_the_lib_without_install(tmp_path):
    env = process.child_environment(extra_env={"CA_MARKER": "1"}, extra_paths=[str(tmp_path)])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    assert env["CA_MARKER"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    packages = ("ContrastAmplifierCommon", "ContrastAmplifierLib", "ContrastAmplifierTrainingLib", "LesionReaderLib")
    code = f"import os, {', '.join(packages)}; print(*(os.path.dirname(p.__file__) for p in ({', '.join(packages)})))"
    # -S: no site-packages (so no editable install); only PYTHONPATH can find the packages.
    result = process.run_to_completion([sys.executable, "-S", "-c", code], env=env, poll_interval=0.02)
    assert [Path(p).name for p in result.log_lines[-1].split()] == list(packages)


def test_python_module_command_and_cli_probe():
    command = process.python_module_command("ContrastAmplifierLib.cli", "preprocess", 3)
    assert command[1:] == ["-m", "ContrastAmplifierLib.cli", "preprocess", "3"]
    assert {"phantom", "preprocess"} <= process.available_cli_commands("ContrastAmplifierLib.cli")
    assert process.available_cli_commands("ContrastAmplifierLib.no_such_cli") == set()


def test_real_cli_error_through_the_runner(tmp_path):
    """The real `contrast-amplifier preprocess` in a child: its error names the missing folder."""
    command = process.python_module_command(
        "ContrastAmplifierLib.cli", "preprocess", tmp_path / "no-case", tmp_path / "out", "--progress", "json"
    )
    with pytest.raises(process.ProcessError) as info:
        process.run_to_completion(command, env=process.child_environment({"OMP_NUM_THREADS": "1"}), timeout=120)
    assert "no-case" in str(info.value)


@pytest.mark.slow
def test_real_phantom_cli_progress_and_cancel(tmp_path):
    """A real Lib CLI child (`contrast-amplifier phantom`): JSON progress arrives, cancel stops it."""
    env = process.child_environment({"OMP_NUM_THREADS": "1"})
    command = process.python_module_command(
        "ContrastAmplifierLib.cli", "phantom", tmp_path / "ph", "--cases", "1", "--seed", "5",
        "--spacing", "4", "--size", "24", "24", "24", "--progress", "json",
    )
    seen = []
    process.run_to_completion(command, on_progress=seen.append, env=env, timeout=300)
    assert seen and seen[-1].fraction == pytest.approx(1.0, abs=1e-3)
    assert all(0.0 <= e.fraction <= 1.0 for e in seen)
    assert [e.fraction for e in seen] == sorted(e.fraction for e in seen)

    many = process.python_module_command(
        "ContrastAmplifierLib.cli", "phantom", tmp_path / "many", "--cases", "50", "--seed", "5",
        "--spacing", "4", "--size", "24", "24", "24", "--progress", "json",
    )
    job = process.BackgroundProcess(many, env=env).start()
    t0 = time.monotonic()
    while job.latest is None and job.running:
        job.poll()
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    job.cancel(grace_s=2.0)
    assert job.wait(timeout=60) is process.ProcessState.CANCELLED


# -- the whole process tree: a launcher (PythonSlicer) whose child does the work ---------------------

LAUNCHER = textwrap.dedent(
    """
    # Like PythonSlicer: a launcher that starts the real interpreter and waits for it. A SIGTERM ends
    # the launcher (default action) without passing it on; the worker keeps our stdout/stderr.
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, *sys.argv[1:]])
    print(f"launcher {worker.pid}", file=sys.stderr, flush=True)
    sys.exit(worker.wait())
    """
)

WORKER = textwrap.dedent(
    """
    # The real work: writes its pid, reports progress, runs until killed. Options:
    # "stubborn" ignores SIGTERM, "escape" also leaves the launcher's session (out of its process group).
    import json, os, signal, sys, time
    pid_file, mode = sys.argv[1], sys.argv[2]
    if mode in ("stubborn", "escape"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "escape":
        os.setsid()
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    i = 0
    while True:
        i += 1
        print(json.dumps({"stage": "work", "fraction": min(i / 1000, 1.0), "message": ""}), flush=True)
        time.sleep(0.05)
    """
)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _ended(*pids: int, within: float = 2.0) -> bool:
    """True once none of ``pids`` runs, waiting at most ``within`` seconds. A SIGKILLed process closes
    its pipes (which ends the job) a moment before the kernel marks it ended in /proc; on a loaded
    machine that moment is visible."""
    deadline = time.monotonic() + within
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _returns_within(seconds: float, function):
    """Run ``function`` in a thread; fail (instead of hanging the suite) if it takes longer than ``seconds``."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # re-raised below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return time.monotonic() - t0


@pytest.fixture()
def launched(tmp_path):
    """``launched(mode) -> (job, launcher pid, worker pid)``: a running launcher + worker tree; the
    worker is killed at teardown whatever happened (an escaped one could outlive a failed test)."""
    import signal

    launcher, worker = tmp_path / "launcher.py", tmp_path / "worker.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    worker.write_text(WORKER, encoding="utf-8")
    started = []

    def launch(mode: str):
        pid_file = tmp_path / f"worker-{mode}-{len(started)}.pid"
        job = process.BackgroundProcess([sys.executable, str(launcher), str(worker), str(pid_file), mode]).start()
        deadline = time.monotonic() + 30
        while job.latest is None or not pid_file.exists() or not pid_file.read_text():
            job.poll()
            assert time.monotonic() < deadline, f"the worker did not start: {job.stderr_text}"
            time.sleep(0.02)
        worker_pid = int(pid_file.read_text())
        started.append(worker_pid)
        assert _alive(job.pid) and _alive(worker_pid) and worker_pid != job.pid
        return job, job.pid, worker_pid

    yield launch
    for pid in started:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=["psutil", "process group only"])
def tree_finder(request, monkeypatch):
    """Both ways of finding the tree: with psutil (when installed) and without (Slicer 5.6/5.8 ship no psutil)."""
    if request.param == "psutil":
        pytest.importorskip("psutil")
    else:
        monkeypatch.setattr(process, "_psutil", None)
    return request.param


posix_only = pytest.mark.skipif(os.name == "nt", reason="launcher tree checked with POSIX signals and /proc")


@posix_only
def test_cancel_ends_the_launcher_and_the_worker_it_started(launched, tree_finder):
    job, launcher, worker = launched("polite")
    seconds = _returns_within(15, lambda: job.cancel(grace_s=2.0, wait=True))
    assert seconds < 6
    assert job.state is process.ProcessState.CANCELLED
    assert _ended(launcher, worker)


@posix_only
def test_cancel_kills_a_worker_that_ignores_terminate_after_the_launcher_is_gone(launched, tree_finder):
    """The launcher dies of the SIGTERM, the worker ignores it and keeps the pipes: the kill must still
    reach the worker at the end of the grace period, and cancel returns."""
    job, launcher, worker = launched("stubborn")
    seconds = _returns_within(15, lambda: job.cancel(grace_s=0.5, wait=True))
    assert seconds < 0.5 + process.KILL_WAIT_S + 1.5
    assert job.state is process.ProcessState.CANCELLED
    assert _ended(launcher, worker)
    assert not job.readers_abandoned  # the kill closed the pipes: everything it wrote was read


@posix_only
def test_gui_cancel_finishes_through_polling(launched, tree_finder):
    """The widget's way: cancel() returns at once, the QTimer's poll() does the kill and sees the end."""
    job, launcher, worker = launched("stubborn")
    t0 = time.monotonic()
    job.cancel(grace_s=0.5)
    assert time.monotonic() - t0 < 0.5
    assert job.wait(timeout=0.5 + process.KILL_WAIT_S + 2.0) is process.ProcessState.CANCELLED
    assert _ended(launcher, worker)


@posix_only
def test_psutil_reaches_a_worker_that_left_the_process_group(launched):
    """A worker in its own session is out of the group's reach; psutil saw it as a descendant."""
    pytest.importorskip("psutil")
    job, launcher, worker = launched("escape")
    _returns_within(15, lambda: job.cancel(grace_s=0.3, wait=True))
    assert job.state is process.ProcessState.CANCELLED
    assert _ended(worker)


@posix_only
def test_closing_returns_within_seconds_even_if_a_process_survives(launched, monkeypatch):
    """Widget cleanup / application exit: a worker nothing can reach (own session, SIGTERM ignored,
    no psutil) keeps the pipes open for ever; close() still returns within KILL_WAIT_S, the readers
    abandoned, and so does a cancel with wait."""
    monkeypatch.setattr(process, "_psutil", None)
    job, launcher, worker = launched("escape")
    seconds = _returns_within(15, job.close)
    assert seconds < process.KILL_WAIT_S + 1.5
    assert job.state is process.ProcessState.CANCELLED and job.readers_abandoned
    assert _ended(launcher) and _alive(worker)  # the one left (killed by the fixture)

    job, launcher, worker = launched("escape")
    seconds = _returns_within(20, lambda: job.cancel(grace_s=0.5, wait=True))
    assert seconds < 0.5 + process.KILL_WAIT_S + 2.0
    assert job.state is process.ProcessState.CANCELLED and job.readers_abandoned


@posix_only
def test_a_descendant_outliving_a_finished_child_is_ended(tmp_path):
    """The child succeeded but left a process holding its pipes: the job still ends (and the leftover is killed)."""
    script = tmp_path / "leaves_one.py"
    pid_file = tmp_path / "left.pid"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys
        left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(left.pid))
        print("done", flush=True)
    """), encoding="utf-8")
    job = process.BackgroundProcess([sys.executable, str(script)]).start()
    seconds = _returns_within(20, lambda: job.wait(timeout=15))
    assert seconds < process.DRAIN_AFTER_EXIT_S + process.KILL_WAIT_S + 2.0
    assert job.state is process.ProcessState.SUCCEEDED and job.log_lines[-1] == "done"
    left = int(pid_file.read_text())
    assert _ended(left, within=5.0)


def test_windows_tree_is_ended_with_taskkill_while_the_launcher_lives():
    """On Windows there is no SIGTERM for a console-less child: terminate already ends the tree
    (taskkill /T walks it by parent id, so it must run while the launcher is alive)."""
    calls = []

    class FakePopen:
        pid = 4242
        returncode = None

        def poll(self):
            return self.returncode

        def terminate(self):
            calls.append("terminate launcher")
            self.returncode = 1

        kill = terminate

    tree = process.ProcessTree(FakePopen(), windows=True, run=lambda command, **kwargs: calls.append(command))
    tree.signal(kill=False)
    assert calls[0] == ["taskkill", "/T", "/F", "/PID", "4242"]
    assert calls[-1] == "terminate launcher"
    calls.clear()
    tree.signal(kill=True)  # the launcher is gone: nothing left to walk, no taskkill for a dead pid
    assert calls == []
