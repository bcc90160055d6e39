"""What travels on the pipeline's sockets: one :class:`Message` around a payload.

A payload is one of the receiver's types (:class:`~boldstream.receiver.Volume`,
:class:`~boldstream.receiver.VolumeIncomplete`) or one of the pipeline's own
events defined here (series start and end, a gap marker, a generic analysis
result, the in-band end of stream). Every message carries a ``timestamps``
dict (``time.time()`` seconds) that each hop appends to, in order, so that the
end of the chain can compute end-to-end latency: ``received``, ``assembled``,
``<stage>.in``, ``<stage>.out``, ``published``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete

__all__ = [
    "EndOfStream",
    "Gap",
    "Message",
    "Payload",
    "Result",
    "SeriesEnd",
    "SeriesStart",
    "series_key",
]


def series_key(series: SeriesInfo) -> tuple[str, str]:
    """The key that keeps interleaved series apart: (session key, series UID)."""
    return (series.session_key, series.series_uid)


@dataclass(frozen=True, slots=True)
class SeriesStart:
    """The receiver saw the first instance of a series."""

    series: SeriesInfo
    #: time.time() of the first instance.
    started: float


@dataclass(frozen=True, slots=True)
class SeriesEnd:
    """No more volumes of this series will come."""

    series: SeriesInfo
    #: time.time() when the series was closed.
    ended: float
    #: Number of volumes the series should have had (indices 0..n-1), when known.
    n_volumes: int | None = None
    #: Why the series ended: "complete", "timeout", "association-closed"...
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    """Marker emitted by the orderer: volume ``index`` of ``series`` was skipped."""

    series: SeriesInfo
    index: int
    #: "incomplete" (the receiver gave up on it), "timeout" (never arrived in
    #: time), or "series-end" (the series ended before it arrived).
    reason: Literal["incomplete", "timeout", "series-end"]


@dataclass(frozen=True, slots=True, eq=False)
class Result:
    """A generic analysis output: JSON-able values plus optional named arrays.

    ``topic`` names the stream ("motion", "qc", "connectivity", "target") and
    is what PUB/SUB subscribers filter on. ``values`` must be JSON-able with no
    NaN or infinity (use ``None`` for n/a). Arrays keep their dtype and shape
    on the wire; ``affines`` are 4x4 matrices sent in the header, named after
    their spaces (``vox2ras``, ``native2mni``).
    """

    topic: str
    series: SeriesInfo | None
    index: int | None
    values: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)
    affines: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """In-band shutdown: a stage forwards it downstream, then stops."""

    reason: str = ""


Payload = Volume | VolumeIncomplete | SeriesStart | SeriesEnd | Gap | Result | EndOfStream

_KINDS: dict[type, str] = {
    Volume: "volume",
    VolumeIncomplete: "volume-missing",
    SeriesStart: "series-start",
    SeriesEnd: "series-end",
    Gap: "gap",
    Result: "result",
    EndOfStream: "end-of-stream",
}


@dataclass(slots=True, eq=False)
class Message:
    """One payload plus the timestamps it has collected on its way."""

    payload: Payload
    timestamps: dict[str, float] = field(default_factory=dict)
    #: Per-publisher, per-topic sequence number; set by a publisher only.
    seq: int | None = None
    #: Which publisher stamped ``seq`` (stage name + instance id).
    publisher: str | None = None

    def __post_init__(self) -> None:
        if not self.timestamps:
            p = self.payload
            if isinstance(p, Volume):
                self.timestamps = {"received": p.last_received, "assembled": p.assembled}
            elif isinstance(p, VolumeIncomplete):
                self.timestamps = {"received": p.first_received, "assembled": p.reported}

    @property
    def kind(self) -> str:
        """Wire name of the payload type: "volume", "volume-missing", "result"..."""
        return _KINDS[type(self.payload)]

    @property
    def topic(self) -> str:
        """The first frame: a result's own topic, otherwise the kind."""
        p = self.payload
        return p.topic if isinstance(p, Result) else self.kind

    @property
    def series(self) -> SeriesInfo | None:
        p = self.payload
        return None if isinstance(p, EndOfStream) else p.series

    @property
    def index(self) -> int | None:
        p = self.payload
        if isinstance(p, Volume | VolumeIncomplete | Gap | Result):
            return p.index
        return None

    def derive(self, payload: Payload) -> Message:
        """A new message for ``payload`` that inherits this one's timestamps."""
        return Message(payload, dict(self.timestamps))

    def stamp(self, name: str, when: float) -> None:
        """Record that the message passed point ``name`` at ``when``."""
        self.timestamps[name] = when

    def latency(self, *, start: str = "received", end: str | None = None) -> float | None:
        """Seconds from timestamp ``start`` to ``end`` (default: the last one)."""
        if start not in self.timestamps or (end is not None and end not in self.timestamps):
            return None
        stop = self.timestamps[end] if end is not None else list(self.timestamps.values())[-1]
        return stop - self.timestamps[start]
