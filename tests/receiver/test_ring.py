"""The shared-memory ring that carries instance bytes to the ingest process."""

from __future__ import annotations

import errno
import multiprocessing
import os
import sys
from multiprocessing import shared_memory
from typing import Any

import pytest

from boldstream.receiver.ring import Ring


def _reader_in_a_child(name: str, read_to: object, place: tuple[int, int], out: object) -> None:
    ring = Ring.attach(name, read_to)
    try:
        out.put(ring.get(*place))  # type: ignore[attr-defined]
    finally:
        ring.close()


def test_bytes_put_in_one_process_are_read_in_another() -> None:
    ring = Ring.create(1 << 16)
    try:
        place = ring.put(b"mosaic bytes")
        assert place == (0, 12)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_reader_in_a_child, args=(ring.name, ring.read_to, place, out))
        child.start()
        assert out.get(timeout=30) == b"mosaic bytes"
        child.join(30)
        assert child.exitcode == 0
        assert ring.read_to.value == 12  # the space is back
    finally:
        ring.close()


def test_a_full_ring_refuses_until_the_reader_gives_space_back() -> None:
    ring = Ring.create(1 << 12)  # 4 KiB: instances up to 1 KiB
    try:
        places = [ring.put(bytes([k]) * 1000) for k in range(4)]
        assert [p for p in places if p is not None] == [(k * 1000, 1000) for k in range(4)]
        assert ring.put(b"x" * 1000) is None  # 5,000 bytes would not fit in 4,096
        assert ring.get(0, 1000) == bytes([0]) * 1000
        # The next one does not fit before the end (4,000 + 1,000 > 4,096): it
        # starts at the ring's beginning instead of wrapping.
        assert ring.put(b"y" * 1000) == (4096, 1000)
        assert ring.get(1000, 1000) == bytes([1]) * 1000
        assert ring.get(4096, 1000) == b"y" * 1000
    finally:
        ring.close()


def test_too_big_an_instance_is_not_put_and_a_put_can_be_taken_back() -> None:
    ring = Ring.create(1 << 12)
    try:
        assert ring.put(b"z" * 1025) is None  # more than a quarter of the ring
        assert ring.put(b"a" * 100) == (0, 100)
        ring.take_back()  # its notice could not be sent
        assert ring.put(b"b" * 100) == (0, 100)
        assert ring.get(0, 100) == b"b" * 100
    finally:
        ring.close()


def test_the_owner_removes_the_shared_memory_once() -> None:
    ring = Ring.create(1 << 12)
    reader = Ring.attach(ring.name, ring.read_to)  # there while the owner has it
    reader.close()
    ring.close()
    ring.close()
    with pytest.raises(FileNotFoundError):
        Ring.attach(ring.name, ring.read_to)


def _resident_kib(name: str) -> list[int]:
    """Rss of each of this process's mappings of the segment ``name`` (KiB)."""
    sizes, inside = [], False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) >= 6 and head[5].endswith("/" + name.lstrip("/"))
            elif inside and head[0] == "Rss:":
                sizes.append(int(head[1]))
    return sizes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_memory_is_reserved_and_mapped_when_the_ring_is_made() -> None:
    size = 4 << 20
    ring = Ring.create(size)
    try:
        # Both sides' pages are in place before the first instance: no page
        # fault in the handler's path, and no SIGBUS later for want of room.
        assert _resident_kib(ring.name) == [size // 1024]
        reader = Ring.attach(ring.name, ring.read_to)
        try:
            assert _resident_kib(ring.name) == [size // 1024, size // 1024]
            assert os.stat(f"/dev/shm/{ring.name.lstrip('/')}").st_blocks * 512 >= size
        finally:
            reader.close()
    finally:
        ring.close()


def test_no_room_for_the_ring_is_an_error_that_leaves_no_segment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []
    real = shared_memory.SharedMemory

    def tracked(*args: Any, **kwargs: Any) -> shared_memory.SharedMemory:
        memory = real(*args, **kwargs)
        made.append(memory.name)
        return memory

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_memory, "SharedMemory", tracked)
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        Ring.create(1 << 16)
    assert len(made) == 1
    with pytest.raises(FileNotFoundError):
        real(name=made[0])
