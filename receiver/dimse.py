"""C-STORE responses encoded with ``struct`` instead of pydicom.

pynetdicom turns every response primitive into a DIMSE message by building a
pydicom :class:`~pydicom.dataset.Dataset` of the command set, validating each
value as it is set, encoding the set twice (once to learn the group length)
and fragmenting it. For the C-STORE-RSP that answers each instance that is
about 0.4 ms of interpreter time, spent while the scanner waits for the
answer before it sends the next instance.

:class:`LeanDIMSEServiceProvider` writes the same bytes directly for the
common case: a C-STORE response whose command set fits one PDV, carrying a
status and none of the optional Offending Element or Error Comment, on an
association where no ``EVT_DIMSE_SENT`` handler is bound (that event hands
handlers pynetdicom's message object, which this path does not build).
Anything else goes to pynetdicom's own :meth:`send_msg` unchanged. The
command set is Implicit VR Little Endian (PS3.7 6.3.1); element order and
padding follow pynetdicom's encoder, and the tests compare the two byte for
byte.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

__all__ = ["LeanDIMSEServiceProvider", "encode_store_response"]

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
#: Message Control Header of a PDV holding a whole command set (PS3.8 E.2).
_COMMAND_LAST_FRAGMENT = b"\x03"


def _ui(group_element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _us(group_element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, group_element, 2, value)


def encode_store_response(
    *,
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
) -> bytes:
    """The command set of a C-STORE-RSP without a data set (Implicit VR LE).

    Elements in tag order, each present only when given, as pynetdicom
    writes them: Command Group Length, Affected SOP Class UID, Command Field,
    Message ID Being Responded To, Command Data Set Type, Status, Affected
    SOP Instance UID.
    """
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid) if sop_class_uid is not None else b"",
            _us(0x0100, _C_STORE_RSP),
            _us(0x0120, message_id),
            _us(0x0800, _NO_DATA_SET),
            _us(0x0900, status),
            _ui(0x1000, sop_instance_uid) if sop_instance_uid is not None else b"",
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class LeanDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with plain C-STORE responses sent directly."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.OffendingElement is None
            and primitive.ErrorComment is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_store_response(
                message_id=primitive.MessageIDBeingRespondedTo,
                status=primitive.Status,
                sop_class_uid=primitive.AffectedSOPClassUID,
                sop_instance_uid=primitive.AffectedSOPInstanceUID,
            )
            limit = self.maximum_pdu_size
            if limit == 0 or len(command) <= limit - 6:  # one PDV item, header included
                pdata = P_DATA()
                pdata.presentation_data_value_list.append(
                    (context_id, _COMMAND_LAST_FRAGMENT + command)
                )
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)
