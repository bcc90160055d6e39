"""``boldstream health`` against a live listener and dashboard on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import free_port

from boldstream.cli import main
from boldstream.config import load_settings
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.spool import Spool
from boldstream.sinks.dashboard.app import Dashboard


@pytest.fixture
def scp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StorageSCP]:
    receiver: dict[str, Any] = {
        "port": 0,
        "spool_dir": str(tmp_path),
        **getattr(request, "param", {}),
    }
    settings = load_settings(overrides=[{"receiver": receiver}], environ={})
    server = StorageSCP(settings.receiver, Spool(tmp_path), lambda item: None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    # /healthz answers whether or not the publisher is there.
    d = Dashboard(f"tcp://127.0.0.1:{free_port()}", port=0)
    d.start()
    yield d
    d.stop()


def _health(dicom_port: int, web_port: int | None, *extra: str) -> int:
    args = ["health", "--timeout", "3", "--set", f"receiver.port={dicom_port}"]
    if web_port is None:
        args += ["--set", "dashboard.enabled=false"]
    else:
        args += ["--set", f"dashboard.port={web_port}"]
    return main([*args, *extra])


def test_healthy_when_both_answer(scp: StorageSCP, dashboard: Dashboard) -> None:
    assert _health(scp.port, dashboard.port) == 0


@pytest.mark.parametrize(
    "scp",
    [{"allowed_calling_aets": ["SCANNER"]}, {"allowed_addresses": ["10.0.0.0/8"]}],
    ids=["calling-aet-refused", "address-refused"],
    indirect=True,
)
def test_a_listener_that_refuses_us_still_answers(scp: StorageSCP) -> None:
    assert _health(scp.port, None) == 0


def test_says_which_part_does_not_answer(
    scp: StorageSCP, dashboard: Dashboard, capsys: pytest.CaptureFixture[str]
) -> None:
    silent = free_port()
    assert _health(scp.port, silent) == 1
    err = capsys.readouterr().err
    assert f"dashboard http://127.0.0.1:{silent}/healthz: no answer" in err
    assert "DICOM" not in err
    down = free_port()
    assert _health(down, dashboard.port) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"boldstream health: DICOM listener 127.0.0.1:{down}: no connection (Connection refused)"
    ]


def test_a_spool_below_its_floor_is_unhealthy(
    scp: StorageSCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The listener answers, but refuses every instance: a monitor must hear it."""
    spool = ("--set", f"receiver.spool_dir={tmp_path}")
    assert _health(scp.port, None, *spool, "--set", "receiver.min_free_mb=1") == 0
    assert _health(scp.port, None, *spool, "--set", "receiver.min_free_mb=1e12") == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"boldstream health: spool {tmp_path}: ")
    assert line.endswith(
        "MB free, below receiver.min_free_mb (1e+12 MB): every instance is refused (0xA700)"
    )
    # Checked from a machine without the spool folder: nothing to judge.
    away = ("--set", f"receiver.spool_dir={tmp_path / 'elsewhere'}")
    assert _health(scp.port, None, *away, "--set", "receiver.min_free_mb=1e12") == 0
