"""Siemens mosaic: one instance is one volume, its slices tiled in one image."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import pydicom

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
from boldstream.receiver.geometry import orientation_frame
from boldstream.receiver.lean import LeanDataset
from boldstream.receiver.pixels import pixel_array

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its readers are experimental; we only
    # use the CSA header parser, which is the well-trodden part.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader as _csareader

#: nibabel's CSA reader is untyped; typed as Any once here.
csareader: Any = _csareader

__all__ = ["decode_mosaic", "is_mosaic", "siemens_repetitions"]

#: The series CSA header's element in the "SIEMENS CSA HEADER" private block.
_CSA_SERIES_ELEMENT = 0x20

_REPETITIONS = re.compile(rb"\nlRepetitions\s*=\s*(\d+)")


def siemens_repetitions(ds: pydicom.Dataset | LeanDataset) -> int | None:
    """Volumes a Siemens series will have, from its protocol, when it says.

    The series CSA header (0029,1020) carries the protocol as text
    (``MrPhoenixProtocol``, its ``### ASCCONV BEGIN ###`` block): the run has
    ``lRepetitions + 1`` volumes; no ``lRepetitions`` line means one volume
    (Siemens leaves out zero values) and is reported as unknown here. A
    substring search first: the header is ~80 kB and this runs per mosaic.
    """
    try:
        raw = ds.private_block(0x0029, "SIEMENS CSA HEADER")[_CSA_SERIES_ELEMENT].value
    except (KeyError, ValueError):
        return None
    if not isinstance(raw, bytes):
        return None
    start = raw.find(b"\nlRepetitions")
    if start < 0:
        return None
    match = _REPETITIONS.match(raw, start)
    return int(match.group(1)) + 1 if match else None


def _image_csa(ds: pydicom.Dataset | LeanDataset) -> dict[str, Any] | None:
    """The image CSA header, parsed by nibabel (None when the instance has none)."""
    if isinstance(ds, LeanDataset):
        raw = ds.csa_element(0x10)
        return None if raw is None else dict(csareader.read(raw))
    found: dict[str, Any] | None = csareader.get_csa_header(ds)
    return found


def is_mosaic(ds: pydicom.Dataset | LeanDataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "MOSAIC" in image_type


def decode_mosaic(ds: pydicom.Dataset | LeanDataset) -> Fragment:
    """Split a Siemens mosaic into its tiles, with nibabel's position fix.

    ImagePositionPatient of a mosaic is the corner of the whole mosaic image
    as if it were one big slice; the first tile's corner is found by moving
    half the mosaic-minus-tile size along the in-plane axes (nibabel's
    ``MosaicWrapper.image_position``). Tiles follow the CSA SliceNormalVector.
    """
    where = "Siemens mosaic"
    try:
        csa = _image_csa(ds)
    except Exception as exc:
        raise DicomInputError(f"{where}: the Siemens CSA header cannot be read: {exc}") from exc
    n_tiles = csareader.get_n_mosaic(csa) if csa else None
    if not n_tiles:
        raise DicomInputError(
            f"{where}: NumberOfImagesInMosaic is missing from the CSA header; "
            "was the series anonymised with private tags removed?"
        )
    n_tiles = int(n_tiles)
    iop, ipp, spacing = plane_geometry(ds, where)
    row_dir, col_dir = orientation_frame(iop)
    normal = np.cross(row_dir, col_dir)
    csa_normal = csareader.get_slice_normal(csa)
    if csa_normal is not None:
        dot = float(np.dot(np.asarray(csa_normal, dtype=np.float64), normal))
        if abs(abs(dot) - 1.0) > 1e-3:
            raise DicomInputError(
                f"{where}: CSA SliceNormalVector disagrees with ImageOrientationPatient"
            )
        if dot < 0:
            normal = -normal

    mosaic = pixel_array(ds)
    tiles_per_side = math.ceil(math.sqrt(n_tiles))
    big_rows, big_cols = mosaic.shape
    if big_rows % tiles_per_side or big_cols % tiles_per_side:
        raise DicomInputError(
            f"{where}: a {big_rows}x{big_cols} image cannot hold {n_tiles} tiles "
            f"in a {tiles_per_side}x{tiles_per_side} grid"
        )
    rows, cols = big_rows // tiles_per_side, big_cols // tiles_per_side
    grid = mosaic.reshape(tiles_per_side, rows, tiles_per_side, cols)
    pixels = tuple(grid[k // tiles_per_side, :, k % tiles_per_side, :] for k in range(n_tiles))

    shift = np.array([(big_rows - rows) / 2.0, (big_cols - cols) / 2.0])
    first = ipp + col_dir * spacing[0] * shift[0] + row_dir * spacing[1] * shift[1]
    step = spacing_hint(ds) or 1.0
    positions = first + np.arange(n_tiles)[:, None] * (normal * step)

    slice_times = None
    times = csa.get("tags", {}).get("MosaicRefAcqTimes", {}).get("items") if csa else None
    if times and len(times) >= n_tiles:
        slice_times = np.asarray(times[:n_tiles], dtype=np.float64) / 1000.0
    slope, intercept = rescale(ds)
    number = as_int(ds.get("InstanceNumber")) or as_int(ds.get("AcquisitionNumber"))
    if number is None or number < 1:
        raise DicomInputError(f"{where}: InstanceNumber missing: cannot order the volumes")
    info = series_info(
        ds,
        encoding="mosaic",
        tr_ms=ds.get("RepetitionTime"),
        slices=n_tiles,
        n_volumes=siemens_repetitions(ds),
    )
    return Fragment(
        series=info,
        # InstanceNumber, not AcquisitionNumber: both count volumes in fMRI, but
        # Siemens diffusion mosaics repeat AcquisitionNumber across volumes.
        index=number - 1,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        pixels=pixels,
        slopes=np.full(n_tiles, slope),
        intercepts=np.full(n_tiles, intercept),
        positions=positions,
        orientation=iop,
        normal=normal,
        pixel_spacing=spacing,
        slice_spacing=step,
        expected_slices=n_tiles,
        acquisition_time=dicom_time_to_seconds(ds.get("AcquisitionTime")),
        slice_times=slice_times,
    )
