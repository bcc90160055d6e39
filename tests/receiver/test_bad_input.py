"""Bad input against a live Receiver: the right status, one clear log line,
nothing already accepted lost, and the service still up.

The sender is DCMTK's storescu (the scanner-side peer) wherever it can send
the case; a raw socket sends what is not DICOM at all, and pynetdicom's SCU
sends what storescu refuses to (a cut dataset stream, a P-DATA stream
abandoned half-way). Every Receiver listens on 127.0.0.1, port 0, with its
spool in tmp_path.

Decisions these tests pin down (docs/scanner-setup.md says the same):

- an MR image without geometry is accepted and spooled (it is valid DICOM
  the scanner cannot fix), logged "stored but cannot be assembled";
- pixel data whose size disagrees with Rows x Columns x frames is refused
  with 0xC210 before it reaches the spool;
- a volume is keyed by (SeriesInstanceUID, temporal index) and delivered
  once: a series sent again, under the same or new SOP Instance UIDs, adds
  nothing; a scanner restart must carry a new SeriesInstanceUID (they do),
  and is then a new series from volume 0;
- a changed matrix mid-series is refused per instance (the series grid is
  fixed by its first instance); a changed orientation from one volume to the
  next is accepted, each volume with its own vox2ras (prospective motion
  correction moves the slices), but not within one volume.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from copy import deepcopy
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from peers import require_tool
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.service import Receiver
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import Volume, VolumeIncomplete

pytestmark = pytest.mark.timeout(60)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
WAIT_S = 10.0


class Live:
    """A running Receiver, what it emitted, what it logged, and ways to send."""

    def __init__(self, tmp_path: Path, logs: list[dict[str, Any]], **assembly: Any) -> None:
        self.dir = tmp_path
        self.logs = logs
        settings = load_settings(
            overrides=[
                {
                    # In-process ingest, so that its log lines reach the captured
                    # log; tests/receiver/test_ingest_process.py covers the child.
                    "receiver": {
                        "port": 0,
                        "spool_dir": str(tmp_path / "spool"),
                        "ingest": "thread",
                    },
                    "assembly": {"volume_timeout_s": 1.0, **assembly},
                }
            ],
            environ={},
        )
        self.events: list[Volume | VolumeIncomplete] = []
        self._cond = threading.Condition()
        self.receiver = Receiver(settings, self._emit)
        self.receiver.start()
        self._n = 0

    def _emit(self, event: Volume | VolumeIncomplete) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    @property
    def port(self) -> int:
        return self.receiver.port

    # -- what came out -----------------------------------------------------
    def wait_for(self, done: Callable[[list[Volume | VolumeIncomplete]], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: done(self.events), timeout=WAIT_S), self.events

    def settle(self) -> None:
        """Everything acknowledged so far has been through the ingest thread."""
        assert self.receiver.ingest.wait_idle(WAIT_S)

    def volumes(self) -> dict[int, Volume]:
        out: dict[int, Volume] = {}
        for e in self.events:
            if isinstance(e, Volume):
                assert e.index not in out, f"volume {e.index} delivered twice"
                out[e.index] = e
        return out

    def incomplete(self) -> list[VolumeIncomplete]:
        return [e for e in self.events if isinstance(e, VolumeIncomplete)]

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs if entry["event"].startswith(event)]

    def wait_logged(self, event: str) -> dict[str, Any]:
        """The first line starting with ``event``, waiting for it a bounded time."""
        deadline = time.monotonic() + WAIT_S
        while not self.logged(event):
            assert time.monotonic() < deadline, f"never logged: {event}"
            time.sleep(0.01)
        return self.logged(event)[0]

    def spooled(self, ds: Dataset) -> Path:
        return self.receiver.spool.path_for(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )

    # -- senders -----------------------------------------------------------
    def write(self, datasets: list[Dataset]) -> list[Path]:
        paths = []
        for ds in datasets:
            self._n += 1
            path = self.dir / f"in{self._n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    def storescu(self, datasets: list[Dataset]) -> list[str]:
        """Send in the given order on one association; the store responses."""
        out = subprocess.run(
            [
                require_tool("storescu"),
                "-v",
                "--no-halt",
                "-aet",
                "SCANNER",
                "-aec",
                "BOLDSTREAM",
                "127.0.0.1",
                str(self.port),
                *map(str, self.write(datasets)),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        text = out.stdout + out.stderr
        responses = [
            line.split("Received Store Response (", 1)[1].rstrip(")")
            for line in text.splitlines()
            if "Received Store Response (" in line
        ]
        assert len(responses) == len(datasets), text
        return responses

    def echo(self) -> None:
        out = subprocess.run(
            [require_tool("echoscu"), "-aec", "BOLDSTREAM", "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def stop(self) -> None:
        self.receiver.stop()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with capture_logs() as logs:
        receiver = Live(tmp_path, logs)
        try:
            yield receiver
        finally:
            receiver.stop()


def flat(volumes: list[list[Dataset]]) -> list[Dataset]:
    return [ds for volume in volumes for ds in volume]


def series(builders: ModuleType, n_volumes: int, n_slices: int = 4, **kw: Any) -> Any:
    """A GE-style per-slice series whose header states the slice count."""
    return builders.build_series(n_volumes, n_slices, images_in_acquisition=n_slices, **kw)


def assert_volume(volume: Volume, stored: np.ndarray) -> None:
    """The volume holds the stored slices in position order, transposed."""
    assert volume.data.shape == (stored.shape[2], stored.shape[1], stored.shape[0])
    np.testing.assert_array_equal(volume.data, stored.transpose(2, 1, 0).astype(np.float32))


# -- not DICOM at all ---------------------------------------------------------


def test_garbage_bytes_are_dropped_and_the_service_still_answers(
    live: Live, builders: ModuleType
) -> None:
    volumes, arrays = series(builders, 1)
    assert live.storescu(flat(volumes)) == ["Success"] * 4
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: boldstream\r\n\r\n" + bytes(range(256)))
        assert sock.recv(4096) == b""  # closed at once, no A-ABORT dance
    (line,) = live.logged("connection dropped: not a DICOM association request")
    assert line["peer"].startswith("127.0.0.1:")
    assert "0x47" in line["reason"]  # 'G'
    live.echo()
    live.wait_for(lambda events: len(events) == 1)
    assert_volume(live.volumes()[0], arrays[0])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "PDU type 0x16"),  # a TLS hello
        (b"\x01\x00\x00", "connection closed after 3 bytes"),
        (b"\x01\x00\x00\x00\x00\x10\x00\x01", "16 bytes is shorter than its fixed part"),
        (b"\x01\x00\x00\x00\x01\x00\x00\x00", "without protocol version 1"),
    ],
)
def test_other_first_bytes_are_dropped_with_the_reason(
    live: Live, payload: bytes, reason: str
) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(payload)
        try:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(4096) == b""  # closed, no answer
        except OSError as exc:
            # The receiver may drop us before we finish: closing a socket with
            # unread bytes (here, those past the eight it peeked) sends a reset.
            assert exc.errno in (errno.ECONNRESET, errno.ENOTCONN), exc
    line = live.wait_logged("connection dropped: not a DICOM association request")
    assert len(live.logged("connection dropped: not a DICOM association request")) == 1
    assert reason in line["reason"]
    live.echo()


def test_connect_and_close_is_one_quiet_line(live: Live) -> None:
    socket.create_connection(("127.0.0.1", live.port), timeout=5).close()
    line = live.wait_logged("connection closed by the peer before an association request")
    assert line["log_level"] == "info"
    live.echo()


def test_garbage_after_an_association_request_header_gets_an_abort(live: Live) -> None:
    # Eight bytes that pass for an A-ASSOCIATE-RQ header, then noise:
    # pynetdicom decodes the PDU, fails and answers A-ABORT (PDU type 0x07).
    noise = bytes(random.Random(7).randrange(256) for _ in range(200))
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(b"\x01\x00" + len(noise + b"\x00\x01").to_bytes(4, "big") + b"\x00\x01")
        sock.sendall(noise)
        reply = sock.recv(4096)
    assert reply[:1] in (b"\x07", b"\x03"), reply  # A-ABORT or A-ASSOCIATE-RJ
    live.echo()


def test_a_silent_connection_does_not_block_others(live: Live) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=5):
        live.echo()  # served while the silent peer still holds its connection


# -- cut or inconsistent instances ----------------------------------------------


def _send_file_raw(port: int, path: Path) -> int:
    """pynetdicom SCU sending a file's dataset bytes as they are (storescu
    parses files first and will not send a cut one); the response status."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="BOLDSTREAM")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("where", ["in the pixel data", "inside an element header"])
def test_truncated_instance_is_refused_and_earlier_ones_kept(
    live: Live, builders: ModuleType, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    volumes, arrays = series(builders, 2)
    assert live.storescu(volumes[0]) == ["Success"] * 4
    cut = volumes[1][0]
    (path,) = live.write([cut])
    data = path.read_bytes()
    pixel_tag = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) little endian
    path.write_bytes(data[:-100] if where == "in the pixel data" else data[: pixel_tag + 3])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as-is
    assert _send_file_raw(live.port, path) == 0xC210
    (line,) = live.logged("instance refused")
    assert line["status"] == "0xC210" and line["sop"] == cut.SOPInstanceUID
    assert "truncated" in line["reason"]
    assert not live.spooled(cut).exists()
    assert live.spooled(volumes[0][0]).exists()
    live.echo()
    live.wait_for(lambda events: len(events) == 1)
    assert_volume(live.volumes()[0], arrays[0])


@pytest.mark.parametrize(("rows", "word"), [(13, "truncated"), (11, "disagree")])
def test_pixel_data_that_does_not_match_its_size_is_refused(
    live: Live, builders: ModuleType, rows: int, word: str
) -> None:
    volumes, arrays = series(builders, 1)
    bad = flat(series(builders, 1, seed=1)[0])[0]
    bad.Rows = rows  # the pixels are 12 rows
    assert live.storescu([bad, *volumes[0]]) == ["Error: CannotUnderstand"] + ["Success"] * 4
    (line,) = live.logged("instance refused")
    assert word in line["reason"] and line["status"] == "0xC210"
    assert not live.spooled(bad).exists()
    live.wait_for(lambda events: len(events) == 1)
    assert_volume(live.volumes()[0], arrays[0])


def test_other_sop_class_is_spooled_not_processed(live: Live, pydicom_data: Path) -> None:
    ct = pydicom.dcmread(pydicom_data / "CT_small.dcm")
    assert live.storescu([ct]) == ["Success"]
    live.settle()
    assert live.spooled(ct).exists()
    (line,) = live.logged("new series: spooled only, not analysed")
    assert "SOP class 1.2.840.10008.5.1.4.1.1.2 is stored but not processed" in line["reason"]
    assert live.events == []


def test_an_sbref_series_is_assembled_as_a_motion_reference(
    live: Live, builders: ModuleType
) -> None:
    sbref, sbref_arrays = series(builders, 1, seed=3)
    bold, _ = series(builders, 1, seed=4)
    for ds in flat(sbref):
        ds.SeriesDescription = "rest_SBRef"
    for ds in flat(bold):
        ds.SeriesDescription = "rest"
    moco, _ = series(builders, 1, seed=5)
    for ds in flat(moco):
        ds.SeriesDescription = "MoCoSeries"
    assert live.storescu([*flat(sbref), *flat(bold), *flat(moco)]) == ["Success"] * 12
    live.wait_for(lambda events: len(events) == 2)
    live.settle()
    got = [e for e in live.events if isinstance(e, Volume)]
    first, second = sorted(got, key=lambda v: v.series.description != "rest_SBRef")
    assert first.series.reference and not second.series.reference
    assert_volume(first, sbref_arrays[0])
    (line,) = live.logged("new series: a motion reference (SBRef), not analysed")
    assert line["description"] == "rest_SBRef"
    assert len(live.logged("new series: spooled only, not analysed")) == 1  # the MoCo series


def test_mr_image_without_geometry_is_spooled_and_reported(
    live: Live, builders: ModuleType
) -> None:
    volumes, arrays = series(builders, 2)
    bare = flat(series(builders, 1, seed=2)[0])[0]
    del bare.ImageOrientationPatient, bare.ImagePositionPatient
    assert live.storescu([*volumes[0], bare, *volumes[1]]) == ["Success"] * 9
    live.wait_for(lambda events: len(events) == 2)
    assert live.spooled(bare).exists()
    (line,) = live.logged("instance stored but cannot be assembled")
    assert "ImageOrientationPatient" in line["reason"]
    for t in (0, 1):
        assert_volume(live.volumes()[t], arrays[t])


# -- arrival order, repeats, gaps -----------------------------------------------


def test_duplicate_instances_and_slices_are_used_once(live: Live, builders: ModuleType) -> None:
    volumes, arrays = series(builders, 2)
    resent = volumes[0][2]
    # Same slice, new SOP Instance UID (the console re-exported it).
    copy = deepcopy(resent)
    copy.SOPInstanceUID = generate_uid()
    copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    copy.PixelData = bytes(len(copy.PixelData))
    sent = [*volumes[0][:3], resent, copy, volumes[0][3], *volumes[1]]
    assert live.storescu(sent) == ["Success"] * len(sent)
    live.wait_for(lambda events: len(events) == 2)
    assert live.receiver.scp.stats.snapshot()["duplicates"] == 1
    assert len(live.logged("duplicate instance ignored")) == 1
    assert len(live.logged("duplicate slice ignored")) == 1
    for t in (0, 1):
        assert_volume(live.volumes()[t], arrays[t])  # the first copy of the slice won


def test_slices_out_of_order_assemble_by_position(live: Live, builders: ModuleType) -> None:
    volumes, arrays = series(builders, 3, n_slices=5)
    shuffled = flat(volumes)
    random.Random(3).shuffle(shuffled)
    assert live.storescu(shuffled) == ["Success"] * 15
    live.wait_for(lambda events: len(events) == 3)
    got = live.volumes()
    for t in range(3):
        assert_volume(got[t], arrays[t])
        np.testing.assert_allclose(got[t].vox2ras, got[0].vox2ras)


def test_volume_that_never_completes_is_reported_and_the_next_delivered(
    live: Live, builders: ModuleType
) -> None:
    volumes, arrays = series(builders, 3)
    del volumes[1][2]
    assert live.storescu(flat(volumes)) == ["Success"] * 11
    live.wait_for(lambda events: len(events) == 3)
    assert sorted(live.volumes()) == [0, 2]
    (gap,) = live.incomplete()
    assert (gap.index, gap.slices_received, gap.slices_expected) == (1, 3, 4)
    assert gap.reason == "timeout: slices missing"
    assert live.events.index(gap) == 2, "volume 2 must not wait for volume 1"
    assert len(live.logged("volume incomplete: will not be waited for")) == 1
    assert_volume(live.volumes()[2], arrays[2])


def test_whole_series_resent_is_stored_once(live: Live, builders: ModuleType) -> None:
    volumes, _ = series(builders, 2)
    assert live.storescu(flat(volumes)) == ["Success"] * 8
    live.wait_for(lambda events: len(events) == 2)
    assert live.storescu(flat(volumes)) == ["Success"] * 8
    live.settle()
    assert len(live.events) == 2
    stats = live.receiver.scp.stats.snapshot()
    assert (stats["accepted"], stats["duplicates"]) == (8, 8)
    assert len(live.logged("duplicate instance ignored")) == 8


def test_association_aborted_mid_transfer_keeps_what_was_acknowledged(
    live: Live, builders: ModuleType
) -> None:
    volumes, arrays = series(builders, 2)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", live.port, ae_title="BOLDSTREAM", max_pdu=1024)
    assert assoc.is_established
    for ds in volumes[0]:
        assert assoc.send_c_store(ds).Status == 0x0000
    # Half of the next C-STORE's P-DATA fragments, then A-ABORT.
    half = volumes[1][0]
    request = C_STORE()
    request.MessageID = 99
    request.AffectedSOPClassUID = MR_IMAGE
    request.AffectedSOPInstanceUID = half.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(_encode(half))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    fragments = list(message.encode_msg(context_id, 256))
    assert len(fragments) > 2
    for pdata in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(pdata)
    assoc.abort()
    live.echo()
    live.wait_for(lambda events: len(events) == 1)
    assert_volume(live.volumes()[0], arrays[0])
    assert all(live.spooled(ds).exists() for ds in volumes[0])
    assert not live.spooled(half).exists()
    assert list((live.receiver.spool.root / ".incoming").iterdir()) == []
    assert len(live.logged("association aborted")) == 1


def test_instances_acknowledged_before_a_crash_are_assembled_after_restart(
    tmp_path: Path, builders: ModuleType
) -> None:
    volumes, arrays = series(builders, 2)
    # First life: the SCP answers success, then the process dies before the
    # ingest thread saw anything (deliver drops every instance on the floor).
    settings = load_settings(
        overrides=[{"receiver": {"port": 0, "spool_dir": str(tmp_path / "spool")}}], environ={}
    )
    scp = StorageSCP(settings.receiver, Spool(settings.receiver.spool_dir), lambda _: None)
    scp.start()
    try:
        paths = []
        for k, ds in enumerate(flat(volumes)):
            paths.append(tmp_path / f"first{k}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        out = subprocess.run(
            [require_tool("storescu"), "-aec", "BOLDSTREAM", "127.0.0.1", str(scp.port), *paths],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
    finally:
        scp.stop()
    # Second life on the same spool: recovery delivers both volumes.
    with capture_logs() as logs:
        live = Live(tmp_path, logs)
        try:
            live.wait_for(lambda events: len(events) == 2)
            for t in (0, 1):
                assert_volume(live.volumes()[t], arrays[t])
            assert live.logged("recovering spooled instances")[0]["instances"] == 8
        finally:
            live.stop()


# -- the scanner changes its mind -------------------------------------------------


def test_restart_with_a_new_series_uid_is_a_new_series(live: Live, builders: ModuleType) -> None:
    first, _ = series(builders, 3)
    again, again_arrays = series(builders, 2, seed=5)
    # The first run stops half-way through volume 2; the console restarts.
    assert live.storescu([*flat(first[:2]), *first[2][:2], *flat(again)]) == ["Success"] * 18
    live.wait_for(lambda events: len(events) == 5)
    by_series: dict[str, dict[int, Volume]] = {}
    for e in live.events:
        if isinstance(e, Volume):
            by_series.setdefault(e.series.series_uid, {})[e.index] = e
    assert sorted(by_series[first[0][0].SeriesInstanceUID]) == [0, 1]
    assert sorted(by_series[again[0][0].SeriesInstanceUID]) == [0, 1]
    for t in (0, 1):
        assert_volume(by_series[again[0][0].SeriesInstanceUID][t], again_arrays[t])
    (gap,) = live.incomplete()
    assert (gap.series.series_uid, gap.index) == (first[0][0].SeriesInstanceUID, 2)


def test_same_series_starting_over_is_not_delivered_twice(live: Live, builders: ModuleType) -> None:
    volumes, arrays = series(builders, 2)
    uid = volumes[0][0].SeriesInstanceUID
    assert live.storescu(flat(volumes)) == ["Success"] * 8
    live.wait_for(lambda events: len(events) == 2)
    # Volume numbers start over under the same SeriesInstanceUID, new SOP UIDs.
    rerun, _ = series(builders, 2, seed=9, series_uid=uid)
    assert live.storescu(flat(rerun)) == ["Success"] * 8  # spooled: nothing is lost
    live.settle()
    assert len(live.events) == 2
    assert all(live.spooled(ds).exists() for ds in flat(rerun))
    assert live.logged("late slice ignored")
    for t in (0, 1):
        assert_volume(live.volumes()[t], arrays[t])


def test_matrix_change_mid_series_is_refused_per_instance(live: Live, builders: ModuleType) -> None:
    volumes, arrays = series(builders, 4)
    wider, _ = series(builders, 3, cols=14, series_uid=volumes[0][0].SeriesInstanceUID)
    sent = [*flat(volumes[:2]), *wider[2], *volumes[3]]
    assert live.storescu(sent) == ["Success"] * 16
    live.wait_for(lambda events: len(events) == 3)
    live.settle()
    assert sorted(live.volumes()) == [0, 1, 3]
    refused = live.logged("instance stored but cannot be assembled")
    assert len(refused) == 4
    assert all("image matrix changed from 12x10 to 12x14" in r["reason"] for r in refused)
    assert all(live.spooled(ds).exists() for ds in wider[2])
    assert_volume(live.volumes()[3], arrays[3])


def test_orientation_change_between_volumes_gives_each_its_own_affine(
    live: Live, builders: ModuleType
) -> None:
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    volumes, _ = series(builders, 2)
    uid = volumes[0][0].SeriesInstanceUID
    tilted, tilted_arrays = series(builders, 4, iop=(1, 0, 0, 0, c, s), seed=4, series_uid=uid)
    # Volumes 2 and 3 come tilted; one slice of volume 3 carries the old one.
    odd = series(builders, 4, seed=6, series_uid=uid)[0][3][3]
    sent = [*flat(volumes), *tilted[2], *tilted[3][:3], odd]
    assert live.storescu(sent) == ["Success"] * 16
    live.wait_for(lambda events: len(events) == 4)
    got = live.volumes()
    assert sorted(got) == [0, 1, 2]
    assert_volume(got[2], tilted_arrays[2])
    # The column axis (RAS) follows the tilted IOP column direction (LPS).
    np.testing.assert_allclose(got[2].vox2ras[:3, 1] / 3.0, [0.0, -c, s], atol=1e-6)
    np.testing.assert_allclose(got[0].vox2ras[:3, 1] / 3.0, [0.0, -1.0, 0.0], atol=1e-6)
    (refused,) = live.logged("instance stored but cannot be assembled")
    assert "slice orientation differs" in refused["reason"]
    (gap,) = live.incomplete()
    assert (gap.index, gap.slices_received, gap.slices_expected) == (3, 3, 4)


def _encode(ds: Dataset) -> bytes:
    """The dataset's bytes as a C-STORE carries them (no file meta)."""
    data = encode(ds, False, True)
    assert data is not None
    return data
