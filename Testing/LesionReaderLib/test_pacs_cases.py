"""A reader study and a real PACS (a throw-away Orthanc, Testing/ContrastAmplifierLib/orthanc_server.py).

``lesion-reader init --pacs-case CASE=STUDY_UID --from PACS``: small synthetic MR studies with
realistic series descriptions (a routine T1c, a T1c-pro as ``predict --out-dicom`` names it, a
T1c-vfa SPACE, a FLAIR, and series no phase shows) are uploaded; init must fetch exactly the
phases' volumes into STUDY_DIR/cases/<CASE>/<volume>/ (checked by SOP Instance UID) and build the
study as ``init --cases`` would from those folders. A volume matched by no series or by two is an
error naming the case and listing its series, before anything is fetched. ``lesion-reader export
--dicom-sr --send PACS``: the SR documents of a study read on a DICOM series (test_dicom_sr.py's
fixture) arrive on the PACS (checked through Orthanc's REST API) and a resend is idempotent.
Skipped without Orthanc (apt-get install orthanc orthanc-dicomweb) or the dicom extra's packages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")
pytest.importorskip("highdicom")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "ContrastAmplifierLib"))
import orthanc_server  # noqa: E402  (the PACS test helper, on the path just above)
from test_dicom_sr import dicom_study  # noqa: E402,F401  (fixture: a study with a read on a DICOM series)

from LesionReaderLib.cli import main  # noqa: E402
from LesionReaderLib.pacs_cases import parse_pacs_case, volume_folder  # noqa: E402
from LesionReaderLib.study import StudyError, init_study, load_study, read_volume  # noqa: E402

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SLICES = 4
#: A brain MRI as a PACS holds it after contrast-amplifier: folder key -> (SeriesDescription, SeriesNumber).
SERIES = {
    "localizer": ("3-Plane Localizer", 1),
    "t1": ("T1 MPRAGE SAG", 2),
    "flair": ("AX T2 FLAIR", 3),
    "t1c": ("T1 MPRAGE SAG post Gd", 5),
    "t1c_vfa": ("T1 SPACE SAG post Gd", 6),
    "t1c_pro": ("T1c-pro (contrast amplified, demo-v1) - NOT FOR CLINICAL USE", 501),
}
PHASE_VOLUMES = {"T1c": "t1c", "T1c-pro": "t1c_pro", "T1c-vfa": "t1c_vfa", "T2-FLAIR": "flair"}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``lesion-reader ARGV`` in-process (the console script's error handling included)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    """Studies A and B (every volume), C (no T1c-vfa) and D (two T1c-pro series), uploaded to Orthanc."""
    from ContrastAmplifierLib import pacs

    root = tmp_path_factory.mktemp("pacs-studies")
    no_vfa = {k: v for k, v in SERIES.items() if k != "t1c_vfa"}
    two_pro = {**SERIES, "t1c_pro2": ("T1c-pro (contrast amplified, demo-v2) - NOT FOR CLINICAL USE", 502)}
    made = {name: orthanc_server.write_mr_study(root / name, series, seed=seed, slices=SLICES)
            for name, series, seed in (("A", SERIES, 11), ("B", SERIES, 12), ("C", no_vfa, 13), ("D", two_pro, 14))}
    endpoint = pacs.resolve_endpoint(orthanc.credentials_url, environ={})
    report = pacs.send_instances(root, endpoint, pacs.RetryPolicy(retries=0))
    assert report.ok, report.summary()
    return made


def _sops(folder: Path) -> set:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in folder.iterdir()}


def test_init_fetches_the_phases_volumes_of_each_case(orthanc, studies, no_pacs_env, tmp_path, capsys):
    study_dir = tmp_path / "study"
    code, out, err = _run(capsys, "init", str(study_dir), "--pacs-case", f"A={studies['A'].uid}", "--pacs-case",
                          f"B={studies['B'].uid}", "--from", orthanc.credentials_url, "--readers", "R1", "--readers", "R2")
    assert code == 0, err
    for case in ("A", "B"):
        assert f"fetched case {case}: 4 series, {4 * SLICES} instances from " in out
    assert "wrote" in out and "2 cases, readers R1, R2, phases T1c -> T1c-pro -> T1c-vfa" in out
    assert orthanc.password not in out + err

    data = json.loads((study_dir / "study.json").read_text())
    assert [c["id"] for c in data["cases"]] == ["A", "B"]
    for case in data["cases"]:
        assert case["volumes"] == {volume: f"cases/{case['id']}/{folder}" for volume, folder in PHASE_VOLUMES.items()}
        folder = study_dir / "cases" / case["id"]
        assert sorted(p.name for p in folder.iterdir()) == ["flair", "series.json", "t1c", "t1c_pro", "t1c_vfa"]
        for key in PHASE_VOLUMES.values():  # the right series in each folder (T1c is not the T1c-pro, nor the SPACE)
            assert _sops(folder / key) == studies[case["id"]].sops[key], (case["id"], key)
        record = json.loads((folder / "series.json").read_text())
        assert record["study_instance_uid"] == studies[case["id"]].uid and orthanc.password not in json.dumps(record)

    # the same study as `init --cases` builds from those folders, and its volumes read as images
    study = load_study(study_dir)
    same = init_study(tmp_path / "from-folders", [study_dir / "cases" / "A", study_dir / "cases" / "B"], ["R1", "R2"])
    assert {c.id: {m: same.volume_path(c.id, m) for m in c.volumes} for c in same.cases} == \
        {c.id: {m: study.volume_path(c.id, m) for m in c.volumes} for c in study.cases}
    assert read_volume(study.volume_path("A", "T1c-pro")).GetSize() == (32, 32, SLICES)


def test_a_missing_or_ambiguous_volume_names_the_case_and_its_series(orthanc, studies, no_pacs_env, tmp_path, capsys):
    study_dir = tmp_path / "study"
    code, out, err = _run(capsys, "init", str(study_dir), "--pacs-case", f"A={studies['A'].uid}", "--pacs-case",
                          f"C={studies['C'].uid}", "--pacs-case", f"D={studies['D'].uid}", "--from", orthanc.credentials_url,
                          "--readers", "R1")
    assert code == 2 and out == ""
    assert err.startswith("error: cannot fetch 2 cases from ") and "nothing was fetched" in err
    assert f"case C: cannot pick the input series of study {studies['C'].uid} with the default rules: no series matches t1c_vfa" in err
    assert "case D: " in err and "2 series match t1c_pro" in err and "#501 " in err and "#502 " in err
    assert "case A" not in err
    for description, number in SERIES.values():  # every series of the study is listed
        assert f'"{description}"' in err and f"#{number} " in err
    assert "--pacs-rules FILE" in err
    assert not study_dir.exists()  # checked before anything was fetched

    # the fix the message gives: a rules file
    rules = tmp_path / "rules.toml"
    rules.write_text('[t1c_pro]\ninclude = "t1c-pro.*demo-v2"\n', encoding="utf-8")
    code, out, err = _run(capsys, "init", str(study_dir), "--pacs-case", f"D={studies['D'].uid}", "--from", orthanc.credentials_url,
                          "--readers", "R1", "--pacs-rules", str(rules))
    assert code == 0, err
    assert _sops(study_dir / "cases" / "D" / "t1c_pro") == studies["D"].sops["t1c_pro2"]


def test_options_are_checked_before_the_pacs_is_asked(no_pacs_env, tmp_path, capsys, case_folders):
    closed = f"http://127.0.0.1:{orthanc_server.free_port()}/dicom-web"
    uid = "1.2.826.0.1.3680043.8.498.77"
    base = ["init", str(tmp_path / "s"), "--readers", "R1", "--from", closed]
    code, _, err = _run(capsys, *base, "--pacs-case", f"A={uid}", "--reference-reader", "R9")
    assert code == 2 and "--reference-reader 'R9' is not one of the readers" in err
    code, _, err = _run(capsys, *base, "--pacs-case", f"A={uid}", "--cases", str(case_folders[0]), "--phases", "T1c=T1c+SWI")
    assert code == 2 and "lacks SWI" in err  # the --cases folder has no SWI (checked before fetching)
    code, _, err = _run(capsys, *base, "--pacs-case", f"A={uid}", "--pacs-case", f"A={uid}")
    assert code == 2 and "names case 'A' twice" in err
    code, _, err = _run(capsys, "init", str(tmp_path / "s"), "--readers", "R1", "--pacs-case", f"A={uid}")
    assert code == 2 and "no PACS given" in err
    code, _, err = _run(capsys, "init", str(tmp_path / "s"), "--readers", "R1", "--cases", str(case_folders[0]), "--from", closed)
    assert code == 2 and "--from, --pacs-rules and --pacs-config go with --pacs-case" in err
    code, _, err = _run(capsys, "init", str(tmp_path / "s"), "--readers", "R1")
    assert code == 2 and "no cases: give --cases" in err
    assert not (tmp_path / "s").exists()
    # and an unreachable PACS: one error line, after the retries of the config (here none)
    config = tmp_path / "pacs.json"
    config.write_text(json.dumps({"retries": 0}), encoding="utf-8")
    code, _, err = _run(capsys, *base, "--pacs-case", f"A={uid}", "--pacs-config", str(config))
    assert code == 2 and "did not answer after 1 attempt(s)" in err and not (tmp_path / "s" / "study.json").exists()

    assert parse_pacs_case(" P-01 = 1.2.3 ").study_uid == "1.2.3"
    for bad in ("P01", "P01=", "../x=1.2.3", "P01=1.2.x"):
        with pytest.raises(StudyError):
            parse_pacs_case(bad)
    assert [volume_folder(v) for v in ("T2-FLAIR", "T1c-pro", "SWI map")] == ["flair", "t1c_pro", "swi_map"]


def _sr_instances(server) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of every instance Orthanc holds."""
    found = {}
    for instance in server.rest("/instances"):
        tags = server.rest(f"/instances/{instance}/simplified-tags")
        found[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
    return found


def test_export_sends_the_sr_documents_and_a_resend_is_idempotent(orthanc, dicom_study, no_pacs_env, tmp_path, capsys):
    study_dir, uids = dicom_study
    out_dir = tmp_path / "export"
    code, _, err = _run(capsys, "export", str(study_dir), str(out_dir), "--send", orthanc.credentials_url)
    assert code == 2 and "add --dicom-sr" in err and not out_dir.exists()

    before = _sr_instances(orthanc)
    code, out, err = _run(capsys, "export", str(study_dir), str(out_dir), "--dicom-sr", "--send", orthanc.credentials_url)
    assert code == 0, err
    sr_file = out_dir / "sr" / "R1_T1c_DCM.dcm"
    sop_uid = str(pydicom.dcmread(sr_file).SOPInstanceUID)
    assert str(sr_file) in out and "note: DICOM SR" in err  # the NIfTI case is skipped, as without --send
    assert f"sent 1 of 1 instances to http://{orthanc.user}:***@127.0.0.1:{orthanc.http_port}/dicom-web (STOW-RS" in out
    assert orthanc.password not in out + err
    after = _sr_instances(orthanc)
    assert set(after) - set(before) == {sop_uid} and after[sop_uid] == COMPREHENSIVE_3D_SR
    assert uids["study"] in orthanc.study_uids()  # filed under the study of the series read

    # resend (over DIMSE this time): acknowledged again, nothing duplicated
    code, out, err = _run(capsys, "export", str(study_dir), str(out_dir), "--dicom-sr", "--send", orthanc.dimse_url)
    assert code == 0, err
    assert f"sent 1 of 1 instances to {orthanc.dimse_url} (C-STORE" in out
    assert _sr_instances(orthanc) == after
