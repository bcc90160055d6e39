"""pynetdicom's acceptor association, with a reactor that waits for messages.

pynetdicom 2.x/3.0 runs each accepted association in a loop that starts with
an unconditional ``time.sleep(0.001)`` before it looks for the next complete
DIMSE message (``Association._run_reactor``; there is no setting for it, see
pynetdicom issues #120 and #650 on the same pattern in the network loop). A
scanner sends one C-STORE, waits for its response, sends the next, so that
sleep is paid once per instance: about a third of pynetdicom's own per-instance
time on loopback, and up to 1 ms between the last byte of a volume and the
start of its handling.

:class:`PromptAssociation` runs the same checks in the same order, but blocks
on the message queue (with ``poll_s`` as the timeout, so release, abort, a dead
network thread and the idle timeout are still seen within ``poll_s``) instead
of sleeping first. The pause checkpoint that pynetdicom's ``send_*`` methods
rely on is kept where pynetdicom has it: before a message is taken.

:class:`PromptRequestHandler` lets pynetdicom build and configure the
association, then gives the instance this subclass's reactor and
:class:`~boldstream.receiver.dimse.LeanDIMSEServiceProvider`, which reads
plain C-STORE requests and writes their responses without pydicom (see that
module). When the ``pynetdicom`` logger prints nothing below WARNING (the
default, see :func:`boldstream.logs.configure_logging`) it also unbinds
pynetdicom's "standard" tracing handlers: bound to every PDU and DIMSE
message sent or received, they read each command set through pydicom and
format a description for that logger at INFO and DEBUG whether it prints
them or not. With ``logging.level = "debug"`` they stay bound.

:class:`SharedContexts` holds the server's supported presentation
contexts. pynetdicom deep-copies that list into every association it
accepts (``RequestHandler._create_association``), which for boldstream's
~150 storage contexts rebuilds and re-validates every UID: 6-7 ms of an
association's set-up, paid per series by most scanners and per instance by
some. Negotiation only reads those contexts (pynetdicom 3.0
``negotiate_as_acceptor`` builds new result contexts), so every association
gets its own list of the same context objects instead. The handler also
gives the association's network loop boldstream's poll
(``receiver.reactor_poll_ms``) before it starts, so the set-up's own steps
do not wait out pynetdicom's 1 ms default between them.

With ``receiver.direct_store`` (the default) the association's network
thread is a :class:`~boldstream.receiver.direct.DirectDUL`, which answers
plain C-STOREs itself from the PDU bytes; everything else (C-ECHO, release,
abort, any other message) still reaches the reactor below.

Every receiver test runs through this handler; ``tests/receiver/
test_association.py`` checks release, abort, idle timeout and the tracing
handlers, ``tests/receiver/test_dimse.py`` the C-STORE messages.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler

from boldstream.receiver.dimse import ArrivalQueue, LeanDIMSEServiceProvider
from boldstream.receiver.direct import DirectDUL

__all__ = ["PromptAssociation", "PromptRequestHandler", "SharedContexts"]


class SharedContexts(list[Any]):
    """The server's supported contexts; ``deepcopy`` gives a new list of the same items.

    Nothing may change these contexts while the server runs (boldstream sets
    them once, before it listens); ``tests/receiver/test_association.py``
    checks that negotiation leaves them as they were.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class PromptAssociation(Association):
    """An acceptor whose reactor wakes when a DIMSE message is complete."""

    #: Longest wait for a message before the release/abort/timeout checks
    #: (pynetdicom's own cadence for them).
    poll_s: float = 0.001

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom's pause point (used by send_* on this association).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=self.poll_s)
            except queue.Empty:
                context_id, msg = None, None
            if msg is not None and context_id is not None:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


_TRACING = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class PromptRequestHandler(RequestHandler):
    """pynetdicom's connection handler, making :class:`PromptAssociation` acceptors."""

    def _create_association(self) -> Association:
        assoc: Any = super()._create_association()
        assoc.__class__ = PromptAssociation  # same object, set up by pynetdicom
        assoc.dimse.__class__ = LeanDIMSEServiceProvider
        assoc.dimse.msg_queue = ArrivalQueue()  # still empty: the association has not started
        if getattr(self.server, "direct_store", False):
            assoc.dul.__class__ = DirectDUL  # not started yet either
        poll_s = getattr(self.server, "reactor_poll_s", None)
        if poll_s is not None:
            assoc.dul._run_loop_delay = poll_s
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            for event, handler in _TRACING:
                assoc.unbind(event, handler)
        return assoc  # type: ignore[no-any-return]
