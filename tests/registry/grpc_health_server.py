"""A gRPC server on 127.0.0.1 that speaks only the standard health protocol, for gRPC checks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.asynccontextmanager
async def grpc_health_server() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    """("127.0.0.1:port", servicer); the overall ("") service starts SERVING."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", SERVING)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(grace=None)
