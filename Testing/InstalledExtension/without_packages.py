"""pytest plugin: run the suites in a Python that lacks some packages on purpose (``make test``'s Python 3.9 run).

    PYTHONPATH=Testing/InstalledExtension pytest -p without_packages --without torch Testing/...

* A test module whose import needs an absent package (itself, or through the project module it
  tests, e.g. ``ContrastAmplifierLib.inference`` importing torch) is skipped as a whole.
* A test that needs one only when it runs (an import inside the test or in the code it calls,
  also in a child process whose error says ``No module named 'torch'``) is reported as skipped.

Each skip says which package it needed, so the summary (``-ra``) lists exactly what did not run.
A package named with ``--without`` must really be absent: naming an importable one is a usage
error, so the plugin never hides a test that could run. It is loaded only by that run (``-p``):
the main test run never skips for a missing package.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Optional

import pytest


def pytest_addoption(parser) -> None:
    parser.addoption("--without", action="append", default=[], metavar="PACKAGE",
                     help="a package absent from this Python on purpose: tests needing it are skipped (repeatable)")


def pytest_configure(config) -> None:
    names = frozenset(config.getoption("--without"))
    importable = sorted(name for name in names if importlib.util.find_spec(name) is not None)
    if importable:
        raise pytest.UsageError(f"--without {' '.join(importable)}: importable in this Python, so its tests must run")
    config._without_packages = names  # type: ignore[attr-defined]


def _absent_package(exc: Optional[BaseException], names: frozenset) -> Optional[str]:
    """The absent package an exception (or one it was raised from) reports missing, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in names:
            return exc.name.split(".")[0]
        for name in names:
            if re.search(rf"No module named '{re.escape(name)}(\.[\w.]+)?'", str(exc)):
                return name
        exc = exc.__cause__ or exc.__context__
    return None


class _ModuleNeedingAbsentPackages(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:  # pytest re-raises the ImportError as a CollectError
            name = _absent_package(error.__context__ or error, self.config._without_packages)
            if name is None:
                raise
            pytest.skip(f"needs {name} (absent from this Python on purpose)", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if not parent.config._without_packages or module_path.name == "conftest.py":
        return None
    return _ModuleNeedingAbsentPackages.from_parent(parent, path=module_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if isinstance(collector, _ModuleNeedingAbsentPackages) and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(collector.path), 1, report.longrepr[2])  # name the test module, not this plugin


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    names = item.config._without_packages
    if not names or call.excinfo is None or report.skipped:
        return
    name = _absent_package(call.excinfo.value, names)
    if name is not None:
        path, line, _ = item.reportinfo()
        report.outcome = "skipped"
        report.longrepr = (str(path), (line or 0) + 1, f"needs {name} when it runs (absent from this Python on purpose)")
