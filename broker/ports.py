"""The narrow interfaces the broker's parts depend on, so each is tested with small fakes.

- `Authenticator` / `Identity`: who sent a request (the real one is `auth.tokens.TokenVerifier`).
- `SiteCredentials`: the broker-signed bearer token a site agent expects on every call.
- `JobService`: everything the HTTP front may ask of the broker; the front holds no logic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from broker.results import ResultFile
from broker.sessions import FrameSink
from broker.wire import StatusMessage


class Identity(Protocol):
    @property
    def sub(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def groups(self) -> Sequence[str]: ...


class Authenticator(Protocol):
    def verify(self, token: str | None) -> Identity:
        """The identity behind `token`, or `edif.errors.AuthenticationError`."""
        ...


class SiteCredentials(Protocol):
    def token_for(self, site: str) -> str:
        """A bearer token for calls to `site` (sent as `authorization: Bearer <token>`)."""
        ...


class JobService(Protocol):
    async def open_session(self, sink: FrameSink, identity: Identity | None) -> str:
        """Register a `/subscribe` socket; returns its session id."""
        ...

    async def close_session(self, session_id: str) -> None: ...

    async def submit(
        self,
        identity: Identity,
        envelope: str | bytes,
        payload: bytes,
        headers: Mapping[str, str],
        base_url: str,
    ) -> StatusMessage:
        """Validate and accept one job; returns its RECEIVED status (the POST reply)."""
        ...

    async def status_of(self, identity: Identity, job_id: str) -> StatusMessage:
        """The latest status of the caller's own job, or `NotFound`."""
        ...

    def open_result(self, job_id: str, token: str) -> ResultFile:
        """The stored result a result URL points to, or `NotFound` / `ResultExpired`."""
        ...

    def deployments(self) -> dict[str, Any]:
        """`GET /status` body: every site's models in nnsight's `deployments` shape."""
        ...

    def environment(self) -> dict[str, Any]:
        """`GET /env` body: the pinned site environment."""
        ...
