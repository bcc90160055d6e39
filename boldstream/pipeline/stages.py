"""The analysis stages: motion correction and live QC, as stream stages.

Each stage adapts pure analysis from :mod:`boldstream.analysis` to messages,
per series (kept apart by ``(session_key, series_uid)``):

- :class:`MotionStage` takes volumes in index order (the orderer upstream
  guarantees it). The reference of a series is its first volume after
  ``dummy_scans``; each volume is registered to it by a
  :class:`~boldstream.analysis.MotionCorrector`. It emits the ``motion``
  result, then an internal ``pipeline.corrected`` result (the corrected
  volume, its parameters and flag) for the stages after it; dummy scans and
  volumes that could not be analysed become an internal ``pipeline.skipped``.
- :class:`QCStage` turns each corrected volume into a ``qc`` result
  (:meth:`~boldstream.analysis.QCFrame.as_dict` plus ``latency_ms``) with a
  :class:`~boldstream.analysis.QCAccumulator` whose brain mask is
  :func:`~boldstream.analysis.foreground_mask` of the reference.

Everything else (gaps, series events, other results) passes through. Topics
that start with ``pipeline.`` are internal: the pipeline never publishes them.

Failure of one series: an exception inside its analysis is logged with the
series and volume, published as a ``warning`` (code ``analysis-failed``) and
the volume becomes ``pipeline.skipped``; other series are not touched.

Restarts: with a checkpoint folder, a stage writes each series' state every
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

import abc
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from boldstream.analysis.motion import MotionCorrector, foreground_mask
from boldstream.analysis.qc import QCAccumulator
from boldstream.config.settings import Settings
from boldstream.errors import AnalysisError
from boldstream.logs import get_logger
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart, series_key
from boldstream.stream.stage import Stage

__all__ = [
    "CHECKPOINT",
    "CORRECTED",
    "INTERNAL_PREFIX",
    "PASSED",
    "SKIPPED",
    "MotionStage",
    "QCStage",
]

#: Topics of results that stay inside the pipeline.
INTERNAL_PREFIX = "pipeline."
CORRECTED = "pipeline.corrected"
SKIPPED = "pipeline.skipped"
CHECKPOINT = "pipeline.checkpoint"
#: The chain's last stage has handled this volume (when it does not forward it).
PASSED = "pipeline.passed"

Key = tuple[str, str]
#: How many ended series a stage remembers.
_ENDED_KEPT = 1024


class _Gate:
    """Delivers one series' items in index order; says which ones are repeats."""

    def __init__(self, next_index: int = 0, *, max_held: int = 64) -> None:
        self.next = next_index
        self.max_held = max_held
        self.held: dict[int, Message] = {}
        self.forced = 0

    def offer(self, index: int, message: Message) -> list[tuple[Message, bool]]:
        """``(message, fresh)`` pairs to handle now; ``fresh`` False for a repeat."""
        if index < self.next:
            return [(message, False)]
        if index in self.held:
            return []
        self.held[index] = message
        out: list[tuple[Message, bool]] = []
        while self.held:
            if self.next not in self.held:
                if len(self.held) <= self.max_held:
                    break
                # Never wait forever: the journal re-sends what a restart lost,
                # so this only happens if something upstream is broken.
                out.extend(self._give_up(min(self.held)))
            out.append((self.held.pop(self.next), True))
            self.next += 1
        return out

    def flush(self) -> list[tuple[Message, bool]]:
        """Everything held, in index order, giving up on the holes before it."""
        out: list[tuple[Message, bool]] = []
        for index in sorted(self.held):
            out.extend(self._give_up(index))
            out.append((self.held.pop(index), True))
            self.next = index + 1
        return out

    def _give_up(self, upto: int) -> list[tuple[Message, bool]]:
        """Gap markers for the hole before ``upto`` (so the stages after do not wait)."""
        self.forced += 1
        series = self.held[upto].series
        assert series is not None
        gaps = [(Message(Gap(series, i, "series-end")), True) for i in range(self.next, upto)]
        self.next = upto
        return gaps


def corrected_index(message: Message) -> int | None:
    """The volume index of motion's output (a corrected or skipped volume, or a gap).

    Stages after motion (QC, connectivity) take these in temporal order and
    pass every other message straight on.
    """
    p = message.payload
    if isinstance(p, Gap):
        return p.index
    if isinstance(p, Result) and p.topic in (CORRECTED, SKIPPED):
        return p.index
    return None


@dataclass(eq=False)
class _SeriesState:
    info: SeriesInfo
    gate: _Gate
    #: index -> what was emitted for it (JSON-able), the last ``history`` ones.
    history: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    since_checkpoint: int = 0
    last_index: int | None = None
    #: Checkpoint after the current volume whatever ``checkpoint_every`` says.
    checkpoint_due: bool = False
    #: The series' end, held while the gate waits for volumes a restart re-sends.
    deferred_end: Message | None = None


class _SeriesStage(Stage, abc.ABC):
    """Per-series state, the in-order gate, failure isolation and checkpoints."""

    def __init__(
        self,
        name: str,
        *,
        checkpoint_dir: str | Path | None,
        checkpoint_every: int,
        history: int,
    ) -> None:
        self.name = name
        self.log = get_logger(name)
        self.store = None if checkpoint_dir is None else CheckpointStore(Path(checkpoint_dir), name)
        self.checkpoint_every = max(1, checkpoint_every)
        self.history = max(1, history)
        self.counts = {
            "processed": 0,
            "repeats": 0,
            "failed": 0,
            "restored": 0,
            "series": 0,
            "after_end": 0,
        }
        self._series: dict[Key, _SeriesState] = {}
        #: Series this process has ended (a repeat of one is not a new series).
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._parent: int | None = None
        self._parent_check = 0.0
        if (
            multiprocessing.parent_process() is not None
            and threading.current_thread() is threading.main_thread()
        ):
            # A stage process: Ctrl-C reaches the whole process group, but the
            # pipeline stops its stages itself, in order, through their control
            # sockets; and a stage whose pipeline vanished (SIGKILL) must not
            # linger as an orphan.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._parent = os.getppid()
            self._parent_check = time.monotonic() + 1.0

    # -- subclass hooks -------------------------------------------------------

    @abc.abstractmethod
    def gate_index(self, message: Message) -> int | None:
        """Index of a message that must be handled in order, None to pass it on."""

    @abc.abstractmethod
    def new_state(self, series: SeriesInfo) -> _SeriesState: ...

    @abc.abstractmethod
    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> _SeriesState: ...

    @abc.abstractmethod
    def handle(self, state: _SeriesState, message: Message, fresh: bool) -> list[Message]: ...

    @abc.abstractmethod
    def checkpoint_state(self, state: _SeriesState) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def can_checkpoint(self, state: _SeriesState) -> bool:
        """False while the series' state cannot be written yet (checkpoints wait)."""
        return True

    def end_series(self, state: _SeriesState, message: Message) -> list[Message]:
        """What to emit when the series ends, before its last checkpoint and its end."""
        return []

    # -- the loop's calls -------------------------------------------------------

    def process(self, message: Message) -> Iterable[Message]:
        p = message.payload
        series = message.series
        if series is None:
            return (message,)
        key = series_key(series)
        if isinstance(p, SeriesStart):
            self._state(series)
            return (message,)
        if isinstance(p, SeriesEnd):
            return self._end(key, message)
        index = self.gate_index(message)
        if index is None:
            return (message,)
        state = self._state(series)
        if state is None:
            self.counts["after_end"] += 1
            return []
        out: list[Message] = []
        for item, fresh in state.gate.offer(index, message):
            out.extend(self._guarded(state, item, fresh))
        if state.deferred_end is not None and not state.gate.held:
            out.extend(self._end(key, state.deferred_end))
        return out

    def _end(self, key: Key, message: Message) -> list[Message]:
        """End a series: its last emissions, its checkpoint, then the end itself.

        After a restart downstream, the volumes queued before the crash (and
        this end) can arrive before the journal re-sends the ones the crash
        lost: while the gate holds volumes past such a hole, the end waits
        for them. A second end (the journal's copy, which follows every
        re-sent volume) while the hole is still open ends the series anyway.
        """
        state = self._series.get(key)
        out: list[Message] = []
        if state is not None and state.gate.held:
            if state.deferred_end is None:
                state.deferred_end = message
                self.log.info(
                    "series end waits for earlier volumes",
                    series=state.info.series_uid,
                    next=state.gate.next,
                    held=len(state.gate.held),
                )
                return []
            self.log.warning(
                "series ends with volumes missing; handling those held",
                series=state.info.series_uid,
                next=state.gate.next,
            )
            for item, fresh in state.gate.flush():
                out.extend(self._guarded(state, item, fresh))
        self._series.pop(key, None)
        self._ended[key] = None
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)
        if state is not None:
            out.extend(self.end_series(state, message))
            out.extend(self._checkpoint(state))
        return [*out, message]

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "open_series": len(self._series)}

    def next_deadline(self) -> float | None:
        return self._parent_check if self._parent is not None else None

    def tick(self, now: float) -> Iterable[Message]:
        if self._parent is not None:
            if os.getppid() != self._parent:
                self.log.error("pipeline process gone; stage exits", parent=self._parent)
                os._exit(3)
            self._parent_check = now + 1.0
        return ()

    # -- internals ----------------------------------------------------------------

    def _state(self, series: SeriesInfo) -> _SeriesState | None:
        """The series' state: held, restored from its checkpoint, or new.

        None for a series this process has ended and whose checkpoint is gone:
        the pipeline has finished it, and what still comes of it is a repeat
        re-sent after a restart (it must not start the series over).
        """
        key = series_key(series)
        state = self._series.get(key)
        if state is not None:
            return state
        ended_here = key in self._ended
        saved = None
        if self.store is not None:
            try:
                saved = self.store.read(series)
                if saved is not None:
                    index, data, arrays = saved
                    state = self.restore_state(series, index, data, arrays)
            except (OSError, ValueError, KeyError) as exc:
                # A checkpoint being removed as the series is finished reads as broken.
                if not ended_here:
                    self.log.error(
                        "checkpoint unreadable; series restarts from scratch",
                        series=series.series_uid,
                        error=str(exc),
                    )
                state = None
        if state is not None:
            assert saved is not None
            self.counts["restored"] += 1
            self.log.info("series state restored", series=series.series_uid, volume=saved[0])
        elif ended_here:
            return None
        else:
            state = self.new_state(series)
        self.counts["series"] += 1
        self._series[key] = state
        return state

    def _guarded(self, state: _SeriesState, message: Message, fresh: bool) -> list[Message]:
        index = message.index
        context = {"series": state.info.series_uid, "volume": index}
        with structlog.contextvars.bound_contextvars(**context):
            try:
                out = self.handle(state, message, fresh)
            except Exception as exc:
                self.counts["failed"] += 1
                self.log.exception("analysis failed on a volume; series continues")
                if index is None:
                    return []
                reason = f"{type(exc).__name__}: {exc}"
                self.remember(state, index, {"skip": f"{self.name} failed: {reason}"})
                return [
                    message.derive(
                        topics.warning_result(
                            state.info,
                            index,
                            f"{self.name} failed on volume {index}: {reason}",
                            code="analysis-failed",
                        )
                    ),
                    message.derive(skipped(state.info, index, f"{self.name} failed")),
                ]
        if fresh:
            self.counts["processed"] += 1
            state.last_index = index
            state.since_checkpoint += 1
            if state.since_checkpoint >= self.checkpoint_every or state.checkpoint_due:
                out.extend(self._checkpoint(state))
        else:
            self.counts["repeats"] += 1
        return out

    def remember(self, state: _SeriesState, index: int, entry: dict[str, Any]) -> None:
        state.history[index] = entry
        state.history.move_to_end(index)
        while len(state.history) > self.history:
            state.history.popitem(last=False)

    def _checkpoint(self, state: _SeriesState) -> list[Message]:
        if self.store is None or state.last_index is None or state.since_checkpoint == 0:
            return []
        if not self.can_checkpoint(state):
            return []
        data, arrays = self.checkpoint_state(state)
        data["next"] = state.last_index + 1
        data["history"] = {str(k): v for k, v in state.history.items()}
        self.store.write(state.info, state.last_index, data, arrays)
        state.since_checkpoint = 0
        state.checkpoint_due = False
        result = Result(CHECKPOINT, state.info, state.last_index, values={"stage": self.name})
        return [Message(result, {"checkpoint": time.time()})]


def skipped(series: SeriesInfo, index: int, reason: str) -> Result:
    """Internal marker: volume ``index`` was not analysed (dummy scan, failure)."""
    return Result(SKIPPED, series, index, values={"reason": reason})


def _history_from(saved: Mapping[str, Any]) -> OrderedDict[int, dict[str, Any]]:
    items = sorted((int(k), dict(v)) for k, v in saved.items())
    return OrderedDict(items)


# --------------------------------------------------------------------------- motion


@dataclass(eq=False)
class _MotionSeries(_SeriesState):
    corrector: MotionCorrector | None = None
    reference: npt.NDArray[np.float32] | None = None
    reference_index: int | None = None
    failed: str | None = None
    #: index -> the 4x4 transform its corrected volume was resliced with.
    matrices: dict[int, npt.NDArray[np.float64]] = field(default_factory=dict)


class MotionStage(_SeriesStage):
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
        self.options: dict[str, Any] = {
            "levels": levels,
            "max_iter": max_iter,
            "tol": tol_mm,
            "reslice_order": reslice_order,
        }

    def gate_index(self, message: Message) -> int | None:
        p = message.payload
        return p.index if isinstance(p, Volume | Gap) else None

    def new_state(self, series: SeriesInfo) -> _SeriesState:
        return _MotionSeries(info=series, gate=_Gate())

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> _SeriesState:
        out = _MotionSeries(
            info=series,
            gate=_Gate(int(state["next"])),
            history=_history_from(state["history"]),
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

    def checkpoint_state(self, state: _SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
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

    def handle(self, state: _SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _MotionSeries)
        p = message.payload
        if isinstance(p, Gap):
            return [message]
        assert isinstance(p, Volume)
        index = p.index
        if not fresh:
            return self._repeat(state, message, p)
        if index < self.dummy_scans:
            return self._skip(state, message, index, "dummy scan")
        if state.failed is not None:
            return self._skip(state, message, index, state.failed)
        out: list[Message] = []
        if state.corrector is None:
            try:
                state.corrector = MotionCorrector(p.data, p.vox2ras, **self.options)
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
            state.reference = np.array(p.data, dtype=np.float32)
            state.reference_index = index
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
        out.append(message.derive(self._corrected(state, index, motion, est.corrected)))
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

    def _corrected(
        self,
        state: _MotionSeries,
        index: int,
        motion: Result,
        corrected: npt.NDArray[np.float32],
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
            values={"params": params, "flagged": bool(motion.values["flagged"])},
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
        corrected = state.corrector.reslice(volume.data, matrix)
        return [
            message.derive(motion),
            message.derive(self._corrected(state, volume.index, motion, corrected)),
        ]


# --------------------------------------------------------------------------- QC


@dataclass(eq=False)
class _QCSeries(_SeriesState):
    accumulator: QCAccumulator | None = None
    tr_s: float | None = None


class QCStage(_SeriesStage):
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

    def new_state(self, series: SeriesInfo) -> _SeriesState:
        return _QCSeries(info=series, gate=_Gate())

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> _SeriesState:
        out = _QCSeries(
            info=series,
            gate=_Gate(int(state["next"])),
            history=_history_from(state["history"]),
            last_index=index,
            tr_s=state.get("tr_s"),
        )
        assert self.store is not None
        mask = self.store.read_fixed(series, "mask")
        if mask is not None and out.tr_s is not None and "accumulator" in state:
            out.accumulator = QCAccumulator(mask, tr_s=out.tr_s, **self.options)
            out.accumulator.restore(state["accumulator"], arrays)
        return out

    def checkpoint_state(self, state: _SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
        assert isinstance(state, _QCSeries)
        data: dict[str, Any] = {"tr_s": state.tr_s}
        arrays: dict[str, Any] = {}
        if state.accumulator is not None:
            acc_state, arrays = state.accumulator.state()
            data["accumulator"] = acc_state
        return data, arrays

    def handle(self, state: _SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _QCSeries)
        p = message.payload
        if isinstance(p, Gap):
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
        flagged = bool(p.values.get("flagged", False))
        frame = state.accumulator.update(p.arrays["data"], p.values["params"], usable=not flagged)
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
