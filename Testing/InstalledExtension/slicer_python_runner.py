"""Run Python code the way 3D Slicer's embedded Python would see an installed extension.

Start it with the Slicer-like environment's interpreter in isolated mode, so that neither the
caller's ``PYTHONPATH``, the user site, the current folder nor the env's own ``site`` start-up
add anything::

    <env>/bin/python -I -S slicer_python_runner.py --site-packages SITE --module-path QT_SCRIPTED_MODULES -c CODE

``sys.path`` is then: the interpreter's standard library, ``SITE`` (added with
``site.addsitedir``, so its ``.pth`` files count, as in Slicer's Python) and, last,
``QT_SCRIPTED_MODULES`` - appended, as Slicer's scripted-module factory does with
``appendPythonPaths`` for each module folder (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx).

``CODE`` runs as ``__main__`` with these names defined:

* ``MODULE_PATH``: the qt-scripted-modules folder (a ``pathlib.Path``);
* ``load_module(name)``: loads ``MODULE_PATH/<name>.py`` under the module name ``name``, as
  Slicer 5.6/5.8 do with ``imp.load_source(name, path)`` (Base/QTCore/qSlicerScriptedUtils.cxx);
* ``new_scene()``: a fresh ``slicer.vtkMRMLScene`` set as ``slicer.mrmlScene`` (the application
  always has one);
* ``module_parent()``: a stand-in for the C++ ``qSlicerScriptedLoadableModule`` a module
  class receives as ``parent``;
* ``slicer_app_standins(torch_spec, temporary_path)``: what the first-use install meets in the
  application and the headless ``slicer-core`` package lacks: ``slicer.app``, Slicer 5.6/5.8's
  ``slicer.util.pip_install`` (one argument, ``str`` or ``list``, runs ``python -m pip install``
  with this interpreter, which is ``PythonSlicer`` in the application) and the PyTorch extension's
  ``PyTorchUtils`` (installs ``torch_spec`` with pip, as the extension installs its chosen build).
  Returns a record of the calls (``pip_calls``: each argument list and the constraints file's
  lines; ``torch_calls``: each ``torchVersionRequirement``; ``torch_changed``: the packages,
  already installed before, that the torch install added another version of).
"""

from __future__ import annotations

import argparse
import importlib.util
import site
import sys
import types
from pathlib import Path


def _load_module(module_path: Path, name: str):
    path = module_path / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not installed")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # imp.load_source registers it before executing it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _new_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def _module_parent():
    return types.SimpleNamespace(title="", categories=[], dependencies=[], contributors=[], helpText="",
                                 acknowledgementText="", hidden=False, isEntered=False)


def _slicer_app_standins(torch_spec: str, temporary_path: str):
    import shlex
    import subprocess

    import slicer

    record = types.SimpleNamespace(pip_calls=[], torch_calls=[], torch_changed=[])

    def pip_install(requirements):  # Slicer 5.8.1 Base/Python/slicer/util.py (5.6.2: the same)
        if type(requirements) == str:  # noqa: E721 - Slicer's own test
            args = ["install", *shlex.split(requirements)]
        elif type(requirements) == list:  # noqa: E721
            args = ["install", *requirements]
        else:
            raise ValueError("pip_install requirement input must be string or list")
        constraints = []
        if "--constraint" in args:
            constraints = Path(args[args.index("--constraint") + 1]).read_text(encoding="utf-8").split()
        record.pip_calls.append({"args": args[1:], "constraints": constraints})
        # launchConsoleProcess + logProcessOutput: merged output, printed line by line, then
        # CalledProcessError on a non-zero exit.
        proc = subprocess.Popen([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        for line in proc.stdout:
            print(line.rstrip())
        proc.wait()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)

    class PyTorchUtilsLogic:
        def torchInstalled(self):
            return importlib.util.find_spec("torch") is not None

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            # Like the real extension: pip on its own (no constraint of this project). What that
            # changes among the packages already there is recorded (torch_changed): it is the
            # PyTorch extension's doing, not the project's first-use install.
            import importlib.metadata

            def installed():
                return {(d.metadata["Name"], d.version, str(d.locate_file(""))) for d in importlib.metadata.distributions()}

            record.torch_calls.append(torchVersionRequirement)
            before = installed()
            subprocess.run([sys.executable, "-m", "pip", "install", torch_spec], check=True)
            importlib.invalidate_caches()
            names_before = {name for name, _, _ in before}
            record.torch_changed = sorted(f"{name} {version}" for name, version, _ in installed() - before
                                          if name in names_before)
            import torch

            return torch

    slicer.app = types.SimpleNamespace(temporaryPath=temporary_path)
    slicer.util.pip_install = pip_install
    sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site-packages", required=True, type=Path)
    parser.add_argument("--module-path", required=True, type=Path)
    parser.add_argument("-c", dest="code", required=True)
    args = parser.parse_args()
    if not sys.flags.isolated or not sys.flags.no_site:
        raise SystemExit("start the runner with -I -S: otherwise the env's site start-up and PYTHONPATH leak in")
    site.addsitedir(str(args.site_packages))
    sys.path.append(str(args.module_path))
    namespace = {
        "__name__": "__main__",
        "MODULE_PATH": args.module_path,
        "load_module": lambda name: _load_module(args.module_path, name),
        "new_scene": _new_scene,
        "module_parent": _module_parent,
        "slicer_app_standins": _slicer_app_standins,
    }
    sys.argv = ["-c"]
    exec(compile(args.code, "<check>", "exec"), namespace)


if __name__ == "__main__":
    main()
