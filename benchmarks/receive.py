"""Receive speed: boldstream's Storage SCP against DCMTK's storescp, same files, same run.

DCMTK's storescu is the sender (the scanner). For each series (per-slice
90x90x60, mosaic 64x64x36) and each sender setting (default socket options,
and TCP_NODELAY=1 in the DCMTK tools' environment) it times storescu sending
the files to:

- boldstream (spool with fsync per instance, decode, assembly; TCP_QUICKACK
  re-armed on the accepted socket: the default),
- boldstream with tcp_quickack off (to show what the receiver-side fix does),
- DCMTK storescp (writes files, no fsync),
- with TCP_NODELAY=1 only: boldstream with ``receiver.fsync = false``
  (storescp's durability: written, not fsync'd, before the answer), which
  separates the cost of the fsync-before-success rule from the rest,
- with TCP_NODELAY=1 only: boldstream with ``receiver.direct_store = false``
  (every C-STORE through pynetdicom's state machine and association thread
  instead of answered on its network thread from the PDU bytes),
- with TCP_NODELAY=1 only: boldstream with a selector that analyses no
  series (every instance spooled and handed to the ingest process, which
  reads its header and assembles nothing: a T1 or a localizer in a session),
- with TCP_NODELAY=1 only: boldstream's Storage SCP with no ingest behind it
  (the same listener, spool and durable write; the instance is dropped where
  it would be handed over): what storing alone costs, set beside storescp,
  which stores without fsync and hands nothing on,
- with TCP_NODELAY=1 only: pynetdicom alone, through the same acceptor
  (plain C-STOREs answered on the network thread, everything else through
  boldstream's prompt reactor, and its network-loop poll) with a C-STORE
  handler that answers success and does nothing: the network layer's own
  ceiling.

Receivers alternate within each round of ``--repeats``, and the table gives
medians. It reports instances/s, MB/s, the ratio to storescp (each round's
rate over storescp's in the same round, median over rounds: storescp's own
rate drifts by up to 2x within an hour on a shared machine), and boldstream's
assembly latency per volume (last instance of the volume received -> volume
ready), paced as a scanner sends with the ingest in its process and in a
thread (instances join their volumes on arrival, the default), and for
mosaics also with ``receiver.assemble = "after_write"`` (each instance waits
for its durable write's verdict). A second table sends the per-slice series
over 4 associations at once. A third times association set-up and release
as the receiver answers them (a pynetdicom requestor, A-ASSOCIATE-RQ sent to
A-ASSOCIATE-AC received, A-RELEASE-RQ sent to A-RELEASE-RP received), for
boldstream and storescp alternating: scanners open an association per
series, and some per instance.

Two measurements on the very same files, with no network, bound what any
receiver can do here:

- the durability floor: boldstream's own ``Spool.store`` (write, fsync, link
  into place, directory fsync: what must happen before a success status)
  called sequentially with each file's bytes, in a fresh spool; its
  instances/s is the ceiling of any receiver that honours that rule on this
  disk, set beside storescp (which does not fsync);
- decode + assembly alone: the receiver's ``decode_instance`` and
  ``Assembler`` called as ``boldstream replay`` calls them
  (:func:`boldstream.pipeline.offline.dicom_volumes`), timed from handing in
  the last instance of a volume to the volume coming back.

    python benchmarks/receive.py [--repeats 3] [--slice-volumes 10] [--mosaic-volumes 100]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import MRImageStorage, Verification

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line, table

from boldstream.config import AssemblySettings, Settings, load_settings
from boldstream.logs import configure_logging
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.association import PromptRequestHandler
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.lean import read_lean
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.service import Receiver
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import Volume
from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run


def _native(name: str) -> str:
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / name
        if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
            return str(path)
    raise SystemExit(f"DCMTK's native {name} is needed (apt-get install dcmtk)")


STORESCU, STORESCP = _native("storescu"), _native("storescp")


def _env(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise SystemExit(f"nothing listening on {port}")


def _send(port: int, files: Sequence[Path], *, nodelay: bool, senders: int = 1) -> float:
    """Seconds for ``senders`` storescu processes to deliver ``files`` (split evenly)."""
    chunks = [list(files[i::senders]) for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                "SCANNER",
                "-aec",
                "BOLDSTREAM",
                "127.0.0.1",
                str(port),
                *map(str, chunk),
            ],
            env=_env(nodelay),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


@contextlib.contextmanager
def _boldstream(
    root: Path, *, quickack: bool, **options: Any
) -> Iterator[tuple[int, list[Volume], Receiver]]:
    """A live Receiver with the settings :func:`_settings` makes of these."""
    spool = Path(tempfile.mkdtemp(dir=root))
    settings = _settings(spool, quickack=quickack, **options)
    volumes: list[Volume] = []
    receiver = Receiver(settings, lambda e: volumes.append(e) if isinstance(e, Volume) else None)
    receiver.start()
    try:
        yield receiver.port, volumes, receiver
    finally:
        receiver.stop()
        shutil.rmtree(spool, ignore_errors=True)


@contextlib.contextmanager
def _scp_only(root: Path) -> Iterator[tuple[int, StorageSCP]]:
    """boldstream's Storage SCP and spool, defaults, with nothing behind them."""
    spool_dir = Path(tempfile.mkdtemp(dir=root))
    settings = _settings(spool_dir, quickack=True)
    r = settings.receiver
    spool = Spool(r.spool_dir, fsync=r.fsync, min_free_mb=r.min_free_mb)  # as Receiver makes it
    scp = StorageSCP(settings.receiver, spool, lambda _received: None)
    scp.start()
    try:
        yield scp.port, scp
    finally:
        scp.stop()
        shutil.rmtree(spool_dir, ignore_errors=True)


def _settings(
    spool: Path,
    *,
    quickack: bool,
    ingest: str = "process",
    fsync: bool = True,
    assemble: str | None = None,
    direct: bool = True,
    analyse: bool = True,
) -> Settings:
    """Defaults but for these (``assemble``: None keeps the default;
    ``analyse=False``: the selector's include pattern matches no description,
    so every series is spooled only)."""
    return load_settings(
        overrides=[
            {
                "receiver": {
                    "port": 0,
                    "spool_dir": str(spool),
                    "tcp_quickack": quickack,
                    "ingest": ingest,
                    "fsync": fsync,
                    "direct_store": direct,
                    **({} if assemble is None else {"assemble": assemble}),
                },
                "logging": {"level": "error"},  # the ingest process logs by this
                "selector": {
                    "exclude_image_types": [],
                    **({} if analyse else {"include_description": "(?!)"}),  # matches nothing
                },
            }
        ],
        environ={},
    )


@contextlib.contextmanager
def _pynetdicom_alone() -> Iterator[int]:
    """pynetdicom answering success to every C-STORE and doing nothing else."""
    ae = AE(ae_title="BOLDSTREAM")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
        request_handler=PromptRequestHandler,
    )
    # As boldstream's SCP: C-STOREs answered on the network thread, its loop's poll.
    server.direct_store = True
    server.reactor_poll_s = load_settings(environ={}).receiver.reactor_poll_ms / 1000.0
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@contextlib.contextmanager
def _storescp(root: Path, *, nodelay: bool) -> Iterator[int]:
    out = Path(tempfile.mkdtemp(dir=root))
    port = _free_port()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "BOLDSTREAM", "-od", str(out), str(port)],
        env=_env(nodelay),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def _handshakes(port: int, n: int) -> tuple[list[float], list[float]]:
    """ms from A-ASSOCIATE-RQ sent to AC received, and A-RELEASE-RQ to RP, ``n`` times.

    Taken from the requestor's PDU events, so its own set-up before the
    request and its teardown after the answer are not counted.
    """
    marks: dict[str, float] = {}

    def mark(event: evt.Event) -> None:
        marks[type(event.pdu).__name__] = time.perf_counter()

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    handlers = [(evt.EVT_PDU_SENT, mark), (evt.EVT_PDU_RECV, mark)]
    setup: list[float] = []
    release: list[float] = []
    for _ in range(n):
        marks.clear()
        assoc = ae.associate("127.0.0.1", port, ae_title="BOLDSTREAM", evt_handlers=handlers)
        if not assoc.is_established:
            raise SystemExit("association set-up timing: the receiver did not accept")
        assoc.release()
        setup.append((marks["A_ASSOCIATE_AC"] - marks["A_ASSOCIATE_RQ"]) * 1e3)
        release.append((marks["A_RELEASE_RP"] - marks["A_RELEASE_RQ"]) * 1e3)
    return setup, release


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _durable_writes(root: Path, files: Sequence[Path], *, gap_s: float = 0.0) -> list[float]:
    """Seconds per instance of ``Spool.store`` alone, with fsync, in a fresh spool.

    The UIDs and bytes are read first; only the durable write (write, fsync,
    link into place, directory fsync) is timed, one instance after another,
    ``gap_s`` apart (a paced scanner leaves the disk idle between volumes).
    """
    items = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        items.append((uids, path.read_bytes()))
    spool = Spool(Path(tempfile.mkdtemp(dir=root)), fsync=True)
    try:
        seconds = []
        for (study, series, sop), data in items:
            start = time.perf_counter()
            stored = spool.store(study, series, sop, data)
            seconds.append(time.perf_counter() - start)
            if stored.duplicate:
                raise SystemExit(f"{sop} stored twice: the floor would skip its write")
            time.sleep(gap_s)
        return seconds
    finally:
        shutil.rmtree(spool.root, ignore_errors=True)


def _assembly_alone(files: Sequence[Path], assembly: AssemblySettings) -> list[float]:
    """Per volume, ms from handing in the bytes of its last instance to the volume returned.

    What the ingest does with an instance, without network, spool or hand-over:
    read it (``receiver/lean.py``, or pydicom where that reader steps aside),
    decode it, and assemble it (``prepare`` then ``add``, as the ingest does on
    either side of the durable write).
    """
    blobs = [path.read_bytes() for path in files]
    assembler = Assembler(assembly)
    latencies: list[float] = []
    for data in blobs:
        start = time.perf_counter()
        ds = read_lean(data) or pydicom.dcmread(io.BytesIO(data))
        fragments = decode_instance(ds, assembly=assembly)
        prepared = assembler.prepare(fragments)
        events = assembler.add(fragments, received=time.time(), prepared=prepared)
        elapsed = (time.perf_counter() - start) * 1e3
        latencies += [elapsed for event in events if isinstance(event, Volume)]
    if assembler.pending_volumes or assembler.stats.incomplete or not latencies:
        raise SystemExit("decode + assembly alone left volumes incomplete")
    return latencies


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slice-volumes", type=int, default=10, help="90x90x60 per-slice volumes")
    ap.add_argument("--mosaic-volumes", type=int, default=100, help="64x64x36 mosaic volumes")
    ap.add_argument(
        "--slow-cap",
        type=int,
        default=120,
        help="instances sent in combinations that stall ~50 ms per instance (default sender)",
    )
    args = ap.parse_args(argv)
    configure_logging(level="error", json=True)
    root = Path(tempfile.mkdtemp(prefix="boldstream-bench-"))
    try:
        series = {
            "per-slice 90x90x60": write_run(
                make_phantom_run(
                    n_volumes=args.slice_volumes, tr_s=0.8, shape=(90, 90, 60), voxel_mm=2.4
                ),
                root / "slice",
                SendOptions(encoding="slice"),
                truth=False,
            ),
            "mosaic 64x64x36": write_run(
                make_phantom_run(
                    n_volumes=args.mosaic_volumes, tr_s=2.0, shape=(64, 64, 36), voxel_mm=3.0
                ),
                root / "mosaic",
                SendOptions(encoding="mosaic"),
                truth=False,
            ),
        }
        rows: list[list[str]] = []
        floor_rows: list[list[str]] = []
        latency: dict[str, list[float]] = {name: [] for name in series}
        storescp_fast: dict[str, float] = {}  # storescp, TCP_NODELAY=1, per series
        assembly = load_settings(environ={}).assembly
        for name, files in series.items():
            size_mb = sum(f.stat().st_size for f in files) / 1e6 / len(files)
            for nodelay in (False, True):
                rates: dict[str, list[float]] = {}
                receivers = ["boldstream", "boldstream, quickack off", "DCMTK storescp"]
                if nodelay:  # without TCP_NODELAY it stalls like "quickack off"
                    receivers.insert(1, "boldstream, ingest in a thread")
                    receivers.insert(3, "boldstream, fsync off")
                    receivers.insert(4, "boldstream, direct_store off")
                    receivers.insert(5, "boldstream, no series analysed")
                    receivers.insert(6, "boldstream SCP, no ingest")
                    receivers.insert(7, "pynetdicom alone (no-op handler)")
                # Alternating (each receiver once per round), so a machine that
                # drifts during the run shifts every receiver alike.
                for _ in range(args.repeats):
                    for receiver in receivers:
                        slow = (
                            not nodelay
                            and receiver != "boldstream"
                            and name.startswith("per-slice")
                        )
                        subset = files[: args.slow_cap] if slow else files
                        if receiver == "DCMTK storescp":
                            with _storescp(root, nodelay=nodelay) as port:
                                seconds = _send(port, subset, nodelay=nodelay)
                        elif receiver.startswith("pynetdicom"):
                            with _pynetdicom_alone() as port:
                                seconds = _send(port, subset, nodelay=nodelay)
                        elif receiver == "boldstream SCP, no ingest":
                            with _scp_only(root) as (port, scp):
                                seconds = _send(port, subset, nodelay=nodelay)
                                if scp.stats.accepted != len(subset):
                                    raise SystemExit(f"{receiver}: {scp.stats.snapshot()}")
                        else:
                            quick = receiver != "boldstream, quickack off"
                            mode = "thread" if receiver.endswith("in a thread") else "process"
                            fsync = receiver != "boldstream, fsync off"
                            direct = receiver != "boldstream, direct_store off"
                            analyse = receiver != "boldstream, no series analysed"
                            with _boldstream(
                                root,
                                quickack=quick,
                                ingest=mode,
                                fsync=fsync,
                                direct=direct,
                                analyse=analyse,
                            ) as (port, vols, rec):
                                seconds = _send(port, subset, nodelay=nodelay)
                                rec.ingest.wait_idle(60)
                                if not analyse and vols:  # what the row claims, or no row
                                    raise SystemExit(f"{receiver}: {len(vols)} volumes")
                                if receiver == "boldstream":
                                    latency[name] += [
                                        (v.assembled - v.last_received) * 1e3 for v in vols
                                    ]
                        rates.setdefault(receiver, []).append(len(subset) / seconds)
                base = statistics.median(rates["DCMTK storescp"])
                if nodelay:
                    storescp_fast[name] = base
                for receiver, values in rates.items():
                    med = statistics.median(values)
                    # Paired by round: storescp's own rate drifts by 2x over an hour here.
                    ratio = statistics.median(
                        v / b for v, b in zip(values, rates["DCMTK storescp"], strict=True)
                    )
                    rows.append(
                        [
                            name,
                            "TCP_NODELAY=1" if nodelay else "default",
                            receiver,
                            f"{med:,.0f}",
                            f"{med * size_mb:,.1f}",
                            f"{ratio:.2f}x",
                            str(
                                len(files[: args.slow_cap])
                                if not nodelay
                                and receiver != "boldstream"
                                and name.startswith("per-slice")
                                else len(files)
                            ),
                        ]
                    )
            writes = [_durable_writes(root, files) for _ in range(args.repeats)]
            floor = statistics.median(len(w) / sum(w) for w in writes)
            per_instance = [s * 1e3 for w in writes for s in w]
            floor_rows.append(
                [
                    name,
                    "spool durable write only (no network, no decode)",
                    f"{floor:,.0f}",
                    f"{floor * size_mb:,.1f}",
                    f"{statistics.median(per_instance):.2f}",
                    f"{_pct(per_instance, 0.95):.2f}",
                    f"{storescp_fast[name]:,.0f}",
                    f"{floor / storescp_fast[name]:.2f}x",
                ]
            )
            latency[f"{name}, decode+assembly alone"] = [
                ms for _ in range(args.repeats) for ms in _assembly_alone(files, assembly)
            ]
        print(f"## Receive ({machine_line()})\n")
        print(
            f"storescu -> receiver on 127.0.0.1, median of {args.repeats} alternating rounds; "
            "vs storescp: median of the per-round ratios\n"
        )
        print(
            table(
                ["series", "sender", "receiver", "instances/s", "MB/s", "vs storescp", "instances"],
                rows,
            )
        )
        print(
            "\ndurability floor: Spool.store alone (write, fsync, link, directory fsync), "
            "the same files,\nsequential, fresh spool, median of "
            f"{args.repeats} runs, against storescp with TCP_NODELAY=1 above\n"
        )
        print(
            table(
                [
                    "series",
                    "receiver",
                    "instances/s",
                    "MB/s",
                    "ms/instance p50",
                    "p95",
                    "storescp TCP_NODELAY=1",
                    "vs storescp",
                ],
                floor_rows,
            )
        )
        # Several associations at once (boldstream only; storescp serves one at a time).
        par_rows = []
        files = series["per-slice 90x90x60"]
        for senders in (1, 4):
            values: dict[str, list[float]] = {"process": [], "thread": []}
            for _ in range(args.repeats):
                for mode, got in values.items():  # alternating, same conditions
                    with _boldstream(root, quickack=True, ingest=mode) as (port, _vols, rec):
                        got.append(len(files) / _send(port, files, nodelay=False, senders=senders))
                        rec.ingest.wait_idle(60)
            process, thread = (statistics.median(values[m]) for m in ("process", "thread"))
            par_rows.append(
                [str(senders), f"{process:,.0f}", f"{thread:,.0f}", f"{process / thread:.2f}x"]
            )
        print("\nper-slice 90x90x60, default storescu, parallel associations into boldstream\n")
        print(
            table(
                ["associations", "ingest process (default)", "ingest in a thread", "ratio"],
                par_rows,
            )
        )
        handshakes: dict[str, tuple[list[float], list[float]]] = {
            "boldstream": ([], []),
            "DCMTK storescp": ([], []),
        }
        for _ in range(args.repeats):
            for receiver, (setup, release) in handshakes.items():
                with contextlib.ExitStack() as stack:
                    if receiver == "boldstream":
                        port = stack.enter_context(_boldstream(root, quickack=True))[0]
                    else:
                        port = stack.enter_context(_storescp(root, nodelay=True))
                    got = _handshakes(port, 40)
                setup += got[0]
                release += got[1]
        print(
            "\nassociation set-up and release, pynetdicom requestor, "
            f"{40 * args.repeats} each (storescp with TCP_NODELAY=1), ms\n"
        )
        print(
            table(
                ["receiver", "RQ -> AC p50", "p95", "release RQ -> RP p50", "p95"],
                [
                    [
                        receiver,
                        f"{statistics.median(setup):.2f}",
                        f"{_pct(setup, 0.95):.2f}",
                        f"{statistics.median(release):.2f}",
                        f"{_pct(release, 0.95):.2f}",
                    ]
                    for receiver, (setup, release) in handshakes.items()
                ],
            )
        )
        # Paced like a scanner (20x real time at TR 2 s: a volume every 100 ms), sent by
        # `boldstream simulate` in its own process, as opposed to the flood above, where
        # volumes also queue behind each other.
        paced: list[tuple[str, str, str | None, str]] = [
            (encoding, mode, None, f"{label}, paced at 20x real time{suffix}")
            for encoding, label in (("mosaic", "mosaic 64x64x36"), ("slice", "per-slice 64x64x36"))
            for mode, suffix in (("process", ""), ("thread", ", ingest in a thread"))
        ]
        # receiver.assemble = "after_write": each instance waits for its write's verdict.
        waits = "mosaic 64x64x36, paced at 20x real time, assembled after its write"
        paced.insert(2, ("mosaic", "process", "after_write", waits))
        for _ in range(args.repeats):  # alternating: process, thread, process, ...
            for encoding, mode, assemble, label in paced:
                with _boldstream(root, quickack=True, ingest=mode, assemble=assemble) as (
                    port,
                    vols,
                    rec,
                ):
                    subprocess.run(
                        [sys.executable, "-m", "boldstream", "simulate", "--volumes", "60",
                         "--encoding", encoding, "--pace", "20", "--port", str(port)],
                        check=True, capture_output=True, timeout=300,
                    )  # fmt: skip
                    rec.ingest.wait_idle(60)
                    latency.setdefault(label, []).extend(
                        (v.assembled - v.last_received) * 1e3 for v in vols
                    )
        # The part of the paced latency no receiver can avoid: the durable write of
        # a volume's last instance, on a disk left idle 100 ms between volumes.
        latency["mosaic 64x64x36, durable write alone, 100 ms apart"] = [
            s * 1e3 for s in _durable_writes(root, series["mosaic 64x64x36"][:60], gap_s=0.1)
        ]
        lat_rows = [
            [
                name,
                str(len(v)),
                f"{statistics.median(v):.2f}",
                f"{_pct(v, 0.95):.2f}",
                f"{max(v):.2f}",
            ]
            for name, v in latency.items()
            if v
        ]
        print("\nassembly latency, last instance of a volume received -> volume ready (ms);")
        print("the first rows are under the flood above, the paced rows as a scanner sends;")
        print("'alone' rows: what the ingest does with the same files' bytes (read, decode,")
        print(f"assemble), no network, no spool, no hand-over ({args.repeats} passes)\n")
        print(table(["series", "volumes", "p50", "p95", "max"], lat_rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
