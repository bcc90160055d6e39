"""boldstream: real-time resting-state fMRI at the scanner.

A DICOM Storage SCP receives volumes as the scanner produces them, a ZeroMQ
pipeline applies incremental motion correction and running connectivity
estimates, and sinks publish quality metrics and a provisional TMS target.
"""

from __future__ import annotations

from boldstream.errors import (
    AnalysisError,
    BoldstreamError,
    ConfigError,
    DicomInputError,
    ReceiverError,
    SinkError,
    StreamError,
)

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "BoldstreamError",
    "ConfigError",
    "DicomInputError",
    "ReceiverError",
    "SinkError",
    "StreamError",
    "__version__",
]
