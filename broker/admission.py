"""Admission policies for `POST /request`, as pure functions: each returns the accepted value
or raises the typed error (4xx) whose message the client prints as
`RemoteError: Failed to send request: <message>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edif.errors import BadRequest, ClientVersionError, PayloadTooLarge, PermissionDenied

MAX_ENV_BYTES = 64 * 1024
MAX_SESSION_ID_CHARS = 128

# Machine identities (a site agent, the broker itself) never submit researcher jobs.
SUBMIT_ROLES = frozenset({"researcher", "site_admin", "governance", "admin"})


class Envelope(BaseModel):
    """The `data` form field: nnsight's `RequestModel.metadata()`."""

    model_config = ConfigDict(extra="ignore")

    model_key: str
    session_id: str = Field(default="", max_length=MAX_SESSION_ID_CHARS)
    compress: bool = False
    env: dict[str, Any] = Field(default_factory=dict)


def parse_envelope(raw: str | bytes) -> Envelope:
    try:
        envelope = Envelope.model_validate_json(raw)
    except ValidationError as error:
        raise BadRequest(f"The request envelope is invalid: {_summary(error)}") from error
    if len(env_json(envelope)) > MAX_ENV_BYTES:
        raise BadRequest(f"The request env is larger than {MAX_ENV_BYTES} bytes.")
    return envelope


def env_json(envelope: Envelope) -> str:
    return json.dumps(envelope.env, separators=(",", ":"), sort_keys=True)


def check_role(role: str) -> None:
    if str(role) not in SUBMIT_ROLES:
        raise PermissionDenied(f"Tokens with role {str(role)!r} cannot submit jobs.")


def check_payload_size(size: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(
            f"The request payload is {size} bytes; this broker accepts at most {limit}. "
            "Ship smaller tensors with the request, or compute them remotely."
        )
    if size == 0:
        raise BadRequest("The request payload (blob) is empty.")


def check_client_version(reported: str | None, served: Collection[str]) -> str | None:
    """The client's nnsight version if a site serves it; `served` empty means no site is known."""
    version = (reported or "").strip()
    if not served or version in served:
        return version or None
    wanted = _newest(served)
    shown = f"nnsight {version[:40]}" if version else "A client without a reported nnsight version"
    raise ClientVersionError(
        f"{shown} is not served here; sites run nnsight {', '.join(sorted(served))}: "
        f"pip install nnsight=={wanted}"
    )


def _newest(versions: Collection[str]) -> str:
    def numeric(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version))

    return max(versions, key=numeric)


def _summary(error: ValidationError) -> str:
    """Field and reason for each problem, without echoing the submitted values."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"])
        parts.append(f"{where}: {problem['msg']}" if where else problem["msg"])
    return "; ".join(parts)
