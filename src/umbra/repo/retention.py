"""Which points a retention policy keeps (restic/borg semantics, per volume).

``keep_last`` keeps the N newest points; ``keep_hourly`` (daily, weekly, monthly) keeps the newest
point of each of the N most recent hours (days, ISO weeks, months) that have points;
``keep_within`` (seconds) keeps every point from that long before *now* on (the clock of the
machine that prunes, never the newest point's time: restic's ``--keep-within`` counts from the
newest point, so one point dated in the future empties the window).  A point kept by any rule is
kept.  Times are bucketed in local time.

A point dated more than FUTURE_SKEW_S ahead of now is kept and counted by no rule, with a warning:
a client whose clock is wrong, or one that planted points (an append-only client cannot delete,
but it can add points meant to push real ones out of ``keep_last``).  With ``keep_within``, points
a client added can add to what is kept but never displace a real point inside the window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from umbra.errors import UsageError
from umbra.repo.manifest import Point

log = logging.getLogger(__name__)
FUTURE_SKEW_S = 600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds of ``90s``, ``30m``, ``24h``, ``7d``, ``2w`` (or a plain number of seconds)."""
    t = text.strip().lower()
    try:
        seconds = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a duration (e.g. 90s, 30m, 24h, 7d)") from None
    if seconds < 0:
        raise UsageError(f"duration {text!r} is negative")
    return seconds


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_within: float = 0.0  # seconds before now

    def empty(self) -> bool:
        rules = (self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly)
        return not any(rules) and not self.keep_within


_BUCKETS: list[tuple[str, Callable[[datetime], tuple[int, ...]]]] = [
    ("keep_hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("keep_daily", lambda t: (t.year, t.month, t.day)),
    ("keep_weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("keep_monthly", lambda t: (t.year, t.month)),
]


def apply(
    points: list[Point], policy: Policy, volumes: list[str] | None = None, now: float | None = None
) -> tuple[list[Point], list[Point]]:
    """Returns (keep, forget), each sorted oldest first.  With ``volumes``, the policy applies to
    those volumes only and every point of any other volume is kept.

    Raises:
        UsageError: an empty policy (it would forget everything).
    """
    if policy.empty():
        raise UsageError("give at least one --keep-* option (an empty policy would remove every point)")
    now = time.time() if now is None else now
    keep_ids: set[str] = {p.id for p in points if volumes is not None and p.volume not in volumes}
    future = {p.id for p in points if p.time.timestamp() > now + FUTURE_SKEW_S and p.id not in keep_ids}
    for p in points:
        if p.id in future:
            log.warning(
                "point %s of %s is dated %s, in the future: kept, and counted by no --keep-* rule "
                "(a client's clock is wrong, or it planted the point)",
                p.short_id,
                p.volume,
                p.time.astimezone().isoformat(timespec="seconds"),
            )
    keep_ids |= future
    keep_ids.update(p.id for p in points if policy.keep_within and now - p.time.timestamp() <= policy.keep_within)
    present = {p.volume for p in points}
    for volume in sorted(present if volumes is None else present & set(volumes)):
        mine = (p for p in points if p.volume == volume and p.id not in future)
        newest_first = sorted(mine, key=lambda p: (p.time, p.id), reverse=True)
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
