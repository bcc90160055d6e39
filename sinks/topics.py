"""The result streams' names and fields, in one place.

The pipeline publishes each kind of result on its own topic, as a
:class:`~boldstream.stream.messages.Message`. The topics of the
:class:`~boldstream.stream.messages.Result` payloads are named here, with the
keys of their ``values``; the other topics are the kinds of the pipeline's own
event payloads (series start and end, missing volumes, gaps). The pipeline
builds its results with the ``*_result`` helpers below, and every consumer
(the dashboard, files, exports) reads them by these names, so a field renamed
here is renamed everywhere.

All ``values`` are JSON types; ``None`` means n/a. Units are in the names
(``_mm``, ``_ms``) or stated here.

========================  ==========================================================
topic                     payload
========================  ==========================================================
``volume-received``       Result: the receiver assembled volume ``index``
                          (:data:`VOLUME_RECEIVED_FIELDS`)
``motion``                Result: rigid motion of volume ``index`` relative to the
                          reference (:data:`MOTION_FIELDS`; mm and radians)
``qc``                    Result: :meth:`QCFrame.as_dict` plus ``latency_ms``
``target``                Result: provisional TMS target (:data:`TARGET_FIELDS`),
                          array ``map`` (3-D float32 correlation), affine ``vox2ras``
``guidance``              Result: enough data for a settled target yet?
                          (:data:`GUIDANCE_FIELDS`; docs/guidance.md)
``warning``               Result: ``message`` and ``code`` for the technician
``series-start``          SeriesStart
``series-end``            SeriesEnd
``volume-missing``        VolumeIncomplete (the receiver gave up on a volume)
``gap``                   Gap (the orderer skipped a volume)
========================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from boldstream.analysis.motion import PARAM_NAMES
from boldstream.analysis.qc import QCFrame
from boldstream.receiver.volume import SeriesInfo
from boldstream.stream.messages import Result

__all__ = [
    "DASHBOARD_TOPICS",
    "GAP",
    "GUIDANCE",
    "GUIDANCE_FIELDS",
    "GUIDANCE_STATES",
    "MOTION",
    "MOTION_FIELDS",
    "QC",
    "QC_FIELDS",
    "QC_LATENCY_MS",
    "SERIES_END",
    "SERIES_START",
    "TARGET",
    "TARGET_AFFINE",
    "TARGET_ARRAY_MAP",
    "TARGET_FIELDS",
    "TARGET_STATUSES",
    "USABLE_FIELDS",
    "USABLE_THRESHOLD_FIELDS",
    "VOLUME_MISSING",
    "VOLUME_RECEIVED",
    "VOLUME_RECEIVED_FIELDS",
    "WARNING",
    "WARNING_FIELDS",
    "guidance_result",
    "motion_result",
    "qc_result",
    "target_result",
    "volume_received_result",
    "warning_result",
]

# --------------------------------------------------------------------------- topics

VOLUME_RECEIVED: Final = "volume-received"
MOTION: Final = "motion"
QC: Final = "qc"
TARGET: Final = "target"
GUIDANCE: Final = "guidance"
WARNING: Final = "warning"
SERIES_START: Final = "series-start"
SERIES_END: Final = "series-end"
VOLUME_MISSING: Final = "volume-missing"
GAP: Final = "gap"

#: Everything the dashboard subscribes to. ZeroMQ filters by prefix: none of
#: these is a prefix of ``volume`` (whole volumes, megabytes each), which the
#: dashboard must never receive.
DASHBOARD_TOPICS: Final = (
    SERIES_START,
    VOLUME_RECEIVED,
    MOTION,
    QC,
    TARGET,
    GUIDANCE,
    WARNING,
    VOLUME_MISSING,
    GAP,
    SERIES_END,
)

# --------------------------------------------------------------------------- fields

#: ``shape`` [i, j, k] voxels, ``voxel_mm`` [3] mm, ``assembly_ms`` from the last
#: instance's arrival to the assembled volume, ``instances`` DICOM instances in it.
VOLUME_RECEIVED_FIELDS: Final = ("shape", "voxel_mm", "assembly_ms", "instances")

#: Six rigid parameters (mm, rad; RAS+ about the volume centre, fMRIPrep names),
#: then whether the estimate is untrusted and why, Gauss-Newton iterations and
#: the correlation with the reference.
MOTION_FIELDS: Final = (*PARAM_NAMES, "flagged", "reason", "iterations", "correlation")

#: End-to-end latency of the volume in ms, from the arrival of its last
#: instance to the publication of its QC.
QC_LATENCY_MS: Final = "latency_ms"

#: Keys of :meth:`QCFrame.as_dict` plus :data:`QC_LATENCY_MS`.
QC_FIELDS: Final = (
    "index",
    "fd_mm",
    "dvars",
    "std_dvars",
    "global_signal",
    "tsnr_median",
    "outlier",
    "outlier_reasons",
    "usable",
    QC_LATENCY_MS,
)

#: Keys of ``qc`` values ``usable`` (:meth:`UsableSummary.as_dict`).
USABLE_FIELDS: Final = ("frames_total", "minutes_total", "goal_minutes", "thresholds")
#: Keys of each entry of ``usable["thresholds"]``.
USABLE_THRESHOLD_FIELDS: Final = (
    "fd_threshold_mm",
    "frames",
    "minutes",
    "fraction",
    "minutes_to_goal",
)

TargetStatus = Literal["provisional", "settling", "stable"]
#: From least to most settled.
TARGET_STATUSES: Final[tuple[TargetStatus, ...]] = ("provisional", "settling", "stable")

#: ``status`` (one of :data:`TARGET_STATUSES`), ``ras_mm`` scanner RAS+ [3],
#: ``mni_mm`` [3], ``split_half_mm`` distance between the targets of the two
#: halves of the good data, ``drift_mm`` how far the target moved in the last
#: minute, ``good_minutes`` of data behind it. Producers may add fields.
TARGET_FIELDS: Final = (
    "status",
    "ras_mm",
    "mni_mm",
    "split_half_mm",
    "drift_mm",
    "good_minutes",
)
TARGET_ARRAY_MAP: Final = "map"
TARGET_AFFINE: Final = "vox2ras"

WARNING_FIELDS: Final = ("message", "code")

GuidanceState = Literal["cannot-tell-yet", "keep-scanning", "enough-data", "not-settling"]
#: :data:`boldstream.analysis.GUIDANCE_STATES`, repeated for readers of this module.
GUIDANCE_STATES: Final[tuple[GuidanceState, ...]] = (
    "cannot-tell-yet",
    "keep-scanning",
    "enough-data",
    "not-settling",
)
#: ``state`` (one of :data:`GUIDANCE_STATES`), ``message`` for the technician,
#: ``minutes_more`` further scan minutes predicted until the target is settled
#: (keep-scanning only, else None), ``minutes_more_range`` [low, high] or None,
#: ``reason`` in words, then ``good_minutes`` at ``fd_threshold_mm``,
#: ``minutes_to_goal`` (the usable-data goal), the target's ``split_half_mm``,
#: ``drift_mm`` and ``target_status``, and ``fit`` {a, b, residual_sd, points,
#: settled_good_minutes} or None. Producers may add fields.
GUIDANCE_FIELDS: Final = (
    "state",
    "message",
    "minutes_more",
    "minutes_more_range",
    "reason",
    "good_minutes",
    "fd_threshold_mm",
    "minutes_to_goal",
    "split_half_mm",
    "drift_mm",
    "target_status",
    "fit",
)


# --------------------------------------------------------------------------- builders


def volume_received_result(
    series: SeriesInfo,
    index: int,
    *,
    shape: Sequence[int],
    voxel_mm: Sequence[float],
    assembly_ms: float,
    instances: int,
) -> Result:
    """The receiver's state after assembling volume ``index``."""
    return Result(
        VOLUME_RECEIVED,
        series,
        index,
        values={
            "shape": [int(n) for n in shape],
            "voxel_mm": [float(v) for v in voxel_mm],
            "assembly_ms": float(assembly_ms),
            "instances": int(instances),
        },
    )


def motion_result(
    series: SeriesInfo,
    index: int,
    params: Sequence[float],
    *,
    flagged: bool,
    reason: str | None,
    iterations: int,
    correlation: float,
) -> Result:
    """Motion of volume ``index``: ``params`` in :data:`PARAM_NAMES` order (mm, rad)."""
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"motion params: expected {len(PARAM_NAMES)} values, got {len(params)}")
    values: dict[str, Any] = {n: float(p) for n, p in zip(PARAM_NAMES, params, strict=True)}
    values.update(
        flagged=bool(flagged),
        reason=reason,
        iterations=int(iterations),
        correlation=float(correlation),
    )
    return Result(MOTION, series, index, values=values)


def qc_result(
    series: SeriesInfo, index: int, frame: QCFrame, *, latency_ms: float | None
) -> Result:
    """QC of volume ``index`` with its end-to-end latency."""
    values = frame.as_dict()
    values[QC_LATENCY_MS] = None if latency_ms is None else float(latency_ms)
    return Result(QC, series, index, values=values)


def target_result(
    series: SeriesInfo,
    index: int | None,
    values: Mapping[str, Any],
    *,
    correlation_map: npt.NDArray[np.float32],
    vox2ras: npt.NDArray[np.float64],
) -> Result:
    """A provisional target with its correlation map and the map's affine."""
    status = values.get("status")
    if status not in TARGET_STATUSES:
        raise ValueError(f"target status must be one of {TARGET_STATUSES}, got {status!r}")
    if correlation_map.ndim != 3:
        raise ValueError(f"target map must be 3-D, got shape {correlation_map.shape}")
    return Result(
        TARGET,
        series,
        index,
        values=dict(values),
        arrays={TARGET_ARRAY_MAP: np.asarray(correlation_map, dtype=np.float32)},
        affines={TARGET_AFFINE: np.asarray(vox2ras, dtype=np.float64)},
    )


def guidance_result(series: SeriesInfo, index: int | None, values: Mapping[str, Any]) -> Result:
    """The scan guidance after volume ``index`` (values: :data:`GUIDANCE_FIELDS`)."""
    state = values.get("state")
    if state not in GUIDANCE_STATES:
        raise ValueError(f"guidance state must be one of {GUIDANCE_STATES}, got {state!r}")
    missing = [k for k in ("message", "reason") if not isinstance(values.get(k), str)]
    if missing:
        raise ValueError(f"guidance needs text in {missing}")
    return Result(GUIDANCE, series, index, values=dict(values))


def warning_result(
    series: SeriesInfo | None, index: int | None, message: str, *, code: str
) -> Result:
    """Something the technician should know now ("motion-spike", "volume-late"...)."""
    return Result(WARNING, series, index, values={"message": message, "code": code})
