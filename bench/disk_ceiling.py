"""What the disk under the journal allows: fio, no umbra.

A journal that keeps every write appends *new* data; nbdkit (and ``umbra protect --no-journal``)
rewrites the pages of a 1 GiB file that stay in the page cache.  This measures both on the
filesystem of ``--work`` and prints the ceiling they put on issue 4's journal targets: the best
sequential-write ratio to nbdkit a journal on this disk can reach even at no cost of its own,
and the smallest journal cost.  Needs fio.

    .venv/bin/python bench/disk_ceiling.py [--work bench/work] [--runtime 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def fio(path: Path, size: str, runtime: int, *extra: str) -> float:
    """MB/s of sequential 1 MiB writes."""
    out = subprocess.run(
        ["fio", "--name=c", f"--filename={path}", f"--size={size}", "--rw=write", "--bs=1M",
         f"--runtime={runtime}", "--output-format=json", *extra],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)["jobs"][0]["write"]["bw_bytes"]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--runtime", type=int, default=8)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cached, new = args.work / "ceiling-cached", args.work / "ceiling-new"
    try:
        fio(cached, "1G", args.runtime)  # written once: its pages are in the page cache
        rewrite = fio(cached, "1G", args.runtime, "--time_based")
        results = {"rewrite of a cached 1 GiB file (nbdkit's case)": rewrite}
        for label, extra in (
            ("append, page cache", ()),
            ("append, O_DIRECT, 4 in flight", ("--direct=1", "--ioengine=libaio", "--iodepth=4")),
        ):
            new.unlink(missing_ok=True)
            results[label] = fio(new, "16G", args.runtime, *extra)
    finally:
        cached.unlink(missing_ok=True)
        new.unlink(missing_ok=True)
    for label, mbps in results.items():
        print(f"{label:50} {mbps:8.0f} MB/s")
    append = max(v for k, v in results.items() if k.startswith("append"))
    print(f"a journal of every write: sequential writes at most {append / rewrite:.2f}x nbdkit's, ")
    print(f"and a journal cost of at least {1 - append / rewrite:.0%} (when --no-journal writes as nbdkit does)")


if __name__ == "__main__":
    main()
