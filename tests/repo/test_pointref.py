"""Point references: id prefixes, VOLUME@latest and VOLUME@TIME down to nanoseconds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from umbra.errors import UsageError
from umbra.repo.pointref import parse_point_ref, to_ns

BASE = to_ns(datetime(2026, 12, 1, 14, 38, 8, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("v@2026-12-01T14:38:08Z", BASE),
        ("v@2026-12-01T14:38:08.5Z", BASE + 500_000_000),
        ("v@2026-12-01T14:38:08.123456789+00:00", BASE + 123_456_789),
        ("v@2026-12-01T14:38:08,859091745+00:00", BASE + 859_091_745),  # `date --iso-8601=ns`
        ("v@2026-12-01T15:38:08.000000001+01:00", BASE + 1),
    ],
)
def test_time_references_keep_every_digit(text: str, ns: int) -> None:
    ref = parse_point_ref(text)
    assert ref.volume == "v" and ref.time_ns == ns
    assert ref.time is not None and to_ns(ref.time) == ns - ns % 1000  # the datetime keeps microseconds


def test_other_references() -> None:
    assert parse_point_ref("v@latest").time is None
    assert parse_point_ref("3f9c2a1b").id_prefix == "3f9c2a1b"
    for bad in ("@2026-12-01", "v@yesterday", "xyz"):
        with pytest.raises(UsageError):
            parse_point_ref(bad)
