"""Fragments -> complete volumes, with timeouts instead of waiting forever.

The :class:`Assembler` is owned by one ingest thread (it is not thread-safe)
and keeps only incomplete volumes in memory. A volume is emitted as soon as
its last slice arrives, in whatever order volumes complete (downstream
reorders by index). A volume that cannot complete is reported as
:class:`VolumeIncomplete` after ``volume_timeout_s`` and never blocks later
volumes. When no header states the slice count, the count is learnt from the
first volume that a later volume overtakes and that then stays quiet for
``slice_grace_s``.

Per-slice work is a dot product and a dict insert; sorting by position along
the normal, the geometry check and the one copy into the float32 array
happen once per volume, at completion.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.logs import get_logger
from boldstream.receiver.fragment import Fragment
from boldstream.receiver.geometry import slice_affine
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete

__all__ = ["Assembler", "AssemblyStats", "Prepared"]

FloatArray = npt.NDArray[np.float64]
Event = Volume | VolumeIncomplete

#: Two slices of one volume closer than this along the normal are the same
#: slice (a resent instance): positions are keyed in units of 0.01 mm.
_POSITION_QUANTUM_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-3
#: Slice positions further than this from the scanner origin (or not finite)
#: are corrupt headers; they would also overflow the position keys.
_MAX_POSITION_MM = 1e6

_log = get_logger("receiver.assembly")


@dataclass(slots=True)
class AssemblyStats:
    """Counters for monitoring; they only grow."""

    volumes: int = 0
    incomplete: int = 0
    #: Slices ignored because the same position of the same volume was seen.
    duplicate_slices: int = 0
    #: Slices ignored because their volume was already emitted or expired.
    late_slices: int = 0
    #: Instances refused (matrix changed mid-series...) and volumes whose
    #: slices did not form one evenly spaced stack.
    rejected: int = 0


@dataclass(slots=True)
class _Slice:
    fragment: Fragment
    k: int
    along: float


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """A fragment that is a whole volume by itself, already written into its
    float32 array in position order (:meth:`Assembler.prepare`)."""

    fragment: Fragment
    data: npt.NDArray[np.float32]


@dataclass(slots=True)
class _Pending:
    index: int
    orientation: FloatArray
    normal: FloatArray
    first_received: float
    last_received: float
    slices: dict[int, _Slice] = field(default_factory=dict)
    uids: dict[str, None] = field(default_factory=dict)
    #: The array of the fragment that opened this volume, when prepared.
    prepared: Prepared | None = None


@dataclass(slots=True)
class _Series:
    info: SeriesInfo
    matrix: tuple[int, int]
    pixel_spacing: tuple[float, float]
    expected: int | None
    last_activity: float
    max_index: int = -1
    pending: dict[int, _Pending] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)


class Assembler:
    """Collects fragments per series and volume; emits complete volumes.

    Times (``received``, ``now``) are ``time.time()`` values supplied by the
    caller, so that tests and replays control the clock.
    """

    def __init__(self, settings: AssemblySettings) -> None:
        self._settings = settings
        self._series: dict[str, _Series] = {}
        self.stats = AssemblyStats()

    @property
    def pending_volumes(self) -> int:
        """Incomplete volumes held in memory, over all series."""
        return sum(len(s.pending) for s in self._series.values())

    def prepare(self, fragments: list[Fragment]) -> list[Prepared]:
        """Write, ahead of :meth:`add`, the arrays of fragments that hold a whole
        volume by themselves (a mosaic, an enhanced instance per volume).

        Filling the float32 array is most of the cost of assembling such a
        volume and depends on nothing but the fragment, so the ingest does it
        while the instance's durable write runs, and only what depends on the
        series' state waits for the write. :meth:`add` uses an array only for
        a volume made of exactly that fragment's slices; otherwise it fills
        the volume as usual.
        """
        out = []
        for fragment in fragments:
            n = fragment.n_slices
            if n < 1 or fragment.expected_slices != n:
                continue
            along = fragment.positions @ fragment.normal
            if len({round(float(a) / _POSITION_QUANTUM_MM) for a in along}) != n:
                continue  # two tiles at one position: add() sorts that out
            rows, cols = fragment.matrix
            data = np.empty((cols, rows, n), dtype=np.float32)
            slopes, intercepts = fragment.slopes.tolist(), fragment.intercepts.tolist()
            for z, k in enumerate(np.argsort(along, kind="stable").tolist()):
                _rescale(data[:, :, z], fragment.pixels[k].T, slopes[k], intercepts[k])
            out.append(Prepared(fragment, data))
        return out

    def add(
        self, fragments: list[Fragment], *, received: float, prepared: Sequence[Prepared] = ()
    ) -> list[Event]:
        """Take the fragments of one instance; return the volumes they complete.

        ``prepared``: what :meth:`prepare` made of these fragments. Raises
        :class:`DicomInputError` (and keeps nothing of the instance) when the
        instance does not fit its series: another matrix, pixel spacing,
        slice count or slice orientation than the volume it joins.
        """
        self._validate(fragments)
        ready = {id(p.fragment): p for p in prepared}
        out: list[Event] = []
        for fragment in fragments:
            series = self._series_for(fragment, received)
            series.last_activity = max(series.last_activity, received)
            if fragment.index in series.closed:
                self.stats.late_slices += fragment.n_slices
                _log.warning(
                    "late slice ignored: its volume was already emitted or expired",
                    series=series.info.session_key,
                    volume=fragment.index,
                    slices=fragment.n_slices,
                )
                continue
            series.max_index = max(series.max_index, fragment.index)
            pending = series.pending.get(fragment.index)
            if pending is None:
                pending = _Pending(
                    index=fragment.index,
                    orientation=fragment.orientation,
                    normal=fragment.normal,
                    first_received=received,
                    last_received=received,
                    prepared=ready.get(id(fragment)),
                )
                series.pending[fragment.index] = pending
            self._insert(series, pending, fragment, received)
            expected = series.expected
            if expected is not None and len(pending.slices) >= expected:
                out.append(self._close(series, pending, complete=True, now=received))
        return out

    def expire(self, now: float) -> list[Event]:
        """Close what waited too long; call it regularly (e.g. every 100 ms)."""
        out: list[Event] = []
        settings = self._settings
        for uid in list(self._series):
            series = self._series[uid]
            for index in sorted(series.pending):
                pending = series.pending.get(index)
                if pending is None:
                    continue
                if series.expected is None:
                    overtaken = series.max_index > index
                    quiet = now - pending.last_received
                    if (overtaken and quiet >= settings.slice_grace_s) or (
                        not overtaken and now - pending.first_received >= settings.volume_timeout_s
                    ):
                        # Silence after a later volume began (or, for a lone
                        # volume, for the whole timeout) is the only evidence
                        # of completeness when no header states the count.
                        out.extend(self._learn_count(series, pending, now))
                    continue
                if now - pending.first_received >= settings.volume_timeout_s:
                    out.append(self._close(series, pending, complete=False, now=now))
            if now - series.last_activity >= settings.series_idle_timeout_s:
                for index in sorted(series.pending):
                    out.append(self._close(series, series.pending[index], complete=False, now=now))
                del self._series[uid]
                _log.info("series closed after idle timeout", series=series.info.session_key)
        return out

    # -- internals ------------------------------------------------------------

    def _validate(self, fragments: list[Fragment]) -> None:
        """Refuse an instance that does not fit its series, before any change."""
        for fragment in fragments:
            series = self._series.get(fragment.series.series_uid)
            problem = None
            positions = fragment.positions
            if not np.all(np.isfinite(positions)) or np.max(np.abs(positions)) > _MAX_POSITION_MM:
                problem = (
                    f"ImagePositionPatient is not finite or beyond {_MAX_POSITION_MM:g} mm: "
                    "corrupt header"
                )
            elif series is not None:
                if fragment.matrix != series.matrix:
                    problem = (
                        f"image matrix changed from {series.matrix[0]}x{series.matrix[1]} to "
                        f"{fragment.matrix[0]}x{fragment.matrix[1]} within the series"
                    )
                elif fragment.pixel_spacing != series.pixel_spacing:
                    problem = (
                        f"pixel spacing changed from {series.pixel_spacing} to "
                        f"{fragment.pixel_spacing} within the series"
                    )
                elif (
                    fragment.expected_slices is not None
                    and series.expected is not None
                    and fragment.expected_slices != series.expected
                ):
                    problem = (
                        f"slices per volume changed from {series.expected} to "
                        f"{fragment.expected_slices} within the series"
                    )
                else:
                    pending = series.pending.get(fragment.index)
                    if pending is not None and (
                        np.max(np.abs(pending.orientation - fragment.orientation))
                        > _ORIENTATION_TOLERANCE
                    ):
                        problem = (
                            f"slice orientation differs from the other slices of volume "
                            f"{fragment.index}"
                        )
            if problem is not None:
                self.stats.rejected += 1
                _log.error(
                    "instance refused",
                    series=fragment.series.session_key,
                    volume=fragment.index,
                    reason=problem,
                )
                raise DicomInputError(f"{problem}: instance ignored")

    def _series_for(self, fragment: Fragment, received: float) -> _Series:
        series = self._series.get(fragment.series.series_uid)
        if series is None:
            series = _Series(
                info=fragment.series,
                matrix=fragment.matrix,
                pixel_spacing=fragment.pixel_spacing,
                expected=fragment.expected_slices,
                last_activity=received,
            )
            self._series[fragment.series.series_uid] = series
        return series

    def _insert(
        self, series: _Series, pending: _Pending, fragment: Fragment, received: float
    ) -> None:
        along = fragment.positions @ pending.normal
        duplicates = 0
        for k in range(fragment.n_slices):
            key = round(float(along[k]) / _POSITION_QUANTUM_MM)
            if key in pending.slices:
                duplicates += 1
                continue
            pending.slices[key] = _Slice(fragment, k, float(along[k]))
        if duplicates:
            self.stats.duplicate_slices += duplicates
            _log.info(
                "duplicate slice ignored",
                series=series.info.session_key,
                volume=pending.index,
                slices=duplicates,
            )
        if duplicates < fragment.n_slices:
            pending.uids[fragment.sop_instance_uid] = None
            pending.first_received = min(pending.first_received, received)
            pending.last_received = max(pending.last_received, received)

    def _learn_count(self, series: _Series, pending: _Pending, now: float) -> list[Event]:
        """Close ``pending`` as complete and take its size as the series' count.

        A volume whose slices do not form an even stack (a slice lost in the
        middle) teaches nothing: the count stays unknown for the next one.
        """
        count = len(pending.slices)
        info = series.info
        series.expected = count
        series.info = dataclasses.replace(info, slices_per_volume=count)
        first = self._close(series, pending, complete=True, now=now)
        if not isinstance(first, Volume):
            series.expected, series.info = None, info
            return [first]
        _log.info("slices per volume learnt", series=info.session_key, slices=count)
        done = [p for p in series.pending.values() if len(p.slices) >= count]
        return [first] + [self._close(series, p, complete=True, now=now) for p in done]

    def _close(self, series: _Series, pending: _Pending, *, complete: bool, now: float) -> Event:
        del series.pending[pending.index]
        series.closed.add(pending.index)
        reason = "timeout: slices missing"
        if complete:
            try:
                return self._build(series, pending)
            except DicomInputError as exc:
                reason = f"rejected: {exc}"
                self.stats.rejected += 1
                _log.error(
                    "volume rejected",
                    series=series.info.session_key,
                    volume=pending.index,
                    reason=str(exc),
                )
        self.stats.incomplete += 1
        _log.warning(
            "volume incomplete",
            series=series.info.session_key,
            volume=pending.index,
            slices_received=len(pending.slices),
            slices_expected=series.expected,
        )
        return VolumeIncomplete(
            series=series.info,
            index=pending.index,
            slices_received=len(pending.slices),
            slices_expected=series.expected,
            first_received=pending.first_received,
            reported=now,
            reason=reason,
        )

    def _build(self, series: _Series, pending: _Pending) -> Volume:
        items = sorted(pending.slices.values(), key=lambda s: s.along)
        positions = np.array([s.fragment.positions[s.k] for s in items])
        first = items[0].fragment
        vox2ras = slice_affine(
            pending.orientation,
            series.pixel_spacing,
            positions,
            normal=pending.normal,
            slice_spacing=first.slice_spacing,
        )
        rows, cols = series.matrix
        ahead = pending.prepared
        if (
            ahead is not None
            and all(item.fragment is ahead.fragment for item in items)
            and (len(items) == ahead.fragment.n_slices)
        ):
            data = ahead.data  # filled while the instance was being written
        else:
            data = np.empty((cols, rows, len(items)), dtype=np.float32)
            for z, item in enumerate(items):
                _fill(data[:, :, z], item)
        if series.info.slice_timing is None:
            timing = _slice_timing(items)
            if timing is None and series.info.encoding == "slice":
                timing = _timing_from_acquisition_times(items, series.info.tr_s)
            if timing is not None:
                series.info = dataclasses.replace(series.info, slice_timing=timing)
        times = [s.fragment.acquisition_time for s in items]
        known = [t for t in times if t is not None]
        self.stats.volumes += 1
        volume = Volume(
            data=data,
            vox2ras=vox2ras,
            series=series.info,
            index=pending.index,
            acquisition_time=min(known) if known else None,
            first_received=pending.first_received,
            last_received=pending.last_received,
            assembled=time.time(),
            instance_uids=tuple(pending.uids),
        )
        _log.debug(
            "volume assembled",
            series=series.info.session_key,
            volume=pending.index,
            shape=volume.shape,
        )
        return volume


def _fill(out: npt.NDArray[np.float32], item: _Slice) -> None:
    """Write one stored slice, transposed and rescaled, into the volume."""
    fragment = item.fragment
    _rescale(
        out,
        fragment.pixels[item.k].T,
        float(fragment.slopes[item.k]),
        float(fragment.intercepts[item.k]),
    )


def _rescale(
    out: npt.NDArray[np.float32], pixels: npt.NDArray[Any], slope: float, intercept: float
) -> None:
    """``out = pixels * slope + intercept``, in place."""
    if slope == 1.0 and intercept == 0.0:
        out[...] = pixels
        return
    np.multiply(pixels, slope, out=out, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)


def _timing_from_acquisition_times(
    items: list[_Slice], tr_s: float | None
) -> tuple[float, ...] | None:
    """One file per slice: each slice's acquisition time after the volume's first.

    Known only when every slice has a time, the times differ (a console that
    stamps one time on every slice of a volume says nothing about the slice
    order) and they span less than one TR (SPEC 1: slice timing in seconds
    from the start of the volume, in volume axis order).
    """
    times = [item.fragment.acquisition_time for item in items]
    known = [t for t in times if t is not None]
    if len(items) < 2 or len(known) != len(times):
        return None
    first = min(known)
    offsets = tuple(round(t - first, 6) for t in known)
    spread = max(offsets)
    if spread <= 0 or (tr_s is not None and spread >= tr_s):
        return None
    return offsets


def _slice_timing(items: list[_Slice]) -> tuple[float, ...] | None:
    """Slice times in volume axis order, when every slice has one."""
    values = []
    for item in items:
        times = item.fragment.slice_times
        if times is None:
            return None
        values.append(float(times[item.k]))
    return tuple(values)
