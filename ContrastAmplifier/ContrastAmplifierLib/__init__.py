"""ContrastAmplifierLib: everything the ContrastAmplifier Slicer module does, importable without Slicer.

Reproduces the method of Bone, Ammari et al., Invest Radiol 2022 ("From dose reduction to
contrast maximization"): preprocessing, the residual 3D UNet ensemble and the synthetic brain
phantom used for tests, demos and benchmarks. Never imports ``qt``/``ctk``; MRML code lives in
:mod:`ContrastAmplifierLib.mrml_bridge` only.
"""

__version__ = "0.1.0"
