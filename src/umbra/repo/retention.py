"""Which points a retention policy keeps (restic/borg semantics, per volume).

``keep_last`` keeps the N newest points; ``keep_hourly`` (daily, weekly, monthly) keeps the newest
point of each of the N most recent hours (days, ISO weeks, months) that have points.  A point kept
by any rule is kept.  Times are bucketed in local time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from umbra.errors import UsageError
from umbra.repo.manifest import Point


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def empty(self) -> bool:
        return not any((self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly))


_BUCKETS: list[tuple[str, Callable[[datetime], tuple[int, ...]]]] = [
    ("keep_hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("keep_daily", lambda t: (t.year, t.month, t.day)),
    ("keep_weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("keep_monthly", lambda t: (t.year, t.month)),
]


def apply(points: list[Point], policy: Policy, volumes: list[str] | None = None) -> tuple[list[Point], list[Point]]:
    """Returns (keep, forget), each sorted oldest first.  With ``volumes``, the policy applies to
    those volumes only and every point of any other volume is kept.

    Raises:
        UsageError: an empty policy (it would forget everything).
    """
    if policy.empty():
        raise UsageError("give at least one --keep-* option (an empty policy would remove every point)")
    keep_ids: set[str] = {p.id for p in points if volumes is not None and p.volume not in volumes}
    present = {p.volume for p in points}
    for volume in sorted(present if volumes is None else present & set(volumes)):
        newest_first = sorted((p for p in points if p.volume == volume), key=lambda p: (p.time, p.id), reverse=True)
        keep_ids.update(p.id for p in newest_first[: policy.keep_last])
        for attr, bucket in _BUCKETS:
            n = getattr(policy, attr)
            seen: set[tuple[int, ...]] = set()
            for p in newest_first:
                if len(seen) >= n:
                    break
                key = bucket(p.time.astimezone())
                if key not in seen:
                    seen.add(key)
                    keep_ids.add(p.id)
    keep = [p for p in points if p.id in keep_ids]
    forget = [p for p in points if p.id not in keep_ids]
    return keep, forget
