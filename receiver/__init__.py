"""DICOM in: Storage SCP, durable spool, volume assembly and geometry."""

from __future__ import annotations

from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete

__all__ = ["SeriesInfo", "Volume", "VolumeIncomplete"]
