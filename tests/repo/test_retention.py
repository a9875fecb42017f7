from datetime import UTC, datetime, timedelta

import pytest

from umbra.errors import UsageError
from umbra.repo.manifest import Point
from umbra.repo.retention import Policy, apply


def pt(i: int, when: datetime, volume: str = "v") -> Point:
    return Point(f"{i:032x}", volume, when, "full", 0, 4096, 8, "00" * 32, 0)


def test_keep_last_per_volume() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    points = [pt(i, t0 + timedelta(hours=i)) for i in range(5)] + [
        pt(10 + i, t0 + timedelta(hours=i), "w") for i in range(3)
    ]
    keep, forget = apply(points, Policy(keep_last=2))
    assert {p.id for p in keep} == {pt(i, t0).id for i in (3, 4, 11, 12)}
    assert len(forget) == 4


def test_keep_daily_keeps_newest_of_each_day() -> None:
    t0 = datetime(2026, 3, 1, 10, tzinfo=UTC).astimezone()
    points = [pt(d * 10 + h, t0 + timedelta(days=d, hours=h)) for d in range(5) for h in range(3)]
    keep, _ = apply(points, Policy(keep_daily=3))
    assert sorted(int(p.id, 16) for p in keep) == [22, 32, 42]


def test_empty_policy_refused() -> None:
    with pytest.raises(UsageError):
        apply([], Policy())


def test_policy_limited_to_some_volumes() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    points = [pt(i, t0 + timedelta(hours=i)) for i in range(3)] + [
        pt(10 + i, t0 + timedelta(hours=i), "w") for i in range(3)
    ]
    keep, forget = apply(points, Policy(keep_last=1), volumes=["w"])
    assert {int(p.id, 16) for p in forget} == {10, 11}
    assert {int(p.id, 16) for p in keep} == {0, 1, 2, 12}


def test_keep_within_counts_from_now_and_future_points_count_for_nothing(caplog) -> None:  # type: ignore[no-untyped-def]
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    real = [pt(i, now - timedelta(days=i + 1)) for i in range(10)]  # one a day, the newest yesterday
    planted_future = [pt(100 + i, now + timedelta(days=30 + i)) for i in range(3)]
    planted_recent = [pt(200 + i, now - timedelta(minutes=5 + i)) for i in range(3)]
    points = real + planted_future + planted_recent
    keep, _ = apply(points, Policy(keep_within=7 * 86400), now=now.timestamp())
    kept = {p.id for p in keep}
    assert {p.id for p in real[:7]} <= kept and not {p.id for p in real[7:]} & kept  # the window is from now
    assert {p.id for p in planted_future} <= kept  # kept, never judged
    assert "in the future" in caplog.text
    # keep_last counts no future point: the planted ones cannot push the real ones out with it
    keep, _ = apply(real + planted_future, Policy(keep_last=3), now=now.timestamp())
    assert {p.id for p in keep} == {p.id for p in real[:3] + planted_future}


def test_durations() -> None:
    from umbra.repo.retention import parse_duration

    assert [parse_duration(t) for t in ("90s", "30m", "24h", "7d", "2w", "15")] == [
        90,
        1800,
        86400,
        7 * 86400,
        14 * 86400,
        15,
    ]
    for bad in ("soon", "-1d", ""):
        with pytest.raises(UsageError):
            parse_duration(bad)
