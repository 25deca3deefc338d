"""Fit loop on toy 32^3 cases: end to end with export, determinism, resume after a kill, refused checkpoints."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ContrastAmplifierLib.bundle import BundleError, load_bundle
from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.data import save_cached_case
from ContrastAmplifierTrainingLib.export import export_bundle
from ContrastAmplifierTrainingLib.fit import PlanMismatchError, fit_cases
from ContrastAmplifierTrainingLib.toy import toy_cohort
from ContrastAmplifierTrainingLib.trainer import CheckpointError, TrainConfig

torch.set_num_threads(1)
NET = NetworkConfig(base_channels=8, levels=3)
SHAPE = (32, 32, 32)


def _config(epochs: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(epochs=epochs, seed=seed, network=NET, device="cpu")


def _weights(out_dir: Path, fold: int) -> dict:
    return load_file(str(out_dir / f"fold_{fold}" / "final.safetensors"))


def test_end_to_end_two_folds_export_reload_and_tamper(tmp_path):
    cases = toy_cohort(4, SHAPE, seed=1)
    rows = []
    results = fit_cases(cases, tmp_path / "run", n_folds=2, config=_config(2), on_epoch=rows.append)
    assert [r.fold for r in results] == [0, 1]
    assert [(r["fold"], r["epoch"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for row in rows:
        assert row["train_loss"] > 0 and row["val_loss"] > 0 and 0 < row["val_ssim"] <= 1 and row["val_psnr"] > 0
    with open(tmp_path / "run" / "fold_1" / "log.csv", encoding="utf-8") as handle:
        log = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in log] == [1, 2]
    assert set(log[0]) == {"fold", "epoch", "train_loss", "val_loss", "val_psnr", "val_ssim", "seconds", "lr", "rollbacks"}
    assert [float(r["lr"]) for r in log] == [1e-3, 1e-3] and [int(r["rollbacks"]) for r in log] == [0, 0]
    seconds = [float(r["seconds"]) for r in log]
    print(f"\nseconds per epoch (2 training cases of 32^3, base 8 x 3 levels, 1 thread): {seconds}")

    plan = json.loads((tmp_path / "run" / "plan.json").read_text(encoding="utf-8"))
    assert {c["fold"] for c in plan["cases"]} == {0, 1}
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", name="toy", intended_use="tests only - not for clinical use",
                           training_data="toy arrays")
    again = load_bundle(tmp_path / "bundle")
    assert again.folds == [0, 1] and again.modalities == ["t1", "flair", "adc", "t1c"]
    assert again.crop_size == (32, 32, 32) and again.network_config == NET
    assert again.percentiles == {k: tuple(v) for k, v in plan["geometry"]["percentiles"].items()}
    model = again.load_model(1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, _weights(tmp_path / "run", 1)[name])
    with torch.no_grad():
        out = model(torch.rand(1, 4, 31, 29, 27))
    assert out.shape == (1, 1, 31, 29, 27) and 0 <= float(out.min()) <= float(out.max()) <= 1

    weights = tmp_path / "bundle" / "fold0.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fold0.safetensors"):
        load_bundle(bundle.path)


def test_two_seeded_cpu_runs_give_identical_weights(tmp_path):
    cases = toy_cohort(4, SHAPE, seed=2)
    for name in ("a", "b"):
        fit_cases(cases, tmp_path / name, folds=[1], n_folds=2, config=_config(2, seed=7))
    a, b = _weights(tmp_path / "a", 1), _weights(tmp_path / "b", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fit_cases(cases, tmp_path / "c", folds=[1], n_folds=2, config=_config(2, seed=8))
    c = _weights(tmp_path / "c", 1)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_rerun_skips_finished_folds_and_refuses_other_settings(tmp_path):
    cases = toy_cohort(4, SHAPE, seed=3)
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=_config(1))
    before = (tmp_path / "run" / "fold_0" / "final.safetensors").stat().st_mtime_ns
    rows = []
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=_config(1), on_epoch=rows.append)
    assert rows == [] and (tmp_path / "run" / "fold_0" / "final.safetensors").stat().st_mtime_ns == before
    with pytest.raises(PlanMismatchError, match="seed"):
        fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=_config(1, seed=5))
    other_lr = TrainConfig(epochs=1, network=NET, device="cpu", learning_rate=5e-4)  # close, but not the same run
    with pytest.raises(PlanMismatchError, match="learning_rate"):
        fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=other_lr)


def test_clip_percentiles_are_an_option_recorded_in_plan_and_bundle(tmp_path):
    """--clip-percentiles: a higher T1c clip (demo model: 1 99.99) reaches the plan and the bundle."""
    cases = toy_cohort(4, SHAPE, seed=4)
    fit_cases(cases, tmp_path / "paper", folds=[0], n_folds=2, config=_config(1))
    fit_cases(cases, tmp_path / "wide", folds=[0], n_folds=2, config=_config(1), percentile_levels=(1.0, 99.99))
    paper = json.loads((tmp_path / "paper" / "plan.json").read_text(encoding="utf-8"))["geometry"]
    wide = json.loads((tmp_path / "wide" / "plan.json").read_text(encoding="utf-8"))["geometry"]
    assert paper["percentile_levels"] == [1.0, 99.0] and wide["percentile_levels"] == [1.0, 99.99]
    assert wide["percentiles"]["t1c"][1] > paper["percentiles"]["t1c"][1]
    assert wide["percentiles"]["t1c"][0] == pytest.approx(paper["percentiles"]["t1c"][0])
    bundle = export_bundle(tmp_path / "wide", tmp_path / "bundle", folds=[0], name="toy", intended_use="tests only - not for clinical use")
    assert load_bundle(bundle.path).manifest["geometry"]["percentile_levels"] == [1.0, 99.99]
    with pytest.raises(ValueError, match="--clip-percentiles"):
        fit_cases(cases, tmp_path / "bad", folds=[0], n_folds=2, config=_config(1), percentile_levels=(99.0, 1.0))


def test_fold_copied_back_without_checkpoint_and_plan_within_tolerance_resume(tmp_path):
    """A run trained elsewhere and copied back without checkpoint.pt (as from the GPU node) is
    finished; plan percentiles off by < 0.01 z (a float16 copy of the cache) still match."""
    cases = toy_cohort(4, SHAPE, seed=5)
    run = tmp_path / "run"
    fit_cases(cases, run, folds=[0], n_folds=2, config=_config(2))
    (run / "fold_0" / "checkpoint.pt").unlink()
    stamp = (run / "fold_0" / "final.safetensors").stat().st_mtime_ns
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    plan["geometry"]["percentiles"]["t1c"][1] += 0.005
    (run / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    rows = []
    (result,) = fit_cases(cases, run, folds=[0], n_folds=2, config=_config(2), on_epoch=rows.append)
    assert rows == [] and result.epochs == 2
    assert (run / "fold_0" / "final.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        fit_cases(cases, run, folds=[0], n_folds=2, config=_config(3))
    plan["geometry"]["percentiles"]["t1c"][1] += 0.5
    (run / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match="geometry"):
        fit_cases(cases, run, folds=[0], n_folds=2, config=_config(2))


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


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "ContrastAmplifierTrainingLib.cli", *args]


def test_resume_after_killing_the_process_mid_epoch(tmp_path):
    cache = tmp_path / "cache"
    for case in toy_cohort(6, SHAPE, seed=4):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    args = ["fit", str(cache), None, "--n-folds", "2", "--folds", "0", "1", "--epochs", "3", "--base-channels", "8",
            "--levels", "3", "--device", "cpu", "--progress", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, kill_at: str | None = None) -> list:
        cmd = _cli(*[str(out) if a is None else a for a in args])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        events = []
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if kill_at is not None and kill_at in event.get("message", ""):
                proc.send_signal(signal.SIGKILL)  # no chance to clean up: worst case
                break
        proc.wait(timeout=600)
        stderr = proc.stderr.read()
        if kill_at is None:
            assert proc.returncode == 0, stderr
        else:
            assert proc.returncode == -signal.SIGKILL, stderr
        return events

    killed = tmp_path / "killed"
    first = run(killed, kill_at="fold 1 epoch 2/3 case 2/3")
    assert [(e["fold"], e["epoch"]) for e in first if e["stage"] == "epoch"] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    second = run(killed)
    epochs = [(e["fold"], e["epoch"]) for e in second if e["stage"] == "epoch"]
    assert epochs == [(1, 2), (1, 3)], "finished folds and epochs must not be repeated"
    assert second[-1]["stage"] == "done" and second[-1]["folds"] == [0, 1]
    with open(killed / "fold_1" / "log.csv", encoding="utf-8") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3]

    straight = tmp_path / "straight"
    run(straight)
    for fold in (0, 1):
        a, b = _weights(killed, fold), _weights(straight, fold)
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must equal an uninterrupted run"


def test_sigterm_stops_cleanly_with_a_cancelled_event(tmp_path):
    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=5):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    cmd = _cli("fit", str(cache), str(tmp_path / "run"), "--n-folds", "2", "--epochs", "50", "--base-channels", "4",
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_training_tracks_fp32_on_cuda(tmp_path):
    cases = toy_cohort(4, SHAPE, seed=6)
    losses = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(epochs=3, network=NET, device="cuda", precision=precision, cudnn_benchmark=False)
        (result,) = fit_cases(cases, tmp_path / precision, folds=[0], n_folds=2, config=config)
        losses[precision] = result.metrics["val_loss"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.1 * losses["fp32"] + 1e-3, losses


def test_divergence_guard_rolls_back_halves_lr_and_redoes_the_epoch(tmp_path, monkeypatch):
    """An epoch whose validation loss jumps (as two demo folds did on a GPU at Adam 1e-3) is undone:
    the weights and Adam state come back from the previous checkpoint, the learning rate halves,
    the epoch is redone, and the log keeps one row per epoch."""
    from ContrastAmplifierTrainingLib import trainer

    real_evaluate = trainer.evaluate
    calls = []

    def evaluate_with_one_blow_up(model, cases, device, precision):
        metrics = real_evaluate(model, cases, device, precision)
        calls.append(metrics["val_loss"])
        if len(calls) == 3:  # the first try of epoch 3 "diverges"
            metrics = {**metrics, "val_loss": metrics["val_loss"] * 10}
        return metrics

    monkeypatch.setattr(trainer, "evaluate", evaluate_with_one_blow_up)
    cases = toy_cohort(4, SHAPE, seed=2)
    messages = []
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=_config(4),
              progress=lambda stage, fraction, message="": messages.append(message))
    with open(tmp_path / "run" / "fold_0" / "log.csv", encoding="utf-8") as handle:
        log = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert [float(r["lr"]) for r in log] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert [int(r["rollbacks"]) for r in log] == [0, 0, 1, 1]
    assert len(calls) == 5 and any("diverged" in m and "rolled back" in m for m in messages)
    # the redone epoch 3 started from epoch 2's weights, not from the diverged ones: its loss is
    # not the value that was rejected
    assert float(log[2]["val_loss"]) != pytest.approx(calls[2] * 10)

    # a loss that stays non-finite after epoch 1: MAX_ROLLBACKS tries, then a clear error
    first = []

    def nan_after_first_epoch(model, cases, device, precision):
        first.append(1)
        return real_evaluate(model, cases, device, precision) if len(first) == 1 else {"val_loss": float("nan"), "val_psnr": 0.0, "val_ssim": 0.0}

    monkeypatch.setattr(trainer, "evaluate", nan_after_first_epoch)
    with pytest.raises(RuntimeError, match="lower --lr"):
        fit_cases(cases, tmp_path / "run2", folds=[0], n_folds=2, config=_config(3))
    assert len(first) == 1 + trainer.MAX_ROLLBACKS + 1


# -- a checkpoint that torch.load(weights_only=True) refuses: one clear error, nothing executed ----


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"epoch": 1, "model": _Payload(marker)})


def _malicious_torch_zip(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model": _Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("payload", [_malicious_pickle, _malicious_torch_zip], ids=["pickle", "torch-zip"])
def test_malicious_checkpoint_is_refused_naming_the_file_and_never_run(tmp_path, payload):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(payload(marker))
    with pytest.raises(CheckpointError, match=r"fold_0/checkpoint\.pt was refused: .*never unpickled.*delete the fold folder .*fold_0 to train this fold again"):
        fit_cases(toy_cohort(4, (16, 16, 16), seed=7), tmp_path / "run", folds=[0], n_folds=2,
                  config=TrainConfig(epochs=1, network=NetworkConfig(base_channels=4, levels=2), device="cpu"))
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    cases = toy_cohort(4, (16, 16, 16), seed=8)
    config = lambda epochs: TrainConfig(epochs=epochs, network=NetworkConfig(base_channels=4, levels=2), device="cpu")  # noqa: E731
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=config(1))
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is truncated or corrupted \(\w+: .*delete"):
        fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=config(2))
    shutil.rmtree(checkpoint.parent)  # the fix the message gives: the fold is trained again
    (result,) = fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=config(2))
    assert result.epochs == 2


def test_malicious_checkpoint_through_the_cli_is_one_error_line(tmp_path):
    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=9):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(_malicious_torch_zip(marker))
    done = subprocess.run(_cli("fit", str(cache), str(tmp_path / "run"), "--n-folds", "2", "--folds", "0", "--epochs", "1",
                               "--base-channels", "4", "--levels", "2", "--device", "cpu", "--progress", "none"),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    assert f"error: {checkpoint} was refused" in done.stderr and "delete the fold folder" in done.stderr
    assert not marker.exists()
