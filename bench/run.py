"""umbra side by side with restic, borg (default and fixed-size chunker) and partclone | zstd.

Generates a deterministic ext4 volume (default 4 GiB, about 60 % used: compressible, incompressible
and duplicated files, stale garbage in free space), then for every tool: a full backup, a backup
after ~1 % of the volume changed, and a full restore.  Prints wall time, CPU time, peak RSS and
repository size, with umbra/peer ratios.  Run ``bench/setup.sh`` first.  Never part of CI.

    .venv/bin/python bench/run.py [--size 4G] [--work bench/work] [--only umbra,restic,...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UMBRA = ROOT / ".venv" / "bin" / "umbra"
BORG = HERE / ".venv-borg" / "bin" / "borg"
PASSWORD = "bench-passphrase"
MiB = 1 << 20
ENV = {
    **os.environ,
    "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
    "UMBRA_PASSWORD": PASSWORD,
    "RESTIC_PASSWORD": PASSWORD,
    "BORG_PASSPHRASE": PASSWORD,
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
}


@dataclass
class Measure:
    wall: float
    cpu: float
    rss_mib: float


def run(cmd: str, cwd: Path | None = None) -> Measure:
    """Run a shell command; wall time, CPU time (user+sys, children included) and peak RSS."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", f"set -eo pipefail; {cmd}"], cwd=cwd, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}): {cmd}")
    return Measure(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


# --- the volume ---------------------------------------------------------------------------------


def make_tree(tree: Path, used_target: int, rng: random.Random) -> None:
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(4000)]
    made: list[Path] = []
    total = 0
    i = 0
    while total < used_target:
        size = min(rng.choice([64 * 1024, MiB, 4 * MiB, 16 * MiB, 48 * MiB]), used_target - total)
        kind = rng.random()
        path = tree / f"d{i % 16}" / f"f{i}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind < 0.2 and made:  # duplicated data
            src = rng.choice(made)
            shutil.copyfile(src, path)
            size = path.stat().st_size
        elif kind < 0.6:  # compressible: text-like
            with open(path, "wb") as f:
                left = size
                while left > 0:
                    line = b" ".join(rng.choices(words, k=12)) + b"\n"
                    chunk = line * 64
                    f.write(chunk[:left])
                    left -= len(chunk[:left])
        else:  # incompressible
            with open(path, "wb") as f:
                left = size
                while left > 0:
                    n = min(left, 4 * MiB)
                    f.write(rng.randbytes(n))
                    left -= n
        made.append(path)
        total += size
        i += 1


def make_volume(work: Path, size: int, seed: int) -> Path:
    img = work / "volume.img"
    stamp = work / f"volume.{size}.{seed}.done"
    if stamp.exists():
        return img
    rng = random.Random(seed)
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    print(f"generating a {size // MiB} MiB ext4 volume in {work} ...", flush=True)
    make_tree(tree, int(size * 0.6), rng)
    garbage = b"STALE-GARBAGE-" + rng.randbytes(MiB)
    with open(img, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(garbage))
            f.write(garbage[:n])
            left -= n
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-U", "clear", "-d", str(tree), str(img)], check=True, env=ENV
    )
    shutil.rmtree(tree)
    stamp.touch()
    return img


def mutate(work: Path, img: Path, fraction: float, seed: int) -> None:
    """Replace files worth ``fraction`` of the volume with new data, through debugfs."""
    rng = random.Random(seed + 1)
    target = int(img.stat().st_size * fraction)
    listing = subprocess.run(["debugfs", "-R", "ls -p /d3", str(img)], capture_output=True, text=True, env=ENV)
    names = [line.split("/")[5] for line in listing.stdout.splitlines() if line.count("/") >= 6]
    names = [n for n in names if n.endswith(".dat")]
    cmds, done = [], 0
    for k, name in enumerate(rng.sample(names, len(names))):
        if done >= target:
            break
        size = min(4 * MiB, target - done)
        scratch_k = work / f"scratch{k}.dat"
        scratch_k.write_bytes(rng.randbytes(size))
        cmds += [f"rm /d3/{name}", f"write {scratch_k} /d3/{name}"]
        done += size
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(img)], input="\n".join(cmds).encode(), capture_output=True, check=True
    )
    for p in work.glob("scratch*.dat"):
        p.unlink()


# --- the tools ----------------------------------------------------------------------------------


class Tool:
    name = ""

    def __init__(self, work: Path) -> None:
        self.dir = work / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.repo = self.dir / "repo"

    def init(self) -> None: ...

    def full(self, img: Path) -> Measure:
        raise NotImplementedError

    def incremental(self, img: Path) -> Measure | None:
        raise NotImplementedError

    def restore(self, out: Path) -> Measure:
        raise NotImplementedError

    def size(self) -> int:
        return du(self.repo)


class Umbra(Tool):
    name = "umbra"

    def init(self) -> None:
        run(f"{UMBRA} init --repo {self.repo}")

    def full(self, img: Path) -> Measure:
        return run(f"{UMBRA} backup --repo {self.repo} {img} --volume bench")

    def incremental(self, img: Path) -> Measure:
        return run(f"{UMBRA} backup --repo {self.repo} {img} --volume bench --type incremental")

    def restore(self, out: Path) -> Measure:
        return run(f"{UMBRA} restore --repo {self.repo} bench@latest {out}")


class Restic(Tool):
    name = "restic"

    def init(self) -> None:
        run(f"restic init --repository-version 2 -q -r {self.repo}")

    def full(self, img: Path) -> Measure:
        return run(f"restic backup -q -r {self.repo} {img}")

    def incremental(self, img: Path) -> Measure:
        return run(f"restic backup -q -r {self.repo} {img}")

    def restore(self, out: Path) -> Measure:
        target = self.dir / "restore"
        m = run(f"restic restore -q -r {self.repo} latest --target {target}")
        found = next(target.rglob("bench.img"))
        found.rename(out)
        return m


class Borg(Tool):
    name = "borg"
    chunker = ""

    def init(self) -> None:
        run(f"{BORG} init -e repokey-blake2 {self.repo}")

    def _create(self, img: Path, archive: str) -> Measure:
        return run(f"{BORG} create --compression zstd,3 {self.chunker} {self.repo}::{archive} {img}", cwd=img.parent)

    def full(self, img: Path) -> Measure:
        return self._create(img, "full")

    def incremental(self, img: Path) -> Measure:
        return self._create(img, "incremental")

    def restore(self, out: Path) -> Measure:
        target = self.dir / "restore"
        target.mkdir()
        m = run(f"{BORG} extract --sparse {self.repo}::incremental", cwd=target)
        next(target.rglob("bench.img")).rename(out)
        return m


class BorgFixed(Borg):
    name = "borg-fixed"
    chunker = "--chunker-params fixed,4194304"


class Partclone(Tool):
    name = "partclone"

    def init(self) -> None:
        self.repo.mkdir()

    def full(self, img: Path) -> Measure:
        self.volume_size = img.stat().st_size
        return run(f"partclone.ext4 -q -c -s {img} -o - 2>/dev/null | zstd -q -T0 -3 -o {self.repo}/full.pcl.zst")

    def incremental(self, img: Path) -> Measure | None:
        return None  # partclone has no incremental: every run is a full image

    def restore(self, out: Path) -> Measure:
        # partclone restores onto an existing target of the right size (a device, normally)
        return run(
            f"truncate -s {self.volume_size} {out} && "
            f"zstd -q -dc {self.repo}/full.pcl.zst | partclone.ext4 -q -r -s - -O {out} >/dev/null 2>&1"
        )


TOOLS = {t.name: t for t in (Umbra, Restic, Borg, BorgFixed, Partclone)}


def fsck_ok(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, env=ENV).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=",".join(TOOLS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    img = make_volume(work, parse_size(args.size), args.seed)
    vol = work / "bench.img"
    shutil.copyfile(img, vol)
    tools = [TOOLS[n](work) for n in args.only.split(",")]
    results: dict[str, dict[str, object]] = {t.name: {} for t in tools}
    for t in tools:
        t.init()
        print(f"{t.name}: full backup", flush=True)
        results[t.name]["full"] = t.full(vol)
        results[t.name]["size_full"] = t.size()
    mutate(work, vol, 0.01, args.seed)
    for t in tools:
        print(f"{t.name}: backup after a 1 % change", flush=True)
        results[t.name]["incremental"] = t.incremental(vol)
        results[t.name]["size"] = t.size()
    for t in tools:
        out = work / f"restored-{t.name}.img"
        out.unlink(missing_ok=True)
        print(f"{t.name}: restore", flush=True)
        results[t.name]["restore"] = t.restore(out)
        results[t.name]["fsck_clean"] = fsck_ok(out)
        out.unlink()
    report(results, parse_size(args.size))
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=lambda m: m.__dict__, indent=1))
    for t in tools:
        shutil.rmtree(t.dir, ignore_errors=True)
    vol.unlink()


def _ratio(a: object, b: object) -> str:
    return f"{a.wall / b.wall:.2f}" if isinstance(a, Measure) and isinstance(b, Measure) else "n/a"


def report(results: dict[str, dict[str, object]], size: int) -> None:
    def cell(m: object) -> str:
        return "n/a" if not isinstance(m, Measure) else f"{m.wall:7.1f}s cpu {m.cpu:6.1f}s rss {m.rss_mib:5.0f}M"

    print(f"\nvolume {size // MiB} MiB, 60 % used; wall / CPU / peak RSS; repository size after both backups\n")
    print("| tool | full backup | after 1 % change | restore | repo MiB | restore fsck |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {cell(r['full'])} | {cell(r['incremental'])} | {cell(r['restore'])} | "
            f"{int(r['size']) / MiB:.0f} | {'clean' if r['fsck_clean'] else 'NOT CLEAN'} |"
        )
    if "umbra" not in results:
        return
    u = results["umbra"]
    print("\numbra / peer ratios (< 1 is umbra faster or smaller)\n")
    print("| peer | full wall | incremental wall | restore wall | repo size |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if name == "umbra":
            continue
        ratios = [_ratio(u[key], r[key]) for key in ("full", "incremental", "restore")]
        size_ratio = int(str(u["size"])) / int(str(r["size"]))
        print(f"| {name} | {' | '.join(ratios)} | {size_ratio:.2f} |")
    uf, ui = u["full"], u["incremental"]
    assert isinstance(uf, Measure) and isinstance(ui, Measure)
    rss = max(uf.rss_mib, ui.rss_mib)
    print(f"\numbra incremental / umbra full: {ui.wall / uf.wall:.2f}; umbra peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
