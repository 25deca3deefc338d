"""The worklist loop against a real Orthanc: a phantom case stored as four DICOM series is fetched,
amplified and its T1c-pro series sent back into the same study (``contrast-amplifier pacs amplify``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dicom_series import write_t1c_series  # noqa: E402  (a scanner-like MR series writer)

from ContrastAmplifierLib import pacs  # noqa: E402

#: Descriptions as a scanner names them; the default rules must pick each input.
DESCRIPTIONS = {"t1": ("T1 MPRAGE", 2), "flair": ("AX T2 FLAIR", 3), "adc": ("ADC (10^-6 mm2/s)", 4),
                "t1c": ("T1 MPRAGE post Gd", 5)}
STUDY_UID = "1.2.826.0.1.3680043.8.498.7707"


def _store_case(case_dir: Path, root: Path, pacs_server) -> None:
    """Write the phantom's four inputs as DICOM series of one study and STOW them into the PACS."""
    for name, (description, number) in DESCRIPTIONS.items():
        image = sitk.ReadImage(str(case_dir / f"{name}.nii.gz"), sitk.sitkFloat32)
        array = np.clip(np.rint(sitk.GetArrayFromImage(image)), 0, 65535).astype(np.uint16)
        write_t1c_series(root / name, array, spacing=image.GetSpacing(), origin=image.GetOrigin(),
                         rotation=np.asarray(image.GetDirection()).reshape(3, 3), series_number=number,
                         study_uid=STUDY_UID, description=description,
                         series_uid=f"{STUDY_UID}.{number}")
    endpoint = pacs.resolve_endpoint(pacs_server.credentials_url)
    assert pacs.send_instances(root, endpoint).ok


def _amplify(out: Path, pacs_server, bundle: Path, mask: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "pacs", "amplify", STUDY_UID, str(out),
           "--from", pacs_server.dicomweb_url, "--model", str(bundle), "--folds", "0", "--flips", "1", "--device", "cpu",
           "--threads", "1", "--brain-mask", str(mask), "--progress", "none", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CA_PACS_USER": pacs_server.user, "CA_PACS_PASSWORD": pacs_server.password}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_fetch_amplify_and_send_back_into_the_same_study(empty_orthanc, small_case_dir, random_bundle_dir, tmp_path):
    _store_case(small_case_dir, tmp_path / "scanner", empty_orthanc)
    stored = empty_orthanc.instance_count()
    out = tmp_path / "worklist" / "case001"
    mask = small_case_dir / "brain_mask.nii.gz"  # on the T1c grid: the DICOM T1c keeps the NIfTI's geometry
    done = _amplify(out, empty_orthanc, random_bundle_dir, mask)
    assert done.returncode == 0, done.stderr
    assert empty_orthanc.password not in done.stdout + done.stderr
    series = sorted((out / "T1c-pro-dicom").iterdir())
    n = len(series)
    assert n == sitk.ReadImage(str(small_case_dir / "t1c.nii.gz")).GetSize()[2]
    assert f"sent {n} of {n} instances to" in done.stdout and "inputs fetched" in done.stdout
    # The PACS holds T1c-pro as a fifth series of the same study, on the T1c's frame of reference.
    assert empty_orthanc.instance_count() == stored + n
    studies = empty_orthanc.rest("/studies")
    assert len(studies) == 1
    descriptions = {empty_orthanc.rest(f"/series/{s}")["MainDicomTags"].get("SeriesDescription", "")
                    for s in empty_orthanc.rest(f"/studies/{studies[0]}")["Series"]}
    assert {d for d, _ in DESCRIPTIONS.values()} < descriptions
    assert any(d.startswith("T1c-pro (contrast amplified, random-tiny") for d in descriptions)
    first = pydicom.dcmread(str(series[0]))
    t1c = pydicom.dcmread(str(sorted((out / "inputs" / "t1c").iterdir())[0]), stop_before_pixels=True)
    assert (first.StudyInstanceUID, first.FrameOfReferenceUID) == (STUDY_UID, t1c.FrameOfReferenceUID)
    # T1c-pro equals what `predict` gives on the fetched folders (the loop adds nothing of its own).
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "T1c-pro.nii.gz"))).shape,
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(small_case_dir / "t1c.nii.gz"))).shape)

    # A second run into the finished folder is refused before the PACS is asked anything...
    again = _amplify(out, empty_orthanc, random_bundle_dir, mask)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr, again.stderr
    # ...and after a lost result, the rerun reuses the fetched inputs; the resend stores nothing twice.
    (out / "T1c-pro.nii.gz").unlink()
    for path in series:
        path.unlink()
    resumed = _amplify(out, empty_orthanc, random_bundle_dir, mask)
    assert resumed.returncode == 0, resumed.stderr
    assert "inputs reused" in resumed.stdout and empty_orthanc.instance_count() == stored + n


def test_an_unknown_study_is_one_error_line_and_writes_nothing(empty_orthanc, random_bundle_dir, small_case_dir, tmp_path):
    out = tmp_path / "case"
    done = _amplify(out, empty_orthanc, random_bundle_dir, small_case_dir / "brain_mask.nii.gz")
    assert done.returncode == 2 and f"study {STUDY_UID} not found" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (out / "T1c-pro.nii.gz").exists()
    assert not (out / "T1c-pro-dicom").exists() and not (out / "inputs" / "t1c").exists()


@pytest.mark.parametrize("options, named", [
    (["--backend", "onnx"], "backend must be one of auto, torch, openvino"),
    (["--backend", "openvino", "--precision", "slow"], "precision must be one of"),
    (["--backend", "torch", "--precision", "int8"], "--precision int8 is OpenVINO's"),
])
def test_backend_and_precision_are_checked_before_the_pacs_is_asked(tmp_path, options, named):
    """``pacs amplify --backend`` (as ``predict``'s): a wrong choice is one error line, nothing fetched or written."""
    out = tmp_path / "case"
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "pacs", "amplify", STUDY_UID, str(out),
           "--from", "http://127.0.0.1:9/dicom-web", "--device", "cpu", "--progress", "none", *options]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_pacs_amplify_help_lists_int8():
    """``pacs amplify --precision`` documents the same choices as ``predict --precision`` (int8 included)."""
    from ContrastAmplifierLib.cli_options import PRECISION_HELP

    done = subprocess.run([sys.executable, "-m", "ContrastAmplifierLib.cli", "pacs", "amplify", "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0 and "int8 (OpenVINO + NNCF on the CPU" in done.stdout, done.stdout
    assert "int8" in PRECISION_HELP
