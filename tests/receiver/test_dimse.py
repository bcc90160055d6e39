"""C-STORE responses written with struct are pynetdicom's bytes, or pynetdicom sends them.

:class:`LeanDIMSEServiceProvider` and pynetdicom's own provider are each
given the same response primitive on a stand-in association that records
what would go to the network thread; the P-DATA primitives must be equal,
PDV for PDV. Every storescu test in tests/receiver then has DCMTK read these
responses over a real association.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from boldstream.receiver.dimse import LeanDIMSEServiceProvider, encode_store_response

MR = "1.2.840.10008.5.1.4.1.1.4"


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[list[tuple[int, bytes]]] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(list(primitive.presentation_data_value_list))


def _assoc(max_pdu: int, handlers: list[Any] | None = None) -> Any:
    return SimpleNamespace(
        is_requestor=False,
        requestor=SimpleNamespace(maximum_length=max_pdu),
        dul=_Recorder(),
        get_handlers=lambda event: list(handlers or []) if event == evt.EVT_DIMSE_SENT else [],
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
