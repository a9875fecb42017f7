"""Point references as users write them: an id prefix, ``VOLUME@latest`` or ``VOLUME@TIME``.

TIME is ISO 8601 (``2026-11-21T10:32:05.250``, ``…Z``, ``…+01:00``, or a date; up to nine fractional
digits); without a zone it is local time.  ``VOLUME@TIME`` names the state of VOLUME at TIME: the
newest point whose data is from at or before TIME, plus, where the volume's CDP journal was shipped,
every write stamped at or before TIME (``umbra.repo.cdp``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from umbra.errors import UsageError

_HEX = re.compile(r"^[0-9a-f]{4,32}$")


@dataclass(frozen=True)
class PointRef:
    text: str
    id_prefix: str | None = None
    volume: str | None = None
    time: datetime | None = None  # None with a volume means "latest"
    time_ns: int | None = None  # the same instant in nanoseconds since the epoch (all digits given)


_FRACTION = re.compile(r"^(.*T[0-9:]+)[.,]([0-9]{1,9})(.*)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ns(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


def format_ns(ns: int, digits: int = 9) -> str:
    """An instant in nanoseconds as ISO 8601 UTC (``…Z``) with ``digits`` fractional digits
    (truncated, so an instant printed with all nine reads back exactly)."""
    seconds = datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{ns % 10**9:09d}"[: len(seconds) + 1 + digits] + "Z"


def parse_time(text: str) -> tuple[datetime, int]:
    """The instant as a datetime (microseconds) and in nanoseconds (every digit given)."""
    extra_ns = 0
    m = _FRACTION.match(text)
    if m:  # datetime keeps microseconds: keep the rest apart
        digits = m.group(2).ljust(9, "0")
        text = m.group(1) + "." + digits[:6] + m.group(3)
        extra_ns = int(digits[6:])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a time (use ISO 8601, e.g. 2026-11-21T10:32:05.250)") from None
    when = when.astimezone() if when.tzinfo is None else when
    return when, to_ns(when) + extra_ns


def parse_point_ref(text: str) -> PointRef:
    if "@" in text:
        volume, _, when = text.partition("@")
        if not volume:
            raise UsageError(f"{text!r}: missing volume name before '@'")
        if when == "latest":
            return PointRef(text, volume=volume)
        moment, moment_ns = parse_time(when)
        return PointRef(text, volume=volume, time=moment, time_ns=moment_ns)
    if not _HEX.match(text):
        raise UsageError(f"{text!r} is neither a point id (4+ hex digits) nor VOLUME@latest / VOLUME@TIME")
    return PointRef(text, id_prefix=text)
