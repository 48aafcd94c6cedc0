"""The unmodified nnsight 0.8.1 client against the broker served by uvicorn on loopback.

The client's transport (websocket-client, httpx multipart POST, polling, result download,
`nnsight.status/whoami/compare`) runs as shipped; only `_serialize` is replaced, so no model
needs to be built: the fake site ignores the payload and returns a canned result.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import zstandard
from broker_fakes import (
    GPT2_KEY,
    HANG,
    RESULT,
    FakeAuthenticator,
    decode,
    describe,
    error,
    happy,
    settings_for,
    status,
)
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.request import RequestModel

from broker.app import create_app
from broker.main import BrokerServer, lifespan_for, server_for
from proto import site_agent_pb2 as pb


class CannedBackend(RemoteBackend):
    """RemoteBackend as shipped, minus serializing a real trace."""

    def _serialize(self, tracer) -> bytes:
        return b"canned payload"


def compressed_when_asked(request: pb.ExecuteRequest) -> list:
    data = zstandard.ZstdCompressor().compress(RESULT) if request.compress else RESULT
    return happy(data)


@pytest.fixture
def serve(make_service, tmp_path, sites):
    """`serve(**settings)` -> base URL of a broker served by uvicorn in a thread."""
    running: list[tuple[BrokerServer, threading.Thread]] = []
    sites.scripts["site-a"] = compressed_when_asked

    def start(**overrides) -> str:
        service = make_service(**overrides)
        app = create_app(
            service,
            FakeAuthenticator(),
            settings_for(tmp_path, **overrides),
            lambda: {"keys": []},
            lifespan_for(service),
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = server_for(app, service)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        running.append((server, thread))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    start.running = running  # type: ignore[attr-defined]
    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def blocking(url: str, compress: bool = True, api_key: str = "alice-token"):
    backend = CannedBackend(GPT2_KEY, host=url, api_key=api_key)
    backend.compress = compress
    request = RequestModel(model_key=GPT2_KEY, compress=compress)
    return backend, backend.request(request, None)


@pytest.mark.parametrize("inline_max_bytes", [8 * 1024 * 1024, 0], ids=["inline", "url"])
@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "raw"])
def test_blocking_trace_round_trip(serve, capsys, inline_max_bytes, compress) -> None:
    url = serve(inline_max_bytes=inline_max_bytes)
    backend, result = blocking(url, compress)
    assert torch.equal(result["x"], torch.arange(5))
    assert backend.meta["site"] == "site-a"
    assert "torch.Size([1, 7, 64])" in capsys.readouterr().out  # the LOG line


def test_non_blocking_submit_and_poll(serve) -> None:
    url = serve()
    backend = CannedBackend(GPT2_KEY, host=url, api_key="alice-token", blocking=False)
    backend.compress = False
    assert backend(None) is None  # submit
    assert backend.job_id
    for _ in range(200):
        result = backend(None)  # poll
        if result is not None:
            break
        time.sleep(0.02)
    assert torch.equal(result["x"], torch.arange(5))


def test_remote_error_reaches_the_user(serve, sites) -> None:
    url = serve()
    sites.script("site-a", [error(pb.USER, "Traceback ...\nAttributeError: no layer 7")])
    with pytest.raises(RemoteError, match="AttributeError: no layer 7"):
        blocking(url)


def test_bad_key_and_version_gate_read_as_remote_errors(serve, sites) -> None:
    url = serve()
    with pytest.raises(RemoteError, match="Failed to send request: API key is not a valid"):
        blocking(url, api_key="forged")
    sites.descriptions["site-a"] = describe("site-a", GPT2_KEY, nnsight="9.9.9")
    url = serve()
    with pytest.raises(RemoteError, match=r"nnsight 0\.8\.1 is not served here.*nnsight==9\.9\.9"):
        blocking(url)


def test_status_whoami_compare(serve, monkeypatch) -> None:
    import nnsight
    from nnsight import ndif

    url = serve()
    monkeypatch.setattr(CONFIG.API, "HOST", url)
    assert "openai-community/gpt2" in nnsight.status()
    assert "deployments" in nnsight.status(raw=True)
    assert ndif.is_model_running.__name__  # exists; it needs the Hub, so not called here
    assert nnsight.whoami("alice-token")["email"] == "alice@example.org"
    assert nnsight.whoami("forged")["email"] is None
    ndif.get_remote_env(force_refresh=True)
    comparison = nnsight.compare()
    assert not comparison.critical_mismatches


def test_stopping_the_broker_ends_open_jobs_with_error(serve, sites) -> None:
    import json

    import websocket

    url = serve()
    sites.script("site-a", [status(pb.RUNNING), HANG])
    ws = websocket.create_connection(url.replace("http", "ws") + "/subscribe")
    session_id = json.loads(ws.recv())["session_id"]
    backend = CannedBackend(GPT2_KEY, host=url, api_key="alice-token")
    backend._post(RequestModel(model_key=GPT2_KEY, session_id=session_id), b"blob")
    while decode(ws.recv()).status != "RUNNING":
        pass
    server, thread = serve.running[-1]
    server.should_exit = True
    while (frame := decode(ws.recv())).status == "RUNNING":
        pass  # heartbeats
    assert frame.status == "ERROR"
    assert "broker stopped" in frame.description
    thread.join(timeout=10)
    ws.close()
