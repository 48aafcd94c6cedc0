"""Client mistakes and hostile input against the real mesh: clear 4xx or ERROR, nothing lost.

Every case is followed by the check that matters most to the next user: the broker and the
agents keep serving, and a legitimate job still returns results `torch.equal` to local.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import uuid

import httpx
import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.clock import FakeClock
from edif.demo import TINY_GPT2, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
VERSION_HEADERS = {"nnsight-version": "0.8.1"}


@pytest.fixture(scope="module")
def gpt2(mesh):
    return load(TINY_GPT2, home=mesh.home), load(TINY_GPT2, home=mesh.home, dispatch=True)


@pytest.fixture(autouse=True)
def _client(mesh):
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token()
    CONFIG.API.COMPRESS = True
    yield
    CONFIG.API.APIKEY = mesh.token()


def still_serving(gpt2) -> None:
    remote, local = gpt2
    with remote.trace(PROMPT, remote=True):
        r = remote.lm_head.output.save()
    with local.trace(PROMPT):
        expected = local.lm_head.output.save()
    assert torch.equal(r, expected)


def submit_expecting(gpt2, fragment: str) -> None:
    remote, _ = gpt2
    with pytest.raises(RemoteError) as info:
        with remote.trace(PROMPT, remote=True):
            _ = remote.lm_head.output.save()
    assert fragment in str(info.value), str(info.value)


def forge_alg_none(token: str) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": json.loads(_b64(token.split(".")[0]))["kid"]}
    enc = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{enc}.{token.split('.')[1]}."


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_missing_token_is_refused_with_a_readable_message(gpt2) -> None:
    CONFIG.API.APIKEY = None
    submit_expecting(gpt2, "no API key")
    CONFIG.API.APIKEY = ""
    submit_expecting(gpt2, "no API key")
    CONFIG.API.APIKEY = "certainly-not-a-jwt"
    submit_expecting(gpt2, "Failed to send request")


def test_bad_signature_is_refused(gpt2, mesh) -> None:
    token = mesh.token()
    head, payload, sig = token.split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    CONFIG.API.APIKEY = f"{head}.{payload}.{flipped}"
    submit_expecting(gpt2, "signature")


def test_expired_token_is_refused(gpt2, mesh) -> None:
    past = FakeClock(start=time.time() - 7200)
    CONFIG.API.APIKEY = TokenIssuer(KeyStore(mesh.home / "keys"), clock=past).issue(
        "alice@uni-example.eu", Role.RESEARCHER, 60
    )
    submit_expecting(gpt2, "expired")


def test_alg_none_is_refused(gpt2, mesh) -> None:
    CONFIG.API.APIKEY = forge_alg_none(mesh.token())
    submit_expecting(gpt2, "alg")


def test_foreign_token_is_refused(gpt2, mesh, tmp_path) -> None:
    CONFIG.API.APIKEY = TokenIssuer(KeyStore(tmp_path / "elsewhere")).issue(
        "mallory", Role.RESEARCHER, 600
    )
    submit_expecting(gpt2, "does not know")


def test_unknown_model_is_refused_naming_the_hosted_ones(gpt2) -> None:
    remote, _ = gpt2
    key = (
        "nnsight.modeling.transformers.TransformersModel:"
        '{"repo_id": "edif-demo/no-such-model", "revision": null, "task": "text-generation"}'
    )
    backend = RemoteBackend(
        key, host=CONFIG.API.HOST, api_key=CONFIG.API.APIKEY, env=remote._remoteable_get_env()
    )
    with pytest.raises(RemoteError) as info:
        with remote.trace(PROMPT, backend=backend):
            _ = remote.lm_head.output.save()
    assert "edif-demo/no-such-model" in str(info.value)
    assert TINY_GPT2 in str(info.value)


def raw_post(
    mesh,
    envelope: dict | str | None,
    blob: bytes | None,
    token: str | None = None,
    raw_body: bytes | None = None,
) -> httpx.Response:
    headers = {**VERSION_HEADERS, "ndif-api-key": token or mesh.token()}
    if raw_body is not None:
        headers["content-type"] = "multipart/form-data; boundary=xyz"
        return httpx.post(f"{mesh.url}/request", content=raw_body, headers=headers, timeout=30)
    data = (
        {}
        if envelope is None
        else {"data": envelope if isinstance(envelope, str) else json.dumps(envelope)}
    )
    files = None if blob is None else {"blob": ("request", blob, "application/octet-stream")}
    return httpx.post(f"{mesh.url}/request", data=data, files=files, headers=headers, timeout=30)


def envelope(compress: bool = False, model: str = TINY_GPT2) -> dict:
    suffix = json.dumps({"repo_id": model, "revision": None, "task": "text-generation"})
    return {
        "model_key": f"nnsight.modeling.transformers.TransformersModel:{suffix}",
        "session_id": "",
        "compress": compress,
        "env": {},
    }


def poll_until_final(mesh, job_id: str, token: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = httpx.get(
            f"{mesh.url}/response/{job_id}", headers={"ndif-api-key": token}, timeout=10
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body["status"] in ("COMPLETED", "ERROR"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never finished")


@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        b'--xyz\r\nContent-Disposition: form-data; name="data"\r\n\r\n{"model_key"',
        b"--xyz--\r\n",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_malformed_multipart_is_a_4xx(mesh, gpt2, body) -> None:
    reply = raw_post(mesh, None, None, raw_body=body)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert reply.json()["detail"]


@pytest.mark.parametrize(
    "env_body, blob",
    [
        (None, b"\x80\x04N."),
        ("{not json", b"\x80\x04N."),
        (json.dumps({"model_key": 42}), b"\x80\x04N."),
        (json.dumps(envelope()), None),
        (json.dumps({**envelope(), "model_key": "no-colon-here"}), b"\x80\x04N."),
    ],
    ids=["no-envelope", "bad-json", "bad-types", "no-blob", "bad-model-key"],
)
def test_malformed_envelope_is_a_4xx(mesh, env_body, blob) -> None:
    reply = raw_post(mesh, env_body, blob)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)


class Gadget:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "gadget", "bad-zstd"])
def test_bad_payloads_end_in_a_clear_error_and_nothing_runs(mesh, gpt2, tmp_path, kind) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    good = _real_payload(gpt2)
    compress = kind == "bad-zstd"
    blob = {
        "garbage": os.urandom(512),
        "truncated": good[: len(good) // 2],
        "gadget": pickle.dumps(Gadget(str(marker)), protocol=4),
        "bad-zstd": b"\x28\xb5\x2f\xfd" + os.urandom(64),
    }[kind]
    token = mesh.token()
    reply = raw_post(mesh, envelope(compress=compress), blob, token=token)
    assert reply.status_code == 200, reply.text
    final = poll_until_final(mesh, reply.json()["id"], token)
    assert final["status"] == "ERROR"
    assert final["description"]
    assert not marker.exists()
    still_serving(gpt2)


def _real_payload(gpt2) -> bytes:
    import nnsight
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.backend import Backend

    class Capture(Backend):
        def __call__(self, tracer) -> None:
            nnsight.ndif.pull_env()
            self.blob = RequestModel.serialize(tracer, False)

    remote = gpt2[0]
    capture = Capture()
    with remote.trace(PROMPT, backend=capture):
        _ = remote.lm_head.output.save()
    return capture.blob


def test_block_that_raises_is_a_remote_error_and_site_keeps_serving(gpt2) -> None:
    remote, _ = gpt2
    with pytest.raises(RemoteError) as info:
        with remote.trace(PROMPT, remote=True):
            _ = remote.lm_head.output.save()
            raise ValueError("my analysis went wrong")
    assert "ValueError: my analysis went wrong" in str(info.value)
    still_serving(gpt2)


def test_block_that_never_finishes_hits_the_time_limit(gpt2) -> None:
    remote, _ = gpt2
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        with remote.trace(PROMPT, remote=True):
            h = remote.transformer.h[0].output
            while h is not None:
                pass
    assert "time limit" in str(info.value)
    assert time.monotonic() - started < 60
    still_serving(gpt2)  # the replacement worker serves the next job


def test_another_users_job_is_invisible(mesh, gpt2) -> None:
    remote, _ = gpt2
    alice = mesh.token("alice@uni-example.eu")
    bob = mesh.token("bob@uni-example.eu")
    reply = raw_post(mesh, envelope(), _real_payload(gpt2), token=alice)
    job_id = reply.json()["id"]
    final = poll_until_final(mesh, job_id, alice)
    assert final["status"] == "COMPLETED"
    for headers in ({"ndif-api-key": bob}, {}):
        other = httpx.get(f"{mesh.url}/response/{job_id}", headers=headers, timeout=10)
        assert other.status_code == 404
    # The nnsight client of another user reads "no status yet", never alice's result.
    CONFIG.API.APIKEY = bob
    with remote.trace(PROMPT, remote=True, blocking=False, job_id=job_id) as tracer:
        pass
    assert tracer.backend() is None


def test_result_url_is_absolute_and_self_authorizing(mesh, gpt2) -> None:
    alice = mesh.token()
    reply = raw_post(mesh, envelope(), _real_payload(gpt2), token=alice)
    final = poll_until_final(mesh, reply.json()["id"], alice)
    url = final["data"]
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(url, timeout=10).status_code == 200
    assert httpx.get(url[:-4] + "AAAA", timeout=10).status_code == 404


def test_a_revoked_token_is_refused_on_the_next_request(mesh, gpt2) -> None:
    import subprocess
    import sys

    token = mesh.token("erin@uni-example.eu")
    CONFIG.API.APIKEY = token
    still_serving(gpt2)  # the token works ...
    env = {**os.environ, "EDIF_HOME": str(mesh.home)}
    revoke = subprocess.run(
        [sys.executable, "-m", "edif", "token", "revoke", "--token", token],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoke.returncode == 0, revoke.stderr
    submit_expecting(gpt2, "revoked")  # ... and is refused from the next request on
