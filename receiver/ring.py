"""Instance bytes handed to the ingest process through shared memory.

The receiver sends each instance to the ingest process while its durable
write runs. Through a ZeroMQ socket a 300 KB mosaic took 0.6 ms from the
send to the ingest process's thread having it (two I/O threads and a
loopback copy; docs/benchmarks.md, Receive). Instead, the handler copies the
bytes into this ring and sends only a notice (the instance's header and its
place in the ring) on the same socket, in the same order; the ingest process
copies the bytes out and gives the space back.

One writer (the receiver; its handler threads reserve and write under the
ingest's send lock, in the order the notices are sent) and one reader (the
ingest process's one thread, in notice order). Positions are byte counts
since the ring was made; an instance never wraps (the end of the ring is
skipped instead). The reader's position is a :func:`multiprocessing.Value`,
read and written under its lock (its ``value`` property takes it). A ring
belongs to one ingest process: a new one gets a new ring, so nothing a dead
one left half-read is ever reused.

The segment is reserved whole when it is made (``posix_fallocate``: a
/dev/shm too small for it is an error then, which sends every instance
through the socket, not a SIGBUS in the receiver at the first write past
the room there is) and its pages are mapped up front, on both sides: a
first touch costs a page fault per 4 KiB, 0.3 ms for a mosaic's 300 KB in
the handler's path before its durable write, for the first hundred
instances of every ingest process otherwise.

Nothing depends on the ring for safety: an instance that does not fit (the
ingest process far behind, or an instance bigger than a quarter of the ring)
is sent whole on the socket as before, and every instance is in the spool
before it may become part of a volume.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from multiprocessing import shared_memory
from typing import Any

__all__ = ["RING_BYTES", "Ring"]

#: Shared memory per ingest process (about a hundred 64x64x36 mosaics).
RING_BYTES = 32 * 1024 * 1024


class Ring:
    """A byte ring in shared memory; see the module docstring.

    :meth:`create` makes one (the receiver), :meth:`attach` opens it (the
    ingest process, with the ``name`` and ``read_to`` it was given).
    """

    def __init__(self, memory: shared_memory.SharedMemory, read_to: Any, *, owner: bool) -> None:
        self._memory = memory
        buf = memory.buf
        assert buf is not None  # None only after close()
        self._buf: memoryview = buf
        self.name = memory.name
        self.size = memory.size
        #: The reader's position (bytes consumed), shared.
        self.read_to = read_to
        self._owner = owner
        self._head = 0  # the writer's position (bytes reserved)
        self._before = 0  # the writer's position before the last put
        self._closed = False

    @classmethod
    def create(cls, size: int = RING_BYTES) -> Ring:
        """A new ring, its memory reserved and mapped; OSError when there is no room."""
        memory = shared_memory.SharedMemory(create=True, size=size)
        try:
            fd = getattr(memory, "_fd", -1)  # POSIX: the segment's descriptor
            if fd >= 0 and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, memory.size)
            read_to = multiprocessing.get_context("spawn").Value("Q", 0)
        except BaseException:
            memory.close()
            memory.unlink()
            raise
        ring = cls(memory, read_to, owner=True)
        zeros = bytes(min(ring.size, 1 << 20))
        for start in range(0, ring.size, len(zeros)):  # map every page now
            end = min(start + len(zeros), ring.size)
            ring._buf[start:end] = zeros[: end - start]
        return ring

    @classmethod
    def attach(cls, name: str, read_to: Any) -> Ring:
        ring = cls(shared_memory.SharedMemory(name=name), read_to, owner=False)
        bytes(ring._buf[:: mmap.PAGESIZE])  # map every page now: a byte of each
        return ring

    # -- the writer ------------------------------------------------------------
    def put(self, data: bytes) -> tuple[int, int] | None:
        """Copy ``data`` in; its (position, length), or None when it does not fit now.

        The caller sends the notice next; if that fails, :meth:`take_back`.
        """
        n = len(data)
        if n > self.size // 4:
            return None
        start = self._head
        offset = start % self.size
        if offset + n > self.size:
            start += self.size - offset  # never wrap inside an instance
            offset = 0
        if start + n - self.read_to.value > self.size:  # .value takes the Value's lock
            return None
        self._buf[offset : offset + n] = data
        self._before, self._head = self._head, start + n
        return start, n

    def take_back(self) -> None:
        """Undo the last :meth:`put` (its notice could not be sent)."""
        self._head = self._before

    # -- the reader ------------------------------------------------------------
    def get(self, start: int, n: int) -> bytes:
        """A copy of the bytes at ``start``; their space goes back to the writer."""
        offset = start % self.size
        data = bytes(self._buf[offset : offset + n])
        self.read_to.value = start + n
        return data

    def close(self) -> None:
        """Unmap; the owner also removes the shared memory. Once is enough."""
        if self._closed:
            return
        self._closed = True
        del self._buf
        self._memory.close()
        if self._owner:
            self._memory.unlink()
