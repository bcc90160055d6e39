"""DICOM builders for receiver tests: small real-format datasets made with pydicom.

Real sample files cover the mosaic and enhanced encodings; one-file-per-slice
series with several volumes (and Philips-style multi-volume enhanced objects)
do not ship in any package, so these builders write them with the same tags
scanners use. Each builder returns a complete Dataset with file meta, so it
can be saved and fed to dcm2niix as well as decoded in memory.
"""

from __future__ import annotations

import copy
import gzip
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
XA_FILE = "MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm"


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _base(sop_class: str, series_uid: str, manufacturer: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(sop_class, ds.SOPInstanceUID)
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM01"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.SeriesDescription = "func_rest"
    ds.SeriesNumber = 7
    ds.StudyDate = "20240101"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def build_slice(
    pixels: npt.NDArray[np.uint16],
    *,
    series_uid: str,
    iop: Sequence[float],
    ipp: Sequence[float],
    instance_number: int,
    pixel_spacing: tuple[float, float] = (3.0, 3.0),
    slice_thickness: float = 3.0,
    manufacturer: str = "GE MEDICAL SYSTEMS",
    acquisition_number: int | None = None,
    images_in_acquisition: int | None = None,
    temporal: tuple[int, int] | None = None,
    rescale: tuple[float, float] | None = None,
    tr_ms: float = 2000.0,
    acquisition_time: str = "120000.000000",
) -> Dataset:
    """One classic MR Image Storage slice. ``temporal`` is
    (NumberOfTemporalPositions, TemporalPositionIdentifier)."""
    ds = _base(MR_IMAGE, series_uid, manufacturer)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceNumber = instance_number
    if acquisition_number is not None:
        ds.AcquisitionNumber = acquisition_number
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    if temporal is not None:
        ds.NumberOfTemporalPositions = temporal[0]
        ds.TemporalPositionIdentifier = temporal[1]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.8f}" for v in ipp]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = slice_thickness
    ds.RepetitionTime = tr_ms
    ds.AcquisitionTime = acquisition_time
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def stack_positions(
    iop: Sequence[float],
    origin: Sequence[float],
    n_slices: int,
    spacing: float,
    *,
    shear: Sequence[float] = (0.0, 0.0, 0.0),
) -> npt.NDArray[np.float64]:
    """ImagePositionPatient of an evenly spaced stack along the IOP normal."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    step = normal * spacing + np.asarray(shear, float)
    return np.asarray(origin, float) + np.arange(n_slices)[:, None] * step


def build_series(
    n_volumes: int,
    n_slices: int,
    *,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-90.0, -100.0, -40.0),
    spacing: float = 3.5,
    rows: int = 12,
    cols: int = 10,
    seed: int = 0,
    **slice_args: Any,
) -> tuple[list[list[Dataset]], list[npt.NDArray[np.uint16]]]:
    """A per-slice series: datasets per volume (slices in position order) and
    each volume's stored slices as a (n_slices, rows, cols) array."""
    rng = np.random.default_rng(seed)
    series_uid = slice_args.pop("series_uid", generate_uid())
    positions = stack_positions(iop, origin, n_slices, spacing)
    volumes, arrays = [], []
    for t in range(n_volumes):
        stored = rng.integers(0, 4000, size=(n_slices, rows, cols), dtype=np.uint16)
        slices = [
            build_slice(
                stored[z],
                series_uid=series_uid,
                iop=iop,
                ipp=positions[z],
                instance_number=t * n_slices + z + 1,
                slice_thickness=spacing,
                **slice_args,
            )
            for z in range(n_slices)
        ]
        volumes.append(slices)
        arrays.append(stored)
    return volumes, arrays


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def build_enhanced(
    frames: npt.NDArray[np.uint16],
    positions: npt.NDArray[np.float64],
    *,
    series_uid: str,
    iop: Sequence[float],
    temporal_indices: Sequence[int],
    instance_number: int = 1,
    slopes: Sequence[float] | None = None,
    pixel_spacing: tuple[float, float] = (2.0, 2.0),
    tr_ms: float = 800.0,
    manufacturer: str = "Philips",
) -> Dataset:
    """An Enhanced MR Image Storage object with per-frame plane positions,
    temporal position indices and pixel value transformations, and shared
    orientation, pixel measures and MR timing."""
    ds = _base(ENHANCED_MR, series_uid, manufacturer)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = instance_number
    ds.NumberOfTemporalPositions = len(set(temporal_indices))
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    shared = _item(
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[f"{v:.8f}" for v in iop])]
        ),
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=list(pixel_spacing), SliceThickness=2.0)]
        ),
        MRTimingAndRelatedParametersSequence=DicomSequence([_item(RepetitionTime=tr_ms)]),
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in range(frames.shape[0]):
        slope = 1.0 if slopes is None else slopes[k]
        per_frame.append(
            _item(
                FrameContentSequence=DicomSequence(
                    [
                        _item(
                            TemporalPositionIndex=temporal_indices[k],
                            FrameAcquisitionDateTime=f"20240101120000.{k:06d}",
                        )
                    ]
                ),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=[f"{v:.8f}" for v in positions[k]])]
                ),
                PixelValueTransformationSequence=DicomSequence(
                    [_item(RescaleSlope=slope, RescaleIntercept=0, RescaleType="US")]
                ),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()
    return ds


def xa_as_stack(ds: Dataset) -> Dataset:
    """The heudiconv XA enhanced sample with its geometry made one stack.

    The real file is a localizer: its three coronal frames are tilted by a
    few degrees against each other and unevenly spaced, so it is not a volume
    (dcm2niix warns "slice orientation varies (localizer?)"). This copy keeps
    the real XA header layout and pixels but gives every frame the first
    frame's orientation and a 1.6 mm step along its normal.
    """
    out = copy.deepcopy(ds)
    frames = out.PerFrameFunctionalGroupsSequence
    first = frames[0]
    iop = [float(v) for v in first.PlaneOrientationSequence[0].ImageOrientationPatient]
    origin = [float(v) for v in first.PlanePositionSequence[0].ImagePositionPatient]
    positions = stack_positions(iop, origin, len(frames), 1.6)
    for k, frame in enumerate(frames):
        frame.PlaneOrientationSequence[0].ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        frame.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def read_sample(path: Path) -> Dataset:
    """dcmread that also opens nibabel's gzipped samples."""
    if path.suffix == ".gz":
        with gzip.open(path) as fh:
            return pydicom.dcmread(fh)
    return pydicom.dcmread(path)


@pytest.fixture(scope="session")
def xa_path(heudiconv_data: Path) -> Path:
    return heudiconv_data / XA_FILE


@pytest.fixture(scope="session")
def mosaic_path(heudiconv_data: Path) -> Path:
    return heudiconv_data / "axasc35.dcm"


@pytest.fixture(scope="session")
def b0dwi_paths(heudiconv_data: Path) -> list[Path]:
    return sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm"))


@pytest.fixture
def builders() -> ModuleType:
    """This module, so tests can call ``builders.build_slice(...)`` (a conftest
    cannot be imported by name under ``--import-mode=importlib``)."""
    return sys.modules[__name__]
