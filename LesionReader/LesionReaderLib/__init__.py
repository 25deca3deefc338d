"""LesionReaderLib: blinded multi-phase lesion reader study and the paper's statistics.

Importable without Slicer (standard library only for the reading study); MRML-facing code lives
in :mod:`LesionReaderLib.mrml_bridge` only. Public API of the reading study (Bone, Ammari et al.
2022, "Reader study protocol")::

    from LesionReaderLib import ReaderSession
    session = ReaderSession.open(study_dir, reader="R1", phase="T1c")
"""

__version__ = "0.1.0"

from .session import LesionAxisError, LesionRecord, ReaderSession, SessionError, validate_lesion_axes
from .study import GRADE_LABELS, ManualClock, Study, StudyError, WashoutError, init_study, load_study

__all__ = [
    "GRADE_LABELS",
    "LesionAxisError",
    "LesionRecord",
    "ManualClock",
    "ReaderSession",
    "SessionError",
    "Study",
    "StudyError",
    "WashoutError",
    "init_study",
    "load_study",
    "validate_lesion_axes",
]
