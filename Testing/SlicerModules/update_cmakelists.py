"""Rewrite the file lists of the module CMakeLists.txt files from what is on disk.

Run after adding or removing a file in a ``*Lib`` package or a module's ``Resources/``::

    python Testing/SlicerModules/update_cmakelists.py            # every module using this layout
    python Testing/SlicerModules/update_cmakelists.py ContrastAmplifier

Only CMakeLists files that carry the marker line below are rewritten (a hand-written one is
left alone); ``test_static_checks.py`` says what is missing either way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")
MARKER = "# Every file of the module and of its Lib package is listed (Testing/SlicerModules checks it)."

TEMPLATE = """#-----------------------------------------------------------------------------
set(MODULE_NAME {name})

#-----------------------------------------------------------------------------
{marker}
# Regenerate the lists with: python Testing/SlicerModules/update_cmakelists.py
set(MODULE_PYTHON_SCRIPTS
  ${{MODULE_NAME}}.py
{scripts}  )

set(MODULE_PYTHON_RESOURCES
{resources}  )

#-----------------------------------------------------------------------------
slicerMacroBuildScriptedModule(
  NAME ${{MODULE_NAME}}
  SCRIPTS ${{MODULE_PYTHON_SCRIPTS}}
  RESOURCES ${{MODULE_PYTHON_RESOURCES}}
  WITH_GENERIC_TESTS
  )

#-----------------------------------------------------------------------------
if(BUILD_TESTING)
  # Register the unittest subclass in the main script as a ctest.
  # Note that the test will also be available at runtime.
  slicer_add_python_unittest(SCRIPT ${{MODULE_NAME}}.py)
endif()
"""


def _files(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def render(name: str) -> str:
    """The CMakeLists.txt text for module ``name`` from the files on disk."""
    module = REPO / name
    rel = lambda p: p.relative_to(module).as_posix()  # noqa: E731

    def cmake_path(path: str) -> str:
        path = path.replace(f"{name}Lib/", "${MODULE_NAME}Lib/", 1)
        return (path.replace(f"Resources/Icons/{name}.png", "Resources/Icons/${MODULE_NAME}.png")
                    .replace(f"Resources/UI/{name}.ui", "Resources/UI/${MODULE_NAME}.ui"))

    lib = [rel(p) for p in _files(module / f"{name}Lib")]
    scripts = [p for p in lib if p.endswith(".py")]
    resources = [rel(p) for p in _files(module / "Resources")] + [p for p in lib if not p.endswith(".py")]
    return TEMPLATE.format(
        name=name, marker=MARKER,
        scripts="".join(f"  {cmake_path(p)}\n" for p in scripts),
        resources="".join(f"  {cmake_path(p)}\n" for p in resources),
    )


def main(names: List[str]) -> int:
    for name in names or MODULES:
        path = REPO / name / "CMakeLists.txt"
        if not (REPO / name / f"{name}.py").is_file():
            continue
        if path.is_file() and MARKER not in path.read_text(encoding="utf-8"):
            print(f"skipped {path.relative_to(REPO)} (hand-written: no marker line)")
            continue
        path.write_text(render(name), encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
