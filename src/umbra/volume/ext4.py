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


# --- inodes and extended attributes (file restore reads what pytsk3 does not expose) ----------

XATTR_MAGIC = 0xEA020000
XATTR_PREFIXES = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
    7: b"system.",
    8: b"system.richacl",
}
GOOD_OLD_INODE_SIZE = 128


def read_inode(read: Reader, geo: Ext4Geometry, inode: int) -> bytes:
    """The on-disk bytes of inode number ``inode``."""
    group, index = divmod(inode - 1, geo.inodes_per_group)
    if inode < 1 or group >= geo.groups:
        raise ValueError(f"inode {inode} is outside the filesystem")
    d = read((geo.first_data_block + 1) * geo.block_size + group * geo.desc_size, geo.desc_size)
    (table,) = struct.unpack_from("<I", d, 8)
    if geo.desc_size >= 64:
        table |= struct.unpack_from("<I", d, 0x28)[0] << 32
    return read(table * geo.block_size + index * geo.inode_size, geo.inode_size)


XattrValue = bytes | int  # the value, or the number of the inode that holds it (ea_inode feature)


def _xattr_entries(buf: bytes, start: int, values_base: int, what: str) -> list[tuple[bytes, XattrValue]]:
    out: list[tuple[bytes, XattrValue]] = []
    pos = start
    while pos + 16 <= len(buf) and struct.unpack_from("<I", buf, pos)[0] != 0:
        name_len, index, value_offs, value_inum, value_size = struct.unpack_from("<BBHII", buf, pos)
        name = buf[pos + 16 : pos + 16 + name_len]
        if len(name) != name_len:
            raise ValueError(f"{what}: extended attribute entry runs past its area")
        full = XATTR_PREFIXES.get(index, b"") + name if index in XATTR_PREFIXES else None
        if value_inum:
            value: XattrValue = value_inum
        else:
            value = buf[values_base + value_offs : values_base + value_offs + value_size]
            if len(value) != value_size:
                raise ValueError(f"{what}: extended attribute value runs past its area")
        if full is not None:  # unknown name indexes (e.g. Lustre's) have no name Linux can set
            out.append((full, value))
        pos += (16 + name_len + 3) & ~3
    return out


def inode_xattrs(read: Reader, geo: Ext4Geometry, raw: bytes, inode: int) -> list[tuple[bytes, XattrValue]]:
    """Extended attributes of an inode: those stored inside it, then those in its xattr block."""
    out: list[tuple[bytes, XattrValue]] = []
    what = f"inode {inode}"
    if len(raw) > GOOD_OLD_INODE_SIZE + 4:
        (extra,) = struct.unpack_from("<H", raw, GOOD_OLD_INODE_SIZE)
        body = GOOD_OLD_INODE_SIZE + extra
        if body + 4 <= len(raw) and struct.unpack_from("<I", raw, body)[0] == XATTR_MAGIC:
            out += _xattr_entries(raw, body + 4, body + 4, what)
    block = struct.unpack_from("<I", raw, 0x68)[0] | struct.unpack_from("<H", raw, 0x76)[0] << 32
    if block:
        if block >= geo.blocks_count:
            raise ValueError(f"{what}: extended attribute block {block} is outside the filesystem")
        buf = read(block * geo.block_size, geo.block_size)
        if struct.unpack_from("<I", buf, 0)[0] != XATTR_MAGIC:
            raise ValueError(f"{what}: extended attribute block {block} has a bad magic")
        out += _xattr_entries(buf, 32, 0, what)
    return out


def device_number(raw: bytes) -> tuple[int, int]:
    """(major, minor) of a character or block device inode (old and new encodings)."""
    old, new = struct.unpack_from("<II", raw, 40)
    if old:
        return (old >> 8) & 0xFF, old & 0xFF
    return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


ACL_USER, ACL_GROUP = 0x02, 0x08
ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_to_xattr(value: bytes) -> bytes:
    """ext4 stores POSIX ACLs in a compact form; the xattr interface wants ``posix_acl_xattr``."""
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != 1:
        raise ValueError("not an ext4 ACL")
    out = [struct.pack("<I", 2)]
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value):
            raise ValueError("truncated ext4 ACL")
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in (ACL_USER, ACL_GROUP):
            if pos + 8 > len(value):
                raise ValueError("truncated ext4 ACL")
            (ident,) = struct.unpack_from("<I", value, pos + 4)
            pos += 8
        else:
            ident = ACL_UNDEFINED_ID
            pos += 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)
