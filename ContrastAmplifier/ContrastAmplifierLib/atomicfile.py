"""Atomic file writes (temp file in the same folder + ``os.replace``), independent of image I/O.

A crash or cancel mid-write leaves either the previous file or nothing, never half a file. Kept
apart from :mod:`.imageio` so that training, bundles and benchmarks do not need SimpleITK (a GPU
training node can run them with torch and numpy alone).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["apply_umask", "write_text_atomic"]


def apply_umask(path: Union[str, os.PathLike]) -> None:
    """``mkstemp`` creates 0600 files; give the final file the permissions a plain open(, encoding="utf-8") would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(text: str, path: Union[str, os.PathLike]) -> Path:
    """Atomically write a text file (JSON manifests, CSVs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
