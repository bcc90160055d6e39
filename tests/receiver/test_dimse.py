"""C-STORE messages read and written with struct agree with pynetdicom, or go to it.

:class:`LeanDIMSEServiceProvider` and pynetdicom's own provider are each
given the same response primitive, or the same P-DATA primitives of a
request (as pynetdicom's requestor encodes them), on a stand-in association
that records what would go to the network thread and what is queued for the
association: P-DATA for P-DATA, primitive for primitive. Over a real
association, every storescu test in tests/receiver runs the struct path
against DCMTK, and ``test_scp.py`` checks that pynetdicom's own coding of
DCMTK's C-STORE messages never runs.
"""

from __future__ import annotations

import queue
import struct
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from boldstream.receiver.dimse import (
    LeanDIMSEServiceProvider,
    encode_store_response,
    read_store_request,
)

MR = "1.2.840.10008.5.1.4.1.1.4"


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[list[tuple[int, bytes]]] = []
        self.event_queue: queue.Queue[str] = queue.Queue()

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(list(primitive.presentation_data_value_list))


def _assoc(max_pdu: int, handlers: list[Any] | None = None, event: Any = evt.EVT_DIMSE_SENT) -> Any:
    return SimpleNamespace(
        is_requestor=False,
        requestor=SimpleNamespace(maximum_length=max_pdu, ae_title="SCANNER"),
        dul=_Recorder(),
        get_handlers=lambda e: list(handlers or []) if e == event else [],
        _accepted_cx={3: SimpleNamespace(transfer_syntax=["1.2.840.10008.1.2"])},
    )


def _response(
    *,
    message_id: int = 7,
    status: int = 0x0000,
    sop_instance: str | None = "1.2.3.4.5",
    sop_class: str | None = MR,
    comment: str | None = None,
) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def _sent(provider_class: type[DIMSEServiceProvider], primitive: Any, max_pdu: int) -> Any:
    assoc = _assoc(max_pdu)
    provider_class(assoc).send_msg(primitive, 5)
    return assoc.dul.sent


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xB007, 0x0107])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4.5", "1.2.3.4.56", None])
@pytest.mark.parametrize("sop_class", [MR, "1.2.840.10008.5.1.4.1.1.4.1", None])
@pytest.mark.parametrize("message_id", [1, 65535])
def test_plain_responses_are_pynetdicoms_bytes(
    status: int, sop_instance: str | None, sop_class: str | None, message_id: int
) -> None:
    rsp = _response(
        message_id=message_id, status=status, sop_instance=sop_instance, sop_class=sop_class
    )
    ours = _sent(LeanDIMSEServiceProvider, rsp, 16384)
    theirs = _sent(DIMSEServiceProvider, rsp, 16384)
    assert ours == theirs
    assert len(ours) == 1 and ours[0][0][1][0] == 0x03  # one PDV: last command fragment


def test_a_64_character_uid_and_an_unlimited_pdu() -> None:
    uid = "1." + "2" * 62
    rsp = _response(sop_instance=uid)
    assert _sent(LeanDIMSEServiceProvider, rsp, 0) == _sent(DIMSEServiceProvider, rsp, 0)


def test_encoding_is_implicit_vr_with_the_group_length_first() -> None:
    command = encode_store_response(
        message_id=3, status=0xA700, sop_class_uid=MR, sop_instance_uid="1.2.3"
    )
    # (0000,0000) UL, length 4, value = bytes after this element
    assert command[:8] == b"\x00\x00\x00\x00\x04\x00\x00\x00"
    assert int.from_bytes(command[8:12], "little") == len(command) - 12
    assert b"1.2.3\x00" in command  # odd-length UI padded with NUL
    assert (0xA700).to_bytes(2, "little") in command


def test_responses_that_need_pynetdicom_go_to_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    # An error comment, a command set larger than the peer's PDU, a
    # non-C-STORE message: pynetdicom's own send_msg, same bytes as before.
    cases = [
        (_response(status=0xC210, comment="cannot understand"), 16384),
        (_response(), 40),
    ]
    for rsp, max_pdu in cases:
        assert _sent(LeanDIMSEServiceProvider, rsp, max_pdu) == _sent(
            DIMSEServiceProvider, rsp, max_pdu
        )
    fragmented = _sent(LeanDIMSEServiceProvider, _response(), 40)
    assert len(fragmented) > 1

    calls: list[Any] = []
    original = DIMSEServiceProvider.send_msg

    def spy(self: Any, primitive: Any, context_id: int) -> None:
        calls.append(primitive)
        original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", spy)
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    _sent(LeanDIMSEServiceProvider, echo, 16384)
    assert calls == [echo]


def test_a_bound_dimse_sent_handler_still_gets_its_event(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(
        DIMSEServiceProvider, "send_msg", lambda self, primitive, cx: calls.append(primitive)
    )
    assoc = _assoc(16384, handlers=[(lambda event: None, None)])
    rsp = _response()
    LeanDIMSEServiceProvider(assoc).send_msg(rsp, 1)
    assert calls == [rsp] and assoc.dul.sent == []


# ---- requests ---------------------------------------------------------------

DATA = b"\x08\x00\x16\x00\x1a\x00\x00\x00" + bytes(range(256)) * 40


def _store_request(
    *,
    sop_instance: str = "1.2.3.4.5",
    sop_class: str = MR,
    message_id: int = 9,
    priority: int = 2,
    move_originator: str | None = None,
) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = sop_class
    rq.AffectedSOPInstanceUID = sop_instance
    rq.Priority = priority
    if move_originator is not None:
        rq.MoveOriginatorApplicationEntityTitle = move_originator
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(DATA)
    return rq


def _pdatas(primitive: Any, max_pdu: int, context_id: int = 3) -> list[Any]:
    message = (C_STORE_RQ if isinstance(primitive, C_STORE) else C_ECHO_RQ)()
    message.primitive_to_message(primitive)
    return list(message.encode_msg(context_id, max_pdu))


def _received(provider_class: type[DIMSEServiceProvider], pdatas: list[Any], **kw: Any) -> Any:
    assoc = _assoc(16384, **kw)
    provider = provider_class(assoc)
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    queued = []
    while not provider.msg_queue.empty():
        queued.append(provider.msg_queue.get_nowait())
    events = []
    while not assoc.dul.event_queue.empty():
        events.append(assoc.dul.event_queue.get_nowait())
    return queued, events


def _summary(queued: list[Any]) -> list[Any]:
    out = []
    for context_id, p in queued:
        row = [context_id, type(p).__name__, p.MessageID, p.AffectedSOPClassUID]
        if isinstance(p, C_STORE):
            row += [
                p.AffectedSOPInstanceUID,
                p.Priority,
                p.MoveOriginatorApplicationEntityTitle,
                p.MoveOriginatorMessageID,
                p.DataSet.getvalue(),
                p._context_id,
                p._dataset_path,
                p._dataset_file,
            ]
        out.append(row)
    return out


def _count_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = DIMSEServiceProvider.receive_primitive

    def counting(self: Any, primitive: Any) -> None:
        if type(self) is LeanDIMSEServiceProvider:
            calls[0] += 1
        original(self, primitive)

    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", counting)
    return calls


@pytest.mark.parametrize("max_pdu", [0, 16384, 1000])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4.5", "1.2.3.4.56", "1." + "2" * 62])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_plain_store_requests_are_read_as_pynetdicom_reads_them(
    monkeypatch: pytest.MonkeyPatch, max_pdu: int, sop_instance: str, priority: int
) -> None:
    calls = _count_pynetdicom(monkeypatch)
    pdatas = _pdatas(_store_request(sop_instance=sop_instance, priority=priority), max_pdu)
    # Two instances back to back on the same provider.
    ours, our_events = _received(LeanDIMSEServiceProvider, pdatas + pdatas)
    theirs, their_events = _received(DIMSEServiceProvider, pdatas + pdatas)
    assert _summary(ours) == _summary(theirs)
    assert len(ours) == 2 and our_events == their_events == []
    assert calls[0] == 0  # the lean path took every P-DATA


@pytest.mark.parametrize(
    "case",
    ["echo", "move originator", "command in fragments", "dimse recv handler", "uid too long"],
)
def test_other_messages_are_left_to_pynetdicom(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    calls = _count_pynetdicom(monkeypatch)
    kw: dict[str, Any] = {}
    if case == "echo":
        echo = C_ECHO()
        echo.MessageID = 4
        echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
        pdatas = _pdatas(echo, 16384)
    elif case == "move originator":
        pdatas = _pdatas(_store_request(move_originator="PACS"), 16384)
    elif case == "command in fragments":
        pdatas = _pdatas(_store_request(), 40)
        assert pdatas[0].presentation_data_value_list[0][1][0] == 0x01
    elif case == "dimse recv handler":
        pdatas = _pdatas(_store_request(), 16384)
        kw = {"handlers": [(lambda event: None, None)], "event": evt.EVT_DIMSE_RECV}
    else:  # pynetdicom's setter refuses it: pynetdicom aborts
        long_uid = ("1." + "2" * 68).encode()
        elements = [(0x1000, long_uid) if e == 0x1000 else (e, v) for e, v in PLAIN]
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((3, b"\x03" + _command(*elements)))
        pdata.presentation_data_value_list.append((3, b"\x02" + DATA))
        pdatas = [pdata]
    if case == "dimse recv handler":
        # pynetdicom triggers the event with a real Event; only the routing is checked.
        monkeypatch.setattr(evt, "trigger", lambda *a, **k: None)
    ours = _received(LeanDIMSEServiceProvider, pdatas, **kw)
    theirs = _received(DIMSEServiceProvider, pdatas, **kw)
    assert _summary(ours[0]) == _summary(theirs[0]) and ours[1] == theirs[1]
    assert calls[0] == len(pdatas)
    if case == "uid too long":
        assert ours[1] == ["Evt19"]


def test_chunked_storage_setting_leaves_requests_to_pynetdicom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_pynetdicom(monkeypatch)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    pdatas = _pdatas(_store_request(), 16384)
    provider = LeanDIMSEServiceProvider(_assoc(16384))
    provider.receive_primitive(pdatas[0])  # the command: pynetdicom opens its temporary file
    assert calls[0] == 1
    assert provider.message is not None and provider.message._data_set_file is not None
    provider.message._data_set_file.close()
    provider.message._data_set_path.unlink()


def test_a_command_inside_a_data_set_aborts_the_association() -> None:
    pdatas = _pdatas(_store_request(), 1000)
    assert len(pdatas) > 3
    # The next message's command arrives before the data set's last fragment.
    queued, events = _received(LeanDIMSEServiceProvider, [*pdatas[:2], pdatas[0]])
    assert events == ["Evt19"]
    assert queued == []


def _command(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)


PLAIN = (
    (0x0002, MR.encode() + b"\x00"),
    (0x0100, b"\x01\x00"),
    (0x0110, b"\x09\x00"),
    (0x0700, b"\x02\x00"),
    (0x0800, b"\x00\x00"),
    (0x1000, b"1.2.3 "),
)


def test_read_store_request_takes_only_plain_store_commands() -> None:
    plain = _command(*PLAIN)
    assert read_store_request(plain) == {
        0x0002: MR,
        0x0100: 1,
        0x0110: 9,
        0x0700: 2,
        0x0800: 0,
        0x1000: "1.2.3",
    }
    with_length = struct.pack("<HHII", 0, 0, 4, len(plain)) + plain
    assert read_store_request(with_length) is not None
    for cut in range(len(plain)):
        assert read_store_request(plain[:cut]) is None, cut
    others = {
        "no data set": [(0x0800, b"\x01\x01") if e == 0x0800 else (e, v) for e, v in PLAIN],
        "c-echo": [(0x0100, b"\x30\x00") if e == 0x0100 else (e, v) for e, v in PLAIN],
        "repeated": [*PLAIN, (0x0110, b"\x09\x00")],
        "unknown": [*PLAIN, (0x0901, b"\x00\x00\x00\x00")],
        "missing": PLAIN[1:],
        "two uids": [(0x1000, b"1.2\\1.3\x00") if e == 0x1000 else (e, v) for e, v in PLAIN],
        "us of 4 bytes": [
            (0x0700, b"\x02\x00\x00\x00") if e == 0x0700 else (e, v) for e, v in PLAIN
        ],
        "not ascii": [(0x1000, b"1.2.\xff") if e == 0x1000 else (e, v) for e, v in PLAIN],
        "other group": [(e, v) for e, v in PLAIN] + [],
    }
    for name, elements in others.items():
        if name == "other group":
            command = plain + struct.pack("<HHI", 8, 0x16, 2) + b"\x00\x00"
        else:
            command = _command(*elements)
        assert read_store_request(command) is None, name


def test_command_and_data_in_one_p_data_are_read_as_pynetdicom_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer may put the command and data-set fragments in one P-DATA-TF.
    calls = _count_pynetdicom(monkeypatch)
    merged = P_DATA()
    for pdata in _pdatas(_store_request(), 1000):
        merged.presentation_data_value_list.extend(pdata.presentation_data_value_list)
    assert len(merged.presentation_data_value_list) > 3
    ours = _received(LeanDIMSEServiceProvider, [merged])
    theirs = _received(DIMSEServiceProvider, [merged])
    assert _summary(ours[0]) == _summary(theirs[0]) and len(ours[0]) == 1
    assert calls[0] == 0
