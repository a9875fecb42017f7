"""Changed-block tracking: which chunks were written since each snapshot.

Every snapshot starts a *generation* (a random id) with an empty bitmap; each write sets its
chunks in every live generation's bitmap.  Creating a snapshot freezes a copy of all bitmaps into
it, so "what changed between snapshot A and snapshot B" is B's frozen copy of A's generation.

The bitmaps are saved on clean shutdown and loaded on start.  While the daemon runs a marker file
exists; finding it at start means the daemon crashed, writes may have gone untracked, and every
generation is dropped (:attr:`ChangeTracker.invalidated` says why), so the next backup falls back
to comparing hashes instead of silently missing a block.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import blake3

from umbra.cow.bitmap import Bitmap

MAGIC = b"UMBRACBT"
VERSION = 1
KEEP_GENERATIONS = 16


@dataclass
class Generation:
    id: str
    started: float
    bitmap: Bitmap


class ChangeTracker:
    def __init__(self, nchunks: int, keep: int = KEEP_GENERATIONS) -> None:
        self.nchunks = nchunks
        self.keep = keep
        self.generations: OrderedDict[str, Generation] = OrderedDict()
        self.invalidated: str | None = None

    def mark(self, first: int, end: int) -> None:
        for gen in self.generations.values():
            gen.bitmap.set_range(first, end)

    def start_generation(self) -> tuple[str, dict[str, Bitmap]]:
        """Freeze every generation's bitmap and start a new one; returns (new id, frozen copies)."""
        frozen = {gid: gen.bitmap.copy() for gid, gen in self.generations.items()}
        gid = secrets.token_hex(8)
        self.generations[gid] = Generation(gid, time.time(), Bitmap(self.nchunks))
        while len(self.generations) > self.keep:
            self.generations.popitem(last=False)
        return gid, frozen

    # --- persistence -------------------------------------------------------------------------

    def save(self, path: Path, fingerprint: str = "") -> None:
        """``fingerprint``: the source's identity at shutdown (size, mtime, inode); a different one
        at the next start means the source was written while unprotected."""
        header = json.dumps(
            {
                "nchunks": self.nchunks,
                "fingerprint": fingerprint,
                "generations": [[g.id, g.started] for g in self.generations.values()],
            }
        ).encode()
        body = struct.pack("<8sII", MAGIC, VERSION, len(header)) + header
        body += b"".join(bytes(g.bitmap.bits) for g in self.generations.values())
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(body + blake3.blake3(body).digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, running_marker: Path, nchunks: int, fingerprint: str = "") -> ChangeTracker:
        """Load saved bitmaps unless the last run crashed (marker present), the source changed
        while unprotected (fingerprint), or they do not fit."""
        tracker = cls(nchunks)
        if running_marker.exists():
            tracker.invalidated = "the protect daemon did not shut down cleanly; writes may be untracked"
        elif path.exists():
            try:
                tracker._read(path.read_bytes(), fingerprint)
            except ValueError as exc:
                tracker.generations.clear()
                tracker.invalidated = f"tracking state not usable: {exc}"
        path.unlink(missing_ok=True)  # from now on only a clean shutdown writes it again
        return tracker

    def _read(self, data: bytes, fingerprint: str) -> None:
        body, digest = data[:-32], data[-32:]
        if len(data) < 48 or blake3.blake3(body).digest() != digest:
            raise ValueError("checksum mismatch")
        magic, version, hlen = struct.unpack_from("<8sII", body)
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a tracking file of this version")
        header = json.loads(body[16 : 16 + hlen])
        if header["nchunks"] != self.nchunks:
            raise ValueError("the volume changed size")
        if header.get("fingerprint", "") != fingerprint:
            raise ValueError("the source was modified while it was not protected")
        nbytes = (self.nchunks + 7) // 8
        pos = 16 + hlen
        for gid, started in header["generations"]:
            self.generations[gid] = Generation(gid, started, Bitmap(self.nchunks, bits=body[pos : pos + nbytes]))
            pos += nbytes
