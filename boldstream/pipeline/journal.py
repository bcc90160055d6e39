"""What the pipeline must be able to re-send after a stage process is restarted.

The journal keeps, per series, every message sent into the analysis chain
(volumes and gap markers by index, and the series' end) until it is safe to
forget:

- the hub has reported the index done (its ``qc`` result, and with the
  connectivity stage that stage's acknowledgement, or its gap or its
  ``pipeline.skipped`` marker, reached the publisher), and
- every stateful stage has checkpointed a state at or past that index (a
  stage restarted from an older checkpoint needs the volumes after it).

With no stateful stage (threads, no checkpoints) the first condition alone
applies. Memory is bounded by the sparsest checkpoint cadence (the
connectivity stage's: a target recompute, at most ``4 * checkpoint_every``
volumes) plus what is in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from boldstream.stream.messages import Message

__all__ = ["Journal"]

Key = tuple[str, str]


@dataclass(eq=False)
class _Entry:
    messages: dict[int, Message] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    checkpoints: dict[str, int] = field(default_factory=dict)
    end: Message | None = None


class Journal:
    """Per-series record of unacknowledged messages; see the module docstring."""

    def __init__(self, *, stateful: Sequence[str] = ()) -> None:
        self.stateful = tuple(stateful)
        self._series: dict[Key, _Entry] = {}

    def add(self, key: Key, index: int | None, message: Message) -> None:
        """Record ``message`` (index None: the series' end)."""
        entry = self._series.setdefault(key, _Entry())
        if index is None:
            entry.end = message
        else:
            entry.messages[index] = message
            self._trim(key, entry)

    def done(self, key: Key, index: int) -> None:
        entry = self._series.get(key)
        if entry is not None:
            entry.done.add(index)
            self._trim(key, entry)

    def ended(self, key: Key) -> None:
        """The series' end came out of the chain (and of the QC stage's direct
        path): every stage has finished it.

        Each path is first-in first-out, so every result of the series came
        out before its end; nothing of it will ever be re-sent.
        """
        self._series.pop(key, None)

    def checkpoint(self, key: Key, stage: str, index: int) -> None:
        entry = self._series.setdefault(key, _Entry())
        entry.checkpoints[stage] = max(index, entry.checkpoints.get(stage, -1))
        self._trim(key, entry)

    def pending(self) -> list[Message]:
        """Everything to re-send, series by series in index order, each end last."""
        out: list[Message] = []
        for entry in self._series.values():
            out.extend(entry.messages[i] for i in sorted(entry.messages))
            if entry.end is not None:
                out.append(entry.end)
        return out

    def __len__(self) -> int:
        return sum(len(e.messages) + (e.end is not None) for e in self._series.values())

    def unfinished(self) -> int:
        """Messages whose results have not all been published yet."""
        return sum(
            sum(1 for i in e.messages if i not in e.done) + (e.end is not None)
            for e in self._series.values()
        )

    def _trim(self, key: Key, entry: _Entry) -> None:
        safe = min(entry.checkpoints.get(s, -1) for s in self.stateful) if self.stateful else None
        for index in [i for i in entry.messages if i in entry.done]:
            if safe is None or index <= safe:
                del entry.messages[index]
        if safe is not None:
            entry.done = {i for i in entry.done if i > safe}
        elif not entry.messages:
            entry.done.clear()
        if not entry.messages and entry.end is None and not self.stateful:
            del self._series[key]
