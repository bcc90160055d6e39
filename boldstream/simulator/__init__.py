"""The simulated scanner: phantom run, DICOM encoders, C-STORE sender.

A facade over the modules (STYLE habit 4): ``phantom`` builds a run with known
truth from the shipped MNI152 maps, ``encode`` turns volumes into DICOM
(mosaic, per-slice, Enhanced MR), ``send`` C-STOREs them or writes them.
"""

from __future__ import annotations

from boldstream.simulator.encode import (
    ENCODINGS,
    SeriesSpec,
    encode_series_enhanced,
    encode_volume,
    quantise,
    slice_times,
)
from boldstream.simulator.phantom import (
    MOTION_PRESETS,
    HeadPose,
    MotionSpec,
    PhantomRun,
    SimulatorError,
    epi_grid,
    make_phantom_run,
    rigid_matrix,
    run_from_nifti,
)
from boldstream.simulator.send import SendOptions, SendReport, send_run, write_run

__all__ = [
    "ENCODINGS",
    "MOTION_PRESETS",
    "HeadPose",
    "MotionSpec",
    "PhantomRun",
    "SendOptions",
    "SendReport",
    "SeriesSpec",
    "SimulatorError",
    "encode_series_enhanced",
    "encode_volume",
    "epi_grid",
    "make_phantom_run",
    "quantise",
    "rigid_matrix",
    "run_from_nifti",
    "send_run",
    "slice_times",
    "write_run",
]
