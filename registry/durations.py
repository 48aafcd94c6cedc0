"""Go duration strings ("30s", "1500ms", "1m30s"), the format of Consul's TTL, wait and
DeregisterCriticalServiceAfter fields, to and from seconds."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def go_duration(seconds: float) -> str:
    """Whole seconds as "30s", anything finer as whole milliseconds ("1500ms")."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration; ValueError for anything else ("0" alone is allowed, as in Go)."""
    if text == "0":
        return 0.0
    parts = _PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{text!r} is not a duration like '30s' or '1m30s'")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)
