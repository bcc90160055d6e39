"""Which series are analysed. Everything accepted is spooled; only BOLD is analysed.

The decision is made once per series, from its first instance, and logged
once: a scanner-side MoCo series, phase images, derived maps, localisers of
another SOP class and so on are stored but never reach the pipeline. A
single-band reference (SBRef) series is assembled and handed on marked as a
reference (:attr:`Selection.reference`): the pipeline's motion stage takes
its volume as the reference of the next BOLD series on the same grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from boldstream.config.settings import SelectorSettings
from boldstream.receiver.lean import LeanDataset

__all__ = ["ENHANCED_MR_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "Selection", "SeriesSelector"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_PROCESSED_CLASSES = {MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE}


@dataclass(frozen=True, slots=True)
class Selection:
    #: Assembled and handed to the pipeline.
    analyse: bool
    reason: str
    #: An SBRef series: a motion reference, not analysed itself.
    reference: bool = False


def _image_type(ds: Dataset | LeanDataset) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        value = ds.get("FrameType")  # enhanced objects may carry only FrameType
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    return [str(v).strip().upper() for v in value]


class SeriesSelector:
    """Applies :class:`SelectorSettings` to the first instance of a series."""

    def __init__(self, settings: SelectorSettings) -> None:
        self._include = re.compile(settings.include_description, re.IGNORECASE)
        self._exclude = (
            re.compile(settings.exclude_description) if settings.exclude_description else None
        )
        self._bad_types = {t.upper() for t in settings.exclude_image_types}
        self._reference = (
            re.compile(settings.reference_description) if settings.reference_description else None
        )

    def decide(self, ds: Dataset | LeanDataset, sop_class_uid: str) -> Selection:
        if sop_class_uid not in _PROCESSED_CLASSES:
            return Selection(False, f"SOP class {sop_class_uid} is stored but not processed")
        description = str(ds.get("SeriesDescription", "") or "")
        reference = self._reference is not None and bool(self._reference.search(description))
        if not reference and not self._include.search(description):
            return Selection(False, f"SeriesDescription {description!r} not included")
        if not reference and self._exclude is not None and self._exclude.search(description):
            return Selection(False, f"SeriesDescription {description!r} excluded")
        # Only values after the first two (ORIGINAL/DERIVED, PRIMARY/SECONDARY)
        # describe the image, except DERIVED itself, which is checked on its own.
        types = _image_type(ds)
        hit = sorted(self._bad_types.intersection(types[2:]))
        if "DERIVED" in self._bad_types and types[:1] == ["DERIVED"]:
            hit = ["DERIVED", *hit]
        if hit:
            return Selection(False, f"ImageType {'/'.join(types)} excluded ({', '.join(hit)})")
        if reference:
            return Selection(True, "single-band reference (SBRef)", reference=True)
        return Selection(True, "selected")
