"""A compact set of volume indices, for bookkeeping kept after a series ends.

The hub remembers which volumes of every series it has received, also after
the series has ended, so that a re-sent volume is told apart from a new one
that came too late. A Python ``set`` of 600 indices takes about 50 KB; the
same as bits takes 75 bytes, so a service that runs for months does not grow
by a set per series.
"""

from __future__ import annotations

__all__ = ["IndexSet"]

#: Indices at or above this go to a plain set: a corrupt InstanceNumber of two
#: billion must not allocate 250 MB of bits.
_BITS_LIMIT = 1 << 20


class IndexSet:
    """Integers, kept as bits when they are small and not negative."""

    __slots__ = ("_bits", "_count", "_others")

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0
        self._others: set[int] = set()

    def add(self, index: int) -> None:
        if not 0 <= index < _BITS_LIMIT:
            if index not in self._others:
                self._others.add(index)
                self._count += 1
            return
        byte, bit = divmod(index, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if not self._bits[byte] >> bit & 1:
            self._bits[byte] |= 1 << bit
            self._count += 1

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        if not 0 <= index < _BITS_LIMIT:
            return index in self._others
        byte, bit = divmod(index, 8)
        return byte < len(self._bits) and bool(self._bits[byte] >> bit & 1)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"IndexSet({self._count} indices)"
