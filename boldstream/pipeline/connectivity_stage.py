"""The connectivity stage: seed map and provisional TMS target, per series, after QC.

:class:`ConnectivityStage` (factory
``boldstream.pipeline.connectivity_stage:ConnectivityStage``) takes the QC
stage's output with the corrected volumes forwarded (``pipeline.corrected``:
the volume, its six motion parameters and whether motion correction flagged
it), in index order through the same per-series gate as the other stages.

Per series:

1. The first ``registration_volumes`` corrected volumes (flagged ones left out
   of the mean) are held; their mean is registered to MNI152
   (:func:`~boldstream.analysis.register_to_template`) and the template's
   seed, search region, brain, WM and CSF masks are pulled into the EPI grid
   (:func:`~boldstream.analysis.native_rois`). The held volumes then enter
   the analysis like every later one, so nothing is lost. A registration
   that fails stops connectivity for that series with a ``warning``
   (``registration-failed``); a poor one (brain Dice < 0.75) is published as a
   ``warning`` (``registration-poor``) and analysis goes on.
2. Every corrected volume updates the running connectivity
   (:class:`~boldstream.analysis.SeedConnectivity`; FD is computed from
   consecutive motion parameters exactly as QC does, frames above
   ``fd_censor_mm`` or flagged are censored).
3. Every ``every_s`` seconds of data, and at the series' end, the target is
   recomputed (:class:`~boldstream.analysis.TargetTracker`) and published as
   a ``target`` result (:func:`~boldstream.sinks.topics.target_result`)
   with its map and ``vox2ras``.

Ordering and latency: ``qc`` results and everything else pass straight
through, so connectivity never delays the QC of a volume (a registration or
a target recompute takes up to a second). A series' last target is emitted
before its ``series-end``, and the pipeline counts a series as finished only
when its end arrives, so a ``drain`` waits for it. The corrected volume is
passed on only with ``forward_corrected`` (the pipeline's consumers want it);
otherwise it stops here.

No checkpoint: a series' state is tens of MB (running sums for every brain
voxel and the ring buffer), so this stage is not one of the pipeline's
stateful stages. If its process dies and is restarted, each open series
starts its connectivity again from the volumes that follow (a new
registration after ``registration_volumes`` of them); the ``target`` results
published before stay valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from boldstream.analysis.connectivity import SeedConnectivity
from boldstream.analysis.registration import native_rois, register_to_template
from boldstream.analysis.rois import TemplateRois, template_rois
from boldstream.analysis.target import TargetRules, TargetTracker
from boldstream.config.settings import Settings
from boldstream.errors import AnalysisError
from boldstream.pipeline.stages import (
    CORRECTED,
    SKIPPED,
    _Gate,
    _SeriesStage,
    _SeriesState,
    corrected_index,
)
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, series_key

__all__ = ["ConnectivityStage", "connectivity_options"]

#: Below this brain-mask Dice the registration is reported as poor.
POOR_DICE = 0.75


@dataclass(eq=False)
class _ConnSeries(_SeriesState):
    tr_s: float = 2.0
    #: (index, volume, params, usable) held until the registration.
    pending: list[tuple[int, npt.NDArray[np.float32], list[float], bool]] = field(
        default_factory=list
    )
    conn: SeedConnectivity | None = None
    tracker: TargetTracker | None = None
    failed: str | None = None
    since_target: int = 0


class ConnectivityStage(_SeriesStage):
    """Per-series seed connectivity and target; see the module docstring."""

    def __init__(
        self,
        name: str = "connectivity",
        *,
        registration_volumes: int = 10,
        fd_censor_mm: float = 0.5,
        motion_model: Literal["6", "12", "24"] = "12",
        bandpass: bool = True,
        bandpass_hz: tuple[float, float] | list[float] = (0.01, 0.1),
        buffer_minutes: float = 30.0,
        seed_radius_mm: float = 10.0,
        search_radius_mm: float = 20.0,
        method: Literal["centroid", "peak"] = "centroid",
        every_s: float = 30.0,
        fwhm_mm: float = 5.0,
        percentile: float = 10.0,
        rules: dict[str, float] | None = None,
        surrogates: int = 200,
        default_tr_s: float = 2.0,
        forward_corrected: bool = False,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        history: int = 256,
    ) -> None:
        # never checkpointed (see the module docstring): the store stays off
        del checkpoint_dir
        super().__init__(
            name, checkpoint_dir=None, checkpoint_every=checkpoint_every, history=history
        )
        self.registration_volumes = max(1, int(registration_volumes))
        self.connectivity_options: dict[str, Any] = {
            "fd_censor_mm": fd_censor_mm,
            "motion_model": motion_model,
            "bandpass_hz": (float(bandpass_hz[0]), float(bandpass_hz[1])),
            "buffer_minutes": buffer_minutes,
        }
        self.seed_radius_mm = seed_radius_mm
        self.search_radius_mm = search_radius_mm
        self.tracker_options: dict[str, Any] = {
            "method": method,
            "fwhm_mm": fwhm_mm,
            "percentile": percentile,
            "bandpass": bandpass,
            "surrogates": surrogates,
        }
        self.rules = TargetRules(**(rules or {}))
        self.every_s = float(every_s)
        self.default_tr_s = default_tr_s
        self.forward_corrected = forward_corrected
        self._rois: TemplateRois | None = None

    # -- hooks ------------------------------------------------------------------------

    def gate_index(self, message: Message) -> int | None:
        return corrected_index(message)

    def new_state(self, series: SeriesInfo) -> _SeriesState:
        tr = series.tr_s if series.tr_s is not None and series.tr_s > 0 else self.default_tr_s
        return _ConnSeries(info=series, gate=_Gate(), tr_s=float(tr))

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> _SeriesState:
        return self.new_state(series)

    def checkpoint_state(self, state: _SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def process(self, message: Message) -> Iterable[Message]:
        p = message.payload
        series = message.series
        if series is not None and isinstance(p, Result) and p.topic == CORRECTED:
            key = series_key(series)
            if key not in self._series and p.index is not None:
                # first sight of a series mid-way (this process was restarted)
                state = self.new_state(series)
                state.gate = _Gate(p.index)
                self._series[key] = state
                self.counts["series"] += 1
        if series is not None and isinstance(p, SeriesEnd):
            key = series_key(series)
            current = self._series.get(key)
            out: list[Message] = []
            if isinstance(current, _ConnSeries):
                out.extend(self._final_target(current, message))
            out.extend(super().process(message))
            return out
        return list(super().process(message))

    def handle(self, state: _SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _ConnSeries)
        p = message.payload
        if isinstance(p, Gap):
            return [message]
        assert isinstance(p, Result) and p.index is not None
        index = p.index
        if p.topic == SKIPPED:
            return [message]
        out: list[Message] = []
        if fresh and state.failed is None:
            try:
                out.extend(self._analyse(state, message, p))
            except Exception as exc:
                # Not the base class's failure path: that would mark the volume
                # skipped, and the pipeline would then drop its qc result.
                self.counts["failed"] += 1
                state.failed = f"{type(exc).__name__}: {exc}"
                self.log.exception("connectivity failed; off for this series")
                text = f"connectivity stopped for this series at volume {index}: {state.failed}"
                out.append(
                    message.derive(
                        topics.warning_result(state.info, index, text, code="connectivity-failed")
                    )
                )
        if self.forward_corrected:
            out.append(message)
        return out

    # -- analysis -----------------------------------------------------------------------

    def _analyse(self, state: _ConnSeries, message: Message, p: Result) -> list[Message]:
        index = p.index
        assert index is not None
        volume = np.asarray(p.arrays["data"], dtype=np.float32)
        params = [float(v) for v in p.values["params"]]
        usable = not bool(p.values.get("flagged", False))
        out: list[Message] = []
        if state.conn is None:
            state.pending.append((index, volume, params, usable))
            good = sum(1 for item in state.pending if item[3])
            if good < self.registration_volumes and len(state.pending) < 4 * max(
                self.registration_volumes, 1
            ):
                return out
            out.extend(self._start(state, message))
            if state.conn is None:
                return out
            pending, state.pending = state.pending, []
            for i, vol, prm, ok in pending:
                state.conn.update(vol, prm, usable=ok, index=i)
                state.since_target += 1
        else:
            state.conn.update(volume, params, usable=usable, index=index)
            state.since_target += 1
        every = max(1, math.ceil(self.every_s / state.tr_s - 1e-9))
        if state.since_target >= every:
            out.extend(self._target(state, message, index))
        return out

    def _start(self, state: _ConnSeries, message: Message) -> list[Message]:
        usable = [v for (_, v, _, ok) in state.pending if ok]
        if not usable:
            usable = [v for (_, v, _, _) in state.pending]
        mean = np.mean(usable, axis=0)
        payload = message.payload
        assert isinstance(payload, Result)
        vox2ras = np.asarray(payload.affines["vox2ras"], dtype=np.float64)
        index = state.pending[-1][0]
        started = time.perf_counter()
        try:
            registration = register_to_template(mean, vox2ras, n_volumes=len(usable))
            rois = native_rois(self._template_rois(), registration, mean, vox2ras)
            state.conn = SeedConnectivity(rois, tr_s=state.tr_s, **self.connectivity_options)
        except AnalysisError as exc:
            state.failed = str(exc)
            state.pending = []
            self.log.error("registration failed; no connectivity for this series", reason=str(exc))
            return [
                message.derive(
                    topics.warning_result(
                        state.info,
                        index,
                        f"no connectivity map or target for this series: {exc}",
                        code="registration-failed",
                    )
                )
            ]
        state.tracker = TargetTracker(
            native2mni=registration.native2mni, rules=self.rules, **self.tracker_options
        )
        self.log.info(
            "registered to MNI152",
            dice=round(registration.dice, 3),
            correlation=round(registration.correlation, 3),
            seconds=round(time.perf_counter() - started, 2),
            voxels=rois.counts(),
        )
        if registration.dice < POOR_DICE:
            return [
                message.derive(
                    topics.warning_result(
                        state.info,
                        index,
                        f"registration to MNI152 looks poor (brain Dice "
                        f"{registration.dice:.2f}); the target's MNI position is uncertain",
                        code="registration-poor",
                    )
                )
            ]
        return []

    def _template_rois(self) -> TemplateRois:
        if self._rois is None:
            self._rois = template_rois(
                seed_radius_mm=self.seed_radius_mm, search_radius_mm=self.search_radius_mm
            )
        return self._rois

    def _target(self, state: _ConnSeries, message: Message, index: int) -> list[Message]:
        state.since_target = 0
        assert state.conn is not None and state.tracker is not None
        estimate = state.tracker.update(state.conn)
        if estimate is None:
            return []
        values = dict(estimate.values)
        registration = state.conn.rois.registration
        values["registration_dice"] = registration.dice
        result = topics.target_result(
            state.info,
            index,
            values,
            correlation_map=estimate.correlation_map,
            vox2ras=estimate.vox2ras,
        )
        self.log.info(
            "target",
            volume=index,
            status=values["status"],
            ras_mm=[round(v, 1) for v in values["ras_mm"]],
            split_half_mm=values["split_half_mm"],
            good_minutes=round(values["good_minutes"], 2),
        )
        return [message.derive(result)]

    def _final_target(self, state: _ConnSeries, message: Message) -> list[Message]:
        if state.conn is None or state.since_target == 0 or state.last_index is None:
            return []
        try:
            return self._target(state, message, state.last_index)
        except Exception:
            self.log.exception("final target failed")
            return []


def connectivity_options(settings: Settings) -> dict[str, Any]:
    """Factory keyword arguments of :class:`ConnectivityStage` (JSON-able)."""
    c, t = settings.connectivity, settings.target
    return {
        "registration_volumes": c.registration_volumes,
        "fd_censor_mm": c.fd_censor_mm,
        "motion_model": c.motion_model,
        "bandpass": c.bandpass,
        "bandpass_hz": [c.bandpass_low_hz, c.bandpass_high_hz],
        "buffer_minutes": c.buffer_minutes,
        "seed_radius_mm": c.seed_radius_mm,
        "search_radius_mm": c.search_radius_mm,
        "method": t.method,
        "every_s": t.every_s,
        "fwhm_mm": t.fwhm_mm,
        "percentile": t.percentile,
        "rules": t.rules(),
        "surrogates": t.null_surrogates,
        "default_tr_s": settings.qc.default_tr_s,
    }
