"""Inference benchmark: naive baseline vs the optimised ensemble, as ratios in one run.

Each configuration runs in its own child process so that its peak RAM (``ru_maxrss``) is its own.

* ``naive``: the same weights, fp32, default memory layout and threads, ``torch.no_grad``, one
  forward pass per mirroring (what a straightforward port of the paper's code does);
* ``exact``: :func:`ensemble.predict_ensemble` in fp32 with channels-last 3D (same result to ~1e-6);
* ``compiled``: ``exact`` with each fold model through ``torch.compile`` (Inductor, frozen
  weights); the first fold's compilation happens in the untimed warm-up and is reported as
  ``warmup_seconds``, further folds compile inside the timed run (as in a real case);
* ``fast``: the same as ``exact`` with bf16 autocast (documented error, see README).

Networks: the paper-size UNet (base 16, 4 levels, random weights) at 160 x 192 x 160, and the
shipped demo bundle's real weights at its own crop size (the accuracy of ``fast`` is judged there).

``device="cuda"`` runs the same three modes on the GPU: naive is fp32, default memory format, one
mirroring per forward pass; exact and fast batch the 8 mirrorings of a fold into one pass
(channels-last, fp32 or bf16 autocast). Timings include the host-to-device copy of the inputs and
the copy of the result back; the peak GPU memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

PAPER_SHAPE_ZYX = (160, 192, 160)


def _input_volume(shape_zyx: Sequence[int], channels: int, seed: int = 0) -> np.ndarray:
    """Smooth random [0, 1] volumes with a zero background, like normalised brain images."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    brain = (zz / 0.8) ** 2 + (yy / 0.85) ** 2 + (xx / 0.75) ** 2 < 1.0
    out = np.zeros((channels, *shape_zyx), np.float32)
    for c in range(channels):
        field = ndimage.gaussian_filter(rng.standard_normal(shape_zyx).astype(np.float32), 2.0)
        field = (field - field.min()) / (field.max() - field.min())
        out[c] = np.where(brain, field, 0.0)
    return out


def _models(spec: dict):
    import torch

    from .bundle import load_bundle
    from .network import NetworkConfig, build_network

    if spec.get("bundle"):
        bundle = load_bundle(spec["bundle"])
        return bundle.load_models(spec.get("folds")), bundle.network_config.in_channels
    config = NetworkConfig(base_channels=spec.get("base", 16), levels=spec.get("levels", 4))
    models = []
    for fold in range(spec["folds_count"]):
        torch.manual_seed(fold)
        models.append(build_network(config).eval())
    return models, config.in_channels


def _naive(models, x: np.ndarray, n_mirrorings: int, device: str = "cpu") -> np.ndarray:
    import torch

    from .ensemble import mirrorings

    total = np.zeros(x.shape[1:], np.float32)
    tensor = torch.from_numpy(x)[None].to(device)
    with torch.no_grad():
        for model in models:
            model.to(device)
            for dims in mirrorings(n_mirrorings):
                flipped = torch.flip(tensor, dims) if dims else tensor
                out = model(flipped)
                total += (torch.flip(out, dims) if dims else out)[0, 0].cpu().numpy()
    return total / (len(models) * n_mirrorings)


def worker(spec: dict) -> dict:
    """Run one configuration (in the current process) and return timing and peak RAM."""
    import torch

    from .ensemble import InferenceSettings, configure_cpu_threads, predict_ensemble

    models, channels = _models(spec)
    x = _input_volume(spec["shape_zyx"], channels)
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    # One untimed run first: one-time costs (allocator, kernel selection, CUDA context) are not per case.
    if spec["mode"] == "naive":
        torch.set_num_threads(spec["threads"])  # torch's default is the core count as well
        _naive(models[:1], x, 1, device)

        def run() -> np.ndarray:
            return _naive(models, x, spec["mirrorings"], device)
    else:
        configure_cpu_threads(spec["threads"])
        compiled = spec["mode"] == "compiled"
        settings = InferenceSettings.create(device, "exact" if compiled else spec["mode"], compile=compiled)  # explicit: no auto
        # On CUDA the warm-up uses the timed batch shape (cuDNN picks kernels per shape).
        warm = time.perf_counter()
        predict_ensemble(models[:1], x, spec["mirrorings"] if cuda else 1, settings)
        spec["warmup_seconds"] = time.perf_counter() - warm

        def run() -> np.ndarray:
            return predict_ensemble(models, x, spec["mirrorings"], settings)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = run()  # returns a host array: any GPU work is finished
    seconds = time.perf_counter() - start
    if spec.get("save"):
        np.save(spec["save"], out)
    row = {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "predictions": len(models) * spec["mirrorings"]}
    if "warmup_seconds" in spec:
        row["warmup_seconds"] = spec["warmup_seconds"]
    if cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` from /proc where it exists: ``ru_maxrss`` survives fork+exec on Linux, so a child
    started by a big parent would report the parent's peak (measured: 4.1 GB for a 3 MB model).
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run([sys.executable, "-m", "ContrastAmplifierLib.bench_inference", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed for {spec['mode']}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_inference_bench(out_dir: Path, threads: int = 2, bundle_dir: Optional[Path] = None,
                        shape_zyx: Sequence[int] = PAPER_SHAPE_ZYX, paper_predictions: Sequence[int] = (1, 8, 40),
                        device: str = "cpu") -> dict:
    """Print and return the inference benchmark (see module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-inference-", dir=out_dir))
    results: dict[str, object] = {"threads": threads, "shape_zyx": list(shape_zyx), "device": device}
    where = f"{threads} threads" if device == "cpu" else device
    print(f"\ninference, paper-size UNet (base 16, 4 levels, random weights) at {'x'.join(map(str, shape_zyx[::-1]))}, {where}")

    def spec(mode: str, folds: int, flips: int, save: Optional[str] = None, **extra) -> dict:
        return {"mode": mode, "folds_count": folds, "mirrorings": flips, "shape_zyx": list(shape_zyx),
                "threads": threads, "save": save, "device": device, **extra}

    def memory(row: dict) -> str:
        gpu = f"  peak GPU {row['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in row else ""
        return f"peak RAM {row['peak_rss_mb']:6.0f} MB{gpu}"

    rows: list[dict] = []
    # One fold x 8 mirrorings compares the three modes on identical work; then 1 and 40 predictions.
    modes = ("naive", "exact", "compiled", "fast")
    for mode in modes:
        r = _run_child(spec(mode, 1, 8, str(scratch / f"paper8_{mode}.npy")))
        rows.append({"mode": mode, **r})
    naive_out = np.load(scratch / "paper8_naive.npy")
    for row in rows:
        row["max_abs_diff_vs_naive"] = float(np.abs(np.load(scratch / f"paper8_{row['mode']}.npy") - naive_out).max())
    naive8 = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_naive"] = naive8 / row["seconds"]
        print(f"  {row['mode']:<8} 8 predictions: {row['seconds']:7.2f} s  ({row['seconds'] / 8:6.3f} s each)  "
              f"x{row['speedup_vs_naive']:4.2f} vs naive  {memory(row)}  max |diff| vs naive {row['max_abs_diff_vs_naive']:.1e}")
    compiled_row = next(r for r in rows if r["mode"] == "compiled")
    print(f"  (compiled: compiling the first fold model took {compiled_row['warmup_seconds']:.1f} s, untimed; "
          "further folds compile inside the per-case timings)")
    results["paper_8_predictions"] = rows
    per_case: dict[str, dict[int, float]] = {}
    for mode in modes[1:]:
        per_case[mode] = {}
        for n in paper_predictions:
            folds, flips = (1, n) if n <= 8 else (n // 8, 8)
            if n == 8:
                per_case[mode][n] = next(r["seconds"] for r in rows if r["mode"] == mode)
                continue
            per_case[mode][n] = _run_child(spec(mode, folds, flips))["seconds"]
        print(f"  {mode:<8} seconds per case: " + ", ".join(f"{n} pred. {s:.2f} s" for n, s in per_case[mode].items()))
    per_case["naive"] = {n: naive8 / 8 * n for n in paper_predictions}
    print("  naive    seconds per case (from its 8-prediction rate): " + ", ".join(f"{n} pred. {s:.2f} s" for n, s in per_case["naive"].items()))
    results["paper_seconds_per_case"] = per_case

    if bundle_dir is not None:
        from .bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        demo_shape = list(bundle.crop_size[::-1])
        print(f"\ninference, bundle '{bundle.name}' (real weights) at {'x'.join(map(str, bundle.crop_size))}, "
              f"{len(bundle.folds)} folds x 8 mirrorings")
        demo_rows = []
        for mode in modes:
            r = _run_child({"mode": mode, "bundle": str(bundle.path), "mirrorings": 8, "shape_zyx": demo_shape,
                            "threads": threads, "save": str(scratch / f"demo_{mode}.npy"), "device": device})
            demo_rows.append({"mode": mode, **r})
        ref = np.load(scratch / "demo_naive.npy")
        for row in demo_rows:
            row["max_abs_diff_vs_naive"] = float(np.abs(np.load(scratch / f"demo_{row['mode']}.npy") - ref).max())
            row["speedup_vs_naive"] = demo_rows[0]["seconds"] / row["seconds"]
            print(f"  {row['mode']:<8} {row['predictions']} predictions: {row['seconds']:6.2f} s  x{row['speedup_vs_naive']:4.2f} vs naive  "
                  f"{memory(row)}  max |diff| vs naive {row['max_abs_diff_vs_naive']:.1e}")
        results["bundle"] = {"name": bundle.name, "rows": demo_rows}
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return results


def run_end_to_end_bench(out_dir: Path, bundle_dir: Path, spacing: float = 1.0, threads: int = 2) -> dict:
    """Whole cases with a real bundle: phantom in, T1c-pro out (preprocessing + ensemble + mapping back).

    Times the paper setting (all folds x 8 mirrorings) and "quick" (1 fold x 1 mirroring) on one
    phantom case; the phantom itself is generated once, outside the timing.
    """
    from .inference import amplify_case
    from .phantom import generate_cohort

    out_dir = Path(out_dir)
    case_dir = out_dir / "end-to-end-phantom" / "case_000"
    if not (case_dir / "phantom.json").is_file():
        generate_cohort(case_dir.parent, cases=1, seed=20261, spacing=spacing)
    t1_path, flair_path, adc_path, t1c_path = (case_dir / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c"))
    results: dict[str, Any] = {}
    print(f"\nend to end on one {spacing:g} mm phantom case with bundle {Path(bundle_dir).name} ({threads} threads)")
    for label, folds, flips in (("paper", None, 8), ("quick", [0], 1)):
        start = time.perf_counter()
        result = amplify_case(t1_path, flair_path, adc_path, t1c_path, bundle=bundle_dir, out_path=out_dir / f"T1c-pro-{label}.nii.gz", folds=folds,
                              overwrite=True,  # the bench's own output of an earlier run
                              n_mirrorings=flips, device="cpu", threads=threads)
        seconds = time.perf_counter() - start
        results[label] = {"seconds": seconds, "predictions": result.n_predictions,
                          "timings_s": {k: round(v, 2) for k, v in result.timings_s.items()}}
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items() if k != "total")
        print(f"  {label:<6} {result.n_predictions:2d} predictions: {seconds:6.1f} s  ({stages})")
    results["peak_rss_mb_process"] = peak_rss_mb()
    return results


if __name__ == "__main__":  # child process entry: one configuration, JSON result on the last line
    print(json.dumps(worker(json.loads(sys.argv[1]))))
