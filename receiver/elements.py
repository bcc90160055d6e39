"""Element values decoding reads, as numbers, with errors a technician can act on.

Shared by the three encodings (:mod:`slices`, :mod:`mosaic`, :mod:`enhanced`):
numbers that may be absent or malformed, the image plane (orientation,
position, pixel spacing) and the series facts every fragment carries.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pydicom

from boldstream.errors import DicomInputError
from boldstream.receiver.fragment import FloatArray
from boldstream.receiver.geometry import orientation_frame
from boldstream.receiver.lean import LeanDataset
from boldstream.receiver.volume import SeriesInfo

__all__ = [
    "as_float",
    "as_int",
    "dicom_time_to_seconds",
    "pixel_spacing",
    "plane_geometry",
    "rescale",
    "series_info",
    "session_key",
    "spacing_hint",
    "vector",
]


def session_key(series_uid: str) -> str:
    """A pseudonymous key for a series: safe to publish, no patient data."""
    return hashlib.sha256(series_uid.encode("ascii", "replace")).hexdigest()[:12]


def dicom_time_to_seconds(value: object) -> float | None:
    """A DICOM TM (``HHMMSS.ffffff``, or old ``HH:MM:SS``) or the time part of
    a DT, as seconds since midnight; None when absent or unreadable."""
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        text = text[8:]
    text = text.split("+")[0].split("-")[0]
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds


def series_info(
    ds: pydicom.Dataset | LeanDataset,
    *,
    encoding: str,
    tr_ms: object,
    slices: int | None,
    n_volumes: int | None = None,
) -> SeriesInfo:
    series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
    if not series_uid:
        raise DicomInputError("instance has no SeriesInstanceUID: cannot tell its series")
    number = ds.get("SeriesNumber")
    tr = as_float(tr_ms)
    positions = as_int(ds.get("NumberOfTemporalPositions"))
    if positions is not None and positions > 1:
        n_volumes = positions
    return SeriesInfo(
        series_uid=series_uid,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        session_key=session_key(series_uid),
        modality=str(ds.get("Modality", "MR")),
        manufacturer=str(ds.get("Manufacturer", "")),
        series_number=int(number) if number not in (None, "") else None,
        encoding=encoding,
        tr_s=tr / 1000.0 if tr is not None and tr > 0 else None,
        slice_timing=None,
        slices_per_volume=slices,
        n_volumes=n_volumes if n_volumes is not None and n_volumes > 1 else None,
    )


def as_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def as_int(value: object) -> int | None:
    number = as_float(value)
    return int(number) if number is not None else None


def spacing_hint(item: Any) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = as_float(item.get(keyword)) if item is not None else None
        if value is not None and value > 0:
            return value
    return None


def pixel_spacing(value: object, where: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise DicomInputError(f"{where}: PixelSpacing missing or not two numbers") from None
    if not (row > 0 and col > 0):
        raise DicomInputError(f"{where}: PixelSpacing must be positive, got {row}, {col}")
    return (row, col)


def vector(value: object, size: int, what: str) -> FloatArray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise DicomInputError(f"{what} missing or not numbers: no geometry") from None
    if out.shape != (size,):
        raise DicomInputError(f"{what} must have {size} values, got {out.size}")
    return out


def rescale(item: Any) -> tuple[float, float]:
    slope = as_float(item.get("RescaleSlope")) if item is not None else None
    intercept = as_float(item.get("RescaleIntercept")) if item is not None else None
    return (1.0 if slope is None or slope == 0 else slope, intercept or 0.0)


def plane_geometry(ds: Any, where: str) -> tuple[FloatArray, FloatArray, tuple[float, float]]:
    iop = vector(ds.get("ImageOrientationPatient"), 6, f"{where}: ImageOrientationPatient")
    ipp = vector(ds.get("ImagePositionPatient"), 3, f"{where}: ImagePositionPatient")
    orientation_frame(iop)
    return iop, ipp, pixel_spacing(ds.get("PixelSpacing"), where)
