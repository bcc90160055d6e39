"""The simulated scanner's network side: C-STORE a run, paced like a scanner.

Volumes are encoded as they are due (a run is never all in memory) and sent
over one or several associations. Volume ``t`` is released at
``t * TR / pace`` after the start (``pace=None``: as fast as possible). When
paced, the next volume is built only once the current one has been answered
(if that still leaves time to build it before it is due): a scanner
reconstructs on hardware of its own, but this simulator builds volumes on the
cores the receiver runs on, and building one while the receiver handles the
last would measure the simulator, not boldstream. For
receiver tests the sender can misbehave like real consoles and networks do:
shuffle the slices of a volume, send some instances twice, or drop some. Like
a multiband sequence, it can send a single-band reference (SBRef) series
first (``SendOptions.sbref``).

:func:`write_run` writes the same instances to a folder instead, for DCMTK's
``storescu`` to send.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from boldstream.simulator.encode import (
    ENCODINGS,
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    Encoding,
    SeriesSpec,
    encode_series_enhanced,
    encode_volume,
)
from boldstream.simulator.phantom import PhantomRun, SimulatorError

__all__ = [
    "SendOptions",
    "SendReport",
    "associate",
    "iter_instances",
    "sbref_spec",
    "send_run",
    "store_instance",
    "write_run",
]


@dataclass(frozen=True)
class SendOptions:
    encoding: Encoding = "mosaic"
    #: Speed factor over real time (1.0: one volume per TR); None: as fast as possible.
    pace: float | None = None
    calling_aet: str = "SIMSCANNER"
    called_aet: str = "BOLDSTREAM"
    associations: int = 1
    #: Send the slices of each volume in a random order (per-slice encoding).
    shuffle: bool = False
    #: Send this fraction of instances a second time.
    duplicate_fraction: float = 0.0
    #: (volume, instance-within-volume) pairs never sent.
    drop: frozenset[tuple[int, int]] = frozenset()
    seed: int = 0
    #: Series header values; a fresh series when None.
    spec: SeriesSpec | None = None
    #: Send a single-band reference series first, as multiband (CMRR)
    #: sequences do: one volume, SeriesDescription + "_SBRef", the series
    #: number one lower, same grid, a quarter brighter (no multiband g-factor).
    sbref: bool = False
    timeout_s: float = 30.0


@dataclass
class SendReport:
    instances: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    series_uid: str = ""

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 0)


def _check(options: SendOptions) -> None:
    """Refuse options that would fail later with a less readable error."""
    if options.encoding not in ENCODINGS:
        raise SimulatorError(
            f"encoding must be one of {', '.join(ENCODINGS)}, not {options.encoding!r}"
        )
    if options.associations < 1:
        raise SimulatorError("associations must be at least 1")
    if options.pace is not None and not options.pace > 0:
        raise SimulatorError(f"pace must be a positive speed factor or None, not {options.pace}")
    if not 0.0 <= options.duplicate_fraction <= 1.0:
        raise SimulatorError(
            f"duplicate_fraction must be in [0, 1], not {options.duplicate_fraction}"
        )


def _spec_for(run: PhantomRun, options: SendOptions) -> SeriesSpec:
    return options.spec or SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)


def sbref_spec(spec: SeriesSpec) -> SeriesSpec:
    """The header of the single-band reference series sent before ``spec``'s."""
    return replace(
        spec,
        n_volumes=1,
        series_description=f"{spec.series_description}_SBRef",
        series_number=spec.series_number - 1,
        series_uid=generate_uid(),
        start_time_s=spec.start_time_s - spec.tr_s,
    )


def iter_instances(run: PhantomRun, options: SendOptions) -> Iterator[tuple[int, list[Dataset]]]:
    """(volume index, instances to send for it), misbehaviour included; with
    ``options.sbref`` first (-1, the single-band reference series' instances)."""
    spec = _spec_for(run, options)
    rng = random.Random(options.seed)
    if options.sbref:
        encoding = "enhanced" if options.encoding == "enhanced-series" else options.encoding
        sbref = np.asarray(run.volume(0), dtype=np.float64) * 1.25
        yield -1, encode_volume(sbref, run.vox2ras, sbref_spec(spec), 0, encoding=encoding)
    if options.encoding == "enhanced-series":
        yield run.n_volumes - 1, [encode_series_enhanced(run.iter_volumes(), run.vox2ras, spec)]
        return
    for t in range(run.n_volumes):
        instances = encode_volume(run.volume(t), run.vox2ras, spec, t, encoding=options.encoding)
        chosen = [ds for i, ds in enumerate(instances) if (t, i) not in options.drop]
        if options.shuffle:
            rng.shuffle(chosen)
        extra = [ds for ds in chosen if rng.random() < options.duplicate_fraction]
        yield t, chosen + extra


class _Answered:
    """How many instances the sending threads are done with (answered or given up)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def add(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once ``count`` instances are done; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= count, timeout)


class _TrackedCheckpoint:
    """pynetdicom's reactor checkpoint (an Event), able to tell when the reactor is parked.

    A requestor's ``send_c_store`` pauses the association's reactor thread by
    clearing this event and waiting for ``_is_paused``; but the reactor sets
    ``_is_paused`` just *before* calling ``wait()``, so the sender can see it
    while the reactor is about to run one more loop, in which it takes the
    C-STORE response off the queue ("Received unexpected C-STORE service
    message") and the sender waits out its DIMSE timeout (pydicom/pynetdicom
    #850). Counting the threads really blocked in ``wait()`` on a cleared
    event closes that window.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag = True
        self._parked = 0

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._flag:
                self._parked += 1
                try:
                    self._cond.wait_for(lambda: self._flag, timeout)
                finally:
                    self._parked -= 1
            return self._flag

    def park_reactor(self, timeout: float) -> bool:
        """Clear, then wait until the reactor blocks here; True if it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flag = False
        while time.monotonic() < deadline:
            with self._cond:
                if self._parked:
                    return True
            time.sleep(0.0002)
        return False


def store_instance(assoc: Any, ds: Dataset, timeout_s: float) -> Any:
    """``send_c_store`` with the reactor parked first (see :class:`_TrackedCheckpoint`).

    ``assoc`` must come from :func:`associate`.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(checkpoint, _TrackedCheckpoint) and not checkpoint.park_reactor(timeout_s):
        raise SimulatorError("the association's reactor did not pause (association lost?)")
    return assoc.send_c_store(ds)


def associate(host: str, port: int, options: SendOptions) -> Any:
    """An established association for :func:`store_instance` (SimulatorError if not)."""
    ae = AE(ae_title=options.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = options.timeout_s
    for sop in (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE):
        ae.add_requested_context(sop)
    assoc = ae.associate(host, port, ae_title=options.called_aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SimulatorError(
            f"cannot associate with {options.called_aet} at {host}:{port} ({why}); "
            "is boldstream serve running there, and is our AE title allowed?"
        )
    if hasattr(getattr(assoc, "_reactor_checkpoint", None), "wait"):
        # The reactor reads the attribute on every loop, so it moves to this one.
        setattr(assoc, "_reactor_checkpoint", _TrackedCheckpoint())  # noqa: B010 (typed as Event)
    return assoc


def send_run(run: PhantomRun, host: str, port: int, options: SendOptions) -> SendReport:
    """Send ``run`` over C-STORE; returns counts per DIMSE status.

    Raises :class:`SimulatorError` when an association cannot be made or a
    C-STORE gets no answer at all.
    """
    _check(options)
    # One spec for the whole send: a fresh one per call would give the report
    # another series UID than the instances carry.
    spec = _spec_for(run, options)
    report = SendReport(series_uid=spec.series_uid)
    options = SendOptions(**{**options.__dict__, "spec": spec})
    work: queue.Queue[Dataset | None] = queue.Queue(maxsize=4 * max(1, options.associations) * 64)
    lock = threading.Lock()
    errors: list[BaseException] = []
    answered = _Answered()

    def worker() -> None:
        try:
            assoc = associate(host, port, options)
        except BaseException as exc:
            errors.append(exc)
            while work.get() is not None:  # keep the producer unblocked
                pass
            return
        try:
            while (ds := work.get()) is not None:
                try:
                    status = store_instance(assoc, ds, options.timeout_s)
                finally:
                    answered.add()
                code = int(getattr(status, "Status", -1)) if status else -1
                with lock:
                    report.instances += 1
                    report.statuses[code] += 1
                if code == -1:
                    raise SimulatorError(
                        f"no C-STORE response from {host}:{port} (association lost)"
                    )
        except BaseException as exc:
            errors.append(exc)
            while work.get() is not None:
                pass
        finally:
            if assoc.is_established:
                assoc.release()

    threads = [
        threading.Thread(target=worker, name=f"sim-assoc-{i}", daemon=True)
        for i in range(options.associations)
    ]
    for th in threads:
        th.start()
    period = None if options.pace is None else run.tr_s / options.pace
    start = time.monotonic()
    queued = 0
    build_s = 0.0  # how long the last volume took to build
    try:
        volumes = iter_instances(run, options)
        while True:
            began = time.monotonic()
            item = next(volumes, None)
            if item is None:
                break
            build_s = time.monotonic() - began
            t, instances = item
            if period is not None:
                delay = start + t * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            for ds in instances:
                work.put(ds)
            queued += len(instances)
            if errors:
                break
            if period is not None:
                # See the module docstring: build the next volume once this one is
                # answered, unless waiting longer would make the next one late.
                latest = start + (t + 1) * period - 1.5 * build_s
                answered.wait_for(queued, max(0.0, latest - time.monotonic()))
    finally:
        for _ in threads:
            work.put(None)
        for th in threads:
            th.join()
    report.elapsed_s = time.monotonic() - start
    if errors:
        err = errors[0]
        if isinstance(err, SimulatorError):
            raise err
        raise SimulatorError(f"sending failed: {type(err).__name__}: {err}") from err
    return report


def write_run(
    run: PhantomRun, folder: Path, options: SendOptions, *, truth: bool = True
) -> list[Path]:
    """Write the instances :func:`send_run` would send, in sending order.

    Files are named ``NNNNNN.dcm`` in that order (``storescu`` sends its
    arguments in order). ``truth.json`` goes beside them.
    """
    _check(options)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _spec_for(run, options)
    options = SendOptions(**{**options.__dict__, "spec": spec})
    paths: list[Path] = []
    for _, instances in iter_instances(run, options):
        for ds in instances:
            path = folder / f"{len(paths):06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    if truth:
        meta = {"series_uid": spec.series_uid, "study_uid": spec.study_uid, **run.truth}
        (folder / "truth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths
