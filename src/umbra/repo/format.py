"""Every magic, struct layout and size of the on-disk format, in one place.

WARNING: do not modify these values.  A change is a new format version: bump ``FORMAT_VERSION``,
describe it in ``docs/FORMAT.md`` and add a ``Change:`` changelog fragment.  Magics are the first
8 bytes of ``blake3(b"umbra <thing> v1")``; ``tests/repo/test_format.py`` pins them as literals.
"""

from __future__ import annotations

import enum
import struct

import blake3

FORMAT_VERSION = 1


def _magic(thing: str) -> bytes:
    return blake3.blake3(f"umbra {thing} v1".encode()).digest()[:8]


PACK_MAGIC = _magic("pack")
INDEX_MAGIC = _magic("index")
TREE_MAGIC = _magic("tree")

ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)
"""Marks an all-zero or unused block, or a subtree made only of such blocks: never stored."""


class BlobType(enum.IntEnum):
    DATA = 1
    TREE = 2


class Suite(enum.IntEnum):
    """First byte of every sealed envelope."""

    NONE = 0
    AES256GCM = 1


class Compression(enum.IntEnum):
    """First byte of every blob's plaintext."""

    NONE = 0
    ZSTD = 1


# Sealed envelope: suite (1) | session id (16) | nonce (12) | ciphertext with GCM tag (16).
SESSION_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
ENVELOPE_HEADER = struct.Struct("<B16s12s")
# Unencrypted envelope: suite (1) | payload | blake3(aad | payload) (32), so corruption is caught.
PLAIN_CHECKSUM_SIZE = 32

# Pack: PACK_MAGIC | blob envelopes ... | sealed trailer | PACK_FOOTER
PACK_FOOTER = struct.Struct("<I8s")  # trailer length, PACK_MAGIC
PACK_ENTRY = struct.Struct("<B32sII")  # blob type, blob id, offset, length
PACK_COUNT = struct.Struct("<I")

# Index file plaintext: INDEX_MAGIC | pack count | per pack: pack id (32) | entry count | entries
INDEX_PACK = struct.Struct("<32sI")
INDEX_ENTRY = PACK_ENTRY

# Tree node plaintext: TREE_MAGIC | level (u8) | count (u32) | count x 32-byte ids
TREE_HEADER = struct.Struct("<8sBI")

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024
DEFAULT_FANOUT = 1024
DEFAULT_PACK_TARGET = 16 * 1024 * 1024
MAX_PACK_SIZE = 128 * 1024 * 1024

# Associated-data prefixes: each sealed object binds its kind, its name or id and the repository id.
AAD_BLOB = b"umbra blob v1"
AAD_TRAILER = b"umbra pack trailer v1"
AAD_INDEX = b"umbra index v1"
AAD_MANIFEST = b"umbra manifest v1"
AAD_KEY = b"umbra key v1"
AAD_CDP = b"umbra cdp batch v1"
AAD_VERIFY = b"umbra verification v1"
AAD_SET = b"umbra snapshot set outcome v1"
AAD_FORGOTTEN = b"umbra forgotten point v1"

KDF_CONTEXT_SESSION = "umbra 2026-11 session key v1"
