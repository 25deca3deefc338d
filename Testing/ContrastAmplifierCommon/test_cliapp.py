"""One error path: a line that names the problem and a meaningful exit status, never a traceback."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from ContrastAmplifierCommon.cliapp import CANCELLED_MESSAGE, cancelled, fail, run_cli
from ContrastAmplifierLib.imageio import ImageValidationError
from ContrastAmplifierCommon.progress import Cancelled

REPO = Path(__file__).resolve().parents[2]


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def go(what: str) -> None:
        if what == "ok":
            typer.echo("fine")
        elif what == "bad-input":
            raise ImageValidationError("T1c (t1c.nii.gz) is empty; load the right series.")
        elif what == "no-permission":
            raise PermissionError(errno.EACCES, "Permission denied", "/data/out.nii.gz")
        elif what == "bug":
            raise KeyError("spacing")
        elif what == "interrupt":
            raise KeyboardInterrupt
        elif what == "cancel-token":
            raise Cancelled("cancelled by the user")
        elif what == "own-cancel":
            cancelled("cancelled; finished cases are kept")
        elif what == "known":
            fail("bundle.json is not valid JSON")

    @app.command()
    def other() -> None:
        """A second command, so that `go` is a sub-command as in the real apps."""

    return app


def _run(capsys, *argv: str):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_app(), list(argv), prog_name="tool", sigterm_as_interrupt=False)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("what, code, line", [
    ("ok", 0, None),
    ("bad-input", 2, "error: T1c (t1c.nii.gz) is empty; load the right series."),
    ("no-permission", 2, "error: could not access /data/out.nii.gz: Permission denied. Check that the path exists and "
     "that you may read (or write) it."),
    ("bug", 1, "error: unexpected failure (KeyError: 'spacing'). Rerun with --debug for the traceback and report it."),
    ("interrupt", 130, CANCELLED_MESSAGE),
    ("cancel-token", 130, CANCELLED_MESSAGE),
    ("own-cancel", 130, "cancelled; finished cases are kept"),
    ("known", 2, "error: bundle.json is not valid JSON"),
])
def test_every_failure_is_one_line_with_its_exit_status(capsys, what, code, line):
    status, out, err = _run(capsys, "go", what)
    assert status == code
    assert "Traceback" not in err + out
    if line is None:
        assert out == "fine\n" and err == ""
    else:
        assert err.splitlines() == [line]  # exactly one line: a command's own cancel is not repeated


def test_usage_errors_keep_the_parser_message(capsys):
    status, out, err = _run(capsys, "go")
    assert status == 2 and "Missing argument" in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(KeyError):
        run_cli(_app(), ["go", "bug", "--debug"], sigterm_as_interrupt=False)
    monkeypatch.setenv("CONTRAST_AMPLIFIER_DEBUG", "1")
    with pytest.raises(ImageValidationError):
        run_cli(_app(), ["go", "bad-input"], sigterm_as_interrupt=False)


def _interruptible() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. A process inherits an ignored or
    blocked SIGINT, and Python then never raises KeyboardInterrupt; the full suite's xdist worker
    was seen to pass SIGINT on ignored (the child finished all its cases), a shell never does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _sigint_state() -> str:
    return f"this process: SIGINT handler {signal.getsignal(signal.SIGINT)}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_real_cancel_prints_one_line_and_leaves_nothing(tmp_path, sig):
    """Ctrl-C (SIGINT) or the Slicer module's Stop (SIGTERM) in the middle of a phantom case."""
    from ContrastAmplifierCommon.process import child_environment

    env = child_environment()  # this checkout's packages first, as the Slicer module's children get them
    out = tmp_path / "phantoms"
    child = subprocess.Popen(
        # 40 cases: on a loaded machine this test may not run for seconds after the first line, and
        # the signal must still find work in progress (2 cases were once done before it arrived).
        [sys.executable, "-m", "ContrastAmplifierLib.cli", "phantom", str(out), "--cases", "40", "--spacing", "4",
         "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        preexec_fn=_interruptible if sig == signal.SIGINT else None,
    )
    assert child.stdout is not None
    deadline = time.monotonic() + 120
    for line in child.stdout:  # wait until the work has started
        if '"stage"' in line or time.monotonic() > deadline:
            break
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, f"{_sigint_state()}; {stderr[-500:]}"
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["cancelled; finished cases are kept, the unfinished one was removed"]
    assert [p.name for p in out.iterdir()] == []  # no half case, no hidden temporary folder


def test_only_public_typer_names_are_used():
    """``typer._click`` exists from typer 0.26 on; Python 3.9 (Slicer 5.6/5.8's) gets typer <= 0.23.x,
    which is built on the ``click`` package instead: the Libs may use typer's public names only."""
    import re

    packages = ["ContrastAmplifierCommon/ContrastAmplifierCommon", "ContrastAmplifier/ContrastAmplifierLib",
                "ContrastAmplifierTraining/ContrastAmplifierTrainingLib", "LesionReader/LesionReaderLib"]
    private = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
               for package in packages for path in sorted((REPO / package).rglob("*.py"))
               for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if re.search(r"\btyper\._\w", line)]
    assert not private, "private typer modules differ between typer releases:\n" + "\n".join(private)


def test_usage_error_classes_are_found_by_public_names():
    from ContrastAmplifierCommon import cliapp

    classes = cliapp._usage_errors()
    assert classes, "no usage-error class found"
    with pytest.raises(classes):
        typer.main.get_command(_app()).main(["go"], standalone_mode=False)  # missing argument
