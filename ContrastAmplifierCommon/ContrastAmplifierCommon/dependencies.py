"""Install the Lib's Python packages into Slicer's Python on first use, after asking the user.

Never runs at import time: a module calls :func:`ensure_dependencies` when the user first
presses a button that needs the packages (or a batch script calls it). The list of
requirements lives in one place, ``requirements.txt`` next to this file (the same list as
``pyproject.toml``; a test keeps them equal).

Inside Slicer (5.6 and 5.8 embed Python 3.9.10; see Testing/InstalledExtension/SLICER_SOURCES.md):

* What Slicer ships itself (:data:`SLICER_SHIPPED`: numpy, scipy, SimpleITK, VTK, pydicom,
  requests, Pillow, ...) is never pip-installed: a requirement on one of them is skipped (and
  must be met by every supported Slicer: ``requirements.txt`` asks for no newer version than
  Slicer 5.6 ships), and every other package is installed with a pip constraint pinning each
  shipped package to the version Slicer has, so pip cannot upgrade one as a dependency either
  (it fails instead, and the error says so).
* ``torch`` comes from the PyTorch extension (``PyTorchUtils``), which picks the right CUDA or
  CPU build for the machine; plain ``pip install torch`` could pull a multi-GB wrong build.
* The rest goes through ``slicer.util.pip_install`` as Slicer 5.6/5.8 define it: one positional
  argument, a ``list`` of pip arguments (``slicer.pydeps`` exists in no Slicer release).

Optional packages (:data:`OPTIONAL_REQUIREMENTS`: OpenVINO, a faster CPU runtime for HD-BET and the
ensemble) are offered the same way by :func:`offer_optional_dependencies`, but never required: a
declined or failed install is logged and the module goes on with PyTorch. Precision int8 needs
:data:`INT8_REQUIREMENTS` (NNCF) too; the module offers them only when int8 is chosen, and without
them refuses int8 (the other precisions still run).

Outside Slicer the project is installed with pip (``pip install -e .``), so nothing here runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

#: The single list of requirements (pip specifier per line, ``#`` comments allowed).
REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")

#: Distribution name of the project, used when the requirements file is absent (wheel install).
DISTRIBUTION = "slicer-contrast-amplifier"

#: Distributions 3D Slicer 5.6/5.8 install into their own Python (SuperBuild pins, SimpleITK and
#: VTK built from source; Testing/InstalledExtension/slicer-5.*-packages.txt lists them, a test
#: keeps this tuple complete). The first-use install never installs, upgrades or replaces them.
SLICER_SHIPPED = (
    "numpy", "scipy", "SimpleITK", "vtk",
    "pip", "setuptools", "wheel", "packaging", "pyparsing", "six",
    "requests", "certifi", "idna", "charset-normalizer", "urllib3",
    "pydicom", "Pillow", "retrying", "dicomweb-client",
    "chardet", "CouchDB", "GitPython", "gitdb", "smmap",
    "cryptography", "PyJWT", "wrapt", "Deprecated", "pycparser", "cffi", "PyNaCl", "python-dateutil",
    "typing-extensions", "PyGithub",
)

#: Installed through the PyTorch extension when it is available.
TORCH = "torch"

#: Optional packages offered on first use (:func:`offer_optional_dependencies`): requirement -> what it
#: gives. Each is in pyproject.toml's ``[openvino]`` extra with the same specifier (a test checks).
#: OpenVINO alone is enough in Slicer: its own ONNX and PyTorch front ends convert the networks
#: (the ``onnx``/``onnxscript``/``nncf`` of the extra serve the command line's exporter and int8).
OPTIONAL_REQUIREMENTS = {
    "openvino>=2024.0": "OpenVINO, a faster CPU runtime for skull stripping (HD-BET) and the network ensemble",
}

#: What precision "int8" needs besides :data:`OPTIONAL_REQUIREMENTS`: NNCF quantises each fold network to
#: int8 (post-training quantisation of the OpenVINO model). Offered only when int8 is chosen, as it brings
#: several packages OpenVINO alone does not need; in the ``[openvino]`` extra with the same specifier too.
INT8_REQUIREMENTS = {
    "nncf>=2.10": "NNCF, which quantises each fold network to int8 once (Precision int8)",
}

ConfirmCallback = Callable[[str], bool]
Installer = Callable[[list[str]], None]


class DependencyError(RuntimeError):
    """Required Python packages are missing and were not (or could not be) installed."""


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"Cannot read a package name from requirement {requirement!r}")
    return match.group(1)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_slicer_shipped(requirement: str) -> bool:
    """True if the requirement names a distribution Slicer ships (:data:`SLICER_SHIPPED`)."""
    return _canonical(_name(requirement)) in {_canonical(n) for n in SLICER_SHIPPED}


def load_requirements(path: Optional[Path] = None) -> list[str]:
    """Read the requirement specifiers (``["numpy>=1.24", ...]``).

    Args:
        path: requirements file; default :data:`REQUIREMENTS_FILE`. When that is absent (a
            wheel install without it), the installed distribution's own requirements are used.
    """
    path = REQUIREMENTS_FILE if path is None else Path(path)
    if path.is_file():
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line]
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise DependencyError(f"Requirements file {path} is missing; reinstall the ContrastAmplifier extension.") from exc
    return [r.split(";", 1)[0].strip() for r in requires if "extra ==" not in r]


def is_satisfied(requirement: str) -> bool:
    """True if the requirement's distribution is installed at a matching version."""
    name = _name(requirement)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion
    except ImportError:  # no 'packaging': presence is the best we can check
        return True
    specifier = Requirement(requirement).specifier
    try:
        return specifier.contains(installed, prereleases=True)
    except InvalidVersion:  # a source build's version such as "2.2.1-g6a057bd": compare its release part
        release = re.match(r"\d+(\.\d+)*", installed)
        return bool(release) and specifier.contains(release.group(0), prereleases=True)  # type: ignore[union-attr]


def missing_requirements(requirements: Optional[Iterable[str]] = None) -> list[str]:
    """The requirements (default: :func:`load_requirements`) that are not satisfied, in order."""
    requirements = load_requirements() if requirements is None else list(requirements)
    return [r for r in requirements if not is_satisfied(r)]


def install_message(missing: Sequence[str], module_title: str = "Contrast Amplifier") -> str:
    """The confirmation text shown before installing."""
    listed = "\n".join(f"  - {r}" for r in missing)
    return (
        f"{module_title} needs Python packages that are not installed in Slicer yet:\n{listed}\n\n"
        "They will be downloaded and installed into Slicer's Python now (a few minutes; "
        "PyTorch comes from the PyTorch extension and can take longer). "
        "Slicer may need a restart afterwards. Install now?"
    )


def _in_slicer() -> bool:
    try:
        import slicer  # noqa: F401
    except ImportError:
        return False
    return hasattr(slicer, "app")


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def shipped_constraints() -> list[str]:
    """``name==version`` for each Slicer-shipped distribution installed in this Python.

    Passed to pip as a constraints file, so that resolving the first-use requirements can never
    upgrade, downgrade or reinstall what Slicer ships: pip keeps the installed version or fails.
    A version that is not a valid PEP 440 version (pip would reject the whole file) is left out.
    """
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # Slicer ships packaging; without it, trust the versions
        Version, InvalidVersion = str, ValueError  # type: ignore[assignment,misc]
    pins = []
    for name in SLICER_SHIPPED:
        version = _installed_version(name)
        if version is None:
            continue
        try:
            Version(version)
        except InvalidVersion:
            logger.info("Not pinning %s: its version %r is not a PEP 440 version", name, version)
            continue
        pins.append(f"{name}=={version}")
    return pins


@contextlib.contextmanager
def constraints_file(pins: Sequence[str]) -> Iterator[Optional[str]]:
    """A temporary pip constraints file holding ``pins`` (``None`` when there are none), removed afterwards."""
    if not pins:
        yield None
        return
    handle, path = tempfile.mkstemp(prefix="ContrastAmplifier-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write("\n".join(pins) + "\n")
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def slicer_pip_installer(pip_install: Optional[Callable[[list[str]], None]] = None) -> Installer:
    """An installer that runs ``slicer.util.pip_install`` with the :func:`shipped_constraints`.

    Slicer 5.6/5.8 define ``pip_install(requirements)``: one positional argument, a ``str`` (split
    with ``shlex``) or a ``list`` of pip arguments (each passed as is); it runs ``PythonSlicer -m
    pip install ...`` and raises ``subprocess.CalledProcessError`` when pip fails. A list is
    passed here, so a constraints path with spaces needs no quoting.

    Args:
        pip_install: the function to call; default ``slicer.util.pip_install`` (looked up at
            install time, so the Slicer application must be running then).
    """

    def install(requirements: list[str]) -> None:
        function = pip_install
        if function is None:
            import slicer

            function = slicer.util.pip_install
        with constraints_file(shipped_constraints()) as path:
            arguments = (["--constraint", path] if path else []) + list(requirements)
            logger.info("pip install %s", " ".join(arguments))
            try:
                function(arguments)
            except Exception as exc:  # CalledProcessError from Slicer's logProcessOutput, or OSError
                raise DependencyError(
                    f"Installing {', '.join(requirements)} failed ({type(exc).__name__}: {exc}). pip's own message is "
                    "in the Python console and the application log: a package that needs a newer version of one "
                    "Slicer ships (numpy, scipy, SimpleITK, ...) is refused rather than replacing Slicer's, and a "
                    "download can fail without a network connection."
                ) from exc

    return install


def slicer_torch_installer(requirement: str) -> bool:
    """Install torch through the PyTorch extension; False if that extension is not installed."""
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        spec = requirement[len(_name(requirement)):].strip()
        torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=spec or None)
        if torch is None:
            raise DependencyError("PyTorch could not be installed; install it from the 'PyTorch Util' module, then retry.")
    return True


def _shipped_too_old(requirements: Sequence[str]) -> str:
    lines = []
    for requirement in requirements:
        version = _installed_version(_name(requirement))
        have = f"this Python has {_name(requirement)} {version}" if version else f"{_name(requirement)} is not installed"
        lines.append(f"{requirement} ({have})")
    return (
        f"Needs {'; '.join(lines)}. These packages come with 3D Slicer and are never replaced by this extension: "
        "use Slicer 5.6 or later."
    )


#: What :func:`optional_install_message` says by default about going on without the optional packages.
WITHOUT_OPTIONAL = "Without them it runs on PyTorch, only slower on the CPU."


def optional_install_message(missing: Sequence[str], module_title: str = "Contrast Amplifier",
                              purposes: Optional[dict] = None, without: Optional[str] = None) -> str:
    """The question asked before installing optional packages (their purpose, and what happens without them).

    Args:
        purposes: requirement -> what it gives; default :data:`OPTIONAL_REQUIREMENTS` and :data:`INT8_REQUIREMENTS`.
        without: what the module does without them; default :data:`WITHOUT_OPTIONAL`.
    """
    purposes = {**OPTIONAL_REQUIREMENTS, **INT8_REQUIREMENTS} if purposes is None else purposes
    listed = "\n".join(f"  - {r}: {purposes[r]}" if r in purposes else f"  - {r}" for r in missing)
    return (
        f"{module_title} can use these optional Python packages, not installed in Slicer yet:\n{listed}\n\n"
        f"{WITHOUT_OPTIONAL if without is None else without} Download and install them into Slicer's Python "
        "now (a few minutes)? Slicer may need a restart afterwards."
    )


def offer_optional_dependencies(
    requirements: Optional[Iterable[str]] = None,
    confirm: Optional[ConfirmCallback] = None,
    installer: Optional[Installer] = None,
    module_title: str = "Contrast Amplifier",
    without: Optional[str] = None,
) -> list[str]:
    """Offer the missing optional packages (default :data:`OPTIONAL_REQUIREMENTS`) and install them if accepted.

    Never raises for a declined, impossible or failed install: it logs why and returns what was
    installed, so the caller goes on without them (PyTorch). Requirements on packages Slicer ships
    are never installed (skipped with a warning), like in :func:`ensure_dependencies`.

    Args:
        requirements: specifiers; default the keys of :data:`OPTIONAL_REQUIREMENTS`.
        confirm: shows the message and returns True to install (in Slicer: a dialog). ``None``
            (batch mode) logs the message and installs.
        installer: installs a list of specifiers; default :func:`slicer_pip_installer` (inside Slicer;
            outside it nothing is installed: pip installs the ``[openvino]`` extra there).
        module_title: module name used in the message.
        without: what the module does without them, said in the question (default :data:`WITHOUT_OPTIONAL`).

    Returns:
        The requirements now installed (empty when nothing was missing, or nothing was installed).
    """
    requirements = list(OPTIONAL_REQUIREMENTS) if requirements is None else list(requirements)
    missing = [r for r in missing_requirements(requirements) if not is_slicer_shipped(r)]
    for skipped in set(missing_requirements(requirements)) - set(missing):
        logger.warning("Not installing optional %s: it would replace a package 3D Slicer ships", skipped)
    if not missing:
        return []
    message = optional_install_message(missing, module_title, without=without)
    if confirm is not None:
        if not confirm(message):
            logger.info("%s: optional packages not installed (declined): %s", module_title, ", ".join(missing))
            return []
    else:
        logger.warning(message.replace("now (a few minutes)?", "now (batch mode)."))
    if installer is None:
        if not _in_slicer():
            logger.warning("%s: optional packages %s are not installed; outside Slicer install them with pip "
                           "(pip install \"slicer-contrast-amplifier[openvino]\").", module_title, ", ".join(missing))
            return []
        installer = slicer_pip_installer()
    try:
        installer(missing)
    except Exception as exc:  # DependencyError from pip, or anything else: optional means never blocking
        logger.warning("%s: optional packages not installed, going on with PyTorch: %s", module_title, exc)
        return []
    importlib.invalidate_caches()
    still = missing_requirements(missing)
    if still:
        logger.warning("%s: optional packages still missing after installation (%s); going on with PyTorch. "
                       "Restarting Slicer may help.", module_title, ", ".join(still))
    return [r for r in missing if r not in still]


def ensure_dependencies(
    requirements: Optional[Iterable[str]] = None,
    confirm: Optional[ConfirmCallback] = None,
    installer: Optional[Installer] = None,
    torch_installer: Optional[Callable[[str], bool]] = None,
    module_title: str = "Contrast Amplifier",
) -> list[str]:
    """Make sure every requirement is importable, installing the missing ones after confirmation.

    Requirements on packages Slicer ships (:data:`SLICER_SHIPPED`) are never installed: if one
    is not met, nothing is installed and the error names the installed version.

    Args:
        requirements: specifiers; default :func:`load_requirements`.
        confirm: shows the message and returns True to go ahead (in Slicer:
            ``slicer.util.confirmOkCancelDisplay``). ``None`` (batch mode) logs the message and
            installs.
        installer: installs a list of specifiers; default :func:`slicer_pip_installer`.
        torch_installer: installs torch (PyTorch extension); returns False if unavailable, in
            which case torch goes through ``installer`` like the rest.
        module_title: module name used in the message.

    Returns:
        The requirements that were installed (empty if nothing was missing).

    Raises:
        DependencyError: a Slicer-shipped package is too old, the user declined, pip failed, or
            packages are still missing after installing.
    """
    missing = missing_requirements(requirements)
    if not missing:
        return []
    shipped = [r for r in missing if is_slicer_shipped(r)]
    if shipped:
        raise DependencyError(f"{module_title} cannot run in this Slicer. {_shipped_too_old(shipped)}")
    message = install_message(missing, module_title)
    if confirm is not None:
        if not confirm(message):
            raise DependencyError(
                f"{module_title} cannot run without: {', '.join(missing)}. "
                "Press the button again and accept the installation, or install them from Slicer's Python console "
                f"with slicer.util.pip_install({missing!r})."
            )
    else:
        logger.warning(message.replace("Install now?", "Installing (batch mode)."))
    if installer is None:
        if not _in_slicer():
            raise DependencyError(
                f"Missing Python packages: {', '.join(missing)}. Outside Slicer install the project with pip "
                "(pip install -e . from the repository) instead."
            )
        installer = slicer_pip_installer()
    if torch_installer is None and _in_slicer():
        torch_installer = slicer_torch_installer

    rest = list(missing)
    torch_reqs = [r for r in rest if _canonical(_name(r)) == TORCH]
    if torch_reqs and torch_installer is not None and torch_installer(torch_reqs[0]):
        rest = [r for r in rest if r not in torch_reqs]
    if rest:
        logger.info("Installing %s", " ".join(rest))
        installer(rest)
    importlib.invalidate_caches()
    still = missing_requirements(missing)
    if still:
        raise DependencyError(f"Still missing after installation: {', '.join(still)}. Restart Slicer and retry.")
    return missing
