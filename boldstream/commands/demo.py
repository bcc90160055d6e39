"""``boldstream demo``: a simulated scanner sends a run to a live boldstream.

Everything runs in this process and on 127.0.0.1: the receiver (DICOM
Storage SCP on a free port), the pipeline (motion, QC), the dashboard, and
the simulated scanner sending the built-in phantom run over C-STORE. One line
per volume is printed as its QC result is published, then a summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from boldstream.commands.serve import add_settings_arguments
from boldstream.config import load_settings
from boldstream.errors import BoldstreamError
from boldstream.logs import configure_logging
from boldstream.outputs import start_dashboard
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.service import Receiver
from boldstream.receiver.volume import VolumeIncomplete
from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, send_run
from boldstream.sinks import topics
from boldstream.sinks.dashboard import Dashboard
from boldstream.stream.messages import Result
from boldstream.stream.pubsub import Subscriber

__all__ = ["parse_matrix", "parse_pace", "register", "run"]


def parse_matrix(text: str) -> tuple[int, int, int]:
    try:
        i, j, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a matrix is written like 64x64x36") from None
    if min(i, j, k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be positive")
    return (i, j, k)


def parse_pace(text: str) -> float | None:
    """'fast' -> None, 'realtime' -> 1.0, a number -> that speed factor."""
    if text == "fast":
        return None
    if text == "realtime":
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use fast, realtime or a speed factor"
        ) from None
    if factor <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the speed factor must be positive")
    return factor


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a simulated scanner against a live boldstream (with the dashboard)",
        description="Start a live boldstream on 127.0.0.1 (receiver, pipeline, dashboard) and "
        "send it the built-in phantom run over DICOM, as a scanner would. Prints one line "
        "per volume as its QC is published, and a summary.",
    )
    add_settings_arguments(p)
    p.add_argument("--volumes", type=int, default=60, help="volumes to send (default 60)")
    p.add_argument("--tr", type=float, default=2.0, help="repetition time in s (default 2.0)")
    p.add_argument(
        "--matrix", type=parse_matrix, default=(64, 64, 36), help="EPI matrix (default 64x64x36)"
    )
    p.add_argument("--voxel", type=float, default=3.0, help="voxel size in mm (default 3.0)")
    p.add_argument(
        "--encoding",
        choices=("mosaic", "slice", "enhanced"),
        default="mosaic",
        help="how the scanner encodes volumes (default mosaic)",
    )
    p.add_argument(
        "--motion",
        choices=("none", "mild", "heavy"),
        default="mild",
        help="simulated head motion (default mild)",
    )
    p.add_argument(
        "--pace",
        type=parse_pace,
        default=10.0,
        metavar="fast|realtime|FACTOR",
        help="send speed: as fast as possible, at the TR, or FACTOR times real time (default 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="phantom random seed")
    p.add_argument("--spool", type=Path, help="spool folder (default: a temporary folder)")
    p.add_argument(
        "--dashboard-port", type=int, default=0, help="dashboard port on 127.0.0.1 (default: any)"
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="keep boldstream and the dashboard running after the run until Ctrl-C",
    )
    p.set_defaults(func=run)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


class _Printer:
    """Prints one line per published QC result; collects latencies."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, n_volumes: int) -> None:
        self.latencies: list[float] = []
        self.missing: list[int] = []
        self.done = threading.Event()
        self._n = n_volumes
        self._sub = Subscriber(context, endpoint, topics=(topics.QC, topics.VOLUME_MISSING))
        self._thread = threading.Thread(target=self._run, name="demo-printer", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.recv(timeout_ms=200)
            if msg is None:
                continue
            p = msg.payload
            if isinstance(p, VolumeIncomplete):
                self.missing.append(p.index)
                print(f"vol {p.index:4d}  MISSING ({p.reason or 'incomplete'})", flush=True)
            elif isinstance(p, Result) and p.topic == topics.QC and p.index is not None:
                v = p.values
                usable = v.get("usable") or {}
                good = next(
                    (t for t in usable.get("thresholds", []) if t["fd_threshold_mm"] == 0.3), None
                )
                latency = v.get(topics.QC_LATENCY_MS)
                if latency is not None:
                    self.latencies.append(float(latency))
                print(
                    f"vol {p.index:4d}  FD {_fmt(v.get('fd_mm'), '5.2f')} mm  "
                    f"DVARS {_fmt(v.get('dvars'), '6.1f')}  "
                    f"tSNR {_fmt(v.get('tsnr_median'), '5.1f')}  "
                    f"good(FD<0.3) {_fmt(good and good['minutes'], '4.1f')} min  "
                    f"latency {_fmt(latency, '6.1f')} ms"
                    + ("  OUTLIER" if v.get("outlier") else ""),
                    flush=True,
                )
            if len(self.latencies) + len(self.missing) >= self._n:
                self.done.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()


def run(args: argparse.Namespace) -> int:
    if args.volumes < 2:
        raise BoldstreamError("--volumes must be at least 2")
    spool_tmp = None if args.spool else tempfile.TemporaryDirectory(prefix="boldstream-demo-")
    spool = args.spool or Path(spool_tmp.name) / "spool"  # type: ignore[union-attr]
    settings = load_settings(
        args.config,
        overrides=[
            # Free ports only: the demo must run beside a real `boldstream serve`.
            {"pipeline": {"pub": "tcp://127.0.0.1:*", "snapshot": "tcp://127.0.0.1:*"}},
            *args.overrides,
            {"receiver": {"port": 0, "spool_dir": str(spool)}},
            {"dashboard": {"host": "127.0.0.1", "port": args.dashboard_port}},
        ],
    )
    configure_logging(level="warning", json=False)
    context: zmq.Context[Any] = zmq.Context()
    print("boldstream demo: building the phantom run ...", flush=True)
    phantom = make_phantom_run(
        n_volumes=args.volumes,
        tr_s=args.tr,
        shape=args.matrix,
        voxel_mm=args.voxel,
        motion=args.motion,
        seed=args.seed,
    )
    pipeline = Pipeline(settings, context=context)
    receiver = Receiver(
        settings,
        pipeline.submit,
        on_ingest_down=lambda text: pipeline.warn(text, "ingest-down"),
        on_refused=lambda text: pipeline.warn(text, "spool-refused"),
    )
    dashboard: Dashboard | None = None
    printer: _Printer | None = None
    try:
        pipeline.start()
        receiver.start()
        dashboard = start_dashboard(pipeline, settings.dashboard, context=context)
        printer = _Printer(context, pipeline.pub_endpoint, args.volumes)
        printer.start()
        print(f"boldstream listening on 127.0.0.1:{receiver.port}", flush=True)
        print(f"dashboard on {dashboard.url}", flush=True)
        pace = "as fast as possible" if args.pace is None else f"{args.pace:g}x real time"
        print(
            f"simulated scanner: {args.volumes} volumes, {args.encoding}, "
            f"{'x'.join(map(str, args.matrix))} at {args.voxel:g} mm, TR {args.tr:g} s, "
            f"motion {args.motion}, sent {pace}",
            flush=True,
        )
        started = time.monotonic()
        report = send_run(
            phantom,
            "127.0.0.1",
            receiver.port,
            SendOptions(
                encoding=args.encoding, pace=args.pace, called_aet=settings.receiver.ae_title
            ),
        )
        # Every volume is accounted for once it is published or reported missing.
        budget = 30.0 + 5.0 * args.tr
        printer.done.wait(budget)
        elapsed = time.monotonic() - started
        lat = sorted(printer.latencies)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None
        print(
            f"\nsummary: sent {report.instances} instances in {elapsed:.1f} s; "
            f"{len(lat)} of {args.volumes} volumes analysed, {len(printer.missing)} missing; "
            f"end-to-end latency median {_fmt(statistics.median(lat) if lat else None, '.1f')} ms, "
            f"p95 {_fmt(p95, '.1f')} ms (TR {args.tr * 1000:.0f} ms)",
            flush=True,
        )
        if args.hold:
            print(f"holding: dashboard on {dashboard.url} (Ctrl-C to stop)", flush=True)
            threading.Event().wait()
        return 0 if len(lat) + len(printer.missing) >= args.volumes else 1
    finally:
        if printer is not None:
            printer.stop()
        if dashboard is not None:
            dashboard.stop()
        receiver.stop()
        pipeline.stop()
        context.term()
        if spool_tmp is not None:
            spool_tmp.cleanup()
