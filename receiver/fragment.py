"""What decoding hands to assembly: the slices of one volume found in one instance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.receiver.volume import SeriesInfo

__all__ = ["FloatArray", "Fragment"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, eq=False)
class Fragment:
    """The slices of one volume found in one instance, as stored.

    ``pixels[k]`` is slice k as stored (rows x columns, stored dtype, often a
    view into the instance's pixel data); the real value is
    ``pixels[k] * slopes[k] + intercepts[k]``. Slices are in the order of the
    instance, not yet in spatial order: the assembler sorts a complete volume
    by ``positions @ normal`` once.
    """

    series: SeriesInfo
    #: 0-based temporal index of the volume within its series.
    index: int
    sop_instance_uid: str
    pixels: tuple[npt.NDArray[Any], ...]
    slopes: FloatArray
    intercepts: FloatArray
    #: ImagePositionPatient of every slice, LPS mm, shape (n, 3).
    positions: FloatArray
    #: ImageOrientationPatient (LPS) shared by the slices.
    orientation: FloatArray
    #: Unit slice normal (LPS) along which slices are ordered.
    normal: FloatArray
    #: PixelSpacing: (row spacing, column spacing) in mm.
    pixel_spacing: tuple[float, float]
    #: SpacingBetweenSlices or SliceThickness (mm); used only for 1-slice volumes.
    slice_spacing: float | None
    #: Slices in the whole volume when the header says so, else None.
    expected_slices: int | None
    #: Acquisition time, seconds since midnight (scanner clock).
    acquisition_time: float | None
    #: Per-slice acquisition time in s from the start of the volume, when known.
    slice_times: FloatArray | None = None

    @property
    def n_slices(self) -> int:
        return len(self.pixels)

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, columns) of each slice."""
        shape = self.pixels[0].shape
        return (int(shape[0]), int(shape[1]))
