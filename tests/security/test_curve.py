"""CurveZMQ on the result streams: only subscribers that know the server's key get anything.

A pipeline (threads, loopback, ephemeral ports) runs with
``pipeline.curve_secret_key``; subscribers with the right server public key
receive every result, a plain subscriber and one holding a wrong server key
receive nothing while the good one receives everything. With
``pipeline.curve_authorized_keys`` a client whose key is not listed is kept
out too. ``boldstream keys`` writes 0600 key files; ``boldstream listen``
connects with ``--server-key``.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import make_series, pipeline_settings, volumes, wait_for

from boldstream.cli import main
from boldstream.errors import ConfigError, StreamError
from boldstream.pipeline.service import Pipeline
from boldstream.pipeline.snapshot import request_snapshot
from boldstream.sinks import topics
from boldstream.stream.curve import CurveClient, CurveServer, load_secret_key
from boldstream.stream.pubsub import Subscriber

pytestmark = pytest.mark.timeout(120)

N = 6


def _curve_settings(tmp_path: Path, keys: dict[str, tuple[Path, Path]], *extra: str) -> Any:
    return pipeline_settings(tmp_path, f"pipeline.curve_secret_key='{keys['server'][1]}'", *extra)


def _run_series(pipeline: Pipeline, uid: str) -> None:
    series = make_series(uid)
    for v in volumes(N, series):
        pipeline.submit(v)
    pipeline.end_series(series, n_volumes=N)


def _drain(sub: Subscriber, until: float) -> list[Any]:
    out = []
    while (remaining := until - time.monotonic()) > 0:
        m = sub.recv(timeout_ms=max(1, int(remaining * 1000)))
        if m is not None:
            out.append(m)
    return out


def _qc_all(sub: Subscriber, timeout: float = 60.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while sum(m.topic == topics.QC for m in out) < N:
        remaining = deadline - time.monotonic()
        assert remaining > 0, [m.topic for m in out]
        m = sub.recv(timeout_ms=int(remaining * 1000))
        if m is not None:
            out.append(m)
    return out


def test_keys_command_writes_0600_files_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "k"
    assert main(["keys", str(folder), "--name", "scanner-pc"]) == 0
    public, secret = folder / "scanner-pc.key", folder / "scanner-pc.key_secret"
    for f in (public, secret):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    pub, sec = load_secret_key(secret)
    assert zmq.curve_public(sec) == pub
    assert "secret-key" not in public.read_text()
    before = secret.read_bytes()
    assert main(["keys", str(folder), "--name", "scanner-pc"]) == 2
    assert "exists" in capsys.readouterr().err
    assert secret.read_bytes() == before


def test_only_subscribers_with_the_server_key_receive(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], ctx: zmq.Context[Any]
) -> None:
    settings = _curve_settings(tmp_path, keys)
    with Pipeline(settings, mode="thread") as pipeline:
        good = Subscriber(
            ctx, pipeline.pub_endpoint, rcvhwm=0, curve=CurveClient.from_files(keys["server"][0])
        )
        plain = Subscriber(ctx, pipeline.pub_endpoint, rcvhwm=0)
        wrong = Subscriber(
            ctx,
            pipeline.pub_endpoint,
            rcvhwm=0,
            curve=CurveClient.from_files(keys["impostor"][0]),
        )
        assert wait_for(lambda: pipeline.health()["hub"]["subscriptions"] >= 1)
        _run_series(pipeline, "1.2.826.0.1.3680043.8.498.71")
        got = _qc_all(good)
        # The stream ran to the end for the good subscriber; the others, given
        # another second on top, still have nothing.
        leaked = _drain(plain, time.monotonic() + 1.0) + _drain(wrong, time.monotonic() + 0.2)
        assert pipeline.health()["hub"]["subscriptions"] == 1
        # Snapshot endpoint: a CURVE server too.
        snap = request_snapshot(
            pipeline.snapshot_endpoint,
            context=ctx,
            timeout=5.0,
            curve=CurveClient.from_files(keys["server"][0]),
        )
        with pytest.raises(StreamError):
            request_snapshot(pipeline.snapshot_endpoint, context=ctx, timeout=1.0)
        for s in (good, plain, wrong):
            s.close()
    assert [m.index for m in got if m.topic == topics.QC] == list(range(N))
    assert leaked == []
    assert snap["series"]


def test_authorized_keys_keep_unlisted_clients_out(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], ctx: zmq.Context[Any]
) -> None:
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(keys["client"][0].read_bytes())
    settings = _curve_settings(tmp_path, keys, f"pipeline.curve_authorized_keys='{allowed}'")
    with Pipeline(settings, mode="thread") as pipeline:
        server_key = keys["server"][0]
        listed = Subscriber(
            ctx,
            pipeline.pub_endpoint,
            rcvhwm=0,
            curve=CurveClient.from_files(server_key, keys["client"][1]),
        )
        unlisted = Subscriber(
            ctx,
            pipeline.pub_endpoint,
            rcvhwm=0,
            curve=CurveClient.from_files(server_key, keys["stranger"][1]),
        )
        throwaway = Subscriber(
            ctx, pipeline.pub_endpoint, rcvhwm=0, curve=CurveClient.from_files(server_key)
        )
        # The in-process client (the dashboard's) uses the server's own pair.
        inside = Subscriber(ctx, pipeline.pub_endpoint, rcvhwm=0, curve=pipeline.subscriber_curve())
        assert wait_for(lambda: pipeline.health()["hub"]["subscriptions"] >= 2)
        _run_series(pipeline, "1.2.826.0.1.3680043.8.498.72")
        got, got_inside = _qc_all(listed), _qc_all(inside)
        leaked = _drain(unlisted, time.monotonic() + 1.0) + _drain(throwaway, time.monotonic())
        assert pipeline.health()["hub"]["subscriptions"] == 2
        for s in (listed, unlisted, throwaway, inside):
            s.close()
    assert len([m for m in got if m.topic == topics.QC]) == N
    assert len([m for m in got_inside if m.topic == topics.QC]) == N
    assert leaked == []


def test_bad_key_settings_are_refused_with_the_key_named(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    public_only = keys["server"][0]
    settings = pipeline_settings(tmp_path, f"pipeline.curve_secret_key='{public_only}'")
    with pytest.raises(ConfigError, match=r"pipeline.curve_secret_key .*only a public key"):
        Pipeline(settings, mode="thread").start()
    with pytest.raises(ConfigError, match=r"pipeline.curve_authorized_keys .*not a folder"):
        CurveServer(keys["server"][1], authorized=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="curve_authorized_keys needs curve_secret_key"):
        pipeline_settings(tmp_path, f"pipeline.curve_authorized_keys='{tmp_path}'")
    garbage = tmp_path / "garbage.key"
    garbage.write_text('public-key = "short"\n')
    with pytest.raises(ConfigError, match="40 Z85 characters"):
        CurveClient.from_files(garbage)


def test_listen_command_with_server_key(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    settings = _curve_settings(tmp_path, keys)
    with Pipeline(settings, mode="thread") as pipeline:
        argv = [
            sys.executable, "-m", "boldstream", "listen",
            "--endpoint", pipeline.pub_endpoint,
            "--server-key", str(keys["server"][0]),
            "--topic", "qc", "--count", str(N),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: pipeline.health()["hub"]["subscriptions"] >= 1, timeout=30)
            _run_series(pipeline, "1.2.826.0.1.3680043.8.498.73")
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == N and all(" qc " in line for line in lines), out


def test_listen_refuses_a_client_key_without_a_server_key(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["listen", "--client-key", str(keys["client"][1])]) == 2
    assert "--client-key needs --server-key" in capsys.readouterr().err
    assert main(["listen", "--server-key", str(tmp_path / "missing.key")]) == 2
    assert "not a readable ZeroMQ key file" in capsys.readouterr().err
