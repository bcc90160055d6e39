"""Per-series checkpoints of a stage's state: one JSON file plus ``.npz`` arrays.

A stage process that dies is restarted by the pipeline's supervisor; the new
process rebuilds each series' state from the last checkpoint its predecessor
wrote, and the pipeline re-sends the volumes since then from its journal.

Layout, under the pipeline's run folder::

    <root>/<session_key>/<series_uid>/<stage>/
        fixed-<name>.npy     written once per series (reference volume, QC mask)
        state.json           the latest checkpoint; names its arrays file
        state-<index>.npz    arrays of that checkpoint (older ones are removed)
    <root>/studies/<stage>/<study_uid>-<name>.npz
                             what a later series of the same study needs (the
                             motion stage's SBRef); the newest few studies' kept

``state.json`` is replaced atomically (write, fsync-free ``os.replace``) after
its arrays file is complete, so a reader sees the previous checkpoint or the
new one, never half of one. Checkpoints protect against a stage process
dying, not against the machine losing power: the spool is what survives that.

The state itself comes from, and goes back into, the analysis objects'
own ``state()`` / ``restore()`` (:class:`~boldstream.analysis.MotionCorrector`,
:class:`~boldstream.analysis.QCAccumulator`,
:class:`~boldstream.analysis.SeedConnectivity`,
:class:`~boldstream.analysis.TargetTracker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.receiver.volume import SeriesInfo

__all__ = ["CheckpointStore"]

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

    def _study_file(self, study_uid: str, name: str) -> Path:
        return self.root / "studies" / _safe(self.stage) / f"{_safe(study_uid)}-{_safe(name)}.npz"

    def write_study(self, study_uid: str, name: str, arrays: Arrays, *, keep: int) -> None:
        """Arrays that outlive their series, for a later series of the same study
        (its motion reference); only the ``keep`` newest studies' ``name`` stay."""
        path = self._study_file(study_uid, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, allow_pickle=False, **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        others = []
        for other in path.parent.glob(f"*-{_safe(name)}.npz"):
            if other != path:
                with contextlib.suppress(FileNotFoundError):
                    others.append((other.stat().st_mtime_ns, other))
        others.sort()
        for _, old in others[: max(0, len(others) - (keep - 1))]:
            old.unlink(missing_ok=True)

    def read_study(self, study_uid: str, name: str) -> Arrays | None:
        """What :meth:`write_study` wrote for the study, or None. A file that
        cannot be read raises (numpy's and zipfile's errors)."""
        path = self._study_file(study_uid, name)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def drop_study(self, study_uid: str, name: str) -> None:
        """Remove what :meth:`write_study` wrote (e.g. a file that cannot be read)."""
        self._study_file(study_uid, name).unlink(missing_ok=True)

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
