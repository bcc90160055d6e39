"""The spool's file format: a received dataset as a DICOM Part 10 file.

pynetdicom's ``Event.encoded_dataset()`` builds the File Meta Information as
a pydicom dataset and encodes it for every instance (about 0.2 ms of
interpreter time on the thread the scanner waits on). The group is always
the same seven elements in Explicit VR Little Endian, so :func:`part10_bytes`
writes it with :mod:`struct`, byte for byte what pynetdicom writes
(``tests/receiver/test_header.py`` compares the two), followed by the
dataset exactly as it arrived.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

__all__ = ["part10_bytes"]

_PREAMBLE = b"\x00" * 128 + b"DICM"
_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def _element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) & 1:
        value += pad
    return _SHORT.pack(0x0002, elem, vr, len(value)) + value


_IMPLEMENTATION = _element(
    0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"
) + _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")


def part10_bytes(
    dataset: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> bytes:
    """Preamble, prefix, File Meta Information and ``dataset`` (as encoded).

    The UIDs are the C-STORE request's (Media Storage SOP Class/Instance UID)
    and the presentation context's transfer syntax, as pynetdicom sets them.
    """
    group = b"".join(
        (
            _VERSION,
            _element(0x0002, b"UI", sop_class_uid.encode("ascii", "replace"), b"\x00"),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace"), b"\x00"),
            _element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace"), b"\x00"),
            _IMPLEMENTATION,
        )
    )
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(group))
    return b"".join((_PREAMBLE, length, group, dataset))
