"""The real-time pipeline: receiver -> reorder -> motion -> QC -> result stream.

- :mod:`~boldstream.pipeline.stages`: the motion and QC stages;
- :mod:`~boldstream.pipeline.series_stage`: what every analysis stage shares
  (per-series state, in-order gate, failure isolation, checkpoints);
- :mod:`~boldstream.pipeline.checkpoint`: their per-series checkpoints;
- :mod:`~boldstream.pipeline.service`: :class:`Pipeline`, which runs the
  stages as threads or supervised processes, publishes results and answers
  snapshot requests;
- :mod:`~boldstream.pipeline.hub`: the pipeline's hub thread (ordering,
  journal, publishing, snapshots).
"""

from __future__ import annotations

from boldstream.pipeline.series_stage import (
    CHECKPOINT,
    CORRECTED,
    INTERNAL_PREFIX,
    PASSED,
    SKIPPED,
)
from boldstream.pipeline.stages import MotionStage, QCStage

__all__ = [
    "CHECKPOINT",
    "CORRECTED",
    "INTERNAL_PREFIX",
    "PASSED",
    "SKIPPED",
    "MotionStage",
    "QCStage",
]
