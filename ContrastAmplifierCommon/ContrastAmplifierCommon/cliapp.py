"""One error path for every console script: a line that names the problem, never a traceback.

:func:`run_cli` runs a typer app and turns whatever escapes a command into one ``error:`` line
on stderr with a meaningful exit status:

- 2: bad input or options (``ValueError`` and its subclasses: image, bundle, study, analysis and
  output-path errors; usage errors found by the parser), or a file the system refused
  (``OSError``: permission, disk full, missing file), named with the file;
- 1: an unexpected failure (a bug): the message asks to rerun with ``--debug``;
- 130: cancelled (Ctrl-C, SIGTERM from the Slicer module's Stop); one line says nothing
  was written.

``--debug`` (anywhere on the command line) or ``$CONTRAST_AMPLIFIER_DEBUG=1`` shows the full
traceback instead. Commands report their own known errors with :func:`fail` and their own
cancel message with :func:`cancelled`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn, Optional

import typer

__all__ = ["fail", "cancelled", "cli_job", "run_cli", "DEBUG_FLAG", "ENV_DEBUG"]

DEBUG_FLAG = "--debug"
ENV_DEBUG = "CONTRAST_AMPLIFIER_DEBUG"
#: What a cancel prints when the command did not say more.
CANCELLED_MESSAGE = "cancelled; nothing was written (outputs are only moved into place once complete)"

_reported = threading.Event()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code`` (2 = bad input, 130 = cancelled)."""
    _reported.set()
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def cancelled(message: str = CANCELLED_MESSAGE) -> NoReturn:
    """Print the one cancel line on stderr and exit 130."""
    _reported.set()
    typer.secho(message, err=True)
    raise typer.Exit(130)


@contextlib.contextmanager
def cli_job(report: object, cancelled_message: str = CANCELLED_MESSAGE) -> Iterator[None]:
    """The block every long command runs its work in: bad input is one ``error:`` line (exit 2), a
    cancel (the job's token, Ctrl-C, SIGTERM) one line of ``cancelled_message`` (exit 130), and the
    progress reporter ``report`` is closed (its ``close()``, if it has one) either way."""
    from .progress import Cancelled

    try:
        yield
    except ValueError as exc:
        fail(str(exc))
    except (Cancelled, KeyboardInterrupt):
        cancelled(cancelled_message)
    finally:
        getattr(report, "close", lambda: None)()


def _terminate_as_interrupt(signum, frame):  # pragma: no cover - exercised through a child process
    raise KeyboardInterrupt


def _usage_errors() -> tuple[type[Exception], ...]:
    """The classes of the parser's usage errors (missing argument, bad option value...), by public names.

    typer < 0.26 (the last releases for Python 3.9, Slicer 5.6/5.8's) is built on the ``click``
    package and raises ``click.ClickException``; typer >= 0.26 vendors click in a private module
    whose ``ClickException`` derives from the public ``typer.TyperException``. Both are looked up,
    so either typer works whether or not ``click`` is installed next to it.
    """
    found: list[type[Exception]] = []
    typer_base = getattr(typer, "TyperException", None)
    if isinstance(typer_base, type) and issubclass(typer_base, Exception):
        found.append(typer_base)
    try:
        click_exceptions = importlib.import_module("click.exceptions")
    except ImportError:
        pass
    else:
        found.append(click_exceptions.ClickException)
    return tuple(found)


def _show_usage_error(exc: Exception) -> None:
    """Print a usage error as typer does: in a rich box when typer has rich, else click's plain lines."""
    try:
        from typer.rich_utils import rich_format_error
    except ImportError:  # typer without rich
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    else:
        rich_format_error(exc)  # type: ignore[arg-type]  # reads format_message() and the optional ctx


def _describe_os_error(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    text = exc.strerror or str(exc)
    return f"could not access{where}: {text}. Check that the path exists and that you may read (or write) it."


def run_cli(app: typer.Typer, argv: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
            sigterm_as_interrupt: bool = True, cancelled_message: str = CANCELLED_MESSAGE) -> NoReturn:
    """Run ``app`` as a console script and exit with the status described in the module doc.

    Args:
        app: the typer application.
        argv: arguments (default ``sys.argv[1:]``); ``--debug`` is taken out here.
        prog_name: program name shown in usage lines.
        sigterm_as_interrupt: SIGTERM unwinds like Ctrl-C (temporary files removed, one
            cancel line printed); commands that handle SIGTERM themselves may install their own.
        cancelled_message: the line printed on a cancel the command did not report itself.
    """
    args: list[str] = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(ENV_DEBUG, "") not in ("", "0")
    args = [a for a in args if a != DEBUG_FLAG]
    if sigterm_as_interrupt and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    _reported.clear()
    from .progress import Cancelled

    try:
        code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except _usage_errors() as exc:  # usage errors: the parser's own message, boxed as typer shows it
        _show_usage_error(exc)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except (KeyboardInterrupt, Cancelled, typer.Abort):
        code = 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, ValueError):
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            sys.exit(2)
        if isinstance(exc, MemoryError):
            typer.secho("error: not enough memory for this input; use a smaller input (crop it to the head) or a "
                        "machine with more memory.", err=True, fg=typer.colors.RED)
            sys.exit(1)
        if isinstance(exc, OSError):
            typer.secho(f"error: {_describe_os_error(exc)}", err=True, fg=typer.colors.RED)
            sys.exit(2)
        typer.secho(f"error: unexpected failure ({type(exc).__name__}: {exc}). Rerun with {DEBUG_FLAG} for the "
                    "traceback and report it.", err=True, fg=typer.colors.RED)
        sys.exit(1)
    code = int(code or 0) if isinstance(code, int) or code is None else 0
    if code == 130 and not _reported.is_set():
        typer.secho(cancelled_message, err=True)
    sys.exit(code)
