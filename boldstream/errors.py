"""The exception hierarchy: one root, one subclass per layer.

Errors caused by bad input also derive from ``ValueError`` so that callers
who only know the standard library can still catch them.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "BoldstreamError",
    "ConfigError",
    "DicomInputError",
    "ReceiverError",
    "SinkError",
    "StreamError",
]


class BoldstreamError(Exception):
    """Root of every error boldstream raises on purpose."""


class ConfigError(BoldstreamError, ValueError):
    """The settings are invalid; the message names the offending key."""


class ReceiverError(BoldstreamError):
    """Something went wrong receiving, spooling or assembling DICOM."""


class DicomInputError(ReceiverError, ValueError):
    """An instance cannot be understood (missing tags, bad pixel data...)."""


class StreamError(BoldstreamError):
    """Failure in the ZeroMQ pipeline: codec, stage or supervision."""


class AnalysisError(BoldstreamError):
    """A numerical step could not produce a valid result."""


class SinkError(BoldstreamError):
    """Publishing or writing results failed."""
