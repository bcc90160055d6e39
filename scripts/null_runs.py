"""How often is a run without a network called stable? (the numbers in docs/guidance.md)

Replays simulated runs (``boldstream.simulator.phantom``, 64x64x36 x 3 mm,
TR 2 s) through the very stages ``serve`` runs (``replay``: motion, QC,
connectivity + target, guidance; default settings) and prints, per run, when
the target was first called stable, how many recomputes passed the chance
test, the last p and the last advice; then a summary per network strength.

    python scripts/null_runs.py                       # 20 null + 5 planted runs, 12 min
    python scripts/null_runs.py --null 40 --planted 0 --minutes 15

Seeds 100 and up, so these runs are not the tests' runs. Takes about 15 s
per run per core.
"""

from __future__ import annotations

import argparse
import multiprocessing
from typing import Any

from boldstream.config.settings import Settings
from boldstream.logs import configure_logging
from boldstream.pipeline.offline import array_volumes, replay
from boldstream.simulator.phantom import make_phantom_run

TR = 2.0


def one(job: tuple[float, int, int]) -> dict[str, Any]:
    strength, seed, n_volumes = job
    configure_logging(level="warning")
    settings = Settings()
    run = make_phantom_run(n_volumes=n_volumes, tr_s=TR, network_strength=strength, seed=seed)
    _, volumes = array_volumes("phantom", run.vox2ras, run.tr_s, run.iter_volumes())
    (series,) = replay(volumes, settings).values()
    targets = series.targets
    stable = [t for t in targets if t["status"] == "stable"]
    passed = [t for t in targets if (t.get("p_value") or 1.0) <= settings.target.stable_p]
    advice = series.guidance[-1]["state"] if series.guidance else "none"
    return {
        "strength": strength,
        "seed": seed,
        "recomputes": len(targets),
        "first_stable_min": float(stable[0]["minutes"]) if stable else None,
        "stable_recomputes": len(stable),
        "passed": len(passed),
        "last_p": targets[-1].get("p_value") if targets else None,
        "advice": advice,
        "said_enough": any(g["state"] == "enough-data" for g in series.guidance),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--null", type=int, default=20, help="runs without a planted network")
    ap.add_argument("--planted", type=int, default=5, help="runs with network_strength 0.8")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n_volumes = round(args.minutes * 60 / TR)
    jobs = [(0.0, 100 + i, n_volumes) for i in range(args.null)]
    jobs += [(0.8, 200 + i, n_volumes) for i in range(args.planted)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(one, jobs)
    print(f"{args.minutes:g}-minute runs, TR {TR:g} s, 64x64x36 x 3 mm, default settings\n")
    print(
        "| strength | seed | recomputes | passed p <= 0.01 | stable recomputes "
        "| first stable (min) | last p | last advice |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "never" if r["first_stable_min"] is None else f"{r['first_stable_min']:.1f}"
        last_p = "n/a" if r["last_p"] is None else f"{r['last_p']:.3f}"
        print(
            f"| {r['strength']:g} | {r['seed']} | {r['recomputes']} | {r['passed']} "
            f"| {r['stable_recomputes']} | {first} | {last_p} | {r['advice']} |"
        )
    print()
    for strength in sorted({r["strength"] for r in rows}):
        group = [r for r in rows if r["strength"] == strength]
        ever = sum(r["first_stable_min"] is not None for r in group)
        enough = sum(r["said_enough"] for r in group)
        passed = sum(r["passed"] for r in group)
        total = sum(r["recomputes"] for r in group)
        print(
            f"strength {strength:g}: {len(group)} runs; called stable at some recompute in "
            f"{ever}, 'enough data' advised in {enough}; {passed} of {total} recomputes "
            f"passed p <= 0.01"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
