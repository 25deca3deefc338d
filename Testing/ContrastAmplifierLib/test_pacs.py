"""`contrast-amplifier pacs` against a real PACS: a throw-away Orthanc (orthanc_server.py) on loopback.

Sends (STOW-RS and C-STORE) are checked through Orthanc's own REST API; fetch compares the
retrieved files with the ones sent (SOP Instance UIDs and pixel data); refusals, an unreachable
PACS, retries and credential masking are checked on the real servers and a closed port. The
series-picking rules and the parsing of STOW-RS responses are also tested alone (no server).
Skipped without Orthanc (apt-get install orthanc orthanc-dicomweb) or the dicom extra's packages.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orthanc_server  # noqa: E402  (the test folder's helper, on the path just above)

from ContrastAmplifierLib import pacs, pacs_send  # noqa: E402
from ContrastAmplifierLib.pacs_cli import main  # noqa: E402

FAST = pacs.RetryPolicy(retries=0, backoff_s=0.0)
SERIES = {"t1": ("T1 MPRAGE", 2), "flair": ("AX FLAIR", 3), "adc": ("ADC (10^-6 mm2/s)", 4), "t1c": ("T1 MPRAGE post Gd", 5)}
SLICES = 6


# -- fixtures --------------------------------------------------------------------------------------

Study = orthanc_server.MRStudy
_save = orthanc_server.save_dataset


def _write_study(root: Path, series: dict[str, tuple[str, int]], seed: int) -> Study:
    return orthanc_server.write_mr_study(root, series, seed, slices=SLICES)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    return _write_study(tmp_path_factory.mktemp("study"), SERIES, seed=1)


@pytest.fixture(scope="module")
def study_without_adc(tmp_path_factory) -> Study:
    series = {m: v for m, v in SERIES.items() if m != "adc"}
    series["dwi"] = ("DWI b1000 TRACE", 6)
    return _write_study(tmp_path_factory.mktemp("study_no_adc"), series, seed=2)


def _credentials_url(server) -> str:
    return server.credentials_url


def _web(server, **kwargs) -> pacs.Endpoint:
    return pacs.resolve_endpoint(_credentials_url(server), environ={}, **kwargs)


def _dimse(server, called: str = "") -> pacs.Endpoint:
    url = server.dimse_url if not called else f"dicom://{called}@127.0.0.1:{server.dicom_port}"
    return pacs.resolve_endpoint(url, environ={})


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `contrast-amplifier pacs ARGV` in-process (the console script's error handling included)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def _closed_port() -> int:
    return orthanc_server.free_port()


# -- send ------------------------------------------------------------------------------------------


def test_stow_send_arrives_and_resend_is_idempotent(empty_orthanc, study, no_pacs_env):
    endpoint = _web(empty_orthanc)
    start = time.perf_counter()
    report = pacs.send_instances(study.root, endpoint, FAST, batch_size=10)
    first_s = time.perf_counter() - start
    assert report.ok and report.n_sent == report.n_total == 4 * SLICES, report.summary()
    assert report.attempts == 3  # 24 instances in requests of 10
    assert [p.name for p, _ in report.skipped] == ["notes.txt"]
    assert all(r.detail == "in ReferencedSOPSequence" for r in report.results)
    assert empty_orthanc.instance_count() == 4 * SLICES
    assert empty_orthanc.study_uids() == {study.uid}
    stored = {empty_orthanc.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in empty_orthanc.rest("/instances")}
    assert stored == set().union(*study.sops.values())

    again = pacs.send_instances(study.root, endpoint, FAST, batch_size=10)  # already on the PACS: acknowledged again
    assert again.ok and again.n_sent == 4 * SLICES
    assert empty_orthanc.instance_count() == 4 * SLICES
    print(f"STOW-RS: {report.n_sent} instances in {first_s:.2f} s (resend {again.elapsed_s:.2f} s)")


def test_cstore_send_arrives_under_our_calling_aet(empty_orthanc, study, no_pacs_env, capsys):
    code, out, err = _run(capsys, "send", str(study.folders["t1"]), str(study.folders["t1c"]), "--to", empty_orthanc.dimse_url,
                          "--calling-aet", "CA-TESTSCU", "--progress", "none", "--retries", "0")
    assert code == 0, err
    assert f"sent {2 * SLICES} of {2 * SLICES} instances to {empty_orthanc.dimse_url} (C-STORE" in out
    assert err == ""
    assert empty_orthanc.instance_count() == 2 * SLICES
    some = empty_orthanc.rest("/instances")[0]
    assert empty_orthanc.text(f"/instances/{some}/metadata/RemoteAET") == "CA-TESTSCU"

    start = time.perf_counter()
    report = pacs.send_instances(study.folders["t1"], _dimse(empty_orthanc), FAST)  # resend: acknowledged, not duplicated
    assert report.ok and {r.detail for r in report.results} == {"0x0000"}
    assert empty_orthanc.instance_count() == 2 * SLICES
    print(f"C-STORE: {report.n_sent} instances in {time.perf_counter() - start:.2f} s")


def test_wrong_called_aet_is_refused_at_once(empty_orthanc, study, no_pacs_env, capsys):
    sleeps: list[float] = []
    policy = pacs.RetryPolicy(retries=3, backoff_s=0.01, sleep=sleeps.append)
    with pytest.raises(pacs.PacsRefused) as refused:
        pacs.send_instances(study.folders["adc"], _dimse(empty_orthanc, called="NOTORTHANC"), policy)
    # A refusal ends the retries at once. (On a loaded machine a freshly started Orthanc can drop
    # the very first connection, which is retried like any connection failure: hence not "== 1".)
    assert refused.value.attempts == len(sleeps) + 1 and refused.value.attempts < policy.attempts
    assert refused.value.report is not None and refused.value.report.n_sent == 0
    assert {r.status for r in refused.value.report.results} == {"not sent"}

    code, out, err = _run(capsys, "send", str(study.folders["adc"]), "--to", f"dicom://NOTORTHANC@127.0.0.1:{empty_orthanc.dicom_port}")
    # (the default --progress bar: no bar is drawn before the first instance is acknowledged)
    assert code == 2
    assert out == ""  # nothing reported as sent
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "rejected the association (Called AE title not recognised" in lines[0]
    assert "'NOTORTHANC'" in lines[0] and "Fix:" in lines[0]
    assert empty_orthanc.instance_count() == 0


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_unreachable_pacs_fails_after_the_configured_retries(protocol, study, no_pacs_env, capsys):
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/dicom-web" if protocol == "dicomweb" else f"dicom://ORTHANCTEST@127.0.0.1:{port}"
    sleeps: list[float] = []
    policy = pacs.RetryPolicy(retries=2, backoff_s=0.01, sleep=sleeps.append)
    with pytest.raises(pacs.PacsUnreachable) as unreachable:
        pacs.send_instances(study.folders["t1"], pacs.resolve_endpoint(url, environ={}), policy)
    assert unreachable.value.attempts == 3
    assert sleeps == [0.01, 0.02]  # exponential backoff between the 3 attempts
    assert unreachable.value.report.n_sent == 0

    start = time.perf_counter()
    code, out, err = _run(capsys, "send", str(study.folders["t1"]), "--to", url, "--retries", "2", "--backoff", "0.01",
                          "--progress", "none")
    assert time.perf_counter() - start < 10
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: sending {SLICES} instance(s): {url} did not answer after 3 attempt(s)")
    assert "Fix: check that the PACS is running" in lines[0]


@pytest.fixture(scope="module")
def partly_bad(study, tmp_path_factory) -> Path:
    """Three good instances, one without a SeriesInstanceUID, one of a SOP class no PACS knows."""
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("partly_bad")
    files = sorted(study.folders["adc"].iterdir())
    for path in files[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    ds = pydicom.dcmread(files[3])
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _save(ds, folder / "no_series_uid.dcm")
    ds = pydicom.dcmread(files[4])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.9.9999.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _save(ds, folder / "unknown_sop_class.dcm")
    return folder


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_instances_the_pacs_refuses_are_reported_and_exit_1(protocol, empty_orthanc, partly_bad, no_pacs_env, capsys):
    endpoint = _web(empty_orthanc) if protocol == "dicomweb" else _dimse(empty_orthanc)
    report = pacs.send_instances(partly_bad, endpoint, FAST)
    status = {r.path.name: r.status for r in report.results}
    assert status["no_series_uid.dcm"] == "failed" and not report.ok
    assert [status[f"IM000{i}.dcm"] for i in range(3)] == ["sent"] * 3
    if protocol == "dimse":  # Orthanc refuses the unknown SOP class in the association (STOW-RS stores it)
        detail = next(r.detail for r in report.results if r.path.name == "unknown_sop_class.dcm")
        assert status["unknown_sop_class.dcm"] == "failed" and "no presentation context" in detail
    assert empty_orthanc.instance_count() == report.n_sent  # acknowledged == stored

    empty_orthanc.clear()
    target = _credentials_url(empty_orthanc) if protocol == "dicomweb" else empty_orthanc.dimse_url
    code, out, err = _run(capsys, "send", str(partly_bad), "--to", target, "--progress", "none", "--retries", "0")
    assert code == 1 and err == ""
    assert re.search(r"^failed\s+\S+\s+\S*no_series_uid\.dcm\s+(0x|FailureReason 0x)", out, re.MULTILINE), out
    assert f"sent {report.n_sent} of 5 instances to {endpoint.display()}" in out and "refused by the PACS" in out
    assert empty_orthanc.instance_count() == report.n_sent


def test_a_pacs_accepting_none_of_the_sop_classes_is_a_refusal(empty_orthanc, partly_bad, no_pacs_env, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    (only / "x.dcm").write_bytes((partly_bad / "unknown_sop_class.dcm").read_bytes())
    with pytest.raises(pacs.PacsRefused, match=r"none of the SOP classes offered \(1\.2\.826\.0\.1\.3680043\.9\.9999\.1\)"):
        pacs.send_instances(only, _dimse(empty_orthanc), pacs.RetryPolicy(retries=2, backoff_s=0.01))


class _Always503(BaseHTTPRequestHandler):
    requests_seen = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).requests_seen += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_5xx_is_retried_with_backoff(study, no_pacs_env):
    """A DICOMweb server answering 503 (overloaded): each request is retried, then a clear error."""
    server = HTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        sleeps: list[float] = []
        with pytest.raises(pacs.PacsUnreachable, match=r"after 3 attempt\(s\) \(last: HTTP 503"):
            pacs.send_instances(study.folders["flair"], pacs.resolve_endpoint(url, environ={}),
                                pacs.RetryPolicy(retries=2, backoff_s=0.001, sleep=sleeps.append))
        assert _Always503.requests_seen == 3 and sleeps == [0.001, 0.002]
    finally:
        server.shutdown()
        server.server_close()


def test_wrong_password_is_refused_with_the_fix(empty_orthanc, study, no_pacs_env, monkeypatch, capsys):
    monkeypatch.setenv(pacs.ENV_USER, empty_orthanc.user)
    monkeypatch.setenv(pacs.ENV_PASSWORD, "wrong-Hx72-password")
    code, out, err = _run(capsys, "send", str(study.folders["t1"]), "--to", empty_orthanc.dicomweb_url, "--progress", "none")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "HTTP 401" in err and "CA_PACS_PASSWORD" in err
    assert "wrong-Hx72-password" not in err
    assert empty_orthanc.instance_count() == 0


def test_credentials_from_the_environment_never_appear_in_output_or_logs(empty_orthanc, study, no_pacs_env, monkeypatch,
                                                                         capsys, caplog, tmp_path):
    secret = empty_orthanc.password
    monkeypatch.setenv(pacs.ENV_URL, empty_orthanc.dicomweb_url)
    monkeypatch.setenv(pacs.ENV_USER, empty_orthanc.user)
    monkeypatch.setenv(pacs.ENV_PASSWORD, secret)
    caplog.set_level(logging.DEBUG)
    outputs = [
        _run(capsys, "send", str(study.root), "--progress", "none", "--verbose", "--report", str(tmp_path / "report.json")),
        _run(capsys, "query"),
        _run(capsys, "query", "--study-uid", study.uid, "--json"),
        _run(capsys, "fetch", study.uid, str(tmp_path / "fetched"), "--progress", "none"),
        _run(capsys, "fetch", study.uid, str(tmp_path / "fetched"), "--progress", "none"),  # exists: an error
        _run(capsys, "endpoints"),
    ]
    assert [code for code, _, _ in outputs] == [0, 0, 0, 0, 2, 0]
    text = "".join(out + err for _, out, err in outputs) + caplog.text + (tmp_path / "report.json").read_text()
    text += (tmp_path / "fetched" / "series.json").read_text()
    assert secret not in text
    assert f"{empty_orthanc.user}:***@127.0.0.1:{empty_orthanc.http_port}/dicom-web" in outputs[0][1]

    # a password written into the URL itself is masked too, also when the PACS cannot be reached
    url = f"http://{empty_orthanc.user}:{secret}@127.0.0.1:{_closed_port()}/dicom-web"
    code, out, err = _run(capsys, "query", "--from", url, "--retries", "0")
    assert code == 2 and secret not in out + err + caplog.text and ":***@" in err


def test_named_endpoints_from_a_config_file(empty_orthanc, study, no_pacs_env, monkeypatch, capsys, tmp_path):
    config = tmp_path / "pacs.json"
    config.write_text(json.dumps({
        "default": "web", "retries": 0, "backoff_s": 0.01, "calling_aet": "CA-CONFIGSCU",
        "endpoints": {
            "web": {"url": empty_orthanc.dicomweb_url, "username": empty_orthanc.user, "password_env": "ORTHANC_TEST_PASSWORD"},
            "scanner": {"url": empty_orthanc.dimse_url},
        },
    }), encoding="utf-8")
    monkeypatch.setenv("ORTHANC_TEST_PASSWORD", empty_orthanc.password)
    monkeypatch.setenv(pacs.ENV_CONFIG, str(config))  # the default config path

    code, out, err = _run(capsys, "send", str(study.folders["adc"]), "--to", "scanner", "--progress", "none")
    assert code == 0 and f"to scanner ({empty_orthanc.dimse_url})" in out, err
    some = empty_orthanc.rest("/instances")[0]
    assert empty_orthanc.text(f"/instances/{some}/metadata/RemoteAET") == "CA-CONFIGSCU"
    code, out, err = _run(capsys, "query", "--study-uid", study.uid)  # the default endpoint: "web"
    assert code == 0 and f"1 series in study {study.uid} on web (" in out and '"ADC (10^-6 mm2/s)"' in out
    code, out, err = _run(capsys, "endpoints")
    assert code == 0 and "* web" in out and ":***@" in out and empty_orthanc.password not in out

    code, out, err = _run(capsys, "send", str(study.folders["adc"]), "--to", "hospital", "--progress", "none")
    assert code == 2 and "'hospital' is neither a PACS URL nor an endpoint" in err and "scanner, web" in err


# -- query and fetch -------------------------------------------------------------------------------


@pytest.fixture
def stored(empty_orthanc, study, study_without_adc):
    web = _web(empty_orthanc)
    assert pacs.send_instances(study.root, web, FAST).ok
    assert pacs.send_instances(study_without_adc.root, web, FAST).ok
    return empty_orthanc


def test_query_lists_studies_and_series(stored, study, study_without_adc, no_pacs_env, capsys):
    studies = pacs.query_studies(_web(stored))
    assert {s.study_instance_uid for s in studies} == {study.uid, study_without_adc.uid}
    first = next(s for s in studies if s.study_instance_uid == study.uid)
    assert (first.patient_id, first.n_series, first.n_instances, first.date) == ("CA-1", 4, 4 * SLICES, "20240102")
    assert [s.study_instance_uid for s in pacs.query_studies(_web(stored), patient_id="CA-2")] == [study_without_adc.uid]

    series = pacs.query_series(_web(stored), study.uid)
    assert [(s.number, s.description, s.modality, s.n_instances) for s in series] == [
        (number, description, "MR", SLICES) for description, number in SERIES.values()]

    url = _credentials_url(stored)
    code, out, err = _run(capsys, "query", "--from", url, "--patient-id", "CA-1")
    assert code == 0 and out.splitlines()[0].startswith("1 study of patient CA-1 on http://")
    assert study.uid in out and "4 series, 24 instances" in out


def test_fetch_picks_and_retrieves_the_four_series(stored, study, no_pacs_env, tmp_path, capsys):
    from ContrastAmplifierLib.imagefiles import dicom_series_files

    out_dir = tmp_path / "case"
    url = _credentials_url(stored)
    code, out, err = _run(capsys, "fetch", study.uid, str(out_dir), "--from", url, "--progress", "none")
    assert code == 0, err
    assert f"fetched {4 * SLICES} instances" in out and f"--t1c {out_dir / 't1c'}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["adc", "flair", "series.json", "t1", "t1c"]  # no partial folder left
    for modality in pacs.MODALITIES:
        files = sorted((out_dir / modality).iterdir())
        datasets = [pydicom.dcmread(f) for f in files]
        assert {str(ds.SOPInstanceUID) for ds in datasets} == study.sops[modality]
        assert all(bytes(ds.PixelData) == study.pixels[str(ds.SOPInstanceUID)] for ds in datasets)
        assert all(f.name == f"{ds.SOPInstanceUID}.dcm" for f, ds in zip(files, datasets))
        assert len(dicom_series_files(out_dir / modality, modality)) == SLICES  # what `predict --t1 DIR` reads
    record = json.loads((out_dir / "series.json").read_text())
    assert record["study_instance_uid"] == study.uid and record["rules"] == "default rules"
    assert {m: s["description"] for m, s in record["series"].items()} == {m: d for m, (d, _) in SERIES.items()}
    assert len(record["all_series"]) == 4 and stored.password not in json.dumps(record)

    again = pacs.fetch_study(study.uid, out_dir, _web(stored), policy=FAST, overwrite=True)  # replaces the folders
    assert again.n_instances == 4 * SLICES
    assert sorted(p.name for p in out_dir.iterdir()) == ["adc", "flair", "series.json", "t1", "t1c"]


def test_fetch_names_every_series_when_a_modality_is_missing(stored, study_without_adc, no_pacs_env, tmp_path, capsys):
    out_dir = tmp_path / "case"
    url = _credentials_url(stored)
    code, out, err = _run(capsys, "fetch", study_without_adc.uid, str(out_dir), "--from", url, "--progress", "none")
    assert code == 2 and out == ""
    assert err.startswith(f"error: cannot pick the input series of study {study_without_adc.uid} with the default rules: "
                          "no series matches adc (include /adc|apparent/)")
    assert "series found (4):" in err
    for description, number in [("T1 MPRAGE", 2), ("AX FLAIR", 3), ("T1 MPRAGE post Gd", 5), ("DWI b1000 TRACE", 6)]:
        assert re.search(rf"#{number}\s+MR\s+{SLICES} instances\s+\"{re.escape(description)}\"", err), err
    assert "--series t1c=SERIES_NUMBER" in err and "--rules FILE" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing fetched

    # the fix the message gives: a rules file (here: take the DWI trace as the ADC, to exercise the rules)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"adc": {"include": "trace"}}), encoding="utf-8")
    result = pacs.fetch_study(study_without_adc.uid, out_dir, _web(stored), rules=pacs.load_rules(rules), policy=FAST)
    assert result.series["adc"].number == 6 and json.loads(result.series_file.read_text())["rules"] == str(rules)


def test_fetch_needs_a_dicomweb_endpoint_and_a_known_study(stored, no_pacs_env, tmp_path):
    with pytest.raises(pacs.PacsConfigError, match="DIMSE endpoint; searching and fetching need DICOMweb"):
        pacs.fetch_study("1.2.3", tmp_path, _dimse(stored), policy=FAST)
    with pytest.raises(pacs.PacsConfigError, match="study 1.2.3.4 not found on"):
        pacs.fetch_study("1.2.3.4", tmp_path / "x", _web(stored), policy=FAST)
    with pytest.raises(pacs.PacsConfigError, match="is not a DICOM UID"):
        pacs.fetch_study("1.2.abc", tmp_path / "x", _web(stored), policy=FAST)


# -- no server: rules, responses, endpoints --------------------------------------------------------


def _series(*descriptions: str) -> list[pacs.SeriesInfo]:
    return [pacs.SeriesInfo(series_instance_uid=f"1.2.3.{i}", number=i, description=d, modality="MR", n_instances=10)
            for i, d in enumerate(descriptions, start=1)]


def test_default_rules_pick_typical_clinical_descriptions():
    found = _series("3-Plane Localizer", "Ax T1 SE", "AX T2 FLAIR", "DWI b1000", "Apparent Diffusion Coefficient (mm2/s)",
                    "Ax T1 SE +C", "T2 TSE")
    picked = pacs.pick_series(found)
    assert {m: s.number for m, s in picked.items()} == {"t1": 2, "flair": 3, "adc": 5, "t1c": 6}
    picked = pacs.pick_series(_series("t1_mprage_sag", "t2_flair_tra", "ep2d_diff_ADC", "t1_mprage_sag_post"))
    assert {m: s.number for m, s in picked.items()} == {"t1": 1, "flair": 2, "adc": 3, "t1c": 4}


def test_ties_and_double_matches_are_errors_never_guesses():
    with pytest.raises(pacs.SeriesSelectionError, match=r"2 series match t1 .*#1 'T1 SE', #2 'T1 MPRAGE'"):
        pacs.pick_series(_series("T1 SE", "T1 MPRAGE", "FLAIR", "ADC", "T1 post"))
    with pytest.raises(pacs.SeriesSelectionError, match=r"series #1 'T1 ADC map' matches both t1 and adc"):
        pacs.pick_series(_series("T1 ADC map", "FLAIR", "T1 post"))
    picked = pacs.pick_series(_series("T1 SE", "T1 MPRAGE", "FLAIR", "ADC", "T1 post"), overrides={"t1": "2"})
    assert picked["t1"].description == "T1 MPRAGE"
    with pytest.raises(pacs.SeriesSelectionError, match=r"no series matches flair .*\(flair would match the series --series gives: #2 to t1\)"):
        pacs.pick_series(_series("T1", "FLAIR", "ADC", "T1 post"), overrides={"t1": "2"})
    with pytest.raises(pacs.SeriesSelectionError, match="--series t1=9 matches no series"):
        pacs.pick_series(_series("T1", "FLAIR", "ADC", "T1 post"), overrides={"t1": "9"})


def test_t1c_pro_is_never_the_t1c_and_rules_yield_to_the_volumes_fetched():
    found = _series("T1 MPRAGE", "AX T2 FLAIR", "ADC", "T1 MPRAGE post Gd", "T1c-pro (contrast amplified, demo) - NOT FOR CLINICAL USE")
    assert pacs.pick_series(found)["t1c"].number == 4  # T1c-pro, written by predict --out-dicom, is not a second T1c
    reader = ("t1c", "t1c_pro", "t1c_vfa", "flair")
    found = _series("T1 MPRAGE", "AX T2 FLAIR", "T1 MPRAGE post Gd", "T1c-pro (contrast amplified, demo)", "T1 SPACE post Gd",
                    "T1 SPACE pre", "T2 SPACE")
    picked = pacs.pick_series(found, pacs.default_rules(reader), modalities=reader)
    assert {v: s.number for v, s in picked.items()} == {"t1c": 3, "t1c_pro": 4, "t1c_vfa": 5, "flair": 2}
    # without t1c_vfa among the volumes, the t1c rule does not yield: two T1c candidates are a tie, never a guess
    with pytest.raises(pacs.SeriesSelectionError, match=r"2 series match t1c .*#3 'T1 MPRAGE post Gd', #5 'T1 SPACE post Gd'"):
        pacs.pick_series(found, pacs.default_rules(("t1c", "flair")), modalities=("t1c", "flair"))
    with pytest.raises(pacs.PacsConfigError, match=r"no default series rule for volume\(s\) swi .*\[swi\] include"):
        pacs.default_rules(("t1c", "swi"))


def test_rules_files_add_volumes_and_replace_yields(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"swi": {"include": "swi|susceptibility"}, "t1c": {"exclude": "flair"}, "adc": {"include": "adc"}}),
                     encoding="utf-8")
    loaded = pacs.load_rules(rules, volumes=("t1c", "t1c_vfa", "swi"))  # [adc]: a known volume, checked, unused
    assert set(loaded.rules) == {"t1c", "t1c_vfa", "swi"} and loaded.source == str(rules)
    assert loaded.rules["t1c"].exclude == "flair"  # as written: no longer yields to t1c_vfa
    assert loaded.rules["swi"] == pacs.SeriesRule(include="swi|susceptibility")
    assert pacs.load_rules(None, volumes=("t1c", "t1c_vfa")).rules["t1c"].exclude.endswith("|" + pacs.VOLUME_RULES["t1c_vfa"].include)
    with pytest.raises(pacs.PacsConfigError, match=r"volume 'dwi' has no default rule; add \[dwi\]"):
        pacs.load_rules(rules, volumes=("t1c", "swi", "dwi"))
    with pytest.raises(pacs.PacsConfigError, match="unknown setting\\(s\\) swi"):
        pacs.load_rules(rules)  # the four inputs: an unknown volume is a typo


def test_stow_response_parsing_reports_only_acknowledged_instances(tmp_path):
    from pydicom.dataset import Dataset

    batch = [pacs_send.InstanceFile(tmp_path / f"{i}.dcm", "1.2.840.10008.5.1.4.1.1.4", f"1.2.3.{i}", "1.2.840.10008.1.2.1", 1)
             for i in range(4)]
    response = Dataset()
    ok, warned, failed = Dataset(), Dataset(), Dataset()
    ok.ReferencedSOPInstanceUID = "1.2.3.0"
    warned.ReferencedSOPInstanceUID, warned.WarningReason = "1.2.3.1", 0xB000
    failed.ReferencedSOPInstanceUID, failed.FailureReason = "1.2.3.2", 0x0110
    response.ReferencedSOPSequence = [ok, warned]
    response.FailedSOPSequence = [failed]
    results = pacs_send._stow_results(batch, response, bare_ok=True)
    assert [(r.status, r.detail) for r in results] == [
        ("sent", "in ReferencedSOPSequence"), ("sent", "warning 0xB000 (coercion of data elements)"),
        ("failed", "FailureReason 0x0110 (processing failure)"), ("not sent", "not in the PACS's response")]
    assert {r.status for r in pacs_send._stow_results(batch, Dataset(), bare_ok=True)} == {"sent"}  # bare HTTP 200
    assert {r.status for r in pacs_send._stow_results(batch, Dataset(), bare_ok=False)} == {"not sent"}


def test_urls_and_endpoints_never_show_secrets():
    assert pacs.mask_url("https://bob:s3cr%40t@pacs.example.org:443/dicom-web") == "https://bob:***@pacs.example.org:443/dicom-web"
    assert pacs.mask_url("https://pacs/dicom-web?access_token=abc&x=1") == "https://pacs/dicom-web?access_token=***&x=1"
    endpoint = pacs.resolve_endpoint("https://bob:s3cr%40t@pacs.example.org/dicom-web", environ={pacs.ENV_TOKEN: "tok-123"})
    assert endpoint.password == "s3cr@t" and endpoint.url == "https://pacs.example.org/dicom-web"
    shown = repr(endpoint) + str(endpoint) + endpoint.redact("auth s3cr@t and tok-123 and s3cr%40t")
    assert "s3cr" not in shown and "tok-123" not in shown and "bob:***@pacs.example.org" in shown
    dimse = pacs.resolve_endpoint("dicom://ARCHIVE@10.0.0.5:11112", environ={pacs.ENV_CALLING_AET: "ME"})
    assert (dimse.called_aet, dimse.host, dimse.port, dimse.calling_aet, dimse.protocol) == ("ARCHIVE", "10.0.0.5", 11112, "ME", "dimse")
    with pytest.raises(pacs.PacsConfigError, match="not a valid AE title"):
        pacs.resolve_endpoint("dicom://@10.0.0.5:104", environ={})
    with pytest.raises(pacs.PacsConfigError, match=r"no PACS given: pass --to/--from"):
        pacs.resolve_endpoint(None, pacs.PacsConfig(), environ={})


def test_config_files_toml_and_json_are_validated(tmp_path, monkeypatch):
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    assert toml
    path = tmp_path / "pacs.toml"
    path.write_text('default = "hospital"\nretries = 1\nbackoff_s = 0.5\n\n[endpoints.hospital]\n'
                    'url = "https://pacs.example.org/dicom-web"\nusername = "svc"\npassword_env = "HOSP_PW"\n',
                    encoding="utf-8")
    config = pacs.load_config(path)
    assert config.retry_policy() == pacs.RetryPolicy(retries=1, backoff_s=0.5)
    assert config.retry_policy(retries=4).retries == 4
    with pytest.raises(pacs.PacsConfigError, match=r"password_env names \$HOSP_PW, which is not set"):
        pacs.resolve_endpoint(None, config, environ={})
    endpoint = pacs.resolve_endpoint(None, config, environ={"HOSP_PW": "pw-1"})
    assert (endpoint.name, endpoint.username, endpoint.password) == ("hospital", "svc", "pw-1")
    assert endpoint.display() == "hospital (https://svc:***@pacs.example.org/dicom-web)"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"endpoints": {"x": {"url": "https://h/dicom-web", "pasword": "typo"}}}), encoding="utf-8")
    with pytest.raises(pacs.PacsConfigError, match="endpoint 'x': unknown setting\\(s\\) pasword"):
        pacs.load_config(bad)
    with pytest.raises(pacs.PacsConfigError, match="not found"):
        pacs.load_config(tmp_path / "absent.toml")
    monkeypatch.setenv(pacs.ENV_CONFIG, str(tmp_path / "absent.json"))
    assert pacs.load_config() == pacs.PacsConfig()  # the default file may be absent
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"t1c": {"include": "(unclosed"}}), encoding="utf-8")
    with pytest.raises(pacs.PacsConfigError, match=r"\[t1c\]: '\(unclosed' is not a valid regular expression"):
        pacs.load_rules(rules)
