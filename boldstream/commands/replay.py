"""``boldstream replay RUN``: the real-time analysis, offline and as fast as it goes.

RUN is a 4D NIfTI (its affine is the vox2ras; the TR comes from the header or
``--tr``) or a folder of DICOM files (decoded and assembled by the receiver's
code, files read in sorted order). The same motion and QC stages as ``serve``
run on every volume, in this process, without sockets. Written into
``--out``: an fMRIPrep-style confounds table and its JSON sidecar per series
(``sub-<id>_task-rest[_run-<n>]_desc-confounds_timeseries.tsv``). One summary
line per series goes to stdout.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boldstream.commands.serve import add_settings_arguments, settings_from_args
from boldstream.logs import configure_logging
from boldstream.pipeline.offline import (
    Event,
    ReplayError,
    SeriesReplay,
    dicom_volumes,
    nifti_volumes,
    replay,
)

__all__ = ["confounds_stem", "register", "run"]

_SUB = re.compile(r"sub-([A-Za-z0-9]+)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="run motion correction and QC offline on a NIfTI or a DICOM folder",
        description="Replay a recorded run through the real-time stages as fast as possible "
        "and write an fMRIPrep-style confounds table (TSV + JSON sidecar).",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="4D NIfTI file or folder of DICOM files")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="output folder")
    p.add_argument("--tr", type=float, metavar="S", help="repetition time in s (NIfTI only)")
    p.add_argument(
        "--subject",
        metavar="ID",
        help="BIDS subject label (default: from a sub-<id> in RUN's name, else 01)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=run)


def confounds_stem(subject: str, run_number: int | None = None) -> str:
    run_part = "" if run_number is None else f"_run-{run_number}"
    return f"sub-{subject}_task-rest{run_part}_desc-confounds_timeseries"


def _events(path: Path, args: argparse.Namespace, settings: Any) -> Iterator[Event]:
    if path.is_dir():
        return dicom_volumes(path, settings)
    if path.name.endswith((".nii", ".nii.gz")):
        _, volumes = nifti_volumes(path, tr_s=args.tr)
        return volumes
    raise ReplayError(f"{path}: not a .nii/.nii.gz file or a folder of DICOM files")


def _summary(name: str, entry: SeriesReplay, elapsed: float, tsv: Path) -> str:
    table = entry.table
    fd = [v["fd_mm"] for v in table.qc.values() if v.get("fd_mm") is not None]
    mean_fd = f"{sum(fd) / len(fd):.3f} mm" if fd else "n/a"
    tr = table.tr_s or 0.0
    speed = (entry.volumes * tr / elapsed) if elapsed > 0 and tr else 0.0
    return (
        f"replayed {entry.volumes} volumes of {name} in {elapsed:.1f} s "
        f"({speed:.0f}x real time at TR {tr:g} s): mean FD {mean_fd}, "
        f"{len(table.outliers())} outliers, {len(table.gaps)} missing; wrote {tsv}"
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(level="warning", json=settings.logging.json_output)
    path: Path = args.run
    if not path.exists():
        print(f"boldstream replay: {path}: no such file or folder", file=sys.stderr)
        return 2
    match = _SUB.search(path.name)
    subject = args.subject or (match.group(1) if match else "01")
    started = time.perf_counter()
    try:
        results = replay(_events(path, args, settings), settings)
    except ReplayError as exc:
        print(f"boldstream replay: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    if not results:
        print(f"boldstream replay: {path}: no volumes to replay", file=sys.stderr)
        return 2
    several = len(results) > 1
    for number, entry in enumerate(results.values(), start=1):
        stem = confounds_stem(subject, number if several else None)
        tsv, _ = entry.table.write(args.out, stem)
        print(_summary(path.name, entry, elapsed, tsv), flush=True)
    return 0
