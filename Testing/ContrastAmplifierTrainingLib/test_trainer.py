"""One fold's fit loop (trainer.py) on toy cases: determinism, resume after a kill, bf16 on CUDA, the
divergence guard, and refused checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.data import save_cached_case
from ContrastAmplifierTrainingLib.fit import fit_cases
from ContrastAmplifierTrainingLib.toy import toy_cohort
from ContrastAmplifierTrainingLib.trainer import CheckpointError, TrainConfig


def test_two_seeded_cpu_runs_give_identical_weights(tmp_path, toy_shape, cpu_config, fold_weights):
    cases = toy_cohort(4, toy_shape, seed=2)
    for name in ("a", "b"):
        fit_cases(cases, tmp_path / name, folds=[1], n_folds=2, config=cpu_config(2, seed=7))
    a, b = fold_weights(tmp_path / "a", 1), fold_weights(tmp_path / "b", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fit_cases(cases, tmp_path / "c", folds=[1], n_folds=2, config=cpu_config(2, seed=8))
    c = fold_weights(tmp_path / "c", 1)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_killing_the_process_mid_epoch(tmp_path, toy_shape, train_cli, fold_weights):
    cache = tmp_path / "cache"
    for case in toy_cohort(6, toy_shape, seed=4):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    args = ["fit", str(cache), None, "--n-folds", "2", "--folds", "0", "1", "--epochs", "3", "--base-channels", "8",
            "--levels", "3", "--device", "cpu", "--progress", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, kill_at: str | None = None) -> list:
        cmd = train_cli(*[str(out) if a is None else a for a in args])
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
        a, b = fold_weights(killed, fold), fold_weights(straight, fold)
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must equal an uninterrupted run"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_training_tracks_fp32_on_cuda(tmp_path, toy_shape, tiny_net):
    cases = toy_cohort(4, toy_shape, seed=6)
    losses = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(epochs=3, network=tiny_net, device="cuda", precision=precision, cudnn_benchmark=False)
        (result,) = fit_cases(cases, tmp_path / precision, folds=[0], n_folds=2, config=config)
        losses[precision] = result.metrics["val_loss"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.1 * losses["fp32"] + 1e-3, losses


def test_divergence_guard_rolls_back_halves_lr_and_redoes_the_epoch(tmp_path, monkeypatch, toy_shape, cpu_config):
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
    cases = toy_cohort(4, toy_shape, seed=2)
    messages = []
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=cpu_config(4),
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
        fit_cases(cases, tmp_path / "run2", folds=[0], n_folds=2, config=cpu_config(3))
    assert len(first) == 1 + trainer.MAX_ROLLBACKS + 1


# -- a checkpoint that torch.load(weights_only=True) refuses: one clear error, nothing executed ----


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_malicious_checkpoint_is_refused_naming_the_file_and_never_run(tmp_path, kind, malicious_checkpoint):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(malicious_checkpoint(kind, marker))
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


# -- patch mode (patches.py) beside the paper's whole volumes --------------------------------------


class _CaseSource:
    """A CaseSource that is not a list (as an on-the-fly phantom generator would be)."""

    def __init__(self, cases):
        self._cases = list(cases)

    def __len__(self) -> int:
        return len(self._cases)

    def case(self, index: int):
        return self._cases[index]


def _tensors(n: int, shape, seed: int):
    from ContrastAmplifierTrainingLib.data import to_training_case, train_set_percentiles

    cached = toy_cohort(n, shape, seed=seed)
    percentiles = train_set_percentiles(cached)
    return [to_training_case(c, percentiles) for c in cached]


def test_whole_volume_mode_is_the_papers_loop_bit_for_bit(tmp_path):
    """Paper mode (no patch size) still is: Adam, batch 1, MSE, epoch_plan order and mirroring; a
    CaseSource object gives the very same weights as the list."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from ContrastAmplifierLib.network import ResidualUNet3D
    from ContrastAmplifierTrainingLib.trainer import epoch_plan, fit_fold

    cases = _tensors(3, (16, 16, 16), seed=21)
    config = TrainConfig(epochs=2, seed=3, network=NetworkConfig(base_channels=4, levels=2), device="cpu", divergence_guard=False)
    torch.manual_seed(config.seed * 1000 + 1)
    model = ResidualUNet3D(config.network)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for epoch in range(config.epochs):
        order, axes = epoch_plan(config.seed, 1, epoch, 2, True)
        for index in order:
            dims = [d + 1 for d in range(3) if axes[index][d]]
            x, y = (torch.flip(t, dims)[None] for t in (cases[index].inputs, cases[index].target))
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(model(x).float(), y).backward()
            optimizer.step()
    expected = model.state_dict()
    for name, train in (("list", cases[:2]), ("source", _CaseSource(cases[:2]))):
        fit_fold(1, train, cases[2:], tmp_path / name, config)
        got = load_file(str(tmp_path / name / "final.safetensors"))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_patch_mode_resume_after_interruption_gives_identical_weights(tmp_path, tiny_net, toy_shape, fold_weights):
    from ContrastAmplifierCommon.progress import CancelToken, Cancelled
    from ContrastAmplifierTrainingLib.trainer import fit_fold

    cases = _tensors(4, toy_shape, seed=22)
    config = TrainConfig(epochs=3, network=tiny_net, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                         patches_per_epoch=4, enhancement_weight=2.0)
    straight = fit_fold(0, _CaseSource(cases[:3]), cases[3:], tmp_path / "straight" / "fold_0", config)
    assert [int(r["epoch"]) for r in straight.history] == [1, 2, 3]

    cancel = CancelToken()
    messages = []

    def stop_mid_epoch_2(stage, fraction, message=""):
        messages.append(message)
        if "epoch 2/3 batch 1/2" in message:
            cancel.cancel()

    with pytest.raises(Cancelled):
        fit_fold(0, cases[:3], cases[3:], tmp_path / "killed" / "fold_0", config, progress=stop_mid_epoch_2, cancel=cancel)
    assert "fold 0 epoch 1/3 batch 2/2" in messages
    rows = []
    fit_fold(0, cases[:3], cases[3:], tmp_path / "killed" / "fold_0", config, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [2, 3]
    a, b = fold_weights(tmp_path / "straight", 0), fold_weights(tmp_path / "killed", 0)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed patch training must equal an uninterrupted run"


def test_resume_with_other_patch_settings_is_refused(tmp_path, tiny_net, toy_shape):
    from ContrastAmplifierTrainingLib.fit import PlanMismatchError
    from ContrastAmplifierTrainingLib.trainer import fit_fold

    cases = _tensors(3, toy_shape, seed=23)
    patched = TrainConfig(epochs=1, network=tiny_net, device="cpu", patch_size=(16, 16, 16), patches_per_epoch=2)
    fold = tmp_path / "fold_0"
    fit_fold(0, cases[:2], cases[2:], fold, patched)
    other = TrainConfig(epochs=2, network=tiny_net, device="cpu", patch_size=(8, 8, 8), patches_per_epoch=2)
    with pytest.raises(CheckpointError, match=r"other patch/loss settings \(patch_size \[16, 16, 16\] -> \[8, 8, 8\]\).*--patch-size"):
        fit_fold(0, cases[:2], cases[2:], fold, other)
    with pytest.raises(CheckpointError, match=r"patch_size \[16, 16, 16\] -> None"):
        fit_fold(0, cases[:2], cases[2:], fold, TrainConfig(epochs=2, network=tiny_net, device="cpu"))
    weighted = TrainConfig(epochs=2, network=tiny_net, device="cpu", patch_size=(16, 16, 16), patches_per_epoch=2, enhancement_weight=1.0)
    with pytest.raises(CheckpointError, match=r"enhancement_weight 0\.0 -> 1\.0"):
        fit_fold(0, cases[:2], cases[2:], fold, weighted)
    assert fit_fold(0, cases[:2], cases[2:], fold, dataclasses.replace(patched, epochs=2)).epochs == 2

    # the run's plan.json refuses too; a plan and a checkpoint from before patch mode read as the paper's
    toy = toy_cohort(4, (16, 16, 16), seed=24)
    small = NetworkConfig(base_channels=4, levels=2)
    paper = TrainConfig(epochs=1, network=small, device="cpu")
    fit_cases(toy, tmp_path / "run", folds=[0], n_folds=2, config=paper)
    with pytest.raises(PlanMismatchError, match="patch_size"):
        fit_cases(toy, tmp_path / "run", folds=[0], n_folds=2,
                  config=TrainConfig(epochs=1, network=small, device="cpu", patch_size=(8, 8, 8)))
    plan_path = tmp_path / "run" / "plan.json"
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    assert plan["patch_size"] is None and plan["batch_size"] == 1 and plan["enhancement_weight"] == 0.0
    for key in ("patch_size", "lesion_fraction", "patches_per_epoch", "batch_size", "enhancement_weight", "enhancement_threshold"):
        del plan[key]
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    checkpoint = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["patch"]
    torch.save(state, checkpoint)
    (result,) = fit_cases(toy, tmp_path / "run", folds=[0], n_folds=2, config=TrainConfig(epochs=2, network=small, device="cpu"))
    assert result.epochs == 2
