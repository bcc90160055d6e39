"""The shared-memory ring that carries instance bytes to the ingest process."""

from __future__ import annotations

import multiprocessing

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
