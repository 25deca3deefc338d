"""Model registry: where bundles live and how they are found, listed, verified and imported.

Two places are searched, in order:

1. the per-user models folder (``platformdirs.user_data_dir("SlicerContrastAmplifier")/models``,
   or ``$CONTRAST_AMPLIFIER_MODELS`` when set), where ``contrast-amplifier models import`` puts
   bundles after verifying their SHA-256;
2. the bundles shipped with the extension under ``Resources/Models/`` (the synthetic phantom
   demo), listed in ``Resources/Models/Models.json``.

A user bundle with the same name as a shipped one wins, so a retrained model can replace the demo.
Every bundle is checked in full (manifest, hashes, tensors) when it is imported and when it is
loaded (:func:`ContrastAmplifierLib.bundle.load_bundle`).

The default model (used when none is named) is explicit: the first bundle of ``Models.json``
(the shipped demo) unless the user chose another with ``contrast-amplifier models set-default
NAME``, stored in ``.default.json`` in the per-user folder. Importing never changes it, and a chosen
default that is no longer installed is an error naming it, never a silent fall-back to another.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # loading a bundle imports torch: listing models and the default stays cheap (Slicer GUI)
    from .bundle import ModelBundle

BUNDLE_FILE = "bundle.json"
DEFAULT_FILE = ".default.json"  # hidden: never taken for a bundle folder, never a bundle name
APP_NAME = "SlicerContrastAmplifier"
ENV_MODELS = "CONTRAST_AMPLIFIER_MODELS"
REGISTRY_FILE = "Models.json"
SET_DEFAULT_FIX = ("choose one with `contrast-amplifier models set-default NAME`, or go back to the shipped one with "
                   "`contrast-amplifier models set-default --shipped`")


def user_models_dir() -> Path:
    """The per-user models folder (created on first use, never at import)."""
    override = os.environ.get(ENV_MODELS)
    if override:
        return Path(override)
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False)) / "models"


def builtin_models_dir() -> Optional[Path]:
    """``Resources/Models`` of the extension: found above this package (source tree, editable
    install, or the Slicer extension layout); ``None`` when not shipped (plain wheel)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "Resources" / "Models"
        if (candidate / REGISTRY_FILE).is_file():
            return candidate
    return None


@dataclass(frozen=True)
class ModelEntry:
    """One bundle known to the registry (not loaded, not hash-checked)."""

    name: str
    version: str
    description: str
    intended_use: str
    path: Path
    source: str  # "user" or "builtin"
    folds: tuple[int, ...] = ()


def _entry(folder: Path, source: str) -> Optional[ModelEntry]:
    manifest_path = folder / BUNDLE_FILE
    if not manifest_path.is_file():
        return None
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ModelEntry(folder.name, "?", f"unreadable {BUNDLE_FILE}", "?", folder, source)
    folds = data.get("folds", [])
    return ModelEntry(
        name=str(data.get("name", folder.name)),
        version=str(data.get("version", "?")),
        description=str(data.get("description", "")),
        intended_use=str(data.get("intended_use", "")),
        path=folder,
        source=source,
        folds=tuple(int(k) for k in folds) if isinstance(folds, list) else (),
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
            entry = _entry(folder, "user")
            if entry is not None:
                entries.append(entry)
    names = {e.name for e in entries}
    for folder in _builtin_folders():
        entry = _entry(folder, "builtin")
        if entry is not None and entry.name not in names:
            entries.append(entry)
    return entries


def default_model_file() -> Path:
    """``.default.json`` in the per-user models folder: the default chosen with ``models set-default``."""
    return user_models_dir() / DEFAULT_FILE


def shipped_default_name() -> Optional[str]:
    """The extension's own default: the first bundle listed in ``Models.json`` (``None`` in a plain wheel)."""
    for folder in _builtin_folders():
        entry = _entry(folder, "builtin")
        if entry is not None:
            return entry.name
    return None


def chosen_default_name() -> Optional[str]:
    """The default the user chose with ``models set-default`` (``None`` when none was chosen).

    Raises:
        BundleError: ``.default.json`` is unreadable; the message names it and the fix.
    """
    from .bundle import BundleError

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
    from .bundle import BundleError

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
    from .bundle import BundleError

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
    from .bundle import BundleError, load_bundle

    results: list[tuple[ModelEntry, Optional[str]]] = []
    for entry in list_models():
        try:
            load_bundle(entry.path)
            results.append((entry, None))
        except BundleError as exc:
            results.append((entry, str(exc)))
    return results


def _find_bundle_root(folder: Path) -> Path:
    from .bundle import BundleError

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
    from .bundle import BundleError

    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            resolved = (target / member).resolve()
            if not str(resolved).startswith(str(target.resolve())):
                raise BundleError(f"{archive} holds an unsafe path {member!r}; refusing to extract it.")
        zf.extractall(target)


def import_model(source: Union[str, os.PathLike], overwrite: bool = False) -> ModelBundle:
    """Check a bundle folder or ``.zip`` in full and copy it into the per-user models folder.

    The copy goes to a temporary folder first and is renamed into place, so an interrupted import
    leaves no half-copied bundle. Refuses a bundle that :func:`~.bundle.load_bundle` refuses
    (manifest, hashes, tensors). Never changes the default model (:func:`set_default_model` does).
    """
    from .bundle import BundleError, load_bundle

    source = Path(source)
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
            raise BundleError(f"a model named {bundle.name!r} is already installed at {target}; pass --overwrite to replace it.")
        staged = scratch_path / "staged"
        staged.mkdir()
        for name in [BUNDLE_FILE, *bundle.manifest["files"]]:
            shutil.copy2(root / name, staged / name)
        load_bundle(staged)  # the copy is intact
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return load_bundle(target)
