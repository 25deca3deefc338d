"""Model registry: where bundles live and how they are found, listed, verified and imported.

Two places are searched, in order:

1. the per-user models folder (``<per-user data folder>/SlicerContrastAmplifier/models``, see
   :func:`user_data_dir`, or ``$CONTRAST_AMPLIFIER_MODELS`` when set), where ``contrast-amplifier
   models import`` and the module's "Add model" button put bundles after verifying their SHA-256;
2. the bundles shipped with the extension in the module's own resources,
   ``<folder holding ContrastAmplifierLib>/Resources/Models/`` (the synthetic phantom demo: in the
   source tree ``ContrastAmplifier/Resources/Models``, in an installed Slicer extension
   ``lib/Slicer-X.Y/qt-scripted-modules/Resources/Models``), listed in its ``Models.json``.

A user bundle with the same name as a shipped one wins, so a retrained model can replace the demo.
Every bundle is checked in full (manifest, hashes, tensors) when it is imported and when it is
loaded (:func:`ContrastAmplifierLib.bundle.load_bundle`). Listing reads each ``bundle.json`` as
plain JSON (:func:`read_entry`) and needs nothing beyond the standard library: the Slicer panel
lists models before the first-use install of the Python packages (platformdirs, jsonschema,
torch).

The default model (used when none is named) is explicit: the first bundle of ``Models.json``
(the shipped demo) unless the user chose another with ``contrast-amplifier models set-default
NAME``, stored in ``.default.json`` in the per-user folder. Importing never changes it, and a chosen
default that is no longer installed is an error naming it, never a silent fall-back to another.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .bundle import BundleError  # the bundle module imports only the standard library at import time

if TYPE_CHECKING:  # loading a bundle imports torch: listing models and the default stays cheap (Slicer GUI)
    from .bundle import ModelBundle

BUNDLE_FILE = "bundle.json"
DEFAULT_FILE = ".default.json"  # hidden: never taken for a bundle folder, never a bundle name
APP_NAME = "SlicerContrastAmplifier"
ENV_MODELS = "CONTRAST_AMPLIFIER_MODELS"
REGISTRY_FILE = "Models.json"
SET_DEFAULT_FIX = ("choose one with `contrast-amplifier models set-default NAME`, or go back to the shipped one with "
                   "`contrast-amplifier models set-default --shipped`")


def _fallback_user_data_dir(app_name: str, platform: Optional[str] = None) -> Path:
    """The per-user data folder ``platformdirs.user_data_dir(app_name, appauthor=False)`` gives, without platformdirs.

    * Linux and other Unix: ``$XDG_DATA_HOME/<app>`` when that is an absolute path, else
      ``~/.local/share/<app>``;
    * macOS: ``~/Library/Application Support/<app>`` (``$XDG_DATA_HOME/<app>`` when set to an
      absolute path, as recent platformdirs releases do);
    * Windows: ``%LOCALAPPDATA%\\<app>`` (``~\\AppData\\Local\\<app>`` when the variable is unset).
    """
    platform = sys.platform if platform is None else platform
    if platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return Path(os.path.normpath(base)) / app_name
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / app_name
    if platform == "darwin":
        return Path(os.path.expanduser("~/Library/Application Support")) / app_name
    return Path(os.path.expanduser("~/.local/share")) / app_name


def user_data_dir() -> Path:
    """The per-user data folder of the extension (``.../SlicerContrastAmplifier``).

    platformdirs decides when it is installed (the command line, and Slicer after the first-use
    install); before that (Slicer ships no platformdirs) :func:`_fallback_user_data_dir` computes
    the same folder, so bundles imported either way are found either way.
    """
    try:
        from platformdirs import user_data_dir as platform_user_data_dir
    except ImportError:
        return _fallback_user_data_dir(APP_NAME)
    return Path(platform_user_data_dir(APP_NAME, appauthor=False))


def user_models_dir() -> Path:
    """The per-user models folder (created on first use, never at import)."""
    override = os.environ.get(ENV_MODELS)
    if override:
        return Path(override)
    return user_data_dir() / "models"


def builtin_models_dir() -> Optional[Path]:
    """The models shipped with the extension: ``Resources/Models`` beside this package, or ``None``.

    The module's resources sit next to its Lib package: ``ContrastAmplifier/Resources/Models`` in
    the source tree (and an editable install), ``qt-scripted-modules/Resources/Models`` in an
    installed Slicer extension (``ContrastAmplifier/CMakeLists.txt`` lists each file). Only that
    one folder is looked at; a plain wheel ships no models (``None``).
    """
    candidate = Path(__file__).resolve().parent.parent / "Resources" / "Models"
    return candidate if (candidate / REGISTRY_FILE).is_file() else None


@dataclass(frozen=True)
class ModelEntry:
    """One bundle known to the registry, from its ``bundle.json`` read as plain JSON (not validated,
    not hash-checked: :func:`~.bundle.load_bundle` does that before the bundle is used).

    Attributes:
        name, version, description, intended_use: from the manifest (``"?"``/empty when absent).
        path: the bundle folder.
        source: ``"user"``, ``"builtin"`` or ``"path"`` (a folder named directly).
        folds: fold indices.
        spacing: voxel size of the network's grid, mm (x, y, z); empty when unreadable.
        crop_size: the network's input size, voxels (x, y, z); empty when unreadable.
    """

    name: str
    version: str
    description: str
    intended_use: str
    path: Path
    source: str
    folds: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    crop_size: tuple[int, ...] = ()


def _numbers(value: object, kind: type) -> tuple:
    """``value`` as a tuple of ``kind`` (int or float), or ``()`` when it is not a list of numbers."""
    if not isinstance(value, list):
        return ()
    try:
        return tuple(kind(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError):
        return ()


def read_entry(folder: Union[str, os.PathLike], source: str = "path") -> Optional[ModelEntry]:
    """The :class:`ModelEntry` of a bundle folder from its ``bundle.json`` (plain JSON, standard library only).

    Cheap and dependency-free, for listings and the Slicer panel (name, version, geometry, folds,
    intended use) before any package is installed; never a substitute for
    :func:`~.bundle.load_bundle`'s full check. ``None`` when the folder holds no ``bundle.json``; an
    unreadable one gives an entry whose description says so (and no folds).
    """
    folder = Path(folder)
    manifest_path = folder / BUNDLE_FILE
    if not manifest_path.is_file():
        return None
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        return ModelEntry(folder.name, "?", f"unreadable {BUNDLE_FILE}", "?", folder, source)
    geometry = data.get("geometry")
    if not isinstance(geometry, dict):
        geometry = {}
    return ModelEntry(
        name=str(data.get("name", folder.name)),
        version=str(data.get("version", "?")),
        description=str(data.get("description", "")),
        intended_use=str(data.get("intended_use", "")),
        path=folder,
        source=source,
        folds=_numbers(data.get("folds"), int),
        spacing=_numbers(geometry.get("spacing"), float),
        crop_size=_numbers(geometry.get("crop_size"), int),
    )



def _builtin_folders() -> list[Path]:
    root = builtin_models_dir()
    if root is None:
        return []
    registry = json.loads((root / REGISTRY_FILE).read_text(encoding="utf-8"))
    return [root / item["folder"] for item in registry.get("models", [])]


def list_models() -> list[ModelEntry]:
    """Every bundle found: user bundles first, then shipped ones not overridden by name."""
    entries: list[ModelEntry] = []
    user_dir = user_models_dir()
    if user_dir.is_dir():
        for folder in sorted(p for p in user_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = read_entry(folder, "user")
            if entry is not None:
                entries.append(entry)
    names = {e.name for e in entries}
    for folder in _builtin_folders():
        entry = read_entry(folder, "builtin")
        if entry is not None and entry.name not in names:
            entries.append(entry)
    return entries


def default_model_file() -> Path:
    """``.default.json`` in the per-user models folder: the default chosen with ``models set-default``."""
    return user_models_dir() / DEFAULT_FILE


def shipped_default_name() -> Optional[str]:
    """The extension's own default: the first bundle listed in ``Models.json`` (``None`` in a plain wheel)."""
    for folder in _builtin_folders():
        entry = read_entry(folder, "builtin")
        if entry is not None:
            return entry.name
    return None


def chosen_default_name() -> Optional[str]:
    """The default the user chose with ``models set-default`` (``None`` when none was chosen).

    Raises:
        BundleError: ``.default.json`` is unreadable; the message names it and the fix.
    """
    path = default_model_file()
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["default"]
        if not isinstance(name, str):
            raise TypeError(f"'default' is {name!r}, not a model name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is unreadable ({exc}); delete it or {SET_DEFAULT_FIX}.") from None
    return name


def default_model_name() -> str:
    """The model used when none is named: the one chosen with ``models set-default``, else the shipped one.

    Raises:
        BundleError: the chosen default is no longer installed, or no default exists (a plain
            wheel without shipped bundles and none chosen); the message names the model and the fix.
    """
    chosen = chosen_default_name()
    installed = [e.name for e in list_models()]
    if chosen is not None:
        if chosen not in installed:
            raise BundleError(
                f"the default model {chosen!r} (chosen in {default_model_file()}) is not installed "
                f"(installed: {', '.join(installed) or 'none'}); import it again with "
                f"`contrast-amplifier models import BUNDLE_DIR_OR_ZIP`, or {SET_DEFAULT_FIX}."
            )
        return chosen
    shipped = shipped_default_name()
    if shipped is None:
        raise BundleError(
            f"no default model: none is shipped with this installation and none was chosen (installed: "
            f"{', '.join(installed) or 'none'}); import one with `contrast-amplifier models import BUNDLE_DIR_OR_ZIP` "
            f"and choose it with `contrast-amplifier models set-default NAME`, or name a model explicitly "
            f"(or set ${ENV_MODELS} to a folder of bundles)."
        )
    return shipped


def set_default_model(name: Optional[str]) -> Optional[str]:
    """Make the installed model ``name`` the default (checked in full first); ``None``: back to the shipped one.

    The choice is written atomically to :func:`default_model_file`.

    Returns:
        The default model now in force (``None``: back to the shipped default and none is shipped).

    Raises:
        BundleError: ``name`` is not installed or does not pass :func:`~.bundle.load_bundle`.
    """
    from ContrastAmplifierCommon.atomicfile import write_text_atomic
    from .bundle import load_bundle

    if name is None:
        default_model_file().unlink(missing_ok=True)
        return shipped_default_name()
    load_bundle(_find_entry(name, "or import it first with `contrast-amplifier models import BUNDLE_DIR_OR_ZIP`").path)
    write_text_atomic(json.dumps({"default": name}, indent=2) + "\n", default_model_file())
    return name


def _find_entry(name: str, fix: str = "or pass a bundle folder path") -> ModelEntry:
    """The listed bundle called ``name``; :class:`~.bundle.BundleError` naming the installed ones and ``fix`` otherwise."""
    entries = list_models()
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in entries) or "none"
    raise BundleError(
        f"unknown model {name!r} (installed: {known}). List them with `contrast-amplifier models list` {fix}."
    )


def resolve_model(name_or_path: Optional[str] = None) -> ModelBundle:
    """Load (and check in full) a bundle given by registry name or by folder path; default model if ``None``."""
    from .bundle import load_bundle

    if name_or_path is None:  # a registry name, even if a folder of that name is in the working directory
        return load_bundle(_find_entry(default_model_name()).path)
    candidate = Path(name_or_path)
    if (candidate / BUNDLE_FILE).is_file() or candidate.name == BUNDLE_FILE:
        return load_bundle(candidate)
    return load_bundle(_find_entry(name_or_path).path)


def verify_models() -> list[tuple[ModelEntry, Optional[str]]]:
    """``(entry, error_or_None)`` for every listed bundle, after a full check (manifest, hashes, tensors)."""
    from .bundle import load_bundle

    results: list[tuple[ModelEntry, Optional[str]]] = []
    for entry in list_models():
        try:
            load_bundle(entry.path)
            results.append((entry, None))
        except BundleError as exc:
            results.append((entry, str(exc)))
    return results


class ModelAlreadyInstalledError(BundleError):
    """:func:`import_model` without ``overwrite``: a model of that name is installed already.

    Attributes:
        name: the model's name.
        path: its folder in the per-user models folder.
    """

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(f"a model named {name!r} is already installed at {path}; pass --overwrite to replace it.")
        self.name = name
        self.path = path


def _find_bundle_root(folder: Path) -> Path:
    if (folder / BUNDLE_FILE).is_file():
        return folder
    candidates = [p.parent for p in folder.rglob(BUNDLE_FILE)]
    if len(candidates) != 1:
        raise BundleError(
            f"expected exactly one {BUNDLE_FILE} in the imported archive, found {len(candidates)}; "
            "zip a single bundle folder."
        )
    return candidates[0]


def _safe_extract(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            resolved = (target / member).resolve()
            if not str(resolved).startswith(str(target.resolve())):
                raise BundleError(f"{archive} holds an unsafe path {member!r}; refusing to extract it.")
        zf.extractall(target)


def import_model(source: Union[str, os.PathLike], overwrite: bool = False) -> ModelBundle:
    """Check a bundle folder (or its ``bundle.json``) or ``.zip`` in full and copy it into the per-user models folder.

    The copy goes to a temporary folder first and is renamed into place, so an interrupted import
    leaves no half-copied bundle. Refuses a bundle that :func:`~.bundle.load_bundle` refuses
    (manifest, hashes, tensors). Never changes the default model (:func:`set_default_model` does).

    Raises:
        ModelAlreadyInstalledError: a model of that name is installed and ``overwrite`` is False.
        BundleError: the source is missing or refused; the message names the file and the fix.
    """
    from .bundle import load_bundle

    source = Path(source)
    if source.name == BUNDLE_FILE and source.is_file():
        source = source.parent
    if not source.exists():
        raise BundleError(f"model bundle to import not found: {source}")
    destination_root = user_models_dir()
    destination_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=destination_root) as scratch:
        scratch_path = Path(scratch)
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise BundleError(f"{source} is neither a bundle folder nor a .zip archive.")
            _safe_extract(source, scratch_path / "unzipped")
            root = _find_bundle_root(scratch_path / "unzipped")
        else:
            root = _find_bundle_root(source)
        try:
            bundle = load_bundle(root)  # checked in full before anything is installed
        except BundleError as exc:
            raise BundleError(f"{source} was not imported: {exc}") from None
        target = destination_root / bundle.name
        if target.exists() and not overwrite:
            raise ModelAlreadyInstalledError(bundle.name, target)
        staged = scratch_path / "staged"
        staged.mkdir()
        for name in [BUNDLE_FILE, *bundle.manifest["files"]]:
            shutil.copy2(root / name, staged / name)
        load_bundle(staged)  # the copy is intact
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return load_bundle(target)
