"""C-STORE requests read and responses written with ``struct`` instead of pydicom.

pynetdicom turns every DIMSE message into a pydicom
:class:`~pydicom.dataset.Dataset` of its command set and back. For a response
it builds the dataset, validates each value as it is set, encodes the set
twice (once to learn the group length) and fragments it: about 0.4 ms of
interpreter time per instance, spent while the scanner waits for the answer
before it sends the next instance. For a request it decodes the command set
with pydicom and copies each element into the primitive (about 0.1 ms).

:class:`LeanDIMSEServiceProvider` does both directly for the common case and
hands everything else to pynetdicom unchanged:

- Responses: a C-STORE response whose command set fits one PDV, carrying a
  status and none of the optional Offending Element or Error Comment, is
  written with ``struct``, byte for byte what pynetdicom writes (element
  order, padding; the tests compare them).
- Requests: a message whose whole command set comes in the first PDV of a
  P-DATA primitive, and is a C-STORE-RQ with a data set and exactly the
  elements PS3.7 9.3.1.1 requires (no Move Originator), is read with
  ``struct``; the primitive is then filled through pynetdicom's own setters
  (which validate the UIDs as they do for pynetdicom's path) and queued as
  pynetdicom queues it. Data-set fragments are collected as pynetdicom
  collects them.

Neither path is taken when a handler is bound to ``EVT_DIMSE_SENT`` or
``EVT_DIMSE_RECV`` (those events hand pynetdicom's message object to the
handler), or when pynetdicom is set to write received data sets to files
(``STORE_RECV_CHUNKED_DATASET``). The command set is Implicit VR Little
Endian (PS3.7 6.3.1).
"""

from __future__ import annotations

import queue
import struct
import time
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from boldstream.logs import get_logger

__all__ = [
    "COMMAND_LAST_FRAGMENT",
    "ArrivalQueue",
    "LeanDIMSEServiceProvider",
    "arrived",
    "encode_store_response",
    "read_store_request",
    "stamp_arrival",
    "store_primitive",
]

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
#: Message Control Header of a PDV holding a whole command set (PS3.8 E.2).
COMMAND_LAST_FRAGMENT = b"\x03"


#: The attribute :class:`ArrivalQueue` sets on a C-STORE request primitive.
_ARRIVED = "boldstream_arrived"


class ArrivalQueue(queue.Queue[tuple[int, Any]]):
    """pynetdicom's queue of complete DIMSE messages, stamping C-STORE requests.

    The network thread puts a message here as soon as its last fragment has
    been read, so the stamp is when the instance had fully arrived; the
    association thread may start its handler later (0.2 ms p50, 0.4 ms p90
    in ``benchmarks/receive_timeline.py``, more when it is busy). Both the
    struct path below and pynetdicom's own put their messages here; a
    C-STORE answered on the network thread (:mod:`~boldstream.receiver.direct`)
    is stamped there with :func:`stamp_arrival` instead.
    """

    def put(self, item: tuple[int, Any], block: bool = True, timeout: float | None = None) -> None:
        primitive = item[1]
        if type(primitive) is C_STORE:
            stamp_arrival(primitive, time.time())
        super().put(item, block, timeout)


def stamp_arrival(request: C_STORE, when: float) -> None:
    """Record when a C-STORE request had fully arrived (``time.time()``)."""
    setattr(request, _ARRIVED, when)


def arrived(request: Any) -> float | None:
    """When a C-STORE request had fully arrived (``time.time()``), if stamped."""
    value = getattr(request, _ARRIVED, None)
    return value if isinstance(value, float) else None


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


#: The elements of a C-STORE-RQ command set (PS3.7 Table 9.3-1) without the
#: optional Move Originator pair, by element number in group 0000.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_STORE_RQ_REQUIRED = _STORE_RQ_ELEMENTS - {0x0000}  # the group length is optional
_US_ELEMENTS = (0x0100, 0x0110, 0x0700, 0x0800)
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_LOG = get_logger("dimse")


def read_store_request(command: bytes) -> dict[int, Any] | None:
    """The values of a plain C-STORE-RQ command set, or None for any other message.

    Keys are element numbers of group 0000: the UIDs (0002, 1000) as text
    without trailing NULs or spaces, as pydicom reads them, and the US
    values (0100, 0110, 0700, 0800) as ints. None when the command set is
    not a C-STORE-RQ with a data set, has an element other than the
    required ones, repeats one, lacks one, or cannot be walked to its last
    byte: pynetdicom then reads it, and judges it, as it always has.
    """
    values: dict[int, Any] = {}
    offset, end = 0, len(command)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        offset += 8
        if group != 0 or element not in _STORE_RQ_ELEMENTS or element in values:
            return None
        if offset + length > end:
            return None
        raw = command[offset : offset + length]
        offset += length
        if element in _US_ELEMENTS:
            if length != 2:
                return None
            values[element] = _US.unpack(raw)[0]
        elif element == 0x0000:
            values[element] = raw
        else:
            try:
                text = raw.decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                return None
            if "\\" in text:  # several values: pynetdicom warns and takes the first
                return None
            values[element] = text
    if any(e not in values for e in _STORE_RQ_REQUIRED):
        return None
    if values[0x0100] != _C_STORE_RQ or values[0x0800] == _NO_DATA_SET:
        return None
    return values


def store_primitive(values: dict[int, Any], context_id: int) -> C_STORE | None:
    """The C-STORE request primitive for :func:`read_store_request`'s values.

    Filled through pynetdicom's own setters, which validate the UIDs as they
    do on pynetdicom's path; None when they refuse a value (pynetdicom's path
    then reads and reports the message). No file-backed data set: pynetdicom's
    defaults for it stand.
    """
    store = C_STORE()
    try:
        store.MessageID = values[0x0110]
        store.AffectedSOPClassUID = values[0x0002]
        store.AffectedSOPInstanceUID = values[0x1000]
        store.Priority = values[0x0700]
    except (TypeError, ValueError):
        return None
    store._context_id = context_id
    return store


class LeanDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with plain C-STORE requests and responses direct."""

    #: The C-STORE request whose data set is being collected (lean path only).
    _store: C_STORE | None = None
    _store_data: BytesIO | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self._store is None:
            if self.message is not None or not self._start_store(primitive):
                self._pynetdicom_receive(primitive)
                return
            pdvs = primitive.presentation_data_value_list[1:]
        else:
            pdvs = primitive.presentation_data_value_list
        data = self._store_data
        assert data is not None
        for _, fragment in pdvs:
            control = fragment[0]
            if control & 1:
                # A command fragment before the data set ended: pynetdicom would
                # fail to decode the joined command sets and abort; say so and abort.
                _LOG.error(
                    "association aborted: a command fragment inside a data set",
                    calling_aet=self.assoc.requestor.ae_title,
                )
                self._store = self._store_data = None
                self.dul.event_queue.put("Evt19")
                return
            data.write(fragment[1:])
            if control & 2:
                store, self._store, self._store_data = self._store, None, None
                assert store is not None
                store.DataSet = data
                self.msg_queue.put((cast(int, store._context_id), store))
                return

    def _pynetdicom_receive(self, primitive: P_DATA) -> None:
        """pynetdicom's own collection and decoding, with a peer's garbage contained.

        pynetdicom raises out of its network thread (ending it without an
        A-ABORT to the peer) when a complete command set lacks an element it
        reads, such as Command Field; its state machine calls this from that
        thread with nothing around it. Such a message is logged and the
        association aborted, as pynetdicom does for the errors it catches.
        """
        try:
            super().receive_primitive(primitive)
        except Exception as exc:
            self.message = None
            _LOG.error(
                "association aborted: a DIMSE message that cannot be decoded",
                reason=f"{type(exc).__name__}: {exc}",
                calling_aet=self.assoc.requestor.ae_title,
            )
            self.dul.event_queue.put("Evt19")

    def _start_store(self, primitive: P_DATA) -> bool:
        """Begin a C-STORE-RQ on the lean path if its command is all in the first PDV."""
        pdvs = primitive.presentation_data_value_list
        if (
            not pdvs
            or pdvs[0][1][:1] != COMMAND_LAST_FRAGMENT
            or _config.STORE_RECV_CHUNKED_DATASET
            or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
        ):
            return False
        values = read_store_request(pdvs[0][1][1:])
        store = None if values is None else store_primitive(values, pdvs[0][0])
        if store is None:
            return False
        self._store, self._store_data = store, BytesIO()
        return True

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
                    (context_id, COMMAND_LAST_FRAGMENT + command)
                )
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)
