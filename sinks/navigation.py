"""Target exports for neuronavigation, in the scanner frame of the loaded image.

A neuronavigation system places the coil on the image the clinician loaded
(a T1 or the functional series, from this session). The target goes out in
that image's scanner frame, with the frame named in the file:

- **scanner RAS+** (mm): NIfTI's scanner-anatomical frame (``sform_code`` 1),
  the frame of ``ras_mm`` in the ``target`` message and of every NIfTI that
  boldstream writes. Brainsight calls it ``NIfTI:Scanner``; Localite
  ``coordinateSpace="RAS"``.
- **DICOM LPS+** (mm): the patient frame of the DICOM images themselves
  (x and y negated). For a Brainsight project built from DICOM (its ``World``
  frame) or a Localite session on DICOM (``coordinateSpace="LPS"``).

Both frames are shared by every series of one session only while the table
and the landmark do not change: export against an image from the same
session and check the target on it. MNI coordinates are for reports, never
for navigation.

File formats, as the vendors' exports look (no public specification exists;
verify against the Brainsight / Localite version of your site before
clinical use):

- Brainsight: the targets block of its exported ``.txt`` (as Brainsight
  2.4 writes it and SimNIBS' ``simnibs.utils.nnav.brainsight`` reads it):
  ``# Version``, ``# Coordinate system``, units and encoding comment lines,
  then ``# Target Name<TAB>Loc. X<TAB>Loc. Y<TAB>Loc. Z<TAB>m0n0 ... m2n2``
  and one tab-separated row per target. ``m0n0..m2n2`` is the target's
  orientation (columns of a 3x3 rotation); boldstream plans no coil
  orientation and writes the identity, so set the orientation in Brainsight.
- Localite TMS Navigator: an ``InstrumentMarkerList`` XML with a
  ``coordinateSpace`` attribute, one ``InstrumentMarker``/``Marker`` per
  target and a ``Matrix4D`` (``data00``..``data33``) whose translation
  column (``data03``, ``data13``, ``data23``) is the target; the rotation is
  the identity for the same reason.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from boldstream import __version__
from boldstream.errors import SinkError
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.stream.messages import Result

__all__ = [
    "FRAMES",
    "Frame",
    "NavigationError",
    "Target",
    "brainsight_text",
    "localite_xml",
]

Frame = Literal["RAS", "LPS"]


class NavigationError(SinkError, ValueError):
    """A target that cannot be exported (no coordinates, unknown frame)."""


#: What each frame is, as written into the exports and the target JSON.
FRAMES: Final[dict[str, str]] = {
    "RAS": "scanner RAS+ (mm): NIfTI scanner-anatomical frame (sform/qform code 1) of the "
    "series' images; x to the right (R), y to anterior (A), z to superior (S)",
    "LPS": "DICOM patient LPS+ (mm) of the series' images: x to L, y to P, z to S "
    "(scanner RAS+ with x and y negated)",
}

#: Brainsight's names of the two frames in its exported .txt.
_BRAINSIGHT_FRAME: Final[dict[str, str]] = {"RAS": "NIfTI:Scanner", "LPS": "World"}

_FLIP: Final = np.array([-1.0, -1.0, 1.0])


def _vector(value: Any, name: str) -> tuple[float, float, float]:
    try:
        x = [float(v) for v in value]
    except (TypeError, ValueError):
        raise NavigationError(f"target {name}: expected 3 numbers, got {value!r}") from None
    if len(x) != 3 or not all(np.isfinite(x)):
        raise NavigationError(f"target {name}: expected 3 finite numbers, got {value!r}")
    return (x[0], x[1], x[2])


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """A provisional TMS target in scanner RAS+, with the grid it was found on."""

    ras_mm: tuple[float, float, float]
    status: str
    #: 4x4 voxel -> scanner RAS+ of the correlation map (None when unknown).
    vox2ras: npt.NDArray[np.float64] | None = None
    series: SeriesInfo | None = None
    index: int | None = None
    #: Everything else the target message said (mni_mm, split_half_mm...).
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: Result) -> Target:
        """The target of a ``target`` result (:func:`~boldstream.sinks.topics.target_result`)."""
        if result.topic != topics.TARGET:
            raise NavigationError(f"expected a {topics.TARGET!r} result, got {result.topic!r}")
        values = dict(result.values)
        affine = result.affines.get(topics.TARGET_AFFINE)
        return cls(
            ras_mm=_vector(values.get("ras_mm"), "ras_mm"),
            status=str(values.get("status", "provisional")),
            vox2ras=None if affine is None else np.asarray(affine, dtype=np.float64),
            series=result.series,
            index=result.index,
            values=values,
        )

    @property
    def lps_mm(self) -> tuple[float, float, float]:
        """The target in DICOM LPS+ (x and y negated)."""
        x, y, z = (np.asarray(self.ras_mm) * _FLIP).tolist()
        return (x, y, z)

    def coordinates(self, frame: Frame) -> tuple[float, float, float]:
        if frame == "RAS":
            return self.ras_mm
        if frame == "LPS":
            return self.lps_mm
        raise NavigationError(f"unknown frame {frame!r}: use 'RAS' or 'LPS'")

    @property
    def voxel_ijk(self) -> tuple[float, float, float] | None:
        """Fractional voxel indices in the map's grid (None without its affine)."""
        if self.vox2ras is None:
            return None
        ijk = np.linalg.solve(self.vox2ras, np.array([*self.ras_mm, 1.0]))[:3]
        return (float(ijk[0]), float(ijk[1]), float(ijk[2]))

    @property
    def provisional(self) -> bool:
        return self.status != "stable"

    @property
    def name(self) -> str:
        """A target name for the navigator's list (no tabs, semicolons or quotes)."""
        run = ""
        if self.series is not None and self.series.series_number is not None:
            run = f" series {self.series.series_number}"
        return f"boldstream sgACC target{run} ({self.status})"

    def as_dict(self) -> dict[str, Any]:
        """The target JSON: every frame, each named."""
        extra = {k: v for k, v in self.values.items() if k not in ("ras_mm", "status", "mni_mm")}
        mni = self.values.get("mni_mm")
        return {
            "Name": self.name,
            "Status": self.status,
            "Provisional": self.provisional,
            "VolumeIndex": self.index,
            "Coordinates": {
                "scanner_ras_mm": list(self.ras_mm),
                "dicom_lps_mm": list(self.lps_mm),
                "voxel_ijk": None if self.voxel_ijk is None else list(self.voxel_ijk),
                "mni_mm": None if mni is None else [float(v) for v in mni],
            },
            "CoordinateFrames": {
                "scanner_ras_mm": FRAMES["RAS"],
                "dicom_lps_mm": FRAMES["LPS"],
                "voxel_ijk": "0-based indices (i, j, k) into the connectivity map "
                "and the motion-corrected series (voxel centres at integers)",
                "mni_mm": "MNI152 (mm, RAS+): for reports, not for navigation",
            },
            "Vox2Ras": None if self.vox2ras is None else self.vox2ras.tolist(),
            "Values": extra,
            "GeneratedBy": {"Name": "boldstream", "Version": __version__},
        }


# --------------------------------------------------------------------------- Brainsight

_BRAINSIGHT_COLUMNS: Final = (
    "Target Name",
    "Loc. X",
    "Loc. Y",
    "Loc. Z",
    "m0n0",
    "m0n1",
    "m0n2",
    "m1n0",
    "m1n1",
    "m1n2",
    "m2n0",
    "m2n1",
    "m2n2",
)


def _clean(name: str) -> str:
    return " ".join(name.replace(";", ",").replace('"', "'").split())


def brainsight_text(targets: Sequence[Target], *, frame: Frame = "RAS") -> str:
    """A Brainsight targets ``.txt`` for ``targets`` in ``frame``."""
    if frame not in _BRAINSIGHT_FRAME:
        raise NavigationError(f"unknown frame {frame!r}: use 'RAS' or 'LPS'")
    lines = [
        "# Version: 12",
        f"# Coordinate system: {_BRAINSIGHT_FRAME[frame]}",
        f"# Created by: boldstream {__version__}",
        "# Units: millimetres, degrees, milliseconds, and microvolts",
        "# Encoding: UTF-8",
        "# Notes: Each column is delimited by a tab. Each value within a column is "
        "delimited by a semicolon.",
        "# " + "\t".join(_BRAINSIGHT_COLUMNS),
    ]
    identity = [f"{v:.4f}" for v in np.eye(3).T.ravel()]
    for target in targets:
        x, y, z = target.coordinates(frame)
        lines.append(
            "\t".join([_clean(target.name), f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", *identity])
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Localite


def localite_xml(targets: Sequence[Target], *, frame: Frame = "RAS") -> str:
    """A Localite ``InstrumentMarkerList`` for ``targets`` in ``frame``."""
    if frame not in _BRAINSIGHT_FRAME:
        raise NavigationError(f"unknown frame {frame!r}: use 'RAS' or 'LPS'")
    root = ET.Element("InstrumentMarkerList", coordinateSpace=frame)
    root.append(ET.Comment(f" written by boldstream {__version__}: {FRAMES[frame]} "))
    for index, target in enumerate(targets):
        marker_el = ET.SubElement(
            root,
            "InstrumentMarker",
            alwaysVisible="false",
            index=str(index),
            selected="false",
        )
        marker = ET.SubElement(
            marker_el,
            "Marker",
            additionalInformation=f"status={target.status}",
            color="#ff0000" if target.provisional else "#00ff00",
            description=_clean(target.name),
            set="true",
        )
        matrix = np.eye(4)
        matrix[:3, 3] = target.coordinates(frame)
        ET.SubElement(
            marker,
            "Matrix4D",
            {f"data{r}{c}": f"{matrix[r, c]:+.6f}" for r in range(4) for c in range(4)},
        )
    ET.indent(root, space="    ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
