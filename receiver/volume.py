"""What the receiver hands to the pipeline: assembled volumes and events.

A :class:`Volume` always carries its ``vox2ras`` affine (RAS+, mm): the LPS
patient frame of DICOM is converted once, in the receiver, and nowhere else.
Array axes follow dcm2niix's (NIfTI's) order: axis 0 runs along a DICOM row
(the column index), axis 1 down a column (the row index), axis 2 along the
slice normal in increasing position; ``data = pixel_array.T`` for one slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "SeriesInfo",
    "Volume",
    "VolumeIncomplete",
]


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """Series-level facts, taken from the first instance of a series."""

    series_uid: str
    study_uid: str
    description: str
    #: Pseudonymous key safe to publish (no patient name, ID or birth date).
    session_key: str
    modality: str = "MR"
    manufacturer: str = ""
    series_number: int | None = None
    #: "mosaic", "slice" or "enhanced".
    encoding: str = ""
    #: Repetition time in seconds (DICOM gives ms), None when not stated.
    tr_s: float | None = None
    #: Slice acquisition times in seconds from the start of the volume,
    #: ordered like the volume's third axis; None when not known.
    slice_timing: tuple[float, ...] | None = None
    #: Distinct images per volume when the header states or implies it.
    slices_per_volume: int | None = None
    #: Volumes in the series when the header states it (NumberOfTemporalPositions
    #: above 1, or a Siemens protocol's lRepetitions + 1); the pipeline ends the
    #: series as soon as all of them are in.
    n_volumes: int | None = None
    #: A single-band reference (SBRef) series (``selector.reference_description``):
    #: its volume is the motion reference of the next BOLD series of the study
    #: on the same grid, and is not analysed itself.
    reference: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Volume:
    """One assembled 3D volume of a series, ready for analysis."""

    #: float32 array (i, j, k); rescale slope/intercept already applied.
    data: npt.NDArray[np.float32]
    #: 4x4 voxel -> scanner RAS+ (mm).
    vox2ras: npt.NDArray[np.float64]
    series: SeriesInfo
    #: 0-based temporal index within the series.
    index: int
    #: Acquisition time of the volume, seconds since midnight (scanner clock),
    #: None when the header has none.
    acquisition_time: float | None
    #: time.time() when the first and the last instance of this volume
    #: finished arriving (last byte of each C-STORE), and when it was assembled.
    first_received: float
    last_received: float
    assembled: float
    #: SOP Instance UIDs that make up the volume (one for a mosaic).
    instance_uids: tuple[str, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.data.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def voxel_size(self) -> npt.NDArray[np.float64]:
        """Voxel edge lengths in mm, from the affine."""
        sizes: npt.NDArray[np.float64] = np.sqrt((self.vox2ras[:3, :3] ** 2).sum(axis=0))
        return sizes


@dataclass(frozen=True, slots=True)
class VolumeIncomplete:
    """A volume that did not complete before its timeout; it will not come."""

    series: SeriesInfo
    index: int
    slices_received: int
    slices_expected: int | None
    first_received: float
    reported: float
    #: Why it will not come: "timeout: slices missing", or "rejected: <why>"
    #: for a volume whose slices arrived but do not form a valid stack.
    reason: str = ""
