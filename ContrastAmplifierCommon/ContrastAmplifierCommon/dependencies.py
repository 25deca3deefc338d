"""Install the Lib's Python packages into Slicer's Python on first use, after asking the user.

Never runs at import time: a module calls :func:`ensure_dependencies` when the user first
presses a button that needs the packages (or a batch script calls it). The list of
requirements lives in one place, ``requirements.txt`` next to this file (the same list as
``pyproject.toml``; a test keeps them equal).

Inside Slicer:

* ``torch`` comes from the PyTorch extension (``PyTorchUtils``), which picks the right CUDA or
  CPU build for the machine; plain ``pip install torch`` could pull a multi-GB wrong build.
* ``SimpleITK`` ships with Slicer and must not be replaced by pip.
* Everything else goes through ``slicer.pydeps.pip_ensure`` (Slicer >= 5.11) or
  ``slicer.util.pip_install`` (older versions).

Outside Slicer the project is installed with pip (``pip install -e .``), so nothing here runs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

#: The single list of requirements (pip specifier per line, ``#`` comments allowed).
REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")

#: Distribution name of the project, used when the requirements file is absent (wheel install).
DISTRIBUTION = "slicer-contrast-amplifier"

#: Packages Slicer provides itself: never pip-installed into Slicer.
SLICER_PROVIDED = ("SimpleITK", "vtk")

#: Installed through the PyTorch extension when it is available.
TORCH = "torch"

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
    except ImportError:  # no 'packaging': presence is the best we can check
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


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


def slicer_pip_installer(requester: str = "ContrastAmplifier") -> Installer:
    """An installer that uses Slicer's own pip wrappers (needs the Slicer application)."""

    def install(requirements: list[str]) -> None:
        import slicer

        pydeps = getattr(slicer, "pydeps", None)
        if pydeps is None:
            try:
                pydeps = importlib.import_module("slicer.pydeps")
            except ImportError:
                pydeps = None
        if pydeps is not None and hasattr(pydeps, "pip_ensure"):
            from packaging.requirements import Requirement

            pydeps.pip_ensure([Requirement(r) for r in requirements], skip_packages=list(SLICER_PROVIDED) + [TORCH], requester=requester)
            return
        try:
            slicer.util.pip_install(requirements)
        except TypeError:  # older Slicer: one space-separated string
            slicer.util.pip_install(" ".join(requirements))

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


def ensure_dependencies(
    requirements: Optional[Iterable[str]] = None,
    confirm: Optional[ConfirmCallback] = None,
    installer: Optional[Installer] = None,
    torch_installer: Optional[Callable[[str], bool]] = None,
    module_title: str = "Contrast Amplifier",
) -> list[str]:
    """Make sure every requirement is importable, installing the missing ones after confirmation.

    Args:
        requirements: specifiers; default :func:`load_requirements`.
        confirm: shows the message and returns True to go ahead (in Slicer:
            ``slicer.util.confirmOkCancelDisplay``). ``None`` (batch mode) logs the message and
            installs.
        installer: installs a list of specifiers; default Slicer's pip wrappers.
        torch_installer: installs torch (PyTorch extension); returns False if unavailable, in
            which case torch goes through ``installer`` like the rest.
        module_title: module name used in the message.

    Returns:
        The requirements that were installed (empty if nothing was missing).

    Raises:
        DependencyError: the user declined, or packages are still missing after installing.
    """
    missing = missing_requirements(requirements)
    if not missing:
        return []
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
        installer = slicer_pip_installer(module_title.replace(" ", ""))
    if torch_installer is None and _in_slicer():
        torch_installer = slicer_torch_installer

    rest = [r for r in missing if _canonical(_name(r)) not in {_canonical(n) for n in SLICER_PROVIDED}]
    provided = [r for r in missing if r not in rest]
    torch_reqs = [r for r in rest if _canonical(_name(r)) == TORCH]
    if torch_reqs and torch_installer is not None and torch_installer(torch_reqs[0]):
        rest = [r for r in rest if r not in torch_reqs]
    if rest:
        logger.info("Installing %s", " ".join(rest))
        installer(rest)
    importlib.invalidate_caches()
    still = missing_requirements(missing)
    if still:
        hint = ""
        if any(r in provided for r in still):
            hint = " SimpleITK/VTK come with Slicer: update Slicer to a version that ships the required release."
        raise DependencyError(f"Still missing after installation: {', '.join(still)}. Restart Slicer and retry.{hint}")
    return missing
