"""Provider registry and selection (after dissect's register/detect loop, fallback last)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from umbra.errors import ProviderError, UsageError
from umbra.providers.base import Provider
from umbra.providers.btrfs import BtrfsProvider
from umbra.providers.cow import CowProvider
from umbra.providers.direct import DirectProvider
from umbra.providers.hold import HoldProvider
from umbra.providers.reflink import ReflinkProvider
from umbra.volume.mounts import VolumeInfo

PROVIDERS: list[type[Provider]] = [CowProvider, ReflinkProvider, BtrfsProvider, DirectProvider, HoldProvider]


@dataclass(frozen=True)
class ProviderStatus:
    name: str
    kind: str
    description: str
    available: bool
    reason: str | None
    opt_in: bool = False  # used only when named with --provider


def statuses() -> list[ProviderStatus]:
    """Every provider in priority order, then the flush-and-hold step that applies to all of them."""
    out = []
    for cls in sorted(PROVIDERS, key=lambda c: c.kind):
        reason = cls.unavailable()
        kind = cls.kind.name.lower()
        out.append(ProviderStatus(cls.name, kind, cls.description, reason is None, reason, cls.opt_in))
    freeze_reason = None if os.geteuid() == 0 else "FIFREEZE needs root (CAP_SYS_ADMIN)"
    out.append(
        ProviderStatus(
            "fsfreeze",
            "step",
            "flush and hold (FIFREEZE/FITHAW) of every mounted filesystem of a set, around the commit",
            freeze_reason is None,
            freeze_reason,
        )
    )
    return out


def by_name(name: str) -> type[Provider]:
    for cls in PROVIDERS:
        if cls.name == name:
            return cls
    raise UsageError(f"unknown provider {name!r} (known: {', '.join(c.name for c in PROVIDERS)})")


def select(volume: VolumeInfo, preferred: list[str] | None = None) -> Provider:
    """The first provider, in priority order (or in ``preferred`` order), that can snapshot ``volume``;
    opt-in providers (``hold``) only when ``preferred`` names them.

    Raises:
        ProviderError: none can; the message names each provider's reason.
    """
    order = [by_name(n) for n in preferred] if preferred else sorted(PROVIDERS, key=lambda c: c.kind)
    reasons = []
    for cls in order:
        reason = cls.unavailable() or cls().probe(volume)
        if reason is None and cls.opt_in and not preferred:
            reason = f"would do, but only when chosen (--provider {cls.name})"
        if reason is None:
            return cls()
        reasons.append(f"{cls.name}: {reason}")
    raise ProviderError(provider="any", volume=volume.source, reason="; ".join(reasons))
