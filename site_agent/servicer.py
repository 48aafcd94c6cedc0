"""gRPC front of the site agent: a thin adapter from edif.v1.SiteAgent to an `Executor`.

Authentication is an interceptor: every call must carry `authorization: Bearer <jwt>` signed
by the broker this site trusts (role `broker`, audience `edif-site:<site>`); anything else is
refused with UNAUTHENTICATED before a servicer method runs. The standard grpc.health.v1 service
is served beside it (unauthenticated, as health probes expect), one entry per model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edif.errors import AuthenticationError, PermissionDenied
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc
from proto.chunks import add_servicer
from site_agent.executor import Executor, JobSpec
from site_agent.telemetry import AgentTelemetry

log = logging.getLogger("edif.agent.grpc")

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)


class SiteAgentServicer(pb_grpc.SiteAgentServicer):
    def __init__(self, executor: Executor, telemetry: AgentTelemetry | None = None) -> None:
        self.executor = executor
        self.telemetry = telemetry or AgentTelemetry.disabled()

    async def Describe(self, request: pb.DescribeRequest, context) -> pb.SiteDescription:  # noqa: N802
        return self.executor.describe()

    async def Execute(  # noqa: N802
        self, request: pb.ExecuteRequest, context
    ) -> AsyncIterator[pb.ExecuteUpdate]:
        # The job's spans continue the broker's trace (traceparent in the call's metadata).
        traced = self.telemetry.job(request, context.invocation_metadata())
        try:
            async for update in self._execute(request):
                traced.update(update)
                yield update
        finally:
            traced.close()

    async def _execute(self, request: pb.ExecuteRequest) -> AsyncIterator[pb.ExecuteUpdate]:
        if not _is_json_object(request.env_json or "{}"):  # the worker would fail on it
            refusal = "env_json is not a JSON object"
            yield pb.ExecuteUpdate(error=pb.JobError(kind=pb.REFUSED, description=refusal))
            return
        job = JobSpec(
            job_id=request.job_id,
            model_key=request.model_key,
            payload=request.payload,
            compress=request.compress,
            env_json=request.env_json or "{}",
            time_limit_s=request.time_limit_s,
        )
        async for update in self.executor.execute(job):
            yield update

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelReply:  # noqa: N802
        return pb.CancelReply(found=await self.executor.cancel(request.job_id))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


class BrokerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every SiteAgent call that does not carry a valid broker credential."""

    def __init__(self, verify: Callable[[str | None], Any]) -> None:
        self.verify = verify

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_UNAUTHENTICATED_METHODS):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        try:
            self.verify(token)
        except (AuthenticationError, PermissionDenied) as exc:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        return await continuation(details)


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def build_server(
    executor: Executor,
    verify: Callable[[str | None], Any],
    model_keys: list[str],
    telemetry: AgentTelemetry | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(
        interceptors=[BrokerAuthInterceptor(verify)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_servicer(SiteAgentServicer(executor, telemetry), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def set_health(servicer: health.aio.HealthServicer, statuses: dict[str, bool]) -> None:
    """Publish one health entry per model key, plus "" for the agent as a whole."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name, ok in statuses.items():
        await servicer.set(name, serving if ok else not_serving)
    await servicer.set("", serving if any(statuses.values()) else not_serving)
