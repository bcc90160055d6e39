"""CurveZMQ for the result streams: key files, server and client sockets.

When the result publisher (``pipeline.pub``) and the snapshot endpoint are
reachable from other machines, they run as CURVE servers: traffic is
encrypted, and a subscriber must know the server's public key to connect at
all. With an allow-list of client public keys (``pipeline.curve_authorized_keys``)
only those clients are let in; the check runs in a ZAP handler
(:class:`zmq.auth.thread.ThreadAuthenticator`) on the server's context.

Key files use ZeroMQ's certificate format (what :func:`zmq.auth.load_certificate`
reads and ``zmq.auth.create_certificates`` writes): ``NAME.key`` holds the
public key and may be copied anywhere; ``NAME.key_secret`` holds both keys and
must stay with its owner. :func:`write_keypair` writes both with mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator

from boldstream.errors import ConfigError

__all__ = [
    "CurveClient",
    "CurveServer",
    "load_public_key",
    "load_secret_key",
    "write_keypair",
]


def _read(path: Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {str(path)!r}: not a readable ZeroMQ key file ({exc})") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise ConfigError(f"{what} {str(path)!r}: a key must be 40 Z85 characters")
    return public, secret


def load_public_key(path: str | os.PathLike[str], *, what: str = "public key") -> bytes:
    """The Z85 public key in ``path`` (a ``.key`` or ``.key_secret`` file)."""
    return _read(Path(path), what)[0]


def load_secret_key(
    path: str | os.PathLike[str], *, what: str = "secret key"
) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; :class:`ConfigError` if it has no secret."""
    public, secret = _read(Path(path), what)
    if secret is None:
        raise ConfigError(
            f"{what} {str(path)!r} holds only a public key; give the .key_secret file"
        )
    return public, secret


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # whatever the umask did


def write_keypair(folder: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Generate a CURVE key pair as ``folder/name.key`` and ``folder/name.key_secret``.

    Both files get mode 0600; existing files are never overwritten
    (:class:`ConfigError`). Returns (public file, secret file).
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: a plain file name is needed")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = root / f"{name}.key", root / f"{name}.key_secret"
    for f in (public_file, secret_file):
        if f.exists():
            raise ConfigError(f"{str(f)!r} exists; remove it first or choose another name")
    public, secret = zmq.curve_keypair()
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    head = f"#   ****  Generated on {stamp} by boldstream keys  ****\n"
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    _write(public_file, head + "#   ZeroMQ CURVE Public Certificate\n\n" + body)
    _write(
        secret_file,
        head
        + "#   ZeroMQ CURVE **Secret** Certificate\n#   DO NOT PROVIDE THIS FILE TO OTHER USERS\n\n"
        + body
        + f'    secret-key = "{secret.decode()}"\n',
    )
    return public_file, secret_file


@dataclass(frozen=True)
class CurveClient:
    """What a subscriber needs: the server's public key and a key pair of its own.

    :meth:`from_files` with no client key file generates a throw-away pair
    (enough when the server lets any client in that knows its key).
    """

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(
        cls,
        server_key: str | os.PathLike[str],
        client_key: str | os.PathLike[str] | None = None,
    ) -> CurveClient:
        server_public = load_public_key(server_key, what="server key")
        if client_key is None:
            public, secret = zmq.curve_keypair()
        else:
            public, secret = load_secret_key(client_key, what="client key")
        return cls(server_public, public, secret)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE client; call before ``connect``."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


class CurveServer:
    """The server side: its key pair and, optionally, the clients allowed in.

    ``authorized`` is a folder of client ``.key`` files (or None: any client
    that knows the server's public key). :meth:`start` installs the ZAP
    handler on ``context`` when there is an allow-list; :meth:`apply` makes a
    socket a CURVE server (before ``bind``); :meth:`stop` ends the handler.
    """

    def __init__(
        self,
        secret_key: str | os.PathLike[str],
        *,
        authorized: str | os.PathLike[str] | None = None,
        what: str = "pipeline.curve_secret_key",
    ) -> None:
        self.public, self.secret = load_secret_key(secret_key, what=what)
        self.authorized: frozenset[bytes] | None = None
        if authorized is not None:
            folder = Path(authorized)
            if not folder.is_dir():
                raise ConfigError(f"pipeline.curve_authorized_keys {str(folder)!r}: not a folder")
            keys = {
                load_public_key(f, what="client key")
                for f in sorted(folder.iterdir())
                if f.suffix == ".key" and f.is_file()
            }
            # The server's own key pair may be used by in-process clients (the dashboard).
            self.authorized = frozenset(keys | {self.public})
        self._auth: ThreadAuthenticator | None = None

    def client(self) -> CurveClient:
        """A client key set for subscribers in the same process (uses the server's pair)."""
        return CurveClient(self.public, self.public, self.secret)

    def start(self, context: zmq.Context[Any]) -> None:
        if self.authorized is None or self._auth is not None:
            return
        auth = ThreadAuthenticator(context)
        try:
            auth.start()
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"pipeline.curve_authorized_keys: cannot start the key check ({exc})"
            ) from exc
        auth.configure_curve_callback("*", credentials_provider=self)
        self._auth = auth

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is the client's (Z85) public key on the allow-list."""
        return self.authorized is None or key in self.authorized

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE server; call before ``bind``."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
