"""``boldstream serve``: run the DICOM listener and the pipeline until stopped.

Wiring: the receiver's ingest (a child process by default, ``receiver.ingest``)
hands every assembled volume (and every volume given up on) to
:meth:`Pipeline.submit`; the pipeline orders them per
series, corrects motion, computes QC and publishes the results on its XPUB
endpoint (``pipeline.pub``), with a snapshot endpoint for late joiners
(``pipeline.snapshot``). The analysis stages run as supervised processes
(``pipeline.mode = "process"``, the default: on 2 cores motion, QC and the
receiver's own Python work then do not share one interpreter lock) or as
threads (``--set pipeline.mode=thread``).

Beside the pipeline, in this process (:mod:`boldstream.outputs`): the
dashboard (``[dashboard]``, subscribed to the result publisher), the files
(``[outputs]``: BIDS derivatives, fed every message of the pipeline's hub
including the corrected volumes, on a thread of their own) and, when
``pacs.host`` is set, the target sent back to PACS (on another thread).

Start order: the receiver first (a port already in use fails at once), then
the pipeline and its outputs; the ready line (``boldstream listening on
HOST:PORT``) is printed once they all run, then ``dashboard on URL``. Stop
order (SIGTERM, Ctrl-C): the receiver stops listening and drains what it
accepted into the pipeline; every series it fed ends (``series-end``, reason
``shutdown``: its files are finished, its target sent); the pipeline publishes
what it holds (bounded wait) and stops its stages; the outputs write what is
queued and close; the dashboard stops last.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from typing import Any

from boldstream.config import Settings, load_settings
from boldstream.logs import configure_logging, get_logger
from boldstream.outputs import FilesOutput, PacsExport, outputs_dir, start_dashboard
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.ingest import Emitted
from boldstream.receiver.service import Receiver
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.sinks.dashboard import Dashboard
from boldstream.stream.messages import SeriesEnd, series_key

__all__ = [
    "add_settings_arguments",
    "register",
    "run",
    "settings_from_args",
]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every long-running command shares: the config file and overrides."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="settings file (see docs/configuration.md); environment variables "
        "BOLDSTREAM_<SECTION>__<KEY> and --set override it",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set assembly.volume_timeout_s=5 (repeatable)",
    )


def settings_from_args(args: argparse.Namespace, **receiver: Any) -> Settings:
    """Defaults < TOML < environment < --set < the command's own flags."""
    overrides: list[Any] = list(args.overrides)
    flags = {k: v for k, v in receiver.items() if v is not None}
    if flags:
        overrides.append({"receiver": flags})
    return load_settings(args.config, overrides=overrides)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the DICOM Storage SCP and the real-time pipeline",
        description="Listen for DICOM C-STORE/C-ECHO from the scanner, spool every instance "
        "durably, assemble volumes and process them until interrupted (Ctrl-C / SIGTERM).",
    )
    add_settings_arguments(p)
    p.add_argument("--port", type=int, help="TCP port to listen on (receiver.port; 0: any free)")
    p.add_argument("--bind", help="address to listen on (receiver.bind, default 127.0.0.1)")
    p.add_argument("--ae-title", help="our AE title (receiver.ae_title, default BOLDSTREAM)")
    p.add_argument("--spool", type=Path, help="spool folder (receiver.spool_dir)")
    p.set_defaults(func=run)


def _emit_to(pipeline: Pipeline, log: Any, fed: dict[tuple[str, str], SeriesInfo]) -> Any:
    """The receiver's ``emit``: log each volume, hand it to the pipeline.

    ``fed`` collects the series handed over, to end them when serve stops.
    """

    def emit(event: Emitted) -> None:
        if isinstance(event, Volume):
            log.info(
                "volume assembled",
                series=event.series.series_uid,
                volume=event.index,
                shape=list(event.shape),
                assembly_ms=round((event.assembled - event.last_received) * 1000, 2),
            )
        fed.setdefault(series_key(event.series), event.series)
        pipeline.submit(event)

    return emit


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(
        args, port=args.port, bind=args.bind, ae_title=args.ae_title, spool_dir=args.spool
    )
    configure_logging(level=settings.logging.level, json=settings.logging.json_output)
    log = get_logger("serve")
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    fed: dict[tuple[str, str], SeriesInfo] = {}
    pipeline = Pipeline(settings)
    files = FilesOutput(outputs_dir(settings), settings.outputs)
    pipeline.add_consumer(files.consumer)
    pacs: PacsExport | None = None
    if settings.pacs.host:
        pacs = PacsExport(settings.pacs, settings.receiver.spool_dir)
        pipeline.add_consumer(pacs.consumer)
    receiver = Receiver(
        settings,
        _emit_to(pipeline, log, fed),
        on_ingest_down=lambda text: pipeline.warn(text, "ingest-down"),
        on_refused=lambda text: pipeline.warn(text, "spool-refused"),
    )
    receiver.start()
    dashboard: Dashboard | None = None
    try:
        files.start()
        if pacs is not None:
            pacs.start()
        pipeline.start()
        if settings.dashboard.enabled:
            dashboard = start_dashboard(pipeline, settings.dashboard)
        log.info(
            "outputs started",
            files=str(files.out_dir),
            dashboard=None if dashboard is None else dashboard.url,
            pacs=None if pacs is None else pacs.where,
        )
        # Machine-readable lines that scripts and tests can wait for.
        print(f"boldstream listening on {settings.receiver.bind}:{receiver.port}", flush=True)
        if dashboard is not None:
            print(f"dashboard on {dashboard.url}", flush=True)
        stop.wait()
    finally:
        receiver.stop()
        if pipeline.started:
            # Every series fed ends now: its files are finished, its target sent.
            for info in fed.values():
                pipeline.submit(SeriesEnd(info, ended=time.time(), reason="shutdown"))
        pipeline.stop()
        files.stop()
        if pacs is not None:
            pacs.stop()
        if dashboard is not None:
            dashboard.stop()
    return 0
