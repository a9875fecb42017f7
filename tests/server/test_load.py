"""RELIABILITY I1 at CI scale: 16 clients back up 64 MiB volumes (half of their blocks the same in
every client) for 3 rounds at once through one server, then restore every point: no failed
session, every point byte-identical to its source, check clean, the server's memory bounded and
its health endpoint answering quickly all along.  Throughput is printed, not asserted."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.server.helpers import MiB, ServerProcess, cli_env, umbra

CLIENTS = 16
ROUNDS = 3
SIZE = 64 * MiB
REGION = MiB
SHARED = {i: random.Random(i).randbytes(REGION) for i in range(0, SIZE // REGION, 2)}  # even regions


def write_round(path: Path, client: int, round_: int) -> str:
    """The client's volume in this round (its own odd regions change each round); its SHA-256."""
    rng = random.Random(client * 1000 + round_)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(SIZE // REGION):
            data = SHARED[i] if i in SHARED else rng.randbytes(REGION)
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_sixteen_clients_three_rounds_then_restore(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "srv")
    latencies: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert server.request("GET", "/v1/health").status == 200
            latencies.append(time.monotonic() - started)
            stop.wait(0.05)

    def client(n: int) -> list[str]:
        problems = []
        url, env = server.repo_url(f"client{n}"), cli_env(server.token(f"client{n}"))
        source = tmp_path / f"client{n}.img"
        if umbra(env, "init", "--repo", url).returncode != 0:
            return ["init failed"]
        digests = []
        for round_ in range(ROUNDS):
            digests.append(write_round(source, n, round_))
            kind = "full" if round_ == 0 else "incremental"
            done = umbra(env, "backup", str(source), "--volume", "v", "--type", kind, "--repo", url)
            if done.returncode != 0:
                problems.append(f"round {round_}: {done.stderr}")
        source.unlink()
        listed = json.loads(umbra(env, "list", "--repo", url, "--json").stdout)
        ids = [p["id"] for p in sorted(listed, key=lambda p: p["time"])]
        for round_, (point, digest) in enumerate(zip(ids, digests, strict=True)):
            out = tmp_path / f"client{n}.{round_}.out"
            done = umbra(env, "restore", point, str(out), "--repo", url)
            if done.returncode != 0 or sha256(out) != digest:
                problems.append(f"restore of round {round_}: {done.stderr or 'bytes differ'}")
            out.unlink(missing_ok=True)
        if len(ids) != ROUNDS:
            problems.append(f"{len(ids)} points")
        if umbra(env, "check", "--repo", url).returncode != 0:
            problems.append("check failed")
        return problems

    watcher = threading.Thread(target=watch_health)
    started = time.monotonic()
    watcher.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = dict(zip(range(CLIENTS), pool.map(client, range(CLIENTS)), strict=True))
    finally:
        stop.set()
        watcher.join()
        elapsed = time.monotonic() - started
        peak = next(
            int(line.split()[1]) * 1024
            for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        server.stop()
    assert results == {n: [] for n in range(CLIENTS)}
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    stored = sum(f.stat().st_size for f in (tmp_path / "srv" / "repos").rglob("*") if f.is_file())
    print(
        f"\nI1: {CLIENTS} clients x {ROUNDS} rounds of {SIZE // MiB} MiB in {elapsed:.0f} s "
        f"({CLIENTS * ROUNDS * SIZE / MiB / elapsed:.0f} MiB/s backed up and restored); stored {stored / MiB:.0f} MiB; "
        f"server peak RSS {peak / MiB:.0f} MiB; health p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"
    )
    assert peak < 1 << 30
    assert p99 < 0.5
