"""Test-only knobs: environment variables named ``UMBRA_TESTONLY_*``.

They make tests fast (a weak KDF, tiny packs) and must never weaken a real repository, so they are
honoured only inside pytest (``PYTEST_CURRENT_TEST`` is set) or when ``UMBRA_DEBUG_ALLOW_TESTONLY=1``
is given explicitly.
"""

from __future__ import annotations

import os


def _allowed() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("UMBRA_DEBUG_ALLOW_TESTONLY") == "1"


def testonly_enabled(name: str) -> bool:
    return _allowed() and os.environ.get(f"UMBRA_TESTONLY_{name}", "") not in ("", "0")


def testonly_int(name: str) -> int | None:
    value = os.environ.get(f"UMBRA_TESTONLY_{name}")
    if value is None or not _allowed():
        return None
    return int(value)


def testonly_str(name: str) -> str | None:
    value = os.environ.get(f"UMBRA_TESTONLY_{name}")
    return value if value and _allowed() else None
