"""HTTP `Range` requests on a result (RFC 9110 §14), as a pure decision on the headers.

Only single byte ranges are served (`bytes=a-b`, `bytes=a-`, `bytes=-n`): that is what a
resuming download sends. Anything the RFC lets a server ignore — another unit, several ranges,
bad syntax, an `If-Range` that does not match the current entity tag — gets the whole result
(200). A well-formed range that lies wholly past the end is `Unsatisfiable` (416).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SINGLE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Whole:
    """Send everything with 200."""


@dataclass(frozen=True)
class Partial:
    """Send bytes `start..end` (inclusive) with 206."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


@dataclass(frozen=True)
class Unsatisfiable:
    """Answer 416 with `Content-Range: bytes */size`."""

    def content_range(self, size: int) -> str:
        return f"bytes */{size}"


Plan = Whole | Partial | Unsatisfiable


def plan(range_header: str | None, if_range: str | None, size: int, etag: str) -> Plan:
    """What to send for a GET of a `size`-byte entity whose strong entity tag is `etag`."""
    if not range_header:
        return Whole()
    # If-Range with a date, a weak tag or another tag: the client's partial copy may be of other
    # bytes, so it must get the whole (we send no Last-Modified, so no date can match).
    if if_range is not None and if_range.strip() != etag:
        return Whole()
    match = _SINGLE.match(range_header)
    if match is None:
        return Whole()
    first, last = match.groups()
    if not first:
        if not last:
            return Whole()  # "bytes=-" is not a range
        suffix = int(last)
        if suffix == 0 or size == 0:
            return Unsatisfiable()
        return Partial(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return Whole()  # invalid: ignored
    if start >= size:
        return Unsatisfiable()
    return Partial(start, min(end, size - 1))
