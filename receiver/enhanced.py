"""Enhanced MR Image Storage: one instance holds many frames.

One volume per instance (Siemens XA) or a whole series (Philips), told
apart by the frames' TemporalPositionIndex; the geometry of each frame is
in its functional groups, per frame or shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom

from boldstream.errors import DicomInputError
from boldstream.receiver.elements import (
    as_int,
    dicom_time_to_seconds,
    pixel_spacing,
    rescale,
    series_info,
    spacing_hint,
    vector,
)
from boldstream.receiver.fragment import FloatArray, Fragment
from boldstream.receiver.geometry import orientation_frame, slice_normal
from boldstream.receiver.pixels import pixel_array

__all__ = ["decode_enhanced"]

#: Orientations of the frames of one volume must agree to this (direction
#: cosines); a localizer with tilted planes differs by several degrees.
_ORIENTATION_TOLERANCE = 1e-3


def _group(frame: Any, shared: Any, keyword: str) -> Any:
    """The first item of a functional group, per-frame first, else shared."""
    for source in (frame, shared):
        if source is not None:
            seq = source.get(keyword)
            if seq:
                return seq[0]
    return None


@dataclass(slots=True)
class _Frame:
    number: int
    position: FloatArray
    orientation: FloatArray
    spacing: tuple[float, float]
    thickness: float | None
    temporal: int | None
    time: float | None
    slope: float
    intercept: float


def _read_frames(ds: pydicom.Dataset, n_frames: int) -> list[_Frame]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n_frames):
        raise DicomInputError(
            f"enhanced MR: {len(per_frame)} per-frame groups for {n_frames} frames"
        )
    frames: list[_Frame] = []
    for k in range(n_frames):
        item = per_frame[k] if per_frame else None
        where = f"enhanced MR frame {k + 1}"
        position = _group(item, shared, "PlanePositionSequence")
        orient = _group(item, shared, "PlaneOrientationSequence")
        measures = _group(item, shared, "PixelMeasuresSequence")
        if position is None or orient is None or measures is None:
            raise DicomInputError(
                f"{where}: plane position, orientation or pixel measures missing: no geometry"
            )
        content = _group(item, shared, "FrameContentSequence")
        transform = _group(item, shared, "PixelValueTransformationSequence")
        iop = vector(orient.get("ImageOrientationPatient"), 6, f"{where}: orientation")
        orientation_frame(iop)
        slope, intercept = rescale(transform if transform is not None else ds)
        frames.append(
            _Frame(
                number=k,
                position=vector(position.get("ImagePositionPatient"), 3, f"{where}: position"),
                orientation=iop,
                spacing=pixel_spacing(measures.get("PixelSpacing"), where),
                thickness=spacing_hint(measures),
                temporal=as_int(content.get("TemporalPositionIndex")) if content else None,
                time=dicom_time_to_seconds(content.get("FrameAcquisitionDateTime"))
                if content
                else None,
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _split_volumes(ds: pydicom.Dataset, frames: list[_Frame]) -> dict[int, list[_Frame]]:
    """Frames grouped by 0-based volume index.

    Several TemporalPositionIndex values in one instance (Philips, one
    instance per series) give several volumes; a single value means the
    instance is one volume (Siemens XA) and InstanceNumber counts volumes.
    """
    temporal = {f.temporal for f in frames}
    if len(temporal) > 1 and None not in temporal:
        groups: dict[int, list[_Frame]] = {}
        for frame in frames:
            assert frame.temporal is not None
            if frame.temporal < 1:
                raise DicomInputError(f"TemporalPositionIndex {frame.temporal} is not positive")
            groups.setdefault(frame.temporal - 1, []).append(frame)
        return groups
    number = as_int(ds.get("InstanceNumber"))
    if number is None or number < 1:
        raise DicomInputError("enhanced MR: InstanceNumber missing: cannot order the volumes")
    return {number - 1: frames}


def decode_enhanced(ds: pydicom.Dataset) -> list[Fragment]:
    n_frames = as_int(ds.get("NumberOfFrames")) or 1
    frames = _read_frames(ds, n_frames)
    pixels = pixel_array(ds, n_frames)
    stack = pixels if n_frames > 1 else pixels[np.newaxis]
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    timing = _group(None, shared, "MRTimingAndRelatedParametersSequence")
    tr_ms = timing.get("RepetitionTime") if timing is not None else ds.get("RepetitionTime")
    volumes = _split_volumes(ds, frames)
    volume_size = len(next(iter(volumes.values())))
    if any(len(group) != volume_size for group in volumes.values()):
        raise DicomInputError("enhanced MR: temporal positions hold different numbers of frames")
    info = series_info(ds, encoding="enhanced", tr_ms=tr_ms, slices=volume_size)
    fallback_time = dicom_time_to_seconds(
        ds.get("AcquisitionDateTime") or ds.get("AcquisitionTime") or ds.get("ContentTime")
    )
    fragments = []
    for index, group in sorted(volumes.items()):
        first = group[0]
        for frame in group[1:]:
            if np.max(np.abs(frame.orientation - first.orientation)) > _ORIENTATION_TOLERANCE:
                raise DicomInputError(
                    f"enhanced MR: slice orientation varies between frames {first.number + 1} "
                    f"and {frame.number + 1} of one volume: a localizer or several stacks, "
                    "not one volume"
                )
            if frame.spacing != first.spacing:
                raise DicomInputError("enhanced MR: pixel spacing varies between frames")
        positions = np.stack([f.position for f in group])
        normal = slice_normal(first.orientation)
        along = np.round(positions @ normal, 2)
        if np.unique(along).size != along.size:
            raise DicomInputError(
                "enhanced MR: several frames of one volume are at the same position "
                "(echoes, phase images or dynamics without TemporalPositionIndex)"
            )
        times = [f.time for f in group]
        slice_times = None
        acquisition_time = fallback_time
        if all(t is not None for t in times):
            known = np.array(times, dtype=np.float64)
            acquisition_time = float(known.min())
            if np.ptp(known) > 0:
                slice_times = known - known.min()
        fragments.append(
            Fragment(
                series=info,
                index=index,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                pixels=tuple(stack[f.number] for f in group),
                slopes=np.array([f.slope for f in group]),
                intercepts=np.array([f.intercept for f in group]),
                positions=positions,
                orientation=first.orientation,
                normal=normal,
                pixel_spacing=first.spacing,
                slice_spacing=first.thickness,
                expected_slices=volume_size,
                acquisition_time=acquisition_time,
                slice_times=slice_times,
            )
        )
    return fragments
