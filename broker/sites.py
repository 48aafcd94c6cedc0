"""Calls from the broker to site agents (gRPC `edif.v1.SiteAgent`).

`SiteClient` is what the service and the catalog depend on; `GrpcSiteClient` is the real one:
one grpc.aio channel per site address (created lazily, inside the running event loop, which
grpc.aio channels are bound to), message limits raised so payloads and result chunks fit, and
`authorization: Bearer <token>` metadata from `SiteCredentials` on every call. Any RPC failure
becomes `SiteUnavailable`, which the service treats as "this site failed" (retryable elsewhere)
rather than as the user's error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Protocol

import grpc

from broker.ports import SiteCredentials
from edif.errors import SiteUnavailable
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024


class SiteClient(Protocol):
    async def describe(self, site: str) -> pb.SiteDescription: ...

    def execute(
        self, site: str, request: pb.ExecuteRequest
    ) -> AsyncGenerator[pb.ExecuteUpdate, None]:
        """The job's updates; raises `SiteUnavailable` if the call fails. Close it when done."""
        ...

    async def cancel(self, site: str, job_id: str) -> bool: ...

    async def close(self) -> None: ...


class GrpcSiteClient:
    def __init__(
        self,
        addresses: Mapping[str, str],
        credentials: SiteCredentials,
        describe_timeout_s: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._addresses = dict(addresses)
        self._credentials = credentials
        self._describe_timeout_s = describe_timeout_s
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def describe(self, site: str) -> pb.SiteDescription:
        try:
            return await self._stub(site).Describe(
                pb.DescribeRequest(),
                metadata=self._metadata(site),
                timeout=self._describe_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            # The catalog polls Describe and logs reachability changes itself.
            raise _unavailable(site, error, level=logging.DEBUG) from error

    async def execute(
        self, site: str, request: pb.ExecuteRequest
    ) -> AsyncGenerator[pb.ExecuteUpdate, None]:
        call = self._stub(site).Execute(request, metadata=self._metadata(site))
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as error:
            raise _unavailable(site, error) from error
        finally:
            # The consumer stopped early (broker shutdown, failure): end the call at the site too.
            call.cancel()

    async def cancel(self, site: str, job_id: str) -> bool:
        try:
            reply = await self._stub(site).Cancel(
                pb.CancelRequest(job_id=job_id),
                metadata=self._metadata(site),
                timeout=self._describe_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise _unavailable(site, error) from error
        return reply.found

    def update_addresses(self, addresses: Mapping[str, str]) -> None:
        """Follow the site catalog: sites that moved or left lose their channel (closed in the
        background, so calls still on it finish or fail on their own)."""
        for site, channel in list(self._channels.items()):
            if addresses.get(site) != self._addresses.get(site):
                del self._channels[site]
                asyncio.get_running_loop().create_task(channel.close(grace=5.0))
        self._addresses = dict(addresses)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _stub(self, site: str) -> pb_grpc.SiteAgentStub:
        address = self._addresses.get(site)
        if address is None:
            raise SiteUnavailable(f"Site {site!r} is not configured on this broker.")
        channel = self._channels.get(site)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[site] = channel
        return pb_grpc.SiteAgentStub(channel)

    def _metadata(self, site: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._credentials.token_for(site)}"),)


def _unavailable(
    site: str, error: grpc.aio.AioRpcError, level: int = logging.WARNING
) -> SiteUnavailable:
    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # An operator problem (keys, audience), not the user's; the details stay in the log.
        log.error("site %s refused the broker credential: %s", site, error.details())
        return SiteUnavailable(f"Site {site} refused the broker's credentials.")
    log.log(level, "site %s call failed: %s %s", site, code.name, error.details())
    return SiteUnavailable(f"Site {site} is unavailable ({code.name}).")
