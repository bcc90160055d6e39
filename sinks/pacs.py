"""The connectivity map and the target back to PACS, as derived DICOM series.

When a PACS is configured, :func:`send_target` sends two MR Image Storage
series by C-STORE (pynetdicom SCU), in the subject's native grid (the grid of
the ``target`` message's map) and in the study of the source series:

- ``boldstream sgACC connectivity (provisional)``: the correlation map, one
  instance per slice, stored as signed 16-bit ``round(r * 1000)`` with
  RescaleSlope 0.001 (so viewers show ``r``); outside the brain 0.
- ``boldstream TMS target marker (provisional)`` (``marker=True``): zeros
  with a small 3-D cross centred on the voxel nearest the target (1.0 at the
  centre, 0.5 on its six neighbours).

``provisional`` in the description becomes ``settling``/``stable`` with the
target's status. ImageType is ``DERIVED\\SECONDARY``.

Geometry: boldstream works in RAS+; DICOM wants LPS+. The conversion happens
here, at this edge, and nowhere else in the sinks: slice ``k`` of a grid with
``vox2ras`` has ImagePositionPatient = LPS of voxel ``(0, 0, k)``,
ImageOrientationPatient = the LPS directions of array axes 0 (along a row)
and 1 (down a column), PixelSpacing = (spacing of axis 1, spacing of axis 0),
and pixel ``[row j, column i]`` = ``map[i, j, k]`` (the receiver's contract,
:mod:`boldstream.receiver.volume`, run backwards).

Patient and study attributes: boldstream never carries patient identifiers on
its streams. A PACS files a series under the patient of the study it belongs
to, so the caller passes a :class:`SourceStudy` read from one instance of the
source series (:meth:`SourceStudy.from_dataset`, e.g. from the receiver's
spool); it copies the Patient and General Study modules and the
FrameOfReferenceUID, which lets viewers link the derived series to the
source images. Without it the study UID comes from the series and the
patient attributes are left empty (type 2), which some PACS refuse.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from boldstream import __version__
from boldstream.errors import SinkError
from boldstream.logs import get_logger
from boldstream.receiver.geometry import ras_to_lps
from boldstream.sinks.navigation import Target
from boldstream.stream.messages import Result

__all__ = [
    "MAP_SCALE",
    "PacsPeer",
    "SentSeries",
    "SourceStudy",
    "derived_series",
    "send_datasets",
    "send_target",
]

log = get_logger("sinks.pacs")

#: Stored value per unit of correlation (RescaleSlope is its inverse).
MAP_SCALE: Final = 1000.0

#: Attributes copied from the source instance: Patient and General Study
#: modules, and the frame of reference shared with the source images.
_COPIED: Final = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)


@dataclass(frozen=True, slots=True)
class PacsPeer:
    """A DICOM Storage SCP to send to (host, port, its AE title) and our AE title."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "BOLDSTREAM"
    #: Bound on connecting, association negotiation and each C-STORE reply.
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SourceStudy:
    """Study-level attributes of the source series, copied into the derived series."""

    study_uid: str
    #: Keyword -> value, only the :data:`_COPIED` keywords the source had.
    attributes: Mapping[str, Any] = field(default_factory=dict)
    series_uid: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SourceStudy:
        """From one instance of the source series (header only is enough)."""
        study_uid = ds.get("StudyInstanceUID")
        if not study_uid:
            raise SinkError("the source instance has no StudyInstanceUID")
        attributes = {k: ds.get(k) for k in _COPIED if k in ds}
        series_uid = ds.get("SeriesInstanceUID")
        return cls(str(study_uid), attributes, str(series_uid) if series_uid else None)


@dataclass(frozen=True, slots=True)
class SentSeries:
    """What :func:`send_target` sent: each series' UID and its instances' count."""

    series: Mapping[str, str]
    instances: int


def _unit(v: npt.NDArray[np.float64], what: str) -> tuple[npt.NDArray[np.float64], float]:
    norm = float(np.linalg.norm(v))
    if not norm > 0:
        raise SinkError(f"the map's vox2ras has a zero {what} axis")
    return v / norm, norm


def _slices(
    volume: npt.NDArray[np.int16],
    vox2ras: npt.NDArray[np.float64],
    base: Dataset,
) -> list[Dataset]:
    """One dataset per slice of ``volume`` (i, j, k), geometry in LPS from ``vox2ras``."""
    vox2lps = ras_to_lps(vox2ras)
    row_dir, col_spacing = _unit(vox2lps[:3, 0], "first")
    col_dir, row_spacing = _unit(vox2lps[:3, 1], "second")
    slice_step = float(np.linalg.norm(vox2lps[:3, 2]))
    if not slice_step > 0:
        raise SinkError("the map's vox2ras has a zero slice axis")
    normal = np.cross(row_dir, col_dir)
    out = []
    for k in range(volume.shape[2]):
        ds = copy.deepcopy(base)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        position = vox2lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_float(x) for x in position[:3]]
        ds.ImageOrientationPatient = [_ds_float(x) for x in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds_float(row_spacing), _ds_float(col_spacing)]
        ds.SliceThickness = _ds_float(slice_step)
        ds.SpacingBetweenSlices = _ds_float(slice_step)
        ds.SliceLocation = _ds_float(float(position[:3] @ normal))
        plane = np.ascontiguousarray(volume[:, :, k].T, dtype="<i2")
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.PixelData = plane.tobytes()
        out.append(ds)
    return out


def _ds_float(x: float) -> str:
    """A DS value within its 16 characters."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    if text in ("", "-0"):
        text = "0"
    return text if len(text) <= 16 else f"{x:.9g}"


def _base(
    target: Target,
    *,
    source: SourceStudy | None,
    description: str,
    series_number: int,
    derivation: str,
    frame_of_reference: str,
    now: dt.datetime,
) -> Dataset:
    ds = Dataset()
    if source is not None:
        for keyword, value in source.attributes.items():
            setattr(ds, keyword, value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "ReferringPhysicianName" not in ds:
        ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = frame_of_reference
    if "PositionReferenceIndicator" not in ds:
        ds.PositionReferenceIndicator = ""
    ds.SOPClassUID = MRImageStorage
    if source is not None:
        ds.StudyInstanceUID = source.study_uid
    elif target.series is not None:
        ds.StudyInstanceUID = target.series.study_uid
    else:
        raise SinkError("cannot send a target without its study: no series and no source")
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation
    ds.Manufacturer = "boldstream"
    ds.SoftwareVersions = __version__
    ds.ContentDate = ds.SeriesDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.SeriesTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.BurnedInAnnotation = "NO"
    # MR Image module: a derived image has no acquisition of its own.
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = ""
    ds.EchoTime = None
    ds.RepetitionTime = None
    ds.EchoTrainLength = None
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = _ds_float(1.0 / MAP_SCALE)
    ds.WindowCenter = "0"
    ds.WindowWidth = "1"
    return ds


def _marker(
    shape: Sequence[int], ijk: Sequence[float]
) -> tuple[npt.NDArray[np.int16], tuple[int, int, int]]:
    i, j, k = (int(np.rint(v)) for v in ijk)
    centre = (i, j, k)
    if not all(0 <= c < n for c, n in zip(centre, shape, strict=True)):
        raise SinkError(f"the target voxel {centre} lies outside the map's grid {tuple(shape)}")
    marker = np.zeros(tuple(shape), dtype=np.int16)
    for axis in range(3):
        for step in (-1, 1):
            n = [i, j, k]
            n[axis] += step
            if 0 <= n[axis] < shape[axis]:
                marker[n[0], n[1], n[2]] = int(MAP_SCALE / 2)
    marker[i, j, k] = int(MAP_SCALE)
    return marker, centre


def derived_series(
    target: Target,
    correlation_map: npt.ArrayLike,
    *,
    source: SourceStudy | None = None,
    series_number: int | None = None,
    marker: bool = True,
    now: dt.datetime | None = None,
) -> dict[str, list[Dataset]]:
    """The datasets to send: ``{"map": [...], "marker": [...]}`` (one per slice).

    ``target.vox2ras`` is the map's grid. ``series_number`` is the map's
    (default 9000 + the source's number); the marker takes the next one.
    """
    if target.vox2ras is None:
        raise SinkError("the target has no vox2ras: cannot place its map in the scanner frame")
    data = np.asarray(correlation_map, dtype=np.float64)
    if data.ndim != 3:
        raise SinkError(f"the correlation map must be 3-D, got shape {data.shape}")
    stored = np.clip(np.rint(np.nan_to_num(data, nan=0.0) * MAP_SCALE), -32768, 32767)
    when = now or dt.datetime.now()
    source_number = target.series.series_number if target.series is not None else None
    number = series_number if series_number is not None else 9000 + (source_number or 0)
    frame_of_reference = (
        str(source.attributes["FrameOfReferenceUID"])
        if source is not None and "FrameOfReferenceUID" in source.attributes
        else generate_uid()
    )
    where = f"series {source_number}" if source_number is not None else "the source series"
    out = {
        "map": _slices(
            stored.astype(np.int16),
            target.vox2ras,
            _base(
                target,
                description=f"boldstream sgACC connectivity ({target.status})",
                series_number=number,
                derivation=f"boldstream {__version__}: Pearson correlation with the sgACC "
                f"seed of the motion-corrected resting BOLD of {where}; stored r x 1000",
                source=source,
                frame_of_reference=frame_of_reference,
                now=when,
            ),
        )
    }
    if marker:
        ijk = target.voxel_ijk
        assert ijk is not None
        volume, centre = _marker(data.shape, ijk)
        out["marker"] = _slices(
            volume,
            target.vox2ras,
            _base(
                target,
                description=f"boldstream TMS target marker ({target.status})",
                series_number=number + 1,
                derivation=f"boldstream {__version__}: provisional TMS target of {where} "
                f"at voxel {list(centre)}, scanner RAS {[round(v, 2) for v in target.ras_mm]} "
                "mm",
                source=source,
                frame_of_reference=frame_of_reference,
                now=when,
            ),
        )
    return out


def send_datasets(datasets: Sequence[Dataset], peer: PacsPeer) -> int:
    """C-STORE ``datasets`` over one association; returns how many were stored.

    Raises :class:`SinkError` when the peer cannot be reached, refuses the
    association or any instance (status other than success or warning).
    """
    ae = AE(ae_title=peer.calling_ae)
    ae.connection_timeout = peer.timeout_s
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    where = f"{peer.called_ae}@{peer.host}:{peer.port}"
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae)
    if not assoc.is_established:
        raise SinkError(f"PACS {where}: association not established (unreachable or refused)")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise SinkError(f"PACS {where}: no reply to C-STORE (timeout or abort)")
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                raise SinkError(f"PACS {where}: C-STORE refused with status 0x{code:04X}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def send_target(
    result: Result,
    peer: PacsPeer,
    *,
    source: SourceStudy | None = None,
    marker: bool = True,
    series_number: int | None = None,
) -> SentSeries:
    """Send a ``target`` result's map (and marker) to ``peer``; see the module doc."""
    target = Target.from_result(result)
    correlation_map = result.arrays.get("map")
    if correlation_map is None:
        raise SinkError("the target result carries no 'map' array")
    series = derived_series(
        target, correlation_map, source=source, marker=marker, series_number=series_number
    )
    count = send_datasets([ds for group in series.values() for ds in group], peer)
    sent = SentSeries({name: group[0].SeriesInstanceUID for name, group in series.items()}, count)
    log.info(
        "target sent to PACS", peer=f"{peer.called_ae}@{peer.host}:{peer.port}", instances=count
    )
    return sent
