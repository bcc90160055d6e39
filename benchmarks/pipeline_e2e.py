"""End-to-end pipeline benchmark: last DICOM byte -> result published, per volume.

Two chains, each as threads over inproc:// and as processes over ipc://:

- pass-through: the pipeline's topology with stages that do nothing: a source
  socket (what ``Pipeline.submit`` uses), two pass-through stages, a sink that
  publishes on an XPUB like the pipeline's hub, one subscriber on loopback TCP.
  Latency = the ``published`` stamp minus the volume's ``received`` stamp.
- real: :class:`boldstream.pipeline.service.Pipeline` (reorder buffer, motion,
  QC, publication); latency = the ``latency_ms`` of each ``qc`` result, which
  the pipeline computes at publication from the volume's ``received`` stamp.

Latency: one volume in flight (the next is submitted when the previous one's
result has arrived), so the figures are latencies, not queueing. The
receiver's own work (C-STORE, spool, assembly) is not included: each volume is
stamped as received just before ``submit``. Throughput: all volumes submitted
at once, volumes published per second until the last one.

Also replay speed: ``boldstream replay`` on a 300-volume 64x64x36 phantom run
saved as NIfTI, against real time at TR 2 s.

    python benchmarks/pipeline_e2e.py            # the full table
    python benchmarks/pipeline_e2e.py --n 30     # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
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
from boldstream.pipeline.offline import nifti_volumes, replay
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.simulator.phantom import make_phantom_run
from boldstream.stream.codec import decode, send
from boldstream.stream.messages import Message
from boldstream.stream.pubsub import Publisher, Subscriber
from boldstream.stream.runner import start_chain
from boldstream.stream.stage import StageConfig

SIZES = {"64x64x36": ((64, 64, 36), 3.0, 2.0), "90x90x60": ((90, 90, 60), 2.4, 0.8)}


def phantom_volumes(name: str, n: int) -> tuple[list[np.ndarray], np.ndarray, float]:
    shape, voxel, tr = SIZES[name]
    run = make_phantom_run(n_volumes=n, shape=shape, voxel_mm=voxel, motion="mild", tr_s=tr)
    return [run.volume(t) for t in range(n)], run.vox2ras, tr


def as_volume(data: np.ndarray, vox2ras: np.ndarray, series: SeriesInfo, index: int) -> Volume:
    now = time.time()
    return Volume(
        data=data,
        vox2ras=vox2ras,
        series=series,
        index=index,
        acquisition_time=None,
        first_received=now,
        last_received=now,
        assembled=now,
        instance_uids=(f"{series.series_uid}.{index}",),
    )


def series_info(tag: str, tr: float) -> SeriesInfo:
    return SeriesInfo(
        series_uid=f"1.2.826.0.1.3680043.8.498.{tag}",
        study_uid="1.2.826.0.1.3680043.8.498",
        description="rest",
        session_key="bench",
        tr_s=tr,
    )


def pct(samples_ms: list[float]) -> list[str]:
    q = np.percentile(np.asarray(samples_ms), [50, 95, 99])
    return [f"{v:.1f}" for v in q]


# --------------------------------------------------------------------------- pass-through


def passthrough(mode: str, vols: list[np.ndarray], vox2ras: np.ndarray, tr: float) -> list[Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="bs-e2e-")
    transport = "inproc://pt" if mode == "thread" else f"ipc://{tmp}/pt"
    sink = ctx.socket(zmq.PULL)
    sink.bind(f"{transport}-sink")
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    publisher = Publisher(xpub, name="bench")
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    configs = [
        StageConfig(
            name=n,
            pull=None if mode == "thread" else f"ipc://{tmp}/{n}-in",
            control=None if mode == "thread" else f"ipc://{tmp}/{n}-ctl",
        )
        for n in ("motion", "qc")
    ]
    chain = start_chain(configs, output=f"{transport}-sink", mode=mode, context=ctx)  # type: ignore[arg-type]
    source = ctx.socket(zmq.PUSH)
    source.linger = 0
    source.connect(chain.input)
    sub = Subscriber(ctx, f"tcp://127.0.0.1:{port}", topics=("volume",))
    while publisher.subscriptions == 0:
        if xpub.poll(100):
            publisher.drain_subscriptions()
    series = series_info("pt", tr)
    latencies: list[float] = []
    for i, data in enumerate(vols):
        send(source, Message(as_volume(data, vox2ras, series, i)))
        message = decode(sink.recv_multipart(copy=False))
        publisher.publish(message)
        got = sub.recv(timeout_ms=10_000)
        assert got is not None
        latencies.append((got.timestamps["published"] - got.timestamps["received"]) * 1000)
    start = time.perf_counter()
    for i, data in enumerate(vols):
        send(source, Message(as_volume(data, vox2ras, series, i)))
    for _ in vols:
        publisher.publish(decode(sink.recv_multipart(copy=False)))
    rate = len(vols) / (time.perf_counter() - start)
    chain.stop()
    for s in (source, sink, xpub):
        s.close(linger=0)
    sub.close()
    ctx.term()
    return [*pct(latencies[1:]), f"{rate:.0f}"]


# --------------------------------------------------------------------------- real chain


def _busy(stop: threading.Event) -> None:
    """Pure-Python work holding the GIL, like the receiver's SCP and ingest threads."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


def real(
    mode: str,
    vols: list[np.ndarray],
    vox2ras: np.ndarray,
    tr: float,
    tmp: Path,
    *,
    busy: bool = False,
) -> list[Any]:
    settings = load_settings(
        overrides=[
            "pipeline.pub='tcp://127.0.0.1:*'",
            "pipeline.snapshot=''",
            f"receiver.spool_dir='{tmp}'",
            "logging.level='warning'",
        ],
        environ={},
    )
    ctx: zmq.Context[Any] = zmq.Context()
    pipeline = Pipeline(settings, mode=mode)  # type: ignore[arg-type]
    pipeline.start()
    sub = Subscriber(ctx, pipeline.pub_endpoint, topics=("qc",), rcvhwm=0)
    while pipeline.health()["hub"]["subscriptions"] == 0:
        time.sleep(0.01)
    stop_busy = threading.Event()
    if busy:
        threading.Thread(target=_busy, args=(stop_busy,), daemon=True).start()
    latencies: list[float] = []
    series = series_info(f"real-{mode}", tr)
    for i, data in enumerate(vols):
        pipeline.submit(as_volume(data, vox2ras, series, i))
        got = sub.recv(timeout_ms=30_000)
        assert got is not None and got.topic == "qc"
        latencies.append(float(got.payload.values["latency_ms"]))  # type: ignore[union-attr]
    # Throughput: a second series, everything at once.
    series = series_info(f"burst-{mode}", tr)
    start = time.perf_counter()
    for i, data in enumerate(vols):
        pipeline.submit(as_volume(data, vox2ras, series, i))
    for _ in vols:
        assert sub.recv(timeout_ms=60_000) is not None
    rate = len(vols) / (time.perf_counter() - start)
    stop_busy.set()
    pipeline.stop()
    sub.close()
    ctx.term()
    # The first volume builds the motion reference and the QC mask.
    return [*pct(latencies[1:]), f"{latencies[0]:.0f}", f"{rate:.0f}"]


def replay_speed(tmp: Path) -> str:
    import nibabel as nib

    run = make_phantom_run(n_volumes=300, shape=(64, 64, 36), voxel_mm=3.0, motion="mild")
    img = nib.Nifti1Image(run.data, run.vox2ras)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    path = tmp / "run300.nii.gz"
    nib.save(img, path)
    settings = load_settings(environ={})
    start = time.perf_counter()
    _, volumes = nifti_volumes(path)
    replay(volumes, settings)
    elapsed = time.perf_counter() - start
    return (
        f"replay of 300 volumes 64x64x36 (.nii.gz): {elapsed:.1f} s, "
        f"{300 * 2.0 / elapsed:.0f}x real time at TR 2 s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="volumes per configuration")
    args = parser.parse_args()
    configure_logging(level="warning", json=False)
    print(machine_line())
    rows_pt: list[list[str]] = []
    rows_real: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bs-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        for name in SIZES:
            vols, vox2ras, tr = phantom_volumes(name, args.n)
            for mode in ("thread", "process"):
                label = "threads/inproc" if mode == "thread" else "processes/ipc"
                rows_pt.append([name, label, *passthrough(mode, vols, vox2ras, tr)])
                for busy in (False, True):
                    where = tmp / name / f"{mode}-{busy}"
                    result = real(mode, vols, vox2ras, tr, where, busy=busy)
                    load = "busy Python thread" if busy else "idle"
                    rows_real.append([name, f"{tr:g} s", label, load, *result])
        speed = replay_speed(tmp)
    print(f"\nPass-through chain, {args.n} volumes, one in flight (latency ms)\n")
    print(table(["volume", "stages", "p50", "p95", "p99", "burst vol/s"], rows_pt))
    print(f"\nReal chain (order -> motion -> QC), {args.n} volumes, one in flight (latency ms)\n")
    print(
        table(
            [
                "volume",
                "TR",
                "stages",
                "receiver process",
                "p50",
                "p95",
                "p99",
                "first",
                "burst vol/s",
            ],
            rows_real,
        )
    )
    print(f"\n{speed}")


if __name__ == "__main__":
    main()
