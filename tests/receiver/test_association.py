"""The acceptor reactor that waits for messages instead of sleeping first.

:mod:`boldstream.receiver.association` replaces pynetdicom's per-association
loop. Every storescu test exercises C-STORE and release through it; these
tests pin down the rest of that loop: the accepted associations are really
``PromptAssociation``, a release and an abort from an idle peer are seen at
once, and an association idle past ``network_timeout_s`` is ended. They also
check that associations share the server's supported contexts
(``SharedContexts``) and that negotiation leaves those contexts as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.receiver.association import PromptAssociation, SharedContexts
from boldstream.receiver.dimse import LeanDIMSEServiceProvider
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.spool import Spool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    settings = load_settings(
        overrides=[
            {
                "receiver": {
                    "port": 0,
                    "spool_dir": str(tmp_path / "spool"),
                    "network_timeout_s": 1.0,
                }
            }
        ],
        environ={},
    )
    server = StorageSCP(settings.receiver, Spool(settings.receiver.spool_dir), lambda r: None)
    server.start()
    yield server
    server.stop()


def _associate(port: int) -> Any:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="BOLDSTREAM")
    assert assoc.is_established
    return assoc


def _server_associations(scp: StorageSCP) -> list[Any]:
    return list(scp._server.active_associations)


def _wait(condition: Any, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout
        time.sleep(0.005)
    return time.monotonic() - start


def test_accepted_association_uses_the_prompt_reactor(scp: StorageSCP) -> None:
    assoc = _associate(scp.port)
    try:
        _wait(lambda: _server_associations(scp))
        (server_side,) = _server_associations(scp)
        assert isinstance(server_side, PromptAssociation)
        # The network loop's poll is boldstream's from the start (set-up included).
        assert server_side.dul._run_loop_delay == scp.settings.reactor_poll_ms / 1000.0
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("pynetdicom_level", [logging.WARNING, logging.DEBUG])
def test_tracing_handlers_are_bound_only_when_pynetdicom_logs_them(
    scp: StorageSCP, pynetdicom_level: int
) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(pynetdicom_level)
    try:
        assoc = _associate(scp.port)
        try:
            _wait(lambda: _server_associations(scp))
            (server_side,) = _server_associations(scp)
            assert isinstance(server_side.dimse, LeanDIMSEServiceProvider)
            events = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
            tracing = [server_side.get_handlers(e) for e in events]
            if pynetdicom_level == logging.DEBUG:
                assert all(tracing)
            else:
                assert not any(tracing)
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        logger.setLevel(before)


def test_release_after_idle_is_answered_at_once(scp: StorageSCP) -> None:
    assoc = _associate(scp.port)
    time.sleep(0.2)  # the reactor has been waiting on an empty queue
    start = time.monotonic()
    assoc.release()
    assert assoc.is_released
    assert time.monotonic() - start < 0.5
    _wait(lambda: not _server_associations(scp))


def test_abort_from_the_peer_ends_the_association(scp: StorageSCP) -> None:
    with capture_logs() as logs:
        assoc = _associate(scp.port)
        _wait(lambda: _server_associations(scp))
        assoc.abort()
        _wait(lambda: not _server_associations(scp))
        _wait(lambda: any(e["event"].startswith("association aborted") for e in logs))


def test_idle_association_is_ended_after_the_network_timeout(scp: StorageSCP) -> None:
    assoc = _associate(scp.port)
    _wait(lambda: _server_associations(scp))
    waited = _wait(lambda: not _server_associations(scp), timeout=10)
    assert 0.5 < waited < 5.0  # network_timeout_s is 1 s
    _wait(lambda: not assoc.is_established)


def _described(contexts: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id)
        for cx in contexts
    ]


def test_associations_share_the_servers_contexts_and_leave_them_as_they_were(
    scp: StorageSCP,
) -> None:
    """pynetdicom deep-copies the server's contexts into every association;
    boldstream's ``SharedContexts`` hands each one a new list of the same
    context objects, which is only safe while negotiation never changes them.
    One association asks for everything negotiation can do: an accepted
    context, a transfer syntax and an abstract syntax the SCP does not
    support, and SCP/SCU role selection; a second one then gets the same
    answers."""
    shared = scp._server.contexts
    assert isinstance(shared, SharedContexts)
    assert len(shared) > 100  # every storage class, and Verification
    before = _described(shared)

    def negotiate() -> dict[str, int]:
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(CTImageStorage, ["1.2.826.0.1.3680043.9.9999.2"])
        ae.add_requested_context("1.2.826.0.1.3680043.9.9999.1")
        ae.add_requested_context(Verification)
        role = build_role(MRImageStorage, scu_role=True, scp_role=True)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="BOLDSTREAM", ext_neg=[role])
        assert assoc.is_established
        try:
            _wait(lambda: _server_associations(scp))
            (server_side,) = _server_associations(scp)
            supported = server_side.acceptor.supported_contexts
            assert supported is not shared
            assert len(supported) == len(shared)
            assert all(a is b for a, b in zip(supported, shared, strict=True))
            assert assoc.send_c_echo().Status == 0x0000
            return {
                str(cx.abstract_syntax): int(cx.result)
                for cx in [*assoc.accepted_contexts, *assoc.rejected_contexts]
            }
        finally:
            assoc.release()
            _wait(lambda: not _server_associations(scp))

    first = negotiate()
    assert first[MRImageStorage] == 0x00  # accepted
    assert first[CTImageStorage] == 0x04  # transfer syntax not supported
    assert first["1.2.826.0.1.3680043.9.9999.1"] == 0x03  # abstract syntax not supported
    assert first[Verification] == 0x00
    assert _described(shared) == before
    assert negotiate() == first
    assert _described(shared) == before
