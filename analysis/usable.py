"""Usable-data accounting in the style of FIRMM (Dosenbach et al. 2017).

For each framewise-displacement threshold: how many frames and minutes so far
are below it, and how much further scanning is predicted to reach a goal of
good minutes, from the good-frame rate observed so far.

Counting rules, chosen to be explicit:

- a frame is good at threshold ``θ`` when it is usable (not flagged by the
  caller) and its FD is strictly below ``θ``;
- the first frame has no FD (``None``); it counts as good, as FIRMM counts
  the first frame's FD as 0;
- an FD that is NaN counts as not good;
- the prediction is ``(goal - good_minutes) / good_fraction`` minutes of
  further scanning, where ``good_fraction`` = good frames / all frames; it is
  ``0.0`` once the goal is reached and ``None`` when no frame has been good
  yet (the rate is zero, so no finite prediction exists).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "UsableAtThreshold",
    "UsableData",
    "UsableSummary",
    "minutes_to_goal",
]


@dataclass(frozen=True, slots=True)
class UsableAtThreshold:
    """Good data so far at one FD threshold."""

    fd_threshold_mm: float
    frames: int
    minutes: float
    #: Good frames / all frames so far (0.0 before any frame).
    fraction: float
    #: Further scan minutes predicted to reach the goal; 0.0 once reached,
    #: None while no frame has been good (zero rate: no finite prediction).
    minutes_to_goal: float | None


@dataclass(frozen=True, slots=True)
class UsableSummary:
    """Usable data at every threshold, after the latest frame."""

    frames_total: int
    minutes_total: float
    goal_minutes: float
    thresholds: tuple[UsableAtThreshold, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (floats, ints, None, lists)."""
        return {
            "frames_total": self.frames_total,
            "minutes_total": self.minutes_total,
            "goal_minutes": self.goal_minutes,
            "thresholds": [
                {
                    "fd_threshold_mm": t.fd_threshold_mm,
                    "frames": t.frames,
                    "minutes": t.minutes,
                    "fraction": t.fraction,
                    "minutes_to_goal": t.minutes_to_goal,
                }
                for t in self.thresholds
            ],
        }


def minutes_to_goal(good_minutes: float, good_fraction: float, goal_minutes: float) -> float | None:
    """Further scan minutes to reach ``goal_minutes`` of good data at ``good_fraction``.

    0.0 when the goal is already reached, None when the fraction is zero.
    """
    missing = goal_minutes - good_minutes
    if missing <= 0.0:
        return 0.0
    if not good_fraction > 0.0:
        return None
    return missing / good_fraction


class UsableData:
    """Running FIRMM-style counts; feed one frame at a time with :meth:`add`."""

    def __init__(
        self,
        *,
        tr_s: float,
        fd_thresholds: Sequence[float] = (0.2, 0.3, 0.5),
        goal_minutes: float = 12.5,
    ) -> None:
        if not tr_s > 0.0:
            raise ValueError(f"tr_s must be positive, got {tr_s}")
        if not fd_thresholds or any(not t > 0.0 for t in fd_thresholds):
            raise ValueError(f"fd_thresholds must be positive, got {tuple(fd_thresholds)}")
        if not goal_minutes > 0.0:
            raise ValueError(f"goal_minutes must be positive, got {goal_minutes}")
        self.tr_s = float(tr_s)
        self.fd_thresholds = tuple(float(t) for t in fd_thresholds)
        self.goal_minutes = float(goal_minutes)
        self._total = 0
        self._good = [0] * len(self.fd_thresholds)

    def add(self, fd_mm: float | None, *, usable: bool = True) -> UsableSummary:
        """Count one frame (``fd_mm`` None for the first frame) and summarise."""
        self._total += 1
        if usable and (fd_mm is None or not math.isnan(fd_mm)):
            for i, thr in enumerate(self.fd_thresholds):
                if fd_mm is None or fd_mm < thr:
                    self._good[i] += 1
        return self.summary()

    def state(self) -> dict[str, int | list[int]]:
        """The counts so far (for a checkpoint)."""
        return {"total": self._total, "good": list(self._good)}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` gave."""
        self._total = int(state["total"])
        self._good = [int(g) for g in state["good"]]

    def summary(self) -> UsableSummary:
        per_min = self.tr_s / 60.0
        rows = []
        for thr, good in zip(self.fd_thresholds, self._good, strict=True):
            fraction = good / self._total if self._total else 0.0
            minutes = good * per_min
            rows.append(
                UsableAtThreshold(
                    fd_threshold_mm=thr,
                    frames=good,
                    minutes=minutes,
                    fraction=fraction,
                    minutes_to_goal=minutes_to_goal(minutes, fraction, self.goal_minutes),
                )
            )
        return UsableSummary(
            frames_total=self._total,
            minutes_total=self._total * per_min,
            goal_minutes=self.goal_minutes,
            thresholds=tuple(rows),
        )
