"""Plain C-STOREs answered on pynetdicom's network thread.

pynetdicom reads every PDU on its network thread (the DUL), turns it into PDU
and primitive objects, steps its state machine, collects the DIMSE message,
queues it for the association thread, which runs the C-STORE handler and
queues the response back to the network thread to be encoded and sent. A
scanner sends one instance, waits for its status, sends the next, so it
waits through every one of those steps and both thread hand-offs. Measured
with the same handler work (header check, Part 10 bytes, durable write) a
C-STORE reader on plain sockets took instances twice as fast as that path
(docs/benchmarks.md, "Receive").

:class:`DirectDUL` is pynetdicom's network thread with a shorter way for the
common case. pynetdicom still negotiates the association, and still reads
every PDU that is not part of a plain C-STORE (echo, release, abort, any
other message), with its state machine, timers and events. A P-DATA-TF PDU
read in the data-transfer state (Sta6) goes the short way when it starts a
message whose whole command set is in its first PDV and is a plain C-STORE
request (:func:`~boldstream.receiver.dimse.read_store_request`) on an
accepted presentation context of a storage SOP class, or continues such a
message. Its data-set fragments are collected from the PDU's bytes, and when
the last one is in, the handler bound to ``EVT_C_STORE`` is called on this
thread exactly as pynetdicom's Storage service class calls it (an exception
in it answers 0xC211, as there) and the response PDU is written on the
socket. A P-DATA PDU neither starts nor changes the state (Sta6 -> Sta6 in
PS3.8 Table 9-10 for both directions), so the state machine has nothing to
step for either.

The short way is not taken (pynetdicom's path is) when a handler is bound to
any event the short way would not fire (PDU, raw data or DIMSE message sent
or received: pynetdicom's tracing handlers are unbound unless its logger
prints them, see :mod:`~boldstream.receiver.association`), when pynetdicom
writes data sets to files (``STORE_RECV_CHUNKED_DATASET``), after a release
was sent, or when SOP Class Common Extended Negotiation maps the class.

After a PDU taken the short way, the thread waits up to its loop delay for
the next one before it goes back to pynetdicom's loop, so that an instance
that follows at once is not held for the loop's sleep; anything queued for
the peer (an abort, a release) or a stop ends that wait.
"""

from __future__ import annotations

import select
import ssl
import struct
import time
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from boldstream.logs import get_logger
from boldstream.receiver.dimse import (
    COMMAND_LAST_FRAGMENT,
    encode_store_response,
    read_store_request,
    stamp_arrival,
    store_primitive,
)

__all__ = ["DirectDUL"]

_LOG = get_logger("direct")
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_P_DATA_TF = 0x04
#: Events whose handlers would miss what the short way does not fire.
_TRACED = (
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
)
#: Status pynetdicom answers when a C-STORE handler raises.
_HANDLER_FAILED = 0xC211


class _Store:
    """A C-STORE request whose data set is being collected on the short way."""

    __slots__ = ("context", "parts", "request")

    def __init__(self, request: C_STORE, context: PresentationContext) -> None:
        self.request = request
        self.context = context
        self.parts: list[memoryview] = []


def _pdvs(body: bytes | bytearray) -> list[tuple[int, int, memoryview]] | None:
    """The PDV items of a P-DATA-TF PDU body: (context ID, control header, fragment).

    None when the items do not tile the body exactly (pynetdicom then reads,
    and judges, the PDU).
    """
    items: list[tuple[int, int, memoryview]] = []
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if offset + 6 > end:
            return None
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        items.append((context_id, control, view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return items or None


class DirectDUL(DULServiceProvider):
    """pynetdicom's network thread, answering plain C-STOREs itself."""

    _store: _Store | None = None

    # -- reading ---------------------------------------------------------------

    def _read_pdu_data(self) -> None:
        """Read a PDU; after one taken the short way, read on while more come at once."""
        while self._read_one():
            self._idle_timer.restart()
            if (
                self._kill_thread
                or self.to_provider_queue.queue
                or not self._readable(self._run_loop_delay)
            ):
                return

    def _readable(self, timeout: float) -> bool:
        sock = cast(Any, self.socket).socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
        except (OSError, ValueError):
            return False  # pynetdicom's own check reports the closed socket
        return bool(ready)

    def _read_one(self) -> bool:
        """Read one PDU; True when the short way took it and queued no event."""
        sock = cast(Any, self.socket)
        try:
            head = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            _LOG.error("connection closed before a whole PDU was received", reason=str(exc))
            self.event_queue.put("Evt17")
            return False
        if len(head) != 6:
            self.event_queue.put("Evt17")
            return False
        pdu_type, _, length = _PDU_HEADER.unpack(head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            _LOG.error("unknown PDU type received", pdu_type=f"0x{pdu_type:02X}")
            self.event_queue.put("Evt19")
            return False
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            _LOG.error("connection closed before a whole PDU was received", reason=str(exc))
            self.event_queue.put("Evt17")
            return False
        if len(body) != length:
            _LOG.error(
                "connection closed before a whole PDU was received",
                received=6 + len(body),
                expected=6 + length,
            )
            self.event_queue.put("Evt17")
            return False
        if pdu_type == _P_DATA_TF and self.state_machine.current_state == "Sta6":
            items = _pdvs(body)
            if items is not None and self._take(items):
                return not self.event_queue.queue
        # pynetdicom's own path, as its _read_pdu_data ends.
        try:
            pdu, event = self._decode_pdu(head + body)
            self.event_queue.put(event)
        except Exception:
            _LOG.exception("received PDU cannot be decoded; the association is aborted")
            self.event_queue.put("Evt19")
            return False
        self._recv_pdu.put(pdu)
        return False

    # -- the short way -----------------------------------------------------------

    def _take(self, items: list[tuple[int, int, memoryview]]) -> bool:
        """Consume a P-DATA PDU's items on the short way; False leaves it to pynetdicom.

        A PDU may end one message and start others: each is started in turn
        (a loop, so a PDU of many small messages cannot exhaust the stack);
        a message the short way does not take gets the rest of the PDU.
        """
        if self._store is None:
            if not self._start(items[0]):
                return False
            items = items[1:]  # the command set, read by _start
        rest = self._collect(items)
        while rest:
            if not self._start(rest[0]):
                self._hand_over(rest)
                break
            rest = self._collect(rest[1:])
        return True

    def _collect(
        self, items: list[tuple[int, int, memoryview]]
    ) -> list[tuple[int, int, memoryview]]:
        """Add data-set fragments to the message on the short way; answer it at its end.

        Returns the items after the message's last fragment (empty when the
        message goes on in the next PDU, or the association is aborted).
        """
        store = self._store
        assert store is not None
        for n, (context_id, control, fragment) in enumerate(items):
            if control & 1 or context_id != store.context.context_id:
                _LOG.error(
                    "association aborted: a fragment that does not belong inside a "
                    "C-STORE data set",
                    fragment="command" if control & 1 else f"context {context_id}",
                    calling_aet=cast(Any, self.assoc).requestor.ae_title,
                )
                self._store = None
                self.event_queue.put("Evt19")
                return []
            store.parts.append(fragment)  # a view of this PDU's own buffer
            if control & 2:
                self._store = None
                self._answer(store)
                return items[n + 1 :]
        return []

    def _start(self, first: tuple[int, int, memoryview]) -> bool:
        """Begin a plain C-STORE on the short way from a PDU's first item."""
        context_id, control, fragment = first
        assoc: Any = self.assoc
        dimse = assoc.dimse
        if (
            control != COMMAND_LAST_FRAGMENT[0]
            or dimse.message is not None
            or getattr(dimse, "_store", None) is not None
            or not assoc.is_established
            or assoc._sent_release
            or _config.STORE_RECV_CHUNKED_DATASET
            or any(assoc.get_handlers(e) for e in _TRACED)
        ):
            return False
        values = read_store_request(bytes(fragment))
        if values is None:
            return False
        context = assoc._accepted_cx.get(context_id)
        sop_class = values[0x0002]
        if (
            context is None
            or sop_class in assoc.acceptor.accepted_common_extended
            or (
                not _config.UNRESTRICTED_STORAGE_SERVICE
                and uid_to_service_class(sop_class) is not StorageServiceClass
            )
        ):
            return False
        request = store_primitive(values, context_id)
        if request is None:
            return False
        self._store = _Store(request, context)
        return True

    def _hand_over(self, items: list[tuple[int, int, memoryview]]) -> None:
        """Give PDV items to pynetdicom's DIMSE provider, as its state machine does."""
        primitive: Any = P_DATA()
        primitive.presentation_data_value_list = [
            [context_id, bytes([control]) + bytes(fragment)]  # lists: pynetdicom checks
            for context_id, control, fragment in items
        ]
        cast(Any, self.assoc).dimse.receive_primitive(primitive)

    def _answer(self, store: _Store) -> None:
        """Call the C-STORE handler as pynetdicom does, and send its response."""
        request, context = store.request, store.context
        request.DataSet = BytesIO(b"".join(store.parts))
        stamp_arrival(request, time.time())
        assoc: Any = self.assoc
        # The handler's time is not network idleness: the association thread,
        # which watches this timer meanwhile, must not end the association
        # under a slow durable write (pynetdicom's path is not watched then).
        self._idle_timer.stop()
        try:
            status = evt.trigger(
                assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple}
            )
        except Exception:
            _LOG.exception(
                "C-STORE handler failed; answered 0xC211",
                calling_aet=assoc.requestor.ae_title,
                sop=request.AffectedSOPInstanceUID,
            )
            status = _HANDLER_FAILED
        finally:
            self._idle_timer.restart()
        if not assoc.is_established:  # the handler released or aborted
            return
        context_id = cast(int, context.context_id)
        if isinstance(status, int) and 0 <= status <= 0xFFFF:
            command = encode_store_response(
                message_id=cast(int, request.MessageID),
                status=status,
                sop_class_uid=request.AffectedSOPClassUID,
                sop_instance_uid=request.AffectedSOPInstanceUID,
            )
            item = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
            limit = assoc.requestor.maximum_length
            if not limit or len(item) <= limit:
                cast(Any, self.socket).send(_PDU_HEADER.pack(_P_DATA_TF, 0, len(item)) + item)
                return
        # Anything else is built, checked and sent by pynetdicom.
        response = C_STORE()
        response.MessageID = request.MessageID
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response = StorageServiceClass(assoc).validate_status(cast(Any, status), response)
        assoc.dimse.send_msg(response, context_id)
