"""Which blocks of a volume hold data worth reading: the used-block map.

Sources of knowledge, combined by intersection: the filesystem's own allocation bitmaps (ext2/3/4)
and the image file's holes (SEEK_HOLE).  Anything unknown counts as used.  ``all_blocks=True``
ignores both and reads everything, for byte-identical restores including free space.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from umbra.volume import ext4
from umbra.volume.extents import Extent, blocks_in, intersect, merge, subtract
from umbra.volume.source import Source


@dataclass
class UsedMap:
    kind: str  # "all", "ext4", "holes", "ext4+holes"
    extents: list[Extent]
    size: int

    @property
    def used_bytes(self) -> int:
        return sum(e - s for s, e in self.extents)

    def blocks(self, block_size: int) -> Iterator[tuple[int, list[Extent] | None]]:
        """(block number, None if wholly used else the used ranges inside it), in order."""
        return blocks_in(self.extents, block_size)


def build_used_map(source: Source, all_blocks: bool = False, exclude: list[Extent] | None = None) -> UsedMap:
    """The used-block map; ``exclude`` (extents of excluded files) is left out even with all_blocks."""
    whole = [(0, source.size)] if source.size else []
    if all_blocks:
        return _excluding(UsedMap("all", whole, source.size), exclude)
    kinds = []
    extents = whole
    geo = ext4.read_geometry(source.read_at, source.size)
    if geo is not None:
        fs_extents = ext4.used_extents(source.read_at, geo)
        fs_end = geo.blocks_count * geo.block_size
        if fs_end < source.size:
            fs_extents.append((fs_end, source.size))  # bytes past the filesystem: unknown, read them
        extents = intersect(extents, fs_extents)
        kinds.append("ext4")
    holes = source.data_extents()
    if holes is not None:
        extents = intersect(extents, holes)
        kinds.append("holes")
    return _excluding(UsedMap("+".join(kinds) or "all", extents, source.size), exclude)


def _excluding(used: UsedMap, exclude: list[Extent] | None) -> UsedMap:
    if not exclude:
        return used
    return UsedMap(used.kind + "-excludes", subtract(used.extents, merge(exclude)), used.size)
