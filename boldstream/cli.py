"""The ``boldstream`` command: one subcommand per module in boldstream.commands.

Each command module exposes ``register(subparsers) -> None`` (adds its parser
and sets ``func``) and its ``run(args) -> int``. Errors that boldstream raises
on purpose become one readable line on stderr and a non-zero exit code:
2 for bad settings or usage, 1 for a failure while running.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from threadpoolctl import threadpool_limits

from boldstream import __version__
from boldstream.errors import BoldstreamError, ConfigError

__all__ = ["COMMANDS", "build_parser", "main"]

#: Modules of boldstream.commands, in the order --help lists them.
COMMANDS: tuple[str, ...] = ("serve", "demo", "simulate", "replay", "listen", "keys", "health")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boldstream",
        description="Real-time resting-state fMRI at the scanner: receive DICOM, "
        "correct motion, publish live QC and a provisional TMS target.",
    )
    parser.add_argument("--version", action="version", version=f"boldstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"boldstream.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # One BLAS/OpenMP thread in this process. Its numerical work is small
        # (the simulator's phantom, geometry); idle OpenBLAS workers spin for a
        # while after each call, which on a 2-core host took most of a core
        # from the receiver. Stage processes follow pipeline.blas_threads.
        with threadpool_limits(limits=1):
            code: int = args.func(args)
    except ConfigError as exc:
        print(f"boldstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except BoldstreamError as exc:
        print(f"boldstream {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
