"""Helpers of the pipeline tests: phantom runs wrapped into receiver Volumes.

(Imported by name: tests/pipeline/conftest.py puts this folder on sys.path.)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from boldstream.config import Settings, load_settings
from boldstream.pipeline.offline import through
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.simulator.phantom import PhantomRun, make_phantom_run
from boldstream.stream.messages import Message, Result
from boldstream.stream.pubsub import Subscriber

SMALL = (40, 40, 24)


def make_series(
    uid: str = "1.2.3.4", *, session_key: str = "sess-a", tr_s: float = 2.0
) -> SeriesInfo:
    return SeriesInfo(
        series_uid=uid,
        study_uid="1.2.3",
        description="rest",
        session_key=session_key,
        manufacturer="SIEMENS",
        series_number=7,
        encoding="mosaic",
        tr_s=tr_s,
    )


@functools.lru_cache(maxsize=8)
def phantom(n: int, seed: int = 0, motion: str = "mild") -> PhantomRun:
    return make_phantom_run(
        n_volumes=n, shape=SMALL, voxel_mm=4.5, motion=motion, tr_s=2.0, seed=seed
    )


@functools.lru_cache(maxsize=8)
def phantom_arrays(n: int, seed: int = 0, motion: str = "mild") -> tuple[np.ndarray, ...]:
    run = phantom(n, seed, motion)
    return tuple(run.volume(t) for t in range(n))


def volumes(n: int, series: SeriesInfo, *, seed: int = 0, motion: str = "mild") -> list[Volume]:
    """``n`` phantom volumes of ``series``, stamped as if they just arrived."""
    run = phantom(n, seed, motion)
    arrays = phantom_arrays(n, seed, motion)
    return [as_volume(arrays[t], run.vox2ras, series, t) for t in range(n)]


def as_volume(data: np.ndarray, vox2ras: np.ndarray, series: SeriesInfo, index: int) -> Volume:
    now = time.time()
    return Volume(
        data=np.asarray(data, dtype=np.float32),
        vox2ras=np.asarray(vox2ras, dtype=np.float64),
        series=series,
        index=index,
        acquisition_time=36000.0 + 2.0 * index,
        first_received=now,
        last_received=now,
        assembled=now,
        instance_uids=(f"{series.series_uid}.{index}",),
    )


def restamp(volume: Volume) -> Volume:
    """The same volume with fresh arrival times (latency is measured from them)."""
    now = time.time()
    return Volume(
        data=volume.data,
        vox2ras=volume.vox2ras,
        series=volume.series,
        index=volume.index,
        acquisition_time=volume.acquisition_time,
        first_received=now,
        last_received=now,
        assembled=now,
        instance_uids=volume.instance_uids,
    )


def pipeline_settings(tmp_path: object, *extra: str) -> Settings:
    """Settings for a pipeline on ephemeral loopback ports, state under ``tmp_path``."""
    return load_settings(
        overrides=[
            "pipeline.pub='tcp://127.0.0.1:*'",
            "pipeline.snapshot='tcp://127.0.0.1:*'",
            f"receiver.spool_dir='{tmp_path}'",
            *extra,
        ],
        environ={},
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` s (a bounded wait on a condition)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def subscribe(ctx: zmq.Context[Any], pipeline: Pipeline) -> Subscriber:
    """A subscriber to every topic, connected once the pipeline has seen it."""
    before = pipeline.health()["hub"]["subscriptions"]
    sub = Subscriber(ctx, pipeline.pub_endpoint, rcvhwm=0)
    assert wait_for(lambda: pipeline.health()["hub"]["subscriptions"] > before)
    return sub


def collect(sub: Subscriber, *, ends: int, timeout: float = 60.0) -> list[Message]:
    """Everything published until ``ends`` series-end messages have arrived."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while sum(m.kind == "series-end" for m in out) < ends:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(out)} messages: {[(m.topic, m.index) for m in out][-10:]}"
        m = sub.recv(timeout_ms=int(remaining * 1000))
        if m is not None:
            out.append(m)
    return out


def assert_same_target(got: Message, want: Message) -> None:
    """Two ``target`` results agree: discrete values equal, numbers to 1e-9, maps to 1e-6."""
    a, b = got.payload, want.payload
    assert got.topic == want.topic == "target" and got.index == want.index
    assert isinstance(a, Result) and isinstance(b, Result)
    assert a.values.keys() == b.values.keys()
    for key, value in b.values.items():
        other = a.values[key]
        if isinstance(value, float) or (
            isinstance(value, list) and value and isinstance(value[0], float)
        ):
            np.testing.assert_allclose(other, value, rtol=1e-9, atol=1e-12, err_msg=key)
        else:
            assert other == value, (key, other, value)
    for name, array in b.arrays.items():
        np.testing.assert_allclose(a.arrays[name], array, rtol=1e-6, atol=1e-7, err_msg=name)


def chain(stages: list[Any], messages: list[Message]) -> list[Message]:
    """``messages`` through ``stages`` in this thread, as the pipeline chains them."""
    return [m for message in messages for m in through(stages, message)]
