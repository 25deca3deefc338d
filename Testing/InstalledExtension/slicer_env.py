"""A Python environment whose site-packages holds what 3D Slicer ships, and nothing else.

Built once (minutes: pip downloads about 300 MB) and cached; later calls return at once.
It holds the pins of ``slicer-<series>-packages.txt`` (numpy, scipy, SimpleITK, requests,
pydicom, packaging, pip, setuptools, ...: the packages Slicer's SuperBuild installs, see
SLICER_SOURCES.md) plus the ``slicer-core`` wheel and its ``vtk`` wheel, which stand in for
Slicer's own ``slicer``/``vtk``/MRML Python packages. Everything is installed with
``--no-deps``: nothing else (no torch, nibabel, nilearn, platformdirs, matplotlib - the
``vtk`` wheel's own matplotlib requirement included) reaches it.

Differences from the real application, on purpose or unavoidable:

* Python is the interpreter that runs this file (3.11 under ``make test``), not Slicer's
  3.9.10: ``slicer-core`` exists for Python >= 3.10 only.
* ``slicer`` is the headless ``slicer-core`` package: no ``slicer.app``, no Qt, no
  ``slicer.ScriptedLoadableModule`` (the modules then use ContrastAmplifierCommon.slicer_compat's
  stand-ins, as under pytest).

Command line (also what a Makefile target would call)::

    python Testing/InstalledExtension/slicer_env.py [--series 5.8] [--dir DIR]

Environment variables: ``CA_SLICER_ENV_DIR`` (folder of the env, default ``.slicer-env-<series>``
at the repository root, git-ignored and removed by ``make clean``), ``CA_SLICER_ENV_PYTHON`` (base
interpreter, default the running one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAMP = ".slicer-env.json"
#: Used when the running interpreter has no slicer-core to copy the version from.
FALLBACK_SLICER_CORE = "5.13.31053.0"
FALLBACK_VTK = "9.6.2"
#: Bump to force every cached env to be rebuilt (a change in how it is built).
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class SlicerEnv:
    """A built environment: its folder, interpreter and site-packages."""

    root: Path
    python: Path
    site_packages: Path
    series: str
    requirements: list[str]


def pins_file(series: str) -> Path:
    return HERE / f"slicer-{series}-packages.txt"


def read_pins(series: str) -> list[str]:
    """The ``name==version`` lines of ``slicer-<series>-packages.txt`` (comments dropped)."""
    path = pins_file(series)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: no package list for Slicer {series}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def slicer_core_requirements() -> list[str]:
    """``slicer-core==X`` and the ``vtk==Y`` it requires: the versions of the running interpreter's
    slicer-core (the project's test extra) when installed, else the fall-back constants."""
    try:
        version = importlib.metadata.version("slicer-core")
        requires = importlib.metadata.requires("slicer-core") or []
    except importlib.metadata.PackageNotFoundError:
        return [f"slicer-core=={FALLBACK_SLICER_CORE}", f"vtk=={FALLBACK_VTK}"]
    vtk = next((r.split(";")[0].strip() for r in requires if re.match(r"vtk\b", r) and "extra" not in r),
               f"vtk=={FALLBACK_VTK}")
    return [f"slicer-core=={version}", vtk.replace(" ", "")]


def default_root(series: str) -> Path:
    override = os.environ.get("CA_SLICER_ENV_DIR")
    return Path(override) if override else REPO / f".slicer-env-{series}"


def _env_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a second pytest worker or session waits for the first build
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(series: str, base_python: str, requirements: list[str]) -> dict:
    return {
        "layout": LAYOUT_VERSION,
        "series": series,
        "base_python": base_python,
        "requirements": requirements,
        "pins_sha256": hashlib.sha256(pins_file(series).read_bytes()).hexdigest(),
    }


def ensure_slicer_env(series: str = "5.8", root: Optional[Path] = None,
                      log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> SlicerEnv:
    """The environment for Slicer ``series``, built on first use (or when its inputs changed).

    Raises:
        RuntimeError: venv creation or pip failed; the message holds pip's output tail.
    """
    root = Path(root) if root is not None else default_root(series)
    base_python = os.environ.get("CA_SLICER_ENV_PYTHON") or sys.executable
    requirements = read_pins(series) + slicer_core_requirements()
    wanted = _fingerprint(series, base_python, requirements)
    python = _env_python(root)
    with _locked(root.with_name(root.name + ".lock")):
        stamp = root / STAMP
        if stamp.is_file() and python.exists():
            try:
                if json.loads(stamp.read_text(encoding="utf-8")) == wanted:
                    return SlicerEnv(root, python, _site_packages(python), series, requirements)
            except (OSError, ValueError):
                pass
        started = time.monotonic()
        log(f"slicer_env: building {root} (Slicer {series} packages, {len(requirements)} requirements)...")
        if root.exists():
            shutil.rmtree(root)
        # --without-pip: pip comes from the pins (Slicer's own pip version), installed by the
        # base interpreter's pip through --python.
        _run([base_python, "-m", "venv", "--without-pip", str(root)])
        requirements_txt = root / "requirements.txt"
        requirements_txt.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        _run([base_python, "-m", "pip", "--python", str(python), "install", "--no-deps", "--only-binary=:all:",
              "--no-warn-script-location", "--disable-pip-version-check", "-r", str(requirements_txt)])
        stamp.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        log(f"slicer_env: built {root} in {time.monotonic() - started:.0f} s")
    return SlicerEnv(root, python, _site_packages(python), series, requirements)


FIRST_USE_DIR = "first-use"


def first_use_layer(base: SlicerEnv, fresh: bool = True) -> SlicerEnv:
    """A venv layered over ``base`` for the first-use install: ``<base>/first-use``.

    Its site-packages starts empty and holds a ``.pth`` file naming ``base``'s, so its interpreter
    sees Slicer's packages (as the application's Python does) while whatever pip installs lands in
    the layer: ``base`` stays exactly what Slicer ships for the other checks. pip itself is
    Slicer's (``base``'s pip 24.0 / 23.3). ``fresh`` deletes an existing layer first; otherwise an
    existing one is returned as it is. Call it under :func:`locked`.
    """
    root = base.root / FIRST_USE_DIR
    python = _env_python(root)
    if fresh or not python.exists():
        if root.exists():
            shutil.rmtree(root)
        _run([os.environ.get("CA_SLICER_ENV_PYTHON") or sys.executable, "-m", "venv", "--without-pip", str(root)])
        site_packages = _site_packages(python)
        (site_packages / "slicer-env.pth").write_text(str(base.site_packages) + "\n", encoding="utf-8")
    return SlicerEnv(root, python, _site_packages(python), base.series, base.requirements)


def locked(path: Path):
    """An exclusive lock on ``path`` (created if needed) held for the ``with`` block."""
    return _locked(path)


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="5.8", choices=("5.6", "5.8"))
    parser.add_argument("--dir", type=Path, default=None, help="env folder (default: CA_SLICER_ENV_DIR or .slicer-env-<series> at the repository root)")
    args = parser.parse_args(argv)
    env = ensure_slicer_env(args.series, args.dir)
    print(env.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
