"""LesionReaderLib: blinded multi-phase lesion reader study and the paper's statistics.

Importable without Slicer; MRML-facing code lives in :mod:`LesionReaderLib.mrml_bridge` only.
"""

__version__ = "0.1.0"
