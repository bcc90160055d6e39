"""Per-volume motion and QC as an fMRIPrep-style confounds table (TSV + JSON sidecar).

``sub-<id>_task-rest_desc-confounds_timeseries.tsv``: one row per volume of the
series (index 0 first), ``n/a`` where a value does not exist (the first
volume's FD and DVARS, volumes that were missing or not analysed), columns::

    trans_x trans_y trans_z rot_x rot_y rot_z framewise_displacement dvars
    std_dvars global_signal non_steady_state_outlierXX... motion_outlierXX...

As in fMRIPrep, each outlier is a one-hot column (1 on its row, 0 elsewhere):
``non_steady_state_outlierXX`` for the dummy scans, ``motion_outlierXX`` for
each volume the QC called an outlier (FD or std_DVARS above threshold, or a
motion estimate that was not trusted). The sidecar describes every column
with its units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boldstream.sinks import topics

__all__ = ["COLUMNS", "ConfoundsTable"]

COLUMNS = (
    "trans_x",
    "trans_y",
    "trans_z",
    "rot_x",
    "rot_y",
    "rot_z",
    "framewise_displacement",
    "dvars",
    "std_dvars",
    "global_signal",
)

_QC_COLUMNS = {
    "framewise_displacement": "fd_mm",
    "dvars": "dvars",
    "std_dvars": "std_dvars",
    "global_signal": "global_signal",
}

_DESCRIPTIONS: dict[str, dict[str, str]] = {
    **{
        f"trans_{a}": {
            "Description": f"Translation along {a} (RAS+, scanner frame), relative to the "
            "reference volume, estimated in real time by boldstream",
            "Units": "mm",
        }
        for a in "xyz"
    },
    **{
        f"rot_{a}": {
            "Description": f"Rotation about {a} (RAS+, about the volume centre), relative to "
            "the reference volume, estimated in real time by boldstream",
            "Units": "rad",
        }
        for a in "xyz"
    },
    "framewise_displacement": {
        "Description": "Framewise displacement (Power et al. 2012), rotations on a 50 mm sphere",
        "Units": "mm",
    },
    "dvars": {
        "Description": "DVARS: RMS over brain voxels of the change from the previous volume",
        "Units": "arbitrary",
    },
    "std_dvars": {
        "Description": "Standardised DVARS (Nichols 2013), n/a during the warm-up window",
        "Units": "arbitrary",
    },
    "global_signal": {
        "Description": "Mean over the brain mask of the motion-corrected volume",
        "Units": "arbitrary",
    },
}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else format(value, ".10g")
    return str(value)


@dataclass
class ConfoundsTable:
    """Collects one series' ``motion``/``qc`` results and writes the table."""

    tr_s: float | None = None
    n_volumes: int | None = None
    motion: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    qc: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    gaps: set[int] = field(default_factory=set)

    def add(self, topic: str, index: int | None, values: Mapping[str, Any]) -> None:
        """Take one result (topics ``motion``, ``qc``, ``pipeline.skipped``, ``gap``)."""
        if index is None:
            return
        if topic == topics.MOTION:
            self.motion[index] = values
        elif topic == topics.QC:
            self.qc[index] = values
        elif topic == "pipeline.skipped":
            self.skipped[index] = str(values.get("reason", ""))
        elif topic == topics.GAP:
            self.gaps.add(index)

    @property
    def length(self) -> int:
        seen = [*self.motion, *self.qc, *self.skipped, *self.gaps]
        last = max(seen) + 1 if seen else 0
        return max(last, self.n_volumes or 0)

    def outliers(self) -> list[int]:
        return sorted(
            i
            for i, v in self.qc.items()
            if v.get("outlier") or (i in self.motion and self.motion[i].get("flagged"))
        )

    def dummies(self) -> list[int]:
        return sorted(i for i, reason in self.skipped.items() if reason == "dummy scan")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        dummies, outliers = self.dummies(), self.outliers()
        header = [
            *COLUMNS,
            *(f"non_steady_state_outlier{k:02d}" for k in range(len(dummies))),
            *(f"motion_outlier{k:02d}" for k in range(len(outliers))),
        ]
        body: list[list[str]] = []
        for i in range(self.length):
            motion, qc = self.motion.get(i, {}), self.qc.get(i, {})
            row = [_cell(motion.get(c)) for c in COLUMNS[:6]]
            row.extend(_cell(qc.get(_QC_COLUMNS[c])) for c in COLUMNS[6:])
            row.extend("1" if i == d else "0" for d in dummies)
            row.extend("1" if i == o else "0" for o in outliers)
            body.append(row)
        return header, body

    def sidecar(self) -> dict[str, Any]:
        header, _ = self.rows()
        out: dict[str, Any] = {}
        for name in header:
            if name in _DESCRIPTIONS:
                out[name] = dict(_DESCRIPTIONS[name])
            elif name.startswith("non_steady_state_outlier"):
                out[name] = {
                    "Description": "Dummy scan left out of the analysis (motion.dummy_scans)",
                    "Units": "boolean",
                }
            else:
                out[name] = {
                    "Description": "Outlier volume: FD above qc.fd_outlier_mm, std_DVARS above "
                    "qc.std_dvars_outlier, or a motion estimate that was not trusted",
                    "Units": "boolean",
                }
        if self.tr_s is not None:
            out["RepetitionTime"] = self.tr_s
        return out

    def write(self, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.tsv`` and ``<stem>.json`` into ``out_dir``; return both paths."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        header, body = self.rows()
        tsv = folder / f"{stem}.tsv"
        tsv.write_text("\n".join("\t".join(r) for r in [header, *body]) + "\n")
        sidecar = folder / f"{stem}.json"
        sidecar.write_text(json.dumps(self.sidecar(), indent=2) + "\n")
        return tsv, sidecar
