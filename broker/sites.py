"""Calls from the broker to site agents (gRPC `edif.v1.SiteAgent`).

`SiteClient` is what the service and the catalog depend on; `GrpcSiteClient` is the real one:
one grpc.aio channel per site address (created lazily, inside the running event loop, which
grpc.aio channels are bound to), message limits raised so payloads and result chunks fit, and
`authorization: Bearer <token>` metadata from `SiteCredentials` on every call. A site that
joined with TLS gets a TLS channel verified as `broker.site_tls.SiteTlsPins` says (re-made when
that changes). Any RPC failure becomes `SiteUnavailable`, which the service treats as "this
site failed" (retryable elsewhere) rather than as the user's error; TLS mismatches say so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Protocol

import grpc

from broker.ports import SiteCredentials
from broker.site_tls import ChannelSecurity, SiteTlsPins
from broker.telemetry.observer import JobObserver
from edif.errors import SiteUnavailable
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc
from proto.chunks import EXECUTE_METHOD, parse_update

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
        tls: SiteTlsPins | None = None,
        observer: JobObserver | None = None,  # telemetry: trace context out, result timing
    ) -> None:
        self._addresses = dict(addresses)
        self._observer = observer or JobObserver()
        self._tls = tls  # which sites serve TLS, and whose trust to verify them with
        self._security: dict[str, ChannelSecurity | None] = {}  # what each channel was made with
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
            raise self._unavailable(site, error, level=logging.DEBUG) from error

    async def execute(
        self, site: str, request: pb.ExecuteRequest
    ) -> AsyncGenerator[pb.ExecuteUpdate, None]:
        # The job's trace continues at the site: W3C traceparent beside the credential.
        watch = self._observer.site_call(request.job_id, site)
        metadata = self._metadata(site) + watch.headers()
        call = self._execute_method(site)(request, metadata=metadata)
        try:
            async for update in call:
                watch.update(update)
                yield update
        except grpc.aio.AioRpcError as error:
            raise self._unavailable(site, error) from error
        finally:
            # The consumer stopped early (broker shutdown, failure): end the call at the site too.
            call.cancel()
            watch.close()

    async def cancel(self, site: str, job_id: str) -> bool:
        try:
            reply = await self._stub(site).Cancel(
                pb.CancelRequest(job_id=job_id),
                metadata=self._metadata(site),
                timeout=self._describe_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise self._unavailable(site, error) from error
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

    def _execute_method(self, site: str) -> grpc.aio.UnaryStreamMultiCallable:
        """`Execute`, reading result chunks as views into the received messages
        (`proto.chunks`: no protobuf copies of the result's bytes)."""
        return self._channel(site).unary_stream(
            EXECUTE_METHOD,
            request_serializer=pb.ExecuteRequest.SerializeToString,
            response_deserializer=parse_update,
        )

    def _stub(self, site: str) -> pb_grpc.SiteAgentStub:
        return pb_grpc.SiteAgentStub(self._channel(site))

    def _channel(self, site: str) -> grpc.aio.Channel:
        """The site's channel, opened on first use and replaced when its trust changed."""
        address = self._addresses.get(site)
        if address is None:
            raise SiteUnavailable(f"Site {site!r} is not configured on this broker.")
        security = self._tls.channel_security(site) if self._tls is not None else None
        channel = self._channels.get(site)
        if channel is not None and self._security.get(site) != security:  # re-joined: new trust
            del self._channels[site]
            asyncio.get_running_loop().create_task(channel.close(grace=5.0))
            channel = None
        if channel is None:
            channel = _open_channel(address, security, self._options)
            self._channels[site] = channel
            self._security[site] = security
        return channel

    def _unavailable(
        self, site: str, error: grpc.aio.AioRpcError, level: int = logging.WARNING
    ) -> SiteUnavailable:
        return _unavailable(site, error, level, self._security.get(site))

    def _metadata(self, site: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._credentials.token_for(site)}"),)


def _open_channel(
    address: str, security: ChannelSecurity | None, options: list[tuple[str, int]]
) -> grpc.aio.Channel:
    if security is None:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        security.root_pem, security.client_key, security.client_cert
    )
    extra: list[tuple[str, Any]] = []
    if security.server_name:  # the certificate names a host, the site advertises an address
        extra.append(("grpc.ssl_target_name_override", security.server_name))
    return grpc.aio.secure_channel(address, credentials, options=[*options, *extra])


def _unavailable(
    site: str,
    error: grpc.aio.AioRpcError,
    level: int = logging.WARNING,
    security: ChannelSecurity | None = None,
) -> SiteUnavailable:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # An operator problem (keys, audience), not the user's; the details stay in the log.
        log.error("site %s refused the broker credential: %s", site, details)
        return SiteUnavailable(f"Site {site} refused the broker's credentials.")
    if tls_problem := _tls_problem(site, details, security):
        log.log(max(level, logging.INFO), "%s (%s)", tls_problem, details)
        return SiteUnavailable(tls_problem)
    log.log(level, "site %s call failed: %s %s", site, code.name, details)
    return SiteUnavailable(f"Site {site} is unavailable ({code.name}).")


def _tls_problem(site: str, details: str, security: ChannelSecurity | None) -> str | None:
    """An operator-facing sentence for a TLS mismatch, recognised in gRPC's error details."""
    if "failed to connect" not in details:  # only connection set-up, not a site dying mid-call
        return None
    if security is None:
        if "Socket closed" in details:  # a TLS server drops a plaintext HTTP/2 preface
            return (
                f"Site {site} closed the plaintext connection: if it serves TLS, the broker has "
                "no TLS settings for it (the site must join again with `tls:` in its config)."
            )
        return None
    if "CERTIFICATE_VERIFY_FAILED" in details or "Hostname Verification" in details:
        return f"Site {site}'s TLS certificate did not verify against {security.source}."
    if "handshake" in details.lower() or "Socket closed" in details:
        return f"The TLS handshake with site {site} failed (does it require a client certificate?)."
    return None
