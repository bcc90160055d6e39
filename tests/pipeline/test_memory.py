"""The stages keep nothing of a series once its end has passed through them.

The load benchmark (docs/benchmarks.md, "Load") shows the stage processes'
memory stepping up when series overlap and staying flat after; this pins
the part of that which is ours: per-series state (motion reference, QC
running sums, the connectivity buffer and regression, checkpoints' records)
is released at the series' end, so memory is bounded by the series open at
once, not by the series seen. Measured with tracemalloc (numpy reports its
buffers to it), in one thread, so it does not depend on the allocator.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from pipeline_support import chain, make_series, volumes

from boldstream.pipeline.connectivity_stage import ConnectivityStage
from boldstream.pipeline.stages import MotionStage, QCStage
from boldstream.stream.messages import Message, SeriesEnd

N = 40


def _interleaved(uids: list[str]) -> tuple[list[Message], list[Message]]:
    """Volumes of several series, alternating, and then their ends."""
    series = [make_series(uid) for uid in uids]
    per = [volumes(N, s) for s in series]
    body = [Message(per[k][t]) for t in range(N) for k in range(len(series))]
    ends = [Message(SeriesEnd(s, ended=0.0)) for s in series]
    return body, ends


def _traced_mb() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def test_series_state_is_released_at_the_series_end(tmp_path: Path) -> None:
    ck = str(tmp_path / "checkpoints")
    stages = [
        MotionStage(checkpoint_dir=ck),
        QCStage(forward_corrected=True, checkpoint_dir=ck),
        ConnectivityStage(every_s=20.0, checkpoint_dir=ck),
    ]
    # A first series warms what is kept on purpose across series (the
    # template ROIs, imports, loggers).
    body, ends = _interleaved(["1.1"])
    chain(stages, body + ends)

    body, ends = _interleaved(["2.1", "2.2", "2.3"])
    tracemalloc.start()
    try:
        before = _traced_mb()
        out = chain(stages, body)
        del out
        open_mb = _traced_mb() - before
        out = chain(stages, ends)
        assert [m.kind for m in out][-3:] == ["series-end"] * 3
        del out, body, ends
        after_mb = _traced_mb() - before
    finally:
        tracemalloc.stop()
    # three open series hold real state, so the measure can see it ...
    assert open_mb > 3.0, open_mb
    # ... and none of it is left once they have ended
    assert after_mb < 0.5, (open_mb, after_mb)
