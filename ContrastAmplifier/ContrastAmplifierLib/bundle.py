"""Model bundles: ``bundle.json`` + one ``.safetensors`` file per fold, every file hashed.

A bundle holds everything inference needs (nnU-Net style "plans next to the weights"): the
input modalities and their order, the geometry (atlas spacing, crop size, normalisation
percentiles: DESIGN.md "Geometry is data"), the network hyper-parameters, the folds and the
SHA-256 of each weight file. :func:`read_manifest` reads and validates ``bundle.json`` alone,
without torch (but with jsonschema, which Slicer does not ship: the Slicer panel describes bundles
with :func:`.registry.read_entry`, plain JSON). A bundle is checked in full before anything uses it
(import, ``models verify``, :func:`load_bundle`, hence ``predict`` before its preprocessing):

* ``bundle.json`` against ``bundle-schema.json`` (a JSON Schema shipped beside this module:
  types and the bounds of every number), then the cross-field rules of :func:`validate_manifest`
  (one weight file per fold and no other, channels = modalities, ordered percentiles, a crop the
  network's downsamplings fit and :data:`MAX_CROP_VOXELS`);
* every weight file's SHA-256;
* every weight file's safetensors header (read without reading a tensor, never unpickled): the
  tensor names, floating dtypes and shapes must be exactly those of the declared network, built
  on PyTorch's ``meta`` device so no memory is allocated.

Every refusal is a :class:`BundleError` naming the file or field and the fix.

Layout::

    my-model/
      bundle.json
      fold0.safetensors  fold1.safetensors  ...
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Union

from ContrastAmplifierCommon.atomicfile import atomic_path, write_text_atomic

if TYPE_CHECKING:  # torch is imported where it is used: `from .bundle import BundleError` stays cheap (Slicer GUI)
    import torch

    from .network import NetworkConfig, ResidualUNet3D

BUNDLE_FILE = "bundle.json"
SCHEMA_PATH = Path(__file__).with_name("bundle-schema.json")
FORMAT_VERSION = 1
#: Largest centre crop (voxels in total) a bundle may declare: 256^3, 3.4x the paper's 160 x 192 x 160.
#: A forward pass keeps about six float32 feature maps of ``base_channels`` channels over the whole
#: crop (stem, residual module, long skip, upsampled, concatenation): ~6 GiB at 256^3 with 16 base
#: channels, before CUDA batches the mirrorings, against ~360 GiB at 1000^3. Refusing the bundle at
#: import beats failing to allocate after a minute of preprocessing. Per-side bounds are in the schema.
MAX_CROP_VOXELS = 256**3
#: Largest safetensors JSON header read (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
#: safetensors dtypes a weight may have (``load_state_dict`` casts them to the network's float32).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
REEXPORT = "re-export the bundle with `contrast-amplifier-train export` (or re-download it)"

PathLike = Union[str, os.PathLike]
Shapes = dict[str, tuple[int, ...]]


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


def load_schema() -> dict[str, Any]:
    """The JSON Schema of ``bundle.json``."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _non_finite(value: Any, where: str) -> Iterator[str]:
    """Paths of NaN/infinite numbers under ``value`` (JSON Schema bounds let NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}/{index}")


def validate_manifest(manifest: Mapping[str, Any], source: str = BUNDLE_FILE) -> None:
    """Validate a ``bundle.json`` dict against the schema and its cross-field rules.

    The schema bounds each number (spacing, crop side, channels, levels); here: one hash per fold
    file and no other file, finite geometry and network numbers, as many input channels as
    modalities, ordered clip percentiles for every modality, every crop side at least the
    network's ``2 ** (levels - 1)`` and at most :data:`MAX_CROP_VOXELS` in total.

    Needs no torch: the network is checked from its ``network`` entry (the schema has already
    refused any entry :class:`~.network.NetworkConfig` would refuse).

    Raises:
        BundleError: naming ``source``, the offending field and the fix.
    """
    import jsonschema

    try:
        jsonschema.validate(dict(manifest), load_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        hint = exc.schema.get("description") if isinstance(exc.schema, dict) else None
        raise BundleError(
            f"{source} is not a valid model bundle manifest: at {where}: {exc.message}" + (f" ({hint})" if hint else "")
            + f"; correct it or {REEXPORT}."
        ) from None

    def refuse(field_name: str, problem: str, fix: str = REEXPORT) -> NoReturn:
        raise BundleError(f"{source}: {field_name}: {problem}; {fix}.")

    expected = {fold_file_name(k) for k in manifest["folds"]}
    missing, extra = sorted(expected - set(manifest["files"])), sorted(set(manifest["files"]) - expected)
    if missing or extra:
        refuse("files", f"folds {manifest['folds']} need exactly {sorted(expected)}; "
               + (f"no hash for {missing}" if missing else f"{extra} belong to no fold"))
    for where in (*_non_finite(manifest["geometry"], "geometry"), *_non_finite(manifest["network"], "network")):
        refuse(where, "is not a finite number")
    network = manifest["network"]
    if network["in_channels"] != len(manifest["modalities"]):
        refuse("network/in_channels", f"the network takes {network['in_channels']} input channels but "
               f"{len(manifest['modalities'])} modalities are listed ({manifest['modalities']})")
    geometry = manifest["geometry"]
    unknown = sorted(set(manifest["modalities"]) - set(geometry["percentiles"]))
    if unknown:
        refuse("geometry/percentiles", f"no normalisation percentiles for modalities {unknown}")
    for name, (low, high) in geometry["percentiles"].items():
        if not low < high:
            refuse(f"geometry/percentiles/{name}", f"low {low} is not below high {high}")
    levels = geometry.get("percentile_levels", [1.0, 99.0])
    if not levels[0] < levels[1]:
        refuse("geometry/percentile_levels", f"{levels} is not LOW < HIGH")
    downsamplings = int(network["levels"]) - 1
    size_multiple = 2**downsamplings  # NetworkConfig.size_multiple, without importing torch
    crop = [int(v) for v in geometry["crop_size"]]
    if min(crop) < size_multiple:
        refuse("geometry/crop_size", f"{crop} has a side below {size_multiple} voxels, the 2**(levels-1) that the "
               f"network's {downsamplings} downsamplings need", "use a larger crop or fewer network levels, and retrain")
    if math.prod(crop) > MAX_CROP_VOXELS:
        refuse("geometry/crop_size", f"{'x'.join(map(str, crop))} = {math.prod(crop):,} voxels exceeds MAX_CROP_VOXELS "
               f"({MAX_CROP_VOXELS:,} = 256^3): a forward pass would not fit in memory",
               "use a smaller crop or a coarser spacing (the paper: 160x192x160 at 1 mm), and retrain")


@functools.lru_cache(maxsize=16)
def network_tensor_shapes(config: NetworkConfig) -> Shapes:
    """Name -> shape of every tensor in the ``state_dict`` of the network ``config`` describes.

    The network is built on PyTorch's ``meta`` device: shapes without memory, whatever its size.
    """
    import torch

    from .network import build_network

    with torch.device("meta"):
        network = build_network(config)
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}


def _file_kind(prefix: bytes) -> str:
    """What a file that is not safetensors most likely is, for the error message."""
    if prefix.startswith(b"PK\x03\x04"):
        return " (it is a ZIP archive, e.g. a torch.save checkpoint)"
    if prefix[:1] == b"\x80":
        return " (it is a Python pickle, e.g. an old-style torch.save file)"
    return ""


def read_safetensors_header(path: PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets); no tensor is read.

    The layout is an 8-byte little-endian header length, the JSON header, then the tensor bytes.
    The header must fit in the file; the library then validates the offsets (``safe_open``), which
    never unpickles anything.

    Raises:
        BundleError: naming the file when it is not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        fix = f"weights are only ever read as safetensors (never unpickled): {REEXPORT}"
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise BundleError(
                f"{path} is not a safetensors file{_file_kind(prefix)}: its header length {length} does not fit "
                f"in the file's {size} bytes; {fix}."
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        with safe_open(str(path), framework="pt"):
            pass
    except (ValueError, SafetensorError) as exc:
        raise BundleError(f"{path} is not a valid safetensors file ({exc}); {fix}.") from None
    return header


def check_weight_file(path: PathLike, expected: Mapping[str, tuple[int, ...]], manifest_path: PathLike) -> None:
    """Check that a weight file holds exactly the tensors ``expected`` (name -> shape), floating point.

    Raises:
        BundleError: naming the file, the first differing tensors and the fix.
    """
    header = read_safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong_shape = [f"{k} {list(tensors[k]['shape'])} (needs {list(expected[k])})"
                   for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k]["shape"]) != tuple(expected[k])]
    wrong_dtype = [f"{k} {v['dtype']}" for k, v in sorted(tensors.items()) if v["dtype"] not in FLOAT_DTYPES]
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", wrong_shape),
        (f"dtypes other than {'/'.join(FLOAT_DTYPES)}", wrong_dtype)) if items]
    if problems:
        raise BundleError(
            f"{path} does not hold the weights of the network declared in {manifest_path} ({'; '.join(problems)}); "
            f"the weights belong to another network or were altered: {REEXPORT}."
        )


@dataclass
class ModelBundle:
    """A loaded (validated and hash-checked) model bundle.

    Attributes:
        path: the bundle folder.
        manifest: the parsed ``bundle.json``.
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def modalities(self) -> list[str]:
        """Input channel order, e.g. ``["t1", "flair", "adc", "t1c"]``."""
        return list(self.manifest["modalities"])

    @property
    def folds(self) -> list[int]:
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
    def percentiles(self) -> dict[str, tuple]:
        """Per modality ``(low, high)`` brain z-score clip values (train-set 1st/99th percentiles)."""
        return {k: (float(v[0]), float(v[1])) for k, v in self.manifest["geometry"]["percentiles"].items()}

    @property
    def network_config(self) -> NetworkConfig:
        from .network import NetworkConfig

        return NetworkConfig.from_dict(self.manifest["network"])

    def geometry(self) -> Any:
        """The bundle geometry as :class:`ContrastAmplifierLib.preprocessing.Geometry`."""
        from .preprocessing import Geometry

        return Geometry(spacing=self.spacing, crop_size=self.crop_size, percentiles=self.percentiles)

    def weight_path(self, fold: int) -> Path:
        if int(fold) not in self.folds:
            raise BundleError(f"bundle {self.name!r} ({self.path}) has folds {self.folds}; fold {fold} does not exist.")
        return self.path / fold_file_name(fold)

    def _check_file(self, name: str) -> None:
        """One weight file: its SHA-256, then its safetensors header against the network."""
        verify_files(self.path, {name: self.manifest["files"][name]})
        check_weight_file(self.path / name, network_tensor_shapes(self.network_config), self.path / BUNDLE_FILE)

    def verify(self) -> None:
        """Re-check every weight file (hash and tensors); raises :class:`BundleError` naming the first bad one."""
        for name in self.manifest["files"]:
            self._check_file(name)

    def load_state_dict(self, fold: int) -> dict[str, torch.Tensor]:
        """Weights of one fold (safetensors only, file re-checked just before reading)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.weight_path(fold)
        self._check_file(path.name)
        try:
            return load_file(str(path))
        except SafetensorError as exc:  # the file changed since it was checked
            raise BundleError(f"{path} could not be read ({exc}); {REEXPORT}.") from None

    def load_model(self, fold: int, device: Union[str, torch.device] = "cpu") -> ResidualUNet3D:
        """One fold's network in eval mode on ``device``."""
        from .network import build_network

        model = build_network(self.network_config)
        state = self.load_state_dict(fold)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(
                f"{self.weight_path(fold)} does not fit the network described in {self.path / BUNDLE_FILE} ({exc}); {REEXPORT}."
            ) from None
        return model.to(device).eval()

    def load_models(self, folds: Optional[Sequence[int]] = None, device: Union[str, torch.device] = "cpu") -> list[ResidualUNet3D]:
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


def manifest_path_of(path: PathLike) -> Path:
    """The ``bundle.json`` of a bundle given by its folder or by the manifest itself."""
    path = Path(path)
    return path if path.name == BUNDLE_FILE else path / BUNDLE_FILE


def read_manifest(path: PathLike) -> dict[str, Any]:
    """Read and validate a bundle's ``bundle.json`` (schema and cross-field rules); no weight file is read.

    Cheap and torch-free, but needs jsonschema (a first-use package in Slicer; the panel reads
    folds and geometry with :func:`.registry.read_entry` instead); :func:`load_bundle` adds the
    weight checks.

    Args:
        path: the bundle folder or its ``bundle.json``.

    Returns:
        The manifest as a dict (see ``bundle-schema.json``).

    Raises:
        BundleError: no manifest, invalid JSON, not an object, or a schema or cross-field rule
            broken; the message names the file, the field and the fix.
    """
    manifest_path = manifest_path_of(path)
    if not manifest_path.is_file():
        raise BundleError(f"no {BUNDLE_FILE} in {manifest_path.parent}: point to a model bundle folder "
                          "(made by `contrast-amplifier-train export`).")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); {REEXPORT}.") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} is not a JSON object; {REEXPORT}.")
    validate_manifest(manifest, str(manifest_path))
    return manifest


def load_bundle(path: PathLike, verify: bool = True) -> ModelBundle:
    """Read and validate a bundle folder or its ``bundle.json``; by default check every weight file too.

    Args:
        path: the bundle folder or its ``bundle.json``.
        verify: check every weight file's SHA-256 and tensors now (``False``: only when a fold is loaded).

    Raises:
        BundleError: missing folder/manifest, invalid JSON, schema or cross-field rule, missing,
            modified or non-safetensors weight file, weights of another network.
    """
    manifest = read_manifest(path)
    bundle = ModelBundle(path=manifest_path_of(path).parent, manifest=manifest)
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
    files: dict[str, str] = {}
    for fold in sorted(state_dicts):
        file_name = fold_file_name(fold)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dicts[fold].items()}
        with atomic_path(out / file_name, ".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"fold": str(fold), "bundle": name})
        files[file_name] = sha256_file(out / file_name)
    manifest: dict[str, Any] = {
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
