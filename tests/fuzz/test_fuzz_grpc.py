"""Fuzzing the site agent's gRPC front (`build_server` with the broker-credential interceptor)
over the real `PoolExecutor` with fake workers: arbitrary metadata, arbitrary field values and
raw garbage bytes as the request message. Every call ends with a gRPC status or a JobError;
the server never crashes and keeps serving."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
from fuzz_strategies import FUZZ, json_values, small_text, texts
from hypothesis import example, given, settings
from hypothesis import strategies as st

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc
from site_agent.config import ModelConfig, SiteConfig
from site_agent.executor import PoolExecutor
from site_agent.hardware import DetectedHardware
from site_agent.main import broker_verifier
from site_agent.servicer import build_server

MODEL = ModelConfig(repo_id="edif-demo/tiny-gpt2", source="/nonexistent")
METHODS = ["/edif.v1.SiteAgent/Describe", "/edif.v1.SiteAgent/Cancel"]
STREAM = "/edif.v1.SiteAgent/Execute"


class FakeWorker:
    """Parses env_json as the real worker does, then completes (payload b"slow" hangs)."""

    def __init__(self) -> None:
        self.killed = False

    async def execute(self, payload: bytes, compress: bool, env_json: str) -> AsyncIterator[tuple]:
        env = json.loads(env_json or "{}")
        yield ("running",)
        yield ("log", f"env has {len(env)} keys")
        yield ("chunk", payload[:16])
        yield ("done", {"total_bytes": len(payload[:16]), "sha256": "x", "execution_s": 0.0})

    def kill(self) -> None:
        self.killed = True


class FakeFactory:
    async def start(self, cfg: ModelConfig) -> FakeWorker:
        return FakeWorker()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """(channel, good metadata): the agent's server on its own event loop in a thread."""
    keys = KeyStore(tmp_path_factory.mktemp("grpc") / "keys")
    keys.signing_key()
    cfg = SiteConfig(site="test-site", models=[MODEL], limits={"execution_time_s": 5.0})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        executor = PoolExecutor(cfg, FakeFactory(), DetectedHardware("cpu", "CPU", 1, 1 << 30))
        await executor.start()
        server, _ = build_server(executor, broker_verifier(cfg, keys.jwks()), [])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    token = TokenIssuer(keys).issue("broker", Role.BROKER, 3600, audience="edif-site:test-site")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, (("authorization", f"Bearer {token}"),)
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
metadata = st.lists(
    st.one_of(
        st.tuples(st.just("authorization"), st.one_of(PRINTABLE, PRINTABLE.map("Bearer ".__add__))),
        st.tuples(
            st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).filter(
                lambda k: not k.startswith("grpc-") and not k.endswith("-bin")
            ),
            PRINTABLE,
        ),
        st.tuples(st.just("x-fuzz-bin"), st.binary(max_size=50)),
    ),
    max_size=4,
)


def assert_status(error: grpc.RpcError) -> None:
    assert error.code() in {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.PERMISSION_DENIED,
    }, error


def call_raw(channel, method: str, data: bytes, md, stream: bool) -> None:
    """Send `data` as the request message without any serializer."""
    try:
        if stream:
            list(channel.unary_stream(method)(data, metadata=md, timeout=10))
        else:
            channel.unary_unary(method)(data, metadata=md, timeout=10)
    except grpc.RpcError as error:
        assert_status(error)


@FUZZ
@given(md=metadata)
def test_arbitrary_metadata_is_unauthenticated(agent, md) -> None:
    channel, _ = agent
    stub = pb_grpc.SiteAgentStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Describe(pb.DescribeRequest(), metadata=md, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Execute(pb.ExecuteRequest(job_id="j", payload=b"x"), metadata=md, timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@FUZZ
@given(
    method=st.sampled_from(
        [*METHODS, STREAM, "/edif.v1.SiteAgent/Nope", "/x/y", "/grpc.health.v1.Health/Check"]
    ),
    data=st.binary(max_size=400),
    authorized=st.booleans(),
)
def test_raw_garbage_messages_get_a_status(agent, method, data, authorized) -> None:
    channel, good = agent
    call_raw(channel, method, data, good if authorized else (), stream=method == STREAM)


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, 1e-9, 1e300])
)


@FUZZ
@given(
    job_id=texts,
    model_key=st.one_of(st.just(MODEL.model_key), texts),
    payload=st.binary(max_size=300),
    compress=st.booleans(),
    env_json=st.one_of(st.just(""), st.just("{}"), json_values.map(json.dumps), small_text),
    time_limit_s=finite_or_not,
)
@example("j", MODEL.model_key, b"x", False, "{not json", 0.0)
@example("j", MODEL.model_key, b"x", False, "{}", math.nan)
@example("j", MODEL.model_key, b"x", False, "{}", math.inf)
@example("j", MODEL.model_key, b"x", False, "{}", -1.0)
def test_execute_with_any_fields_ends_cleanly(
    agent, job_id, model_key, payload, compress, env_json, time_limit_s
) -> None:
    channel, good = agent
    stub = pb_grpc.SiteAgentStub(channel)
    request = pb.ExecuteRequest(
        job_id=job_id.encode("utf-8", "replace").decode(),
        model_key=model_key.encode("utf-8", "replace").decode(),
        payload=payload,
        compress=compress,
        env_json=env_json.encode("utf-8", "replace").decode(),
        time_limit_s=time_limit_s,
    )
    try:
        updates = list(stub.Execute(request, metadata=good, timeout=20))
    except grpc.RpcError as error:
        pytest.fail(f"Execute ended with a gRPC error instead of a JobError: {error}")
    assert updates, "no update at all"
    last = updates[-1]
    assert last.HasField("done") or last.HasField("error"), last
    assert sum(u.HasField("error") for u in updates) <= 1


@settings(FUZZ, max_examples=60)
@given(job_id=texts)
def test_cancel_any_job_id(agent, job_id) -> None:
    channel, good = agent
    reply = pb_grpc.SiteAgentStub(channel).Cancel(
        pb.CancelRequest(job_id=job_id.encode("utf-8", "replace").decode()),
        metadata=good,
        timeout=10,
    )
    assert reply.found is False


def test_agent_still_serves_after_the_fuzzing(agent) -> None:
    channel, good = agent
    stub = pb_grpc.SiteAgentStub(channel)
    assert stub.Describe(pb.DescribeRequest(), metadata=good, timeout=10).site == "test-site"
    request = pb.ExecuteRequest(job_id="final", model_key=MODEL.model_key, payload=b"ok")
    updates = list(stub.Execute(request, metadata=good, timeout=20))
    assert updates[-1].HasField("done")
