"""The guidance stage: one answer for the technician from QC and the target, per series.

:class:`GuidanceStage` (factory ``boldstream.pipeline.guidance_stage:GuidanceStage``)
reads what the pipeline already publishes for a series, and adds ``guidance``
results (:func:`~boldstream.sinks.topics.guidance_result`):

- each ``target`` result becomes a :class:`~boldstream.analysis.GuidancePoint`
  of the series' :class:`~boldstream.analysis.GuidanceModel` (good minutes,
  split-half distance, drift, status, reasons, censored minutes), and a
  guidance follows at once;
- each ``qc`` result updates the usable-data summary (good minutes at
  ``fd_threshold_mm``, minutes to the usable-data goal) and, every
  ``every_volumes`` volumes, the guidance is published again with the scan
  time so far (the minutes still needed shrink as the scan goes on);
- at ``series-end`` the last guidance is published once more (with the final
  counts) before the end, so a file sink has it before it finishes the series.

It is cheap (a two-parameter fit and a few hundred refits per target), so the
pipeline's hub calls it in place on the results it publishes, like the
orderer: :meth:`GuidanceStage.observe` returns only the new ``guidance``
messages. As a chain stage, :meth:`GuidanceStage.process` passes every message
on, followed by those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from boldstream.analysis.guidance import GuidanceModel, GuidancePoint
from boldstream.analysis.target import TargetRules
from boldstream.config.settings import Settings
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.stream.messages import Message, Result, SeriesEnd, series_key
from boldstream.stream.stage import Stage

__all__ = ["GuidanceStage", "guidance_options"]

Key = tuple[str, str]


@dataclass(eq=False)
class _Series:
    info: SeriesInfo
    model: GuidanceModel
    last_index: int | None = None
    since: int = 0
    minutes_total: float | None = None
    good_minutes: float | None = None
    minutes_to_goal: float | None = None
    fd_threshold_mm: float | None = None
    target: dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class GuidanceStage(Stage):
    """Per-series scan guidance; see the module docstring."""

    def __init__(
        self,
        name: str = "guidance",
        *,
        rules: Mapping[str, float] | None = None,
        fd_threshold_mm: float = 0.5,
        every_volumes: int = 5,
        min_points: int = 4,
        min_fit_minutes: float = 3.0,
        verdict_good_minutes: float = 8.0,
        horizon_minutes: float = 20.0,
        rebound_mm: float = 5.0,
        resamples: int = 200,
        band: float = 90.0,
    ) -> None:
        self.name = name
        self.rules = TargetRules(**(rules or {}))
        self.fd_threshold_mm = float(fd_threshold_mm)
        self.every_volumes = max(1, int(every_volumes))
        self.model_options: dict[str, Any] = {
            "min_points": min_points,
            "min_fit_minutes": min_fit_minutes,
            "verdict_good_minutes": verdict_good_minutes,
            "horizon_minutes": horizon_minutes,
            "rebound_mm": rebound_mm,
            "resamples": resamples,
            "band": band,
        }
        self._series: dict[Key, _Series] = {}
        self.counts = {"published": 0, "series": 0}

    # -- Stage ---------------------------------------------------------------------------

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message.payload, SeriesEnd):
            return [*self.observe(message), message]
        return [message, *self.observe(message)]

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "open_series": len(self._series)}

    # -- in place ------------------------------------------------------------------------

    def observe(self, message: Message) -> list[Message]:
        """New ``guidance`` messages for ``message`` (a published result or series end)."""
        p = message.payload
        series = message.series
        if series is None:
            return []
        key = series_key(series)
        if isinstance(p, SeriesEnd):
            state = self._series.pop(key, None)
            if state is None or not state.target:
                return []
            return [self._publish(state, message)]
        if not isinstance(p, Result):
            return []
        if p.topic == topics.QC:
            state = self._state(series)
            self._on_qc(state, p)
            state.since += 1
            if state.target and state.since >= self.every_volumes:
                return [self._publish(state, message)]
            return []
        if p.topic == topics.TARGET:
            state = self._state(series)
            self._on_target(state, p)
            return [self._publish(state, message)]
        return []

    # -- internals -------------------------------------------------------------------------

    def _state(self, series: SeriesInfo) -> _Series:
        key = series_key(series)
        state = self._series.get(key)
        if state is None:
            model = GuidanceModel(rules=self.rules, **self.model_options)
            state = self._series[key] = _Series(info=series, model=model)
            self.counts["series"] += 1
        return state

    def _on_qc(self, state: _Series, p: Result) -> None:
        if p.index is not None:
            state.last_index = max(p.index, state.last_index or p.index)
        usable = p.values.get("usable")
        if not isinstance(usable, Mapping):
            return
        state.minutes_total = _number(usable.get("minutes_total"))
        rows = [r for r in usable.get("thresholds") or () if isinstance(r, Mapping)]
        rows = [r for r in rows if _number(r.get("fd_threshold_mm")) is not None]
        if not rows:
            return
        row = min(
            rows,
            key=lambda r: abs(float(r["fd_threshold_mm"]) - self.fd_threshold_mm),
        )
        state.fd_threshold_mm = _number(row.get("fd_threshold_mm"))
        state.good_minutes = _number(row.get("minutes"))
        state.minutes_to_goal = _number(row.get("minutes_to_goal"))

    def _on_target(self, state: _Series, p: Result) -> None:
        v = p.values
        if p.index is not None:
            state.last_index = max(p.index, state.last_index or p.index)
        good = _number(v.get("good_minutes")) or 0.0
        reasons = v.get("reasons")
        point = GuidancePoint(
            good_minutes=good,
            split_half_mm=_number(v.get("split_half_mm")),
            drift_mm=_number(v.get("drift_mm")),
            status=str(v.get("status")),
            reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
            censored_minutes=_number(v.get("censored_minutes")) or 0.0,
            minutes=_number(v.get("minutes")),
            p_value=_number(v.get("p_value")),
            held_s=_number(v.get("held_s")),
        )
        state.model.add(point)
        state.target = {
            "split_half_mm": point.split_half_mm,
            "drift_mm": point.drift_mm,
            "target_status": v.get("status") if v.get("status") in topics.TARGET_STATUSES else None,
        }

    def _publish(self, state: _Series, message: Message) -> Message:
        state.since = 0
        guidance = state.model.guidance(scan_minutes=state.minutes_total)
        values = guidance.as_dict()
        values.update(
            good_minutes=state.good_minutes,
            fd_threshold_mm=state.fd_threshold_mm,
            minutes_to_goal=state.minutes_to_goal,
            **state.target,
        )
        if state.good_minutes is not None and state.fd_threshold_mm is not None:
            usable = f"{state.good_minutes:.1f} good minutes at FD < {state.fd_threshold_mm:g} mm"
            if state.minutes_to_goal:
                usable += f" (usable-data goal in ~{state.minutes_to_goal:.1f} min)"
            values["reason"] = f"{values['reason']}; {usable}" if values["reason"] else usable
        self.counts["published"] += 1
        result = topics.guidance_result(state.info, state.last_index, values)
        return Message(result, dict(message.timestamps))


def guidance_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of :class:`GuidanceStage` from :class:`Settings` (JSON-able)."""
    g, t = settings.guidance, settings.target
    return {
        "rules": t.rules(),
        "fd_threshold_mm": g.fd_threshold_mm,
        "every_volumes": g.every_volumes,
        "min_points": g.min_points,
        "min_fit_minutes": g.min_fit_minutes,
        "verdict_good_minutes": g.verdict_good_minutes,
        "horizon_minutes": g.horizon_minutes,
        "rebound_mm": g.rebound_mm,
        "resamples": g.resamples,
        "band": g.band,
    }
