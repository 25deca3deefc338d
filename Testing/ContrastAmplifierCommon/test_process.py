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
