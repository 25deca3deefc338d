"""Model bundles: ``bundle.json`` + one ``.safetensors`` file per fold, every file hashed.

A bundle holds everything inference needs (nnU-Net style "plans next to the weights"): the
input modalities and their order, the geometry (atlas spacing, crop size, normalisation
percentiles: DESIGN.md "Geometry is data"), the network hyper-parameters, the folds and the
SHA-256 of each weight file. ``bundle.json`` is validated against ``bundle-schema.json`` (a JSON
Schema shipped beside this module) and every weight file's hash is checked when the bundle is
loaded: a modified or truncated file is refused with an error naming it. Weights are only ever
read with ``safetensors`` (never unpickled).

Layout::

    my-model/
      bundle.json
      fold0.safetensors  fold1.safetensors  ...
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .atomicfile import atomic_path, write_text_atomic
from .network import NetworkConfig, ResidualUNet3D, build_network

BUNDLE_FILE = "bundle.json"
SCHEMA_PATH = Path(__file__).with_name("bundle-schema.json")
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class BundleError(ValueError):
    """A model bundle is missing, malformed or does not match its hashes; the message says which file and the fix."""


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Lowercase hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fold_file_name(fold: int) -> str:
    """Weight file of one fold: ``fold<K>.safetensors``."""
    return f"fold{int(fold)}.safetensors"


def load_schema() -> Dict[str, Any]:
    """The JSON Schema of ``bundle.json``."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_manifest(manifest: Mapping[str, Any], source: str = BUNDLE_FILE) -> None:
    """Validate a ``bundle.json`` dict against the schema and its internal consistency.

    Raises:
        BundleError: naming ``source``, the offending field and the problem.
    """
    import jsonschema

    try:
        jsonschema.validate(dict(manifest), load_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{source} is not a valid model bundle manifest: at {where}: {exc.message}") from None
    expected = {fold_file_name(k) for k in manifest["folds"]}
    missing = sorted(expected - set(manifest["files"]))
    if missing:
        raise BundleError(f"{source} lists folds {manifest['folds']} but no hash for {missing}; re-export the bundle.")
    network = manifest["network"]
    if network["in_channels"] != len(manifest["modalities"]):
        raise BundleError(
            f"{source}: the network takes {network['in_channels']} input channels but {len(manifest['modalities'])} "
            f"modalities are listed ({manifest['modalities']}); re-export the bundle."
        )
    unknown = sorted(set(manifest["modalities"]) - set(manifest["geometry"]["percentiles"]))
    if unknown:
        raise BundleError(f"{source}: no normalisation percentiles for modalities {unknown}; re-export the bundle.")


@dataclass
class ModelBundle:
    """A loaded (validated and hash-checked) model bundle.

    Attributes:
        path: the bundle folder.
        manifest: the parsed ``bundle.json``.
    """

    path: Path
    manifest: Dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def modalities(self) -> List[str]:
        """Input channel order, e.g. ``["t1", "flair", "adc", "t1c"]``."""
        return list(self.manifest["modalities"])

    @property
    def folds(self) -> List[int]:
        return [int(k) for k in self.manifest["folds"]]

    @property
    def spacing(self) -> tuple:
        """Atlas voxel spacing in mm (x, y, z)."""
        return tuple(float(v) for v in self.manifest["geometry"]["spacing"])

    @property
    def crop_size(self) -> tuple:
        """Centre-crop size in voxels (x, y, z)."""
        return tuple(int(v) for v in self.manifest["geometry"]["crop_size"])

    @property
    def percentiles(self) -> Dict[str, tuple]:
        """Per modality ``(low, high)`` brain z-score clip values (train-set 1st/99th percentiles)."""
        return {k: (float(v[0]), float(v[1])) for k, v in self.manifest["geometry"]["percentiles"].items()}

    @property
    def network_config(self) -> NetworkConfig:
        return NetworkConfig.from_dict(self.manifest["network"])

    def geometry(self) -> Any:
        """The bundle geometry as :class:`ContrastAmplifierLib.preprocessing.Geometry`."""
        from .preprocessing import Geometry

        return Geometry(spacing=self.spacing, crop_size=self.crop_size, percentiles=self.percentiles)

    def weight_path(self, fold: int) -> Path:
        if int(fold) not in self.folds:
            raise BundleError(f"bundle {self.name!r} ({self.path}) has folds {self.folds}; fold {fold} does not exist.")
        return self.path / fold_file_name(fold)

    def verify(self) -> None:
        """Re-check every file's SHA-256 (raises :class:`BundleError` naming the first mismatch)."""
        verify_files(self.path, self.manifest["files"])

    def load_state_dict(self, fold: int) -> Dict[str, torch.Tensor]:
        """Weights of one fold (safetensors only, hash re-checked just before reading)."""
        from safetensors.torch import load_file

        path = self.weight_path(fold)
        verify_files(self.path, {path.name: self.manifest["files"][path.name]})
        return load_file(str(path))

    def load_model(self, fold: int, device: Union[str, torch.device] = "cpu") -> ResidualUNet3D:
        """One fold's network in eval mode on ``device``."""
        model = build_network(self.network_config)
        state = self.load_state_dict(fold)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(
                f"{self.weight_path(fold)} does not fit the network described in {self.path / BUNDLE_FILE} ({exc}); re-export the bundle."
            ) from None
        return model.to(device).eval()

    def load_models(self, folds: Optional[Sequence[int]] = None, device: Union[str, torch.device] = "cpu") -> List[ResidualUNet3D]:
        """Networks of ``folds`` (default: all)."""
        return [self.load_model(k, device) for k in (self.folds if folds is None else folds)]


def verify_files(folder: Path, files: Mapping[str, str]) -> None:
    """Check that each ``name -> sha256`` of ``files`` exists in ``folder`` with that hash."""
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise BundleError(f"model bundle file missing: {path}. Re-download or re-export the bundle.")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"model bundle file {path} does not match its SHA-256 in {Path(folder) / BUNDLE_FILE} "
                f"(expected {expected[:12]}..., found {actual[:12]}...): the file was modified or corrupted. "
                "Re-download or re-export the bundle; never edit weight files by hand."
            )


def load_bundle(path: PathLike, verify: bool = True) -> ModelBundle:
    """Read, validate and (by default) hash-check a bundle folder or its ``bundle.json``.

    Raises:
        BundleError: missing folder/manifest, invalid JSON or schema, missing or modified weight file.
    """
    path = Path(path)
    folder = path.parent if path.name == BUNDLE_FILE else path
    manifest_path = folder / BUNDLE_FILE
    if not manifest_path.is_file():
        raise BundleError(f"no {BUNDLE_FILE} in {folder}: point to a model bundle folder (made by `contrast-amplifier-train export`).")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export or re-download the bundle.") from None
    validate_manifest(manifest, str(manifest_path))
    bundle = ModelBundle(path=folder, manifest=manifest)
    if verify:
        bundle.verify()
    return bundle


def write_bundle(
    out_dir: PathLike,
    state_dicts: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    name: str,
    version: str,
    description: str,
    intended_use: str,
    training_data: str,
    modalities: Sequence[str],
    spacing: Sequence[float],
    crop_size: Sequence[int],
    percentiles: Mapping[str, Sequence[float]],
    network: NetworkConfig,
    percentile_levels: Sequence[float] = (1.0, 99.0),
    training: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> ModelBundle:
    """Write ``fold<K>.safetensors`` for each fold and a validated ``bundle.json``; return the loaded bundle.

    Args:
        out_dir: bundle folder (created; existing fold files are overwritten).
        state_dicts: fold index -> network ``state_dict``.
        name, version, description, intended_use, training_data: human-facing metadata.
        modalities: input channel order.
        spacing, crop_size, percentiles, percentile_levels: the preprocessing geometry.
        network: the hyper-parameters the weights belong to.
        training: informative record of how the weights were made.
        extra: further top-level keys allowed by the schema (``license``, ``citation``, ``target``).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, str] = {}
    for fold in sorted(state_dicts):
        file_name = fold_file_name(fold)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dicts[fold].items()}
        with atomic_path(out / file_name, ".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"fold": str(fold), "bundle": name})
        files[file_name] = sha256_file(out / file_name)
    manifest: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "intended_use": intended_use,
        "training_data": training_data,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "modalities": list(modalities),
        "target": "t1c",
        "geometry": {
            "spacing": [float(v) for v in spacing],
            "crop_size": [int(v) for v in crop_size],
            "percentiles": {k: [float(v[0]), float(v[1])] for k, v in percentiles.items()},
            "percentile_levels": [float(v) for v in percentile_levels],
        },
        "network": network.to_dict(),
        "folds": sorted(int(k) for k in state_dicts),
        "files": files,
    }
    if training is not None:
        manifest["training"] = dict(training)
    if extra:
        manifest.update(extra)
    validate_manifest(manifest, str(out / BUNDLE_FILE))
    write_text_atomic(json.dumps(manifest, indent=2) + "\n", out / BUNDLE_FILE)
    return load_bundle(out)
