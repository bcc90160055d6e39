"""The analysis stages: motion correction and live QC, as stream stages.

Each stage adapts pure analysis from :mod:`boldstream.analysis` to messages,
per series (kept apart by ``(session_key, series_uid)``):

- :class:`MotionStage` takes volumes in index order (the orderer upstream
  guarantees it). The reference of a series is its first volume after
  ``dummy_scans``, or (SPEC 2) the volume of a single-band reference series
  (SBRef, ``SeriesInfo.reference``) of the same study on the same grid that
  came before it; an SBRef series itself is not analysed (its volume becomes
  ``pipeline.skipped``). Each volume is registered to the reference by a
  :class:`~boldstream.analysis.MotionCorrector`. It emits the ``motion``
  result, then an internal ``pipeline.corrected`` result (the corrected
  volume, its parameters, its flag and whether non-finite voxels were
  filled) for the stages after it; dummy scans and volumes that could not be
  analysed become an internal ``pipeline.skipped``.
- :class:`QCStage` turns each corrected volume into a ``qc`` result
  (:meth:`~boldstream.analysis.QCFrame.as_dict` plus ``latency_ms``) with a
  :class:`~boldstream.analysis.QCAccumulator` whose brain mask is
  :func:`~boldstream.analysis.foreground_mask` of the reference. A gap (a
  volume lost after the series' first corrected one) counts as scan time
  without good data in the usable-data figures, and passes on.

Everything else (series events, other results) passes through. Topics
that start with ``pipeline.`` are internal: the pipeline never publishes them.

Failure of one series: an exception inside its analysis is logged with the
series and volume, published as a ``warning`` (code ``analysis-failed``) and
the volume becomes ``pipeline.skipped``; other series are not touched.

Restarts (the machinery is :mod:`boldstream.pipeline.series_stage`'s, shared
with the connectivity stage): with a checkpoint folder, a stage writes each series' state every
``checkpoint_every`` volumes (:mod:`boldstream.pipeline.checkpoint`) and tells
the pipeline with an internal ``pipeline.checkpoint`` result. A restarted stage
reloads a series' state on its first message and then sees volumes re-sent
from the pipeline's journal, possibly out of order and twice: a per-series
gate delivers them in index order, and a volume already processed makes the
stage re-emit what it emitted the first time (kept for the last ``history``
volumes; the motion stage reslices the volume again with the recorded
transform), so the pipeline, which drops duplicates, publishes each result once.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.analysis.motion import MotionCorrector, fill_non_finite, foreground_mask
from boldstream.analysis.qc import QCAccumulator
from boldstream.config.settings import Settings
from boldstream.errors import AnalysisError
from boldstream.pipeline.series_stage import (
    CORRECTED,
    SKIPPED,
    Gate,
    SeriesStage,
    SeriesState,
    corrected_index,
    history_from,
    skipped,
)
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result

__all__ = ["MotionStage", "QCStage", "stage_options"]

# --------------------------------------------------------------------------- motion


#: SBRef volumes kept for the BOLD series that follow them (latest per study).
_REFERENCES_KEPT = 16
#: How close (mm) an SBRef's vox2ras must be to a series' for the same grid.
_SAME_GRID_MM = 1e-3


@dataclass(frozen=True, eq=False)
class _SBRef:
    """A single-band reference volume, waiting for the BOLD series after it."""

    series_number: int | None
    data: npt.NDArray[np.float32]
    vox2ras: npt.NDArray[np.float64]

    def fits(self, series: SeriesInfo, volume: Volume) -> bool:
        """Same grid, and acquired before ``series`` when both are numbered."""
        before = (
            self.series_number is None
            or series.series_number is None
            or self.series_number < series.series_number
        )
        return (
            before
            and self.data.shape == volume.data.shape
            and bool(np.allclose(self.vox2ras, volume.vox2ras, rtol=0.0, atol=_SAME_GRID_MM))
        )


@dataclass(eq=False)
class _MotionSeries(SeriesState):
    corrector: MotionCorrector | None = None
    reference: npt.NDArray[np.float32] | None = None
    reference_index: int | None = None
    failed: str | None = None
    #: index -> the 4x4 transform its corrected volume was resliced with.
    matrices: dict[int, npt.NDArray[np.float64]] = field(default_factory=dict)


class MotionStage(SeriesStage):
    """Per-series incremental motion correction (factory
    ``boldstream.pipeline.stages:MotionStage``); see the module docstring."""

    def __init__(
        self,
        name: str = "motion",
        *,
        dummy_scans: int = 0,
        levels: int = 2,
        max_iter: int = 15,
        tol_mm: float = 0.002,
        reslice_order: int = 1,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        history: int = 256,
    ) -> None:
        super().__init__(
            name,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            history=history,
        )
        self.dummy_scans = dummy_scans
        #: study UID -> its latest SBRef volume.
        self._sbrefs: OrderedDict[str, _SBRef] = OrderedDict()
        self.options: dict[str, Any] = {
            "levels": levels,
            "max_iter": max_iter,
            "tol": tol_mm,
            "reslice_order": reslice_order,
        }

    def gate_index(self, message: Message) -> int | None:
        p = message.payload
        return p.index if isinstance(p, Volume | Gap) else None

    def new_state(self, series: SeriesInfo) -> SeriesState:
        return _MotionSeries(info=series, gate=Gate())

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> SeriesState:
        out = _MotionSeries(
            info=series,
            gate=Gate(int(state["next"])),
            history=history_from(state["history"]),
            last_index=index,
            reference_index=state["reference_index"],
            failed=state["failed"],
        )
        for i, m in zip(arrays["matrix_index"], arrays["matrices"], strict=True):
            out.matrices[int(i)] = np.array(m, dtype=np.float64)
        assert self.store is not None
        reference = self.store.read_fixed(series, "reference")
        vox2ras = self.store.read_fixed(series, "vox2ras")
        if reference is not None and vox2ras is not None and "corrector" in state:
            out.reference = reference.astype(np.float32)
            out.corrector = MotionCorrector(reference, vox2ras, **self.options)
            out.corrector.restore(state["corrector"], arrays)
        return out

    def checkpoint_state(self, state: SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
        assert isinstance(state, _MotionSeries)
        data: dict[str, Any] = {
            "reference_index": state.reference_index,
            "failed": state.failed,
        }
        kept = [i for i in state.history if i in state.matrices]
        arrays: dict[str, Any] = {
            "matrix_index": np.asarray(kept, dtype=np.int64),
            "matrices": np.asarray([state.matrices[i] for i in kept], dtype=np.float64).reshape(
                -1, 4, 4
            ),
        }
        if state.corrector is not None:
            corrector_state, corrector_arrays = state.corrector.state()
            data["corrector"] = corrector_state
            arrays.update(corrector_arrays)
        return data, arrays

    def handle(self, state: SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _MotionSeries)
        p = message.payload
        if isinstance(p, Gap):
            return [message]
        assert isinstance(p, Volume)
        index = p.index
        if not fresh:
            return self._repeat(state, message, p)
        if state.info.reference:
            return self._keep_sbref(state, message, p)
        if index < self.dummy_scans:
            return self._skip(state, message, index, "dummy scan")
        if state.failed is not None:
            return self._skip(state, message, index, state.failed)
        out: list[Message] = []
        if state.corrector is None:
            sbref = self._sbref_of(state.info.study_uid)
            if sbref is not None and not sbref.fits(state.info, p):
                sbref = None
            reference = p.data if sbref is None else sbref.data
            try:
                state.corrector = MotionCorrector(reference, p.vox2ras, **self.options)
            except AnalysisError as exc:
                state.failed = f"no usable reference (volume {index}: {exc})"
                self.log.error("motion reference unusable; series not analysed", reason=str(exc))
                out.append(
                    message.derive(
                        topics.warning_result(
                            state.info,
                            index,
                            f"motion correction off for this series: {state.failed}",
                            code="reference-failed",
                        )
                    )
                )
                return out + self._skip(state, message, index, state.failed)
            state.reference = np.array(reference, dtype=np.float32)
            state.reference_index = index
            self.log.info(
                "motion reference",
                series=state.info.series_uid,
                reference=f"volume {index}"
                if sbref is None
                else f"SBRef (series {sbref.series_number})",
            )
            if self.store is not None:
                self.store.write_fixed(state.info, "reference", state.reference)
                self.store.write_fixed(state.info, "vox2ras", np.asarray(p.vox2ras))
        corrector = state.corrector
        est = corrector.register(p.data)
        matrix = np.array(corrector._last, dtype=np.float64)
        motion = topics.motion_result(
            state.info,
            index,
            est.params,
            flagged=est.flagged,
            reason=est.reason,
            iterations=est.iterations,
            correlation=est.correlation,
        )
        state.matrices[index] = matrix
        self.remember(state, index, {"motion": dict(motion.values)})
        for old in [i for i in state.matrices if i not in state.history]:
            del state.matrices[old]
        out.append(message.derive(motion))
        out.append(
            message.derive(self._corrected(state, index, motion, est.corrected, filled=est.filled))
        )
        if est.flagged:
            out.append(
                message.derive(
                    topics.warning_result(
                        state.info,
                        index,
                        f"volume {index}: motion estimate not trusted ({est.reason})",
                        code="motion-flagged",
                    )
                )
            )
        return out

    def _keep_sbref(self, state: _MotionSeries, message: Message, volume: Volume) -> list[Message]:
        """An SBRef series' volume: kept as the reference of the BOLD series after it.

        With a checkpoint folder it is also written there, so that a stage
        restarted before the BOLD series' first volume still finds it.
        """
        study = state.info.study_uid
        if volume.index == 0 and bool(np.isfinite(volume.data).all()):
            sbref = _SBRef(
                state.info.series_number,
                np.array(volume.data, dtype=np.float32),
                np.array(volume.vox2ras, dtype=np.float64),
            )
            self._remember_sbref(study, sbref)
            if self.store is not None:
                number = -1 if sbref.series_number is None else sbref.series_number
                try:
                    self.store.write_study(
                        study,
                        "sbref",
                        {
                            "data": sbref.data,
                            "vox2ras": sbref.vox2ras,
                            "series_number": np.asarray(number, dtype=np.int64),
                        },
                        keep=_REFERENCES_KEPT,
                    )
                except (OSError, ValueError) as exc:
                    self.log.warning(
                        "SBRef not written to the checkpoint folder; a restart of this "
                        "stage before the BOLD series would fall back to its first volume",
                        series=state.info.series_uid,
                        error=str(exc),
                    )
        reason = "single-band reference (SBRef): the motion reference of the BOLD series after it"
        return self._skip(state, message, volume.index, reason)

    def _remember_sbref(self, study: str, sbref: _SBRef) -> None:
        self._sbrefs[study] = sbref
        self._sbrefs.move_to_end(study)
        while len(self._sbrefs) > _REFERENCES_KEPT:
            self._sbrefs.popitem(last=False)

    def _sbref_of(self, study: str) -> _SBRef | None:
        """The study's latest SBRef: held, or written by this stage before a restart."""
        found = self._sbrefs.get(study)
        if found is not None or self.store is None:
            return found
        try:
            arrays = self.store.read_study(study, "sbref")
            if arrays is None:
                return None
            number = int(arrays["series_number"])
            found = _SBRef(
                None if number < 0 else number,
                np.asarray(arrays["data"], dtype=np.float32),
                np.asarray(arrays["vox2ras"], dtype=np.float64),
            )
        except Exception as exc:  # numpy, zipfile and OS errors alike: never fail the series
            self.log.error(
                "SBRef in the checkpoint folder unreadable; removed, the series takes "
                "its own first volume as motion reference",
                error=f"{type(exc).__name__}: {exc}",
            )
            with contextlib.suppress(OSError):
                self.store.drop_study(study, "sbref")
            return None
        self.log.info(
            "SBRef restored from the checkpoint folder", series_number=found.series_number
        )
        self._remember_sbref(study, found)
        return found

    def _corrected(
        self,
        state: _MotionSeries,
        index: int,
        motion: Result,
        corrected: npt.NDArray[np.float32],
        *,
        filled: bool,
    ) -> Result:
        assert state.corrector is not None
        arrays: dict[str, npt.NDArray[Any]] = {"data": corrected}
        if index == state.reference_index and state.reference is not None:
            arrays["reference"] = state.reference
        params = [float(motion.values[k]) for k in topics.MOTION_FIELDS[:6]]
        return Result(
            CORRECTED,
            state.info,
            index,
            values={"params": params, "flagged": bool(motion.values["flagged"]), "filled": filled},
            arrays=arrays,
            affines={"vox2ras": state.corrector.vox2ras},
        )

    def _skip(
        self, state: _MotionSeries, message: Message, index: int, reason: str
    ) -> list[Message]:
        self.remember(state, index, {"skip": reason})
        return [message.derive(skipped(state.info, index, reason))]

    def _repeat(self, state: _MotionSeries, message: Message, volume: Volume) -> list[Message]:
        entry = state.history.get(volume.index)
        if entry is None:
            return []
        if "skip" in entry:
            return [message.derive(skipped(state.info, volume.index, str(entry["skip"])))]
        matrix = state.matrices.get(volume.index)
        if state.corrector is None or matrix is None:
            return []
        motion = Result(topics.MOTION, state.info, volume.index, values=dict(entry["motion"]))
        data, filled = fill_non_finite(volume.data)  # as register() did the first time
        corrected = state.corrector.reslice(data, matrix)
        return [
            message.derive(motion),
            message.derive(self._corrected(state, volume.index, motion, corrected, filled=filled)),
        ]


# --------------------------------------------------------------------------- QC


@dataclass(eq=False)
class _QCSeries(SeriesState):
    accumulator: QCAccumulator | None = None
    tr_s: float | None = None


class QCStage(SeriesStage):
    """Per-series live QC on the motion stage's corrected volumes (factory
    ``boldstream.pipeline.stages:QCStage``); see the module docstring."""

    def __init__(
        self,
        name: str = "qc",
        *,
        fd_thresholds_mm: Sequence[float] = (0.2, 0.3, 0.5),
        goal_minutes: float = 12.5,
        fd_outlier_mm: float = 0.5,
        std_dvars_outlier: float = 1.5,
        std_dvars_warmup: int = 20,
        std_dvars_window: int = 120,
        default_tr_s: float = 2.0,
        forward_corrected: bool = False,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        history: int = 256,
    ) -> None:
        super().__init__(
            name,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            history=history,
        )
        self.default_tr_s = default_tr_s
        self.forward_corrected = forward_corrected
        self.options: dict[str, Any] = {
            "fd_thresholds": tuple(fd_thresholds_mm),
            "goal_minutes": goal_minutes,
            "fd_outlier_mm": fd_outlier_mm,
            "std_dvars_outlier": std_dvars_outlier,
            "std_dvars_warmup": std_dvars_warmup,
            "std_dvars_window": std_dvars_window,
        }

    def gate_index(self, message: Message) -> int | None:
        return corrected_index(message)

    def new_state(self, series: SeriesInfo) -> SeriesState:
        return _QCSeries(info=series, gate=Gate())

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> SeriesState:
        out = _QCSeries(
            info=series,
            gate=Gate(int(state["next"])),
            history=history_from(state["history"]),
            last_index=index,
            tr_s=state.get("tr_s"),
        )
        assert self.store is not None
        mask = self.store.read_fixed(series, "mask")
        if mask is not None and out.tr_s is not None and "accumulator" in state:
            out.accumulator = QCAccumulator(mask, tr_s=out.tr_s, **self.options)
            out.accumulator.restore(state["accumulator"], arrays)
        return out

    def checkpoint_state(self, state: SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
        assert isinstance(state, _QCSeries)
        data: dict[str, Any] = {"tr_s": state.tr_s}
        arrays: dict[str, Any] = {}
        if state.accumulator is not None:
            acc_state, arrays = state.accumulator.state()
            data["accumulator"] = acc_state
        return data, arrays

    def handle(self, state: SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _QCSeries)
        p = message.payload
        if isinstance(p, Gap):
            if fresh and state.accumulator is not None:
                state.accumulator.lost()  # scan time the run did not get data for
            return [message]
        assert isinstance(p, Result) and p.index is not None
        index = p.index
        if p.topic == SKIPPED:
            if fresh:
                self.remember(state, index, {"skip": p.values.get("reason")})
            return [message]
        if not fresh:
            entry = state.history.get(index)
            if entry is None or "qc" not in entry:
                return []
            repeat = Result(topics.QC, state.info, index, values=dict(entry["qc"]))
            return [message.derive(repeat), *self._forward(message)]
        out: list[Message] = []
        if state.accumulator is None:
            out.extend(self._start_series(state, message, p))
        assert state.accumulator is not None
        frame = state.accumulator.update(
            p.arrays["data"],
            p.values["params"],
            usable=not p.values.get("flagged", False),
            acquired=not p.values.get("filled", False),
        )
        received = message.timestamps.get("received")
        latency = None if received is None else (time.time() - received) * 1000.0
        result = topics.qc_result(state.info, index, frame, latency_ms=latency)
        self.remember(state, index, {"qc": dict(result.values)})
        out.append(message.derive(result))
        out.extend(self._forward(message))
        return out

    def _forward(self, message: Message) -> list[Message]:
        return [message] if self.forward_corrected else []

    def _start_series(self, state: _QCSeries, message: Message, p: Result) -> list[Message]:
        out: list[Message] = []
        reference = p.arrays.get("reference", p.arrays["data"])
        mask = foreground_mask(reference)
        tr = state.info.tr_s
        if tr is None or not tr > 0:
            tr = self.default_tr_s
            out.append(
                message.derive(
                    topics.warning_result(
                        state.info,
                        p.index,
                        f"the series states no repetition time; minutes use {tr} s",
                        code="tr-unknown",
                    )
                )
            )
        state.tr_s = tr
        state.accumulator = QCAccumulator(mask, tr_s=tr, **self.options)
        if self.store is not None:
            self.store.write_fixed(state.info, "mask", mask)
        return out


def stage_options(settings: Settings, *, checkpoint_dir: str | None) -> dict[str, dict[str, Any]]:
    """Factory keyword arguments of the two stages from :class:`Settings` (JSON-able)."""
    m, q, p = settings.motion, settings.qc, settings.pipeline
    common = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": p.checkpoint_every}
    return {
        "motion": {
            "dummy_scans": m.dummy_scans,
            "levels": m.levels,
            "max_iter": m.max_iter,
            "tol_mm": m.tol_mm,
            "reslice_order": m.reslice_order,
            **common,
        },
        "qc": {
            "fd_thresholds_mm": list(q.fd_thresholds_mm),
            "goal_minutes": q.goal_minutes,
            "fd_outlier_mm": q.fd_outlier_mm,
            "std_dvars_outlier": q.std_dvars_outlier,
            "std_dvars_warmup": q.std_dvars_warmup,
            "std_dvars_window": q.std_dvars_window,
            "default_tr_s": q.default_tr_s,
            **common,
        },
    }
