"""The DICOM Storage SCP: validate, write durably, enqueue, answer.

Handlers are plain functions bound with their collaborators (pynetdicom's
``apps/storescp`` shape). A C-STORE handler does no analysis: it checks that
the instance can be understood, hands it to the ingest with an unresolved
:class:`Durability`, writes it to the spool (fsync'd), and resolves the
token; only then does the scanner get 0x0000. The ingest decodes while the
write is under way (the fsync waits on the disk, not on Python) and learns
the write's outcome from the token: the ingest thread (``receiver.ingest =
"thread"``) directly, the ingest process (the default) as a verdict message
sent after the instance. By default (``receiver.assemble = "on_arrival"``) the
instance joins its volume as soon as it is decoded, and a negative verdict
is only logged; with ``"after_write"`` it joins only after a positive
verdict, so no volume is made of anything the scanner was not told is safe.
A write the spool refuses is also told to the technician
(:class:`~boldstream.receiver.refusals.RefusalReport`).

Status codes returned (PS3.4 Annex B.2.3):

- 0x0000 success (also for a duplicate: it is stored already);
- 0xA700 refused, out of resources (spool full or unwritable: the scanner
  keeps the instance and may retry);
- 0xC210 cannot understand (undecodable dataset, bad or missing UIDs,
  native Pixel Data whose length disagrees with Rows x Columns x frames).

Who may connect: ``receiver.allowed_addresses`` is checked when a connection
is accepted, ``receiver.allowed_calling_aets`` at association; a connection
whose first bytes are not an association request is dropped before
pynetdicom sees it; with ``tls_cert``/``tls_key`` the port speaks TLS only
(client certificates required when ``tls_ca`` is set).

TCP: the accepted socket gets TCP_NODELAY, and TCP_QUICKACK is re-armed after
every read (Linux clears it after each ACK, which is why setting it once on
accept does nothing). See docs/scanner-setup.md for the sender side.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydicom import dcmread
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
from boldstream.receiver.association import PromptRequestHandler, SharedContexts
from boldstream.receiver.dimse import arrived
from boldstream.receiver.header import header_from_dataset, pixel_data_problem, scan_header
from boldstream.receiver.part10 import part10_bytes
from boldstream.receiver.refusals import RefusalReport
from boldstream.receiver.spool import Spool, SpoolFullError, check_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "Durability",
    "Received",
    "ReceiverStats",
    "StorageSCP",
    "make_tls_context",
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Durability:
    """Whether a handed-over instance is new and safely in the spool.

    The handler resolves it once the durable write has returned (True) or
    failed, or the spool already held the instance (False). With
    ``receiver.assemble = "after_write"`` the ingest waits for it before the
    instance may become part of a volume; by default (``"on_arrival"``) it
    only logs a False.
    """

    __slots__ = ("_done", "_lock", "_stored", "_then")

    def __init__(self, stored: bool | None = None) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._stored = False
        self._then: Callable[[bool], None] | None = None
        if stored is not None:
            self.resolve(stored)

    def resolve(self, stored: bool) -> None:
        with self._lock:
            self._stored = stored
            self._done.set()
            then, self._then = self._then, None
        if then is not None:
            then(stored)

    def when_resolved(self, then: Callable[[bool], None]) -> bool:
        """Call ``then(stored)`` in the resolving thread; False if already resolved.

        For one consumer (the ingest process, which sends the child the
        verdict from here with ``receiver.assemble = "after_write"``; either
        ingest assembling on arrival, which logs a write that failed).
        Registering races no resolve: the check and the registration are one
        step under the lock resolve takes.
        """
        with self._lock:
            if self._done.is_set():
                return False
            self._then = then
            return True

    def wait(self, timeout: float | None = None) -> bool | None:
        """True: in the spool and new; False: not to be assembled; None: timed out."""
        if not self._done.wait(timeout):
            return None
        return self._stored


@dataclass(frozen=True)
class Received:
    """One accepted instance on its way to assembly.

    ``durable`` says when it is safely in the spool (already resolved for
    instances re-read from the spool). The handler never decodes the dataset
    (it reads what it checks with :func:`scan_header`); :attr:`dataset`
    parses ``encoded`` on first use, on the ingest's thread, unless a
    decoded one was given as ``decoded``.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    #: time.time() when the C-STORE had fully arrived: pynetdicom's network
    #: thread had read its last fragment (direct.DirectDUL, or
    #: dimse.ArrivalQueue on pynetdicom's path), not when the handler started.
    received: float
    calling_aet: str = ""
    #: True when re-read from the spool after a restart.
    recovered: bool = False
    durable: Durability = field(default_factory=lambda: Durability(stored=True))
    #: The instance as written to the spool, a Part 10 file (what the ingest
    #: process is sent).
    encoded: bytes = b""
    decoded: Dataset | None = field(default=None, repr=False)

    @cached_property
    def dataset(self) -> Dataset:
        """The decoded instance (raises what pydicom raises on a corrupt one)."""
        if self.decoded is not None:
            return self.decoded
        return dcmread(io.BytesIO(self.encoded))


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
    """pynetdicom's threaded server, with checks before pynetdicom sees a peer.

    - In the accept thread (no I/O, so nothing can stall accepting): the peer
      address is checked against ``allowed_networks``.
    - In the connection's own thread, bounded by ``handshake_timeout_s``: the
      TLS handshake, or for plain TCP a peek at the first eight bytes, which
      must be an A-ASSOCIATE-RQ PDU header. Anything else is dropped at once
      with one log line, instead of pynetdicom answering every garbage byte
      with an A-ABORT and holding the socket until its ARTIM timer expires.
    - Plain TCP sockets get TCP_NODELAY and re-armed TCP_QUICKACK.

    The attributes are set per instance by :class:`StorageSCP` before serving.
    """

    tcp_quickack: bool = True
    direct_store: bool = False
    reactor_poll_s: float | None = None
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    handshake_timeout_s: float = 30.0
    log: Any = None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            if self.tcp_quickack:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The handshake runs later, in the connection's thread, with a timeout.
            wrapped = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
            return wrapped, address
        if not self.tcp_quickack:
            return client, address
        timeout = client.gettimeout()
        tuned = _QuickAckSocket(client.family, client.type, client.proto, fileno=client.detach())
        tuned.settimeout(timeout)
        tuned.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None:
            tuned.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return tuned, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks or _address_allowed(client_address[0], self.allowed_networks):
            return True
        self.log.warning(
            "connection refused: peer address not in receiver.allowed_addresses",
            peer=_peer(client_address),
        )
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if not self._admit(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _admit(self, sock: socket.socket, client_address: Any) -> bool:
        """TLS handshake or a look at the first PDU header; False drops the peer."""
        peer = _peer(client_address)
        timeout = sock.gettimeout()
        sock.settimeout(self.handshake_timeout_s)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
                subject = _subject(sock.getpeercert())
                self.log.info("TLS connection", peer=peer, client_certificate=subject or "none")
                return True
            head = sock.recv(8, socket.MSG_PEEK | socket.MSG_WAITALL)
        except ssl.SSLError as exc:
            self.log.warning(
                "connection dropped: TLS handshake failed",
                peer=peer,
                reason=exc.reason or str(exc),
            )
            return False
        except OSError as exc:  # includes the timeout
            self.log.warning(
                "connection dropped: no association request",
                peer=peer,
                reason=str(exc) or type(exc).__name__,
            )
            return False
        finally:
            if sock.fileno() != -1:
                sock.settimeout(timeout)
        if not head:
            self.log.info("connection closed by the peer before an association request", peer=peer)
            return False
        problem = _association_request_problem(head)
        if problem is not None:
            self.log.warning(
                "connection dropped: not a DICOM association request",
                peer=peer,
                reason=problem,
                first_bytes=head.hex(),
            )
            return False
        return True


def _peer(client_address: Any) -> str:
    return f"{client_address[0]}:{client_address[1]}"


def _subject(cert: Any) -> str:
    """The commonName of a peer certificate (from ``getpeercert()``), or ''."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _address_allowed(
    host: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


def _association_request_problem(head: bytes) -> str | None:
    """Why eight bytes cannot start an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), or None."""
    if head[0] != 0x01:
        return f"PDU type 0x{head[0]:02X} where an association request (0x01) must come first"
    if len(head) < 8:
        return f"connection closed after {len(head)} bytes of an association request"
    length = int.from_bytes(head[2:6], "big")
    if length < 68:
        return f"association request of {length} bytes is shorter than its fixed part (68)"
    if not int.from_bytes(head[6:8], "big") & 1:
        return "association request without protocol version 1"
    return None


def _duplicate(stats: ReceiverStats, log: Any, sop_uid: str, series: str) -> int:
    """Answer an instance the spool already holds: success, stored once."""
    stats.add(duplicates=1)
    log.info("duplicate instance ignored (already stored)", sop=sop_uid, series=series)
    return STATUS_SUCCESS


def handle_store(
    event: evt.Event,
    spool: Spool,
    deliver: Callable[[Received], None],
    stats: ReceiverStats,
    log: Any,
    refusals: RefusalReport | None = None,
) -> int:
    """EVT_C_STORE: validate, write durably, enqueue, answer.

    A write the spool refuses is answered 0xA700 and, through ``refusals``,
    told to the technician.
    """
    request = event.request
    # When its last fragment was read (the network thread's stamp), else now.
    received = arrived(request) or time.time()
    calling = event.assoc.requestor.ae_title
    sop_uid = str(getattr(request, "AffectedSOPInstanceUID", "") or "")
    sop_class = str(getattr(request, "AffectedSOPClassUID", "") or "")
    try:
        transfer = str(event.context.transfer_syntax)
        dataset = event.encoded_dataset(include_meta=False)
        header = scan_header(dataset, transfer)
        if header is None:  # not a stream the fast path reads: pydicom decides
            header = header_from_dataset(event.dataset, transfer)
        sop_uid = check_uid(sop_uid or header.sop_instance_uid, "SOPInstanceUID")
        study = check_uid(header.study_uid, "StudyInstanceUID")
        series = check_uid(header.series_uid, "SeriesInstanceUID")
        final = spool.path_for(study, series, sop_uid)
        if final.exists():  # resent after it was stored: not decoded again
            return _duplicate(stats, log, sop_uid, series)
        if not header.has_pixel_data and sop_class.startswith("1.2.840.10008.5.1.4.1.1.4"):
            raise DicomInputError("MR image without Pixel Data: truncated or not an image")
        problem = pixel_data_problem(header)
        if problem is not None:
            raise DicomInputError(problem)
        encoded = part10_bytes(
            dataset, sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=transfer
        )
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
    # An ingest thread starts decoding while the spool write below runs.
    durable = Durability()
    deliver(
        Received(
            path=final,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            received=received,
            calling_aet=calling,
            durable=durable,
            encoded=encoded,
        )
    )
    stored = None
    try:
        stored = spool.store(study, series, sop_uid, encoded)
    except SpoolFullError as exc:
        stats.add(out_of_resources=1)
        log.error("instance refused: spool full", status="0xA700", reason=str(exc), sop=sop_uid)
        if refusals is not None:
            refusals.refused(str(exc))  # names the spool, not the instance
        return STATUS_OUT_OF_RESOURCES
    except ReceiverError as exc:
        stats.add(out_of_resources=1)
        log.error(
            "instance refused: spool write failed", status="0xA700", reason=str(exc), sop=sop_uid
        )
        if refusals is not None:
            # The exception names the file (its UIDs); the technician gets the cause.
            cause = exc.__cause__
            why = cause.strerror if isinstance(cause, OSError) else None
            refusals.refused(f"cannot write to the spool ({why or 'the log has why'})")
        return STATUS_OUT_OF_RESOURCES
    finally:
        durable.resolve(stored is not None and not stored.duplicate)
    if stored.duplicate:  # another copy got there first
        return _duplicate(stats, log, sop_uid, series)
    stats.add(accepted=1, bytes=len(encoded))
    return STATUS_SUCCESS


def handle_echo(event: evt.Event, log: Any) -> int:
    log.info("C-ECHO", calling_aet=event.assoc.requestor.ae_title)
    return STATUS_SUCCESS


def _handle_accepted(event: evt.Event, stats: ReceiverStats, log: Any) -> None:
    stats.add(associations=1)
    req = event.assoc.requestor
    log.info("association accepted", calling_aet=req.ae_title, peer=f"{req.address}:{req.port}")


def _handle_rejected(event: evt.Event, allowed_aets: tuple[str, ...], log: Any) -> None:
    req = event.assoc.requestor
    title = str(req.ae_title).strip()
    if allowed_aets and title not in allowed_aets:
        reason = f"calling AE title {title!r} is not in receiver.allowed_calling_aets"
    else:
        reason = "association request refused"
    log.warning(
        "association rejected",
        reason=reason,
        calling_aet=title,
        peer=f"{req.address}:{req.port}",
    )


def _handle_aborted(event: evt.Event, log: Any) -> None:
    req = event.assoc.requestor
    log.warning(
        "association aborted; instances already acknowledged are safe in the spool",
        calling_aet=req.ae_title,
        peer=f"{req.address}:{req.port}",
    )


def _handle_released(event: evt.Event, log: Any) -> None:
    log.info("association released", calling_aet=event.assoc.requestor.ae_title)


def make_tls_context(settings: ReceiverSettings) -> ssl.SSLContext | None:
    """The server TLS context from ``tls_cert``/``tls_key``/``tls_ca``; None when off.

    TLS 1.2 or later. With ``tls_ca`` set, a client must present a
    certificate signed by that authority (mutual TLS, DICOM PS3.15 B.1).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ReceiverError(
            f"receiver.tls_cert/tls_key: cannot load {settings.tls_cert} with key "
            f"{settings.tls_key}: {exc}"
        ) from exc
    if settings.tls_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ReceiverError(f"receiver.tls_ca: cannot load {settings.tls_ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StorageSCP:
    """A running Storage SCP (C-STORE for every storage class, C-ECHO).

    ``deliver`` gets every instance worth decoding as its write starts;
    ``on_refused`` gets a sentence for the technician when the spool refuses
    instances (see :class:`RefusalReport`).
    """

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        deliver: Callable[[Received], None],
        *,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.stats = ReceiverStats()
        self._deliver = deliver
        #: Instances the spool refused, told to ``on_refused`` (throttled).
        self.refusals = RefusalReport(on_refused, assemble=settings.assemble)
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
            (
                evt.EVT_C_STORE,
                handle_store,
                [self.spool, self._deliver, self.stats, self._log, self.refusals],
            ),
            (evt.EVT_C_ECHO, handle_echo, [self._log]),
            (
                evt.EVT_ACCEPTED,
                _handle_accepted,
                [self.stats, self._log],
            ),
            (evt.EVT_REJECTED, _handle_rejected, [self.settings.allowed_calling_aets, self._log]),
            (evt.EVT_ABORTED, _handle_aborted, [self._log]),
            (evt.EVT_RELEASED, _handle_released, [self._log]),
        ]
        address = (self.settings.bind, self.settings.port)
        tls = make_tls_context(self.settings)
        try:
            server = ae.make_server(
                address,
                evt_handlers=handlers,
                server_class=_TunedServer,
                ssl_context=tls,
                request_handler=PromptRequestHandler,
            )
        except OSError as exc:
            raise ReceiverError(
                f"cannot listen on {self.settings.bind}:{self.settings.port}: {exc.strerror}"
            ) from exc
        # Set before serve_forever starts, per server (not on the class).
        server.contexts = SharedContexts(server.contexts)
        server.tcp_quickack = self.settings.tcp_quickack
        server.direct_store = self.settings.direct_store
        # pynetdicom's network loop sleeps this long whenever it finds nothing to
        # do; its 1 ms default caps a per-slice series at a few hundred
        # instances/s and adds milliseconds to every association's set-up.
        server.reactor_poll_s = self.settings.reactor_poll_ms / 1000.0
        server.allowed_networks = tuple(
            ipaddress.ip_network(a, strict=False) for a in self.settings.allowed_addresses
        )
        server.handshake_timeout_s = ae.acse_timeout
        server.log = self._log
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
            allowed_addresses=list(self.settings.allowed_addresses) or "any",
            tls="off"
            if tls is None
            else ("client certificate required" if self.settings.tls_ca else "on"),
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise ReceiverError("the SCP is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self.refusals.close()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self._log.info("storage SCP stopped", **self.stats.snapshot())
