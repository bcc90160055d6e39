"""The ingest thread: from spooled instances to assembled volumes.

Handler threads (one per association) only enqueue and spool; this single
thread owns the :class:`~boldstream.receiver.assembly.Assembler`, so assembly
needs no locks. It decides once per series whether the series is analysed,
decodes each instance's pixel data (while the handler's durable write of the
same instance is under way), adds the instance to its volume at once
(``receiver.assemble = "on_arrival"``, the default) or once that write has
succeeded (``"after_write"``), times out
volumes that will never complete, closes idle series in the spool, and hands
every :class:`Volume` / :class:`VolumeIncomplete` to ``emit``.

On start, :meth:`Ingest.recover` re-reads every instance of every series the
spool has not closed, so a crash between "success sent to the scanner" and
"volume assembled" loses nothing; downstream de-duplicates volumes by
(series, index).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset

from boldstream.config.settings import Settings
from boldstream.errors import DicomInputError
from boldstream.logs import get_logger
from boldstream.receiver.assembly import Assembler, Prepared
from boldstream.receiver.decode import Fragment, decode_instance
from boldstream.receiver.lean import LeanDataset, read_lean
from boldstream.receiver.scp import Received
from boldstream.receiver.selector import Selection, SeriesSelector
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import Volume, VolumeIncomplete

__all__ = ["Begun", "Ingest", "IngestStats", "warn_not_stored_after_all"]

Emitted = Volume | VolumeIncomplete


@dataclass
class IngestStats:
    instances: int = 0
    skipped: int = 0
    undecodable: int = 0
    volumes: int = 0
    incomplete: int = 0
    recovered: int = 0


@dataclass
class Begun:
    """An instance read and decoded ahead of its durable write (:meth:`Ingest.begin`)."""

    item: Received
    ds: Dataset | LeanDataset | None = None
    uid: str = ""
    selection: Selection | None = None
    fragments: list[Fragment] = field(default_factory=list)
    prepared: list[Prepared] = field(default_factory=list)
    #: Why the fragments could not be decoded (reported only if the write succeeds).
    problem: DicomInputError | None = None
    #: Why the instance could not be read at all.
    unreadable: Exception | None = None


@dataclass
class _SeriesState:
    study_uid: str
    selection: Selection
    last_seen: float


class Ingest:
    """Consumes :class:`Received` instances on one thread; see module docstring."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        emit: Callable[[Emitted], None],
        *,
        tick_s: float = 0.1,
        max_queue: int = 20000,
        slow_write_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.stats = IngestStats()
        self._emit = emit
        self._tick_s = tick_s
        #: How long a write may run before the wait for it is logged (s).
        self.slow_write_s = slow_write_s
        self._queue: queue.Queue[Received | None] = queue.Queue(maxsize=max_queue)
        self._selector = SeriesSelector(settings.selector)
        self._assembler = Assembler(settings.assembly)
        self._series: dict[str, _SeriesState] = {}
        self._thread = threading.Thread(target=self._run, name="boldstream-ingest", daemon=True)
        self._log = get_logger("ingest")
        self._idle = threading.Event()

    # -- producer side (handler threads) ---------------------------------
    def submit(self, item: Received) -> None:
        """Enqueue an instance already safe in the spool (blocks if far behind)."""
        self._idle.clear()
        self._queue.put(item)

    def recover(self) -> int:
        """Enqueue every instance of every unclosed series in the spool."""
        n = 0
        for path in self.recovery():
            item = self.read_recovered(path)
            if item is not None:
                self.submit(item)
                n += 1
        return n

    def recovery(self) -> list[Path]:
        """The files to recover: every instance of every series the spool has not
        closed, listed now (an instance written later reaches the ingest live)."""
        paths = list(self.spool.pending())
        if paths:
            self._log.info("recovering spooled instances", instances=len(paths))
        return paths

    def read_recovered(self, path: Path) -> Received | None:
        """One file of :meth:`recovery` read back, already durable; None if unreadable."""
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            self._log.error("spooled file unreadable", path=str(path), error=str(exc))
            return None
        meta = getattr(ds, "file_meta", None)
        sop_class = str(meta.MediaStorageSOPClassUID) if meta is not None else ""
        self.stats.recovered += 1
        return Received(
            decoded=ds,
            path=path,
            sop_class_uid=sop_class or str(ds.get("SOPClassUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", path.stem)),
            received=path.stat().st_mtime,
            recovered=True,
        )

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop (nothing to do if never started)."""
        if self._thread.ident is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted so far has been processed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    # -- the thread --------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic() + self._tick_s
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
                got = False
            else:
                got = True
            try:
                if got and item is None:
                    self.tick(time.time())
                    return
                if item is not None:
                    self._process(item)
                if time.monotonic() >= next_tick:
                    self.tick(time.time())
                    next_tick = time.monotonic() + self._tick_s
            except Exception:
                self._log.exception("ingest step failed; continuing")
            finally:
                if got:
                    self._queue.task_done()

    def _track_series(
        self, uid: str, item: Received, ds: Dataset | LeanDataset, selection: Selection
    ) -> None:
        """Register a new series (logged once), and note that it was seen now."""
        state = self._series.get(uid)
        if state is None:
            state = _SeriesState(str(ds.get("StudyInstanceUID", "")), selection, item.received)
            self._series[uid] = state
            if selection.reference:
                event = "new series: a motion reference (SBRef), not analysed"
            elif selection.analyse:
                event = "new series"
            else:
                event = "new series: spooled only, not analysed"
            self._log.info(
                event,
                series=uid,
                description=str(ds.get("SeriesDescription", "")),
                reason=selection.reason,
            )
        state.last_seen = max(state.last_seen, time.time())

    def _selection(self, uid: str, item: Received, ds: Dataset | LeanDataset) -> Selection:
        state = self._series.get(uid)
        if state is not None:
            return state.selection
        return self._selector.decide(ds, item.sop_class_uid)

    @staticmethod
    def _read(item: Received) -> Dataset | LeanDataset:
        """The instance's elements: read from its bytes without pydicom when the
        lean reader reads them exactly (receiver/lean.py), else pydicom's Dataset."""
        if item.decoded is None and item.encoded:
            lean = read_lean(item.encoded)
            if lean is not None:
                return lean
        return item.dataset

    def _wait_durable(self, item: Received) -> bool:
        """Whether the instance is new and in the spool (the handler may still be writing)."""
        waited = 0.0
        while True:
            stored = item.durable.wait(self.slow_write_s)
            if stored is not None:
                return stored
            waited += self.slow_write_s
            self._log.warning(
                "spool write still under way; assembly waits for it",
                path=str(item.path),
                waited_s=waited,
            )

    @property
    def on_arrival(self) -> bool:
        """Instances join their volumes before their durable write has ended
        (``receiver.assemble = "on_arrival"``)."""
        return self.settings.receiver.assemble == "on_arrival"

    def _process(self, item: Received) -> None:
        begun = self.begin(item)
        if not self.on_arrival:
            self.finish(begun, self._wait_durable(item))
            return
        self.finish(begun, True)
        path = item.path

        def check(stored: bool) -> None:  # in the handler's thread, when its write ends
            if not stored:
                warn_not_stored_after_all(self._log, path)

        if not item.durable.when_resolved(check):
            check(item.durable.wait(0) is True)

    def begin(self, item: Received) -> Begun:
        """The work that may precede the instance's durable write: read and decode.

        Runs while the handler's write of the same instance is under way; the
        instance becomes part of a volume only in :meth:`finish`, once the
        write's verdict is known. The ingest thread calls both in turn; the
        ingest process calls them as the instance and its verdict arrive.
        """
        try:
            ds = self._read(item)
            uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as exc:  # the handler walked it, so pydicom should read it
            return Begun(item, unreadable=exc)
        selection = self._selection(uid, item, ds)
        begun = Begun(item, ds=ds, uid=uid, selection=selection)
        if selection.analyse:
            with structlog.contextvars.bound_contextvars(series=uid):
                try:
                    begun.fragments = decode_instance(ds, assembly=self.settings.assembly)
                except DicomInputError as exc:
                    begun.problem = exc
                if selection.reference:
                    begun.fragments = [
                        replace(f, series=replace(f.series, reference=True))
                        for f in begun.fragments
                    ]
                begun.prepared = self._assembler.prepare(begun.fragments)
        return begun

    def finish(self, begun: Begun, stored: bool) -> None:
        """Count and assemble an instance whose durable write ended (``stored``:
        new and in the spool; False: refused to the scanner, or a duplicate,
        which the handler logged)."""
        if not stored:
            return
        item = begun.item
        self.stats.instances += 1
        if begun.unreadable is not None or begun.ds is None or begun.selection is None:
            self.stats.undecodable += 1
            self._log.error(
                "instance stored but cannot be read",
                path=str(item.path),
                error=str(begun.unreadable),
            )
            return
        with structlog.contextvars.bound_contextvars(series=begun.uid):
            self._track_series(begun.uid, item, begun.ds, begun.selection)
            if not begun.selection.analyse:
                self.stats.skipped += 1
                return
            try:
                if begun.problem is not None:
                    raise begun.problem
                events = self._assembler.add(
                    begun.fragments, received=item.received, prepared=begun.prepared
                )
            except DicomInputError as exc:
                self.stats.undecodable += 1
                self._log.warning(
                    "instance stored but cannot be assembled",
                    path=str(item.path),
                    reason=str(exc),
                )
                return
            self._dispatch(events)

    def tick(self, now: float) -> None:
        """Report volumes that will not complete, and close idle series
        (every ``tick_s`` on the ingest thread; the ingest process calls it)."""
        self._dispatch(self._assembler.expire(now))
        idle_after = self.settings.assembly.series_idle_timeout_s
        for uid, state in list(self._series.items()):
            if now - state.last_seen > idle_after:
                self.spool.close_series(state.study_uid, uid)
                del self._series[uid]
                self._log.info("series closed after idle timeout", series=uid)

    def _dispatch(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Volume):
                self.stats.volumes += 1
            elif isinstance(event, VolumeIncomplete):
                self.stats.incomplete += 1
                self._log.warning(
                    "volume incomplete: will not be waited for",
                    series=event.series.series_uid,
                    volume=event.index,
                    slices_received=event.slices_received,
                    slices_expected=event.slices_expected,
                    reason=event.reason,
                )
            try:
                self._emit(event)
            except Exception:
                self._log.exception("volume consumer failed")


def warn_not_stored_after_all(log: Any, path: Path) -> None:
    """The write of an instance already handed to assembly (``on_arrival``) did
    not store it: refused to the scanner, or a copy of it got there first.

    Logged where the write's verdict is known: the handler's thread, for the
    ingest thread and the ingest process alike.
    """
    log.warning(
        "instance handed to assembly on arrival, but its spool write did not store it "
        "(refused to the scanner, or a copy already there)",
        path=str(path),
    )
