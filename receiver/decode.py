"""One received DICOM instance -> the slices it holds, grouped by volume.

Three encodings reach us (SPEC section 1): a Siemens mosaic (one instance is
one volume, tiled in one 2D image), classic MR Image Storage (one instance is
one slice) and Enhanced MR Image Storage (one instance holds many frames: one
volume for Siemens XA, a whole series for Philips). :func:`decode_instance`
turns each into :class:`Fragment` objects, the slices of *one* volume found in
*one* instance, so that :mod:`boldstream.receiver.assembly` handles all three
the same way. Each encoding has its module (:mod:`slices`, :mod:`mosaic`,
:mod:`enhanced`); this one reads what they need up front and picks one.

Decoding is cheap on purpose: pixel arrays stay in their stored dtype and, for
a mosaic, as views into the mosaic; rescaling to float32 happens once, when
the assembler writes the slices into the final volume array.
"""

from __future__ import annotations

import pydicom
from pydicom.tag import Tag

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.receiver.elements import dicom_time_to_seconds, session_key
from boldstream.receiver.enhanced import decode_enhanced
from boldstream.receiver.fragment import Fragment
from boldstream.receiver.lean import KEYWORDS, LeanDataset
from boldstream.receiver.mosaic import decode_mosaic, is_mosaic, siemens_repetitions
from boldstream.receiver.slices import decode_slice

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


def decode_instance(
    ds: pydicom.Dataset | LeanDataset, *, assembly: AssemblySettings
) -> list[Fragment]:
    """Split one instance into per-volume fragments.

    ``ds`` is pydicom's Dataset, or the elements :func:`~boldstream.receiver.lean.read_lean`
    read (converted already; never Enhanced MR). Raises :class:`DicomInputError`
    with a message a technician can act on when the instance cannot become
    part of a volume.
    """
    if isinstance(ds, LeanDataset):
        return [decode_mosaic(ds) if is_mosaic(ds) else decode_slice(ds, assembly)]
    _check_readable(ds)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENHANCED_MR_STORAGE:
        return decode_enhanced(ds)
    if is_mosaic(ds):
        return [decode_mosaic(ds)]
    return [decode_slice(ds, assembly)]


#: The elements decoding reads: those the lean reader reads for slices and
#: mosaics, and what Enhanced MR adds (functional group sequences with all they hold).
_READ_KEYWORDS = [
    *KEYWORDS,
    "AcquisitionDateTime",
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
