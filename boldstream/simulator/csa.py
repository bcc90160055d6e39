"""Write Siemens CSA2 ("SV10") headers, the private blob a mosaic's geometry needs.

Layout (what nibabel.nicom.csareader and dcm2niix read): ``b"SV10"``,
``b"\\x04\\x03\\x02\\x01"``, uint32 number of tags, uint32 77; per tag a
64-byte name, int32 VM, 4-byte VR, int32 SyngoDT, int32 number of items,
int32 77; per item four int32 (the second is the item length), then the
NUL-terminated text of the value padded to 4 bytes. Little endian throughout.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

__all__ = ["CSA_CREATOR", "CSA_IMAGE_TAG", "CSA_SERIES_TAG", "csa2_header", "phoenix_protocol"]

#: Private creator and element of the CSA image header in group 0x0029.
CSA_CREATOR = "SIEMENS CSA HEADER"
CSA_IMAGE_TAG = 0x10  # (0029,1010) with creator block 0x10
#: The CSA series header, (0029,1020): the protocol (``MrPhoenixProtocol``).
CSA_SERIES_TAG = 0x20

_SYNGODT = {"IS": 6, "FD": 4, "DS": 3, "SH": 22, "LO": 19, "ST": 20, "UL": 9, "US": 10}


def _item(text: str) -> bytes:
    payload = text.encode("ascii") + b"\x00"
    header = struct.pack("<4i", len(payload), len(payload), 77, len(payload))
    return header + payload + b"\x00" * (-len(payload) % 4)


def csa2_header(tags: Mapping[str, tuple[str, Sequence[object]]]) -> bytes:
    """A CSA2 header from ``{name: (VR, values)}``; values are written as text.

    Floats are written with enough digits to round-trip (``repr``).
    """
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        encoded = name.encode("ascii")
        if len(encoded) >= 64:
            raise ValueError(f"CSA tag name too long: {name}")
        texts = [repr(float(v)) if isinstance(v, float) else str(v) for v in values]
        out.append(
            struct.pack(
                "<64si4s3i",
                encoded,
                len(texts),
                vr.encode("ascii"),
                _SYNGODT.get(vr, 0),
                len(texts),
                77,
            )
        )
        out.extend(_item(t) for t in texts)
    return b"".join(out)


def phoenix_protocol(*, n_volumes: int, tr_us: int) -> str:
    """The ``MrPhoenixProtocol`` text of a run: its ASCCONV block, the part readers use.

    Siemens writes ``lRepetitions`` as volumes minus one and leaves out
    values that are zero (a single-volume run has no such line).
    """
    lines = ["### ASCCONV BEGIN ###", "ulVersion                                = 0x14b44b6"]
    if n_volumes > 1:
        lines.append(f"lRepetitions                             = {n_volumes - 1}")
    lines.append(f"alTR[0]                                  = {tr_us}")
    lines.append("### ASCCONV END ###")
    return "\n".join(lines) + "\n"
