"""Command-line options shared by ``contrast-amplifier`` (:mod:`.cli`) and its ``pacs`` sub-app
(:mod:`.pacs_cli`, which :mod:`.cli` imports: the shared options live here, not in either)."""

from __future__ import annotations

import typer

BACKEND_HELP = ("Inference runtime of HD-BET and of the ensemble: auto (OpenVINO on CPU when installed, else torch; always "
                "torch on a GPU), torch, or openvino (CPU only; each network is converted once, the ensemble's folds "
                "once per crop size, and cached; see README, CPU backends).")
BackendOpt = typer.Option("auto", "--backend", help=BACKEND_HELP)
PRECISION_HELP = ("auto (bf16 on CUDA, fp32 on CPU), exact (fp32), fast (bf16; OpenVINO: only where the CPU has BF16, "
                  "else fp32) or int8 (OpenVINO + NNCF on the CPU: each fold quantised once, calibrated on phantoms, "
                  "used only if its accuracy check on held-out phantoms passes, else refused; see README, int8).")
PrecisionOpt = typer.Option("auto", "--precision", help=PRECISION_HELP)
