"""Who may connect: peer address allow-list and calling AE titles.

Only loopback is available, so the address tests use two loopback
addresses: 127.0.0.1 (DCMTK's tools always connect from it) and 127.0.0.2
(pynetdicom's SCU can bind its side to it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from peers import require_tool
from pynetdicom import AE
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.errors import ConfigError
from boldstream.receiver.scp import Received, StorageSCP
from boldstream.receiver.spool import Spool

pytestmark = pytest.mark.timeout(60)

VERIFICATION = "1.2.840.10008.1.1"


@contextmanager
def running(tmp_path: Path, **receiver: Any) -> Iterator[tuple[StorageSCP, list[Received]]]:
    settings = load_settings(
        overrides=[{"receiver": {"port": 0, "spool_dir": str(tmp_path / "spool"), **receiver}}],
        environ={},
    )
    received: list[Received] = []
    scp = StorageSCP(settings.receiver, Spool(settings.receiver.spool_dir), received.append)
    scp.start()
    try:
        yield scp, received
    finally:
        scp.stop()


def dcmtk(
    tool: str, port: int, *args: str, aet: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool), "-aet", aet, "-aec", "BOLDSTREAM", "127.0.0.1", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def echo_from(address: str, port: int) -> bool:
    """C-ECHO with pynetdicom's SCU bound to ``address``; True on success."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="BOLDSTREAM", bind_address=(address, 0))
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0x0000)
    finally:
        assoc.release()


def test_peer_outside_the_allow_list_is_closed_before_association(
    tmp_path: Path, pydicom_data: Path
) -> None:
    with (
        capture_logs() as logs,
        running(tmp_path, allowed_addresses=["127.0.0.2/32"]) as (scp, got),
    ):
        out = dcmtk("storescu", scp.port, str(pydicom_data / "MR_small.dcm"))
        assert out.returncode != 0
        assert got == []
        assert scp.stats.snapshot()["associations"] == 0
        refused = [e for e in logs if e["event"].startswith("connection refused")]
        assert len(refused) == 1
        assert refused[0]["event"] == (
            "connection refused: peer address not in receiver.allowed_addresses"
        )
        assert refused[0]["peer"].startswith("127.0.0.1:")
        # The allowed address still gets in, on the same server.
        assert echo_from("127.0.0.2", scp.port)
        assert not echo_from("127.0.0.1", scp.port)


def test_peer_inside_an_allowed_network_gets_in(tmp_path: Path, pydicom_data: Path) -> None:
    with running(tmp_path, allowed_addresses=["10.0.0.0/8", "127.0.0.0/8"]) as (scp, got):
        out = dcmtk("storescu", scp.port, str(pydicom_data / "MR_small.dcm"))
        assert out.returncode == 0, out.stderr
        assert len(got) == 1
        assert echo_from("127.0.0.2", scp.port)


def test_refused_calling_ae_title_is_named_in_the_log(tmp_path: Path) -> None:
    with capture_logs() as logs, running(tmp_path, allowed_calling_aets=["MRC40123"]) as (scp, _):
        out = dcmtk("echoscu", scp.port, aet="INTRUDER")
        assert out.returncode != 0
        assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
        (line,) = [e for e in logs if e["event"] == "association rejected"]
        assert line["calling_aet"] == "INTRUDER"
        assert "'INTRUDER' is not in receiver.allowed_calling_aets" in line["reason"]
        assert dcmtk("echoscu", scp.port, aet="MRC40123").returncode == 0


@pytest.mark.parametrize("bad", ["127.0.0.300", "scanner.local", "10.0.0.0/33"])
def test_bad_address_setting_names_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"receiver\.allowed_addresses"):
        load_settings(overrides=[{"receiver": {"allowed_addresses": [bad]}}], environ={})


def test_addresses_are_normalised() -> None:
    s = load_settings(
        overrides=[{"receiver": {"allowed_addresses": ["10.1.2.3", "10.1.2.77/24", "::1"]}}],
        environ={},
    )
    assert s.receiver.allowed_addresses == ("10.1.2.3/32", "10.1.2.0/24", "::1/128")
