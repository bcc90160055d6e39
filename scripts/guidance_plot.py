"""The figure of docs/guidance.md: split-half distance against good minutes.

Runs the live analysis (motion, connectivity, target, guidance) on a simulated
run with a planted network and on a null run, and plots each target
recompute's split-half distance against the good minutes behind it, the
curve the guidance fits (``a / sqrt(m) + b``), the stable limit, and the time
the guidance predicted at the halfway point with its range.

matplotlib is needed for this script only (a docs tool, not a dependency):

    pip install matplotlib && python scripts/guidance_plot.py
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from boldstream.analysis import MotionCorrector
from boldstream.analysis.connectivity import SeedConnectivity
from boldstream.analysis.guidance import GuidanceModel, GuidancePoint
from boldstream.analysis.registration import native_rois, register_to_template
from boldstream.analysis.rois import template_rois
from boldstream.analysis.target import TargetRules, TargetTracker
from boldstream.simulator.phantom import make_phantom_run


def trace(strength: float, n_volumes: int, tr_s: float, seed: int) -> list[GuidancePoint]:
    run = make_phantom_run(n_volumes=n_volumes, tr_s=tr_s, network_strength=strength, seed=seed)
    volumes = [run.volume(t) for t in range(n_volumes)]
    corrector = MotionCorrector(volumes[0], run.vox2ras)
    estimates = [corrector.register(v) for v in volumes]
    mean = np.mean([e.corrected for e in estimates[:10]], axis=0)
    reg = register_to_template(mean, run.vox2ras, n_volumes=10)
    conn = SeedConnectivity(native_rois(template_rois(), reg, mean, run.vox2ras), tr_s=tr_s)
    tracker = TargetTracker(native2mni=reg.native2mni, rules=TargetRules())
    points = []
    for t, est in enumerate(estimates):
        conn.update(est.corrected, est.params, usable=not est.flagged)
        if (t + 1) % 10 == 0 and (estimate := tracker.update(conn)) is not None:
            v: dict[str, Any] = estimate.values
            points.append(
                GuidancePoint(
                    good_minutes=float(v["good_minutes"]),
                    split_half_mm=v.get("split_half_mm"),
                    drift_mm=v.get("drift_mm"),
                    status=str(v["status"]),
                    censored_minutes=float(v.get("censored_minutes") or 0.0),
                    p_value=v.get("p_value"),
                    held_s=v.get("held_s"),
                )
            )
    return points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/images/guidance.png"))
    ap.add_argument("--volumes", type=int, default=360, help="TR 2 s: 12 minutes")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    limit = TargetRules().stable_split_half_mm
    for strength, colour, label in (
        (0.8, "#0072B2", "planted network"),
        (0.0, "#D55E00", "null run"),
    ):
        points = [
            p for p in trace(strength, args.volumes, 2.0, seed=3) if p.split_half_mm is not None
        ]
        m = np.array([p.good_minutes for p in points])
        d = np.array([p.split_half_mm for p in points], dtype=float)
        ax.plot(m, d, "o", color=colour, label=f"{label}: split-half at each recompute")
        half = GuidanceModel()
        for p in points[: len(points) // 2]:
            half.add(p)
        g = half.guidance()
        if g.fit is not None:
            grid = np.linspace(max(0.5, m.min()), m.max() * 1.6, 200)
            ax.plot(grid, g.fit.predict(grid), "-", color=colour, alpha=0.8,
                    label=f"{label}: fit on the first half, a/sqrt(m)+b")  # fmt: skip
        if g.minutes_more is not None and g.minutes_more_range is not None:
            now = points[len(points) // 2 - 1].good_minutes
            lo, hi = g.minutes_more_range
            ax.axvspan(now + lo, now + hi, color=colour, alpha=0.12)
            ax.axvline(now + g.minutes_more, color=colour, ls=":",
                       label=f"{label}: predicted settled at halfway ({g.state})")  # fmt: skip
        print(f"{label}: at halfway -> {g.state}: {g.message}")
    ax.axhline(limit, color="black", ls="--", lw=1, label=f"stable limit {limit:g} mm")
    ax.set_xlabel("good minutes (FD < 0.5 mm)")
    ax.set_ylabel("split-half target distance (mm)")
    ax.set_ylim(0, None)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("How scan guidance predicts when the TMS target settles (simulated runs)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
