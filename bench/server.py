"""umbra through its backup server against umbra on a local repository, same volume, same machine.

A volume of random and zero megabytes (about half used, incompressible), backed up in full, then
again after ~2 % changed, then restored: to a local repository, to `umbra serve` over loopback
HTTP, and over HTTPS (a self-signed certificate).  Prints wall times and the server/local ratios:
what the network path costs when the network is free.  Never part of CI.

    .venv/bin/python bench/server.py [--size 1G] [--work bench/work-server]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from umbra.testing.tls import self_signed  # noqa: E402

MiB = 1 << 20


def make_volume(path: Path, size: int, seed: int, change: float = 0.0) -> None:
    rng = random.Random(seed)
    mode = "r+b" if path.exists() else "wb"
    with open(path, mode) as f:
        if mode == "wb":
            for i in range(size // MiB):
                f.write(rng.randbytes(MiB) if i % 2 else bytes(MiB))
            return
        for _ in range(int(size / MiB * change)):
            f.seek(rng.randrange(size // MiB) * MiB)
            f.write(rng.randbytes(MiB))


def umbra(env: dict[str, str], *args: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "umbra", *args], env=env, check=True, capture_output=True)
    return time.monotonic() - started


def start_server(root: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "umbra", "serve", "--root", str(root), "--listen", "127.0.0.1:0", "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    text = b""
    while not text.rstrip().endswith(b"}"):
        text += proc.stdout.readline()
    return proc, json.loads(text)["url"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work-server")
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base = {**os.environ, "UMBRA_PASSWORD": "bench", "UMBRA_CACHE_DIR": str(args.work / "cache")}
    cert, key = self_signed(args.work)
    results: dict[str, dict[str, float]] = {}
    for target in ("local", "http", "https"):
        volume = args.work / "volume.img"
        volume.unlink(missing_ok=True)
        make_volume(volume, size, seed=1)
        env, server = dict(base), None
        if target == "local":
            repo = str(args.work / "repo-local")
        else:
            root = args.work / f"srv-{target}"
            extra = ("--tls-cert", str(cert), "--tls-key", str(key)) if target == "https" else ()
            server, url = start_server(root, *extra)
            token = subprocess.run(
                [sys.executable, "-m", "umbra", "token", "add", "--root", str(root), "--repo", "bench"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            env.update(UMBRA_TOKEN=token, UMBRA_CA_FILE=str(cert))
            repo = f"{url}/bench"
        try:
            umbra(env, "init", "--repo", repo)
            full = umbra(env, "backup", str(volume), "--volume", "v", "--repo", repo)
            make_volume(volume, size, seed=2, change=0.02)
            incremental = umbra(env, "backup", str(volume), "--volume", "v", "--type", "incremental", "--repo", repo)
            out = args.work / "restored.img"
            out.unlink(missing_ok=True)
            restore = umbra(env, "restore", "v@latest", str(out), "--repo", repo)
            out.unlink()
        finally:
            if server is not None:
                server.terminate()
                server.wait()
        results[target] = {"full": full, "incremental": incremental, "restore": restore}
        print(f"{target:6} full {full:6.2f} s  incremental {incremental:6.2f} s  restore {restore:6.2f} s", flush=True)
    for target in ("http", "https"):
        ratios = "  ".join(f"{k} {results[target][k] / results['local'][k]:.2f}x" for k in results["local"])
        print(f"{target} / local: {ratios}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
