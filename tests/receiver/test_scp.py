"""The Storage SCP against DCMTK's echoscu/storescu, the scanner-side peers."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import require_tool
from pynetdicom.dimse import DIMSEServiceProvider

from boldstream.config import load_settings
from boldstream.receiver.association import PromptAssociation
from boldstream.receiver.scp import Received, StorageSCP
from boldstream.receiver.spool import Spool

pytestmark = pytest.mark.timeout(60)


class Harness:
    def __init__(self, tmp_path: Path, **receiver: object) -> None:
        settings = load_settings(
            overrides=[{"receiver": {"port": 0, "spool_dir": str(tmp_path / "spool"), **receiver}}],
            environ={},
        )
        #: Everything the handler handed over, stored or not (see ``received``).
        self.handed: list[Received] = []
        #: Sentences for the technician about refused instances.
        self.told: list[str] = []
        self.spool = Spool(settings.receiver.spool_dir, min_free_mb=settings.receiver.min_free_mb)
        self.scp = StorageSCP(
            settings.receiver, self.spool, self.handed.append, on_refused=self.told.append
        )
        self.scp.start()

    @property
    def received(self) -> list[Received]:
        """What the ingest thread would assemble: handed over, new, and in the spool.

        Read after the sender has its response, when every token is resolved.
        """
        return [r for r in self.handed if r.durable.wait(0)]

    def storescu(
        self, *files: Path, aet: str = "SCANNER", extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            require_tool("storescu"),
            "-aet",
            aet,
            "-aec",
            "BOLDSTREAM",
            *extra,
            "127.0.0.1",
            str(self.scp.port),
            *map(str, files),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.scp.stop()


def test_echoscu_gets_success(scp: Harness) -> None:
    out = subprocess.run(
        [
            require_tool("echoscu"),
            "-aet",
            "SCANNER",
            "-aec",
            "BOLDSTREAM",
            "127.0.0.1",
            str(scp.scp.port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_storescu_instance_is_spooled_before_success(scp: Harness, pydicom_data: Path) -> None:
    src = pydicom_data / "MR_small.dcm"
    out = scp.storescu(src)
    assert out.returncode == 0, out.stderr
    ds = pydicom.dcmread(src)
    path = scp.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert path.exists()
    stored = pydicom.dcmread(path)
    assert stored.pixel_array.tobytes() == ds.pixel_array.tobytes()
    assert [r.sop_instance_uid for r in scp.received] == [ds.SOPInstanceUID]
    assert scp.received[0].calling_aet == "SCANNER"
    assert scp.scp.stats.snapshot()["accepted"] == 1


@pytest.mark.parametrize(
    ("name", "extra", "syntax"),
    [
        ("MR_small.dcm", ("-xe",), "1.2.840.10008.1.2.1"),  # the handler walks the bytes
        ("MR_small.dcm", ("-xi",), "1.2.840.10008.1.2"),  # the handler walks the bytes
        ("MR_small.dcm", ("-xd",), "1.2.840.10008.1.2.1.99"),  # deflated: pydicom decodes
        ("MR_small.dcm", ("-xb",), "1.2.840.10008.1.2.2"),  # big endian: pydicom decodes
    ],
)
def test_every_transfer_syntax_storescu_sends_is_stored_as_sent(
    scp: Harness, pydicom_data: Path, name: str, extra: tuple[str, ...], syntax: str
) -> None:
    src = pydicom_data / name
    out = scp.storescu(src, extra=extra)
    assert out.returncode == 0, out.stderr
    ds = pydicom.dcmread(src)
    path = scp.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (stored.pixel_array == ds.pixel_array).all()  # values: big endian is byte-swapped
    (received,) = scp.received
    assert received.encoded == path.read_bytes()
    assert received.dataset.SeriesInstanceUID == ds.SeriesInstanceUID  # parsed on demand


@pytest.mark.parametrize("max_send_pdu", ["4096", "131072"])
def test_storescu_c_store_messages_never_go_through_pydicom(
    scp: Harness,
    pydicom_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    max_send_pdu: str,
) -> None:
    """DCMTK's requests, in small or large PDUs, take the struct path both ways.

    pynetdicom's own receive_primitive and send_msg (the pydicom coding of
    command sets) must not run for them; the instance is stored as sent.
    """
    caplog.set_level(logging.WARNING, logger="pynetdicom")  # as serve runs by default
    fallbacks: list[str] = []
    receive, send = DIMSEServiceProvider.receive_primitive, DIMSEServiceProvider.send_msg

    def counting_receive(self: Any, primitive: Any) -> None:
        fallbacks.append("receive")
        receive(self, primitive)

    def counting_send(self: Any, primitive: Any, context_id: int) -> None:
        fallbacks.append("send")
        send(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", counting_receive)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", counting_send)
    src = pydicom_data / "MR_small.dcm"  # 9 KB of pixels: three PDUs at 4096
    out = scp.storescu(src, extra=("--max-send-pdu", max_send_pdu))
    assert out.returncode == 0, out.stderr
    (received,) = scp.received
    stored = pydicom.dcmread(received.path)
    assert (stored.pixel_array == pydicom.dcmread(src).pixel_array).all()
    assert fallbacks == []


def test_resent_instance_is_stored_and_delivered_once(scp: Harness, pydicom_data: Path) -> None:
    src = pydicom_data / "MR_small.dcm"
    assert scp.storescu(src).returncode == 0
    assert scp.storescu(src).returncode == 0
    assert len(scp.received) == 1
    # The resend is found in the spool before it is handed over: not decoded again.
    assert [r.durable.wait(0) for r in scp.handed] == [True]
    assert scp.scp.stats.snapshot()["duplicates"] == 1


def test_other_storage_classes_are_accepted_and_spooled(scp: Harness, pydicom_data: Path) -> None:
    src = pydicom_data / "CT_small.dcm"
    out = scp.storescu(src)
    assert out.returncode == 0, out.stderr
    ds = pydicom.dcmread(src)
    assert scp.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).exists()


def test_refused_calling_ae_title(tmp_path: Path, pydicom_data: Path) -> None:
    h = Harness(tmp_path, allowed_calling_aets=["CONSOLE1"])
    try:
        out = h.storescu(pydicom_data / "MR_small.dcm", aet="INTRUDER")
        assert out.returncode != 0
        assert "reject" in (out.stdout + out.stderr).lower()
        assert h.received == []
        assert h.storescu(pydicom_data / "MR_small.dcm", aet="CONSOLE1").returncode == 0
        assert len(h.received) == 1
    finally:
        h.scp.stop()


def test_unwritable_spool_answers_out_of_resources(scp: Harness, pydicom_data: Path) -> None:
    ds = pydicom.dcmread(pydicom_data / "MR_small.dcm")
    # A file where the study folder should be: the spool cannot write there.
    (scp.spool.root / ds.StudyInstanceUID).write_text("in the way")
    out = scp.storescu(pydicom_data / "MR_small.dcm", extra=("-v",))
    assert "Refused: OutOfResources" in out.stdout + out.stderr, out.stderr
    assert scp.received == []
    # Handed over for decoding while the write was tried, then marked not stored.
    assert [r.durable.wait(0) for r in scp.handed] == [False]
    assert scp.scp.stats.snapshot()["out_of_resources"] == 1
    # The technician is told why, without the instance's UIDs (they name the file).
    assert len(scp.told) == 1
    assert scp.told[0].startswith("the spool refused an instance: cannot write to the spool (")
    assert ds.StudyInstanceUID not in scp.told[0]


@pytest.mark.parametrize(
    ("assemble", "consequence"),
    [
        ("after_write", "it is not in the live analysis"),
        ("on_arrival", "it is already in the live analysis, but not stored"),
    ],
)
def test_spool_below_its_floor_refuses_every_instance_and_tells_once(
    tmp_path: Path, pydicom_data: Path, assemble: str, consequence: str
) -> None:
    h = Harness(tmp_path, min_free_mb=1e12, assemble=assemble)
    try:
        # storescu ends its association at a refusal: three sends, as a console retrying.
        for name in ("MR_small.dcm", "CT_small.dcm", "MR_small.dcm"):
            out = h.storescu(pydicom_data / name, extra=("-v",))
            assert "Refused: OutOfResources" in out.stdout + out.stderr, out.stderr
        assert h.received == []
        assert h.scp.stats.snapshot()["out_of_resources"] == 3
        assert h.scp.refusals.total == 3
        assert len(h.told) == 1  # not once per instance
        assert "is below its free-space floor" in h.told[0]
        assert consequence in h.told[0]
    finally:
        h.scp.stop()


def test_received_is_when_the_last_fragment_was_read_not_when_the_handler_ran(
    tmp_path: Path, pydicom_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency is counted from the instance's arrival: an association thread that
    starts the handler late must not make the instance look newer than it is."""
    serve = PromptAssociation._serve_request
    started: list[float] = []

    def late(self: Any, msg: Any, context_id: int) -> None:
        time.sleep(0.2)
        started.append(time.time())
        serve(self, msg, context_id)

    monkeypatch.setattr(PromptAssociation, "_serve_request", late)
    h = Harness(tmp_path, direct_store=False)  # the association thread's path
    try:
        out = h.storescu(pydicom_data / "MR_small.dcm")
    finally:
        h.scp.stop()
    assert out.returncode == 0, out.stderr
    (item,) = h.received
    assert started[0] - item.received >= 0.2
