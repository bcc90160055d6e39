"""What the C-STORE handler checks, read straight from the encoded dataset.

Before it answers the scanner the handler needs the instance's UIDs (to name
the spool file) and its pixel description (to refuse pixel data that does not
match Rows x Columns x frames). Decoding the whole dataset with pydicom for
that cost about half a millisecond of interpreter time per instance on the
thread every instance waits for; :func:`scan_header` walks the top-level
element headers with :mod:`struct` instead and reads only those values.

It reads the little-endian transfer syntaxes, implicit and explicit VR, native
or encapsulated pixel data (what MR scanners send). Anything else, and any
stream it cannot walk cleanly to its last byte, returns ``None``: the handler
then decodes with pydicom (:func:`header_from_dataset`), whose verdict and
error messages stand. So this is a fast path, never a second opinion: it
accepts only streams it walked element by element.

:func:`pixel_data_problem` is the one check of the pixel description, for
headers from either path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = [
    "UNDEFINED_LENGTH",
    "InstanceHeader",
    "UnwalkableError",
    "header_from_dataset",
    "pixel_data_problem",
    "scan_header",
    "top_level_elements",
]

#: The length of a sequence or encapsulated value whose end is a delimiter.
UNDEFINED_LENGTH = 0xFFFFFFFF
#: VRs whose explicit-VR header has two reserved bytes and a 32-bit length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)

_SOP_INSTANCE = 0x00080018
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_SAMPLES = 0x00280002
_PHOTOMETRIC = 0x00280004
_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS = 0x00280100
_PIXEL_DATA = 0x7FE00010
_TEXT = frozenset((_SOP_INSTANCE, _STUDY, _SERIES, _PHOTOMETRIC, _FRAMES))
_SHORT = frozenset((_SAMPLES, _ROWS, _COLUMNS, _BITS))
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

_TAG_LENGTH = struct.Struct("<HHI")  # implicit VR, and items and delimiters
_EXPLICIT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG_LENGTH = struct.Struct("<I")
_US = struct.Struct("<H")


class UnwalkableError(Exception):
    """The stream is not one this walker reads to its end; pydicom decides."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The values the handler checks; ``None`` where the element is absent."""

    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    samples_per_pixel: int | None
    number_of_frames: int | None
    photometric: str
    #: Whether the dataset has Pixel Data at all.
    has_pixel_data: bool
    #: Bytes of native Pixel Data; ``None`` when encapsulated (compressed).
    pixel_bytes: int | None


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip("\x00 ")


def _int_or_none(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _element(data: bytes, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """``(tag, vr, length, value offset)`` of the element header at ``pos``."""
    group, elem, length = _TAG_LENGTH.unpack_from(data, pos)
    tag = group << 16 | elem
    if not explicit or group == 0xFFFE:  # items and delimiters carry no VR
        return tag, b"", length, pos + 8
    group, elem, vr, short = _EXPLICIT.unpack_from(data, pos)
    if vr in _LONG_VRS:
        return tag, vr, _LONG_LENGTH.unpack_from(data, pos + 8)[0], pos + 12
    if vr not in _VRS:
        raise UnwalkableError(f"unknown VR {vr!r}")
    return tag, vr, short, pos + 8


def _skip_items(data: bytes, pos: int, explicit: bool) -> int:
    """Offset after the sequence delimiter of an undefined-length value at ``pos``."""
    while True:
        tag, _, length, pos = _element(data, pos, False)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise UnwalkableError("expected an item in an undefined-length value")
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, then the item delimiter
            tag, vr, length, pos = _element(data, pos, explicit)
            if tag == _ITEM_END:
                break
            pos = _skip_value(data, pos, vr, length, explicit)
        if pos > len(data):
            raise UnwalkableError("item runs past the end")


def _skip_value(data: bytes, pos: int, vr: bytes, length: int, explicit: bool) -> int:
    if length != UNDEFINED_LENGTH:
        return pos + length
    # Undefined length: a sequence, encapsulated pixel data, or UN holding an
    # implicit-VR sequence (PS3.5 6.2.2).
    return _skip_items(data, pos, explicit and vr != b"UN")


def top_level_elements(
    data: bytes, explicit: bool, *, start: int = 0, group: int | None = None
) -> Iterator[tuple[int, bytes, int, int]]:
    """``(tag, VR, value offset, length)`` of each top-level element, from
    ``start`` to the end of ``data`` (or, with ``group``, up to the first
    element of another group). An undefined-length value (a sequence,
    encapsulated pixel data) is yielded with length :data:`UNDEFINED_LENGTH`
    and then skipped. Raises :class:`UnwalkableError` (or :class:`struct.error`)
    on a stream it cannot walk to its end. ``VR`` is ``b""`` for implicit VR."""
    pos, end = start, len(data)
    while pos < end:
        if group is not None and _TAG_LENGTH.unpack_from(data, pos)[0] != group:
            return
        tag, vr, length, pos = _element(data, pos, explicit)
        if tag >> 16 == 0xFFFE:
            raise UnwalkableError("item or delimiter outside a sequence")
        if length == UNDEFINED_LENGTH:
            yield tag, vr, pos, length
            pos = _skip_value(data, pos, vr, length, explicit)
            continue
        if pos + length > end:
            raise UnwalkableError("value runs past the end")
        yield tag, vr, pos, length
        pos += length
    if pos != end:
        raise UnwalkableError("last element runs past the end")


def _walk(data: bytes, explicit: bool) -> InstanceHeader:
    values: dict[int, str | int] = {}
    pixel_bytes: int | None = None
    has_pixels = False
    for tag, vr, pos, length in top_level_elements(data, explicit):
        if length == UNDEFINED_LENGTH:
            has_pixels = has_pixels or tag == _PIXEL_DATA  # encapsulated
        elif tag in _TEXT:
            if vr not in (b"", b"UI", b"CS", b"IS"):
                raise UnwalkableError("a checked element with an unexpected VR")
            values[tag] = _text(data[pos : pos + length])
        elif tag in _SHORT:
            if vr not in (b"", b"US") or length != 2:
                raise UnwalkableError("a checked element that is not one US")
            values[tag] = _US.unpack_from(data, pos)[0]
        elif tag == _PIXEL_DATA:
            has_pixels, pixel_bytes = True, length

    def text(tag: int) -> str | None:
        value = values.get(tag)
        return value if isinstance(value, str) and value else None

    def short(tag: int) -> int | None:
        value = values.get(tag)
        return value if isinstance(value, int) else None

    return InstanceHeader(
        sop_instance_uid=text(_SOP_INSTANCE),
        study_uid=text(_STUDY),
        series_uid=text(_SERIES),
        rows=short(_ROWS),
        columns=short(_COLUMNS),
        bits_allocated=short(_BITS),
        samples_per_pixel=short(_SAMPLES),
        number_of_frames=_int_or_none(text(_FRAMES) or ""),
        photometric=text(_PHOTOMETRIC) or "",
        has_pixel_data=has_pixels,
        pixel_bytes=pixel_bytes if has_pixels else None,
    )


@lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """``(walkable, explicit VR, compressed)`` for a transfer syntax UID."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or not uid.is_little_endian or uid.is_deflated:
        return False, False, False
    return True, not uid.is_implicit_VR, uid.is_compressed


def scan_header(data: bytes, transfer_syntax: str) -> InstanceHeader | None:
    """The handler's values from an encoded dataset (no file meta), or None.

    ``None`` means: not a little-endian stream this walker reads to its last
    byte (deflated, big endian, private syntaxes, or anything irregular, such
    as native pixel data under a compressed syntax); decode with pydicom.
    """
    walkable, explicit, compressed = _syntax(transfer_syntax)
    if not walkable:
        return None
    try:
        header = _walk(data, explicit)
    except (UnwalkableError, struct.error):
        return None
    if header.has_pixel_data and (header.pixel_bytes is None) != compressed:
        return None
    return header


def _get_int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def header_from_dataset(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    """The same values from a dataset pydicom decoded (the slow path)."""
    has_pixels = "PixelData" in ds
    syntax = UID(transfer_syntax)
    compressed = syntax.is_transfer_syntax and syntax.is_compressed

    def uid(keyword: str) -> str | None:
        value = ds.get(keyword)
        return (str(value).strip("\x00 ") or None) if value is not None else None

    return InstanceHeader(
        sop_instance_uid=uid("SOPInstanceUID"),
        study_uid=uid("StudyInstanceUID"),
        series_uid=uid("SeriesInstanceUID"),
        rows=_get_int(ds, "Rows"),
        columns=_get_int(ds, "Columns"),
        bits_allocated=_get_int(ds, "BitsAllocated"),
        samples_per_pixel=_get_int(ds, "SamplesPerPixel"),
        number_of_frames=_get_int(ds, "NumberOfFrames"),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
        has_pixel_data=has_pixels,
        pixel_bytes=len(ds.PixelData or b"") if has_pixels and not compressed else None,
    )


def pixel_data_problem(header: InstanceHeader) -> str | None:
    """Why native Pixel Data does not match Rows x Columns x frames, or None.

    Only native pixel data is checked (an encapsulated stream's size is its
    codec's business). The value may carry one pad byte to reach an even
    length; anything shorter or longer means the header does not describe
    the pixels (a cut or corrupt instance), and spooling it would only store
    garbage.
    """
    if header.pixel_bytes is None:
        return None
    rows, cols, bits = header.rows, header.columns, header.bits_allocated
    if rows is None or cols is None or bits is None:
        return "Rows, Columns or BitsAllocated missing or not a number: pixel data undescribed"
    samples = header.samples_per_pixel or 1
    frames = header.number_of_frames or 1
    if min(rows, cols, bits, samples, frames) < 1:
        return (
            f"pixel description is empty (Rows={rows}, Columns={cols}, BitsAllocated={bits}, "
            f"SamplesPerPixel={samples}, NumberOfFrames={frames})"
        )
    needed = (rows * cols * frames * samples * bits + 7) // 8
    if header.photometric == "YBR_FULL_422":
        needed = needed // 3 * 2  # chroma subsampled in the native encoding
    have = header.pixel_bytes
    if needed <= have <= needed + (needed & 1):
        return None
    shape = f"{rows}x{cols}x{frames} pixels of {samples}x{bits} bits"
    if have < needed:
        return f"pixel data is {have} bytes but {shape} need {needed}: truncated instance"
    return f"pixel data is {have} bytes but {shape} need {needed}: header and pixels disagree"
