"""The in-memory index at scale: bytes per blob, load time and lookups for N synthetic blobs,
against a plain ``dict[bytes, tuple]`` (what the index would cost written the obvious way); then
loading them from a repository's index files, without and with the local index cache.

    .venv/bin/python bench/index_memory.py [--blobs 4000000]

A 1 TiB volume of unique 64 KiB blocks is 16.8 million blobs; multiply the bytes per blob.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))

from umbra.repo.backends import LocalBackend
from umbra.repo.format import INDEX_ENTRY, BlobType
from umbra.repo.index import Index, encode_index
from umbra.repo.pack import PackEntry
from umbra.repo.repository import Repository

PER_PACK = 4000  # blobs per pack (16 MiB packs of 4 KiB compressed blocks, about)


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, build: Callable[[], object], ids: list[bytes]) -> None:
    gc.collect()
    before = resident()
    start = time.perf_counter()
    table = build()
    load = time.perf_counter() - start
    gc.collect()
    per_blob = (resident() - before) / len(ids)
    timings = []
    for keys in (ids[:200_000], [os.urandom(32) for _ in range(200_000)]):
        start = time.perf_counter()
        for key in keys:
            key in table  # noqa: B015
        timings.append((time.perf_counter() - start) / len(keys) * 1e6)
    print(f"{name:28} {per_blob:6.0f} B/blob  load {load:6.2f} s  hit {timings[0]:.2f} µs  miss {timings[1]:.2f} µs")
    del table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=4_000_000)
    n = ap.parse_args().blobs
    ids = [os.urandom(32) for _ in range(n)]
    packs = [
        (
            os.urandom(32).hex(),
            b"".join(INDEX_ENTRY.pack(1, ids[i], i % PER_PACK * 4096, 4096) for i in range(p, p + PER_PACK)),
        )
        for p in range(0, n - n % PER_PACK, PER_PACK)
    ]
    ids = ids[: len(packs) * PER_PACK]

    def load(pack_lists: bool) -> Callable[[], Index]:
        def build() -> Index:
            index = Index(pack_lists)
            index.reserve(len(ids))
            for pack_id, records in packs:
                index.add_pack_records(pack_id, records)
            return index

        return build

    def plain_dict() -> dict[bytes, tuple[str, int, int, int]]:
        return {
            bid: (pack_id, t, o, n) for pack_id, records in packs for t, bid, o, n in INDEX_ENTRY.iter_unpack(records)
        }

    print(f"{len(ids)} blobs in {len(packs)} packs")
    measure("umbra index (backups)", load(False), ids)
    measure("umbra index with pack lists", load(True), ids)
    measure("plain dict of tuples", plain_dict, ids)
    from_repository(packs)


def from_repository(packs: list[tuple[str, bytes]]) -> None:
    """Index files of 100 packs each in a local repository; load them cold and through the cache."""
    work = Path(tempfile.mkdtemp(prefix="umbra-index-bench-"))
    os.environ["UMBRA_CACHE_DIR"] = str(work / "cache")
    try:
        repo = Repository.init(LocalBackend(work / "repo"), "bench")
        for start in range(0, len(packs), 100):
            chunk = {
                pack_id: [PackEntry(BlobType(t), bid, o, n) for t, bid, o, n in INDEX_ENTRY.iter_unpack(records)]
                for pack_id, records in packs[start : start + 100]
            }
            name, data = encode_index(repo.crypto, chunk)
            repo.store_content_addressed(f"index/{name}", data)
        for label in ("repository, no cache yet", "repository, through the cache"):
            start_time = time.perf_counter()
            count = len(Repository.open(LocalBackend(work / "repo"), "bench").load_index())
            print(f"{label:34} load {time.perf_counter() - start_time:6.2f} s  ({count} blobs)")
        size = sum(f.stat().st_size for f in (work / "cache").rglob("index.cache"))
        print(f"cache file: {size / len(packs) / 4000:.0f} B/blob")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
