"""The receiver as one unit: spool + Storage SCP + ingest (thread or process).

Start order matters: the spool is opened, unclosed series are queued for
recovery, the ingest starts, and only then does the SCP listen, so an
instance that arrives during recovery is ordered after the recovered ones.
With ``receiver.ingest = "process"`` the ingest process lists its own
recovery before it reports ready, and assembles it before anything live.
"""

from __future__ import annotations

from collections.abc import Callable

from boldstream.config.settings import Settings
from boldstream.receiver.ingest import Emitted, Ingest
from boldstream.receiver.ingest_process import IngestProcess
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.spool import Spool

__all__ = ["Receiver"]


class Receiver:
    """Owns the receiver's threads; ``emit`` gets every assembled volume or gap."""

    def __init__(
        self,
        settings: Settings,
        emit: Callable[[Emitted], None],
        *,
        on_ingest_down: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = Spool(settings.receiver.spool_dir, fsync=settings.receiver.fsync)
        self.ingest: Ingest | IngestProcess
        if settings.receiver.ingest == "process":
            self.ingest = IngestProcess(settings, self.spool, emit, on_down=on_ingest_down)
        else:
            self.ingest = Ingest(settings, self.spool, emit)
        self.scp = StorageSCP(settings.receiver, self.spool, self.ingest.submit)

    def start(self) -> None:
        try:
            self.ingest.recover()
            self.ingest.start()
            self.scp.start()
        except BaseException:
            # Nothing outlives a failed start: the ingest thread or process, and
            # the process' shared memory.
            self.ingest.stop()
            raise

    @property
    def port(self) -> int:
        return self.scp.port

    def stop(self) -> None:
        """Stop listening, then drain what was accepted."""
        self.scp.stop()
        self.ingest.stop()

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
