"""Reorder buffer: volumes of each series leave in index order, never waiting forever.

Stages that need temporal order (motion correction, connectivity) sit behind
an :class:`Orderer` (as the :class:`OrderingStage`). Per series, kept apart by
``(session_key, series_uid)``, it releases volumes in index order from 0:

- a volume that arrives early waits until the ones before it have left;
- a hole is skipped and marked with a :class:`~boldstream.stream.messages.Gap`
  message downstream when the receiver reports it
  (:class:`~boldstream.receiver.VolumeIncomplete`: reason ``"incomplete"``),
  when a later volume has waited ``timeout_s`` for it (``"timeout"``), when more
  than ``max_pending`` volumes are held (``"timeout"`` too), or when the
  series ends without it (``"series-end"``);
- a volume seen again (same series and index, e.g. re-sent after a receiver
  restart) is dropped and counted; so is one arriving after its gap was
  declared ("late");
- a series' end flushes what is held, then passes the end event on.

The last volume of a series that has not arrived yet is not a hole: nothing
can tell it apart from one still being acquired, so nothing is waited on
until a later volume or the series end shows it missing.

Time is passed in (``time.monotonic()`` seconds) so that the logic is tested
without sleeping; the stage drives :meth:`Orderer.expire` from its poll loop
using :meth:`Orderer.next_deadline`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from boldstream.errors import StreamError
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.stream.messages import Gap, Message, SeriesEnd, SeriesStart, series_key
from boldstream.stream.stage import Stage

__all__ = ["Orderer", "OrderingStage"]


@dataclass(slots=True)
class _Series:
    info: SeriesInfo
    next: int
    #: index -> (message to release, monotonic arrival time)
    pending: dict[int, tuple[Message, float]] = field(default_factory=dict)
    gapped: set[int] = field(default_factory=set)
    ended: bool = False


class Orderer:
    """Per-series reorder buffer (pure logic, no sockets).

    ``push`` and ``expire`` return the messages to emit, in order.
    """

    def __init__(self, *, timeout_s: float = 5.0, max_pending: int = 64) -> None:
        if timeout_s <= 0 or max_pending < 1:
            raise StreamError("Orderer needs timeout_s > 0 and max_pending >= 1")
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._series: dict[tuple[str, str], _Series] = {}
        self.counts = {
            "released": 0,
            "duplicates": 0,
            "late": 0,
            "gaps_incomplete": 0,
            "gaps_timeout": 0,
            "gaps_series_end": 0,
        }

    # -- inputs --------------------------------------------------------------

    def push(self, message: Message, now: float) -> list[Message]:
        """Take one message; return what can be emitted now, in order."""
        p = message.payload
        if isinstance(p, SeriesStart):
            if series_key(p.series) in self._series:
                self.counts["duplicates"] += 1
                return []
            self._state(p.series)
            return [message]
        if isinstance(p, SeriesEnd):
            state = self._state(p.series)
            out = self._flush(state, n_volumes=p.n_volumes)
            state.ended = True
            return [*out, message]
        if not isinstance(p, Volume | VolumeIncomplete):
            return [message]

        state = self._state(p.series)
        index = p.index
        if index < state.next or index in state.pending:
            self.counts["late" if index in state.gapped else "duplicates"] += 1
            return []
        if state.ended:
            self.counts["late"] += 1
            return []
        if isinstance(p, VolumeIncomplete):
            marker = message.derive(Gap(p.series, index, "incomplete"))
            state.pending[index] = (marker, now)
        else:
            state.pending[index] = (message, now)
        out = self._release(state)
        while len(state.pending) > self.max_pending:
            out.extend(self._skip_hole(state))
        return out

    def expire(self, now: float) -> list[Message]:
        """Give up on holes that made a later volume wait ``timeout_s`` or more."""
        out: list[Message] = []
        for state in self._series.values():
            while (
                state.pending and min(t for _, t in state.pending.values()) + self.timeout_s <= now
            ):
                out.extend(self._skip_hole(state))
        return out

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`expire` will have work, or None."""
        oldest = [min(t for _, t in s.pending.values()) for s in self._series.values() if s.pending]
        return min(oldest) + self.timeout_s if oldest else None

    def flush(self) -> list[Message]:
        """Release everything held, in order, marking the holes (end of stream)."""
        out: list[Message] = []
        for state in self._series.values():
            out.extend(self._flush(state, n_volumes=None))
        return out

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "series": len(self._series),
            "pending": sum(len(s.pending) for s in self._series.values()),
        }

    # -- internals -------------------------------------------------------------

    def _state(self, info: SeriesInfo) -> _Series:
        key = series_key(info)
        state = self._series.get(key)
        if state is None:
            state = self._series[key] = _Series(info=info, next=0)
        return state

    def _release(self, state: _Series) -> list[Message]:
        out: list[Message] = []
        while state.next in state.pending:
            message, _ = state.pending.pop(state.next)
            if isinstance(message.payload, Gap):
                state.gapped.add(state.next)
                self.counts["gaps_incomplete"] += 1
            else:
                self.counts["released"] += 1
            out.append(message)
            state.next += 1
        return out

    def _gap(self, state: _Series, index: int, reason: Literal["timeout", "series-end"]) -> Message:
        state.gapped.add(index)
        self.counts["gaps_timeout" if reason == "timeout" else "gaps_series_end"] += 1
        return Message(Gap(state.info, index, reason), {"detected": time.time()})

    def _skip_hole(self, state: _Series) -> list[Message]:
        """Mark the missing indices before the first held one, then release."""
        first = min(state.pending)
        out = [self._gap(state, i, "timeout") for i in range(state.next, first)]
        state.next = first
        return out + self._release(state)

    def _flush(self, state: _Series, *, n_volumes: int | None) -> list[Message]:
        out: list[Message] = []
        while state.pending:
            first = min(state.pending)
            out.extend(self._gap(state, i, "series-end") for i in range(state.next, first))
            state.next = first
            out.extend(self._release(state))
        if n_volumes is not None:
            out.extend(self._gap(state, i, "series-end") for i in range(state.next, n_volumes))
            state.next = max(state.next, n_volumes)
        return out


class OrderingStage(Stage):
    """An :class:`Orderer` as a pipeline stage (factory path
    ``boldstream.stream.ordering:OrderingStage``)."""

    def __init__(
        self, name: str = "order", *, timeout_s: float = 5.0, max_pending: int = 64
    ) -> None:
        self.name = name
        self.orderer = Orderer(timeout_s=timeout_s, max_pending=max_pending)

    def process(self, message: Message) -> Iterable[Message]:
        return self.orderer.push(message, time.monotonic())

    def next_deadline(self) -> float | None:
        return self.orderer.next_deadline()

    def tick(self, now: float) -> Iterable[Message]:
        return self.orderer.expire(now)

    def finish(self) -> Iterable[Message]:
        return self.orderer.flush()

    def stats(self) -> dict[str, Any]:
        return self.orderer.stats()
