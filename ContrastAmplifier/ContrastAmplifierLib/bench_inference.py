"""Inference benchmark: naive baseline vs the optimised ensemble, as ratios in one run.

Each configuration runs in its own child process so that its peak RAM (``ru_maxrss``) is its own.

* ``naive``: the same weights, fp32, default memory layout and threads, ``torch.no_grad``, one
  forward pass per mirroring (what a straightforward port of the paper's code does);
* ``exact``: :func:`ensemble.predict_ensemble` in fp32 with channels-last 3D (same result to ~1e-6);
* ``compiled``: ``exact`` with each fold model through ``torch.compile`` (Inductor, frozen
  weights); the first fold's compilation happens in the untimed warm-up and is reported as
  ``warmup_seconds``, further folds compile inside the timed run (as in a real case);
* ``fast``: the same as ``exact`` with bf16 autocast (documented error, see README);
* ``ov-exact``, ``ov-fast``, ``ov-int8``: the OpenVINO backend (what ``--backend auto`` runs on a
  CPU with ``openvino`` installed) in f32, bf16 (f32 where the CPU has no BF16) and int8 (NNCF,
  :mod:`.openvino_int8`). Each fold's conversion (and quantisation) is cached on first use: a
  separate child process does it first ("first use", untimed, its own peak RAM), so the timed
  run is what every later case costs. int8 calibrates a random-weights network on synthetic
  volumes (:data:`SYNTHETIC_CALIBRATION_SEEDS`; the timed input is seed 0) and a bundle on its
  phantoms, where its accuracy rule gives the verdict.

Networks: the paper-size UNet (base 16, 4 levels, random weights) at 160 x 192 x 160, and the
shipped demo bundle's real weights at its own crop size (the accuracy of ``fast`` is judged there).

Issue 18's targets (:data:`TARGETS`, :func:`target_rows`): ``--precision exact``, ``fast`` and
``int8`` as ``--backend auto`` runs them on the CPU (OpenVINO when installed) against naive, at
the paper size with 1 fold x 8 mirrorings; the max difference is the worse of the paper-size
and the bundle's; int8's accuracy is its rule's verdict on the bundle; peak RAM is the largest
``VmHWM`` of the timed runs.

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
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np

PAPER_SHAPE_ZYX = (160, 192, 160)
#: Every mode: ``(backend, precision, torch.compile)``; ``naive`` is the baseline (module docstring).
MODES: dict[str, Optional[tuple[str, str, bool]]] = {
    "naive": None,
    "exact": ("torch", "exact", False),
    "compiled": ("torch", "exact", True),
    "fast": ("torch", "fast", False),
    "ov-exact": ("openvino", "exact", False),
    "ov-fast": ("openvino", "fast", False),
    "ov-int8": ("openvino", "int8", False),
}
#: Issue 18's CPU targets per precision: (least speed-up vs naive, largest max |diff| vs naive or,
#: for int8, ``None``: its accuracy rule instead).
TARGETS: dict[str, tuple[float, Optional[float]]] = {"exact": (2.5, 1e-5), "fast": (3.5, 5e-3), "int8": (5.0, None)}
PEAK_RAM_TARGET_MB = 4000.0
#: Synthetic calibration volumes of ``ov-int8`` on a random-weights network (the timed input is seed 0).
SYNTHETIC_CALIBRATION_SEEDS = (1, 2)


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


def _synthetic_inputs(shape_zyx: Sequence[int], channels: int) -> list[np.ndarray]:
    return [_input_volume(shape_zyx, channels, seed) for seed in SYNTHETIC_CALIBRATION_SEEDS]


def _settings(spec: dict, models, channels: int) -> tuple[Any, Optional[dict]]:
    """The mode's inference settings (explicit: no auto), and for ``ov-int8`` with a bundle its verdict."""
    from .ensemble import InferenceSettings

    mode = MODES[spec["mode"]]
    assert mode is not None
    backend, precision, compiled = mode
    settings = InferenceSettings.create(spec.get("device", "cpu"), precision, compile=compiled, backend=backend)
    if precision != "int8":
        return settings, None
    from . import openvino_int8

    if spec.get("bundle") and spec.get("int8_check", True):
        from .bundle import load_bundle

        bundle = load_bundle(spec["bundle"])
        settings = replace(settings, calibration=openvino_int8.bundle_calibration(bundle))
        return settings, asdict(openvino_int8.accept_int8(bundle, models, spec["mirrorings"], settings))
    shape = [int(s) for s in spec["shape_zyx"]]
    identity = {"kind": "synthetic", "seeds": list(SYNTHETIC_CALIBRATION_SEEDS), "shape_zyx": shape, "channels": channels}
    return replace(settings, calibration=openvino_int8.CalibrationSet(identity, partial(_synthetic_inputs, shape, channels))), None


def worker(spec: dict) -> dict:
    """Run one configuration (in the current process) and return timing and peak RAM.

    ``spec["prepare"]``: only an OpenVINO mode's first use (every fold converted, and quantised,
    into the cache), timed as a whole.
    """
    import torch

    from .ensemble import configure_cpu_threads, predict_ensemble

    started = time.perf_counter()
    models, channels = _models(spec)
    x = _input_volume(spec["shape_zyx"], channels)
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    verdict = None
    # One untimed run first: one-time costs (allocator, kernel selection, CUDA context) are not per case.
    if spec["mode"] == "naive":
        torch.set_num_threads(spec["threads"])  # torch's default is the core count as well
        _naive(models[:1], x, 1, device)

        def run() -> np.ndarray:
            return _naive(models, x, spec["mirrorings"], device)
    else:
        configure_cpu_threads(spec["threads"])
        settings, verdict = _settings(spec, models, channels)
        if spec.get("prepare"):
            predict_ensemble(models, x, 1, settings)
            return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                    **({"int8_verdict": verdict} if verdict is not None else {})}
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
    if verdict is not None:
        row["int8_verdict"] = verdict
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


def _measure(spec: dict) -> dict:
    """One timed child; an OpenVINO mode's first use (conversion, quantisation) runs in a child before it."""
    first = _run_child({**spec, "prepare": True, "save": None}) if spec["mode"].startswith("ov-") else None
    row = _run_child(spec)
    if first is not None:
        row["first_use_seconds"] = first["seconds"]
        row["first_use_peak_rss_mb"] = first["peak_rss_mb"]
    return row


def torch_cpu_bf16() -> bool:
    """Whether PyTorch's oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX); without them bf16 is emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an older or a different build: assume it has
        return True


def available_modes(device: str = "cpu") -> tuple[str, ...]:
    """Every mode worth running here: torch's ``fast`` on the CPU only with oneDNN bf16 (emulated, it
    ran over 9 minutes for 8 predictions at 160 x 192 x 160 on an AVX2 CPU, over 5x fp32 in the same run, and was
    stopped); the OpenVINO ones on the CPU with ``openvino`` (int8: and ``nncf``)."""
    modes = ["naive", "exact", "compiled"] + (["fast"] if device != "cpu" or torch_cpu_bf16() else [])
    if device == "cpu":
        from . import openvino_backend

        if openvino_backend.available():
            modes += ["ov-exact", "ov-fast"]
            try:
                from .openvino_int8 import require_nncf

                require_nncf()
                modes.append("ov-int8")
            except ValueError:
                pass
    return tuple(modes)


def _note(row: dict) -> str:
    notes = []
    if "warmup_seconds" in row and row["mode"] == "compiled":
        notes.append(f"compiling fold 1 took {row['warmup_seconds']:.1f} s, untimed")
    if "first_use_seconds" in row:
        notes.append(f"first use {row['first_use_seconds']:.1f} s (peak RAM {row['first_use_peak_rss_mb']:.0f} MB), untimed, cached")
    return f"  ({'; '.join(notes)})" if notes else ""


def run_inference_bench(out_dir: Path, threads: int = 2, bundle_dir: Optional[Path] = None,
                        shape_zyx: Sequence[int] = PAPER_SHAPE_ZYX, paper_predictions: Sequence[int] = (1, 8, 40),
                        device: str = "cpu", modes: Optional[Sequence[str]] = None, int8_check: bool = True) -> dict:
    """Print and return the inference benchmark and its targets (see module docstring).

    ``modes``: a subset of :data:`MODES` (``naive`` is always run; default :func:`available_modes`);
    ``int8_check``: ``ov-int8`` on the bundle runs its accuracy rule (calibration and check on
    phantoms on first use, minutes); off: synthetic calibration, no verdict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-inference-", dir=out_dir))
    if modes is None and "fast" not in available_modes(device):
        print("(torch's fast mode skipped: oneDNN has no bf16 kernels on this CPU; emulated bf16 is many times slower "
              "than fp32, and --precision auto keeps fp32 on the CPU)")
    modes = ("naive", *[m for m in (modes or available_modes(device)) if m != "naive"])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown bench modes {unknown}: use {', '.join(MODES)}")
    results: dict[str, Any] = {"threads": threads, "shape_zyx": list(shape_zyx), "device": device, "modes": list(modes)}
    if any(m.startswith("ov-") for m in modes):
        from .openvino_backend import supports_bf16

        results["openvino_bf16"] = supports_bf16()
    where = f"{threads} threads" if device == "cpu" else device
    print(f"\ninference, paper-size UNet (base 16, 4 levels, random weights) at {'x'.join(map(str, shape_zyx[::-1]))}, {where}")

    def spec(mode: str, folds: int, flips: int, save: Optional[str] = None, **extra) -> dict:
        return {"mode": mode, "folds_count": folds, "mirrorings": flips, "shape_zyx": list(shape_zyx),
                "threads": threads, "save": save, "device": device, **extra}

    def memory(row: dict) -> str:
        gpu = f"  peak GPU {row['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in row else ""
        return f"peak RAM {row['peak_rss_mb']:6.0f} MB{gpu}"

    rows: list[dict] = []
    # One fold x 8 mirrorings compares the modes on identical work; then 1 and 40 predictions.
    for mode in modes:
        r = _measure(spec(mode, 1, 8, str(scratch / f"paper8_{mode}.npy")))
        rows.append({"mode": mode, **r})
    naive_out = np.load(scratch / "paper8_naive.npy")
    for row in rows:
        row["max_abs_diff_vs_naive"] = float(np.abs(np.load(scratch / f"paper8_{row['mode']}.npy") - naive_out).max())
    naive8 = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_naive"] = naive8 / row["seconds"]
        print(f"  {row['mode']:<8} 8 predictions: {row['seconds']:7.2f} s  ({row['seconds'] / 8:6.3f} s each)  "
              f"x{row['speedup_vs_naive']:4.2f} vs naive  {memory(row)}  max |diff| vs naive {row['max_abs_diff_vs_naive']:.1e}"
              + _note(row))
    results["paper_8_predictions"] = rows
    per_case: dict[str, dict[int, float]] = {}
    peaks: dict[str, float] = {r["mode"]: r["peak_rss_mb"] for r in rows}
    for mode in modes[1:]:
        per_case[mode] = {}
        for n in paper_predictions:
            folds, flips = (1, n) if n <= 8 else (n // 8, 8)
            if n == 8:
                per_case[mode][n] = next(r["seconds"] for r in rows if r["mode"] == mode)
                continue
            row = _measure(spec(mode, folds, flips))
            per_case[mode][n] = row["seconds"]
            peaks[mode] = max(peaks[mode], row["peak_rss_mb"])
        print(f"  {mode:<8} seconds per case: " + ", ".join(f"{n} pred. {s:.2f} s" for n, s in per_case[mode].items()))
    per_case["naive"] = {n: naive8 / 8 * n for n in paper_predictions}
    print("  naive    seconds per case (from its 8-prediction rate): " + ", ".join(f"{n} pred. {s:.2f} s" for n, s in per_case["naive"].items()))
    results["paper_seconds_per_case"] = per_case
    results["paper_peak_rss_mb"] = peaks

    if bundle_dir is not None:
        results["bundle"] = _bundle_bench(Path(bundle_dir), modes, threads, device, scratch, int8_check, memory)
    if device == "cpu":
        results["targets"] = target_rows(results)
        print("\n" + targets_table(results["targets"]))
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return results


def _bundle_bench(bundle_dir: Path, modes: Sequence[str], threads: int, device: str, scratch: Path, int8_check: bool,
                  memory: Any) -> dict:
    """Every mode with the bundle's real weights at its crop size, all folds x 8 mirrorings."""
    from .bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    demo_shape = list(bundle.crop_size[::-1])
    print(f"\ninference, bundle '{bundle.name}' (real weights) at {'x'.join(map(str, bundle.crop_size))}, "
          f"{len(bundle.folds)} folds x 8 mirrorings")
    demo_rows = []
    for mode in modes:
        r = _measure({"mode": mode, "bundle": str(bundle.path), "mirrorings": 8, "shape_zyx": demo_shape,
                      "threads": threads, "save": str(scratch / f"demo_{mode}.npy"), "device": device,
                      "int8_check": int8_check})
        demo_rows.append({"mode": mode, **r})
    ref = np.load(scratch / "demo_naive.npy")
    for row in demo_rows:
        row["max_abs_diff_vs_naive"] = float(np.abs(np.load(scratch / f"demo_{row['mode']}.npy") - ref).max())
        row["speedup_vs_naive"] = demo_rows[0]["seconds"] / row["seconds"]
        print(f"  {row['mode']:<8} {row['predictions']} predictions: {row['seconds']:6.2f} s  x{row['speedup_vs_naive']:4.2f} vs naive  "
              f"{memory(row)}  max |diff| vs naive {row['max_abs_diff_vs_naive']:.1e}" + _note(row))
        if row.get("int8_verdict"):
            print(f"           int8 rule {_verdict_words(row['int8_verdict'])}")
    return {"name": bundle.name, "rows": demo_rows}


def _verdict_words(verdict: dict) -> str:
    changes = ", ".join(f"{c['cnr_change'] * 100:+.2f} %" for c in verdict["cases"])
    return (f"{'accepted' if verdict['accepted'] else 'REFUSED'} ({verdict['folds']} folds x {verdict['mirrorings']} "
            f"mirrorings): lesion CNR change {changes} (limit {verdict['cnr_tolerance'] * 100:g} %), worst voxel "
            f"{verdict['max_abs_diff']:.4f} (limit {verdict['max_diff_bound']:g})")


def target_rows(results: dict) -> list[dict]:
    """Issue 18's targets (:data:`TARGETS`, :data:`PEAK_RAM_TARGET_MB`) against :func:`run_inference_bench`'s results.

    Each precision is judged in the mode ``--backend auto`` runs on this CPU: OpenVINO when it was
    benchmarked, else torch (no int8). Each row: ``target``, ``mode``, ``speedup``, ``accuracy``
    (words), ``passed``.
    """
    paper = {r["mode"]: r for r in results["paper_8_predictions"]}
    bundle = {r["mode"]: r for r in results.get("bundle", {}).get("rows", [])}
    openvino = any(m.startswith("ov-") for m in paper)
    out = []
    for precision, (least, bound) in TARGETS.items():
        mode = f"ov-{precision}" if openvino else precision
        target = f"{precision}: >= {least:g}x naive, " + (f"max diff <= {bound:g}" if bound is not None else "accuracy rule")
        row = paper.get(mode)
        if row is None:
            out.append({"target": target, "mode": mode, "speedup": None, "accuracy": "not run", "passed": False})
            continue
        if bound is not None:
            diffs = [row["max_abs_diff_vs_naive"]] + ([bundle[mode]["max_abs_diff_vs_naive"]] if mode in bundle else [])
            accurate = max(diffs) <= bound
            accuracy = f"max diff {diffs[0]:.1e} (paper size)" + (f", {diffs[1]:.1e} (bundle)" if len(diffs) > 1 else "")
        else:
            verdict = bundle.get(mode, {}).get("int8_verdict")
            accurate = bool(verdict and verdict["accepted"])
            accuracy = "rule not checked (no bundle, or int8_check off)" if not verdict else (
                f"rule {_verdict_words(verdict)} on the bundle; max diff vs naive {row['max_abs_diff_vs_naive']:.1e}")
        if precision == "fast" and openvino and not results.get("openvino_bf16", False):
            accuracy += "; no BF16 on this CPU: fast ran in f32"
        out.append({"target": target, "mode": mode, "speedup": row["speedup_vs_naive"], "accuracy": accuracy,
                    "passed": bool(row["speedup_vs_naive"] >= least and accurate)})
    peak = max([*results.get("paper_peak_rss_mb", {}).values(), *(r["peak_rss_mb"] for r in bundle.values())])
    out.append({"target": f"peak RAM < {PEAK_RAM_TARGET_MB / 1000:g} GB", "mode": "every timed run", "speedup": None,
                "accuracy": f"largest {peak:.0f} MB", "passed": bool(peak < PEAK_RAM_TARGET_MB)})
    return out


def targets_table(rows: list[dict]) -> str:
    """Markdown table of :func:`target_rows`."""
    lines = ["| target | mode | speed-up vs naive | accuracy / measured | result |", "|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(f"| {r['target']} | {r['mode']} | {speed} | {r['accuracy']} | {'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


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
