"""Scan guidance: is there enough data for a settled target, and if not, how long?

:class:`GuidanceModel` is fed the target's reliability over time (one
:class:`GuidancePoint` per ``target`` result: good minutes, split-half
distance, drift over the last minute, status and reasons, censored minutes)
and answers with one :class:`Guidance`, in one of four states:

``cannot-tell-yet``
    fewer than ``min_points`` split-half distances, or less than
    ``min_fit_minutes`` good minutes, or a trend too noisy to call either way.
``keep-scanning``
    the split-half distance is shrinking toward the stable limit; about
    ``minutes_more`` further scan minutes (``minutes_more_range`` is the
    ``band`` central interval over resampled fits) until the target is
    predicted to be settled.
``enough-data``
    the latest target is ``stable`` by :class:`~boldstream.analysis.TargetRules`.
``not-settling``
    the split-half distance grew again (the reasons say why: minutes lost to
    censoring, drift), or after ``verdict_good_minutes`` the strongest
    anticorrelation is still no stronger than chance or the fits rarely reach
    the limit within ``horizon_minutes`` of further scanning (a run with no
    anticorrelated network: the null case), or there is still no target.

No time is ever predicted while the target's anticorrelation is no stronger
than chance (its ``p_value`` above ``settling_p``, or untested): a noise map's
split-half distance can shrink too, and a prediction from it would promise a
null run a settled target.

The prediction. Split-half distance ``d`` against good minutes ``m`` is fitted
with ``d(m) = a / sqrt(m) + b`` (``a, b >= 0``, non-negative least squares):
the ``1/sqrt(m)`` term is how the sampling error of a correlation shrinks with
more samples, ``b`` a floor that more data does not remove. The curve meets
the stable limit ``T`` at ``m* = (a / (T - b))^2`` when ``b < T``; never
otherwise. The uncertainty is a residual bootstrap: ``resamples`` refits to
the fitted curve plus resampled residuals, each giving its own ``m*``. Good
minutes still needed are ``max(m* + hold, stable_good_minutes) - m_now``, where
``hold`` is the good minutes in ``stable_hold_s`` (what the limits must still
hold for, if they are met already), and the message says which of these
binds; they become
scan minutes by dividing by the good fraction so far (good minutes / scan
minutes of the target). No prediction is made from fewer points, and none
promises settling when most resampled fits do not reach ``T`` in time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls

from boldstream.analysis.target import TargetRules

__all__ = [
    "GUIDANCE_STATES",
    "Guidance",
    "GuidanceFit",
    "GuidanceModel",
    "GuidancePoint",
    "GuidanceState",
    "fit_split_half",
]

F64 = npt.NDArray[np.float64]
GuidanceState = Literal["cannot-tell-yet", "keep-scanning", "enough-data", "not-settling"]
GUIDANCE_STATES: tuple[GuidanceState, ...] = (
    "cannot-tell-yet",
    "keep-scanning",
    "enough-data",
    "not-settling",
)

NOT_SETTLING_ADVICE = (
    "target not settling: consider re-shimming / instructing the patient / a second run"
)


@dataclass(frozen=True, slots=True)
class GuidancePoint:
    """The target's reliability at one recompute (the values of a ``target`` result)."""

    good_minutes: float
    split_half_mm: float | None
    drift_mm: float | None
    status: str
    reasons: tuple[str, ...] = ()
    censored_minutes: float = 0.0
    #: Scan minutes behind the target (good + censored when None).
    minutes: float | None = None
    #: The target's test of its strongest anticorrelation against chance
    #: (None: not tested, which never counts as beyond chance).
    p_value: float | None = None
    #: Seconds the stable limits have held up to this recompute (None: they do not now).
    held_s: float | None = None

    @property
    def scan_minutes(self) -> float:
        return (
            self.minutes if self.minutes is not None else self.good_minutes + self.censored_minutes
        )


@dataclass(frozen=True, slots=True)
class GuidanceFit:
    """``d(m) = a / sqrt(m) + b`` fitted to the split-half distances."""

    a: float
    b: float
    residual_sd: float
    points: int
    #: Good minutes at which the fitted curve meets the stable limit (inf: never).
    settled_good_minutes: float

    def predict(self, good_minutes: npt.ArrayLike) -> F64:
        m = np.maximum(np.asarray(good_minutes, dtype=np.float64), 1e-9)
        out: F64 = self.a / np.sqrt(m) + self.b
        return out

    def as_dict(self) -> dict[str, Any]:
        m = self.settled_good_minutes
        return {
            "a": self.a,
            "b": self.b,
            "residual_sd": self.residual_sd,
            "points": self.points,
            "settled_good_minutes": m if math.isfinite(m) else None,
        }


@dataclass(frozen=True, slots=True)
class Guidance:
    """One answer for the technician."""

    state: GuidanceState
    message: str
    #: Further scan minutes predicted until the target is settled (keep-scanning only).
    minutes_more: float | None
    #: Central ``band`` interval of ``minutes_more`` over resampled fits.
    minutes_more_range: tuple[float, float] | None
    reason: str
    fit: GuidanceFit | None = None
    #: Fraction of resampled fits that reach the stable limit within the horizon.
    reach_probability: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (no NaN or infinity)."""
        return {
            "state": self.state,
            "message": self.message,
            "minutes_more": self.minutes_more,
            "minutes_more_range": None
            if self.minutes_more_range is None
            else [self.minutes_more_range[0], self.minutes_more_range[1]],
            "reason": self.reason,
            "fit": None if self.fit is None else self.fit.as_dict(),
            "reach_probability": self.reach_probability,
        }


def _more_minutes(minutes: float) -> str:
    """'about 3 more minutes', 'about 1 more minute', 'under a minute more'."""
    n = round(minutes)
    if n < 1:
        return "under a minute more"
    return f"about {n} more minute{'s' if n != 1 else ''}"


def _crossing(a: float, b: float, limit: float) -> float:
    """Good minutes where ``a / sqrt(m) + b`` reaches ``limit`` (inf: never)."""
    if b >= limit:
        return math.inf
    if a <= 0.0:
        return 0.0
    return (a / (limit - b)) ** 2


def _nnls_fit(m: F64, d: F64) -> tuple[float, float]:
    design = np.column_stack([1.0 / np.sqrt(m), np.ones_like(m)])
    coef, _ = nnls(design, d)
    return float(coef[0]), float(coef[1])


def fit_split_half(
    good_minutes: Sequence[float] | F64,
    split_half_mm: Sequence[float] | F64,
    *,
    limit_mm: float,
    resamples: int = 200,
    seed: int = 0,
) -> tuple[GuidanceFit, F64]:
    """Fit ``d(m) = a/sqrt(m) + b``; also ``m*`` of each residual-bootstrap refit."""
    m = np.asarray(good_minutes, dtype=np.float64)
    d = np.asarray(split_half_mm, dtype=np.float64)
    if m.shape != d.shape or m.ndim != 1 or m.size < 2:
        raise ValueError("need at least two (good minutes, split-half) pairs of equal length")
    if not (m > 0).all():
        raise ValueError("good minutes must be positive")
    a, b = _nnls_fit(m, d)
    fitted = a / np.sqrt(m) + b
    resid = d - fitted
    dof = max(1, m.size - 2)
    sd = float(math.sqrt(float((resid**2).sum()) / dof))
    # residuals of a 2-parameter fit are smaller than the errors: inflate them
    pool = resid * math.sqrt(m.size / dof)
    rng = np.random.default_rng(seed)
    crossings = np.empty(resamples, dtype=np.float64)
    for i in range(resamples):
        fake = fitted + rng.choice(pool, size=resid.size, replace=True)
        ra, rb = _nnls_fit(m, fake)
        crossings[i] = _crossing(ra, rb, limit_mm)
    fit = GuidanceFit(
        a=a, b=b, residual_sd=sd, points=int(m.size), settled_good_minutes=_crossing(a, b, limit_mm)
    )
    return fit, crossings


@dataclass
class GuidanceModel:
    """Accumulates :class:`GuidancePoint` s of one series; see the module docstring.

    Thresholds of a settled target come from ``rules`` (the ``[target]``
    settings); the others are the ``[guidance]`` settings.
    """

    rules: TargetRules = field(default_factory=TargetRules)
    #: Split-half distances needed before any prediction.
    min_points: int = 4
    #: Good minutes needed before any prediction.
    min_fit_minutes: float = 3.0
    #: Good minutes before a flat trend is called not settling.
    verdict_good_minutes: float = 8.0
    #: Further scan minutes beyond which a prediction counts as "not in this run".
    horizon_minutes: float = 20.0
    #: Split-half growth (mm) above its best so far that counts as un-settling.
    rebound_mm: float = 5.0
    #: Resampled fits behind the range and the reach probability.
    resamples: int = 200
    #: Central interval (percent) of the resampled predictions reported as the range.
    band: float = 90.0
    seed: int = 0
    points: list[GuidancePoint] = field(default_factory=list)

    def add(self, point: GuidancePoint) -> None:
        self.points.append(point)

    # -- the answer ------------------------------------------------------------------

    def guidance(self, *, scan_minutes: float | None = None) -> Guidance:
        """The advice after the latest point; ``scan_minutes`` is the scan so far if later."""
        if not self.points:
            return Guidance(
                "cannot-tell-yet",
                "cannot tell yet: keep scanning, no target yet",
                None,
                None,
                "no target has been computed yet",
            )
        last = self.points[-1]
        if last.status == "stable":
            return self._enough(last)
        good_fraction = self._good_fraction(last)
        good_now = last.good_minutes
        if scan_minutes is not None and scan_minutes > last.scan_minutes:
            good_now += (scan_minutes - last.scan_minutes) * good_fraction
        series = [
            (p.good_minutes, p.split_half_mm)
            for p in self.points
            if p.split_half_mm is not None and p.good_minutes > 0
        ]
        if len(series) < self.min_points or good_now < self.min_fit_minutes:
            return self._too_early(last, good_now, len(series))
        rebound = self._rebound()
        chance = self._chance(last, good_now, rebound)
        if chance is not None:
            return chance
        if rebound is not None:
            return rebound
        m = np.array([s[0] for s in series])
        d = np.array([float(s[1] or 0.0) for s in series])
        limit = self.rules.stable_split_half_mm
        fit, crossings = fit_split_half(
            m, d, limit_mm=limit, resamples=self.resamples, seed=self.seed
        )
        latest = d[-1]
        below = latest <= limit
        need = self._needed(crossings, below, good_now, last)
        more = (
            (need - good_now) / good_fraction if good_fraction > 0 else np.full_like(need, np.inf)
        )
        more = np.maximum(more, 0.0)
        reach = float(np.mean(more <= self.horizon_minutes))
        point_need = self._needed(np.array([fit.settled_good_minutes]), below, good_now, last)[0]
        point_more = (
            max(0.0, (point_need - good_now) / good_fraction) if good_fraction > 0 else math.inf
        )
        trend = (
            f"split-half {latest:.1f} mm at {m[-1]:.1f} good minutes; fit "
            f"{fit.a:.1f}/sqrt(m) + {fit.b:.1f} mm reaches {limit:g} mm"
        )
        trend += (
            f" at {fit.settled_good_minutes:.1f} good minutes"
            if math.isfinite(fit.settled_good_minutes)
            else " never (its floor is above the limit)"
        )
        trend += (
            f"; {100 * reach:.0f}% of resampled fits get there within {self.horizon_minutes:g} min"
        )
        if reach >= 0.5 and math.isfinite(point_more) and point_more <= self.horizon_minutes:
            lo_q, hi_q = (100 - self.band) / 2, 100 - (100 - self.band) / 2
            finite = np.where(np.isfinite(more), more, self.horizon_minutes)
            lo = float(min(np.percentile(finite, lo_q), point_more))
            hi = float(max(np.percentile(finite, hi_q), point_more))
            binds = self._binding(point_need, good_now, below, fit)
            span = "" if round(lo) == round(hi) else f" ({lo:.0f}-{hi:.0f} min)"
            return Guidance(
                "keep-scanning",
                f"keep scanning: {_more_minutes(point_more)} for a settled target{span}",
                point_more,
                (lo, hi),
                binds + "; " + trend + self._blockers(last),
                fit=fit,
                reach_probability=reach,
            )
        if good_now >= self.verdict_good_minutes and reach < 0.2:
            return Guidance(
                "not-settling",
                NOT_SETTLING_ADVICE,
                None,
                None,
                f"after {good_now:.1f} good minutes the split-half distance is not shrinking "
                f"toward {limit:g} mm ({trend}); no clear anticorrelated cluster in this run",
                fit=fit,
                reach_probability=reach,
            )
        return Guidance(
            "cannot-tell-yet",
            "cannot tell yet: keep scanning",
            None,
            None,
            f"the trend is too uncertain to predict ({trend})",
            fit=fit,
            reach_probability=reach,
        )

    # -- parts -------------------------------------------------------------------------

    def _good_fraction(self, last: GuidancePoint) -> float:
        scan = last.scan_minutes
        return last.good_minutes / scan if scan > 0 else 0.0

    def _needed(self, crossings: F64, below_now: bool, good_now: float, last: GuidancePoint) -> F64:
        """Good minutes at which each predicted crossing would make the target stable."""
        need = np.asarray(crossings, dtype=np.float64).copy()
        gf = self._good_fraction(last)
        # good minutes the stable limits must hold for, if they held from now
        hold = self.rules.stable_hold_s / 60.0 * gf
        if below_now:
            held = (last.held_s or 0.0) / 60.0 * gf
            # already within the limit: the fit no longer matters, the hold does
            need = np.minimum(need, good_now) + max(0.0, hold - held)
        else:
            need = need + hold
        need = np.maximum(need, self.rules.stable_good_minutes)
        if last.drift_mm is None or last.drift_mm > self.rules.stable_drift_mm:
            # the drift is judged over the last minute: at least one more of it
            need = np.maximum(need, good_now + gf)
        return need

    def _binding(self, need: float, good_now: float, below_now: bool, fit: GuidanceFit) -> str:
        """Which limit the predicted time waits for, in words."""
        floor = self.rules.stable_good_minutes
        if need <= floor + 1e-9 and (below_now or fit.settled_good_minutes <= floor):
            return (
                f"waiting for {floor:g} good minutes (now {good_now:.1f}): the split-half "
                "distance is already within its limit"
                if below_now
                else f"waiting for {floor:g} good minutes (now {good_now:.1f}); the fit "
                f"reaches {self.rules.stable_split_half_mm:g} mm before that"
            )
        if below_now:
            return (
                f"split-half within {self.rules.stable_split_half_mm:g} mm: waiting for it to "
                f"hold {self.rules.stable_hold_s:g} s and for the drift over a minute"
            )
        return (
            f"waiting for the split-half distance to reach {self.rules.stable_split_half_mm:g} mm "
            f"and hold {self.rules.stable_hold_s:g} s"
        )

    def _chance(
        self, last: GuidancePoint, good_now: float, rebound: Guidance | None
    ) -> Guidance | None:
        """No prediction while the anticorrelation is no stronger than chance.

        The root cause comes first in the reason; a split-half that grew back
        (``rebound``) is added to it, and makes the answer "not settling".
        """
        if last.p_value is not None and last.p_value <= self.rules.settling_p:
            return None
        tested = (
            "has not been tested against chance"
            if last.p_value is None
            else f"is no stronger than chance (p = {last.p_value:.3f} against phase-randomised "
            f"seeds; settling needs p <= {self.rules.settling_p:g})"
        )
        if good_now >= self.verdict_good_minutes or rebound is not None:
            reason = (
                f"after {good_now:.1f} good minutes the strongest anticorrelation in the search "
                f"region {tested}: no anticorrelated cluster to target in this run"
            )
            if rebound is not None:
                reason += "; " + rebound.reason
            return Guidance("not-settling", NOT_SETTLING_ADVICE, None, None, reason)
        return Guidance(
            "cannot-tell-yet",
            "cannot tell yet: keep scanning",
            None,
            None,
            f"the strongest anticorrelation in the search region {tested}" + self._blockers(last),
        )

    def _blockers(self, last: GuidancePoint) -> str:
        return "" if not last.reasons else "; not stable yet: " + "; ".join(last.reasons)

    def _enough(self, last: GuidancePoint) -> Guidance:
        split = "n/a" if last.split_half_mm is None else f"{last.split_half_mm:.1f} mm"
        drift = "n/a" if last.drift_mm is None else f"{last.drift_mm:.1f} mm"
        p = "n/a" if last.p_value is None else f"{last.p_value:.3f}"
        r = self.rules
        return Guidance(
            "enough-data",
            f"enough data: target settled (split-half {split}, drift {drift} over the last minute)",
            0.0,
            None,
            f"{last.good_minutes:.1f} good minutes (>= {r.stable_good_minutes:g}), split-half "
            f"{split} (<= {r.stable_split_half_mm:g} mm), drift {drift} "
            f"(<= {r.stable_drift_mm:g} mm), anticorrelation beyond chance (p = {p}, "
            f"<= {r.stable_p:g}), all held for {r.stable_hold_s:g} s",
        )

    def _too_early(self, last: GuidancePoint, good_now: float, n_split: int) -> Guidance:
        if good_now >= max(self.verdict_good_minutes, self.min_fit_minutes) and n_split == 0:
            return Guidance(
                "not-settling",
                NOT_SETTLING_ADVICE,
                None,
                None,
                f"{good_now:.1f} good minutes and the two halves of the data never both "
                "gave a target: no stable anticorrelated cluster",
            )
        need = []
        if n_split < self.min_points:
            need.append(
                f"{n_split} split-half distances so far, a prediction needs {self.min_points}"
            )
        if good_now < self.min_fit_minutes:
            need.append(f"{good_now:.1f} good minutes, a prediction needs {self.min_fit_minutes:g}")
        return Guidance(
            "cannot-tell-yet",
            "cannot tell yet: keep scanning",
            None,
            None,
            "; ".join(need) + self._blockers(last),
        )

    def _rebound(self) -> Guidance | None:
        """Not settling because the split-half distance grew back; None otherwise."""
        with_split = [p for p in self.points if p.split_half_mm is not None]
        if len(with_split) < self.min_points + 2:
            return None
        recent = with_split[-3:]
        earlier = with_split[:-3]
        best = min(earlier, key=lambda p: float(p.split_half_mm or 0.0))
        best_d = float(best.split_half_mm or 0.0)
        recent_d = [float(p.split_half_mm or 0.0) for p in recent]
        if not (
            float(np.mean(recent_d)) >= best_d + self.rebound_mm
            and recent_d[-1] >= best_d + self.rebound_mm
        ):
            return None
        last = with_split[-1]
        reasons = [
            f"split-half distance grew from {best_d:.1f} mm (at {best.good_minutes:.1f} good "
            f"minutes) to {recent_d[-1]:.1f} mm"
        ]
        scan = last.scan_minutes - best.scan_minutes
        censored = last.censored_minutes - best.censored_minutes
        if scan > 0 and censored / scan >= 0.2:
            reasons.append(
                f"{censored:.1f} of the last {scan:.1f} scan minutes censored "
                "(head motion above the FD limit or flagged volumes)"
            )
        if last.drift_mm is not None and last.drift_mm > self.rules.stable_drift_mm:
            reasons.append(
                f"target moved {last.drift_mm:.1f} mm in the last minute "
                f"(stable: <= {self.rules.stable_drift_mm:g} mm)"
            )
        return Guidance("not-settling", NOT_SETTLING_ADVICE, None, None, "; ".join(reasons))
