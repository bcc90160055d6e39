"""Per-series checkpoints of a stage's state: one JSON file plus ``.npz`` arrays.

A stage process that dies is restarted by the pipeline's supervisor; the new
process rebuilds each series' state from the last checkpoint its predecessor
wrote, and the pipeline re-sends the volumes since then from its journal.

Layout, under the pipeline's run folder::

    <root>/<session_key>/<series_uid>/<stage>/
        fixed-<name>.npy     written once per series (reference volume, QC mask)
        state.json           the latest checkpoint; names its arrays file
        state-<index>.npz    arrays of that checkpoint (older ones are removed)

``state.json`` is replaced atomically (write, fsync-free ``os.replace``) after
its arrays file is complete, so a reader sees the previous checkpoint or the
new one, never half of one. Checkpoints protect against a stage process
dying, not against the machine losing power: the spool is what survives that.

The state itself is read from and written back into the analysis objects
(:class:`~boldstream.analysis.MotionCorrector`,
:class:`~boldstream.analysis.QCAccumulator`) by :func:`motion_state` /
:func:`restore_motion` and :func:`qc_state` / :func:`restore_qc`; the
connectivity stage's from its own
:meth:`~boldstream.analysis.SeedConnectivity.state` and
:meth:`~boldstream.analysis.TargetTracker.state`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.analysis.motion import MotionCorrector
from boldstream.analysis.qc import QCAccumulator
from boldstream.receiver.volume import SeriesInfo

__all__ = [
    "CheckpointStore",
    "motion_state",
    "qc_state",
    "restore_motion",
    "restore_qc",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Arrays = dict[str, npt.NDArray[Any]]


def _plain(value: Any) -> Any:
    """numpy scalars in a checkpoint's state (e.g. a target's values) as Python ones."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot go into a checkpoint's state")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text) or "_"


class CheckpointStore:
    """Reads and writes one stage's checkpoints for any number of series."""

    def __init__(self, root: str | Path, stage: str) -> None:
        self.root = Path(root)
        self.stage = stage
        self.written = 0

    def folder(self, series: SeriesInfo) -> Path:
        return self.root / _safe(series.session_key) / _safe(series.series_uid) / _safe(self.stage)

    @staticmethod
    def forget(root: str | Path, series: SeriesInfo) -> None:
        """Remove every stage's checkpoints of a finished series."""
        session = Path(root) / _safe(series.session_key)
        shutil.rmtree(session / _safe(series.series_uid), ignore_errors=True)
        with contextlib.suppress(OSError):
            session.rmdir()  # only if no other series of the session is open

    def write_fixed(self, series: SeriesInfo, name: str, array: npt.NDArray[Any]) -> None:
        """An array that never changes for the series (reference volume, mask)."""
        folder = self.folder(series)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"fixed-{name}.npy"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)

    def read_fixed(self, series: SeriesInfo, name: str) -> npt.NDArray[Any] | None:
        path = self.folder(series) / f"fixed-{name}.npy"
        if not path.exists():
            return None
        out: npt.NDArray[Any] = np.load(path, allow_pickle=False)
        return out

    def write(self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: Arrays) -> None:
        """Checkpoint the state reached after volume ``index``."""
        folder = self.folder(series)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{index}.npz"
        tmp = folder / (name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays)
        os.replace(tmp, folder / name)
        document = {"index": index, "arrays": name, "state": state}
        tmp_json = folder / "state.json.tmp"
        tmp_json.write_text(
            json.dumps(document, separators=(",", ":"), allow_nan=False, default=_plain)
        )
        os.replace(tmp_json, folder / "state.json")
        for old in folder.glob("state-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.written += 1

    def read(self, series: SeriesInfo) -> tuple[int, dict[str, Any], Arrays] | None:
        """``(index, state, arrays)`` of the latest checkpoint, or None."""
        folder = self.folder(series)
        path = folder / "state.json"
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        with np.load(folder / document["arrays"], allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return int(document["index"]), dict(document["state"]), arrays


# --------------------------------------------------------------------------- analysis state
#
# The analysis classes keep their running state in private attributes; these
# helpers are the one place that reads and writes them, so a change there
# shows up in tests/pipeline/test_checkpoint.py.


def motion_state(corrector: MotionCorrector) -> tuple[dict[str, Any], Arrays]:
    """What :class:`MotionCorrector` carries from one volume to the next."""
    state = {"count": corrector._count, "costs": [float(c) for c in corrector._costs]}
    return state, {"last": np.asarray(corrector._last, dtype=np.float64)}


def restore_motion(corrector: MotionCorrector, state: dict[str, Any], arrays: Arrays) -> None:
    corrector._count = int(state["count"])
    corrector._costs = deque((float(c) for c in state["costs"]), maxlen=corrector._costs.maxlen)
    corrector._last = np.array(arrays["last"], dtype=np.float64)


def qc_state(acc: QCAccumulator) -> tuple[dict[str, Any], Arrays]:
    """What :class:`QCAccumulator` (and its usable-data counts) carries forward."""
    state = {
        "n": acc._n,
        "count": acc._count,
        "scale": acc._scale,
        "usable_total": acc._usable._total,
        "usable_good": list(acc._usable._good),
        "has_prev": acc._prev is not None,
        "has_prev_params": acc._prev_params is not None,
    }
    arrays: Arrays = {"mean": acc._mean, "m2": acc._m2, "buffer": acc._buffer}
    if acc._prev is not None:
        arrays["prev"] = acc._prev
    if acc._prev_params is not None:
        arrays["prev_params"] = acc._prev_params
    return state, arrays


def restore_qc(acc: QCAccumulator, state: dict[str, Any], arrays: Arrays) -> None:
    acc._n = int(state["n"])
    acc._count = int(state["count"])
    scale = state["scale"]
    acc._scale = None if scale is None else float(scale)
    acc._usable._total = int(state["usable_total"])
    acc._usable._good = [int(g) for g in state["usable_good"]]
    acc._mean = np.array(arrays["mean"], dtype=np.float64)
    acc._m2 = np.array(arrays["m2"], dtype=np.float64)
    acc._buffer = np.array(arrays["buffer"], dtype=np.float32)
    acc._prev = np.array(arrays["prev"], dtype=np.float64) if state["has_prev"] else None
    acc._prev_params = (
        np.array(arrays["prev_params"], dtype=np.float64) if state["has_prev_params"] else None
    )
