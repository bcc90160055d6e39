"""``boldstream keys``: make CurveZMQ key pairs for the result streams.

``boldstream keys DIR`` writes ``DIR/server.key`` (public: give it to every
subscriber) and ``DIR/server.key_secret`` (the pipeline's, set as
``pipeline.curve_secret_key``); ``--name`` picks another name, e.g. one per
client for ``pipeline.curve_authorized_keys``. Both files are mode 0600 and
never overwritten. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from boldstream.stream.curve import write_keypair

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "keys",
        help="make a CurveZMQ key pair for encrypted result streams",
        description="Write NAME.key (public) and NAME.key_secret (secret) into DIR, both "
        "mode 0600. The server's secret file goes to pipeline.curve_secret_key; subscribers "
        "get the server's public file (boldstream listen --server-key).",
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="folder to write the key files to")
    p.add_argument(
        "--name",
        default="server",
        help="file name stem (default: server; e.g. a client's name for its own pair)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    public, secret = write_keypair(args.folder, args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
