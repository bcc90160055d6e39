"""A received instance read without building a pydicom Dataset (the ingest's fast path).

pydicom parses every element of an instance into a Dataset and converts each
on first access, about 20-35 us an element here; decoding a mosaic or a
slice reads some 35 of them, which made ``dcmread`` plus the conversions
most of the ingest process's time per instance. :func:`read_lean` walks the
Part 10 bytes once with :mod:`struct` (:func:`~boldstream.receiver.header.top_level_elements`),
keeps the elements that decoding reads, and converts them by pydicom's rules
(``values.py``: text stripped of trailing spaces and NULs, backslash for
several values, DS as float, IS as int, empty DS/IS/US as None and empty text
as ""). The :class:`LeanDataset` it returns answers ``get(keyword)`` like a
Dataset, so :mod:`slices`, :mod:`mosaic` and the selector run on it unchanged.

It is a fast path, never a second opinion: anything it does not read exactly
as pydicom would returns ``None`` and the caller decodes with pydicom, whose
verdicts and messages stand. That is: no Part 10 preamble, a transfer
syntax other than native little endian, an element of a VR other than the
dictionary's, text that is not plain ASCII (character sets), a value that
does not convert, pixels that are not 8/16/32 bits of one sample, Enhanced
MR (functional group sequences), or a stream it cannot walk to its end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from boldstream.receiver.header import UNDEFINED_LENGTH, UnwalkableError, top_level_elements

__all__ = ["KEYWORDS", "LeanDataset", "read_lean"]

#: Every element decoding of a slice or mosaic, the selector and the ingest read.
KEYWORDS = (
    "SpecificCharacterSet",
    "ImageType",
    "FrameType",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "Manufacturer",
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
    "InstanceNumber",
    "AcquisitionNumber",
    "ImagesInAcquisition",
    "NumberOfTemporalPositions",
    "TemporalPositionIdentifier",
    "NumberOfFrames",
    "PixelData",
)

_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
_NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_TRANSFER_SYNTAX = 0x00020010
_CSA_GROUP = 0x0029
_CSA_CREATOR = "SIEMENS CSA HEADER"
_DICM = b"DICM"
_PREAMBLE = 128
_NUMBERS = {
    "US": struct.Struct("<H"),
    "SS": struct.Struct("<h"),
    "UL": struct.Struct("<I"),
    "SL": struct.Struct("<i"),
    "FL": struct.Struct("<f"),
    "FD": struct.Struct("<d"),
}
#: VRs whose empty value pydicom gives as "" (the rest: None).
_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
)


class _NotLeanError(Exception):
    """Not read exactly as pydicom would: decode with pydicom."""


def _multi(text: str, convert: Callable[[str], Any]) -> Any:
    items = text.split("\\")
    return convert(items[0]) if len(items) == 1 else [convert(v) for v in items]


def _ascii(raw: bytes) -> str:
    if not raw.isascii() or b"\x1b" in raw:  # a character set pydicom would apply
        raise _NotLeanError("text that is not plain ASCII")
    return raw.decode("ascii")


def _ds(item: str) -> float:
    return float(item)


def _is(item: str) -> int:
    return int(item)


def _convert(vr: str, raw: bytes) -> Any:
    """The value pydicom gives for ``raw`` of ``vr`` (the VRs of :data:`KEYWORDS`)."""
    if not raw:
        return "" if vr in _TEXT_VRS else None
    if vr in ("OB", "OW", "OB or OW"):
        return raw
    number = _NUMBERS.get(vr)
    if number is not None:
        if len(raw) % number.size:
            raise _NotLeanError(f"a {vr} value of {len(raw)} bytes")
        values = [v for (v,) in number.iter_unpack(raw)]
        return values[0] if len(values) == 1 else values
    text = _ascii(raw)
    if vr == "DS":
        return _multi(text.strip().rstrip(" \x00"), _ds)
    if vr == "IS":
        return _multi(text.strip().rstrip(" \x00"), _is)
    if vr in ("LO", "SH", "UC"):
        return _multi(text, lambda v: v.rstrip("\x00 "))
    if vr == "UI":  # pydicom's UID strips every value of whitespace, both ends
        return _multi(text.rstrip(" \x00"), str.strip)
    if vr in ("CS", "TM", "DA", "AS", "DT"):
        return _multi(text.rstrip(" \x00"), str)
    raise _NotLeanError(f"VR {vr} is not read here")


def _wanted() -> dict[int, tuple[str, str]]:
    out = {}
    for keyword in KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        out[tag] = (keyword, dictionary_VR(tag))
    return out


_WANTED = _wanted()


@dataclass(frozen=True, slots=True)
class _Value:
    """What pydicom's ``private_block(...)[offset]`` gives: an element's ``value``."""

    value: bytes


@dataclass(frozen=True, slots=True)
class _FileMeta:
    TransferSyntaxUID: UID


class LeanDataset:
    """The elements of :data:`KEYWORDS` of one instance, with a Dataset's ``get``."""

    def __init__(
        self, values: dict[str, Any], private: dict[int, bytes], transfer_syntax: str
    ) -> None:
        self._values = values
        self._private = private  # (0029,xxxx) element -> raw value
        self.file_meta = _FileMeta(UID(transfer_syntax))

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword not in _KEYWORD_SET:
            raise KeyError(f"the lean reader does not read {keyword}; add it to KEYWORDS")
        return self._values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values

    @property
    def PixelData(self) -> bytes:  # noqa: N802 (pydicom's name)
        pixels: bytes = self._values["PixelData"]
        return pixels

    def _block(self, creator: str) -> int | None:
        """First element of ``creator``'s private block in group 0029, or None."""
        for element in sorted(e for e in self._private if e <= 0xFF):
            if self._private[element].rstrip(b"\x00 ").decode("latin-1") == creator:
                return element << 8
        return None

    def csa_block(self) -> int | None:
        """First element of the "SIEMENS CSA HEADER" block, found as nibabel's
        ``get_csa_header`` finds it (which also needs (0029,0010) present)."""
        return self._block(_CSA_CREATOR) if 0x0010 in self._private else None

    def csa_element(self, offset: int) -> bytes | None:
        """The raw CSA element at ``offset`` (0x10 image, 0x20 series) of that block."""
        block = self.csa_block()
        return None if block is None else self._private.get(block + offset)

    def private_block(self, group: int, creator: str) -> dict[int, _Value]:
        """Like pydicom's: the block's elements by offset; KeyError without one."""
        block = self._block(creator) if group == _CSA_GROUP else None
        if block is None:
            raise KeyError(f"no private block {creator!r} in group {group:04X}")
        return {
            element - block: _Value(raw)
            for element, raw in self._private.items()
            if block <= element < block + 0x100
        }


_KEYWORD_SET = frozenset(KEYWORDS)


def _file_meta(data: bytes) -> tuple[str, int]:
    """(transfer syntax UID, offset of the data set) of a Part 10 stream."""
    if data[_PREAMBLE : _PREAMBLE + 4] != _DICM:
        raise _NotLeanError("no Part 10 preamble")
    syntax = None
    end = _PREAMBLE + 4
    for tag, _vr, start, length in top_level_elements(data, True, start=end, group=0x0002):
        if length == UNDEFINED_LENGTH:
            raise _NotLeanError("an undefined-length element in the file meta")
        end = start + length
        if tag == _TRANSFER_SYNTAX:
            syntax = _ascii(data[start:end]).rstrip(" \x00")
    if syntax is None:
        raise _NotLeanError("no transfer syntax in the file meta")
    return syntax, end


def _read(data: bytes) -> LeanDataset | None:
    syntax, offset = _file_meta(data)
    if syntax not in _NATIVE:  # what pixels.py reads without pydicom's decoders
        return None
    explicit = syntax == ExplicitVRLittleEndian
    values: dict[str, Any] = {}
    private: dict[int, bytes] = {}
    vrs: dict[int, bytes] = {}
    for tag, vr, start, length in top_level_elements(data, explicit, start=offset):
        if length == UNDEFINED_LENGTH:
            if tag in _WANTED or tag >> 16 == _CSA_GROUP:
                raise _NotLeanError("an element it reads is a sequence or encapsulated")
            continue
        wanted = _WANTED.get(tag)
        if wanted is not None:
            keyword, dictionary = wanted
            if vr and vr.decode("ascii") not in dictionary.split(" or "):
                raise _NotLeanError(f"{keyword} has VR {vr!r}, not {dictionary}")
            values[keyword] = _convert(dictionary, bytes(data[start : start + length]))
        elif tag >> 16 == _CSA_GROUP and (tag & 0xFFFF) >= 0x10:
            element = tag & 0xFFFF
            if element <= 0xFF and vr not in (b"", b"LO", b"UN"):
                continue  # not a private creator nibabel or pydicom would match
            vrs[element] = vr
            private[element] = bytes(data[start : start + length])
    dataset = LeanDataset(values, private, syntax)
    block = dataset.csa_block()
    if block is not None:
        for offset in (0x10, 0x20):  # the CSA headers must be bytes, as pydicom gives them
            if vrs.get(block + offset, b"") not in (b"", b"OB", b"UN"):
                raise _NotLeanError("a Siemens CSA header of an unexpected VR")
    if str(values.get("SOPClassUID", "")) == _ENHANCED_MR:
        return None  # functional groups: pydicom's path
    bits = values.get("BitsAllocated")
    if "PixelData" in values and (bits not in (8, 16, 32) or values.get("SamplesPerPixel") != 1):
        return None
    return dataset


def read_lean(data: bytes) -> LeanDataset | None:
    """The instance's decoding elements from its Part 10 bytes, or None (use pydicom)."""
    try:
        return _read(data)
    except (_NotLeanError, UnwalkableError, struct.error, ValueError, IndexError):
        return None
