"""What the server can tell of a repository without a key: object counts and sizes, when the newest
point arrived, and who holds a lock (lock files are plain JSON: host, pid, refreshed)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umbra.repo.locks import DEFAULT_TTL


@dataclass
class LockHolder:
    host: str
    pid: int
    exclusive: bool
    age_s: float
    stale: bool


@dataclass
class RepoStats:
    name: str
    exists: bool
    bytes: int = 0
    packs: int = 0
    points: int = 0
    newest_point: float | None = None  # when the newest manifest was stored (the server's clock)
    locks: list[LockHolder] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repo_stats(root: Path, name: str) -> RepoStats:
    path = root / "repos" / name
    if not (path / "config").is_file():
        return RepoStats(name, exists=False)
    stats = RepoStats(name, exists=True)
    for directory, _, files in os.walk(path):
        for file in files:
            if file.startswith("."):
                continue
            st = os.stat(os.path.join(directory, file))
            stats.bytes += st.st_size
            top = Path(directory).relative_to(path).parts[:1]
            if top == ("data",):
                stats.packs += 1
            elif top == ("points",):
                stats.points += 1
                stats.newest_point = max(stats.newest_point or 0.0, st.st_mtime)
    now = time.time()
    for lock in sorted((path / "locks").glob("[0-9a-f]*")):
        try:
            doc = json.loads(lock.read_bytes())
            age = max(0.0, now - float(doc["refreshed"]))
            holder = LockHolder(str(doc["host"]), int(doc["pid"]), bool(doc["exclusive"]), age, age > DEFAULT_TTL)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a lock being written, or not one of ours
        stats.locks.append(holder)
    return stats


def all_repos(root: Path) -> list[str]:
    base = root / "repos"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
