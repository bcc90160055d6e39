"""The per-series stage machinery the analysis stages share.

:class:`SeriesStage` is a stream stage with per-series state (kept apart by
``(session_key, series_uid)``), an in-order :class:`Gate` per series,
failure isolation (an exception in one series' analysis becomes a
``warning`` and a ``pipeline.skipped`` marker; other series go on), and
checkpoints (:mod:`boldstream.pipeline.checkpoint`) with a bounded history
of what each volume made the stage emit, so that a restarted stage resumes
a series and re-emits, for a volume re-sent from the pipeline's journal,
what it emitted the first time. The motion and QC stages
(:mod:`boldstream.pipeline.stages`) and the connectivity stage
(:mod:`boldstream.pipeline.connectivity_stage`) are its subclasses.

Topics that start with ``pipeline.`` are internal: the pipeline never
publishes them.
"""

from __future__ import annotations

import abc
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from boldstream.logs import get_logger
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart, series_key
from boldstream.stream.stage import Stage

__all__ = [
    "CHECKPOINT",
    "CORRECTED",
    "INTERNAL_PREFIX",
    "PASSED",
    "SKIPPED",
    "Gate",
    "SeriesStage",
    "SeriesState",
    "corrected_index",
    "history_from",
    "skipped",
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


class Gate:
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
class SeriesState:
    info: SeriesInfo
    gate: Gate
    #: index -> what was emitted for it (JSON-able), the last ``history`` ones.
    history: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    since_checkpoint: int = 0
    last_index: int | None = None
    #: Checkpoint after the current volume whatever ``checkpoint_every`` says.
    checkpoint_due: bool = False
    #: The series' end, held while the gate waits for volumes a restart re-sends.
    deferred_end: Message | None = None


class SeriesStage(Stage, abc.ABC):
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
            "checkpoint_failed": 0,
        }
        self._series: dict[Key, SeriesState] = {}
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
    def new_state(self, series: SeriesInfo) -> SeriesState: ...

    @abc.abstractmethod
    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> SeriesState: ...

    @abc.abstractmethod
    def handle(self, state: SeriesState, message: Message, fresh: bool) -> list[Message]: ...

    @abc.abstractmethod
    def checkpoint_state(self, state: SeriesState) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def can_checkpoint(self, state: SeriesState) -> bool:
        """False while the series' state cannot be written yet (checkpoints wait)."""
        return True

    def end_series(self, state: SeriesState, message: Message) -> list[Message]:
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

    def _state(self, series: SeriesInfo) -> SeriesState | None:
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

    def _guarded(self, state: SeriesState, message: Message, fresh: bool) -> list[Message]:
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

    def remember(self, state: SeriesState, index: int, entry: dict[str, Any]) -> None:
        state.history[index] = entry
        state.history.move_to_end(index)
        while len(state.history) > self.history:
            state.history.popitem(last=False)

    def _checkpoint(self, state: SeriesState) -> list[Message]:
        if self.store is None or state.last_index is None or state.since_checkpoint == 0:
            return []
        if not self.can_checkpoint(state):
            return []
        state.since_checkpoint = 0
        state.checkpoint_due = False
        try:
            data, arrays = self.checkpoint_state(state)
            data["next"] = state.last_index + 1
            data["history"] = {str(k): v for k, v in state.history.items()}
            self.store.write(state.info, state.last_index, data, arrays)
        except Exception as exc:
            # The volume's results stand and go on; without this checkpoint the
            # hub keeps its volumes for a restart, and the next one is tried
            # after another ``checkpoint_every`` volumes.
            self.counts["checkpoint_failed"] += 1
            self.log.exception(
                "checkpoint not written; the series goes on", series=state.info.series_uid
            )
            warning = topics.warning_result(
                state.info,
                state.last_index,
                f"{self.name}: checkpoint not written ({type(exc).__name__}: {exc}); "
                "the series goes on, but a restart of this stage would redo more of it",
                code="checkpoint-failed",
            )
            return [Message(warning, {"checkpoint": time.time()})]
        result = Result(CHECKPOINT, state.info, state.last_index, values={"stage": self.name})
        return [Message(result, {"checkpoint": time.time()})]


def skipped(series: SeriesInfo, index: int, reason: str) -> Result:
    """Internal marker: volume ``index`` was not analysed (dummy scan, failure)."""
    return Result(SKIPPED, series, index, values={"reason": reason})


def history_from(saved: Mapping[str, Any]) -> OrderedDict[int, dict[str, Any]]:
    items = sorted((int(k), dict(v)) for k, v in saved.items())
    return OrderedDict(items)
