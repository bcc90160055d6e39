"""Per-series state for late joiners, and the client of the snapshot endpoint.

The pipeline keeps, for each series it has seen, what a subscriber that
connects mid-series needs before the next results arrive: the latest QC and
motion values, the usable-data summary and counts. The snapshot endpoint (a
ROUTER socket; a REQ or DEALER client sends any one frame) answers with::

    {"time": <unix s>, "subscriptions": <live topic subscriptions on the XPUB>,
     "series": [<series>, ...]}

    <series> = {"session_key", "series_uid", "series_number", "description",
                "tr_s", "started", "ended", "last_index",
                "counts": {"received", "motion", "qc", "skipped", "gaps",
                           "missing", "flagged", "outliers", "warnings",
                           "duplicates"},
                "latest_qc": <qc values> | null, "latest_motion": <motion values> | null,
                "usable": <UsableSummary.as_dict()> | null,
                "latency_ms": {"last", "max"}}
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from boldstream.errors import StreamError
from boldstream.receiver.volume import SeriesInfo
from boldstream.stream.curve import CurveClient

__all__ = ["SeriesView", "Snapshot", "request_snapshot"]

Key = tuple[str, str]


@dataclass(eq=False)
class SeriesView:
    """What the snapshot says about one series."""

    info: SeriesInfo
    started: float
    ended: float | None = None
    last_index: int | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "received",
                "motion",
                "qc",
                "skipped",
                "gaps",
                "missing",
                "flagged",
                "outliers",
                "warnings",
                "duplicates",
            ),
            0,
        )
    )
    latest_qc: dict[str, Any] | None = None
    latest_motion: dict[str, Any] | None = None
    latency_last_ms: float | None = None
    latency_max_ms: float | None = None

    def on_qc(self, index: int, values: Mapping[str, Any]) -> None:
        self.counts["qc"] += 1
        if values.get("outlier"):
            self.counts["outliers"] += 1
        if self.latest_qc is None or index >= int(self.latest_qc.get("volume", -1)):
            self.latest_qc = {**values, "volume": index}
        latency = values.get("latency_ms")
        if isinstance(latency, int | float):
            self.latency_last_ms = float(latency)
            self.latency_max_ms = max(self.latency_max_ms or 0.0, float(latency))

    def on_motion(self, index: int, values: Mapping[str, Any]) -> None:
        self.counts["motion"] += 1
        if values.get("flagged"):
            self.counts["flagged"] += 1
        if self.latest_motion is None or index >= int(self.latest_motion.get("volume", -1)):
            self.latest_motion = {**values, "volume": index}

    def as_dict(self) -> dict[str, Any]:
        usable = None if self.latest_qc is None else self.latest_qc.get("usable")
        return {
            "session_key": self.info.session_key,
            "series_uid": self.info.series_uid,
            "series_number": self.info.series_number,
            "description": self.info.description,
            "tr_s": self.info.tr_s,
            "started": self.started,
            "ended": self.ended,
            "last_index": self.last_index,
            "counts": dict(self.counts),
            "latest_qc": self.latest_qc,
            "latest_motion": self.latest_motion,
            "usable": usable,
            "latency_ms": {"last": self.latency_last_ms, "max": self.latency_max_ms},
        }


class Snapshot:
    """The views of the most recent ``max_series`` series."""

    def __init__(self, *, max_series: int = 32) -> None:
        self.max_series = max_series
        self._views: OrderedDict[Key, SeriesView] = OrderedDict()

    def view(self, key: Key, info: SeriesInfo, *, started: float) -> SeriesView:
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = SeriesView(info=info, started=started)
            while len(self._views) > self.max_series:
                self._views.popitem(last=False)
        return view

    def get(self, key: Key) -> SeriesView | None:
        return self._views.get(key)

    def as_dict(self) -> dict[str, Any]:
        return {"time": time.time(), "series": [v.as_dict() for v in self._views.values()]}


def request_snapshot(
    endpoint: str,
    *,
    timeout: float = 2.0,
    context: zmq.Context[Any] | None = None,
    curve: CurveClient | None = None,
) -> dict[str, Any]:
    """Ask a pipeline's snapshot endpoint for the current state (StreamError on timeout).

    ``curve``: the client keys when the endpoint is a CurveZMQ server.
    """
    ctx = context or zmq.Context.instance()
    socket = ctx.socket(zmq.REQ)
    socket.linger = 0
    if curve is not None:
        curve.apply(socket)
    try:
        socket.connect(endpoint)
        socket.send(b"snapshot")
        if not socket.poll(int(timeout * 1000)):
            raise StreamError(f"no snapshot from {endpoint} within {timeout} s")
        reply: dict[str, Any] = json.loads(socket.recv())
        return reply
    finally:
        socket.close(linger=0)
