"""The DICOM Storage SCP: validate, write durably, enqueue, answer.

Handlers are plain functions bound with their collaborators (pynetdicom's
``apps/storescp`` shape). A C-STORE handler does no analysis: it checks that
the instance can be understood, writes it to the spool (fsync'd) and hands it
to the ingest thread; only then does the scanner get 0x0000.

Status codes returned (PS3.4 Annex B.2.3):

- 0x0000 success (also for a duplicate: it is stored already);
- 0xA700 refused, out of resources (spool full or unwritable: the scanner
  keeps the instance and may retry);
- 0xC210 cannot understand (undecodable dataset, bad or missing UIDs).

TCP: the accepted socket gets TCP_NODELAY, and TCP_QUICKACK is re-armed after
every read (Linux clears it after each ACK, which is why setting it once on
accept does nothing). See docs/scanner-setup.md for the sender side.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    VerificationPresentationContexts,
)
from pynetdicom.transport import ThreadedAssociationServer

from boldstream.config.settings import ReceiverSettings
from boldstream.errors import DicomInputError, ReceiverError
from boldstream.logs import get_logger
from boldstream.receiver.spool import Spool, SpoolFullError, check_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "Received",
    "ReceiverStats",
    "StorageSCP",
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


@dataclass(frozen=True, slots=True)
class Received:
    """One instance that is safely in the spool, on its way to assembly."""

    dataset: Dataset
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    #: time.time() when the C-STORE had fully arrived (its last byte).
    received: float
    calling_aet: str = ""
    #: True when re-read from the spool after a restart.
    recovered: bool = False


@dataclass
class ReceiverStats:
    """Counters shared by handler threads (guarded by ``lock``)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    out_of_resources: int = 0
    bytes: int = 0
    associations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "accepted": self.accepted,
                "duplicates": self.duplicates,
                "rejected": self.rejected,
                "out_of_resources": self.out_of_resources,
                "bytes": self.bytes,
                "associations": self.associations,
            }


class _QuickAckSocket(socket.socket):
    """A TCP socket that asks the kernel to ACK at once after every read.

    Against a sender that leaves Nagle on, delayed ACKs on our side stall each
    instance's last segment by up to the delayed-ACK timer (tens of ms).
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if _TCP_QUICKACK is not None:
            try:  # noqa: SIM105 (hot path: cheaper than contextlib.suppress)
                self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass
        return data


class _TunedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP tuning of accepted sockets."""

    tcp_quickack = True

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        if not self.tcp_quickack or type(client) is not socket.socket:
            return client, address  # TLS sockets are left as they are
        timeout = client.gettimeout()
        tuned = _QuickAckSocket(client.family, client.type, client.proto, fileno=client.detach())
        tuned.settimeout(timeout)
        tuned.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None:
            tuned.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return tuned, address


def handle_store(
    event: evt.Event,
    spool: Spool,
    deliver: Callable[[Received], None],
    stats: ReceiverStats,
    log: Any,
) -> int:
    """EVT_C_STORE: validate, write durably, enqueue, answer."""
    received = time.time()
    calling = event.assoc.requestor.ae_title
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    sop_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
        sop_uid = check_uid(sop_uid or ds.get("SOPInstanceUID"), "SOPInstanceUID")
        study = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        if "PixelData" not in ds and sop_class.startswith("1.2.840.10008.5.1.4.1.1.4"):
            raise DicomInputError("MR image without Pixel Data")
        encoded = event.encoded_dataset()
    except DicomInputError as exc:
        stats.add(rejected=1)
        log.warning(
            "instance refused", status="0xC210", reason=str(exc), sop=sop_uid, calling_aet=calling
        )
        return STATUS_CANNOT_UNDERSTAND
    except Exception as exc:  # pydicom raises many kinds on a corrupt stream
        stats.add(rejected=1)
        log.warning(
            "instance refused: cannot decode",
            status="0xC210",
            reason=f"{type(exc).__name__}: {exc}",
            sop=sop_uid,
            calling_aet=calling,
        )
        return STATUS_CANNOT_UNDERSTAND
    try:
        stored = spool.store(study, series, sop_uid, encoded)
    except SpoolFullError as exc:
        stats.add(out_of_resources=1)
        log.error("instance refused: spool full", status="0xA700", reason=str(exc), sop=sop_uid)
        return STATUS_OUT_OF_RESOURCES
    except ReceiverError as exc:
        stats.add(out_of_resources=1)
        log.error(
            "instance refused: spool write failed", status="0xA700", reason=str(exc), sop=sop_uid
        )
        return STATUS_OUT_OF_RESOURCES
    if stored.duplicate:
        stats.add(duplicates=1)
        log.info("duplicate instance ignored (already stored)", sop=sop_uid, series=series)
        return STATUS_SUCCESS
    stats.add(accepted=1, bytes=len(encoded))
    deliver(
        Received(
            dataset=ds,
            path=stored.path,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            received=received,
            calling_aet=calling,
        )
    )
    return STATUS_SUCCESS


def handle_echo(event: evt.Event, log: Any) -> int:
    log.info("C-ECHO", calling_aet=event.assoc.requestor.ae_title)
    return STATUS_SUCCESS


def _handle_accepted(event: evt.Event, stats: ReceiverStats, log: Any) -> None:
    stats.add(associations=1)
    req = event.assoc.requestor
    log.info("association accepted", calling_aet=req.ae_title, peer=f"{req.address}:{req.port}")


def _handle_rejected(event: evt.Event, log: Any) -> None:
    req = event.assoc.requestor
    log.warning("association rejected", calling_aet=req.ae_title, peer=f"{req.address}:{req.port}")


def _handle_aborted(event: evt.Event, log: Any) -> None:
    req = event.assoc.requestor
    log.warning(
        "association aborted; instances already acknowledged are safe in the spool",
        calling_aet=req.ae_title,
        peer=f"{req.address}:{req.port}",
    )


def _handle_released(event: evt.Event, log: Any) -> None:
    log.info("association released", calling_aet=event.assoc.requestor.ae_title)


class StorageSCP:
    """A running Storage SCP (C-STORE for every storage class, C-ECHO)."""

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        deliver: Callable[[Received], None],
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.stats = ReceiverStats()
        self._deliver = deliver
        self._log = get_logger("scp", ae_title=settings.ae_title)
        self._server: Any = None

    def _make_ae(self) -> Any:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # Accept every storage class (spool all, process MR only) + Verification.
        for cx in [*AllStoragePresentationContexts, *VerificationPresentationContexts]:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = min(30.0, s.network_timeout_s)
        ae.dimse_timeout = s.network_timeout_s
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        return ae

    def start(self) -> None:
        """Bind and serve in background threads; returns once listening."""
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.spool, self._deliver, self.stats, self._log]),
            (evt.EVT_C_ECHO, handle_echo, [self._log]),
            (evt.EVT_ACCEPTED, _handle_accepted, [self.stats, self._log]),
            (evt.EVT_REJECTED, _handle_rejected, [self._log]),
            (evt.EVT_ABORTED, _handle_aborted, [self._log]),
            (evt.EVT_RELEASED, _handle_released, [self._log]),
        ]
        address = (self.settings.bind, self.settings.port)
        _TunedServer.tcp_quickack = self.settings.tcp_quickack
        try:
            server = ae.make_server(address, evt_handlers=handlers, server_class=_TunedServer)
        except OSError as exc:
            raise ReceiverError(
                f"cannot listen on {self.settings.bind}:{self.settings.port}: {exc.strerror}"
            ) from exc
        thread = threading.Thread(target=server.serve_forever, name="boldstream-scp", daemon=True)
        thread.start()
        ae._servers.append(server)
        self._server = server
        self._ae = ae
        self._log.info(
            "storage SCP listening",
            bind=self.settings.bind,
            port=self.port,
            spool=str(self.spool.root),
            allowed_calling_aets=list(self.settings.allowed_calling_aets) or "any",
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise ReceiverError("the SCP is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self._log.info("storage SCP stopped", **self.stats.snapshot())
