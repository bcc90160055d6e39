"""Pipeline benchmark: codec cost per hop, and a 3-stage pass-through chain.

Per hop: one volume is encoded, sent on a PUSH socket, received on a PULL
socket in the same thread and decoded, over inproc://, ipc:// and tcp loopback;
the clock runs from before encoding to after decoding. The naive peer does the
same with ``pickle.dumps``/``pickle.loads`` of the Volume over the same
sockets (what ``send_pyobj`` does), and a floor sends only the voxel bytes
(no header, no codec), so ratios and differences are measured on the same
machine in the same run, interleaved message by message.

Chain: a source sends one volume, three pass-through stages forward it, a sink
receives it; the next volume leaves only when the previous one has arrived, so
the figures are latencies, not throughput. Stages run as threads over
inproc:// and as spawned processes over ipc:// and tcp://127.0.0.1.

    python benchmarks/pipeline.py               # the full table
    python benchmarks/pipeline.py --n 100 --chain-n 50
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line, table

from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.stream.codec import recv, send
from boldstream.stream.messages import Message
from boldstream.stream.runner import start_chain
from boldstream.stream.stage import StageConfig

SHAPES = {"90x90x60": (90, 90, 60), "64x64x36": (64, 64, 36)}


def make_volume(shape: tuple[int, int, int], index: int = 0) -> Volume:
    rng = np.random.default_rng(index)
    now = time.time()
    series = SeriesInfo(
        series_uid="1.2.826.0.1.3680043.8.498.1",
        study_uid="1.2.826.0.1.3680043.8.498",
        description="rest",
        session_key="bench",
        manufacturer="SIEMENS",
        encoding="mosaic",
        tr_s=0.8,
        slice_timing=tuple(float(t) for t in np.linspace(0, 0.75, shape[2])),
    )
    return Volume(
        data=rng.random(shape, dtype=np.float32),
        vox2ras=np.diag([2.4, 2.4, 2.4, 1.0]),
        series=series,
        index=index,
        acquisition_time=36000.0,
        first_received=now,
        last_received=now,
        assembled=now,
        instance_uids=(f"1.2.3.{index}",),
    )


def percentiles(samples_us: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(samples_us), [50, 95, 99])
    return float(q[0]), float(q[1]), float(q[2])


def pair(
    ctx: zmq.Context[Any], transport: str, tmp: str
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.linger = 0
    address = {
        "inproc": f"inproc://hop-{time.monotonic_ns()}",
        "ipc": f"ipc://{tmp}/hop-{time.monotonic_ns()}",
        "tcp": "tcp://127.0.0.1:*",
    }[transport]
    pull.bind(address)
    push.connect(pull.get(zmq.LAST_ENDPOINT).decode())
    return push, pull


def hop_codec(push: zmq.Socket[Any], pull: zmq.Socket[Any], volume: Volume) -> float:
    t0 = time.perf_counter_ns()
    send(push, Message(volume))
    message = recv(pull)
    t1 = time.perf_counter_ns()
    assert isinstance(message.payload, Volume)
    return (t1 - t0) / 1e3


def hop_raw(push: zmq.Socket[Any], pull: zmq.Socket[Any], volume: Volume) -> float:
    """Floor: only the voxel bytes, no header, no codec (not a usable message)."""
    t0 = time.perf_counter_ns()
    push.send(volume.data, copy=False)
    frame = pull.recv(copy=False)
    data = np.frombuffer(frame.buffer, dtype=np.float32).reshape(volume.shape)
    t1 = time.perf_counter_ns()
    assert data.shape == volume.shape
    return (t1 - t0) / 1e3


def hop_pickle(push: zmq.Socket[Any], pull: zmq.Socket[Any], volume: Volume) -> float:
    t0 = time.perf_counter_ns()
    push.send(pickle.dumps(volume, protocol=pickle.HIGHEST_PROTOCOL))
    back = pickle.loads(pull.recv())
    t1 = time.perf_counter_ns()
    assert isinstance(back, Volume)
    return (t1 - t0) / 1e3


def bench_hops(n: int, transports: list[str], shapes: list[str]) -> list[list[str]]:
    rows: list[list[str]] = []
    ctx: zmq.Context[Any] = zmq.Context()
    methods: dict[str, Callable[[zmq.Socket[Any], zmq.Socket[Any], Volume], float]] = {
        "raw bytes": hop_raw,
        "codec": hop_codec,
        "pickle": hop_pickle,
    }
    with tempfile.TemporaryDirectory(prefix="bsb") as tmp:
        for shape_name in shapes:
            volume = make_volume(SHAPES[shape_name])
            for transport in transports:
                push, pull = pair(ctx, transport, tmp)
                samples: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(20):  # warm-up: connections, allocator
                    for fn in methods.values():
                        fn(push, pull, volume)
                # Interleave the two peers so that load from other users of the
                # machine hits both alike.
                for _ in range(n):
                    for name, fn in methods.items():
                        samples[name].append(fn(push, pull, volume))
                codec50 = statistics.median(samples["codec"])
                raw50 = statistics.median(samples["raw bytes"])
                for name in methods:
                    p50, p95, p99 = percentiles(samples[name])
                    ratio = f"{p50 / codec50:.2f}"
                    extra = f"{p50 - raw50:+.0f}" if name != "raw bytes" else ""
                    rows.append(
                        [
                            shape_name,
                            transport,
                            name,
                            f"{p50:.0f}",
                            f"{p95:.0f}",
                            f"{p99:.0f}",
                            ratio,
                            extra,
                        ]
                    )
                push.close()
                pull.close()
    ctx.term()
    return rows


def bench_chain(n: int, modes: list[str], shape_name: str) -> list[list[str]]:
    rows: list[list[str]] = []
    ctx: zmq.Context[Any] = zmq.Context()
    volume = make_volume(SHAPES[shape_name])
    with tempfile.TemporaryDirectory(prefix="bsc") as tmp:
        for mode in modes:
            sink = ctx.socket(zmq.PULL)
            sink.linger = 0
            if mode == "thread/inproc":
                sink.bind(f"inproc://chain-sink-{time.monotonic_ns()}")
                configs = [StageConfig(name=f"s{i}", linger_ms=0) for i in (1, 2, 3)]
            elif mode == "process/ipc":
                sink.bind(f"ipc://{tmp}/sink")
                configs = [
                    StageConfig(
                        name=f"s{i}",
                        pull=f"ipc://{tmp}/s{i}",
                        control=f"ipc://{tmp}/c{i}",
                        linger_ms=0,
                    )
                    for i in (1, 2, 3)
                ]
            else:
                sink.bind("tcp://127.0.0.1:*")
                configs = [StageConfig(name=f"s{i}", linger_ms=0) for i in (1, 2, 3)]
            chain = start_chain(
                configs,
                output=sink.get(zmq.LAST_ENDPOINT).decode(),
                mode="thread" if mode.startswith("thread") else "process",
                context=ctx,
            )
            source = ctx.socket(zmq.PUSH)
            source.linger = 0
            source.connect(chain.input)
            samples: list[float] = []
            per_stage: list[float] = []
            for i in range(n + 20):
                t0 = time.perf_counter_ns()
                send(source, Message(volume))
                if not sink.poll(30_000):
                    raise SystemExit(f"chain {mode}: volume {i} did not arrive")
                message = recv(sink)
                t1 = time.perf_counter_ns()
                if i >= 20:
                    samples.append((t1 - t0) / 1e3)
                    ts = message.timestamps
                    per_stage.append((ts["s3.out"] - ts["s1.in"]) * 1e6)
            source.close()
            chain.stop(timeout=10)
            sink.close()
            p50, p95, p99 = percentiles(samples)
            s50, s95, _ = percentiles(per_stage)
            rows.append(
                [
                    shape_name,
                    mode,
                    f"{p50 / 1e3:.2f}",
                    f"{p95 / 1e3:.2f}",
                    f"{p99 / 1e3:.2f}",
                    f"{s50 / 1e3:.2f} / {s95 / 1e3:.2f}",
                ]
            )
    ctx.term()
    return rows


def machine() -> str:
    """The shared machine line plus the versions this benchmark depends on."""
    return (
        f"{machine_line()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
        f"numpy {np.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="messages per hop measurement")
    parser.add_argument("--chain-n", type=int, default=300, help="volumes through the chain")
    parser.add_argument(
        "--transports",
        nargs="+",
        default=["inproc", "ipc", "tcp"],
        choices=["inproc", "ipc", "tcp"],
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--chain-modes",
        nargs="+",
        default=["thread/inproc", "process/ipc", "process/tcp"],
        choices=["thread/inproc", "process/ipc", "process/tcp"],
    )
    parser.add_argument("--chain-shape", default="90x90x60", choices=list(SHAPES))
    args = parser.parse_args(argv)

    print(machine())
    print()
    print(f"Per hop: encode + send + recv + decode, one volume, {args.n} messages (us)")
    print()
    hop_rows = bench_hops(args.n, args.transports, args.shapes)
    print(
        table(
            ["volume", "transport", "method", "p50", "p95", "p99", "p50 / codec", "p50 - raw"],
            hop_rows,
        )
    )
    print()
    print(
        f"Chain: source -> 3 pass-through stages -> sink, {args.chain_n} volumes "
        f"of {args.chain_shape}, one in flight (ms)"
    )
    print()
    chain_rows = bench_chain(args.chain_n, args.chain_modes, args.chain_shape)
    print(
        table(
            ["volume", "stages", "p50", "p95", "p99", "s1.in->s3.out p50 / p95"],
            chain_rows,
        )
    )


if __name__ == "__main__":
    main()
