"""The hub's compact set of volume indices."""

from __future__ import annotations

import sys

from boldstream.pipeline.indices import IndexSet


def test_index_set_is_a_set_of_ints() -> None:
    seen = IndexSet()
    for index in [0, 7, 8, 599, 7, 0, 2_000_000_000, -1, -1]:
        seen.add(index)
    assert len(seen) == 6
    for index in (0, 7, 8, 599, 2_000_000_000, -1):
        assert index in seen
    for index in (1, 6, 9, 598, 600, 10_000, 2_000_000_001, -2):
        assert index not in seen
    assert "7" not in seen and None not in seen


def test_six_hundred_indices_take_bytes_not_kilobytes() -> None:
    seen, plain = IndexSet(), set()
    for index in range(600):
        seen.add(index)
        plain.add(index)
    assert len(seen) == 600 and all(i in seen for i in range(600))
    # Bits grow by doubling: at most 2 x 75 bytes, against ~32 KB for the set's table alone.
    assert len(seen._bits) <= 150
    assert sys.getsizeof(plain) > 100 * len(seen._bits)


def test_a_corrupt_huge_index_does_not_allocate_its_bits() -> None:
    seen = IndexSet()
    seen.add(2**31 - 1)
    assert len(seen._bits) == 0 and 2**31 - 1 in seen
