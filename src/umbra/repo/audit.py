"""What the storage can do to points, and how umbra notices (RELIABILITY B4).

The storage cannot forge or alter a point: a manifest is sealed with its id as associated data,
so one renamed, edited or grafted from another repository does not open.  It can *hide* a point
(delete its manifest) or bring back one umbra deleted (an old copy of the directory).  Every
deletion by umbra first stores a sealed record ``forgotten/<point id>``
(:meth:`Repository.delete_point`), and each machine remembers the points it has seen (a small
file in its state directory).  :func:`audit` compares: a point seen here before that is gone with
no record of its deletion was hidden or lost; a point present although a record says umbra
deleted it came back.  As in borg's attack model, this detects rather than prevents.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from umbra.repo.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class PointAudit:
    hidden: list[str] = field(default_factory=list)  # seen here, gone, and no record of a deletion
    returned: list[str] = field(default_factory=list)  # present, although umbra deleted it

    def messages(self) -> list[str]:
        out = [
            f"point {pid} was seen here before and is gone from the repository without a record that umbra "
            "deleted it: the storage lost or hid it"
            for pid in self.hidden
        ]
        out += [
            f"point {pid} is in the repository although umbra deleted it: an old copy of it was put back (or a "
            "prune was interrupted); the next prune removes it"
            for pid in self.returned
        ]
        return out


def audit(repo: Repository, seen_file: Path) -> PointAudit:
    """Compare the repository's points with those this machine saw before, then remember them
    (points found hidden stay remembered, so the warning stays until someone looks)."""
    current = set(repo.point_ids())
    seen = _load(seen_file)
    returned = repo.returned_points(current)
    result = PointAudit(
        hidden=sorted(pid for pid in seen - current if repo.forgotten(pid) is None),
        returned=sorted(returned),
    )
    remembered = (current - returned) | set(result.hidden)
    if remembered != seen:
        _save(seen_file, remembered)
    return result


def _load(path: Path) -> set[str]:
    try:
        doc = json.loads(path.read_text())
        return {str(p) for p in doc["points"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _save(path: Path, points: set[str]) -> None:
    """Best effort (a read-only home must not stop a restore)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"points": sorted(points)}) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("audit: cannot remember the points seen in %s: %s", path, exc)
