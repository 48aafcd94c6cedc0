"""The HTTP front through Starlette's test client: the nnsight wire protocol, and 4xx (never
5xx) for every client mistake."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from broker_fakes import GPT2_KEY, LLAMA_KEY, RESULT, decode, load_result

ALICE = {"ndif-api-key": "alice-token", "nnsight-version": "0.8.1"}
BOB = {"ndif-api-key": "bob-token", "nnsight-version": "0.8.1"}


def envelope(session_id: str = "", key: str = GPT2_KEY) -> str:
    return json.dumps({"model_key": key, "session_id": session_id, "compress": False, "env": {}})


def post(client, headers=ALICE, data: str | None = None, blob: bytes = b"blob"):
    return client.post(
        "/request",
        data={"data": data if data is not None else envelope()},
        files={"blob": ("request", blob, "application/octet-stream")},
        headers=headers,
    )


def run_on_socket(client, headers=ALICE, ws_headers=None):
    """The blocking client's sequence: subscribe, POST, read frames until terminal."""
    ws_headers = ws_headers if ws_headers is not None else {"ndif-api-key": headers["ndif-api-key"]}
    with client.websocket_connect("/subscribe", headers=ws_headers) as ws:
        first = ws.receive()
        assert "text" in first, "the first frame must be a text frame"
        session_id = json.loads(first["text"])["session_id"]
        reply = post(client, headers, envelope(session_id))
        assert reply.status_code == 200, reply.text
        frames = []
        while True:
            message = ws.receive()
            frame = decode(message.get("bytes") or message.get("text"))
            frames.append((frame, "bytes" in message and message["bytes"] is not None))
            if frame.status in ("COMPLETED", "ERROR"):
                return reply.json(), frames


@pytest.fixture
def client(make_client):
    return make_client()


def test_blocking_flow_with_inline_result(client) -> None:
    reply, frames = run_on_socket(client)
    assert reply["status"] == "RECEIVED"
    assert set(reply) >= {"id", "status", "description"}
    statuses = [frame.status.value for frame, _ in frames]
    assert statuses == ["QUEUED", "DISPATCHED", "QUEUED", "RUNNING", "LOG", "COMPLETED"]
    completed, binary = frames[-1]
    assert binary
    assert torch.equal(load_result(completed.data)["x"], torch.arange(5))
    assert completed.meta["site"] == "site-a"


def test_large_result_url_downloads_without_headers(make_client) -> None:
    client = make_client(inline_max_bytes=10)
    reply, frames = run_on_socket(client)
    completed, binary = frames[-1]
    assert not binary
    url = completed.data
    assert url.startswith(f"http://broker.test/results/{reply['id']}/")
    download = client.get(url)  # no key, no version header
    assert download.status_code == 200
    assert download.content == RESULT
    assert download.headers["content-length"] == str(len(RESULT))
    assert client.get(url + "x").status_code == 404
    assert client.get(f"/results/{reply['id']}/guess").status_code == 404


def test_expired_result_url_is_410(make_client, clock) -> None:
    client = make_client(inline_max_bytes=10, result_ttl_s=60)
    _, frames = run_on_socket(client)
    clock.advance(61)
    response = client.get(frames[-1][0].data)
    assert response.status_code == 410
    assert "expired" in response.json()["detail"]


def test_poll_is_owner_only(client) -> None:
    reply, _ = run_on_socket(client)
    job_id = reply["id"]
    polled = client.get(f"/response/{job_id}", headers={"ndif-api-key": "alice-token"})
    assert polled.status_code == 200
    assert polled.json()["status"] == "COMPLETED"
    assert polled.json()["data"].startswith("http://broker.test/results/")
    for headers in ({"ndif-api-key": "bob-token"}, {}, {"ndif-api-key": "forged"}):
        assert client.get(f"/response/{job_id}", headers=headers).status_code == 404
    assert (
        client.get("/response/unknown", headers={"ndif-api-key": "alice-token"}).status_code == 404
    )


def test_post_without_or_with_a_bad_key_is_401_with_detail(client) -> None:
    for headers in ({"nnsight-version": "0.8.1"}, {**ALICE, "ndif-api-key": "forged"}):
        response = post(client, headers)
        assert response.status_code == 401
        assert "API key" in response.json()["detail"]


def test_socket_opens_without_key_and_post_is_refused(client) -> None:
    with client.websocket_connect("/subscribe") as ws:
        session_id = json.loads(ws.receive_text())["session_id"]
        response = post(client, {"nnsight-version": "0.8.1"}, envelope(session_id))
        assert response.status_code == 401


def test_socket_of_another_user_is_403(client) -> None:
    with client.websocket_connect("/subscribe", headers={"ndif-api-key": "alice-token"}) as ws:
        session_id = json.loads(ws.receive_text())["session_id"]
        response = post(client, BOB, envelope(session_id))
        assert response.status_code == 403
        assert "another identity" in response.json()["detail"]


def test_version_gate_is_426(client) -> None:
    response = post(client, {**ALICE, "nnsight-version": "0.7.0"})
    assert response.status_code == 426
    assert response.json()["detail"] == (
        "nnsight 0.7.0 is not served here; sites run nnsight 0.8.1: pip install nnsight==0.8.1"
    )


def test_unknown_model_is_404_listing_hosted_models(client) -> None:
    response = post(client, data=envelope(key=LLAMA_KEY))
    assert response.status_code == 404
    assert "openai-community/gpt2" in response.json()["detail"]


def test_payload_limit_is_413(make_client) -> None:
    client = make_client(max_payload_bytes=100)
    response = post(client, blob=b"x" * 101)
    assert response.status_code == 413
    assert "at most 100" in response.json()["detail"]


MALFORMED = {
    "no multipart at all": {"content": b"garbage", "headers": {"content-type": "text/plain"}},
    "json body": {"json": {"model_key": GPT2_KEY}},
    "broken multipart": {
        "content": b"--xyz\r\nContent-Disposition: form-data\r\n\r\n",
        "headers": {"content-type": "multipart/form-data; boundary=xyz"},
    },
    "multipart without boundary": {
        "content": b"abc",
        "headers": {"content-type": "multipart/form-data"},
    },
    "no blob": {"data": {"data": envelope()}},
    "blob as a plain field": {"data": {"data": envelope(), "blob": "text"}},
    "no data": {"files": {"blob": ("request", b"blob", "application/octet-stream")}},
    "data not json": {
        "data": {"data": "{not json"},
        "files": {"blob": ("request", b"blob", "application/octet-stream")},
    },
    "empty blob": {
        "data": {"data": envelope()},
        "files": {"blob": ("request", b"", "application/octet-stream")},
    },
    "bad model key": {
        "data": {"data": envelope(key="gpt2")},
        "files": {"blob": ("request", b"blob", "application/octet-stream")},
    },
    "unknown session": {
        "data": {"data": envelope(session_id="nope")},
        "files": {"blob": ("request", b"blob", "application/octet-stream")},
    },
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_are_4xx_with_detail(client, case) -> None:
    kwargs = dict(MALFORMED[case])
    headers = {**ALICE, **kwargs.pop("headers", {})}
    response = client.post("/request", headers=headers, **kwargs)
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def test_service_endpoints(client) -> None:
    deployments = client.get("/status").json()["deployments"]
    entry = deployments["site-a/openai-community/gpt2"]
    assert entry == {
        "model_key": GPT2_KEY,
        "repo_id": "openai-community/gpt2",
        "revision": "main",
        "task": "text-generation",
        "trust_remote_code": False,
        "deployment_level": "HOT",
        "application_state": "RUNNING",
        "queue_depth": 0,
    }
    env = client.get("/env").json()
    assert env["packages"] == {
        "nnsight": "0.8.1",
        "torch": torch.__version__,
        "transformers": "5.22.2",
    }
    assert env["python_version"].split()[0].count(".") == 2
    assert client.get("/ping").text == "pong"
    assert client.get("/.well-known/jwks.json").json() == {"keys": []}


def test_whoami(client) -> None:
    me = client.get("/whoami", headers={"ndif-api-key": "alice-token"}).json()
    assert me == {"email": "alice@example.org", "tags": ["researcher", "lab-a"]}
    for headers in ({}, {"ndif-api-key": "forged"}):
        response = client.get("/whoami", headers=headers)
        assert response.status_code == 200 and response.json()["email"] is None


def test_unknown_routes_are_404_json(client) -> None:
    response = client.get("/nothing")
    assert response.status_code == 404 and "detail" in response.json()


def test_client_mistakes_never_give_5xx(client) -> None:
    probes = [
        ("GET", "/response/%00", {}),
        ("GET", "/results/x/y", {}),
        ("POST", "/request", {"content": b"\xff" * 10, "headers": ALICE}),
        ("POST", "/request", {"content": b"", "headers": {**ALICE, "content-length": "0"}}),
        ("GET", "/whoami", {"headers": {"ndif-api-key": b"\xe9" * 5000}}),
        ("GET", "/response/x", {"headers": {"ndif-api-key": b"\xe9" * 50}}),
    ]
    for method, path, kwargs in probes:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError:
            continue  # refused by the HTTP layer itself
        assert response.status_code < 500, (method, path, response.text)
