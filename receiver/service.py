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
from boldstream.logs import get_logger
from boldstream.receiver.ingest import Emitted, Ingest
from boldstream.receiver.ingest_process import IngestProcess
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.spool import Spool

__all__ = ["Receiver"]


class Receiver:
    """Owns the receiver's threads; ``emit`` gets every assembled volume or gap.

    ``on_ingest_down`` and ``on_refused`` get sentences for the technician:
    the ingest process gave up, the spool refuses instances.
    """

    def __init__(
        self,
        settings: Settings,
        emit: Callable[[Emitted], None],
        *,
        on_ingest_down: Callable[[str], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = Spool(
            settings.receiver.spool_dir,
            fsync=settings.receiver.fsync,
            min_free_mb=settings.receiver.min_free_mb,
        )
        self.ingest: Ingest | IngestProcess
        if settings.receiver.ingest == "process":
            self.ingest = IngestProcess(settings, self.spool, emit, on_down=on_ingest_down)
        else:
            self.ingest = Ingest(settings, self.spool, emit)
        self.scp = StorageSCP(
            settings.receiver, self.spool, self.ingest.submit, on_refused=on_refused
        )

    def start(self) -> None:
        spool = self.spool
        free = spool.free_bytes()
        if free < spool.min_free_bytes:
            get_logger("receiver").error(
                "spool below its free-space floor: every instance will be refused (0xA700) "
                "until there is room",
                spool=str(spool.root),
                free_mb=round(free / 2**20, 1),
                min_free_mb=self.settings.receiver.min_free_mb,
            )
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
