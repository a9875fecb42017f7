"""A fixed-size bit set over chunk numbers, stored as a ``bytearray`` (LSB first within a byte).

One bit per chunk keeps a 1 TiB volume's map at 2 MiB with 64 KiB chunks; ranges are set and cleared
a byte at a time through slice assignment, so whole-volume operations stay fast in Python.
"""

from __future__ import annotations

from collections.abc import Iterator

from umbra.volume.extents import Extent, bitmap_runs


class Bitmap:
    __slots__ = ("bits", "nbits")

    def __init__(self, nbits: int, fill: bool = False, bits: bytes | bytearray | None = None) -> None:
        self.nbits = nbits
        nbytes = (nbits + 7) // 8
        if bits is not None:
            if len(bits) != nbytes:
                raise ValueError(f"bitmap of {nbits} bits needs {nbytes} bytes, got {len(bits)}")
            self.bits = bytearray(bits)
        else:
            self.bits = bytearray(b"\xff" * nbytes if fill else nbytes)
        if fill:
            self._trim_tail()

    def _trim_tail(self) -> None:
        extra = len(self.bits) * 8 - self.nbits
        if extra:
            self.bits[-1] &= 0xFF >> extra

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def set_range(self, start: int, end: int) -> None:
        self._range(start, min(end, self.nbits), True)

    def clear_range(self, start: int, end: int) -> None:
        self._range(start, min(end, self.nbits), False)

    def _range(self, start: int, end: int, value: bool) -> None:
        if start >= end:
            return
        head_end = min(end, (start + 7) // 8 * 8)
        for i in range(start, head_end):
            self.set(i) if value else self.clear(i)
        first_byte, last_byte = head_end // 8, end // 8
        if last_byte > first_byte:
            self.bits[first_byte:last_byte] = (b"\xff" if value else b"\x00") * (last_byte - first_byte)
        for i in range(max(head_end, last_byte * 8), end):
            self.set(i) if value else self.clear(i)

    def any_in(self, start: int, end: int) -> bool:
        return any(self.test(i) for i in range(start, min(end, self.nbits)))

    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def runs(self) -> Iterator[Extent]:
        """Runs of set bits as half-open ``(first, end)`` chunk ranges."""
        return bitmap_runs(bytes(self.bits), self.nbits)

    def __iter__(self) -> Iterator[int]:
        for start, end in self.runs():
            yield from range(start, end)

    def copy(self) -> Bitmap:
        return Bitmap(self.nbits, bits=self.bits)

    def __ior__(self, other: Bitmap) -> Bitmap:
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits = bytearray(merged.to_bytes(len(self.bits), "little"))
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self.nbits == other.nbits and self.bits == other.bits

    def __repr__(self) -> str:
        return f"Bitmap({self.nbits} bits, {self.count()} set)"
