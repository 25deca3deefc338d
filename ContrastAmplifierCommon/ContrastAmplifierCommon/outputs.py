"""Where a command may write: checked before any work, and never at the cost of the user's files.

A command owns only the names it produces. It writes them into a new folder, or into an
existing folder file by file (each atomically, by rename), and refuses before any computation
when the output would land on its own inputs, on an ancestor of them, on the current directory,
on files that are already there (unless ``overwrite``), on a file where a folder is needed (or
the reverse), on an unsupported format, or somewhere it cannot write. Folders it creates get
the user's normal permissions (umask), and the ones it created are removed again when the
command fails, so a failure leaves the disk as it was.

Standard library only: the training and reader packages use it without SimpleITK.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

from .atomicfile import apply_umask

__all__ = [
    "OutputPathError", "check_output_folder", "check_output_file", "folders_to_create", "remove_empty_folders",
    "created_parents", "staged_folder",
]

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """An output path cannot be used as asked; the message names it and the fix."""


def _absolute(path: PathLike) -> Path:
    """Absolute, symlink-resolved path (also for paths that do not exist yet)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _missing_chain(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _check_writable(folder: Path, what: str) -> None:
    """Create and remove a probe file in ``folder`` (or its nearest existing ancestor)."""
    missing = _missing_chain(folder)
    existing = missing[-1].parent if missing else folder
    if not existing.is_dir():
        raise OutputPathError(f"cannot create {what} {folder}: {existing} is a file, not a folder. Choose another path.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write {what} {folder}: {existing} is not writable ({exc.strerror}). Choose a folder you can write to."
        ) from None


def _refuse_inputs(out: Path, inputs: Iterable[PathLike], what: str) -> None:
    for source in inputs:
        src = _absolute(source)
        if out == src or out in src.parents:
            raise OutputPathError(
                f"{what} {out} {'is' if out == src else 'contains'} the input {src}; writing there could replace the "
                "inputs. Choose a new folder outside the inputs (e.g. a sibling folder)."
            )


def check_output_folder(
    out_dir: PathLike,
    produces: Iterable[str],
    inputs: Iterable[PathLike] = (),
    overwrite: bool = False,
    what: str = "output folder",
    allow_current_dir: bool = False,
) -> Path:
    """Check, before any work, that ``out_dir`` can receive the files named in ``produces``.

    Args:
        out_dir: the output folder (may exist; may not exist yet).
        produces: file names the command writes into it (relative names).
        inputs: input files and folders that must never be written over.
        overwrite: allow replacing files of the ``produces`` names that already exist.
        what: how messages call the folder.
        allow_current_dir: for commands that only add new sub-folders (never files).

    Returns:
        The absolute output folder.

    Raises:
        OutputPathError: the folder is the current directory, an input or an ancestor of one,
            a file, not writable, or holds produced names and ``overwrite`` is off.
    """
    out = _absolute(out_dir)
    folders_to_create(out, what)  # a file, below a file, or not writable
    if out == _absolute(Path.cwd()) and not allow_current_dir:
        raise OutputPathError(
            f"{what} {out} is the current directory; name a sub-folder instead (e.g. {Path(out_dir) / 'output'})."
        )
    _refuse_inputs(out, inputs, what)
    if out.is_dir():
        clashes = sorted(name for name in produces if (out / name).exists())
        if clashes and not overwrite:
            shown = ", ".join(clashes[:6]) + (f" and {len(clashes) - 6} more" if len(clashes) > 6 else "")
            raise OutputPathError(
                f"{what} {out} already holds {shown}; pass --overwrite to replace these files (nothing else in the "
                "folder is touched), or choose a new folder."
            )
    return out


def check_output_file(
    out_path: PathLike,
    suffixes: Sequence[str],
    inputs: Iterable[PathLike] = (),
    overwrite: bool = False,
    what: str = "output file",
) -> Path:
    """Check, before any work, that ``out_path`` is a file name this command can write.

    Args:
        out_path: the output file.
        suffixes: accepted endings (lower-case, e.g. ``(".nii.gz", ".nrrd")``).
        inputs: input files and folders that must never be written over (even with ``overwrite``).
        overwrite: allow replacing an existing file.
        what: how messages call the file.

    Raises:
        OutputPathError: unsupported ending, an existing folder, an input, an existing file
            without ``overwrite``, or a folder that cannot be written.
    """
    out = _absolute(out_path)
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is an existing folder; give a file name, e.g. {Path(out_path) / 'T1c-pro.nii.gz'}.")
    if not any(out.name.lower().endswith(s) for s in suffixes):
        raise OutputPathError(f"{what} {out} has an unsupported ending; use one of {', '.join(suffixes)}.")
    for source in inputs:
        if out == _absolute(source):
            raise OutputPathError(f"{what} {out} is one of the inputs; choose another file name.")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{what} {out} already exists; pass --overwrite to replace it, or choose another name.")
    _check_writable(out.parent, f"the folder of {what}")
    return out


def folders_to_create(folder: PathLike, what: str = "output folder") -> list[Path]:
    """Check, before any work, that ``folder`` can be created or written; return what must be created.

    Returns:
        ``folder`` and its missing parents, deepest first (empty when ``folder`` exists), so a
        failed command removes exactly what it created (:func:`remove_empty_folders`).

    Raises:
        OutputPathError: ``folder`` or a parent is a file, or the nearest existing folder is not writable.
    """
    folder = _absolute(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} {folder} is an existing file; name a folder (new or existing).")
    _check_writable(folder, what)
    return _missing_chain(folder)


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (give them deepest first) that are empty; keep any that hold something."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def created_parents(folder: PathLike) -> Iterator[list[Path]]:
    """Create ``folder`` and its missing parents; remove the ones created here if the block fails."""
    missing = folders_to_create(folder)
    for path in reversed(missing):
        path.mkdir(exist_ok=True)  # mode 0o777 minus the umask, like any new folder
    try:
        yield missing
    except BaseException:
        remove_empty_folders(missing)
        raise


@contextlib.contextmanager
def staged_folder(out_dir: PathLike, last: Optional[str] = None) -> Iterator[Path]:
    """Yield a hidden staging folder; on success its files are published into ``out_dir``.

    A new ``out_dir`` is the staging folder renamed (one atomic step). An existing ``out_dir``
    receives the staged files (sub-folders included) one rename each, after checking that no
    folder stands where a file goes; ``last`` (e.g. the manifest) goes last, so it is present
    only when the rest is. Other files in ``out_dir`` are never touched. If anything fails, the
    staging folder goes, so do the files this call added and the folders it created: the disk is
    left as it was (files it replaced keep their new content).

    Raises:
        OSError: a write or rename failed (the caller names it to the user).
    """
    out = _absolute(out_dir)
    with created_parents(out.parent):
        inside = out.is_dir()
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out if inside else out.parent))
        added: list[Path] = []
        made: list[Path] = []
        try:
            yield staging
            apply_umask(staging, directory=True)
            if not inside and not out.exists():
                os.replace(staging, out)
                return
            out.mkdir(exist_ok=True)
            moves = [(p, out / p.relative_to(staging)) for p in sorted(staging.rglob("*")) if p.is_file()]
            moves.sort(key=lambda move: move[0].name == last)  # stable: ``last`` goes last
            for _, target in moves:  # whatever is in the way is found before any file is moved
                if target.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "a folder is in the way of an output file", str(target))
            for source, target in moves:
                if not target.parent.is_dir():
                    made = folders_to_create(target.parent) + made  # deepest first
                    target.parent.mkdir(parents=True)
                existed = target.exists()
                os.replace(source, target)
                if not existed:
                    added.append(target)
        except BaseException:
            for path in added:
                path.unlink(missing_ok=True)
            remove_empty_folders(made)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
