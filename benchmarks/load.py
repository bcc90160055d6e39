"""Load: several scanners at once into a live receiver + pipeline, on loopback.

Each simulated scanner is a process of its own with one DICOM association; it
sends ``--series`` per-slice series one after the other (each gets an equal
share of ``--minutes``; or, with ``--volumes N``, each is a run of N volumes,
stated in its header, and the next starts when it is done), releasing volume
``t`` at ``t * TR / pace`` after the series start and sending as fast as the
receiver answers when it is behind.
It stops at a volume boundary when the time is up, so every volume it counts
as sent had all of its slices acknowledged (status 0x0000).

The receiver (:class:`~boldstream.receiver.service.Receiver`, fsync on, as
``serve`` runs it) and the pipeline (:class:`~boldstream.pipeline.service.Pipeline`,
``mode="process"``: motion and QC in their own processes) run in this
process; a subscriber counts the published results. After the senders stop,
the run waits (at most ``--drain-s``) for every sent volume's ``qc`` result.

Reported: volumes sent / received (``volume-received``) / processed (``qc``),
lost (sent, no ``qc``: must be 0), instances/s asked for and achieved,
how far behind schedule the senders ended, the ``latency_ms`` of the ``qc``
results (last DICOM byte of a volume to its publication) p50/p95/p99, and the
peak RSS (sampled every 0.5 s) of the receiver+hub process, the stage
processes together (motion, QC, connectivity) and the whole service, and the
whole service's median RSS in the second minute of sending against its last
minute (flat or growing).

To keep the senders' CPU small (they share the machine with the service),
each sender encodes ``--templates`` phantom volumes once and re-sends them
in turn with fresh UIDs, instance numbers and times.

    python benchmarks/load.py                      # 4 x 2 series, 90x90x60, 10x, 10 min
    python benchmarks/load.py --minutes 2 --pace 1
    python benchmarks/load.py --minutes 0.5 --shape 40x40x24 --json out.json
    python benchmarks/load.py --volumes 150        # runs of a stated length, back to back
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, table

from boldstream.config import load_settings
from boldstream.logs import configure_logging
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.service import Receiver
from boldstream.sinks import topics
from boldstream.stream.pubsub import Subscriber

# --------------------------------------------------------------------------- a scanner


def _tm(seconds: float) -> str:
    seconds %= 86400.0
    h, rem = divmod(seconds, 3600.0)
    m, s = divmod(rem, 60.0)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def scanner(job: dict[str, Any], results: Any) -> None:
    """One simulated scanner: ``job['series']`` series over one association."""
    from boldstream.simulator.encode import SeriesSpec, encode_volume
    from boldstream.simulator.phantom import SimulatorError, make_phantom_run
    from boldstream.simulator.send import SendOptions, associate, store_instance

    shape = tuple(job["shape"])
    tr, pace, k_templates = job["tr_s"], job["pace"], job["templates"]
    run = make_phantom_run(
        n_volumes=k_templates,
        shape=shape,
        voxel_mm=job["voxel_mm"],
        tr_s=tr,
        motion="mild",
        seed=job["index"],
    )
    # The simulator's requestor: it parks pynetdicom's reactor before each C-STORE,
    # which plain send_c_store does not (pydicom/pynetdicom#850: a response taken
    # off the queue by the reactor, and the association stalls).
    options = SendOptions(calling_aet=f"SCANNER{job['index']}", timeout_s=60.0)
    try:
        assoc = associate("127.0.0.1", job["port"], options)
    except SimulatorError as exc:
        results.put({"scanner": job["index"], "error": f"association refused: {exc}"})
        return
    n_slices = shape[2]
    start_all = job["start"]
    slot = job["duration_s"] / job["series"]
    current: dict[str, Any] | None = None
    try:
        for s in range(job["series"]):
            if job["volumes"]:
                # A run of a stated length (NumberOfTemporalPositions): the
                # pipeline ends it when its last volume is in; the next one
                # starts then. All of them share --minutes.
                n_planned = job["volumes"]
                begin = max(time.time(), start_all)
                end = start_all + job["duration_s"]
            else:
                n_planned = int(slot * pace / tr) + 1
                begin = max(time.time(), start_all + s * slot)
                end = start_all + (s + 1) * slot
            # Short UIDs: instance UIDs append ".volume.slice" and must stay <= 64 characters.
            tag = f"{job['index'] + 1}{s + 1}{time.time_ns() % 10**12}"
            spec = SeriesSpec(
                tr_s=tr,
                n_volumes=n_planned,
                series_number=10 + s,
                series_description="rest",
                series_uid=f"1.2.826.0.1.3680043.8.498.9.{tag}",
            )
            templates = [
                encode_volume(run.volume(t), run.vox2ras, spec, t, encoding="slice")
                for t in range(k_templates)
            ]
            sent_instances, sent_volumes, failed = 0, 0, 0
            lag = 0.0
            t = 0
            report = {"scanner": job["index"], "series_uid": spec.series_uid, "planned": n_planned}
            current = report
            while t < n_planned and time.time() < end:
                due = begin + t * tr / pace
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                ok = True
                for k, ds in enumerate(templates[t % k_templates]):
                    uid = f"{spec.series_uid}.{t + 1}.{k + 1}"
                    ds.SOPInstanceUID = uid
                    ds.file_meta.MediaStorageSOPInstanceUID = uid
                    ds.AcquisitionNumber = ds.TemporalPositionIdentifier = t + 1
                    ds.InstanceNumber = t * n_slices + k + 1
                    ds.AcquisitionTime = ds.ContentTime = _tm(spec.start_time_s + t * tr)
                    status = store_instance(assoc, ds, options.timeout_s)
                    code = int(getattr(status, "Status", -1)) if status else -1
                    if code != 0:
                        ok = False
                        failed += 1
                        if code == -1:
                            raise RuntimeError("association lost")
                    else:
                        sent_instances += 1
                if ok:
                    sent_volumes += 1
                lag = time.time() - due
                t += 1
                report.update(
                    volumes=sent_volumes,
                    instances=sent_instances,
                    failed=failed,
                    begin=begin,
                    finished=time.time(),
                    lag_s=lag,
                )
            results.put(report)
            current = None
    except Exception as exc:
        # What this series got through before the failure still counts.
        if current is not None and "volumes" in current:
            results.put(current)
        results.put({"scanner": job["index"], "error": f"{type(exc).__name__}: {exc}"})
    finally:
        results.put({"scanner": job["index"], "done": True})
        if assoc.is_established:
            assoc.release()


# --------------------------------------------------------------------------- measuring


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


#: The pipeline's stage processes (``mode="process"``).
STAGES = ("motion", "qc", "connectivity")


class Sampler(threading.Thread):
    """RSS of this process, the stage processes and their sum: peaks, and the
    total over time (to tell a flat footprint from a growing one)."""

    def __init__(self, pipeline: Pipeline, ingest_pid: Callable[[], int | None]) -> None:
        super().__init__(name="rss", daemon=True)
        self.pipeline = pipeline
        self.ingest_pid = ingest_pid
        self.stop_event = threading.Event()
        self.peak = {"service": 0.0, "stages": 0.0, "total": 0.0}
        #: (time.time(), MB per process and in total) every 0.5 s.
        self.samples: list[tuple[float, dict[str, float]]] = []

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            # The service: this process (receiver + hub) and the receiver's ingest process.
            ingest = self.ingest_pid()
            now = {"ingest": rss_mb(ingest) if ingest is not None else 0.0}
            now["service"] = rss_mb(os.getpid()) + now["ingest"]
            for name in STAGES:
                pid = self.pipeline.stage_pid(name)
                now[name] = rss_mb(pid) if pid is not None else 0.0
            stages = sum(now[name] for name in STAGES)
            now["total"] = now["service"] + stages
            for key, value in (
                ("service", now["service"]),
                ("stages", stages),
                ("total", now["total"]),
            ):
                self.peak[key] = max(self.peak[key], value)
            self.samples.append((time.time(), now))

    def median_between(self, begin: float, end: float, key: str = "total") -> float:
        """Median MB of ``key`` sampled in [begin, end) (NaN when none)."""
        values = [mb[key] for when, mb in self.samples if begin <= when < end]
        return float(np.median(values)) if values else float("nan")


class Counting(threading.Thread):
    """Counts results per topic and series; keeps the qc latencies, and when
    each ``qc`` and ``target`` result arrived (to tell what the slow ones follow)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        super().__init__(name="count", daemon=True)
        self.sub = Subscriber(ctx, endpoint, rcvhwm=0)
        self.counts: Counter[tuple[str, str]] = Counter()
        #: (arrival time, latency ms) of each qc result; arrival times of targets.
        self.qc_arrivals: list[tuple[float, float]] = []
        self.target_arrivals: list[float] = []
        #: Why each series ended (``series-end``'s reason), in arrival order.
        self.end_reasons: list[str] = []
        self.last_qc = 0.0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop_event.is_set():
            m = self.sub.recv(timeout_ms=100)
            if m is None or m.series is None:
                continue
            with self.lock:
                self.counts[(m.topic, m.series.series_uid)] += 1
                if m.topic == topics.TARGET:
                    self.target_arrivals.append(time.time())
                if m.kind == "series-end":
                    self.end_reasons.append(str(getattr(m.payload, "reason", "")))
                if m.topic == topics.QC:
                    self.last_qc = time.time()
                    value = m.payload.values.get(topics.QC_LATENCY_MS)
                    if value is not None:
                        self.qc_arrivals.append((self.last_qc, float(value)))
        self.sub.close()

    def total(self, topic: str, uids: set[str]) -> int:
        with self.lock:
            return sum(n for (t, uid), n in self.counts.items() if t == topic and uid in uids)


def after_targets(
    qc: list[tuple[float, float]],
    targets: list[float],
    tr_s: float,
    start: float,
    window_s: float = 1.0,
) -> dict[str, Any]:
    """Where are the slow ``qc`` results, and do they follow ``target`` results?

    For the qc results slower than one (scanner) TR and for all of them: the
    share that arrived within ``window_s`` after a target result, the median
    latency of those that did and of those that did not, and when (s after
    ``start``) each slow one arrived.
    """
    marks = sorted(targets)

    def follows(when: float) -> bool:
        i = bisect.bisect_right(marks, when)
        return i > 0 and when - marks[i - 1] <= window_s

    near = [lat for when, lat in qc if follows(when)]
    far = [lat for when, lat in qc if not follows(when)]
    slow = [when for when, lat in qc if lat > tr_s * 1000.0]

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else float("nan")

    return {
        "window_s": window_s,
        "over_tr": float(len(slow)),
        "over_tr_after_target": sum(map(follows, slow)) / len(slow) if slow else float("nan"),
        "all_after_target": len(near) / len(qc) if qc else float("nan"),
        "p50_after_target_ms": median(near),
        "p50_otherwise_ms": median(far),
        "over_tr_at_s": [round(when - start, 1) for when in slow],
    }


# --------------------------------------------------------------------------- the run


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    shape = tuple(int(v) for v in args.shape.split("x"))
    spool = Path(tempfile.mkdtemp(prefix="bs-load-"))
    settings = load_settings(
        overrides=[
            f"receiver.spool_dir='{spool}'",
            "receiver.port=0",
            f"receiver.max_associations={max(8, args.scanners)}",
            "pipeline.pub='tcp://127.0.0.1:*'",
            "pipeline.snapshot=''",
            "pipeline.mode='process'",
            f"receiver.ingest='{args.ingest}'",
        ],
        environ={},
    )
    ctx: zmq.Context[Any] = zmq.Context()
    pipeline = Pipeline(settings, context=ctx)
    pipeline.start()
    receiver = Receiver(settings, pipeline.submit)
    receiver.start()
    counting = Counting(ctx, pipeline.pub_endpoint)
    counting.start()
    deadline = time.monotonic() + 30
    while pipeline.health()["hub"]["subscriptions"] < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the counting subscriber did not connect")
        time.sleep(0.05)
    sampler = Sampler(pipeline, lambda: getattr(receiver.ingest, "pid", None))
    sampler.start()

    spawn = mp.get_context("spawn")
    results: Any = spawn.Queue()
    # Senders need a few seconds to start and encode their templates.
    start = time.time() + 5.0 + 0.5 * args.scanners
    duration_s = args.minutes * 60.0
    jobs = [
        {
            "index": i,
            "port": receiver.port,
            "shape": shape,
            "voxel_mm": args.voxel_mm,
            "tr_s": args.tr,
            "pace": args.pace,
            "series": args.series,
            "volumes": args.volumes,
            "templates": args.templates,
            "start": start,
            "duration_s": duration_s,
        }
        for i in range(args.scanners)
    ]
    procs = [spawn.Process(target=scanner, args=(job, results), daemon=True) for job in jobs]
    for p in procs:
        p.start()
    reports: list[dict[str, Any]] = []
    done: set[int] = set()
    hard_stop = time.monotonic() + (start - time.time()) + duration_s + 120.0
    errors: list[str] = []
    while len(done) < args.scanners:
        if time.monotonic() > hard_stop:
            errors.append(f"scanners {sorted(set(range(args.scanners)) - done)} did not finish")
            break
        try:
            item = results.get(timeout=1.0)
        except Exception:  # queue.Empty from a multiprocessing queue
            continue
        if "done" in item:
            done.add(item["scanner"])
        elif "error" in item:
            errors.append(f"scanner {item['scanner']}: {item['error']}")
        else:
            reports.append(item)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    sending_end = max((r["finished"] for r in reports), default=time.time())
    uids = {r["series_uid"] for r in reports}
    sent = sum(r["volumes"] for r in reports)
    drain_deadline = time.monotonic() + args.drain_s
    while counting.total(topics.QC, uids) < sent and time.monotonic() < drain_deadline:
        time.sleep(0.2)
    drained_after = max(0.0, counting.last_qc - sending_end)
    counting.stop_event.set()
    counting.join(5)
    sampler.stop_event.set()
    sampler.join(5)
    receiver.stop()
    pipeline.stop(timeout=10)
    ctx.term()
    shutil.rmtree(spool, ignore_errors=True)

    processed = counting.total(topics.QC, uids)
    received = counting.total(topics.VOLUME_RECEIVED, uids)
    instances = sum(r["instances"] for r in reports)
    busy = max((r["finished"] - r["begin"] for r in reports), default=0.0) * args.series
    sending_s = sending_end - start
    lat = np.asarray([ms for _, ms in counting.qc_arrivals] or [np.nan])
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    return {
        "scanners": args.scanners,
        "series_per_scanner": args.series,
        "volumes_per_series": args.volumes or None,
        # Series ended while the run went on, by reason (complete: all stated volumes in).
        "series_ended": dict(Counter(counting.end_reasons)),
        "shape": "x".join(map(str, shape)),
        "tr_s": args.tr,
        "pace": args.pace,
        "minutes": args.minutes,
        "target_instances_per_s": args.scanners * shape[2] * args.pace / args.tr,
        "achieved_instances_per_s": instances / sending_s if sending_s > 0 else 0.0,
        "per_association_per_s": instances / sending_s / args.scanners if sending_s > 0 else 0.0,
        "sending_s": sending_s,
        "busy_s": busy,
        "behind_at_end_s": max((r["lag_s"] for r in reports), default=0.0),
        "volumes_planned": sum(r["planned"] for r in reports),
        "volumes_sent": sent,
        "volumes_received": received,
        "volumes_processed": processed,
        "volumes_lost": sent - processed,
        "missing": counting.total(topics.VOLUME_MISSING, uids),
        "instances_failed": sum(r["failed"] for r in reports),
        "subscriber_dropped": counting.sub.dropped,
        "drained_after_s": drained_after,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_p99_ms": p99,
        "slow_qc": after_targets(counting.qc_arrivals, counting.target_arrivals, args.tr, start),
        "peak_rss_service_mb": sampler.peak["service"],
        "peak_rss_stages_mb": sampler.peak["stages"],
        "peak_rss_total_mb": sampler.peak["total"],
        # Median total RSS in the second minute of sending and in its last minute.
        "rss_minute_2_mb": sampler.median_between(start + 60.0, start + 120.0),
        "rss_last_minute_mb": sampler.median_between(sending_end - 60.0, sending_end),
        # Per minute of sending (the last one may be partial), for each process.
        "rss_by_minute_mb": {
            key: [
                sampler.median_between(start + 60.0 * m, start + 60.0 * (m + 1), key)
                for m in range(max(1, math.ceil((sending_end - start) / 60.0)))
            ]
            for key in ("total", "service", "ingest", *STAGES)
        },
        "errors": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scanners", type=int, default=4, help="concurrent associations (4)")
    ap.add_argument("--series", type=int, default=2, help="series per scanner, in turn (2)")
    ap.add_argument("--minutes", type=float, default=10.0, help="sending time (10)")
    ap.add_argument("--pace", type=float, default=10.0, help="speed over real time (10)")
    ap.add_argument("--shape", default="90x90x60", help="matrix, per-slice series")
    ap.add_argument("--voxel-mm", type=float, default=2.4)
    ap.add_argument("--tr", type=float, default=0.8, help="repetition time (s)")
    ap.add_argument("--templates", type=int, default=8, help="distinct volumes per sender")
    ap.add_argument(
        "--volumes",
        type=int,
        default=0,
        help="volumes per series, stated in its header (the pipeline ends a series "
        "when all are in); 0: each series gets an equal share of --minutes and "
        "ends by the idle time",
    )
    ap.add_argument("--drain-s", type=float, default=300.0, help="wait for results at most")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    ap.add_argument(
        "--ingest",
        choices=("process", "thread"),
        default="process",
        help="receiver.ingest: decode + assembly in a child process (default) or a thread",
    )
    args = ap.parse_args()
    configure_logging(level="warning")
    r = run_load(args)
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    print(machine_line())
    length = f" of {r['volumes_per_series']} volumes" if r["volumes_per_series"] else ""
    print(
        f"{r['scanners']} scanners x {r['series_per_scanner']} per-slice {r['shape']} "
        f"series{length}, TR {r['tr_s']} s at {r['pace']:g}x real time, {r['minutes']:g} min"
    )
    headers = [
        "pace",
        "inst/s asked",
        "inst/s done",
        "per assoc",
        "behind s",
        "sent",
        "received",
        "processed",
        "lost",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "peak RSS MB",
        "RSS MB min 2 / last",
    ]
    row = [
        f"{r['pace']:g}x",
        f"{r['target_instances_per_s']:.0f}",
        f"{r['achieved_instances_per_s']:.0f}",
        f"{r['per_association_per_s']:.0f}",
        f"{r['behind_at_end_s']:.1f}",
        str(r["volumes_sent"]),
        str(r["volumes_received"]),
        str(r["volumes_processed"]),
        str(r["volumes_lost"]),
        f"{r['latency_p50_ms']:.0f}",
        f"{r['latency_p95_ms']:.0f}",
        f"{r['latency_p99_ms']:.0f}",
        f"{r['peak_rss_total_mb']:.0f} ({r['peak_rss_service_mb']:.0f}+"
        f"{r['peak_rss_stages_mb']:.0f})",
        f"{r['rss_minute_2_mb']:.0f} / {r['rss_last_minute_mb']:.0f}",
    ]
    print(table(headers, [row]))
    print(
        f"planned {r['volumes_planned']} volumes; missing {r['missing']}, failed instances "
        f"{r['instances_failed']}, subscriber drops {r['subscriber_dropped']}, results complete "
        f"{r['drained_after_s']:.1f} s after the last send"
    )
    ended = ", ".join(f"{n} {why or '?'}" for why, n in sorted(r["series_ended"].items()))
    print(f"series ended during the run: {ended or 'none'}")
    slow = r["slow_qc"]
    print(
        f"qc results slower than one TR ({r['tr_s']:g} s): {slow['over_tr']:.0f}, "
        f"{100 * slow['over_tr_after_target']:.0f} % of them within {slow['window_s']:g} s "
        f"after a target result (all qc: {100 * slow['all_after_target']:.0f} %); "
        f"p50 {slow['p50_after_target_ms']:.0f} ms there, {slow['p50_otherwise_ms']:.0f} ms "
        "otherwise"
    )
    if slow["over_tr_at_s"]:
        print(
            "  they arrived at (s after the first send): "
            + ", ".join(map(str, slow["over_tr_at_s"]))
        )
    print("RSS MB, median per minute of sending:")
    for key, values in r["rss_by_minute_mb"].items():
        print(f"  {key:<12} " + " ".join(f"{mb:6.0f}" for mb in values))
    for e in r["errors"]:
        print("ERROR", e)
    return 0 if r["volumes_lost"] == 0 and not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
