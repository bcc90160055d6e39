"""Pure numerics on arrays: motion, QC, connectivity, registration, target.

Nothing here imports DICOM, ZeroMQ or web code: every function takes arrays
(with their affines) and returns arrays or plain dataclasses.
"""

from __future__ import annotations

from boldstream.analysis.motion import (
    PARAM_NAMES,
    MotionCorrector,
    MotionEstimate,
    displacement_mm,
    foreground_mask,
    matrix_to_params,
    params_to_matrix,
    rms_displacement_mm,
    volume_centre,
)
from boldstream.analysis.qc import QCAccumulator, QCFrame, std_dvars_scale
from boldstream.analysis.template import Template, load_template
from boldstream.analysis.usable import UsableAtThreshold, UsableData, UsableSummary, minutes_to_goal

__all__ = [
    "PARAM_NAMES",
    "MotionCorrector",
    "MotionEstimate",
    "QCAccumulator",
    "QCFrame",
    "Template",
    "UsableAtThreshold",
    "UsableData",
    "UsableSummary",
    "displacement_mm",
    "foreground_mask",
    "load_template",
    "matrix_to_params",
    "minutes_to_goal",
    "params_to_matrix",
    "rms_displacement_mm",
    "std_dvars_scale",
    "volume_centre",
]
