"""``boldstream listen``: print the live result stream in the terminal.

A reference subscriber (see docs/results.md for subscribing from another
program): one readable line per message, or with ``--json`` each message's
header as one JSON line, until Ctrl-C (exit 0) or ``--count`` messages.
A malformed endpoint exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from boldstream.errors import ConfigError
from boldstream.sinks.listen import DEFAULT_ENDPOINT, check_endpoint, listen
from boldstream.stream.curve import CurveClient

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "listen",
        help="print the live result stream (motion, QC, target...) in the terminal",
        description="Subscribe to the pipeline's result publisher and print one line per "
        "message until interrupted (Ctrl-C).",
    )
    p.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"publisher to connect to (pipeline.pub; default {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--topic",
        dest="topics",
        action="append",
        default=[],
        metavar="T",
        help="only topics starting with T, e.g. --topic qc --topic target (repeatable; "
        "default: everything)",
    )
    p.add_argument(
        "--json",
        dest="raw_json",
        action="store_true",
        help="print each message's JSON header (with its topic) as one line",
    )
    p.add_argument(
        "--count", type=int, metavar="N", help="exit after N messages (default: run until Ctrl-C)"
    )
    p.add_argument(
        "--server-key",
        type=Path,
        metavar="FILE",
        help="the publisher's CurveZMQ public key file (NAME.key from 'boldstream keys'); "
        "needed when the pipeline runs with pipeline.curve_secret_key",
    )
    p.add_argument(
        "--client-key",
        type=Path,
        metavar="FILE",
        help="our own CurveZMQ key pair (NAME.key_secret), when the pipeline only lets "
        "listed clients in (pipeline.curve_authorized_keys); default: a throw-away pair",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_endpoint(args.endpoint)
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    if args.client_key is not None and args.server_key is None:
        raise ConfigError("--client-key needs --server-key (the publisher's public key)")
    curve = None
    if args.server_key is not None:
        curve = CurveClient.from_files(args.server_key, args.client_key)
    print(f"listening to {args.endpoint}", file=sys.stderr, flush=True)

    def warn(text: str) -> None:
        print(f"boldstream listen: {text}", file=sys.stderr, flush=True)

    try:
        listen(
            args.endpoint,
            sys.stdout,
            topics=tuple(args.topics),
            raw_json=args.raw_json,
            count=args.count,
            on_error=warn,
            curve=curve,
        )
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `boldstream listen | head`: the reader left. Point stdout at devnull so
        # that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0
