"""Where one instance's round trip goes inside boldstream's receiver.

DCMTK's storescu (``TCP_NODELAY=1``, one association) floods boldstream's
Storage SCP with simulator output. The receiver runs in this process with
timestamps taken around pynetdicom's socket reads and writes, the C-STORE
handler, the spool's durable write and the response: made and written on
the network thread by default (``receiver.direct_store``), or with
``--direct-store off`` built by pynetdicom's DIMSE provider and handed to
the network thread. Each instance's round trip (from the previous response
leaving the socket to this one leaving it) is split into consecutive parts;
the table gives each part's median and 90th percentile in ms.

The first part, "sender, network and poll", is the time storescu takes to
read its next file and send it, plus the wait until pynetdicom's network
thread reads it; everything after is the receiver. The wrappers add a few
microseconds per call, so compare rows within one run, not the total with
``benchmarks/receive.py``.

    python benchmarks/receive_timeline.py [--encoding slice|mosaic] [--volumes 20]
        [--direct-store on|off]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import receive
from _machine import machine_line, table
from pynetdicom import transport

from boldstream.logs import configure_logging
from boldstream.receiver import dimse, direct, scp, spool
from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

_EVENTS: list[tuple[str, int]] = []


def _wrap(owner: Any, name: str, tag: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)
    clock = time.perf_counter_ns

    def timed(*args: Any, **kwargs: Any) -> Any:
        _EVENTS.append((tag + ">", clock()))
        try:
            return original(*args, **kwargs)
        finally:
            _EVENTS.append((tag + "<", clock()))

    setattr(owner, name, timed)


def _instrument() -> None:
    _wrap(transport.AssociationSocket, "recv", "recv")
    _wrap(transport.AssociationSocket, "send", "send")
    _wrap(scp, "handle_store", "handler")  # looked up by name when the SCP starts
    _wrap(spool.Spool, "store", "store")
    _wrap(dimse.LeanDIMSEServiceProvider, "send_msg", "respond")  # pynetdicom's path
    _wrap(direct, "encode_store_response", "respond")  # the network thread's


#: (row label, from mark, to mark); consecutive, so the rows add up to the round trip.
_PARTS = [
    ("sender, network and poll", "previous", "first_recv"),
    ("reading the PDUs", "first_recv", "last_recv"),
    ("last PDU -> handler", "last_recv", "handler>"),
    ("handler before the durable write", "handler>", "store>"),
    ("durable write (Spool.store)", "store>", "store<"),
    ("handler after the write", "store<", "handler<"),
    ("handler -> response made", "handler<", "respond<"),
    ("response made -> socket", "respond<", "send>"),
    ("socket send", "send>", "send<"),
    ("round trip", "previous", "send<"),
]


def _instances() -> list[dict[str, int]]:
    """Marks per instance, split at each response leaving the socket."""
    done: list[dict[str, int]] = []
    current: dict[str, int] = {}
    previous: int | None = None
    for tag, t in _EVENTS:
        if tag == "recv>":
            current.setdefault("first_recv", t)
        elif tag == "recv<":
            current["last_recv"] = t
        elif tag in ("handler>", "store>", "store<", "handler<", "respond<"):
            current[tag] = t
        elif tag == "send>" and "respond<" in current:
            current["send>"] = t
        elif tag == "send<" and "send>" in current:
            current["send<"] = t
            if previous is not None:
                current["previous"] = previous
                done.append(current)
            previous, current = t, {}
    marks = {m for _, a, b in _PARTS for m in (a, b)}
    return [c for c in done if marks <= c.keys()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoding", choices=("slice", "mosaic"), default="slice")
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--direct-store", choices=("on", "off"), default="on")
    args = parser.parse_args(argv)
    configure_logging(level="error", json=True)
    shape = (90, 90, 60) if args.encoding == "slice" else (64, 64, 36)
    root = Path(tempfile.mkdtemp(prefix="receive-timeline-"))
    run = make_phantom_run(n_volumes=args.volumes, tr_s=0.8, shape=shape, voxel_mm=2.4)
    files = write_run(run, root / args.encoding, SendOptions(encoding=args.encoding), truth=False)
    _instrument()
    direct_store = args.direct_store == "on"
    with receive._boldstream(root, quickack=True, direct=direct_store) as (port, _vols, _rec):
        receive._send(port, files[:5], nodelay=True)  # association set-up, imports, first write
        _EVENTS.clear()
        seconds = receive._send(port, files[5:], nodelay=True)
    instances = _instances()
    if not instances:
        raise SystemExit("no instance was timed: did the SCP answer?")
    rows = []
    for label, start, end in _PARTS:
        ms = sorted((c[end] - c[start]) / 1e6 for c in instances)
        rows.append([label, f"{statistics.median(ms):.3f}", f"{ms[int(0.9 * (len(ms) - 1))]:.3f}"])
    name = "per-slice 90x90x60" if args.encoding == "slice" else "mosaic 64x64x36"
    print(f"## Receive timeline ({machine_line()})\n")
    print(
        f"{name}, storescu TCP_NODELAY=1, {len(files) - 5} instances, "
        f"{(len(files) - 5) / seconds:.0f} instances/s with the timestamps on; "
        f"receiver.direct_store = {str(direct_store).lower()}; "
        f"{len(instances)} instances timed\n"
    )
    print(table(["part of the round trip", "p50 ms", "p90 ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
