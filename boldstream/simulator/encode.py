"""Encode volumes as a scanner would: Siemens mosaic, one file per slice, Enhanced MR.

The volume arrives as an (i, j, k) array with its RAS+ ``vox2ras``; this is
the DICOM edge, so the affine is turned into LPS here and written as
ImagePositionPatient / ImageOrientationPatient / PixelSpacing. Array axes
follow the receiver's convention (dcm2niix's): axis 0 runs along a DICOM row
(column index), axis 1 down a column (row index), so slice ``k`` is stored as
``data[:, :, k].T``.

Pixel values are stored as unsigned 16-bit integers, rounded and clipped
(:func:`quantise` is exactly what a receiver should get back). A fake patient
is written into every instance on purpose: the receiver and the sinks must
prove they never publish it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from boldstream.simulator.csa import (
    CSA_CREATOR,
    CSA_IMAGE_TAG,
    CSA_SERIES_TAG,
    csa2_header,
    phoenix_protocol,
)
from boldstream.simulator.phantom import SimulatorError

__all__ = [
    "ENHANCED_MR_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "Encoding",
    "SeriesSpec",
    "encode_series_enhanced",
    "encode_volume",
    "quantise",
    "slice_times",
]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
Encoding = Literal["mosaic", "slice", "enhanced", "enhanced-series"]
ENCODINGS: tuple[str, ...] = ("mosaic", "slice", "enhanced", "enhanced-series")

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SeriesSpec:
    """Series-level header values; UIDs are fresh unless given."""

    tr_s: float
    n_volumes: int
    series_description: str = "rsfMRI_sim"
    series_number: int = 7
    slice_order: Literal["ascending", "interleaved"] = "interleaved"
    patient_name: str = "SIM^PHANTOM"
    patient_id: str = "SIM-0001"
    patient_birth_date: str = "19700101"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    #: Acquisition start, seconds since midnight (scanner clock).
    start_time_s: float = 10 * 3600.0
    study_date: str = "20261122"


def quantise(volume: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """What is stored: values rounded and clipped to unsigned 16 bit."""
    return np.clip(np.rint(np.asarray(volume, dtype=np.float64)), 0, 65535).astype(np.uint16)


def slice_times(n_slices: int, tr_s: float, order: str = "interleaved") -> F64:
    """Acquisition time (s from volume start) of each slice, by slice position."""
    if order == "ascending":
        sequence = list(range(n_slices))
    elif order == "interleaved":
        sequence = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
    else:
        raise ValueError(f"unknown slice order {order!r}")
    times = np.empty(n_slices)
    for rank, k in enumerate(sequence):
        times[k] = rank * tr_s / n_slices
    return times


@dataclass(frozen=True)
class _Geometry:
    row_dir: F64
    col_dir: F64
    normal_step: F64
    spacing: tuple[float, float]  # (row spacing, column spacing)
    slice_step: float
    origin: F64  # LPS position of voxel (0, 0, 0)

    @classmethod
    def from_vox2ras(cls, vox2ras: npt.ArrayLike) -> _Geometry:
        lps = _LPS @ np.asarray(vox2ras, dtype=np.float64)
        col_spacing = float(np.linalg.norm(lps[:3, 0]))
        row_spacing = float(np.linalg.norm(lps[:3, 1]))
        step = lps[:3, 2]
        if min(col_spacing, row_spacing, float(np.linalg.norm(step))) < 1e-6:
            raise SimulatorError("vox2ras is singular: a voxel axis has zero length")
        cosine = float(lps[:3, 0] @ lps[:3, 1]) / (col_spacing * row_spacing)
        if abs(cosine) > 1e-4:
            # DICOM's ImageOrientationPatient cannot say it: a receiver
            # would refuse the header (or, worse, read another grid).
            raise SimulatorError(
                f"vox2ras axes 0 and 1 are not perpendicular (cosine {cosine:.4f}); "
                "DICOM rows and columns must be"
            )
        return cls(
            row_dir=lps[:3, 0] / col_spacing,
            col_dir=lps[:3, 1] / row_spacing,
            normal_step=step,
            spacing=(row_spacing, col_spacing),
            slice_step=float(np.linalg.norm(step)),
            origin=lps[:3, 3],
        )

    def position(self, k: int) -> F64:
        pos: F64 = self.origin + k * self.normal_step
        return pos

    @property
    def iop(self) -> list[float]:
        return [float(v) for v in (*self.row_dir, *self.col_dir)]


def _ds(v: float) -> str:
    """A DS value: at most 16 characters."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _tm(seconds: float) -> str:
    seconds = seconds % 86400.0
    h, rem = divmod(seconds, 3600.0)
    m, s = divmod(rem, 60.0)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def _base(spec: SeriesSpec, sop_class: str, *, manufacturer: str) -> Dataset:
    ds = Dataset()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "boldstream simulator"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = _tm(spec.start_time_s)
    ds.StudyID = "1"
    ds.SeriesDescription = spec.series_description
    ds.ProtocolName = spec.series_description
    ds.SeriesNumber = spec.series_number
    ds.RepetitionTime = _ds(spec.tr_s * 1000.0)
    ds.EchoTime = "30"
    ds.FlipAngle = "77"
    ds.MagneticFieldStrength = "3"
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _slice_datasets(
    volume: npt.NDArray[np.uint16], geom: _Geometry, spec: SeriesSpec, t: int, times: F64
) -> list[Dataset]:
    n_i, n_j, n_k = volume.shape
    normal = np.cross(geom.row_dir, geom.col_dir)
    out = []
    for k in range(n_k):
        ds = _base(spec, MR_IMAGE_STORAGE, manufacturer="BOLDSTREAM")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.AcquisitionNumber = t + 1
        ds.InstanceNumber = t * n_k + k + 1
        ds.TemporalPositionIdentifier = t + 1
        ds.NumberOfTemporalPositions = spec.n_volumes
        ds.ImagesInAcquisition = n_k
        pos = geom.position(k)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in geom.iop]
        ds.SliceLocation = _ds(float(pos @ normal))
        ds.PixelSpacing = [_ds(geom.spacing[0]), _ds(geom.spacing[1])]
        ds.SliceThickness = _ds(geom.slice_step)
        ds.SpacingBetweenSlices = _ds(geom.slice_step)
        acq = spec.start_time_s + t * spec.tr_s + float(times[k])
        ds.AcquisitionTime = ds.ContentTime = _tm(acq)
        ds.Rows, ds.Columns = n_j, n_i
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()
        out.append(ds)
    return out


def _mosaic_dataset(
    volume: npt.NDArray[np.uint16], geom: _Geometry, spec: SeriesSpec, t: int, times: F64
) -> Dataset:
    n_i, n_j, n_k = volume.shape
    tiles = int(np.ceil(np.sqrt(n_k)))
    rows, cols = n_j, n_i
    big = np.zeros((tiles * rows, tiles * cols), dtype=np.uint16)
    for k in range(n_k):
        r, c = divmod(k, tiles)
        big[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = volume[:, :, k].T
    ds = _base(spec, MR_IMAGE_STORAGE, manufacturer="SIEMENS")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.AcquisitionNumber = t + 1
    ds.InstanceNumber = t + 1
    # Siemens writes the corner of the whole mosaic as if it were one slice.
    shift_rows = (big.shape[0] - rows) / 2.0
    shift_cols = (big.shape[1] - cols) / 2.0
    first = geom.position(0)
    corner = (
        first
        - geom.col_dir * geom.spacing[0] * shift_rows
        - geom.row_dir * geom.spacing[1] * shift_cols
    )
    ds.ImagePositionPatient = [_ds(v) for v in corner]
    ds.ImageOrientationPatient = [_ds(v) for v in geom.iop]
    ds.PixelSpacing = [_ds(geom.spacing[0]), _ds(geom.spacing[1])]
    ds.SliceThickness = _ds(geom.slice_step)
    ds.SpacingBetweenSlices = _ds(geom.slice_step)
    ds.AcquisitionMatrix = [0, cols, rows, 0]
    acq = spec.start_time_s + t * spec.tr_s
    ds.AcquisitionTime = ds.ContentTime = _tm(acq)
    ds.Rows, ds.Columns = big.shape
    normal = geom.normal_step / geom.slice_step
    block = ds.private_block(0x0029, CSA_CREATOR, create=True)
    block.add_new(
        CSA_IMAGE_TAG,
        "OB",
        csa2_header(
            {
                "NumberOfImagesInMosaic": ("IS", [n_k]),
                "SliceNormalVector": ("FD", [float(v) for v in normal]),
                "MosaicRefAcqTimes": ("FD", [float(v) * 1000.0 for v in times]),
                "AcquisitionMatrixText": ("SH", [f"{rows}p*{cols}"]),
            }
        ),
    )
    block.add_new(
        CSA_SERIES_TAG,
        "OB",
        csa2_header(
            {
                "MrPhoenixProtocol": (
                    "UN",
                    [phoenix_protocol(n_volumes=spec.n_volumes, tr_us=round(spec.tr_s * 1e6))],
                )
            }
        ),
    )
    ds.PixelData = big.tobytes()
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _enhanced_dataset(
    volumes: Sequence[tuple[int, npt.NDArray[np.uint16]]],
    geom: _Geometry,
    spec: SeriesSpec,
    times: F64,
) -> Dataset:
    n_i, n_j, n_k = volumes[0][1].shape
    # As in the field: Siemens XA sends one instance per volume, Philips one
    # per series (dcm2niix tunes its frame sorting to the manufacturer).
    manufacturer = "Siemens Healthineers" if len(volumes) == 1 else "Philips"
    ds = _base(spec, ENHANCED_MR_IMAGE_STORAGE, manufacturer=manufacturer)
    ds.NumberOfTemporalPositions = spec.n_volumes
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = volumes[0][0] + 1
    ds.AcquisitionNumber = volumes[0][0] + 1
    ds.Rows, ds.Columns = n_j, n_i
    ds.NumberOfFrames = n_k * len(volumes)
    ds.ContentTime = _tm(spec.start_time_s)
    ds.AcquisitionDateTime = spec.study_date + _tm(spec.start_time_s)
    ds.DimensionOrganizationSequence = DicomSequence(
        [_item(DimensionOrganizationUID=generate_uid())]
    )
    org = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=org,
                DimensionIndexPointer=0x00209056,
                FunctionalGroupPointer=0x00209111,
            ),
            _item(
                DimensionOrganizationUID=org,
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
            ),
            _item(
                DimensionOrganizationUID=org,
                DimensionIndexPointer=0x00209128,
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [
                _item(
                    PixelSpacing=[_ds(geom.spacing[0]), _ds(geom.spacing[1])],
                    SliceThickness=_ds(geom.slice_step),
                    SpacingBetweenSlices=_ds(geom.slice_step),
                )
            ]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[_ds(v) for v in geom.iop])]
        ),
        MRTimingAndRelatedParametersSequence=DicomSequence(
            [_item(RepetitionTime=_ds(spec.tr_s * 1000.0), FlipAngle="77", EchoTrainLength=1)]
        ),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]
        ),
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    pixels = []
    for t, volume in volumes:
        for k in range(n_k):
            acq = spec.start_time_s + t * spec.tr_s + float(times[k])
            frames.append(
                _item(
                    FrameContentSequence=DicomSequence(
                        [
                            _item(
                                StackID="1",
                                InStackPositionNumber=k + 1,
                                TemporalPositionIndex=t + 1,
                                DimensionIndexValues=[1, k + 1, t + 1],
                                FrameAcquisitionNumber=t + 1,
                                FrameAcquisitionDateTime=spec.study_date + _tm(acq),
                                FrameReferenceDateTime=spec.study_date + _tm(acq),
                                FrameAcquisitionDuration=spec.tr_s * 1000.0 / n_k,
                            )
                        ]
                    ),
                    PlanePositionSequence=DicomSequence(
                        [_item(ImagePositionPatient=[_ds(v) for v in geom.position(k)])]
                    ),
                )
            )
            pixels.append(np.ascontiguousarray(volume[:, :, k].T))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    return ds


def encode_volume(
    volume: npt.ArrayLike,
    vox2ras: npt.ArrayLike,
    spec: SeriesSpec,
    index: int,
    *,
    encoding: Encoding,
) -> list[Dataset]:
    """The instance(s) the scanner sends for volume ``index`` (0-based).

    ``enhanced-series`` cannot be sent volume by volume: use
    :func:`encode_series_enhanced`.
    """
    data = quantise(volume)
    if data.ndim != 3:
        raise ValueError(f"a volume is 3D, not {data.shape}")
    geom = _Geometry.from_vox2ras(vox2ras)
    times = slice_times(data.shape[2], spec.tr_s, spec.slice_order)
    if encoding == "mosaic":
        return [_mosaic_dataset(data, geom, spec, index, times)]
    if encoding == "slice":
        return _slice_datasets(data, geom, spec, index, times)
    if encoding == "enhanced":
        return [_enhanced_dataset([(index, data)], geom, spec, times)]
    raise ValueError(f"encoding {encoding!r} is not sent volume by volume")


def encode_series_enhanced(
    volumes: Iterator[npt.ArrayLike] | Sequence[npt.ArrayLike],
    vox2ras: npt.ArrayLike,
    spec: SeriesSpec,
) -> Dataset:
    """One Enhanced MR instance holding every volume of the series (Philips style)."""
    data = [(t, quantise(v)) for t, v in enumerate(volumes)]
    geom = _Geometry.from_vox2ras(vox2ras)
    times = slice_times(data[0][1].shape[2], spec.tr_s, spec.slice_order)
    return _enhanced_dataset(data, geom, spec, times)


def now_seconds() -> float:
    """Seconds since midnight now, for a live-looking AcquisitionTime."""
    n = _dt.datetime.now()
    return n.hour * 3600.0 + n.minute * 60.0 + n.second + n.microsecond / 1e6
