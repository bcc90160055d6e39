"""Classic MR Image Storage: one instance is one slice of one volume."""

from __future__ import annotations

import numpy as np
import pydicom

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.receiver.elements import (
    as_int,
    dicom_time_to_seconds,
    plane_geometry,
    rescale,
    series_info,
    spacing_hint,
)
from boldstream.receiver.fragment import Fragment
from boldstream.receiver.geometry import slice_normal
from boldstream.receiver.lean import LeanDataset
from boldstream.receiver.pixels import pixel_array

__all__ = ["decode_slice"]


def _slices_per_volume(ds: pydicom.Dataset | LeanDataset, assembly: AssemblySettings) -> int | None:
    """Slices per volume: the setting, else ImagesInAcquisition, else unknown.

    Philips counts every image of the acquisition in ImagesInAcquisition
    (slices times dynamics), so for Philips it is divided by
    NumberOfTemporalPositions when that divides it.
    """
    if assembly.slices_per_volume > 0:
        return assembly.slices_per_volume
    images = as_int(ds.get("ImagesInAcquisition"))
    if images is None or images <= 0:
        return None
    temporal = as_int(ds.get("NumberOfTemporalPositions")) or 1
    if "PHILIPS" in str(ds.get("Manufacturer", "")).upper() and temporal > 1:
        return images // temporal if images % temporal == 0 else None
    return images


def _temporal_index(ds: pydicom.Dataset | LeanDataset, key: str, slices: int | None) -> int:
    """0-based volume index of a single-slice instance (see AssemblySettings)."""
    if key == "auto":
        positions = as_int(ds.get("NumberOfTemporalPositions")) or 0
        if positions > 1 and ds.get("TemporalPositionIdentifier") is not None:
            key = "TemporalPositionIdentifier"
        elif (
            "SIEMENS" in str(ds.get("Manufacturer", "")).upper()
            and ds.get("AcquisitionNumber") is not None
        ):
            key = "AcquisitionNumber"
        else:
            key = "InstanceNumber"
    number = as_int(ds.get(key))
    if number is None:
        raise DicomInputError(f"{key} is missing: cannot tell which volume this slice is in")
    if key == "InstanceNumber":
        if slices is None:
            raise DicomInputError(
                "cannot tell which volume this slice belongs to: no temporal position, "
                "no slice count in the header (ImagesInAcquisition); set "
                "assembly.slices_per_volume"
            )
        if number < 1:
            raise DicomInputError(f"InstanceNumber {number} is not a positive count")
        return (number - 1) // slices
    if number < 1:
        raise DicomInputError(f"{key} {number} is not a positive count")
    return number - 1


def decode_slice(ds: pydicom.Dataset | LeanDataset, assembly: AssemblySettings) -> Fragment:
    where = "single-slice MR image"
    iop, ipp, spacing = plane_geometry(ds, where)
    pixels = pixel_array(ds)
    slices = _slices_per_volume(ds, assembly)
    index = _temporal_index(ds, assembly.temporal_key, slices)
    slope, intercept = rescale(ds)
    time_value = ds.get("AcquisitionTime") or ds.get("ContentTime")
    return Fragment(
        series=series_info(ds, encoding="slice", tr_ms=ds.get("RepetitionTime"), slices=slices),
        index=index,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        pixels=(pixels,),
        slopes=np.array([slope]),
        intercepts=np.array([intercept]),
        positions=ipp.reshape(1, 3),
        orientation=iop,
        normal=slice_normal(iop),
        pixel_spacing=spacing,
        slice_spacing=spacing_hint(ds),
        expected_slices=slices,
        acquisition_time=dicom_time_to_seconds(time_value),
    )
