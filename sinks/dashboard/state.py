"""What the dashboard page shows, kept per series from the result streams.

:class:`DashboardState` consumes decoded :class:`Message` objects (the SUB
thread calls :meth:`DashboardState.apply`) and keeps, for each series, what a
page needs: the QC and motion traces, the latest usable-data summary, the
receiver's counts, the latest target, the latest scan guidance and recent warnings. It hands a late
joining page one JSON :meth:`~DashboardState.snapshot`, then the *deltas*
that each later message produced, in order: :meth:`~DashboardState.listen`
takes the snapshot and registers the listener under one lock, so a page sees
every change exactly once.

Memory is bounded: each trace keeps at most ``max_points`` volumes (4096 is
49 minutes at TR 0.72 s), at most ``max_series`` series are kept (the least
recently updated goes first), warnings and missing-volume lists are capped,
and a listener that falls ``queue_size`` events behind is dropped (its page
reconnects and starts again from a snapshot) rather than buffered without end.

Nothing that identifies a patient is kept: a series is shown by its
pseudonymous ``session_key``, series number and description, and keyed by a
hash of its UIDs (the UIDs themselves never reach a page).

Snapshot (``type: "snapshot"``)::

    {"type", "time", "subscriber": {...}, "series": [<series>, ...], "warnings": [...]}

    <series> = {"id", "session_key", "series_number", "description", "tr_s",
                "started", "ended", "updated",
                "qc": {"index": [...], "fd_mm": [...], "dvars", "std_dvars",
                       "tsnr_median", "outlier", "latency_ms"},
                "motion": {"index": [...], "trans_x": [...], ..., "flagged": [...]},
                "usable": <UsableSummary.as_dict()> | null,
                "receiver": {"received", "last_index", "shape", "voxel_mm",
                             "assembly_ms", "instances", "missing": [{"index", "reason"}],
                             "n_missing", "n_late", "n_slow"},
                "target": <target> | null, "guidance": <guidance> | null,
                "warnings": [...]}

    <guidance> = {"index", "state", "message", "minutes_more",
                  "minutes_more_range": [lo, hi] | null, "reason", "good_minutes",
                  "fd_threshold_mm", "split_half_mm", "drift_mm"}

Deltas, one per message (``type`` says which part changed)::

    {"type": "series", "series": <series without traces>}   new series, series-start / -end
    {"type": "drop", "id"}                                    series evicted (max_series)
    {"type": "qc", "id", "row": {"index", "fd_mm", ...}, "usable", "receiver"}
    {"type": "motion", "id", "row": {"index", "trans_x", ..., "flagged"}}
    {"type": "receiver", "id", "receiver": {...}}            volume-received / missing / gap
    {"type": "target", "id", "target": <target>}
    {"type": "guidance", "id", "guidance": <guidance>}
    {"type": "warning", "id" | null, "warning": {"message", "code", "index", "time"}}
    {"type": "status", "subscriber": {...}}                   connection changes, heartbeats

A row is inserted in index order (a volume that arrives out of order goes to
its place, one that repeats replaces the earlier row); the page applies the
same rule.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.analysis.motion import PARAM_NAMES
from boldstream.receiver.volume import SeriesInfo, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart

__all__ = [
    "MOTION_COLUMNS",
    "QC_COLUMNS",
    "DashboardState",
    "Listener",
    "SeriesState",
    "Trace",
    "guidance_view",
    "series_id",
    "target_view",
    "to_json",
]

QC_COLUMNS = (
    "index",
    "fd_mm",
    "dvars",
    "std_dvars",
    "tsnr_median",
    "outlier",
    topics.QC_LATENCY_MS,
)
MOTION_COLUMNS = ("index", *PARAM_NAMES, "flagged")

_MAX_WARNINGS = 20
_MAX_MISSING_LISTED = 200
_SLICE_PLANES = ("axial", "coronal", "sagittal")


def series_id(series: SeriesInfo) -> str:
    """A short stable key for a series that reveals neither of its UIDs."""
    digest = hashlib.sha256(f"{series.session_key}\x00{series.series_uid}".encode()).hexdigest()
    return digest[:12]


def _number(value: Any) -> float | None:
    """A finite float, or None for n/a (None, NaN, infinity, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _numbers(value: Any, n: int) -> list[float | None] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        return None
    return [_number(v) for v in value]


def _texts(value: Any, cap: int = 8) -> list[str]:
    """The strings of a list (a target's reasons), at most ``cap`` of them."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return []
    return [v for v in value if isinstance(v, str)][:cap]


class Trace:
    """Columns of per-volume values, sorted by ``index``, at most ``cap`` rows."""

    def __init__(self, columns: Sequence[str], *, cap: int) -> None:
        if columns[0] != "index":
            raise ValueError("the first column of a trace is 'index'")
        if cap < 1:
            raise ValueError(f"cap must be positive, got {cap}")
        self.columns = tuple(columns)
        self.cap = cap
        self._data: dict[str, list[Any]] = {c: [] for c in self.columns}

    def __len__(self) -> int:
        return len(self._data["index"])

    def add(self, row: Mapping[str, Any]) -> None:
        """Insert ``row`` at its index (replacing a row with the same index)."""
        index = row["index"]
        idx = self._data["index"]
        if not idx or index > idx[-1]:
            for c in self.columns:
                self._data[c].append(row.get(c))
        else:
            at = bisect.bisect_left(idx, index)
            if at < len(idx) and idx[at] == index:
                for c in self.columns:
                    self._data[c][at] = row.get(c)
            else:
                for c in self.columns:
                    self._data[c].insert(at, row.get(c))
        if len(idx) > self.cap:
            excess = len(idx) - self.cap
            for c in self.columns:
                del self._data[c][:excess]

    def column(self, name: str) -> list[Any]:
        return list(self._data[name])

    def as_dict(self) -> dict[str, list[Any]]:
        return {c: list(v) for c, v in self._data.items()}


@dataclass(frozen=True, slots=True, eq=False)
class Listener:
    """One page's queue of deltas, already JSON text; None means "close"."""

    events: queue.Queue[str | None]


class SeriesState:
    """Everything shown about one series; fed one message at a time."""

    def __init__(self, series: SeriesInfo, *, max_points: int) -> None:
        self.id = series_id(series)
        self.session_key = series.session_key
        self.series_number = series.series_number
        self.description = series.description
        self.tr_s = series.tr_s
        self.started: float | None = None
        self.ended: dict[str, Any] | None = None
        self.updated = time.time()
        self.qc = Trace(QC_COLUMNS, cap=max_points)
        self.motion = Trace(MOTION_COLUMNS, cap=max_points)
        self.usable: dict[str, Any] | None = None
        self.target: dict[str, Any] | None = None
        self.guidance: dict[str, Any] | None = None
        self.warnings: deque[dict[str, Any]] = deque(maxlen=_MAX_WARNINGS)
        self.received = 0
        self.last_index: int | None = None
        self.shape: list[float | None] | None = None
        self.voxel_mm: list[float | None] | None = None
        self.assembly_ms: float | None = None
        self.instances: int | None = None
        #: index -> reason, oldest first; counts are kept beyond the listed cap.
        self.missing: OrderedDict[int, str] = OrderedDict()
        self.n_missing = 0
        self.n_late = 0
        self.n_slow = 0
        self._slow: set[int] = set()
        self._missing_seen: set[int] = set()

    # -- views ---------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_key": self.session_key,
            "series_number": self.series_number,
            "description": self.description,
            "tr_s": self.tr_s,
            "started": self.started,
            "ended": self.ended,
            "updated": self.updated,
        }

    def receiver(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "last_index": self.last_index,
            "shape": self.shape,
            "voxel_mm": self.voxel_mm,
            "assembly_ms": self.assembly_ms,
            "instances": self.instances,
            "missing": [{"index": i, "reason": r} for i, r in self.missing.items()],
            "n_missing": self.n_missing,
            "n_late": self.n_late,
            "n_slow": self.n_slow,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.header(),
            "qc": self.qc.as_dict(),
            "motion": self.motion.as_dict(),
            "usable": self.usable,
            "receiver": self.receiver(),
            "target": self.target,
            "guidance": self.guidance,
            "warnings": list(self.warnings),
        }

    # -- updates (each returns the delta to send, or None) ----------------------

    def on_start(self, start: SeriesStart) -> dict[str, Any]:
        self.started = start.started
        return {"type": "series", "series": self.header()}

    def on_end(self, end: SeriesEnd) -> dict[str, Any]:
        self.ended = {"time": end.ended, "n_volumes": end.n_volumes, "reason": end.reason}
        return {"type": "series", "series": self.header()}

    def on_received(self, index: int | None, values: Mapping[str, Any]) -> dict[str, Any]:
        self.received += 1
        if index is not None and (self.last_index is None or index > self.last_index):
            self.last_index = index
        self.shape = _numbers(values.get("shape"), 3) or self.shape
        self.voxel_mm = _numbers(values.get("voxel_mm"), 3) or self.voxel_mm
        self.assembly_ms = _number(values.get("assembly_ms"))
        instances = values.get("instances")
        self.instances = instances if isinstance(instances, int) else None
        return {"type": "receiver", "id": self.id, "receiver": self.receiver()}

    def on_missing(self, index: int, reason: str, *, late: bool) -> dict[str, Any] | None:
        """Count volume ``index`` as missing once (None when it already was)."""
        if index in self._missing_seen:
            return None
        if len(self._missing_seen) < 100_000:
            self._missing_seen.add(index)
        self.n_missing += 1
        self.n_late += int(late)
        self.missing[index] = reason
        while len(self.missing) > _MAX_MISSING_LISTED:
            self.missing.popitem(last=False)
        return {"type": "receiver", "id": self.id, "receiver": self.receiver()}

    def on_qc(
        self, index: int, values: Mapping[str, Any], latency_ms: float | None
    ) -> dict[str, Any]:
        outlier = values.get("outlier")
        row = {
            "index": index,
            "fd_mm": _number(values.get("fd_mm")),
            "dvars": _number(values.get("dvars")),
            "std_dvars": _number(values.get("std_dvars")),
            "tsnr_median": _number(values.get("tsnr_median")),
            "outlier": bool(outlier) if isinstance(outlier, bool) else None,
            topics.QC_LATENCY_MS: latency_ms,
        }
        self.qc.add(row)
        usable = values.get("usable")
        if isinstance(usable, Mapping):
            self.usable = _clean_usable(usable)
        if (
            latency_ms is not None
            and self.tr_s is not None
            and latency_ms > self.tr_s * 1000.0
            and index not in self._slow
            and len(self._slow) < 100_000
        ):
            self._slow.add(index)
            self.n_slow += 1
        return {
            "type": "qc",
            "id": self.id,
            "row": row,
            "usable": self.usable,
            "receiver": self.receiver(),
        }

    def on_motion(self, index: int, values: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"index": index}
        for name in PARAM_NAMES:
            row[name] = _number(values.get(name))
        flagged = values.get("flagged")
        row["flagged"] = bool(flagged) if isinstance(flagged, bool) else None
        self.motion.add(row)
        return {"type": "motion", "id": self.id, "row": row}

    def on_target(self, result: Result) -> dict[str, Any]:
        self.target = target_view(result)
        return {"type": "target", "id": self.id, "target": self.target}

    def on_guidance(self, result: Result) -> dict[str, Any] | None:
        view = guidance_view(result)
        if view is None:
            return None
        self.guidance = view
        return {"type": "guidance", "id": self.id, "guidance": view}

    def on_warning(self, warning: dict[str, Any]) -> dict[str, Any]:
        self.warnings.append(warning)
        return {"type": "warning", "id": self.id, "warning": warning}


def _clean_usable(usable: Mapping[str, Any]) -> dict[str, Any]:
    rows = usable.get("thresholds")
    thresholds = []
    if isinstance(rows, Sequence):
        for row in rows:
            if isinstance(row, Mapping):
                thresholds.append({k: _number(row.get(k)) for k in topics.USABLE_THRESHOLD_FIELDS})
    return {
        "frames_total": _number(usable.get("frames_total")),
        "minutes_total": _number(usable.get("minutes_total")),
        "goal_minutes": _number(usable.get("goal_minutes")),
        "thresholds": thresholds,
    }


# --------------------------------------------------------------------------- guidance


def guidance_view(result: Result) -> dict[str, Any] | None:
    """What the page shows of a ``guidance`` result; None when its state is unknown."""
    v = result.values
    state = v.get("state")
    if state not in topics.GUIDANCE_STATES:
        return None
    band = _numbers(v.get("minutes_more_range"), 2)
    return {
        "index": result.index,
        "state": state,
        "message": str(v.get("message", "")),
        "minutes_more": _number(v.get("minutes_more")),
        "minutes_more_range": band if band is not None and None not in band else None,
        "reason": str(v.get("reason", "")),
        "good_minutes": _number(v.get("good_minutes")),
        "fd_threshold_mm": _number(v.get("fd_threshold_mm")),
        "split_half_mm": _number(v.get("split_half_mm")),
        "drift_mm": _number(v.get("drift_mm")),
    }


# --------------------------------------------------------------------------- target


def _display_axes(vox2ras: npt.NDArray[np.float64]) -> tuple[list[int], list[int]]:
    """For RAS axes x, y, z: the voxel axis closest to each, and its direction (+1/-1)."""
    m = np.abs(vox2ras[:3, :3])
    axes = [-1, -1, -1]
    signs = [1, 1, 1]
    # Greedy on the largest components so that three distinct voxel axes come out
    # even for oblique stacks.
    for _ in range(3):
        ras, vox = np.unravel_index(int(np.argmax(m)), m.shape)
        axes[int(ras)] = int(vox)
        signs[int(ras)] = 1 if vox2ras[int(ras), int(vox)] >= 0 else -1
        m[int(ras), :] = -1.0
        m[:, int(vox)] = -1.0
    return axes, signs


def target_view(result: Result) -> dict[str, Any]:
    """What the page shows of a target: its values and three slices through it.

    The slices are axial, coronal and sagittal planes of the correlation map
    through the target voxel, in neurological orientation (patient left on
    the left, anterior / superior up), each with labels for its four edges,
    values row-major from the top row (None where not finite), the target's
    column and row, and a symmetric colour limit ``vmax``.
    """
    values = result.values
    view: dict[str, Any] = {
        "index": result.index,
        "time": time.time(),
        "status": values.get("status") if values.get("status") in topics.TARGET_STATUSES else None,
        "ras_mm": _numbers(values.get("ras_mm"), 3),
        "mni_mm": _numbers(values.get("mni_mm"), 3),
        "split_half_mm": _number(values.get("split_half_mm")),
        "drift_mm": _number(values.get("drift_mm")),
        "good_minutes": _number(values.get("good_minutes")),
        "p_value": _number(values.get("p_value")),
        "held_s": _number(values.get("held_s")),
        "reasons": _texts(values.get("reasons")),
        "slices": [],
        "vmax": None,
    }
    volume = result.arrays.get(topics.TARGET_ARRAY_MAP)
    if volume is None or volume.ndim != 3 or min(volume.shape) < 1:
        return view
    vox2ras = result.affines.get(topics.TARGET_AFFINE)
    affine = np.eye(4) if vox2ras is None else np.asarray(vox2ras, dtype=np.float64)
    data = np.asarray(volume, dtype=np.float32)
    shape = np.array(data.shape)
    ras = view["ras_mm"]
    if ras is not None and None not in ras and vox2ras is not None:
        try:
            ijk = np.linalg.solve(affine, np.array([*ras, 1.0]))[:3]
        except np.linalg.LinAlgError:
            ijk = (shape - 1) / 2.0
    else:
        ijk = (shape - 1) / 2.0
    voxel = np.clip(np.rint(ijk), 0, shape - 1).astype(int)
    axes, signs = _display_axes(affine)
    # plane -> (horizontal RAS axis, vertical RAS axis, fixed RAS axis, edge labels)
    planes = {
        "axial": (0, 1, 2, ("L", "R", "A", "P")),
        "coronal": (0, 2, 1, ("L", "R", "S", "I")),
        "sagittal": (1, 2, 0, ("P", "A", "S", "I")),
    }
    finite = data[np.isfinite(data)]
    vmax = float(np.percentile(np.abs(finite), 99.0)) if finite.size else 0.0
    view["vmax"] = vmax if vmax > 0.0 else 1.0
    for name in _SLICE_PLANES:
        h, v, fixed, labels = planes[name]
        ah, av, af = axes[h], axes[v], axes[fixed]
        index: list[Any] = [slice(None)] * 3
        index[af] = int(voxel[af])
        plane = data[tuple(index)]
        # ``plane`` keeps the two remaining voxel axes in their order; make it
        # (vertical, horizontal) so rows run down the screen.
        remaining = [a for a in range(3) if a != af]
        img = plane if remaining == [av, ah] else plane.T
        col, row = int(voxel[ah]), int(voxel[av])
        if signs[h] < 0:  # screen x grows towards the patient's right (and anterior)
            img = img[:, ::-1]
            col = img.shape[1] - 1 - col
        if signs[v] > 0:  # screen rows grow downwards: flip so +RAS is up
            img = img[::-1, :]
            row = img.shape[0] - 1 - row
        rounded = np.round(img.astype(np.float64), 3)
        flat = [float(x) if math.isfinite(x) else None for x in rounded.ravel().tolist()]
        view["slices"].append(
            {
                "plane": name,
                "width": int(img.shape[1]),
                "height": int(img.shape[0]),
                "values": flat,
                "cross": [col, row],
                "labels": dict(zip(("left", "right", "top", "bottom"), labels, strict=True)),
                "voxel_mm": _voxel_aspect(affine, ah, av),
            }
        )
    return view


def _voxel_aspect(affine: npt.NDArray[np.float64], ah: int, av: int) -> list[float]:
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return [float(sizes[ah]), float(sizes[av])]


# --------------------------------------------------------------------------- state


class DashboardState:
    """All series the dashboard knows, plus the subscriber's health; thread-safe.

    ``apply`` is called by the SUB thread; ``snapshot``, ``listen`` and
    ``metrics`` by HTTP threads. Listeners get each delta in order through a
    bounded queue; ``None`` in a queue means "you fell behind or the server is
    stopping: close".
    """

    def __init__(
        self,
        *,
        max_points: int = 4096,
        max_series: int = 4,
        queue_size: int = 2000,
        latency_buckets_s: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be positive, got {max_series}")
        self.max_points = max_points
        self.max_series = max_series
        self.queue_size = queue_size
        self._clock = clock
        self._lock = threading.Lock()
        self._series: OrderedDict[str, SeriesState] = OrderedDict()
        self._warnings: deque[dict[str, Any]] = deque(maxlen=_MAX_WARNINGS)
        self._listeners: set[Listener] = set()
        self._pending: list[dict[str, Any]] = []
        # subscriber health
        self.connected = False
        self.running = False
        self.messages = 0
        self.dropped = 0
        self.bad_messages = 0
        self.last_message: float | None = None
        # totals for /metrics, never reset by series eviction
        self.volumes_received = 0
        self.volumes_missing = 0
        self.volumes_late = 0
        self.buckets = tuple(sorted(float(b) for b in latency_buckets_s))
        self.bucket_counts = [0] * (len(self.buckets) + 1)
        self.latency_sum_s = 0.0
        self.latency_count = 0

    # -- reading --------------------------------------------------------------

    def subscriber(self) -> dict[str, Any]:
        """Health of the SUB side (callers hold the lock or accept a torn read)."""
        now = self._clock()
        return {
            "running": self.running,
            "connected": self.connected,
            "messages": self.messages,
            "dropped": self.dropped,
            "bad_messages": self.bad_messages,
            "last_message_age_s": None if self.last_message is None else now - self.last_message,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "time": self._clock(),
            "max_points": self.max_points,
            "max_series": self.max_series,
            "subscriber": self.subscriber(),
            "series": [s.snapshot() for s in self._series.values()],
            "warnings": list(self._warnings),
        }

    def series(self, sid: str) -> SeriesState | None:
        with self._lock:
            return self._series.get(sid)

    def listen(self) -> tuple[dict[str, Any], Listener]:
        """The current snapshot and a listener that gets every later delta."""
        listener = Listener(queue.Queue(maxsize=self.queue_size))
        with self._lock:
            self._listeners.add(listener)
            return self._snapshot(), listener

    def unlisten(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)

    def close_listeners(self) -> None:
        """Tell every listener to close (the server is stopping)."""
        with self._lock:
            for listener in self._listeners:
                _offer(listener, None)
            self._listeners.clear()

    # -- subscriber health ------------------------------------------------------

    def set_subscriber(
        self,
        *,
        running: bool | None = None,
        connected: bool | None = None,
        dropped: int | None = None,
    ) -> None:
        with self._lock:
            if running is not None:
                self.running = running
            if connected is not None:
                self.connected = connected
            if dropped is not None:
                self.dropped = dropped
            self._broadcast({"type": "status", "subscriber": self.subscriber()})

    def heartbeat(self) -> dict[str, Any]:
        """A status delta (also sent to every listener as a liveness signal)."""
        with self._lock:
            event = {"type": "status", "subscriber": self.subscriber()}
            self._broadcast(event)
            return event

    def bad_message(self) -> None:
        with self._lock:
            self.bad_messages += 1

    # -- writing -----------------------------------------------------------------

    def apply(self, message: Message) -> list[dict[str, Any]]:
        """Update from one message; return the deltas sent to listeners (none: ignored).

        A message of a series not seen before first yields a ``series`` delta
        (and a ``drop`` delta for a series evicted to make room).
        """
        with self._lock:
            self.messages += 1
            self.last_message = self._clock()
            self._pending = []
            delta = self._apply(message)
            deltas = [*self._pending, *([delta] if delta is not None else [])]
            for d in deltas:
                self._broadcast(d)
            return deltas

    def _state_for(self, series: SeriesInfo) -> SeriesState:
        sid = series_id(series)
        state = self._series.get(sid)
        if state is None:
            state = SeriesState(series, max_points=self.max_points)
            self._series[sid] = state
            while len(self._series) > self.max_series:
                dropped, _ = self._series.popitem(last=False)
                self._pending.append({"type": "drop", "id": dropped})
            self._pending.append({"type": "series", "series": state.header()})
        else:
            self._series.move_to_end(sid)
        state.updated = self._clock()
        return state

    def _apply(self, message: Message) -> dict[str, Any] | None:
        p = message.payload
        topic = message.topic
        if isinstance(p, SeriesStart):
            return self._state_for(p.series).on_start(p)
        if isinstance(p, SeriesEnd):
            return self._state_for(p.series).on_end(p)
        if isinstance(p, VolumeIncomplete | Gap):
            # The receiver reports a volume it gave up on, and the orderer then
            # marks the same hole as a gap: count each index once.
            reason: str
            if isinstance(p, Gap):
                reason, late = p.reason, p.reason == "timeout"
            else:
                reason, late = p.reason or "incomplete", False
            delta = self._state_for(p.series).on_missing(p.index, reason, late=late)
            if delta is not None:
                self.volumes_missing += 1
                self.volumes_late += int(late)
            return delta
        if not isinstance(p, Result):
            return None
        if topic == topics.WARNING:
            warning = {
                "message": str(p.values.get("message", "")),
                "code": str(p.values.get("code", "")),
                "index": p.index,
                "time": self._clock(),
            }
            if p.series is None:
                self._warnings.append(warning)
                return {"type": "warning", "id": None, "warning": warning}
            return self._state_for(p.series).on_warning(warning)
        if p.series is None:
            return None
        if topic == topics.VOLUME_RECEIVED:
            self.volumes_received += 1
            return self._state_for(p.series).on_received(p.index, p.values)
        if p.index is None and topic in (topics.QC, topics.MOTION):
            return None
        if topic == topics.QC:
            assert p.index is not None
            latency_ms = _number(p.values.get(topics.QC_LATENCY_MS))
            if latency_ms is None:
                seconds = message.latency(start="received", end="published")
                latency_ms = None if seconds is None else seconds * 1000.0
            if latency_ms is not None:
                self._observe_latency(latency_ms / 1000.0)
            return self._state_for(p.series).on_qc(p.index, p.values, latency_ms)
        if topic == topics.MOTION:
            assert p.index is not None
            return self._state_for(p.series).on_motion(p.index, p.values)
        if topic == topics.TARGET:
            return self._state_for(p.series).on_target(p)
        if topic == topics.GUIDANCE:
            return self._state_for(p.series).on_guidance(p)
        return None

    def _observe_latency(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        self.latency_count += 1
        at = bisect.bisect_left(self.buckets, seconds)
        self.bucket_counts[at] += 1

    def _broadcast(self, event: dict[str, Any]) -> None:
        if not self._listeners:
            return
        text = to_json(event)
        stale = [listener for listener in self._listeners if not _offer(listener, text)]
        for listener in stale:
            self._listeners.discard(listener)
            # Make room for the close marker: the page reconnects from a snapshot.
            while True:
                try:
                    listener.events.get_nowait()
                except queue.Empty:
                    break
            _offer(listener, None)

    # -- metrics -------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters for the Prometheus exposition, read under the lock."""
        with self._lock:
            return {
                "volumes_received": self.volumes_received,
                "volumes_missing": self.volumes_missing,
                "volumes_late": self.volumes_late,
                "messages": self.messages,
                "dropped": self.dropped,
                "bad_messages": self.bad_messages,
                "connected": self.connected,
                "listeners": len(self._listeners),
                "buckets": self.buckets,
                "bucket_counts": list(self.bucket_counts),
                "latency_sum_s": self.latency_sum_s,
                "latency_count": self.latency_count,
            }


def to_json(value: Any) -> str:
    """Compact JSON without NaN (every number here went through ``_number``)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _offer(listener: Listener, event: str | None) -> bool:
    try:
        listener.events.put_nowait(event)
    except queue.Full:
        return False
    return True
