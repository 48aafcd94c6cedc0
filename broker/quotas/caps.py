"""Admission caps: concurrent jobs, request payload size and result size, as pure checks.

Each returns nothing or raises the typed error whose message the nnsight client prints as
`RemoteError: Failed to send request: <message>` (at POST time) or as the job's ERROR (the
result cap, which can only be known while the site streams the result back).
"""

from __future__ import annotations

from edif.errors import PayloadTooLarge, QuotaExceeded


def check_concurrent(active: int, limit: int) -> None:
    """`active` is the user's unfinished jobs before this one."""
    if active >= limit:
        raise QuotaExceeded(
            f"Quota exceeded: concurrent jobs: you have {active} unfinished job(s), the limit "
            f"is {limit}. It frees up as soon as one of them finishes; retry then."
        )


def check_payload(size: int, limit: int) -> None:
    # 413, not 429: retrying the same request cannot succeed.
    if size > limit:
        raise PayloadTooLarge(
            f"Quota exceeded: request payload size: this request is {size} bytes, your limit is "
            f"{limit} bytes per request (it does not reset). Ship smaller tensors with the "
            "request, or compute them remotely."
        )


def check_result(size: int, limit: int) -> None:
    """`size` is the result bytes received (or announced) so far."""
    if size > limit:
        raise QuotaExceeded(
            f"Quota exceeded: result size: your job's result is at least {size} bytes, your "
            f"limit is {limit} bytes per job (it does not reset). Save fewer or smaller "
            "tensors (e.g. slice or reduce them remotely before .save())."
        )
