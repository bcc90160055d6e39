"""Memory of the analysis stages over several rounds of concurrent series.

The three stages ``serve`` runs in processes (motion, QC, connectivity) are
called here in one thread, as the pipeline chains them, over ``--rounds``
rounds of ``--parallel`` interleaved phantom series of ``--volumes``
volumes each; every round's series are ended before the next round starts.
Printed per round: traced memory (tracemalloc; numpy reports its buffers to
it) while the series are open and after their ends, and the process's RSS
at its peak in the round and after the ends. Flat rows from round to round
mean no state outlives its series; what the load benchmark's stage
processes add beyond this is the allocator and series overlap (see
docs/benchmarks.md, "Load").

Usage::

    python benchmarks/series_memory.py                  # 4 rounds x 4 series x 150 volumes
    python benchmarks/series_memory.py --rounds 2 --parallel 2 --volumes 60
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line, table
from load import rss_mb
from pipeline_e2e import as_volume, series_info

from boldstream.pipeline.connectivity_stage import ConnectivityStage
from boldstream.pipeline.offline import through
from boldstream.pipeline.stages import MotionStage, QCStage
from boldstream.simulator.phantom import make_phantom_run
from boldstream.stream.messages import Message, SeriesEnd


def traced_mb() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of series (4)")
    ap.add_argument("--parallel", type=int, default=4, help="series open at once per round (4)")
    ap.add_argument("--volumes", type=int, default=150, help="volumes per series (150)")
    ap.add_argument("--shape", default="90x90x60", help="matrix (90x90x60)")
    ap.add_argument("--voxel-mm", type=float, default=2.4)
    ap.add_argument("--tr", type=float, default=0.8)
    args = ap.parse_args()
    if min(args.rounds, args.parallel) < 1 or args.volumes < 20:
        ap.error("--rounds and --parallel must be >= 1 and --volumes >= 20")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    shape = tuple(int(v) for v in args.shape.split("x"))
    run = make_phantom_run(
        n_volumes=args.volumes,
        tr_s=args.tr,
        shape=shape,  # type: ignore[arg-type]
        voxel_mm=args.voxel_mm,
        motion="mild",
        seed=1,
    )
    arrays = [np.asarray(run.volume(t), dtype=np.float32) for t in range(args.volumes)]
    vox2ras = np.asarray(run.vox2ras, dtype=np.float64)
    checkpoints = tempfile.mkdtemp(prefix="bs-series-memory-")
    stages = [
        MotionStage(checkpoint_dir=checkpoints),
        QCStage(forward_corrected=True, checkpoint_dir=checkpoints),
        ConnectivityStage(every_s=30.0, checkpoint_dir=checkpoints),
    ]

    tracemalloc.start()
    base_traced, base_rss = traced_mb(), rss_mb(os.getpid())
    rows = []
    for r in range(args.rounds):
        series = [series_info(f"78.{r}.{p}", args.tr) for p in range(args.parallel)]
        began = time.perf_counter()
        peak_rss = 0.0
        for t in range(args.volumes):
            for s in series:
                through(stages, Message(as_volume(arrays[t], vox2ras, s, t)))
            peak_rss = max(peak_rss, rss_mb(os.getpid()))
        open_traced = traced_mb()
        for s in series:
            through(stages, Message(SeriesEnd(s, ended=time.time())))
        rows.append(
            [
                str(r + 1),
                f"{open_traced - base_traced:.0f}",
                f"{traced_mb() - base_traced:.1f}",
                f"{peak_rss:.0f}",
                f"{rss_mb(os.getpid()):.0f}",
                f"{time.perf_counter() - began:.0f}",
            ]
        )
    tracemalloc.stop()
    print(machine_line())
    print(
        f"{args.rounds} rounds x {args.parallel} interleaved {args.shape} series x "
        f"{args.volumes} volumes, motion + QC + connectivity in one thread; "
        f"before: traced {base_traced:.0f} MB, RSS {base_rss:.0f} MB"
    )
    print(
        table(
            [
                "round",
                "traced MB open",
                "traced MB after ends",
                "peak RSS MB",
                "RSS MB after ends",
                "s",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
