"""DICOM in: Storage SCP, durable spool, volume assembly and geometry."""

from __future__ import annotations

from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import Fragment, decode_instance
from boldstream.receiver.geometry import lps_to_ras, ras_to_lps, slice_affine
from boldstream.receiver.scp import Received, StorageSCP
from boldstream.receiver.service import Receiver
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete

__all__ = [
    "Assembler",
    "Fragment",
    "Received",
    "Receiver",
    "SeriesInfo",
    "Spool",
    "StorageSCP",
    "Volume",
    "VolumeIncomplete",
    "decode_instance",
    "lps_to_ras",
    "ras_to_lps",
    "slice_affine",
]
