"""``boldstream simulate``: the scanner stand-in used by the demo and the tests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from boldstream.commands.demo import parse_matrix, parse_pace
from boldstream.logs import configure_logging
from boldstream.simulator.encode import ENCODINGS, SeriesSpec
from boldstream.simulator.phantom import PhantomRun, make_phantom_run, run_from_nifti
from boldstream.simulator.send import SendOptions, send_run, write_run

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="act as an MRI scanner: send a run over DICOM C-STORE (or write the files)",
        description="Send a 4D NIfTI, or the built-in phantom run (an MNI152-based head with a "
        "planted anticorrelated sgACC / left-DLPFC network and optional head motion), to a "
        "DICOM Storage SCP as Siemens mosaic, per-slice or Enhanced MR instances, paced at the "
        "TR or faster; or write the instances to a folder.",
    )
    p.add_argument("nifti", nargs="?", type=Path, help="4D NIfTI to send (default: the phantom)")
    p.add_argument("--volumes", type=int, default=100, help="phantom volumes (default 100)")
    p.add_argument("--tr", type=float, help="TR in s (default 2.0, or the NIfTI's)")
    p.add_argument("--matrix", type=parse_matrix, default=(64, 64, 36), help="phantom matrix")
    p.add_argument("--voxel", type=float, default=3.0, help="phantom voxel size in mm")
    p.add_argument("--orientation", choices=("axial", "oblique"), default="axial")
    p.add_argument("--motion", choices=("none", "mild", "heavy"), default="none")
    p.add_argument(
        "--network-strength",
        type=float,
        default=0.8,
        help="planted sgACC-DLPFC anticorrelation in [0, 1] (0: a null run; default 0.8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoding", choices=ENCODINGS, default="mosaic")
    p.add_argument(
        "--sbref",
        action="store_true",
        help="first send a single-band reference series (one volume, SeriesDescription "
        "+ _SBRef, series number one lower), as multiband sequences do",
    )
    p.add_argument(
        "--pace",
        type=parse_pace,
        default=1.0,
        metavar="fast|realtime|FACTOR",
        help="send as fast as possible, at the TR (default), or FACTOR times real time",
    )
    p.add_argument("--host", default="127.0.0.1", help="Storage SCP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=11112, help="Storage SCP port (default 11112)")
    p.add_argument("--calling-aet", default="SIMSCANNER")
    p.add_argument("--called-aet", default="BOLDSTREAM")
    p.add_argument("--associations", type=int, default=1, help="parallel associations")
    p.add_argument(
        "--write-dir", type=Path, help="write the DICOM files here instead of sending them"
    )
    p.add_argument("--truth", type=Path, help="write the simulation truth (JSON) here")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> PhantomRun:
    if args.nifti is not None:
        return run_from_nifti(args.nifti, tr_s=args.tr)
    return make_phantom_run(
        n_volumes=args.volumes,
        tr_s=args.tr or 2.0,
        shape=args.matrix,
        voxel_mm=args.voxel,
        orientation=args.orientation,
        motion=args.motion,
        network_strength=args.network_strength,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    configure_logging(level="warning")
    phantom = _load(args)
    spec = SeriesSpec(tr_s=phantom.tr_s, n_volumes=phantom.n_volumes)
    options = SendOptions(
        encoding=args.encoding,
        pace=args.pace,
        calling_aet=args.calling_aet,
        called_aet=args.called_aet,
        associations=args.associations,
        seed=args.seed,
        spec=spec,
        sbref=args.sbref,
    )
    if args.truth is not None:
        args.truth.write_text(
            json.dumps({"series_uid": spec.series_uid, **phantom.truth}, indent=2) + "\n"
        )
    if args.write_dir is not None:
        paths = write_run(phantom, args.write_dir, options)
        print(f"wrote {len(paths)} instances ({phantom.n_volumes} volumes) to {args.write_dir}")
        return 0
    report = send_run(phantom, args.host, args.port, options)
    print(
        f"sent {report.instances} instances ({phantom.n_volumes} volumes) to "
        f"{args.called_aet}@{args.host}:{args.port} in {report.elapsed_s:.1f} s; "
        f"statuses: {dict(sorted(report.statuses.items()))}"
    )
    return 0 if report.failed == 0 else 1
