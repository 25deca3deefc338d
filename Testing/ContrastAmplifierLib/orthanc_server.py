"""A throw-away Orthanc PACS for the tests: real DICOMweb (STOW/QIDO/WADO-RS) and DIMSE (C-STORE).

:func:`start_orthanc` runs the Debian ``orthanc`` and ``orthanc-dicomweb`` packages' server on free
loopback ports with its storage in a temporary folder, HTTP basic authentication on, and a called
AE title check (a wrong called AE title is rejected, as by a hospital PACS). :func:`missing` says
why it cannot run (the tests skip with that reason). Orthanc's REST API (``/instances``,
``/studies``, ``/statistics``) is how tests check what arrived, independently of the client code
under test; it is read here with the standard library only.

The pytest fixtures ``orthanc`` (one server per test module, skipped with the reason when Orthanc
is not installed) and ``empty_orthanc`` are in Testing/conftest.py, for ContrastAmplifierLib's
test_pacs.py and LesionReaderLib's test_pacs_cases.py; :func:`write_mr_study` writes small
synthetic MR series of one study to upload.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ORTHANC = Path(os.environ.get("CA_TEST_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("CA_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
INSTALL_HINT = "Orthanc not installed: apt-get install orthanc orthanc-dicomweb"
AET = "ORTHANCTEST"
USER = "ca-tester"
PASSWORD = "pw-Zq8r-not-a-real-secret"


def missing() -> Optional[str]:
    """Why Orthanc cannot run here (``None`` when the server and its DICOMweb plugin are installed)."""
    if not ORTHANC.is_file():
        return f"{INSTALL_HINT} ({ORTHANC} missing)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{INSTALL_HINT} (DICOMweb plugin {DICOMWEB_PLUGIN} missing)"
    return None


def free_port() -> int:
    """A TCP port nobody listens on at the moment (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc; :meth:`stop` ends it (the storage folder is the caller's to remove)."""

    folder: Path
    http_port: int
    dicom_port: int
    process: subprocess.Popen = field(repr=False)
    aet: str = AET
    user: str = USER
    password: str = field(default=PASSWORD, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (no credentials in it)."""
        return f"{self.http_url}/dicom-web"

    @property
    def credentials_url(self) -> str:
        """The DICOMweb service root with ``user:password@`` in it."""
        return self.dicomweb_url.replace("http://", f"http://{self.user}:{self.password}@")

    @property
    def dimse_url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def text(self, path: str, method: str = "GET", timeout: float = 10.0) -> str:
        """Call Orthanc's REST API (authenticated); the answer as text."""
        request = urllib.request.Request(self.http_url + path, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8")

    def rest(self, path: str, method: str = "GET", timeout: float = 10.0) -> Any:
        """Call Orthanc's REST API (authenticated); the JSON answer, or ``None`` when empty."""
        body = self.text(path, method, timeout)
        return json.loads(body) if body.strip() else None

    def instance_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])

    def study_uids(self) -> set[str]:
        """The Study Instance UIDs Orthanc holds."""
        return {self.rest(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] for sid in self.rest("/studies")}

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.rest("/patients"):
            self.rest(f"/patients/{patient}", method="DELETE")

    def stop(self) -> None:
        """Terminate, wait, kill if it does not stop."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def write_config(folder: Path, http_port: int, dicom_port: int) -> Path:
    """The Orthanc JSON configuration of a test server in ``folder``."""
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "ca-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpPort": http_port,
        "HttpThreadsCount": 4,
        "HttpCompressionEnabled": False,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,  # a wrong called AE title is rejected
        "DicomAlwaysAllowStore": True,  # any calling AE title may C-STORE
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _dicom_port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_ready(server: OrthancServer, timeout_s: float) -> bool:
    """Wait until ``/system`` answers and the DICOM port accepts connections; False if Orthanc exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            system = server.rest("/system", timeout=2.0)
            if system.get("DicomAet") == server.aet and _dicom_port_open(server.dicom_port):
                return True
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def start_orthanc(folder: Path, timeout_s: float = 30.0, tries: int = 3) -> OrthancServer:
    """Start Orthanc with its storage and log in ``folder``; wait until it serves HTTP and DICOM.

    A port taken between choosing it and Orthanc binding it makes Orthanc exit: that start is
    retried on new ports (``tries`` in all).

    Raises:
        RuntimeError: it did not start; the message holds the end of Orthanc's log.
    """
    folder.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for _ in range(tries):
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        config = write_config(folder, http_port, dicom_port)
        log = (folder / "orthanc.log").open("w", encoding="utf-8")
        process = subprocess.Popen([str(ORTHANC), "--no-jobs", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=folder)
        log.close()
        server = OrthancServer(folder=folder, http_port=http_port, dicom_port=dicom_port, process=process)
        if _wait_ready(server, timeout_s):
            return server
        server.stop()
        last_log = server.log
    raise RuntimeError(f"Orthanc did not start in {timeout_s:.0f} s ({tries} tries); end of its log:\n{last_log[-3000:]}")


# -- synthetic studies to upload -------------------------------------------------------------------


@dataclass
class MRStudy:
    """What :func:`write_mr_study` wrote."""

    uid: str
    root: Path
    folders: dict[str, Path]  # key -> folder of its files
    sops: dict[str, set[str]]  # key -> SOP Instance UIDs
    pixels: dict[str, bytes]  # SOP Instance UID -> PixelData


def save_dataset(ds, path: Path) -> None:
    """Write a Part 10 file with pydicom 2 (Slicer's) or 3."""
    import inspect

    import pydicom

    if "enforce_file_format" in inspect.signature(pydicom.dcmwrite).parameters:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pydicom 2
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def write_mr_study(root: Path, series: dict[str, tuple[str, int]], seed: int, slices: int = 6) -> MRStudy:
    """Small MR Image Storage series of one study: ``series`` maps a key (its folder under ``root``)
    to (SeriesDescription, SeriesNumber); 32x32 slices, 2 mm apart, realistic tags, patient ``CA-<seed>``.
    A ``notes.txt`` (not DICOM) is written beside the folders."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    study_uid, frame_uid = generate_uid(), generate_uid()
    study = MRStudy(uid=study_uid, root=root, folders={}, sops={}, pixels={})
    for key, (description, number) in series.items():
        folder = root / key
        folder.mkdir(parents=True)
        series_uid = generate_uid()
        study.folders[key], study.sops[key] = folder, set()
        for index in range(slices):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", f"CA-{seed}", "", "O"
            ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", f"ACC{seed}", "1"
            ds.ReferringPhysicianName, ds.StudyDescription = "", "MRI BRAIN WITH AND WITHOUT CONTRAST"
            ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, number, index + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-16.0, -16.0, -5.0 + 2.0 * index]
            ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [1.0, 1.0], 2.0, 2.0
            ds.Rows = ds.Columns = 32
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = rng.integers(0, 4096, size=(32, 32), dtype=np.uint16).tobytes()
            save_dataset(ds, folder / f"IM{index:04d}.dcm")
            study.sops[key].add(sop_uid)
            study.pixels[sop_uid] = bytes(ds.PixelData)
    (root / "notes.txt").write_text("not DICOM: skipped by send\n", encoding="utf-8")
    return study
