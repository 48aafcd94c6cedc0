"""The agent's gRPC front over a fake Executor: auth interceptor, streaming, health."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc
from site_agent.config import SiteConfig
from site_agent.executor import JobSpec
from site_agent.main import broker_verifier
from site_agent.servicer import build_server, set_health


class FakeExecutor:
    def __init__(self) -> None:
        self.jobs: list[JobSpec] = []
        self.cancelled: list[str] = []

    def describe(self) -> pb.SiteDescription:
        return pb.SiteDescription(site="test-site", capacity=1)

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        self.jobs.append(job)
        yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING))
        for part in (b"ab", b"cd"):
            yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=part))
        yield pb.ExecuteUpdate(done=pb.ResultEnd(total_bytes=4))

    async def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    store = KeyStore(tmp_path / "keys")
    store.signing_key()
    return store


@pytest.fixture
async def agent(keys):
    cfg = SiteConfig(site="test-site", models=[{"repo_id": "edif-demo/tiny-gpt2"}])
    executor = FakeExecutor()
    server, health = build_server(executor, broker_verifier(cfg, keys.jwks()), [])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_health(health, {cfg.models[0].model_key: True})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield executor, channel, cfg
    await channel.close()
    await server.stop(None)


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


async def test_broker_credential_admits_calls(agent, keys) -> None:
    executor, channel, cfg = agent
    token = TokenIssuer(keys).issue("broker", Role.BROKER, 60, audience="edif-site:test-site")
    stub = pb_grpc.SiteAgentStub(channel)
    described = await stub.Describe(pb.DescribeRequest(), metadata=bearer(token))
    assert described.site == "test-site"
    request = pb.ExecuteRequest(job_id="j1", model_key="k", payload=b"\x80\x04", compress=True)
    updates = [u async for u in stub.Execute(request, metadata=bearer(token))]
    assert b"".join(u.chunk.data for u in updates if u.HasField("chunk")) == b"abcd"
    assert executor.jobs[0].job_id == "j1" and executor.jobs[0].compress
    reply = await stub.Cancel(pb.CancelRequest(job_id="j1"), metadata=bearer(token))
    assert reply.found and executor.cancelled == ["j1"]


@pytest.mark.parametrize(
    "make_token",
    [
        lambda keys, other: None,
        lambda keys, other: "not-a-jwt",
        # a researcher's token is not a broker credential
        lambda keys, other: TokenIssuer(keys).issue(
            "alice", Role.RESEARCHER, 60, audience="edif-site:test-site"
        ),
        # a broker token for another site
        lambda keys, other: TokenIssuer(keys).issue(
            "broker", Role.BROKER, 60, audience="edif-site:elsewhere"
        ),
        # signed by a key this site does not trust
        lambda keys, other: TokenIssuer(other).issue(
            "broker", Role.BROKER, 60, audience="edif-site:test-site"
        ),
    ],
    ids=["none", "garbage", "researcher-role", "other-site", "foreign-key"],
)
async def test_calls_without_a_valid_broker_credential_are_refused(
    agent, keys, tmp_path, make_token
) -> None:
    executor, channel, _ = agent
    token = make_token(keys, KeyStore(tmp_path / "other"))
    metadata = bearer(token) if token else ()
    stub = pb_grpc.SiteAgentStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Describe(pb.DescribeRequest(), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    request = pb.ExecuteRequest(job_id="j1", model_key="k", payload=b"x")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [u async for u in stub.Execute(request, metadata=metadata)]
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert executor.jobs == []


async def test_health_is_served_per_model_without_credentials(agent) -> None:
    _, channel, cfg = agent
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=cfg.models[0].model_key))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
