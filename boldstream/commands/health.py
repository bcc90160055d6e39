"""``boldstream health``: does a running ``boldstream serve`` answer?

Three checks, the first two against the addresses the settings give (``receiver.bind`` and
``dashboard.host``; a wildcard bind is reached on 127.0.0.1):

- DICOM: a TCP connection to ``receiver.port``, then an association with a
  C-ECHO. An association the listener rejects (``receiver.allowed_calling_aets``)
  or a connection it closes at once (``receiver.allowed_addresses``) also
  shows that it answers. With ``receiver.tls_cert`` set only the TCP
  connection is checked.
- Dashboard, when ``dashboard.enabled``: ``GET /healthz`` answers 200 (it
  needs no token).
- Spool, when ``receiver.spool_dir`` exists where the check runs (beside the
  service, as the Docker HEALTHCHECK does): its disk has at least
  ``receiver.min_free_mb`` free. Below that the listener answers but
  refuses every instance (0xA700), which a monitor should hear about.

Exit 0 when all pass; 1 with one line per check that did not. It is the
Docker image's HEALTHCHECK, and fits any monitor that runs a command.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from boldstream.commands.serve import add_settings_arguments, settings_from_args
from boldstream.config import Settings
from boldstream.receiver.spool import free_bytes

__all__ = ["check", "register", "run"]

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check that a running boldstream serve answers (DICOM, dashboard, spool space)",
        description="Connect to the DICOM listener (association + C-ECHO) and, when the "
        "dashboard is enabled, GET its /healthz, at the addresses the settings give; "
        "when the spool folder is on this machine, check that its disk has "
        "receiver.min_free_mb free (below that every instance is refused). "
        "Exit 0 when all pass, 1 otherwise with one line per check that did not.",
    )
    add_settings_arguments(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait for each answer (default 5)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    problems = check(settings_from_args(args), timeout=args.timeout)
    for line in problems:
        print(f"boldstream health: {line}", file=sys.stderr)
    return 1 if problems else 0


def check(settings: Settings, *, timeout: float = 5.0) -> list[str]:
    """What did not answer, in words (empty when healthy)."""
    problems = []
    dicom = _check_dicom(settings, timeout)
    if dicom is not None:
        problems.append(dicom)
    if settings.dashboard.enabled:
        web = _check_dashboard(settings, timeout)
        if web is not None:
            problems.append(web)
    space = _check_spool(settings)
    if space is not None:
        problems.append(space)
    return problems


def _check_spool(settings: Settings) -> str | None:
    r = settings.receiver
    if not r.min_free_mb or not r.spool_dir.is_dir():
        return None  # no floor, or checked from elsewhere: nothing to judge here
    try:
        free_mb = free_bytes(r.spool_dir) / 2**20
    except OSError as exc:
        return f"spool {r.spool_dir}: cannot read its free space ({exc.strerror or exc})"
    if free_mb >= r.min_free_mb:
        return None
    return (
        f"spool {r.spool_dir}: {free_mb:.0f} MB free, below receiver.min_free_mb "
        f"({r.min_free_mb:g} MB): every instance is refused (0xA700)"
    )


def _address(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARDS else host


def _check_dicom(settings: Settings, timeout: float) -> str | None:
    r = settings.receiver
    host = _address(r.bind)
    where = f"DICOM listener {host}:{r.port}"
    try:
        socket.create_connection((host, r.port), timeout=timeout).close()
    except OSError as exc:
        return f"{where}: no connection ({exc.strerror or exc})"
    if r.tls_cert is not None:
        return None  # the TLS handshake may need a client certificate we do not hold
    ae = AE(ae_title="HEALTHCHECK")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    started = time.monotonic()
    assoc = ae.associate(host, r.port, ae_title=r.ae_title)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        if status and status.Status == 0x0000:
            return None
        return f"{where}: C-ECHO did not succeed"
    if assoc.is_rejected:
        return None  # an allow-list at work: the listener answered
    if assoc.is_aborted and time.monotonic() - started < 0.9 * timeout:
        return None  # closed at once (receiver.allowed_addresses): it answered
    return f"{where}: no answer to an association request within {timeout:g} s"


def _check_dashboard(settings: Settings, timeout: float) -> str | None:
    d = settings.dashboard
    host = _address(d.host)
    where = f"dashboard http://{host}:{d.port}/healthz"
    conn = http.client.HTTPConnection(host, d.port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except OSError as exc:
        return f"{where}: no answer ({exc})"
    finally:
        conn.close()
    return None if status == 200 else f"{where}: HTTP {status}"
