"""One received DICOM instance -> the slices it holds, grouped by volume.

Three encodings reach us (SPEC section 1): a Siemens mosaic (one instance is
one volume, tiled in one 2D image), classic MR Image Storage (one instance is
one slice) and Enhanced MR Image Storage (one instance holds many frames: one
volume for Siemens XA, a whole series for Philips). :func:`decode_instance`
turns each into :class:`Fragment` objects, the slices of *one* volume found in
*one* instance, so that :mod:`boldstream.receiver.assembly` handles all three
the same way.

Decoding is cheap on purpose: pixel arrays stay in their stored dtype and, for
a mosaic, as views into the mosaic; rescaling to float32 happens once, when
the assembler writes the slices into the final volume array.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.receiver.geometry import orientation_frame, slice_normal
from boldstream.receiver.volume import SeriesInfo

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its readers are experimental; we only
    # use the CSA header parser, which is the well-trodden part.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader as _csareader

#: nibabel's CSA reader is untyped; typed as Any once here.
csareader: Any = _csareader

__all__ = [
    "ENHANCED_MR_STORAGE",
    "MR_IMAGE_STORAGE",
    "Fragment",
    "decode_instance",
    "dicom_time_to_seconds",
    "session_key",
    "siemens_repetitions",
]

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

_PHOTOMETRIC_OK = ("MONOCHROME1", "MONOCHROME2")
#: Transfer syntaxes whose pixel data :func:`_native_pixels` reads directly.
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
#: Orientations of the frames of one volume must agree to this (direction
#: cosines); a localizer with tilted planes differs by several degrees.
_ORIENTATION_TOLERANCE = 1e-3

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


def decode_instance(ds: pydicom.Dataset, *, assembly: AssemblySettings) -> list[Fragment]:
    """Split one instance into per-volume fragments.

    Raises :class:`DicomInputError` with a message a technician can act on
    when the instance cannot become part of a volume.
    """
    _check_readable(ds)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENHANCED_MR_STORAGE:
        return _decode_enhanced(ds)
    if _is_mosaic(ds):
        return [_decode_mosaic(ds)]
    return [_decode_slice(ds, assembly)]


#: The elements decoding reads (functional group sequences with all they hold).
_READ_KEYWORDS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "Manufacturer",
    "ImageType",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "RepetitionTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImagesInAcquisition",
    "NumberOfTemporalPositions",
    "TemporalPositionIdentifier",
    "NumberOfFrames",
    "PixelData",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]


_READ_TAGS = [(keyword, Tag(keyword)) for keyword in _READ_KEYWORDS]


def _check_readable(ds: pydicom.Dataset) -> None:
    """Convert the elements decoding reads, once, up front.

    pydicom converts a received element on first access and, for a malformed
    value (a US of odd length, a sequence of garbage, Pixel Data whose VR
    depends on an absent BitsAllocated), raises one of many exception types
    then. Doing it here, where nothing but that conversion runs, turns each
    into one DicomInputError naming the element.
    """
    for keyword, tag in _READ_TAGS:
        try:
            element = ds.get(tag)  # a tag, not a keyword: no name lookup per call
            if element is None:
                continue
            value = element.value
            if isinstance(value, pydicom.Sequence):
                for item in value:
                    for _ in item.iterall():
                        pass
        except Exception as exc:
            raise DicomInputError(f"{keyword} cannot be read: {exc}") from None


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


# -- series facts ------------------------------------------------------------


def _series_info(
    ds: pydicom.Dataset,
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
    tr = _as_float(tr_ms)
    positions = _as_int(ds.get("NumberOfTemporalPositions"))
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


#: The series CSA header's element in the "SIEMENS CSA HEADER" private block.
_CSA_SERIES_ELEMENT = 0x20
_REPETITIONS = re.compile(rb"\nlRepetitions\s*=\s*(\d+)")


def siemens_repetitions(ds: pydicom.Dataset) -> int | None:
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


def _as_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _as_int(value: object) -> int | None:
    number = _as_float(value)
    return int(number) if number is not None else None


def _spacing_hint(item: Any) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _as_float(item.get(keyword)) if item is not None else None
        if value is not None and value > 0:
            return value
    return None


def _pixel_spacing(value: object, where: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise DicomInputError(f"{where}: PixelSpacing missing or not two numbers") from None
    if not (row > 0 and col > 0):
        raise DicomInputError(f"{where}: PixelSpacing must be positive, got {row}, {col}")
    return (row, col)


def _vector(value: object, size: int, what: str) -> FloatArray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise DicomInputError(f"{what} missing or not numbers: no geometry") from None
    if out.shape != (size,):
        raise DicomInputError(f"{what} must have {size} values, got {out.size}")
    return out


def _rescale(item: Any) -> tuple[float, float]:
    slope = _as_float(item.get("RescaleSlope")) if item is not None else None
    intercept = _as_float(item.get("RescaleIntercept")) if item is not None else None
    return (1.0 if slope is None or slope == 0 else slope, intercept or 0.0)


# -- pixels ------------------------------------------------------------------


def _pixel_array(ds: pydicom.Dataset, frames: int = 1) -> npt.NDArray[Any]:
    """The stored pixel values, with the checks that give readable errors."""
    if "PixelData" not in ds:
        raise DicomInputError("instance has no pixel data (PixelData is missing)")
    samples = _as_int(ds.get("SamplesPerPixel")) or 1
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
    if samples != 1 or photometric not in _PHOTOMETRIC_OK:
        raise DicomInputError(
            f"unsupported image type: {samples} sample(s) per pixel, {photometric}; "
            "a magnitude image (1 sample, MONOCHROME2) is needed"
        )
    rows, cols = _as_int(ds.get("Rows")) or 0, _as_int(ds.get("Columns")) or 0
    if rows <= 0 or cols <= 0:
        raise DicomInputError(f"image matrix is empty (Rows={rows}, Columns={cols})")
    bits = _as_int(ds.get("BitsAllocated")) or 16
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer is not None and not transfer.is_transfer_syntax:
        raise DicomInputError(f"unknown transfer syntax {str(transfer)!r}")
    if transfer is None or not transfer.is_compressed:
        needed = rows * cols * frames * bits // 8
        have = len(ds.PixelData or b"")
        if have < needed:
            raise DicomInputError(
                f"pixel data is {have} bytes but {rows}x{cols}x{frames} pixels of {bits} bits "
                f"need {needed}: truncated or corrupt instance"
            )
    expected = (frames, rows, cols) if frames > 1 else (rows, cols)
    explicit = _as_int(ds.get("BitsAllocated")) in (8, 16, 32) and ds.get("SamplesPerPixel") == 1
    if explicit and transfer in _NATIVE_LITTLE_ENDIAN:
        return _native_pixels(ds, bits, expected)
    try:
        array: npt.NDArray[Any] = ds.pixel_array
    except Exception as exc:
        raise DicomInputError(f"pixel data cannot be decoded: {exc}") from exc
    if array.shape != expected:
        raise DicomInputError(f"pixel data decodes to shape {array.shape}, expected {expected}")
    return array


def _native_pixels(
    ds: pydicom.Dataset, bits: int, shape: tuple[int, ...]
) -> npt.NDArray[np.integer[Any]]:
    """Uncompressed little-endian pixel data as ``ds.pixel_array`` gives it.

    The same values (unused high bits cleared, or sign-extended for signed
    data, as pydicom does) without its decoder machinery, which took a quarter
    of the decode time of a 90x90 slice. Read-only: a view on the received bytes
    when no bits need clearing.
    """
    signed = (_as_int(ds.get("PixelRepresentation")) or 0) == 1
    stored = _as_int(ds.get("BitsStored")) or bits
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = int(np.prod(shape))
    array = np.frombuffer(ds.PixelData, dtype=dtype, count=count).reshape(shape)
    if 0 < stored < bits:
        shift = bits - stored
        array = np.right_shift(np.left_shift(array, shift), shift)
    return array


# -- classic single-slice MR Image Storage ------------------------------------


def _geometry(ds: Any, where: str) -> tuple[FloatArray, FloatArray, tuple[float, float]]:
    iop = _vector(ds.get("ImageOrientationPatient"), 6, f"{where}: ImageOrientationPatient")
    ipp = _vector(ds.get("ImagePositionPatient"), 3, f"{where}: ImagePositionPatient")
    orientation_frame(iop)
    return iop, ipp, _pixel_spacing(ds.get("PixelSpacing"), where)


def _slices_per_volume(ds: pydicom.Dataset, assembly: AssemblySettings) -> int | None:
    """Slices per volume: the setting, else ImagesInAcquisition, else unknown.

    Philips counts every image of the acquisition in ImagesInAcquisition
    (slices times dynamics), so for Philips it is divided by
    NumberOfTemporalPositions when that divides it.
    """
    if assembly.slices_per_volume > 0:
        return assembly.slices_per_volume
    images = _as_int(ds.get("ImagesInAcquisition"))
    if images is None or images <= 0:
        return None
    temporal = _as_int(ds.get("NumberOfTemporalPositions")) or 1
    if "PHILIPS" in str(ds.get("Manufacturer", "")).upper() and temporal > 1:
        return images // temporal if images % temporal == 0 else None
    return images


def _temporal_index(ds: pydicom.Dataset, key: str, slices: int | None) -> int:
    """0-based volume index of a single-slice instance (see AssemblySettings)."""
    if key == "auto":
        positions = _as_int(ds.get("NumberOfTemporalPositions")) or 0
        if positions > 1 and ds.get("TemporalPositionIdentifier") is not None:
            key = "TemporalPositionIdentifier"
        elif (
            "SIEMENS" in str(ds.get("Manufacturer", "")).upper()
            and ds.get("AcquisitionNumber") is not None
        ):
            key = "AcquisitionNumber"
        else:
            key = "InstanceNumber"
    number = _as_int(ds.get(key))
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


def _decode_slice(ds: pydicom.Dataset, assembly: AssemblySettings) -> Fragment:
    where = "single-slice MR image"
    iop, ipp, spacing = _geometry(ds, where)
    pixels = _pixel_array(ds)
    slices = _slices_per_volume(ds, assembly)
    index = _temporal_index(ds, assembly.temporal_key, slices)
    slope, intercept = _rescale(ds)
    time_value = ds.get("AcquisitionTime") or ds.get("ContentTime")
    return Fragment(
        series=_series_info(ds, encoding="slice", tr_ms=ds.get("RepetitionTime"), slices=slices),
        index=index,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        pixels=(pixels,),
        slopes=np.array([slope]),
        intercepts=np.array([intercept]),
        positions=ipp.reshape(1, 3),
        orientation=iop,
        normal=slice_normal(iop),
        pixel_spacing=spacing,
        slice_spacing=_spacing_hint(ds),
        expected_slices=slices,
        acquisition_time=dicom_time_to_seconds(time_value),
    )


# -- Siemens mosaic -----------------------------------------------------------


def _is_mosaic(ds: pydicom.Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "MOSAIC" in image_type


def _decode_mosaic(ds: pydicom.Dataset) -> Fragment:
    """Split a Siemens mosaic into its tiles, with nibabel's position fix.

    ImagePositionPatient of a mosaic is the corner of the whole mosaic image
    as if it were one big slice; the first tile's corner is found by moving
    half the mosaic-minus-tile size along the in-plane axes (nibabel's
    ``MosaicWrapper.image_position``). Tiles follow the CSA SliceNormalVector.
    """
    where = "Siemens mosaic"
    try:
        csa = csareader.get_csa_header(ds)
    except Exception as exc:
        raise DicomInputError(f"{where}: the Siemens CSA header cannot be read: {exc}") from exc
    n_tiles = csareader.get_n_mosaic(csa) if csa else None
    if not n_tiles:
        raise DicomInputError(
            f"{where}: NumberOfImagesInMosaic is missing from the CSA header; "
            "was the series anonymised with private tags removed?"
        )
    n_tiles = int(n_tiles)
    iop, ipp, spacing = _geometry(ds, where)
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

    mosaic = _pixel_array(ds)
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
    step = _spacing_hint(ds) or 1.0
    positions = first + np.arange(n_tiles)[:, None] * (normal * step)

    slice_times = None
    times = csa.get("tags", {}).get("MosaicRefAcqTimes", {}).get("items") if csa else None
    if times and len(times) >= n_tiles:
        slice_times = np.asarray(times[:n_tiles], dtype=np.float64) / 1000.0
    slope, intercept = _rescale(ds)
    number = _as_int(ds.get("InstanceNumber")) or _as_int(ds.get("AcquisitionNumber"))
    if number is None or number < 1:
        raise DicomInputError(f"{where}: InstanceNumber missing: cannot order the volumes")
    info = _series_info(
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


# -- Enhanced MR Image Storage -------------------------------------------------


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
        iop = _vector(orient.get("ImageOrientationPatient"), 6, f"{where}: orientation")
        orientation_frame(iop)
        slope, intercept = _rescale(transform if transform is not None else ds)
        frames.append(
            _Frame(
                number=k,
                position=_vector(position.get("ImagePositionPatient"), 3, f"{where}: position"),
                orientation=iop,
                spacing=_pixel_spacing(measures.get("PixelSpacing"), where),
                thickness=_spacing_hint(measures),
                temporal=_as_int(content.get("TemporalPositionIndex")) if content else None,
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
    number = _as_int(ds.get("InstanceNumber"))
    if number is None or number < 1:
        raise DicomInputError("enhanced MR: InstanceNumber missing: cannot order the volumes")
    return {number - 1: frames}


def _decode_enhanced(ds: pydicom.Dataset) -> list[Fragment]:
    n_frames = _as_int(ds.get("NumberOfFrames")) or 1
    frames = _read_frames(ds, n_frames)
    pixels = _pixel_array(ds, n_frames)
    stack = pixels if n_frames > 1 else pixels[np.newaxis]
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    timing = _group(None, shared, "MRTimingAndRelatedParametersSequence")
    tr_ms = timing.get("RepetitionTime") if timing is not None else ds.get("RepetitionTime")
    volumes = _split_volumes(ds, frames)
    volume_size = len(next(iter(volumes.values())))
    if any(len(group) != volume_size for group in volumes.values()):
        raise DicomInputError("enhanced MR: temporal positions hold different numbers of frames")
    info = _series_info(ds, encoding="enhanced", tr_ms=tr_ms, slices=volume_size)
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
