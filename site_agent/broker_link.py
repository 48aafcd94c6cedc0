"""The agent's HTTP link to the broker it joins, and the broker-hosted catalog behind it.

Role: `BrokerLink.join` presents the join token once (`POST /sites/join`) and returns the
broker's `JoinReply` (JWKS, issuer, site credential, catalog rules). `BrokerHostedCatalog` is
the agent-side `registry.Catalog` for a broker that hosts the embedded catalog: register,
heartbeat and leave go to `/sites/{site}/...` with the site credential, which it renews
(`/sites/{site}/credential`) once half its lifetime has passed. Replies map to the typed errors
the rest of the agent already handles: 401 `AuthenticationError`, 403 `PermissionDenied`, 404
`UnknownSite` (the catalog forgot the site: register again), network errors and 5xx
`BrokerUnreachable`. Tokens are sent as headers and never logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from broker.joins import JoinReply, JoinRequest
from edif.errors import (
    AuthenticationError,
    BadRequest,
    BrokerUnreachable,
    EdifError,
    PermissionDenied,
    UnknownSite,
)
from registry.model import Health, SiteRecord

_ERRORS: dict[int, type[EdifError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: UnknownSite,
    422: BadRequest,
}


class BrokerLink:
    """HTTP calls to one broker (base URL), with a short timeout: the broker is interactive."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def join(self, join_token: str, request: JoinRequest) -> JoinReply:
        reply = await self.post("/sites/join", join_token, request.model_dump(mode="json"))
        return JoinReply.model_validate(reply.json())

    async def post(self, path: str, token: str, body: Any = None) -> httpx.Response:
        try:
            reply = await self._http.post(
                path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.HTTPError as error:
            raise BrokerUnreachable(f"broker at {self.url} unreachable: {error!r}") from error
        if reply.status_code < 300:
            return reply
        detail = _detail(reply)
        error_type = _ERRORS.get(reply.status_code, BrokerUnreachable)
        raise error_type(f"broker at {self.url} answered {reply.status_code}: {detail}")

    async def aclose(self) -> None:
        await self._http.aclose()


class BrokerHostedCatalog:
    """The `registry.Catalog` calls an agent makes, against the broker's embedded catalog."""

    def __init__(self, link: BrokerLink, reply: JoinReply) -> None:
        self._link = link
        self._site = reply.site
        self._credential = reply.credential
        self._lifetime_s = reply.credential_expires_in_s
        self._renew_at = time.monotonic() + self._lifetime_s / 2

    async def register(self, record: SiteRecord, ttl_s: float, deregister_after_s: float) -> None:
        # The broker applies its own TTL and window (it told us both in the join reply).
        await self._call("register", record.model_dump(mode="json"))

    async def heartbeat(self, site: str) -> None:
        await self._renew_if_due()
        await self._call("heartbeat")

    async def set_health(self, site: str, status: Health, note: str = "") -> None:
        if status == "passing":
            await self.heartbeat(site)  # the broker-hosted catalog takes passing heartbeats only

    async def deregister(self, site: str) -> None:
        await self._call("leave")

    async def snapshot(self) -> list[SiteRecord]:
        raise NotImplementedError("agents do not read the catalog")

    def watch(self) -> AsyncIterator[list[SiteRecord]]:
        raise NotImplementedError("agents do not read the catalog")

    async def aclose(self) -> None:
        """The link belongs to whoever made it."""

    async def _call(self, action: str, body: Any = None) -> httpx.Response:
        return await self._link.post(f"/sites/{self._site}/{action}", self._credential, body)

    async def _renew_if_due(self) -> None:
        if time.monotonic() < self._renew_at:
            return
        reply = (await self._call("credential")).json()
        self._credential = reply["credential"]
        self._lifetime_s = int(reply["credential_expires_in_s"])
        self._renew_at = time.monotonic() + self._lifetime_s / 2


def _detail(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("detail", reply.text))[:300]
    except ValueError:
        return reply.text[:300]
