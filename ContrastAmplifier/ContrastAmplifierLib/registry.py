"""Model registry: where bundles live and how they are found, listed, verified and imported.

Two places are searched, in order:

1. the per-user models folder (``platformdirs.user_data_dir("SlicerContrastAmplifier")/models``,
   or ``$CONTRAST_AMPLIFIER_MODELS`` when set), where ``contrast-amplifier models import`` puts
   bundles after verifying their SHA-256;
2. the bundles shipped with the extension under ``Resources/Models/`` (the synthetic phantom
   demo), listed in ``Resources/Models/Models.json``.

A user bundle with the same name as a shipped one wins, so a retrained model can replace the demo.
Every bundle is hash-checked when it is loaded (:func:`ContrastAmplifierLib.bundle.load_bundle`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

if TYPE_CHECKING:  # bundle.py imports torch: keep listing models cheap inside Slicer's GUI process
    from .bundle import ModelBundle

BUNDLE_FILE = "bundle.json"
APP_NAME = "SlicerContrastAmplifier"
ENV_MODELS = "CONTRAST_AMPLIFIER_MODELS"
REGISTRY_FILE = "Models.json"


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
    folds: Tuple[int, ...] = ()


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


def _builtin_folders() -> List[Path]:
    root = builtin_models_dir()
    if root is None:
        return []
    registry = json.loads((root / REGISTRY_FILE).read_text(encoding="utf-8"))
    return [root / item["folder"] for item in registry.get("models", [])]


def list_models() -> List[ModelEntry]:
    """Every bundle found: user bundles first, then shipped ones not overridden by name."""
    entries: List[ModelEntry] = []
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


def default_model_name() -> str:
    """The model used when none is named: the first listed (a user bundle, else the demo)."""
    from .bundle import BundleError

    entries = list_models()
    if not entries:
        raise BundleError(
            "no model bundle installed: import one with `contrast-amplifier models import BUNDLE_DIR_OR_ZIP` "
            f"(or set ${ENV_MODELS} to a folder of bundles)."
        )
    return entries[0].name


def resolve_model(name_or_path: Optional[str] = None) -> "ModelBundle":
    """Load (and hash-check) a bundle given by registry name or by folder path; default model if ``None``."""
    from .bundle import BundleError, load_bundle

    if name_or_path is None:
        name_or_path = default_model_name()
    candidate = Path(name_or_path)
    if (candidate / BUNDLE_FILE).is_file() or candidate.name == BUNDLE_FILE:
        return load_bundle(candidate)
    for entry in list_models():
        if entry.name == name_or_path:
            return load_bundle(entry.path)
    known = ", ".join(e.name for e in list_models()) or "none"
    raise BundleError(
        f"unknown model {name_or_path!r} (installed: {known}). List them with `contrast-amplifier models list` "
        "or pass a bundle folder path."
    )


def verify_models() -> List[tuple]:
    """``(entry, error_or_None)`` for every listed bundle, after a full hash check."""
    from .bundle import BundleError, load_bundle

    results = []
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


def import_model(source: Union[str, os.PathLike], overwrite: bool = False) -> "ModelBundle":
    """Verify a bundle folder or ``.zip`` and copy it into the per-user models folder.

    The copy goes to a temporary folder first and is renamed into place, so an interrupted import
    leaves no half-copied bundle. Refuses a bundle whose hashes do not match.
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
        bundle = load_bundle(root)  # validates and hash-checks before anything is installed
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
