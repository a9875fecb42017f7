"""A local cache of the loaded index, so a large repository's index is not read, decrypted and
hashed into a table again by every command (restic keeps its index files in a local cache, borg its
chunks cache).

The cache is one file per repository: the blob table's buffer as it is in memory, the pack ids its
pack numbers stand for, and the names of the index files it was built from.  Index files are
immutable and named by their hash, so the cache is good for a repository whose index files include
all of those names: the files added since (by later backups) are read and added on top, and the
cache is written again.  If any of its files is gone (prune, compact, repair rewrote the index) it
is rebuilt.  A keyed BLAKE3 MAC under the repository's id key closes the file: a cache that was
damaged, cut short or written without the key is ignored, never trusted (a forged "this blob is
stored" would let a backup skip storing it).  Layout in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

import blake3

from umbra.repo.blobtable import SLOT, BlobTable
from umbra.repo.crypto import Crypto
from umbra.repo.index import Index

log = logging.getLogger(__name__)
MAGIC = b"UMBRAIC1"
_HEAD = struct.Struct("<8sQQ")  # magic, header length, table length
MAC_SIZE = 32
MAC_CONTEXT = "umbra 2026-12 local index cache MAC"
MAX_HEADER = 1 << 30
_REPO_ID = re.compile(r"[0-9a-f]{16,128}")


def default_directory() -> Path:
    """``$UMBRA_CACHE_DIR``, else ``$XDG_CACHE_HOME/umbra``, else ``~/.cache/umbra``."""
    explicit = os.environ.get("UMBRA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "umbra"


class IndexCache:
    """The cache file of one repository under ``directory``."""

    def __init__(self, directory: Path, repo_id: str, crypto: Crypto) -> None:
        if not _REPO_ID.fullmatch(repo_id):  # (it names a directory: nothing else may)
            raise ValueError(f"repository id {repo_id!r} is not hexadecimal")
        self.path = directory / repo_id / "index.cache"
        self._mac_key = crypto.derived_key(MAC_CONTEXT)

    def load(self, names: list[str]) -> tuple[Index, set[str]] | None:
        """The cached index and the index files it holds, if every one of them is among ``names``
        (the repository's index files now); None if there is no usable cache."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    return None
                magic, header_len, table_len = _HEAD.unpack(head)
                if magic != MAGIC or header_len > MAX_HEADER or table_len % SLOT.size:
                    return None
                header = f.read(header_len)
                table = bytearray(table_len)
                if f.readinto(table) != table_len or len(header) != header_len:
                    return None
                mac = f.read(MAC_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("index cache %s unreadable (%s): reading the index from the repository", self.path, exc)
            return None
        digest = blake3.blake3(head, key=self._mac_key)
        digest.update(header)
        digest.update(table)
        if mac != digest.digest():
            log.warning("index cache %s does not verify: reading the index from the repository", self.path)
            return None
        doc = json.loads(header)
        covered = set(doc["index_files"])
        if not covered <= set(names):
            return None  # an index file it holds is gone: the index was rewritten
        blobs = BlobTable.from_buffer(table, int(doc["blobs"]))
        return Index.from_table(blobs, [str(p) for p in doc["packs"]]), covered

    def save(self, names: list[str], index: Index) -> None:
        """Write the cache of ``index``, built from the index files ``names`` (a failure to write
        is only logged: the cache is an optimisation)."""
        table, blobs, packs = index.table_state()
        header = json.dumps({"index_files": sorted(names), "blobs": blobs, "packs": packs}).encode()
        head = _HEAD.pack(MAGIC, len(header), len(table))
        digest = blake3.blake3(head, key=self._mac_key)
        digest.update(header)
        digest.update(table)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".index.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(head)
                    f.write(header)
                    f.write(table)
                    f.write(digest.digest())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:  # (a read-only home, say: every command works on without it)
            log.debug("cannot write the index cache %s: %s", self.path, exc)
