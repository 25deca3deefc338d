"""Exporting a finished run as a model bundle (export.py): two toy folds fitted, exported, reloaded, tampered with."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from ContrastAmplifierLib.bundle import BundleError, load_bundle
from ContrastAmplifierTrainingLib.export import export_bundle
from ContrastAmplifierTrainingLib.fit import fit_cases
from ContrastAmplifierTrainingLib.toy import toy_cohort


def test_end_to_end_two_folds_export_reload_and_tamper(tmp_path, toy_shape, tiny_net, cpu_config, fold_weights):
    cases = toy_cohort(4, toy_shape, seed=1)
    rows = []
    results = fit_cases(cases, tmp_path / "run", n_folds=2, config=cpu_config(2), on_epoch=rows.append)
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
    record = json.loads((tmp_path / "bundle" / "bundle.json").read_text(encoding="utf-8"))["training"]
    assert (record["mode"], record["batch_size"], record["patch_size"], record["loss"]) == (
        "whole volume (paper)", 1, None, "MSE")
    assert again.crop_size == (32, 32, 32) and again.network_config == tiny_net
    assert again.percentiles == {k: tuple(v) for k, v in plan["geometry"]["percentiles"].items()}
    model = again.load_model(1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fold_weights(tmp_path / "run", 1)[name])
    with torch.no_grad():
        out = model(torch.rand(1, 4, 31, 29, 27))
    assert out.shape == (1, 1, 31, 29, 27) and 0 <= float(out.min()) <= float(out.max()) <= 1

    weights = tmp_path / "bundle" / "fold0.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fold0.safetensors"):
        load_bundle(bundle.path)
