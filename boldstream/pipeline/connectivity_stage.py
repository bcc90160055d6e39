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
   ``fd_censor_mm`` or flagged are censored). A volume lost on the way (a
   gap) becomes a censored frame, so the buffer keeps its time axis.
3. Every ``every_s`` seconds of data, and at the series' end, the target is
   recomputed (:class:`~boldstream.analysis.TargetTracker`) and published as
   a ``target`` result (:func:`~boldstream.sinks.topics.target_result`)
   with its map and ``vox2ras``.

Ordering and latency: in the pipeline, the QC stage sends its ``qc`` and
``motion`` results (and warnings and checkpoint notes) straight to the hub,
past this stage, so a registration (0.5-1.5 s at 90x90x60, docs/benchmarks.md),
a target recompute or a checkpoint write here does not delay them; whatever
else reaches this stage passes straight through. A series' last target is
emitted before its ``series-end``, and the pipeline counts a series as
finished only when its end arrives, so a ``drain`` waits for it. The
corrected volume is passed on only with ``forward_corrected`` (the pipeline's
consumers want it); otherwise a small ``pipeline.passed`` note goes on in its
place, which tells the hub that this stage has handled the volume.

Restarts: with a checkpoint folder (process mode), a series' state (the
registration and masks, the running sums, the ring buffer, the target
history and the last target) is written after every target recompute, and
every ``checkpoint_every`` volumes when no target comes; not while the first
volumes wait for the registration. The state is tens of MB, hence the sparse
cadence; the pipeline's journal keeps the volumes since the last checkpoint.
A restarted stage resumes each open series from its checkpoint (or, before
the first one, from the series' first volume, which the journal still
holds), so the targets after a restart are those of an uninterrupted run;
what it emitted for a re-sent volume (warnings, the target at the
checkpoint) it emits again, and the pipeline publishes each once.
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
from boldstream.analysis.registration import (
    NativeRois,
    Registration,
    native_rois,
    register_to_template,
)
from boldstream.analysis.rois import TemplateRois, template_rois
from boldstream.analysis.target import TargetRules, TargetTracker
from boldstream.config.settings import Settings
from boldstream.errors import AnalysisError
from boldstream.pipeline.series_stage import (
    CORRECTED,
    PASSED,
    SKIPPED,
    Gate,
    SeriesStage,
    SeriesState,
    corrected_index,
    history_from,
)
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, series_key

__all__ = ["ConnectivityStage", "connectivity_options"]

#: Below this brain-mask Dice the registration is reported as poor.
POOR_DICE = 0.75
#: The native masks, written once per series beside its checkpoints.
_MASKS = ("brain", "seed", "search", "wm", "csf")
#: Volumes between this stage's checkpoints, as a multiple of the pipeline's.
_SPARSE = 4


def _prefixed(arrays: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


@dataclass(eq=False)
class _ConnSeries(SeriesState):
    tr_s: float = 2.0
    #: (index, volume, params, usable) held until the registration; volume and
    #: params None for a volume lost meanwhile.
    pending: list[tuple[int, npt.NDArray[np.float32] | None, list[float] | None, bool]] = field(
        default_factory=list
    )
    conn: SeedConnectivity | None = None
    tracker: TargetTracker | None = None
    failed: str | None = None
    since_target: int = 0
    #: The last target result (a restarted stage sends it again if it was lost).
    last_target: Result | None = None
    #: Rebuilt from a checkpoint by a restarted stage.
    restored: bool = False


class ConnectivityStage(SeriesStage):
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
        super().__init__(
            name, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, history=history
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

    def new_state(self, series: SeriesInfo) -> SeriesState:
        tr = series.tr_s if series.tr_s is not None and series.tr_s > 0 else self.default_tr_s
        return _ConnSeries(info=series, gate=Gate(), tr_s=float(tr))

    def restore_state(
        self, series: SeriesInfo, index: int, state: dict[str, Any], arrays: dict[str, Any]
    ) -> SeriesState:
        out = _ConnSeries(
            info=series,
            gate=Gate(int(state["next"])),
            history=history_from(state["history"]),
            last_index=index,
            tr_s=float(state["tr_s"]),
            failed=state["failed"],
            since_target=int(state["since_target"]),
            restored=True,
        )
        if "registration" in state:
            out.conn = self._restore_connectivity(series, out.tr_s, state, arrays)
            out.tracker = TargetTracker(
                native2mni=out.conn.rois.registration.native2mni,
                rules=self.rules,
                **self.tracker_options,
            )
            out.tracker.restore(state["tracker"], _prefixed(arrays, "tracker_"))
        if "last_target" in state:
            last = state["last_target"]
            out.last_target = topics.target_result(
                series,
                int(last["index"]),
                last["values"],
                correlation_map=arrays["target_map"],
                vox2ras=arrays["target_vox2ras"],
            )
        return out

    def _restore_connectivity(
        self, series: SeriesInfo, tr_s: float, state: dict[str, Any], arrays: dict[str, Any]
    ) -> SeedConnectivity:
        assert self.store is not None
        fixed = {name: self.store.read_fixed(series, name) for name in (*_MASKS, "vox2ras")}
        missing = sorted(name for name, value in fixed.items() if value is None)
        if missing:
            raise ValueError(f"checkpoint without its fixed arrays {missing}")
        reg = state["registration"]
        registration = Registration(
            native2mni=np.asarray(reg["native2mni"], dtype=np.float64),
            dice=float(reg["dice"]),
            correlation=float(reg["correlation"]),
            iterations=int(reg["iterations"]),
            converged=bool(reg["converged"]),
            n_volumes=int(reg["n_volumes"]),
        )
        masks = {name: np.asarray(fixed[name], dtype=bool) for name in _MASKS}
        rois = NativeRois(
            **masks,
            vox2ras=np.asarray(fixed["vox2ras"], dtype=np.float64),
            registration=registration,
        )
        conn = SeedConnectivity(rois, tr_s=tr_s, **self.connectivity_options)
        try:
            conn.restore(state["connectivity"], _prefixed(arrays, "conn_"))
        except AnalysisError as exc:
            raise ValueError(str(exc)) from exc
        return conn

    def checkpoint_state(self, state: SeriesState) -> tuple[dict[str, Any], dict[str, Any]]:
        assert isinstance(state, _ConnSeries)
        data: dict[str, Any] = {
            "tr_s": state.tr_s,
            "failed": state.failed,
            "since_target": state.since_target,
        }
        arrays: dict[str, Any] = {}
        if state.conn is not None and state.tracker is not None:
            scalars, conn_arrays = state.conn.state()
            tracker_scalars, tracker_arrays = state.tracker.state()
            data["registration"] = state.conn.rois.registration.as_dict()
            data["connectivity"] = scalars
            data["tracker"] = tracker_scalars
            arrays.update({f"conn_{k}": v for k, v in conn_arrays.items()})
            arrays.update({f"tracker_{k}": v for k, v in tracker_arrays.items()})
        last = state.last_target
        if last is not None:
            data["last_target"] = {"index": last.index, "values": last.values}
            arrays["target_map"] = last.arrays[topics.TARGET_ARRAY_MAP]
            arrays["target_vox2ras"] = last.affines[topics.TARGET_AFFINE]
        return data, arrays

    def can_checkpoint(self, state: SeriesState) -> bool:
        # Volumes held for the registration are not part of the state.
        return not (isinstance(state, _ConnSeries) and state.pending)

    def process(self, message: Message) -> Iterable[Message]:
        p = message.payload
        series = message.series
        if series is not None and isinstance(p, Result) and p.topic == CORRECTED:
            key = series_key(series)
            if key not in self._series and p.index is not None:
                # First sight of a series mid-way: this process was restarted.
                # Its checkpoint, if any, says where to go on. Without one, the
                # journal re-sends the series from its first volume when it
                # waits for this stage's checkpoints (process mode), and this
                # volume may be a live one that overtook that re-send: the gate
                # stays at 0 and holds it. Otherwise (no checkpoint folder, or a
                # checkpoint that could not be read, up to which the journal may
                # have forgotten) start at this volume.
                state = self._state(series)
                if (
                    state is not None
                    and state.last_index is None
                    and not self._journal_holds_start(series)
                ):
                    state.gate = Gate(p.index)
        return list(super().process(message))

    def _journal_holds_start(self, series: SeriesInfo) -> bool:
        """Whether the pipeline still holds this series from its first volume."""
        store = self.store
        return store is not None and not (store.folder(series) / "state.json").exists()

    def end_series(self, state: SeriesState, message: Message) -> list[Message]:
        assert isinstance(state, _ConnSeries)
        return self._final_target(state, message)

    def handle(self, state: SeriesState, message: Message, fresh: bool) -> list[Message]:
        assert isinstance(state, _ConnSeries)
        p = message.payload
        if isinstance(p, Gap):
            if fresh and state.failed is None:
                # Keep the time axis: the lost TR becomes a censored frame.
                if state.conn is not None:
                    state.conn.missing()
                elif state.pending:
                    state.pending.append((p.index, None, None, False))
            return [message]
        assert isinstance(p, Result) and p.index is not None
        index = p.index
        if p.topic == SKIPPED:
            return [message]
        out: list[Message] = []
        if not fresh:
            out.extend(self._emitted_before(state, message, index))
        elif state.failed is None:
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
            self._remember_emitted(state, index, out)
        if self.forward_corrected:
            out.append(message)
        else:
            # The hub takes a volume as done once its qc result (sent by QC
            # straight to the hub) and this acknowledgement are both in.
            out.append(message.derive(Result(PASSED, state.info, index)))
        return out

    def _remember_emitted(self, state: _ConnSeries, index: int, out: list[Message]) -> None:
        """Note what volume ``index`` made this stage publish, to send it again if re-sent."""
        warnings = [
            [m.payload.values["code"], m.payload.values["message"]]
            for m in out
            if isinstance(m.payload, Result) and m.topic == topics.WARNING
        ]
        target = any(m.topic == topics.TARGET for m in out)
        if warnings or target:
            self.remember(state, index, {"warnings": warnings, "target": target})

    def _emitted_before(self, state: _ConnSeries, message: Message, index: int) -> list[Message]:
        """What a volume seen before (re-sent after a restart) made this stage publish."""
        entry = state.history.get(index)
        if entry is None:
            return []
        out = [
            message.derive(topics.warning_result(state.info, index, text, code=code))
            for code, text in entry.get("warnings", [])
        ]
        if entry.get("target"):
            last = state.last_target
            if last is not None and last.index == index:
                out.append(message.derive(last))
            else:
                self.log.warning("target of a re-sent volume is no longer held", volume=index)
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
                if vol is None or prm is None:
                    state.conn.missing()  # a volume lost while these waited
                    continue
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
        usable = [v for (_, v, _, ok) in state.pending if ok and v is not None]
        if not usable:
            usable = [v for (_, v, _, _) in state.pending if v is not None]
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
        if self.store is not None:
            for name in _MASKS:
                self.store.write_fixed(state.info, name, getattr(rois, name))
            self.store.write_fixed(state.info, "vox2ras", rois.vox2ras)
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
        state.last_target = result
        state.checkpoint_due = True
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
        if state.conn is None or state.last_index is None:
            return []
        if state.since_target == 0:
            # Nothing new since the last target; a restarted stage sends that
            # one again in case it was lost with its predecessor.
            last = state.last_target
            return [message.derive(last)] if state.restored and last is not None else []
        try:
            return self._target(state, message, state.last_index)
        except Exception:
            self.log.exception("final target failed")
            return []


def connectivity_options(settings: Settings, *, checkpoint_dir: str | None) -> dict[str, Any]:
    """Factory keyword arguments of :class:`ConnectivityStage` (JSON-able).

    Its state is tens of MB, so besides after every target it is written
    only every ``4 * pipeline.checkpoint_every`` volumes.
    """
    c, t = settings.connectivity, settings.target
    return {
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": _SPARSE * settings.pipeline.checkpoint_every,
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
