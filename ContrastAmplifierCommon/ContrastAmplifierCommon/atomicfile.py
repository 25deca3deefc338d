"""Atomic file writes (temp file in the same folder + ``os.replace``), independent of image I/O.

A crash or cancel mid-write leaves either the previous file or nothing, never half a file. Kept
apart from :mod:`.imageio` so that training, bundles and benchmarks do not need SimpleITK (a GPU
training node can run them with torch and numpy alone).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["apply_umask", "atomic_path", "write_text_atomic", "save_figure_atomic"]


def apply_umask(path: Union[str, os.PathLike], directory: bool = False) -> None:
    """``mkstemp``/``mkdtemp`` create 0600 files and 0700 folders; give the final file (or folder)
    the permissions a plain ``open()`` (or ``mkdir``) would, under the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], suffix: str = "", mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` to write to; when the block succeeds it gets a
    plain file's permissions (or ``mode``) and is renamed onto ``path``, when it fails it is removed.

    ``suffix`` keeps the extension that format-sniffing writers need (``.nii.gz``); ``mode``
    (permission bits) lets a rewritten file keep its own, already in place when it appears.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is None:
            apply_umask(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Union[str, os.PathLike], mode: Optional[int] = None) -> Path:
    """Atomically write a UTF-8 text file (JSON manifests, CSVs); ``mode``: as :func:`atomic_path`."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure_atomic(figure: Any, path: Union[str, os.PathLike], dpi: Optional[float] = None,
                       suffix: Optional[str] = None) -> Path:
    """Save a matplotlib ``figure`` to ``path`` through :func:`atomic_path`; returns ``path``.

    ``suffix`` picks the format (default: ``path``'s own, e.g. ``.png``); ``dpi``: the figure's
    own when ``None``.
    """
    path = Path(path)
    with atomic_path(path, path.suffix if suffix is None else suffix) as tmp:
        figure.savefig(tmp, **({} if dpi is None else {"dpi": dpi}))
    return path
