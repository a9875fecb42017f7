"""Point references as users write them: an id prefix, ``VOLUME@latest`` or ``VOLUME@TIME``.

TIME is ISO 8601 (``2026-11-21T10:32:05.250``, ``…Z``, ``…+01:00``, or a date); without a zone it is
local time.  ``VOLUME@TIME`` names the newest point of VOLUME taken at or before TIME.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from umbra.errors import UsageError

_HEX = re.compile(r"^[0-9a-f]{4,32}$")


@dataclass(frozen=True)
class PointRef:
    text: str
    id_prefix: str | None = None
    volume: str | None = None
    time: datetime | None = None  # None with a volume means "latest"


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a time (use ISO 8601, e.g. 2026-11-21T10:32:05.250)") from None
    return when.astimezone() if when.tzinfo is None else when


def parse_point_ref(text: str) -> PointRef:
    if "@" in text:
        volume, _, when = text.partition("@")
        if not volume:
            raise UsageError(f"{text!r}: missing volume name before '@'")
        if when == "latest":
            return PointRef(text, volume=volume)
        return PointRef(text, volume=volume, time=parse_time(when))
    if not _HEX.match(text):
        raise UsageError(f"{text!r} is neither a point id (4+ hex digits) nor VOLUME@latest / VOLUME@TIME")
    return PointRef(text, id_prefix=text)
