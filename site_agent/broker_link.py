"""The agent's HTTP link to the broker it joins, and the broker-hosted catalog behind it.

Role: `BrokerLink.join` presents the join token once (`POST /sites/join`) and returns the
broker's `JoinReply` (JWKS, issuer, site credential, catalog rules); `BrokerLink.rejoin` does
the same with a stored site credential. `CredentialKeeper` holds the current site credential,
renews it (`/sites/{site}/credential`) once half its lifetime has passed and stores every new
one (`site_agent.credential_store`), whichever catalog the site registers in.
`BrokerHostedCatalog` is the agent-side `registry.Catalog` for a broker that hosts the embedded
catalog: register, heartbeat and leave go to `/sites/{site}/...` with the keeper's credential.
Replies map to the typed errors
the rest of the agent already handles: 401 `AuthenticationError`, 403 `PermissionDenied`, 404
`UnknownSite` (the catalog forgot the site: register again), network errors and 5xx
`BrokerUnreachable`. Tokens are sent as headers and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from broker.joins import JoinReply, JoinRequest
from edif.clock import Clock
from edif.errors import (
    AuthenticationError,
    BadRequest,
    BrokerUnreachable,
    EdifError,
    PermissionDenied,
    UnknownSite,
)
from registry.model import Health, SiteRecord
from site_agent.credential_store import CredentialFile, StoredCredential

log = logging.getLogger("edif.agent.link")

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

    async def rejoin(self, credential: str, request: JoinRequest) -> JoinReply:
        body = request.model_dump(mode="json")
        reply = await self.post(f"/sites/{request.site}/rejoin", credential, body)
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


class CredentialKeeper:
    """The site credential: current value, renewal at half-life, stored after every change."""

    RETRY_S = 30.0

    def __init__(
        self, link: BrokerLink, file: CredentialFile, reply: JoinReply, clock: Clock
    ) -> None:
        self._link = link
        self._file = file
        self._clock = clock
        self._site = reply.site
        self.stored = self._keep(reply.credential, reply.credential_expires_in_s)

    @property
    def token(self) -> str:
        return self.stored.credential

    async def renew_if_due(self) -> None:
        if not self.stored.renew_due(self._clock.now()):
            return
        reply = await self._link.post(f"/sites/{self._site}/credential", self.token)
        body = reply.json()
        self.stored = self._keep(body["credential"], int(body["credential_expires_in_s"]))
        log.info("site credential renewed (stored in %s)", self._file.path)

    async def run(self) -> None:
        """Renew whenever due, until cancelled; failures are retried every RETRY_S."""
        while True:
            try:
                await self.renew_if_due()
                wait = self.stored.renew_at - self._clock.now()
            except EdifError as error:
                log.warning("renewing the site credential failed: %s", error.message)
                wait = self.RETRY_S
            await asyncio.sleep(min(max(wait, 1.0), 300.0))

    def _keep(self, credential: str, lifetime_s: int) -> StoredCredential:
        now = self._clock.now()
        stored = StoredCredential(self._link.url, self._site, credential, now, now + lifetime_s)
        try:
            self._file.save(stored)
        except OSError as error:  # serving goes on; only a later rejoin would need a token
            log.warning("cannot store the site credential in %s: %s", self._file.path, error)
        return stored


class BrokerHostedCatalog:
    """The `registry.Catalog` calls an agent makes, against the broker's embedded catalog."""

    def __init__(self, link: BrokerLink, reply: JoinReply, keeper: CredentialKeeper) -> None:
        self._link = link
        self._site = reply.site
        self._keeper = keeper

    async def register(self, record: SiteRecord, ttl_s: float, deregister_after_s: float) -> None:
        # The broker applies its own TTL and window (it told us both in the join reply).
        await self._call("register", record.model_dump(mode="json"))

    async def heartbeat(self, site: str) -> None:
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
        return await self._link.post(f"/sites/{self._site}/{action}", self._keeper.token, body)


def _detail(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("detail", reply.text))[:300]
    except ValueError:
        return reply.text[:300]
