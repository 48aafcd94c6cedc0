"""GrpcSiteClient against a real grpc.aio server on loopback."""

from __future__ import annotations

import grpc
import pytest
from broker_fakes import GPT2_KEY, describe

from broker.sites import GrpcSiteClient
from edif.errors import SiteUnavailable
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc

BIG = 6 * 1024 * 1024  # over gRPC's 4 MiB default


class Credentials:
    def token_for(self, site: str) -> str:
        return f"token-for-{site}"


class Agent(pb_grpc.SiteAgentServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.payload_sizes: list[int] = []
        self.cancelled: list[str] = []

    def _check(self, context) -> bool:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        return metadata.get("authorization") == "Bearer token-for-site-a"

    async def Describe(self, request, context):  # noqa: N802
        if not self._check(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return describe("site-a", GPT2_KEY)

    async def Execute(self, request, context):  # noqa: N802
        self._check(context)
        self.payload_sizes.append(len(request.payload))
        yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING))
        yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=b"x" * BIG))
        if request.job_id == "breaks":
            await context.abort(grpc.StatusCode.INTERNAL, "worker crashed")
        yield pb.ExecuteUpdate(done=pb.ResultEnd(total_bytes=BIG))

    async def Cancel(self, request, context):  # noqa: N802
        self.cancelled.append(request.job_id)
        return pb.CancelReply(found=True)


@pytest.fixture
async def agent():
    servicer = Agent()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    pb_grpc.add_SiteAgentServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_calls_carry_the_bearer_token_and_big_messages_fit(agent) -> None:
    servicer, address = agent
    client = GrpcSiteClient({"site-a": address}, Credentials(), describe_timeout_s=5)
    description = await client.describe("site-a")
    assert description.models[0].model_key == GPT2_KEY
    request = pb.ExecuteRequest(job_id="j1", model_key=GPT2_KEY, payload=b"p" * BIG)
    kinds = [u.WhichOneof("update") async for u in client.execute("site-a", request)]
    assert kinds == ["status", "chunk", "done"]
    assert servicer.payload_sizes == [BIG]
    assert await client.cancel("site-a", "j1") is True
    assert servicer.cancelled == ["j1"]
    assert all(m["authorization"] == "Bearer token-for-site-a" for m in servicer.metadata)
    await client.close()


async def test_a_stream_that_breaks_is_site_unavailable(agent) -> None:
    _, address = agent
    client = GrpcSiteClient({"site-a": address}, Credentials())
    seen = []
    with pytest.raises(SiteUnavailable, match=r"site-a is unavailable \(INTERNAL\)"):
        async for update in client.execute("site-a", pb.ExecuteRequest(job_id="breaks")):
            seen.append(update.WhichOneof("update"))
    assert seen == ["status", "chunk"]
    await client.close()


async def test_refused_credentials_and_dead_sites(agent) -> None:
    _, address = agent

    class Wrong:
        def token_for(self, site: str) -> str:
            return "wrong"

    client = GrpcSiteClient({"site-a": address, "dead": "127.0.0.1:1"}, Wrong(), 2)
    with pytest.raises(SiteUnavailable, match="refused the broker's credentials"):
        await client.describe("site-a")
    with pytest.raises(SiteUnavailable, match="dead is unavailable"):
        await client.describe("dead")
    with pytest.raises(SiteUnavailable, match="not configured"):
        await client.describe("elsewhere")
    await client.close()
