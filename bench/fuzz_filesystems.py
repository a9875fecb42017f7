"""RELIABILITY H3, the long run: mutated ext4 images through `ls` and `extract` in the isolated
reader, for as long as asked.  Prints how the mutants ended; exits 1 if any crashed the reader or
stalled it (umbra survives both, but each is a parser bug worth a look) or raised anything that is
not an umbra error.

    .venv/bin/python bench/fuzz_filesystems.py [--minutes 30] [--seed 0] [--work /tmp/fsfuzz]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))

from umbra.testing.fsfuzz import check_mutant, ext_metadata
from umbra.testing.volumes import make_ext4, make_tree


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/fsfuzz")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = [
        make_ext4(work / f"fs{i}.img", size, make_tree(work / f"tree{i}", seed=i, files=files, max_size=max_size))
        for i, (size, files, max_size) in enumerate([(4 << 20, 30, 20_000), (16 << 20, 120, 60_000)])
    ]
    datas = [(image.read_bytes(), image.name) for image in images]
    hots = [ext_metadata(data) for data, _ in datas]
    results: collections.Counter[str] = collections.Counter()
    bad = []
    end = time.monotonic() + args.minutes * 60
    seed = args.seed
    while time.monotonic() < end:
        for (data, name), hot in zip(datas, hots, strict=True):
            outcome = check_mutant(data, seed, work, hot)
            kind = outcome.result
            if "crashed" in outcome.message or "no progress" in outcome.message:
                kind += " (crash or stall)"
                bad.append(f"{name} seed {seed}: {outcome.message}")
            results[kind] += 1
        seed += 1
    print(f"{sum(results.values())} mutants of {len(datas)} images, seeds {args.seed}..{seed - 1}")
    for kind, n in results.most_common():
        print(f"  {n:7d}  {kind}")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
