"""``boldstream replay RUN``: the real-time analysis, offline and as fast as it goes.

RUN is a 4D NIfTI (its affine is the vox2ras; the TR comes from the header or
``--tr``) or a folder of DICOM files (decoded and assembled by the receiver's
code, files read in sorted order). The same motion and QC stages as ``serve``
run on every volume, in this process, without sockets. ``--out`` receives the
files ``serve`` writes, through the same :class:`~boldstream.sinks.bids.BidsSink`
(BIDS derivatives, fMRIPrep style, see docs/results.md): per series
``sub-<id>/func/sub-<id>_task-rest[_run-<n>]_desc-confounds_timeseries.tsv``
and its JSON sidecar, the motion-corrected ``desc-preproc_bold.nii.gz`` with
its sidecar, and the ``desc-tsnr_boldmap``. One summary line per series goes
to stdout.
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
from boldstream.sinks.bids import BidsSink

__all__ = ["register", "run"]

_SUB = re.compile(r"sub-([A-Za-z0-9]+)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="run motion correction and QC offline on a NIfTI or a DICOM folder",
        description="Replay a recorded run through the real-time stages as fast as possible "
        "and write the files serve writes: BIDS derivatives with an fMRIPrep-style confounds "
        "table (TSV + JSON sidecar) and the motion-corrected BOLD series.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="4D NIfTI file or folder of DICOM files")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="derivatives folder (sub-<id>/func/... is written in it)",
    )
    p.add_argument("--tr", type=float, metavar="S", help="repetition time in s (NIfTI only)")
    p.add_argument(
        "--subject",
        metavar="ID",
        help="BIDS subject label (default: from a sub-<id> in RUN's name, else 01)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=run)


def _events(path: Path, args: argparse.Namespace, settings: Any) -> Iterator[Event]:
    if path.is_dir():
        return dicom_volumes(path, settings)
    if path.name.endswith((".nii", ".nii.gz")):
        _, volumes = nifti_volumes(path, tr_s=args.tr)
        return volumes
    raise ReplayError(f"{path}: not a .nii/.nii.gz file or a folder of DICOM files")


def _summary(name: str, entry: SeriesReplay, elapsed: float, tr: float) -> str:
    fd = [v["fd_mm"] for v in entry.qc.values() if v.get("fd_mm") is not None]
    mean_fd = f"{sum(fd) / len(fd):.3f} mm" if fd else "n/a"
    speed = (entry.volumes * tr / elapsed) if elapsed > 0 and tr else 0.0
    wrote = "" if entry.files is None else f"; wrote {entry.files.confounds}"
    return (
        f"replayed {entry.volumes} volumes of {name} in {elapsed:.1f} s "
        f"({speed:.0f}x real time at TR {tr:g} s): mean FD {mean_fd}, "
        f"{len(entry.outliers())} outliers, {len(entry.gaps)} missing{wrote}"
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
    if not re.fullmatch(r"[A-Za-z0-9]+", subject):
        print(
            f"boldstream replay: --subject {subject!r}: a BIDS label has letters and digits only",
            file=sys.stderr,
        )
        return 2
    # Replays are re-run, not recovered: no fsync per row and per volume.
    sink = BidsSink(args.out, subject=subject, durable=False)
    started = time.perf_counter()
    try:
        results = replay(_events(path, args, settings), settings, sink=sink)
    except ReplayError as exc:
        print(f"boldstream replay: {exc}", file=sys.stderr)
        return 2
    finally:
        sink.close()
    elapsed = time.perf_counter() - started
    if not results:
        print(f"boldstream replay: {path}: no volumes to replay", file=sys.stderr)
        return 2
    for entry in results.values():
        tr = entry.info.tr_s or settings.qc.default_tr_s
        print(_summary(path.name, entry, elapsed, tr), flush=True)
    return 0
