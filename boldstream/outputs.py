"""What a live pipeline feeds in this process: the dashboard, the files, the PACS export.

``serve`` wires all three beside the :class:`~boldstream.pipeline.service.Pipeline`
(``demo`` the dashboard only), each on threads of its own so that the
pipeline's hub never waits on a disk, a browser or a PACS:

- :func:`start_dashboard`: the :class:`~boldstream.sinks.dashboard.Dashboard`
  subscribed to the pipeline's result publisher (``[dashboard]`` settings).
- :class:`FilesOutput`: the :class:`~boldstream.sinks.bids.BidsSink`
  (``[outputs]``), fed through :meth:`Pipeline.add_consumer` with every
  message the hub publishes plus the internal corrected volumes, which are
  never published. A series' files are finished at its ``series-end`` (gzip
  included, on the files thread); :meth:`FilesOutput.stop` finishes any
  series still open and closes the files.
- :class:`PacsExport`: the target map and marker sent back by C-STORE
  (``[pacs]``), once per series, at its end or when the target is first
  stable. The patient and study attributes come from the first instance of
  the source series in this host's spool: they never travel on the streams.

Each consumer is a :class:`Worker`: the hub only appends to an unbounded
queue (no message may be lost; a volume is a few hundred kB) and a thread
takes them in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pydicom
import zmq
from pydicom.errors import InvalidDicomError

from boldstream.config.settings import (
    DashboardSettings,
    OutputsSettings,
    PacsSettings,
    Settings,
)
from boldstream.errors import BoldstreamError, SinkError
from boldstream.logs import get_logger
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.spool import check_uid
from boldstream.receiver.volume import SeriesInfo, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.sinks.bids import BidsSink
from boldstream.sinks.dashboard import Dashboard
from boldstream.sinks.dashboard.app import read_token_file
from boldstream.sinks.pacs import PacsPeer, SourceStudy, send_target
from boldstream.stream.messages import Message, Result, SeriesEnd, series_key

__all__ = [
    "FilesOutput",
    "PacsExport",
    "Worker",
    "outputs_dir",
    "source_study",
    "start_dashboard",
]

log = get_logger("outputs")

_STOP: Final = object()


def pipeline_metrics(health: dict[str, Any]) -> str:
    """Prometheus text for :meth:`Pipeline.health`: per stage alive, restarts, lag."""
    lines = [
        "# HELP boldstream_pipeline_stage_up 1 while the stage answers its health probe.",
        "# TYPE boldstream_pipeline_stage_up gauge",
    ]
    lag_lines = [
        "# HELP boldstream_pipeline_stage_lag_seconds Age of the newest volume the stage "
        "handled, at its last message.",
        "# TYPE boldstream_pipeline_stage_lag_seconds gauge",
    ]
    restart_lines = [
        "# HELP boldstream_pipeline_stage_restarts_total Times the supervisor restarted the stage.",
        "# TYPE boldstream_pipeline_stage_restarts_total counter",
    ]
    for stage in health.get("stages", []):
        label = f'{{stage="{stage.get("name", "?")}"}}'
        lines.append(f"boldstream_pipeline_stage_up{label} {1 if stage.get('alive') else 0}")
        restart_lines.append(
            f"boldstream_pipeline_stage_restarts_total{label} {int(stage.get('restarts', 0))}"
        )
        lag = stage.get("lag_s")
        if isinstance(lag, int | float):
            lag_lines.append(f"boldstream_pipeline_stage_lag_seconds{label} {float(lag)!r}")
    return "\n".join([*lines, *lag_lines, *restart_lines]) + "\n"


def start_dashboard(
    pipeline: Pipeline,
    settings: DashboardSettings,
    *,
    context: zmq.Context[Any] | None = None,
) -> Dashboard:
    """Start the dashboard on ``settings.host``:``settings.port`` for ``pipeline``'s results.

    With ``token_file`` every request but ``/healthz`` needs its token; with
    CurveZMQ on the result stream, the dashboard subscribes with the
    pipeline's client keys.
    """
    token = None if settings.token_file is None else read_token_file(settings.token_file)
    dashboard = Dashboard(
        pipeline.pub_endpoint,
        host=settings.host,
        port=settings.port,
        allowed_hosts=settings.allowed_hosts,
        context=context,
        token=token,
        curve=pipeline.subscriber_curve(),
        extra_metrics=lambda: pipeline_metrics(pipeline.health(timeout=0.5)),
    )
    dashboard.start()
    return dashboard


class Worker:
    """A thread that takes messages from an unbounded queue and handles them in order.

    :meth:`put` is the pipeline consumer: it only enqueues. ``finish`` runs on
    the worker thread after the last message, when :meth:`stop` is called.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[Message], None],
        *,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._handle = handle
        self._finish = finish
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Handle what is queued, run ``finish``, stop; False if that took over ``timeout``."""
        if not self._thread.is_alive():
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("output did not finish in time", output=self.name, timeout_s=timeout)
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                self._handle(item)
            except Exception:
                log.exception("output failed on a message", output=self.name, topic=item.topic)
        if self._finish is not None:
            try:
                self._finish()
            except Exception:
                log.exception("output failed to finish", output=self.name)


# --------------------------------------------------------------------------- files


def outputs_dir(settings: Settings) -> Path:
    """``outputs.dir``, or ``derivatives`` beside the spool folder when unset."""
    if settings.outputs.dir is not None:
        return settings.outputs.dir
    return settings.receiver.spool_dir.absolute().parent / "derivatives"


class FilesOutput:
    """The BIDS-derivatives files of every series, written on a thread of their own.

    ``consumer`` goes to :meth:`Pipeline.add_consumer`. Missing volumes are
    taken from the ordered ``gap`` messages (a ``volume-missing`` is published
    as soon as the receiver gives up, before the QC of the volumes ahead of
    it, so it would write their rows too early).
    """

    def __init__(self, out_dir: Path, settings: OutputsSettings, *, durable: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.sink = BidsSink(
            self.out_dir,
            subject=settings.subject or None,
            task=settings.task,
            exports=settings.exports,
            durable=durable,
        )
        self._series: dict[tuple[str, str], SeriesInfo] = {}
        self.worker = Worker("outputs-files", self._handle, finish=self._finish_all)

    @property
    def consumer(self) -> Callable[[Message], None]:
        return self.worker.put

    def start(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create the outputs folder {self.out_dir}: {exc}") from None
        self.worker.start()

    def stop(self, *, timeout: float = 120.0) -> bool:
        """Write what is queued, finish every open series, close the files."""
        return self.worker.stop(timeout)

    def _handle(self, message: Message) -> None:
        series = message.series
        if series is None or isinstance(message.payload, VolumeIncomplete):
            return
        self._series.setdefault(series_key(series), series)
        self.sink.handle(message)

    def _finish_all(self) -> None:
        try:
            for info in self._series.values():
                if not self.sink.finished(info):
                    self.sink.finish(info)
        finally:
            self.sink.close()


# --------------------------------------------------------------------------- PACS


def source_study(spool_dir: Path, series: SeriesInfo) -> SourceStudy | None:
    """Study attributes from the first spooled instance of ``series`` (None if none)."""
    try:
        folder = (
            spool_dir
            / check_uid(series.study_uid, "study")
            / check_uid(series.series_uid, "series")
        )
    except BoldstreamError:
        return None
    try:
        files = sorted((f.stat().st_mtime_ns, f.name, f) for f in folder.glob("*.dcm"))
    except OSError:
        return None
    for _, _, path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return SourceStudy.from_dataset(ds)
        except (OSError, SinkError, InvalidDicomError):
            continue
    return None


class PacsExport:
    """Sends each series' target to the PACS once, on a thread of its own.

    ``when="series-end"``: the last ``target`` of a series is sent when its
    ``series-end`` comes. ``when="stable"``: the first ``target`` whose status
    is ``stable`` is sent at once. A failed send is logged, not retried.
    """

    def __init__(self, settings: PacsSettings, spool_dir: Path) -> None:
        self.peer = PacsPeer(
            settings.host,
            settings.port,
            settings.called_ae,
            calling_ae=settings.calling_ae,
            timeout_s=settings.timeout_s,
        )
        self.when = settings.when
        self.where = f"{settings.called_ae}@{settings.host}:{settings.port}"
        self.spool_dir = Path(spool_dir)
        self.sent: dict[tuple[str, str], str] = {}
        self._latest: dict[tuple[str, str], Result] = {}
        self.worker = Worker("outputs-pacs", self._handle)

    @property
    def consumer(self) -> Callable[[Message], None]:
        return self.worker.put

    def start(self) -> None:
        self.worker.start()

    def stop(self, *, timeout: float | None = None) -> bool:
        """Send what is due (a series that just ended), then stop."""
        return self.worker.stop(timeout if timeout is not None else 4 * self.peer.timeout_s)

    def _handle(self, message: Message) -> None:
        p = message.payload
        series = message.series
        if series is None:
            return
        key = series_key(series)
        if key in self.sent:
            return
        if isinstance(p, Result) and p.topic == topics.TARGET:
            self._latest[key] = p
            if self.when == "stable" and p.values.get("status") == "stable":
                self._send(key, p)
        elif isinstance(p, SeriesEnd):
            latest = self._latest.pop(key, None)
            if self.when == "series-end" and latest is not None:
                self._send(key, latest)

    def _send(self, key: tuple[str, str], target: Result) -> None:
        self._latest.pop(key, None)
        assert target.series is not None
        source = source_study(self.spool_dir, target.series)
        if source is None:
            log.warning(
                "no spooled instance of the source series: sending without patient attributes",
                series=target.series.series_uid,
            )
        try:
            sent = send_target(target, self.peer, source=source)
        except SinkError as exc:
            self.sent[key] = "failed"
            log.error("target not sent to PACS", peer=self.where, error=str(exc))
            return
        self.sent[key] = target.values.get("status", "")
        log.info(
            "series target exported to PACS",
            peer=self.where,
            series=target.series.series_uid,
            status=target.values.get("status"),
            instances=sent.instances,
        )
