"""Plain C-STOREs answered on pynetdicom's network thread (receiver/direct.py).

The peer is DCMTK's storescu where a scanner would be, and otherwise a
pynetdicom requestor that writes hand-made P-DATA-TF PDUs on its socket (the
cases no well-behaved scanner sends: a message ending inside a PDU, a command
split over two PDVs, a command inside a data set) and reads the responses
through its own DIMSE provider. Each test counts which path answered: the
network thread's (``DirectDUL._answer``) or pynetdicom's association thread
(``PromptAssociation._serve_request``).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import MRImageStorage, Verification
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.receiver.association import PromptAssociation
from boldstream.receiver.direct import DirectDUL, _pdvs
from boldstream.receiver.scp import Received, StorageSCP
from boldstream.receiver.spool import Spool

pytestmark = pytest.mark.timeout(60)

EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Paths:
    """How many C-STOREs each path answered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.direct = 0
        self.pynetdicom = 0
        answer, serve = DirectDUL._answer, PromptAssociation._serve_request

        def counted_answer(dul: Any, store: Any) -> None:
            self.direct += 1
            answer(dul, store)

        def counted_serve(assoc: Any, msg: Any, context_id: int) -> None:
            if isinstance(msg, C_STORE):
                self.pynetdicom += 1
            serve(assoc, msg, context_id)

        monkeypatch.setattr(DirectDUL, "_answer", counted_answer)
        monkeypatch.setattr(PromptAssociation, "_serve_request", counted_serve)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return Paths(monkeypatch)


class Server:
    def __init__(self, tmp_path: Path, **receiver: object) -> None:
        settings = load_settings(
            overrides=[{"receiver": {"port": 0, "spool_dir": str(tmp_path / "spool"), **receiver}}],
            environ={},
        )
        self.handed: list[Received] = []
        self.spool = Spool(settings.receiver.spool_dir)
        self.scp = StorageSCP(settings.receiver, self.spool, self.deliver)
        self.fail_next = False
        self.delay_s = 0.0
        self.scp.start()

    def storescu(self, *files: Path) -> subprocess.CompletedProcess[str]:
        cmd = [require_tool("storescu"), "-aet", "SCANNER", "-aec", "BOLDSTREAM"]
        cmd += ["127.0.0.1", str(self.scp.port), *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def deliver(self, item: Received) -> None:
        time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the ingest is gone")
        self.handed.append(item)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.scp.stop()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.scp.stop()


def _associate(port: int) -> Any:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage, EXPLICIT_LE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="BOLDSTREAM")
    assert assoc.is_established
    return assoc


@contextlib.contextmanager
def _by_hand(assoc: Any) -> Iterator[None]:
    """Park the requestor's reactor, as its send_* methods do, so the test reads
    the responses itself instead of the reactor taking them as unexpected."""
    assoc._reactor_checkpoint.clear()
    _wait(lambda: assoc._is_paused)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _mr(pydicom_data: Path, sop_instance: str) -> Any:
    ds = dcmread(pydicom_data / "MR_small.dcm")
    ds.SOPInstanceUID = sop_instance
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    return ds


def _data_set(ds: Any) -> bytes:
    """The data set alone, Explicit VR Little Endian, as a peer sends it."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _context_id(assoc: Any, sop_class: str) -> int:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class:
            return int(cx.context_id)
    raise AssertionError(sop_class)


def _store_items(ds: Any, context_id: int, message_id: int, max_pdu: int = 0) -> list[Any]:
    """The PDV items (context ID, control + fragment) of one C-STORE-RQ."""
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = ds.SOPClassUID
    rq.AffectedSOPInstanceUID = ds.SOPInstanceUID
    rq.Priority = 2
    rq.DataSet = BytesIO(_data_set(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    items: list[Any] = []
    for pdata in message.encode_msg(context_id, max_pdu):
        items += pdata.presentation_data_value_list
    return items


def _send_pdu(assoc: Any, items: list[Any]) -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, bytes(pdv)] for cx, pdv in items]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    assoc.dul.socket.send(pdu.encode())


def _responses(assoc: Any, n: int) -> list[tuple[int, int]]:
    """(Message ID Being Responded To, Status) of the next n responses."""
    out = []
    for _ in range(n):
        _, rsp = assoc.dimse.get_msg(block=True)
        assert rsp is not None, "no response within the DIMSE timeout"
        out.append((rsp.MessageIDBeingRespondedTo, rsp.Status))
    return out


def _wait(condition: Any, timeout: float = 5.0, what: str = "") -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.005)


def test_storescu_is_answered_on_the_network_thread(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    before = time.time()
    out = server.storescu(pydicom_data / "MR_small.dcm", pydicom_data / "MR_small.dcm")
    assert out.returncode == 0, out.stderr
    assert (paths.direct, paths.pynetdicom) == (2, 0)
    (item,) = server.handed  # the resend was a duplicate: stored once
    assert item.durable.wait(0) and item.path.exists()
    assert before < item.received <= time.time()
    assert server.scp.stats.snapshot()["duplicates"] == 1


def test_off_sends_every_store_through_pynetdicom(
    tmp_path: Path, pydicom_data: Path, paths: Paths
) -> None:
    s = Server(tmp_path, direct_store=False)
    try:
        out = s.storescu(pydicom_data / "MR_small.dcm")
    finally:
        s.scp.stop()
    assert out.returncode == 0, out.stderr
    assert (paths.direct, paths.pynetdicom) == (0, 1)
    assert len(s.handed) == 1


def test_echo_between_stores_goes_to_pynetdicom(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    assoc = _associate(server.scp.port)
    try:
        assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.1")).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.2")).Status == 0x0000
    finally:
        assoc.release()
    assert (paths.direct, paths.pynetdicom) == (2, 0)
    assert [r.sop_instance_uid for r in server.handed] == ["1.2.3.1", "1.2.3.2"]


def test_the_response_is_the_one_pynetdicom_sends(tmp_path: Path, pydicom_data: Path) -> None:
    """Byte for byte, the same P-DATA-TF PDU comes back on either path."""
    seen: dict[bool, list[bytes]] = {}
    for direct in (True, False):
        s = Server(tmp_path / str(direct), direct_store=direct)
        try:
            assoc = _associate(s.scp.port)
            got: list[bytes] = []
            original = assoc.dul._decode_pdu

            def spy(data: bytearray, got: list[bytes] = got, original: Any = original) -> Any:
                got.append(bytes(data))
                return original(data)

            assoc.dul._decode_pdu = spy
            try:
                ds = _mr(pydicom_data, "1.2.3.7")
                assert assoc.send_c_store(ds).Status == 0x0000
                assert assoc.send_c_store(ds).Status == 0x0000  # the duplicate's answer
            finally:
                assoc.release()
            seen[direct] = [b for b in got if b[:1] == b"\x04"]
        finally:
            s.scp.stop()
    assert len(seen[True]) == 2
    assert seen[True] == seen[False]


def test_small_pdus_and_a_pdu_holding_the_end_of_one_message_and_the_next(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    assoc = _associate(server.scp.port)
    try:
        cx = _context_id(assoc, MRImageStorage)
        first = _store_items(_mr(pydicom_data, "1.2.3.11"), cx, 11, max_pdu=1024)
        second = _store_items(_mr(pydicom_data, "1.2.3.12"), cx, 12, max_pdu=1024)
        assert len(first) > 5
        with _by_hand(assoc):
            for item in first[:-1]:
                _send_pdu(assoc, [item])
            _send_pdu(assoc, [first[-1], *second[:3]])  # one message ends, the next starts
            for item in second[3:]:
                _send_pdu(assoc, [item])
            assert _responses(assoc, 2) == [(11, 0x0000), (12, 0x0000)]
    finally:
        assoc.release()
    assert (paths.direct, paths.pynetdicom) == (2, 0)
    ds = dcmread(server.handed[1].path)
    assert ds.SOPInstanceUID == "1.2.3.12"
    assert ds.PixelData == _mr(pydicom_data, "1.2.3.12").PixelData


def test_a_pdu_of_many_small_messages_is_answered_message_by_message(
    server: Server, paths: Paths
) -> None:
    """1,500 whole C-STOREs in one PDU (each refused: no Pixel Data) are walked
    in a loop, not one call deeper per message."""
    assoc = _associate(server.scp.port)
    try:
        cx = _context_id(assoc, MRImageStorage)
        items: list[Any] = []
        for n in range(1500):
            ds = Dataset()
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = f"1.2.3.100.{n}"
            items += _store_items(ds, cx, n % 65536)
        with _by_hand(assoc):
            _send_pdu(assoc, items)
            answers = _responses(assoc, 1500)
        assert answers == [(n, 0xC210) for n in range(1500)]
    finally:
        _gone(assoc)
    assert paths.direct == 1500


def test_an_echo_starting_inside_a_stores_last_pdu_goes_to_pynetdicom(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    assoc = _associate(server.scp.port)
    try:
        store = _store_items(_mr(pydicom_data, "1.2.3.15"), _context_id(assoc, MRImageStorage), 15)
        echo = C_ECHO()
        echo.MessageID = 16
        echo.AffectedSOPClassUID = Verification
        message = C_ECHO_RQ()
        message.primitive_to_message(echo)
        (pdata,) = message.encode_msg(_context_id(assoc, Verification), 0)
        with _by_hand(assoc):
            _send_pdu(assoc, [*store, *pdata.presentation_data_value_list])
            assert _responses(assoc, 2) == [(15, 0x0000), (16, 0x0000)]
    finally:
        assoc.release()
    assert (paths.direct, paths.pynetdicom) == (1, 0)
    assert [r.sop_instance_uid for r in server.handed] == ["1.2.3.15"]


def test_a_command_in_two_fragments_goes_to_pynetdicom(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    assoc = _associate(server.scp.port)
    try:
        cx = _context_id(assoc, MRImageStorage)
        items = _store_items(_mr(pydicom_data, "1.2.3.21"), cx, 21)
        (context_id, command) = items[0]
        assert command[:1] == b"\x03"
        half = 1 + (len(command) - 1) // 2
        with _by_hand(assoc):
            _send_pdu(assoc, [(context_id, b"\x01" + command[1:half])])
            _send_pdu(assoc, [(context_id, b"\x03" + command[half:]), *items[1:]])
            assert _responses(assoc, 1) == [(21, 0x0000)]
        # ...and the next plain one is answered on the network thread again.
        assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.22")).Status == 0x0000
    finally:
        assoc.release()
    assert (paths.direct, paths.pynetdicom) == (1, 1)
    assert [r.sop_instance_uid for r in server.handed] == ["1.2.3.21", "1.2.3.22"]


@pytest.mark.parametrize("intruder", ["command", "other context"])
def test_a_foreign_fragment_inside_a_data_set_aborts(
    server: Server, pydicom_data: Path, paths: Paths, intruder: str
) -> None:
    assoc = _associate(server.scp.port)
    cx = _context_id(assoc, MRImageStorage)
    echo_cx = _context_id(assoc, Verification)
    items = _store_items(_mr(pydicom_data, "1.2.3.31"), cx, 31, max_pdu=1024)
    bad = (cx, b"\x03" + items[0][1][1:]) if intruder == "command" else (echo_cx, items[2][1])
    with capture_logs() as logs:
        _send_pdu(assoc, items[:2])
        _send_pdu(assoc, [bad])
        _wait(lambda: assoc.is_aborted)
    assert any(e["event"].startswith("association aborted: a fragment") for e in logs)
    assert server.handed == []
    assert (paths.direct, paths.pynetdicom) == (0, 0)
    assert not list(server.scp.spool.root.rglob("*.dcm"))


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_command_set_pynetdicom_cannot_read_aborts_the_association(
    server: Server, paths: Paths
) -> None:
    """A whole command set without Command Field: pynetdicom's decoding raises on
    its network thread; the receiver aborts the association instead of losing
    that thread without a word to the peer."""
    assoc = _associate(server.scp.port)
    uid = b"1.2.840.10008.1.1\x00"
    command = struct.pack("<HHI", 0, 0x0002, len(uid)) + uid  # Affected SOP Class UID only
    with capture_logs() as logs:
        with _by_hand(assoc):
            _send_pdu(assoc, [(_context_id(assoc, Verification), b"\x03" + command)])
        _wait(lambda: assoc.is_aborted, what="the receiver's A-ABORT")
    assert any(e["event"].startswith("association aborted: a DIMSE message") for e in logs)
    _wait(lambda: not server.scp._server.active_associations)
    assert paths.direct == 0


def test_a_failing_handler_answers_0xc211_and_the_association_goes_on(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    assoc = _associate(server.scp.port)
    try:
        server.fail_next = True
        with capture_logs() as logs:
            assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.41")).Status == 0xC211
        (failed,) = [e for e in logs if e["event"].startswith("C-STORE handler failed")]
        assert failed["log_level"] == "error" and failed["sop"] == "1.2.3.41"
        assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.42")).Status == 0x0000
    finally:
        assoc.release()
    assert paths.direct == 2
    assert [r.sop_instance_uid for r in server.handed] == ["1.2.3.42"]


def test_a_handler_slower_than_the_network_timeout_is_not_cut_off(
    tmp_path: Path, pydicom_data: Path, paths: Paths
) -> None:
    """The association thread watches the idle timer while the handler runs here."""
    s = Server(tmp_path, network_timeout_s=0.5)
    try:
        assoc = _associate(s.scp.port)
        try:
            s.delay_s = 1.5
            assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.45")).Status == 0x0000
            s.delay_s = 0.0
            assert assoc.is_established
            assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.46")).Status == 0x0000
        finally:
            assoc.release()
    finally:
        s.scp.stop()
    assert paths.direct == 2
    assert [r.sop_instance_uid for r in s.handed] == ["1.2.3.45", "1.2.3.46"]


def test_a_store_on_a_context_never_accepted_goes_to_pynetdicom(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    """pynetdicom aborts such an association; the short way leaves that to it."""
    assoc = _associate(server.scp.port)
    items = _store_items(_mr(pydicom_data, "1.2.3.51"), 99, 51)
    _send_pdu(assoc, items)
    _wait(lambda: assoc.is_aborted)
    assert server.handed == []
    assert paths.direct == 0


def test_pynetdicom_tracing_turns_the_short_way_off(
    server: Server, pydicom_data: Path, paths: Paths
) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(logging.DEBUG)  # its tracing handlers are bound
    try:
        assoc = _associate(server.scp.port)
        try:
            assert assoc.send_c_store(_mr(pydicom_data, "1.2.3.61")).Status == 0x0000
        finally:
            assoc.release()
    finally:
        logger.setLevel(before)
    assert (paths.direct, paths.pynetdicom) == (0, 1)


def test_release_and_abort_after_stores(server: Server, pydicom_data: Path, paths: Paths) -> None:
    """The network thread, waiting for a next PDU after a store, still sees both."""
    for end in ("release", "abort"):
        assoc = _associate(server.scp.port)
        assert assoc.send_c_store(_mr(pydicom_data, f"1.2.3.7{len(end)}")).Status == 0
        start = time.monotonic()
        if end == "release":
            assoc.release()
            assert assoc.is_released
        else:
            assoc.abort()
        _wait(lambda: not server.scp._server.active_associations)
        assert time.monotonic() - start < 1.0
    assert paths.direct == 2


# ---- fuzzing ------------------------------------------------------------------


@given(st.binary(max_size=64))
def test_pdv_items_tile_the_body_or_are_refused(body: bytes) -> None:
    items = _pdvs(body)
    if items is None:
        return
    rebuilt = b"".join(
        struct.pack(">LBB", len(fragment) + 2, context_id, control) + bytes(fragment)
        for context_id, control, fragment in items
    )
    assert rebuilt == body


_ITEM = st.tuples(
    st.sampled_from([1, 3, 99]),  # accepted contexts (MR, Verification) and one never offered
    st.sampled_from([0, 1, 2, 3, 0xFF]),  # control header: data/command x more/last, nonsense
    st.one_of(st.binary(max_size=40), st.just(b"")),
)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pdus=st.lists(st.lists(_ITEM, min_size=1, max_size=4), min_size=1, max_size=3), data=st.data()
)
def test_garbage_p_data_never_breaks_the_receiver(
    fuzz_server: Server, pydicom_data: Path, pdus: list[list[Any]], data: Any
) -> None:
    """Any P-DATA-TF PDUs: the association is answered, aborted or left waiting,
    no receiver thread dies, nothing is stored, and the next scanner is served
    as before."""
    assoc = _associate(fuzz_server.scp.port)
    try:
        cx = _context_id(assoc, MRImageStorage)
        if data.draw(st.booleans()):  # sometimes start with a real command, then garbage
            (command,) = _store_items(_mr(pydicom_data, "1.2.3.90"), cx, 90)[:1]
            pdus = [[(command[0], command[1][0], command[1][1:])], *pdus]
        with _by_hand(assoc):
            for items in pdus:
                _send_pdu(assoc, [(c, bytes([ctl]) + payload) for c, ctl, payload in items])
            time.sleep(0.02)
    finally:
        _gone(assoc)
    _wait(lambda: not fuzz_server.scp._server.active_associations, what="garbage association")
    assert fuzz_server.handed == []
    good = _associate(fuzz_server.scp.port)
    try:
        assert good.send_c_store(_mr(pydicom_data, "1.2.3.91")).Status == 0x0000
    finally:
        _gone(good)
    _wait(lambda: not fuzz_server.scp._server.active_associations, what="good association")
    fuzz_server.handed.clear()
    for path in fuzz_server.spool.root.rglob("*.dcm"):
        path.unlink()  # so the next example's good instance is new again


def _gone(assoc: Any) -> None:
    """End a requestor whatever state it is in: abort, and close its socket."""
    if assoc.is_established:
        assoc.abort()
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if raw is not None and raw.fileno() != -1:
        raw.close()
