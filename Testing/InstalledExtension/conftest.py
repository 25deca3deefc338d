"""Fixtures of the installed-extension checks: the Slicer-like environment, the installed tree, a
runner of code in Slicer-like Python, and the first-use install layered over that environment.

``CA_SLICER_SERIES=5.6`` mimics Slicer 5.6 instead of 5.8 (its own cached env). The first-use
install is cached too (``<env>/first-use``, rebuilt when ``requirements.txt``,
``dependencies.py``, the runner, the env or the torch wheel change); ``CA_FIRST_USE_FRESH=1``
runs it again anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLICER_SERIES = os.environ.get("CA_SLICER_SERIES", "5.8")
#: Seconds a single check may take (a cold start imports vtk and MRML: a few seconds).
CHECK_TIMEOUT_S = 180
#: Seconds the first-use install may take (downloads: nibabel, nilearn, matplotlib, HD-BET's weights, torch).
FIRST_USE_TIMEOUT_S = 1200
#: The torch build the PyTorch extension stand-in installs (the Makefile's CPU wheel; override with CA_TORCH_SPEC).
TORCH_SPEC = os.environ.get("CA_TORCH_SPEC", "torch==2.13.0")
#: Bump when the first-use flow below changes (cached results are then redone).
FIRST_USE_LAYOUT = 1


# The helper scripts beside the tests (not test files) import as plain modules.
sys.path.insert(0, str(HERE))
import build_installed_tree as tree_builder  # noqa: E402
import slicer_env  # noqa: E402


@pytest.fixture(scope="module")
def env():
    """The cached Slicer-like environment (built on first use: about 35 s with a fast index, ~1.4 GB)."""
    return slicer_env.ensure_slicer_env(SLICER_SERIES)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The installed extension: ``<root>/lib/Slicer-X.Y/qt-scripted-modules/`` holding what CMake installs."""
    root = tmp_path_factory.mktemp("installed") / "ContrastAmplifier"
    tree = tree_builder.build_installed_tree(root, SLICER_SERIES, REPO)
    # A tree inside the checkout would let registry.builtin_models_dir() find the source Resources/.
    assert REPO not in tree.scripted_modules_dir.resolve().parents, "build the tree outside the repository"
    return tree


def _user_pip_cache() -> str:
    """The account's pip cache (Testing/conftest.py points HOME at a sandbox: downloads stay cached anyway)."""
    return os.environ.get("PIP_CACHE_DIR") or os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".cache", "pip")


def make_runner(python: Path, site_packages: Path, module_path: Path, workdir: Path,
                timeout: float = CHECK_TIMEOUT_S) -> Callable[[str], Any]:
    """``run(code) -> value``: runs ``code`` in Slicer-like Python (``slicer_python_runner.py``); it may
    ``emit(value)`` (JSON, the last one is returned). A non-zero exit fails the test with the output."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    child_env = {key: value for key, value in os.environ.items()
                 if not key.startswith(("PYTHON", "CONTRAST_AMPLIFIER", "XDG_"))}
    child_env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"), XDG_CACHE_HOME=str(home / ".cache"),
                     XDG_CONFIG_HOME=str(home / ".config"), MPLBACKEND="Agg", PIP_CACHE_DIR=_user_pip_cache())

    def run(code: str) -> Any:
        prelude = "import json as _json\ndef emit(value):\n    print('@@RESULT@@' + _json.dumps(value, default=str), flush=True)\n"
        command = [str(python), "-I", "-S", str(HERE / "slicer_python_runner.py"),
                   "--site-packages", str(site_packages), "--module-path", str(module_path), "-c", prelude + code]
        proc = subprocess.run(command, capture_output=True, text=True, env=child_env, cwd=str(workdir), timeout=timeout)
        output = (proc.stdout + proc.stderr).strip()
        assert proc.returncode == 0, f"the check failed in Slicer-like Python (exit {proc.returncode}):\n{output[-6000:]}"
        results = [line[len("@@RESULT@@"):] for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
        return json.loads(results[-1]) if results else None

    return run


@pytest.fixture()
def run_check(env, installed, tmp_path):
    """``run_check(code) -> value`` in the Slicer-like environment as Slicer ships it (before any first-use install)."""
    return make_runner(env.python, env.site_packages, installed.scripted_modules_dir, tmp_path)


# -- the first-use install ---------------------------------------------------------------------

#: What the module does when the user first presses Apply: ``logic.ensureDependencies()``, the
#: user accepting the confirmation. Runs in the first-use layer with the application's stand-ins.
FIRST_USE_CODE = """
import importlib.metadata, time
new_scene()
module = load_module("ContrastAmplifier")
from ContrastAmplifierCommon import dependencies
record = slicer_app_standins(TORCH_SPEC, TEMPORARY)
logic = module.ContrastAmplifierLogic()
asked = []
logic.confirmInstall = lambda message: asked.append(message) or True
missing = dependencies.missing_requirements()
started = time.monotonic()
logic.ensureDependencies()
emit({"missing_before": missing, "asked": asked, "pip_calls": record.pip_calls, "torch_calls": record.torch_calls,
      "torch_changed": record.torch_changed,
      "seconds": round(time.monotonic() - started, 1), "missing_after": dependencies.missing_requirements(),
      "torch": importlib.metadata.version("torch")})
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_use_fingerprint(env) -> dict:
    common = REPO / "ContrastAmplifierCommon" / "ContrastAmplifierCommon"
    return {
        "layout": FIRST_USE_LAYOUT,
        "env": _sha256(env.root / slicer_env.STAMP),
        "requirements": _sha256(common / "requirements.txt"),
        "dependencies": _sha256(common / "dependencies.py"),
        "runner": _sha256(HERE / "slicer_python_runner.py"),
        "torch": TORCH_SPEC,
    }


@pytest.fixture(scope="module")
def first_use(env, installed, tmp_path_factory):
    """``(layer env, outcome of the first-use install)``: the install as the module runs it, into a
    layer over the Slicer-like env; done once per change of its inputs, the outcome kept in
    ``<layer>/.first-use.json``."""
    wanted = _first_use_fingerprint(env)
    with slicer_env.locked(env.root.with_name(env.root.name + ".first-use.lock")):
        stamp = env.root / slicer_env.FIRST_USE_DIR / ".first-use.json"
        outcome: Optional[dict] = None
        if stamp.is_file() and not os.environ.get("CA_FIRST_USE_FRESH"):
            try:
                saved = json.loads(stamp.read_text(encoding="utf-8"))
                outcome = saved["outcome"] if saved.get("fingerprint") == wanted else None
            except (OSError, ValueError, KeyError):
                outcome = None
        layer = slicer_env.first_use_layer(env, fresh=outcome is None)
        if outcome is None:
            workdir = tmp_path_factory.mktemp("first-use")
            run = make_runner(layer.python, layer.site_packages, installed.scripted_modules_dir, workdir,
                              timeout=FIRST_USE_TIMEOUT_S)
            code = f"TORCH_SPEC = {TORCH_SPEC!r}\nTEMPORARY = {str(workdir)!r}\n" + FIRST_USE_CODE
            try:
                outcome = run(code)
            except BaseException:
                shutil.rmtree(layer.root, ignore_errors=True)  # a half install is never reused
                raise
            stamp.write_text(json.dumps({"fingerprint": wanted, "outcome": outcome}, indent=2) + "\n", encoding="utf-8")
    return layer, outcome


@pytest.fixture()
def run_first_use(first_use, installed, tmp_path):
    """``run(code) -> value`` in the first-use layer (Slicer's packages plus what the first-use install added)."""
    layer, _ = first_use
    return make_runner(layer.python, layer.site_packages, installed.scripted_modules_dir, tmp_path, timeout=600)
