"""The training CLI: end to end on physics phantoms (preprocess with the shared pipeline, fit, export,
reload), its dependencies on a bare GPU node, SIGTERM and refused checkpoints as one error line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ContrastAmplifierLib.bundle import BundleError, load_bundle
from ContrastAmplifierTrainingLib.cli import expand_multi_value_options
from ContrastAmplifierTrainingLib.data import load_cache_folder, save_cached_case
from ContrastAmplifierTrainingLib.toy import toy_cohort


def test_folds_flag_takes_several_values():
    assert expand_multi_value_options(["fit", "m", "o", "--folds", "0", "1", "2", "--epochs", "3"]) == [
        "fit", "m", "o", "--folds", "0", "--folds", "1", "--folds", "2", "--epochs", "3"]
    assert expand_multi_value_options(["fit", "--folds", "0,1", "x"]) == ["fit", "--folds", "0,1", "x"]


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ContrastAmplifierTrainingLib.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_phantom_fit_two_folds_export_reload_and_reject_tampering(tmp_path):
    from ContrastAmplifierLib.phantom import generate_cohort

    generate_cohort(tmp_path / "cohort", cases=4, seed=730_000, spacing=4.0)
    out = tmp_path / "run"
    done = _train("fit", str(tmp_path / "cohort"), str(out), "--folds", "0", "1", "--n-folds", "2", "--epochs", "2",
                  "--spacing", "4", "--crop", "32", "32", "32", "--base-channels", "8", "--levels", "3",
                  "--device", "cpu", "--progress", "json")
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert all({"stage", "fraction", "message"} <= e.keys() for e in events)
    assert {e["stage"] for e in events} >= {"cache", "fit", "epoch", "done"}
    assert [(e["fold"], e["epoch"]) for e in events if e["stage"] == "epoch"] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    fractions = [e["fraction"] for e in events if e["stage"] in ("fit", "epoch")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    cases = load_cache_folder(out / "cache")
    assert len(cases) == 4 and cases[0].zscores.shape == (5, 32, 32, 32)
    for case in cases:
        # T1c-low went through the T1c's registration and mask: it matches the T1c voxel for voxel
        # except where gadolinium enhances.
        low, full = case.channel("t1c_low")[case.mask], case.channel("t1c")[case.mask]
        assert np.corrcoef(low, full)[0, 1] > 0.8
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert set(plan["geometry"]["percentiles"]) == {"t1", "flair", "adc", "t1c"}

    bundle_dir = tmp_path / "bundle"
    _train("export", str(out), str(bundle_dir), "--name", "phantom-test", "--intended-use", "tests - not for clinical use")
    bundle = load_bundle(bundle_dir)
    assert bundle.folds == [0, 1] and bundle.spacing == (4.0, 4.0, 4.0) and bundle.crop_size == (32, 32, 32)
    assert bundle.geometry().clip_for("t1c") == tuple(plan["geometry"]["percentiles"]["t1c"])
    weights = bundle_dir / "fold1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(BundleError, match="fold1.safetensors"):
        load_bundle(bundle_dir)
    refused = _train("export", str(out), str(tmp_path / "b2"), "--folds", "0", "1", "2", check=False)
    assert refused.returncode != 0 and "out of range" not in refused.stderr and "fold" in refused.stderr


def test_fit_phantoms_trains_a_stream_and_the_bundle_records_seeds_and_command(tmp_path):
    out = tmp_path / "run"
    args = ["fit-phantoms", str(out), "--first-seed", "751000", "--cases", "2", "--val-seeds", "761000", "--spacing", "4",
            "--crop", "40", "48", "40", "--fold", "1", "--n-folds", "2", "--epochs", "1", "--patch-size", "16",
            "--patches-per-epoch", "4", "--walk", "2", "--base-channels", "4", "--levels", "2", "--lesion-fraction", "0.5",
            "--enhancement-weight", "2", "--device", "cpu", "--progress", "json"]
    done = _train(*args)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["fold"], e["epoch"]) for e in events if e["stage"] == "epoch"] == [(1, 1)] and events[-1]["stage"] == "done"
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert plan["phantoms"]["first_seed"] == 751_000 and plan["phantoms"]["val_seed"] == 761_000
    assert plan["lesion_fraction"] == 0.5 and plan["enhancement_weight"] == 2.0 and plan["patch_size"] == [16, 16, 16]
    assert plan["command"].startswith("contrast-amplifier-train fit-phantoms ") and "--first-seed 751000" in plan["command"]
    # Fold 1 walked seeds 751002-751003; the rerun resumes (nothing left to do) and keeps the plan.
    assert {p.name for p in (out / "phantoms" / "fold_1" / "cache").glob("*.npz")} == {"phantom_751002.npz", "phantom_751003.npz"}
    assert _train(*args).returncode == 0
    _train("export", str(out), str(tmp_path / "bundle"), "--name", "stream-test", "--intended-use", "tests - not for clinical use")
    training = json.loads((tmp_path / "bundle" / "bundle.json").read_text(encoding="utf-8"))["training"]
    assert training["phantoms"]["cases_per_fold"] == 2 and training["command"] == plan["command"]
    assert "phantoms made on the fly" in json.loads((tmp_path / "bundle" / "bundle.json").read_text(encoding="utf-8"))["training_data"]


@pytest.mark.parametrize("bad, message", [
    (["--val-seeds", "751001-751001"], "overlap the training streams"),
    (["--val-seeds", "9-3"], "--val-seeds '9-3': the last seed is below the first"),
    (["--lesions", "huge"], "--lesions 'huge'"),
    (["--patch-size", "15"], "--patch-size takes one side (a cube) or three (Z Y X), got 2: [16, 15]"),
])
def test_fit_phantoms_bad_options_are_one_error_line(tmp_path, bad, message):
    done = _train("fit-phantoms", str(tmp_path / "run"), "--first-seed", "751000", "--cases", "2", "--spacing", "4",
                  "--crop", "40", "48", "40", "--epochs", "1", "--patch-size", "16", "--patches-per-epoch", "4",
                  "--levels", "2", "--base-channels", "4", "--device", "cpu", *bad, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not list((tmp_path).glob("run/fold_*"))


@pytest.mark.slow
def test_prepare_with_simulated_low_dose(tmp_path):
    from ContrastAmplifierLib.phantom import generate_cohort

    (case,) = generate_cohort(tmp_path / "cohort", cases=1, seed=731_000, spacing=4.0)
    (case / "t1c_low.nii.gz").unlink()
    refused = _train("prepare", str(tmp_path / "cohort"), str(tmp_path / "run"), check=False)
    assert refused.returncode == 2 and "--simulate-low-dose" in refused.stderr
    _train("prepare", str(tmp_path / "cohort"), str(tmp_path / "run"), "--simulate-low-dose", "--spacing", "4",
           "--crop", "32", "32", "32", "--progress", "none")
    (cached,) = load_cache_folder(tmp_path / "run" / "cache")
    low, full = cached.channel("t1c_low")[cached.mask], cached.channel("t1c")[cached.mask]
    assert np.corrcoef(low, full)[0, 1] > 0.8
    assert (tmp_path / "run" / "cache" / "case_000_t1c_low_simulated.nii.gz").is_file()


def test_training_and_bundles_need_no_simpleitk(tmp_path):
    """A bare GPU node (torch, numpy, safetensors, jsonschema) can fit, export and load bundles."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('SimpleITK', 'nibabel', 'nilearn', 'HD_BET', 'matplotlib'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ContrastAmplifierTrainingLib.cli, ContrastAmplifierTrainingLib.fit, ContrastAmplifierTrainingLib.export\n"
        "import ContrastAmplifierLib.bundle, ContrastAmplifierLib.ensemble, ContrastAmplifierLib.bench_inference\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_sigterm_stops_cleanly_with_a_cancelled_event(tmp_path, train_cli):
    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=5):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    cmd = train_cli("fit", str(cache), str(tmp_path / "run"), "--n-folds", "2", "--epochs", "50", "--base-channels", "4",
                    "--levels", "2", "--device", "cpu", "--progress", "json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    events, sent = [], False
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["stage"] == "epoch" and not sent:
            proc.send_signal(signal.SIGTERM)  # what the Slicer module's Stop sends
            sent = True
    assert proc.wait(timeout=120) == 130
    assert events[-1]["stage"] == "cancelled" and "rerun" in events[-1]["message"]
    assert (tmp_path / "run" / "fold_0" / "checkpoint.pt").is_file()


def test_malicious_checkpoint_through_the_cli_is_one_error_line(tmp_path, train_cli, malicious_checkpoint):
    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=9):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(malicious_checkpoint("torch-zip", marker))
    done = subprocess.run(train_cli("fit", str(cache), str(tmp_path / "run"), "--n-folds", "2", "--folds", "0", "--epochs", "1",
                                    "--base-channels", "4", "--levels", "2", "--device", "cpu", "--progress", "none"),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    assert f"error: {checkpoint} was refused" in done.stderr and "delete the fold folder" in done.stderr
    assert not marker.exists()


def test_fit_exports_with_bundle_dir_and_status_reads_the_run(tmp_path, train_cli, fold_weights):
    """`fit --bundle-dir` exports once the folds are done (the bundle holds the folds' own weights), and
    `status` reads each fold's epochs and last validation metrics back from the run folder."""
    from safetensors.torch import load_file

    cache, run, bundle_dir = tmp_path / "cache", tmp_path / "run", tmp_path / "bundle"
    for case in toy_cohort(4, (16, 16, 16), seed=7):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(train_cli("fit", str(cache), str(run), "--n-folds", "2", "--epochs", "1", "--base-channels", "4",
                                    "--levels", "2", "--device", "cpu", "--bundle-dir", str(bundle_dir), "--bundle-name", "toy-run",
                                    "--progress", "json"), capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["stage"] == "done" and last["bundle"] == str(bundle_dir) and last["folds"] == [0, 1]
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "toy-run" and bundle.folds == [0, 1]
    for fold in (0, 1):
        ours, exported = fold_weights(run, fold), load_file(str(bundle_dir / f"fold{fold}.safetensors"))
        assert ours.keys() == exported.keys() and all(np.array_equal(ours[k].numpy(), exported[k].numpy()) for k in ours)

    status = subprocess.run(train_cli("status", str(run), "--progress", "json"), capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 0, status.stderr
    events = [json.loads(line) for line in status.stdout.splitlines()]
    logged = {k: (tmp_path / "run" / f"fold_{k}" / "log.csv").read_text(encoding="utf-8").splitlines() for k in (0, 1)}
    for event in events[:-1]:
        row = dict(zip(logged[event["fold"]][0].split(","), logged[event["fold"]][1].split(",")))
        assert (event["state"], event["epochs_done"], event["epochs"], event["job_id"]) == ("finished", 1, 1, None)
        assert event["val_psnr"] == pytest.approx(float(row["val_psnr"])) and event["val_loss"] == pytest.approx(float(row["val_loss"]))
    assert [e["fold"] for e in events[:-1]] == [0, 1]
    assert events[-1] == {"stage": "done", "fraction": 1.0, "message": "2/2 folds finished, 2/2 epochs", "run_dir": str(run),
                          "finished": [0, 1]}


def test_fit_refuses_a_bundle_dir_it_cannot_write_before_training(tmp_path):
    from typer.testing import CliRunner

    from ContrastAmplifierTrainingLib import cli

    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=7):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    done = CliRunner().invoke(cli.app, ["fit", str(cache), str(tmp_path / "run"), "--epochs", "1", "--base-channels", "4",
                                        "--levels", "2", "--device", "cpu", "--bundle-dir", str(tmp_path / "a-file" / "bundle")])
    assert done.exit_code == 2 and "a-file" in done.output and "is a file" in done.output, done.output
    assert not (tmp_path / "run").exists()
