"""Connectivity and target: per-volume update and full target recompute, with memory.

Data: the project's simulated scanner (``boldstream.simulator.phantom``, the
MNI152 head in its default pose, planted sgACC/DLPFC pair) at 64x64x36 / 3 mm
/ TR 2 s and 90x90x60 / 2.4 mm / TR 0.8 s. ``--volumes`` distinct phantom
volumes are generated and then fed again and again (with fresh noise) until
the run is ``--minutes`` long, so the ring buffer is as full as in a real
15-minute run; timings do not depend on the values.

Measured per size: registration of the 10-volume mean (once per series), the
per-volume update (:meth:`SeedConnectivity.update`: regressors, censoring,
Welford sums for every brain voxel, ring buffer, field-of-view check), the
online map read-out (:meth:`SeedConnectivity.running_map`) and a full target
recompute (:meth:`TargetTracker.update`: band-pass of the buffer, OLS on all,
first-half and second-half frames, three smoothings and decisions, the test
against ``--surrogates`` phase-randomised seeds, the map) beside the same
recompute without the test (its peer in the same run),
the memory the series holds (running sums + ring buffer) and the peak the
recompute allocates (tracemalloc), and the checkpoint the connectivity stage
writes after each recompute (its state through
:class:`~boldstream.pipeline.checkpoint.CheckpointStore`, to a folder on the
current directory's disk: time and size). Prints a Markdown table.

    python benchmarks/connectivity.py                  # both sizes, 15 minutes
    python benchmarks/connectivity.py --sizes 64 --minutes 8

Not a test: timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line, numerics_line

from boldstream.analysis.connectivity import SeedConnectivity
from boldstream.analysis.registration import native_rois, register_to_template
from boldstream.analysis.rois import template_rois
from boldstream.analysis.target import TargetTracker
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.receiver.volume import SeriesInfo
from boldstream.simulator.phantom import make_phantom_run

# name: (matrix, voxel mm, TR s), SPEC section 7
SIZES: dict[str, tuple[tuple[int, int, int], float, float]] = {
    "64": ((64, 64, 36), 3.0, 2.0),
    "90": ((90, 90, 60), 2.4, 0.8),
}


def bench(
    size: str, *, minutes: float, distinct: int, recomputes: int, surrogates: int
) -> dict[str, float]:
    shape, voxel, tr = SIZES[size]
    run = make_phantom_run(
        n_volumes=distinct, tr_s=tr, shape=shape, voxel_mm=voxel, motion="mild", seed=0
    )
    vols = [run.volume(t) for t in range(distinct)]
    params = np.asarray(run.truth["motion"]["parameters"])
    mean = np.mean(vols[:10], axis=0)
    t0 = time.perf_counter()
    reg = register_to_template(mean, run.vox2ras)
    rois = native_rois(template_rois(), reg, mean, run.vox2ras)
    t_reg = time.perf_counter() - t0
    conn = SeedConnectivity(rois, tr_s=tr, buffer_minutes=max(minutes, 1.0))
    tracker = TargetTracker(native2mni=reg.native2mni, surrogates=surrogates)
    plain = TargetTracker(native2mni=reg.native2mni, surrogates=0)
    n = round(minutes * 60.0 / tr)
    rng = np.random.default_rng(1)
    noise = [rng.normal(0.0, 5.0, shape).astype(np.float32) for _ in range(7)]
    update_ms = []
    for t in range(n):
        vol = vols[t % distinct] + noise[t % 7]
        p = params[t % distinct]
        start = time.perf_counter()
        conn.update(vol, p)
        update_ms.append((time.perf_counter() - start) * 1000.0)
    map_ms = []
    for _ in range(5):
        start = time.perf_counter()
        conn.running_map()
        map_ms.append((time.perf_counter() - start) * 1000.0)
    recompute_s, plain_s = [], []
    peak = 0
    for i in range(recomputes):
        start = time.perf_counter()
        plain.update(conn)
        plain_s.append(time.perf_counter() - start)
        if i == recomputes - 1:
            tracemalloc.start()
        start = time.perf_counter()
        estimate = tracker.update(conn)
        recompute_s.append(time.perf_counter() - start)
        if i == recomputes - 1:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert estimate is not None
    checkpoint_ms, checkpoint_mb = _checkpoint(conn, tracker)
    truth = np.asarray(run.truth["network"]["target"]["scanner_ras_mm"])
    return {
        "frames": float(n),
        "brain": float(conn.brain_index.size),
        "search": float(conn.search_index.size),
        "registration_s": t_reg,
        "update_ms": statistics.median(update_ms),
        "update_p95_ms": float(np.percentile(update_ms, 95)),
        "map_ms": statistics.median(map_ms),
        "recompute_s": statistics.median(recompute_s),
        "plain_s": statistics.median(plain_s),
        "p_value": float(estimate.values["p_value"]),
        "held_mb": conn.nbytes / 1e6,
        "peak_mb": peak / 1e6,
        "dice": reg.dice,
        "checkpoint_ms": checkpoint_ms,
        "checkpoint_mb": checkpoint_mb,
        "error_mm": float(np.linalg.norm(np.asarray(estimate.values["ras_mm"]) - truth)),
    }


def _checkpoint(conn: SeedConnectivity, tracker: TargetTracker) -> tuple[float, float]:
    """Median ms and MB of writing the stage's state as it does after a recompute."""
    info = SeriesInfo(series_uid="1.2.3", study_uid="1.2", description="", session_key="bench")
    times = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        store = CheckpointStore(folder, "connectivity")
        for i in range(5):
            start = time.perf_counter()
            scalars, arrays = conn.state()
            tracker_scalars, tracker_arrays = tracker.state()
            arrays = {f"conn_{k}": v for k, v in arrays.items()}
            arrays.update({f"tracker_{k}": v for k, v in tracker_arrays.items()})
            store.write(info, i, {"connectivity": scalars, "tracker": tracker_scalars}, arrays)
            times.append((time.perf_counter() - start) * 1000.0)
        size = sum(f.stat().st_size for f in store.folder(info).iterdir())
    return statistics.median(times), size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,90")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--volumes", type=int, default=60, help="distinct phantom volumes")
    parser.add_argument("--recomputes", type=int, default=3)
    parser.add_argument("--surrogates", type=int, default=200, help="null seeds per recompute")
    args = parser.parse_args()
    print(f"Machine: {machine_line()}, {numerics_line()}\n")
    print(
        "| matrix | TR s | frames | brain voxels | search voxels | registration s "
        "| update ms (median / p95) | online map ms "
        f"| target recompute s ({args.surrogates} null seeds / none) "
        "| held MB | recompute peak MB | checkpoint ms / MB | p |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        r = bench(
            size,
            minutes=args.minutes,
            distinct=args.volumes,
            recomputes=args.recomputes,
            surrogates=args.surrogates,
        )
        shape, _, tr = SIZES[size]
        print(
            f"| {'x'.join(map(str, shape))} | {tr:g} | {r['frames']:.0f} | {r['brain']:.0f} "
            f"| {r['search']:.0f} | {r['registration_s']:.2f} "
            f"| {r['update_ms']:.1f} / {r['update_p95_ms']:.1f} | {r['map_ms']:.1f} "
            f"| {r['recompute_s']:.2f} / {r['plain_s']:.2f} | {r['held_mb']:.0f} "
            f"| {r['peak_mb']:.0f} | {r['checkpoint_ms']:.0f} / {r['checkpoint_mb']:.0f} "
            f"| {r['p_value']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
