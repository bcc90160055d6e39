"""DICOM over TLS with DCMTK's storescu/echoscu (+tls) as the peer.

A throw-away CA, server and client certificates are made in the test with
``cryptography``. With ``tls_ca`` set the receiver requires a client
certificate signed by that CA (mutual TLS); without it, any TLS client may
connect. Plain DICOM on a TLS port is dropped after a failed handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from peers import require_tool
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.errors import ConfigError, ReceiverError
from boldstream.receiver.scp import Received, StorageSCP
from boldstream.receiver.spool import Spool

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from our CA
    stranger_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    folder: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_cert = _cert("boldstream test CA", ca_key, "boldstream test CA", ca_key, ca=True)
    ca, _ = _write(folder, "ca", ca_cert, ca_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _write(
        folder, "server", _cert("boldstream", server_key, "boldstream test CA", ca_key), server_key
    )
    client = _write(
        folder, "client", _cert("MRC40123", client_key, "boldstream test CA", ca_key), client_key
    )
    stranger = _write(
        folder, "stranger", _cert("stranger", stranger_key, "stranger", stranger_key), stranger_key
    )
    return Pki(ca, *server, *client, *stranger)


@contextmanager
def running(
    tmp_path: Path, pki: Pki, *, client_certs: bool
) -> Iterator[tuple[StorageSCP, list[Received]]]:
    receiver: dict[str, Any] = {
        "port": 0,
        "spool_dir": str(tmp_path / "spool"),
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
    }
    if client_certs:
        receiver["tls_ca"] = str(pki.ca)
    settings = load_settings(overrides=[{"receiver": receiver}], environ={})
    received: list[Received] = []
    scp = StorageSCP(settings.receiver, Spool(settings.receiver.spool_dir), received.append)
    scp.start()
    try:
        yield scp, received
    finally:
        scp.stop()


def dcmtk(tool: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """A DCMTK tool against our port; ``args`` hold the TLS options and files."""
    return subprocess.run(
        [
            require_tool(tool),
            "-aet",
            "MRC40123",
            "-aec",
            "BOLDSTREAM",
            *args,
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def with_client_cert(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    cert, key = cert or pki.client_cert, key or pki.client_key
    return ["+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca)]


def test_storescu_over_mutual_tls(tmp_path: Path, pki: Pki, pydicom_data: Path) -> None:
    src = pydicom_data / "MR_small.dcm"
    with capture_logs() as logs, running(tmp_path, pki, client_certs=True) as (scp, got):
        out = subprocess.run(
            [
                require_tool("storescu"),
                "-aet",
                "MRC40123",
                "-aec",
                "BOLDSTREAM",
                *with_client_cert(pki),
                "127.0.0.1",
                str(scp.port),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(got) == 1 and got[0].path.exists()
        (line,) = [e for e in logs if e["event"] == "TLS connection"]
        assert line["client_certificate"] == "MRC40123"


def test_client_without_a_trusted_certificate_is_dropped(tmp_path: Path, pki: Pki) -> None:
    with capture_logs() as logs, running(tmp_path, pki, client_certs=True) as (scp, _):
        # No certificate at all (anonymous TLS), then one our CA did not sign.
        assert dcmtk("echoscu", scp.port, "+tla", "+cf", str(pki.ca)).returncode != 0
        stranger = with_client_cert(pki, pki.stranger_cert, pki.stranger_key)
        assert dcmtk("echoscu", scp.port, *stranger).returncode != 0
        dropped = [e for e in logs if e["event"] == "connection dropped: TLS handshake failed"]
        assert len(dropped) == 2
        assert all(e["peer"].startswith("127.0.0.1:") for e in dropped)
        assert dcmtk("echoscu", scp.port, *with_client_cert(pki)).returncode == 0


def test_a_stalled_handshake_does_not_block_others(tmp_path: Path, pki: Pki) -> None:
    with (
        running(tmp_path, pki, client_certs=True) as (scp, _),
        socket.create_connection(("127.0.0.1", scp.port), timeout=5),
    ):
        # Connected, silent: its handshake waits on its own thread.
        assert dcmtk("echoscu", scp.port, *with_client_cert(pki)).returncode == 0


def test_plain_dicom_on_a_tls_port_is_dropped(tmp_path: Path, pki: Pki) -> None:
    with capture_logs() as logs, running(tmp_path, pki, client_certs=False) as (scp, _):
        assert dcmtk("echoscu", scp.port).returncode != 0
        assert [e for e in logs if e["event"] == "connection dropped: TLS handshake failed"]
        # Without tls_ca a client needs no certificate, only to trust ours.
        assert dcmtk("echoscu", scp.port, "+tla", "+cf", str(pki.ca)).returncode == 0


def test_receiver_certificate_is_checked_by_the_client(tmp_path: Path, pki: Pki) -> None:
    with running(tmp_path, pki, client_certs=False) as (scp, _):
        # A client that trusts only another CA refuses our certificate.
        out = dcmtk("echoscu", scp.port, "+tla", "+cf", str(pki.stranger_cert))
        assert out.returncode != 0


def test_tls_settings_go_together(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be set together"):
        load_settings(overrides=[{"receiver": {"tls_cert": str(pki.server_cert)}}], environ={})
    with pytest.raises(ConfigError, match="tls_ca"):
        load_settings(overrides=[{"receiver": {"tls_ca": str(pki.ca)}}], environ={})


def test_unreadable_certificate_stops_the_start(tmp_path: Path, pki: Pki) -> None:
    settings = load_settings(
        overrides=[
            {
                "receiver": {
                    "port": 0,
                    "spool_dir": str(tmp_path / "spool"),
                    "tls_cert": str(tmp_path / "absent.crt"),
                    "tls_key": str(pki.server_key),
                }
            }
        ],
        environ={},
    )
    scp = StorageSCP(settings.receiver, Spool(settings.receiver.spool_dir), lambda _: None)
    with pytest.raises(ReceiverError, match=r"receiver\.tls_cert/tls_key: cannot load"):
        scp.start()
