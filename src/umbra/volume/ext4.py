"""Used blocks of an ext2/3/4 filesystem, from its own group descriptors and block bitmaps.

Free blocks need not be read: they restore as zeros.  Nor, on filesystems with group checksums,
the tail of each inode table past ``bg_itable_unused``: ext4 and e2fsck never read those inodes
(the kernel's lazyinit thread zeroes them), so they restore as zeros too.  Groups flagged BLOCK_UNINIT have no bitmap
on disk; their used blocks are exactly the metadata that ``mke2fs`` placed there (superblock and
descriptor backups, and bitmaps or inode tables of any group), which we compute.  Filesystems with
features we do not model (META_BG, a journal device) return None, and the caller reads everything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from umbra.volume.extents import Extent, bitmap_runs, merge, subtract

EXT4_MAGIC = 0xEF53
SUPERBLOCK_OFFSET = 1024
BLOCK_UNINIT = 0x2
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
COMPAT_SPARSE_SUPER2 = 0x200

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Ext4Geometry:
    block_size: int
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    reserved_gdt: int
    sparse_super: bool
    sparse_super2_groups: tuple[int, int] | None
    group_checksums: bool  # then inodes past bg_itable_unused are never read by ext4 or e2fsck

    @property
    def groups(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def gdt_blocks(self) -> int:
        return -(-(self.groups * self.desc_size) // self.block_size)

    def has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.sparse_super2_groups is not None:
            return group in self.sparse_super2_groups
        if not self.sparse_super or group == 1:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False


def read_geometry(read: Reader, device_size: int) -> Ext4Geometry | None:
    """Parse the superblock; None if this is not an ext2/3/4 filesystem we can map."""
    if device_size < SUPERBLOCK_OFFSET + 1024:
        return None
    sb = read(SUPERBLOCK_OFFSET, 1024)
    if struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    (blocks_lo,) = struct.unpack_from("<I", sb, 4)
    first_data, log_bs = struct.unpack_from("<II", sb, 20)
    (bpg,) = struct.unpack_from("<I", sb, 32)
    (ipg,) = struct.unpack_from("<I", sb, 40)
    rev = struct.unpack_from("<I", sb, 76)[0]
    inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    reserved_gdt = struct.unpack_from("<H", sb, 206)[0]
    is64 = bool(incompat & INCOMPAT_64BIT)
    desc_size = struct.unpack_from("<H", sb, 254)[0] if is64 else 32
    blocks_hi = struct.unpack_from("<I", sb, 336)[0] if is64 else 0
    if incompat & (INCOMPAT_META_BG | INCOMPAT_JOURNAL_DEV) or log_bs > 6 or bpg == 0 or desc_size < 32:
        return None
    backups = struct.unpack_from("<II", sb, 588) if compat & COMPAT_SPARSE_SUPER2 else None
    geo = Ext4Geometry(
        block_size=1024 << log_bs,
        blocks_count=blocks_lo | blocks_hi << 32,
        first_data_block=first_data,
        blocks_per_group=bpg,
        inodes_per_group=ipg,
        inode_size=inode_size,
        desc_size=desc_size,
        reserved_gdt=reserved_gdt,
        sparse_super=bool(ro_compat & RO_COMPAT_SPARSE_SUPER),
        sparse_super2_groups=backups,
        group_checksums=bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)),
    )
    if geo.blocks_count * geo.block_size > device_size:
        return None  # a truncated image: safer to read it all
    return geo


def used_extents(read: Reader, geo: Ext4Geometry) -> list[Extent]:
    """Byte extents of every block the filesystem uses (metadata included)."""
    bs = geo.block_size
    gdt = read((geo.first_data_block + 1) * bs, geo.gdt_blocks * bs)
    inode_table_blocks = -(-(geo.inodes_per_group * geo.inode_size) // bs)
    used: list[Extent] = [(0, (geo.first_data_block + 1) * bs)]  # boot block and primary superblock
    unused_inodes: list[Extent] = []
    for g in range(geo.groups):
        d = gdt[g * geo.desc_size : (g + 1) * geo.desc_size]
        block_bitmap, inode_bitmap, inode_table = struct.unpack_from("<III", d, 0)
        flags = struct.unpack_from("<H", d, 18)[0]
        itable_unused = struct.unpack_from("<H", d, 0x1C)[0]
        if geo.desc_size >= 64:
            hi = struct.unpack_from("<III", d, 0x20)
            block_bitmap |= hi[0] << 32
            inode_bitmap |= hi[1] << 32
            inode_table |= hi[2] << 32
            itable_unused |= struct.unpack_from("<H", d, 0x32)[0] << 16
        if geo.group_checksums and itable_unused <= geo.inodes_per_group:
            in_use = -(-((geo.inodes_per_group - itable_unused) * geo.inode_size) // bs)
            unused_inodes.append(((inode_table + in_use) * bs, (inode_table + inode_table_blocks) * bs))
        used += [
            (block_bitmap * bs, (block_bitmap + 1) * bs),
            (inode_bitmap * bs, (inode_bitmap + 1) * bs),
            (inode_table * bs, (inode_table + inode_table_blocks) * bs),
        ]
        start = geo.first_data_block + g * geo.blocks_per_group
        nblocks = min(geo.blocks_per_group, geo.blocks_count - start)
        if flags & BLOCK_UNINIT:
            if geo.has_super(g):
                used.append((start * bs, (start + 1 + geo.gdt_blocks + geo.reserved_gdt) * bs))
            continue
        bitmap = read(block_bitmap * bs, -(-nblocks // 8))
        used += [((start + a) * bs, (start + b) * bs) for a, b in bitmap_runs(bitmap, nblocks)]
    return subtract(merge(used), merge(unused_inodes))
