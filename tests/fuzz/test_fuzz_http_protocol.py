"""Fuzzing the nnsight-facing HTTP routes: `POST /request`, polling, result downloads, the
websocket and the service documents. Whatever arrives, the broker answers below 500 (4xx with
a JSON `detail` for what it refuses) and keeps serving a normal client afterwards."""

from __future__ import annotations

import json
from urllib.parse import quote

from broker_fakes import GPT2_KEY
from fuzz_strategies import (
    FUZZ,
    URL_ERRORS,
    api_keys,
    assert_handled,
    assert_refused,
    dumps,
    header_values,
    json_values,
    nested,
    small_text,
    texts,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

ALICE = {"ndif-api-key": "alice-token", "nnsight-version": "0.8.1"}
PICKLE = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00N."


def envelope(session_id: str = "", **fields) -> bytes:
    body = {"model_key": GPT2_KEY, "session_id": session_id, "compress": False, "env": {}}
    return json.dumps({**body, **fields}).encode()


def multipart(parts: list[tuple[bytes, bytes | None, bytes | None, bytes]], boundary: bytes):
    """A multipart body from (name, filename, content type, value) parts, written by hand so
    that names, filenames and boundaries can be anything."""
    out = b""
    for name, filename, content_type, value in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if content_type is not None:
            out += b"Content-Type: " + content_type + b"\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def submit(client, data: bytes, blob: bytes = PICKLE, headers=ALICE):
    parts = [(b"data", None, None, data), (b"blob", b"request", b"application/octet-stream", blob)]
    content_type = "multipart/form-data; boundary=fuzzbound"
    return client.post(
        "/request",
        content=multipart(parts, b"fuzzbound"),
        headers={**headers, "content-type": content_type},
    )


# -- model keys and envelopes ---------------------------------------------------------------

class_paths = st.one_of(
    st.just("nnsight.modeling.transformers.TransformersModel"),
    st.sampled_from(["a.B", "x", "", "..", "a..b", "nnsight.LanguageModel"]),
    small_text,
)
key_fields = st.fixed_dictionaries(
    {},
    optional={
        "repo_id": st.one_of(st.just("openai-community/gpt2"), json_values),
        "revision": json_values,
        "task": st.one_of(st.just("text-generation"), json_values),
        "extra": json_values,
    },
)
model_keys = st.one_of(
    st.just(GPT2_KEY),
    texts,
    st.builds(lambda c, f: f"{c}:{json.dumps(f)}", class_paths, key_fields),
    st.builds(lambda c, s: f"{c}:{s}", class_paths, texts),
    # Deeply nested JSON in the key's suffix (json.loads recursion), within the length cap.
    st.sampled_from([1, 50, 999, 1500, 2000]).map(
        lambda d: (
            "nnsight.modeling.transformers.TransformersModel:" + '{"repo_id": ' + nested(d) + "}"
        )
    ),
    json_values,  # not even a string
)
envelope_fields = st.fixed_dictionaries(
    {},
    optional={
        "model_key": model_keys,
        "session_id": st.one_of(texts, json_values),
        "compress": st.one_of(
            st.booleans(), st.sampled_from(["true", "1", "yes", 0, 1, 2]), json_values
        ),
        "env": st.one_of(
            st.dictionaries(small_text, json_values, max_size=5),
            st.just({"deep": json.loads(nested(500))}),
            st.just({"big": "x" * 70_000}),
            json_values,
        ),
        "unknown": json_values,
    },
)
data_values = st.one_of(
    envelope_fields.map(dumps),
    json_values.map(dumps),
    st.sampled_from([1, 999, 5000, 100_000]).map(lambda d: nested(d, "[", "]").encode()),
    st.binary(max_size=300),
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
)
part_names = st.one_of(
    st.sampled_from([b"data", b"blob", b"extra", b"", b"DATA", b'da"ta']),
    st.binary(max_size=20),
)
parts = st.lists(
    st.tuples(
        part_names,
        st.one_of(st.none(), st.just(b"request"), st.binary(max_size=20)),
        st.one_of(st.none(), st.just(b"application/octet-stream"), st.binary(max_size=30)),
        st.one_of(data_values, st.binary(max_size=2000)),
    ),
    max_size=12,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=other",
            "multipart/form-data; boundary=%(b)s; charset=utf-32",
            'multipart/form-data; boundary="%(b)s"',
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain",
        ]
    ),
    small_text,
)


@FUZZ
@given(
    request_parts=parts,
    boundary=st.text("abcdefghijklmnopqrstuvwxyz0123456789-_'()+,./:=? ", min_size=1, max_size=72),
    content_type=content_types,
    truncate=st.one_of(st.none(), st.integers(0, 400)),
    key=st.one_of(st.just(b"alice-token"), st.just(b"site-token"), st.none(), api_keys),
    version=st.one_of(st.just(b"0.8.1"), st.none(), header_values),
    length=st.one_of(st.none(), st.sampled_from(["0", "-1", "abc", "99999999999999", "1e3"])),
)
def test_post_request_never_5xx(
    protocol_client, request_parts, boundary, content_type, truncate, key, version, length
) -> None:
    body = multipart(request_parts, boundary.encode())
    if truncate is not None:
        body = body[:truncate]
    headers: dict[str, bytes | str] = {}
    if content_type is None:
        headers["content-type"] = f"multipart/form-data; boundary={boundary}"
    else:
        headers["content-type"] = content_type.replace("%(b)s", boundary).encode(
            "utf-8", "surrogatepass"
        )
    if key is not None:
        headers["ndif-api-key"] = key
    if version is not None:
        headers["nnsight-version"] = version
    if length is not None:
        headers["content-length"] = length
    try:
        response = protocol_client.post("/request", content=body, headers=headers)
    except Exception as error:  # a content-length lie can break the in-process transport
        assert length is not None, error
        return
    assert_handled(response)


@FUZZ
@given(data=data_values, blob=st.binary(max_size=500), version=st.sampled_from(["0.8.1", "0.8"]))
def test_envelope_and_blob_fuzz_is_answered(protocol_client, data, blob, version) -> None:
    response = submit(protocol_client, data, blob, {**ALICE, "nnsight-version": version})
    assert_handled(response)
    if response.status_code < 400:
        assert response.json()["status"] in ("RECEIVED", "QUEUED")


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), json_values.map(dumps)))
def test_garbage_envelope_is_refused_with_detail(protocol_client, data) -> None:
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict) and parsed.get("model_key") == GPT2_KEY:
        return  # a valid envelope by chance
    assert_refused(submit(protocol_client, data))


DEEP_KEY = "nnsight.modeling.transformers.TransformersModel:" + '{"repo_id": ' + nested(1500) + "}"


@FUZZ
@given(key=model_keys, session_id=st.one_of(st.just(""), texts), env=json_values)
@example(key=DEEP_KEY, session_id="", env={})  # json.loads RecursionError: was a 500
@example(key=GPT2_KEY, session_id="", env={"deep": json.loads(nested(300))})
def test_model_key_session_and_env_fuzz(protocol_client, key, session_id, env) -> None:
    data = dumps({"model_key": key, "session_id": session_id, "compress": False, "env": env})
    response = submit(protocol_client, data)
    assert_handled(response)
    if key != GPT2_KEY:
        assert_refused(response)


@settings(FUZZ, max_examples=60)
@given(body=st.binary(max_size=2000), content_type=st.one_of(content_types, st.just(None)))
def test_non_multipart_bodies_are_refused(protocol_client, body, content_type) -> None:
    headers = dict(ALICE)
    if content_type is not None:
        headers["content-type"] = content_type.replace("%(b)s", "x").encode(
            "utf-8", "surrogatepass"
        )
    assert_refused(protocol_client.post("/request", content=body, headers=headers))


@settings(FUZZ, max_examples=60)
@given(key=api_keys)
def test_bad_api_key_is_401_even_with_a_good_body(protocol_client, key) -> None:
    if key in (b"alice-token", b"bob-token", b"site-token"):
        return
    response = submit(protocol_client, envelope(), headers={"ndif-api-key": key})
    assert response.status_code == 401 and isinstance(response.json()["detail"], str)


# -- polling and downloads ------------------------------------------------------------------


def path_segment(text: str, raw: bool) -> str:
    if raw:
        return text.encode("utf-8", "surrogatepass").decode("latin-1")
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@FUZZ
@given(job_id=texts, raw=st.booleans(), key=st.one_of(st.none(), st.just(b"alice-token"), api_keys))
def test_poll_with_any_id_is_404_or_4xx(protocol_client, job_id, raw, key) -> None:
    headers = {} if key is None else {"ndif-api-key": key}
    try:
        response = protocol_client.get(f"/response/{path_segment(job_id, raw)}", headers=headers)
    except URL_ERRORS:  # httpx refuses to build that URL: nothing reached the broker
        return
    assert_handled(response)
    assert response.status_code >= 400  # no such job for anyone


@FUZZ
@given(job_id=texts, token=texts, raw=st.booleans(), real_job=st.booleans())
def test_result_download_with_any_address_is_4xx(
    protocol_client, job_id, token, raw, real_job
) -> None:
    if real_job:
        job_id = done_job(protocol_client)
    url = f"/results/{path_segment(job_id, raw)}/{path_segment(token, raw)}"
    try:
        response = protocol_client.get(url)
    except URL_ERRORS:
        return
    assert_handled(response)
    assert response.status_code >= 400


range_values = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda a, b, suffix: f"bytes={a}-{b}" if not suffix else f"bytes=-{a}",
        st.integers(-5, 10**12),
        st.one_of(st.just(""), st.integers(-5, 10**12).map(str)),
        st.booleans(),
    ),
    st.lists(st.integers(0, 5000), min_size=2, max_size=8).map(
        lambda xs: "bytes=" + ",".join(f"{a}-{b}" for a, b in zip(xs[::2], xs[1::2], strict=False))
    ),
)


@FUZZ
@given(value=range_values, if_range=st.one_of(st.none(), small_text), head=st.booleans())
def test_any_range_header_on_a_real_result_is_200_206_or_416(
    protocol_client, value, if_range, head
) -> None:
    """A broken download resumes with `Range`; no header value may turn into a 5xx."""
    job_id = done_job(protocol_client)
    job = protocol_client.service.job(job_id)
    headers = {"range": value}
    if if_range is not None:
        headers["if-range"] = if_range
    url = f"/results/{job_id}/{job.result.token}"
    try:
        response = (protocol_client.head if head else protocol_client.get)(url, headers=headers)
    except URL_ERRORS:  # a header value httpx itself will not send
        return
    if not head:  # a HEAD answer has no body to check
        assert_handled(response)
    assert response.status_code in (200, 206, 416), (value, response.status_code)
    if response.status_code == 206 and not head:
        start, end = map(int, response.headers["content-range"][6:].split("/")[0].split("-"))
        assert len(response.content) == end - start + 1


_DONE: list[str] = []


def done_job(client) -> str:
    """The id of one completed job (submitted once per module)."""
    if not _DONE:
        response = submit(client, envelope())
        assert response.status_code == 200, response.text
        job_id = response.json()["id"]
        client.portal.call(client.service.drain)
        _DONE.append(job_id)
    return _DONE[0]


# -- websocket ------------------------------------------------------------------------------

frames = st.lists(
    st.one_of(
        small_text.map(lambda t: t.encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
        st.sampled_from(['{"session_id": "x"}', "{}", "null", "x" * 100_000]),
        st.binary(max_size=2000),
    ),
    max_size=6,
)
ws_keys = st.one_of(st.none(), st.just(b"alice-token"), api_keys)


def ws_headers(key) -> dict:
    return {} if key is None else {"ndif-api-key": key}


@settings(FUZZ, max_examples=40)
@given(key=ws_keys, sent=frames)
def test_websocket_ignores_client_frames_and_still_carries_a_job(
    protocol_client, key, sent
) -> None:
    with protocol_client.websocket_connect("/subscribe", headers=ws_headers(key)) as ws:
        session_id = json.loads(ws.receive_text())["session_id"]
        for frame in sent:
            if isinstance(frame, bytes):
                ws.send_bytes(frame)
            else:
                ws.send_text(frame)
        response = submit(protocol_client, envelope(session_id))
        assert response.status_code == 200, response.text
        final = None
        for _ in range(50):
            message = ws.receive()
            if message.get("bytes") is not None:
                final = "COMPLETED"  # an inline result: the binary COMPLETED frame
                break
            status = json.loads(message["text"])["status"]
            if status in ("COMPLETED", "ERROR"):
                final = status
                break
        assert final == "COMPLETED"


@settings(FUZZ, max_examples=40)
@given(
    key=ws_keys,
    sent=frames,
    extra=st.dictionaries(st.sampled_from(["origin", "x-a", "cookie"]), header_values, max_size=3),
)
def test_websocket_garbage_then_close_is_clean(protocol_client, key, sent, extra) -> None:
    with protocol_client.websocket_connect(
        "/subscribe", headers={**ws_headers(key), **extra}
    ) as ws:
        assert isinstance(json.loads(ws.receive_text())["session_id"], str)
        for frame in sent:
            if isinstance(frame, bytes):
                ws.send_bytes(frame)
            else:
                ws.send_text(frame)
    assert protocol_client.get("/ping").text == "pong"


# -- everything else ------------------------------------------------------------------------

ROUTES = [
    "/status",
    "/env",
    "/whoami",
    "/ping",
    "/.well-known/jwks.json",
    "/request",
    "/response",
    "/results",
    "/subscribe",
    "/",
    "",
]


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    route=st.sampled_from(ROUTES),
    suffix=st.one_of(st.just(""), texts.map(lambda t: path_segment(t, False))),
    query=st.one_of(st.just(""), small_text.map(lambda t: "?" + quote(t, safe="=&"))),
    headers=st.dictionaries(
        st.sampled_from(["ndif-api-key", "nnsight-version", "accept", "x-forwarded-for", "host"]),
        header_values,
        max_size=4,
    ),
    body=st.binary(max_size=200),
)
def test_any_method_on_any_route_never_5xx(
    protocol_client, method, route, suffix, query, headers, body
) -> None:
    headers.pop("host", None)  # TestClient routes by base_url
    url = route + ("/" + suffix if suffix else "") + query
    try:
        response = protocol_client.request(method, url or "/", headers=headers, content=body)
    except URL_ERRORS:
        return
    assert response.status_code < 500, (method, url, response.status_code, response.text[:300])
    if route in ("/status", "/env", "/whoami", "/ping") and method == "GET" and not suffix:
        assert response.status_code == 200


@settings(FUZZ, max_examples=60)
@given(key=st.one_of(st.just(b"alice-token"), api_keys))
def test_whoami_answers_every_key(protocol_client, key) -> None:
    response = protocol_client.get("/whoami", headers={"ndif-api-key": key})
    assert response.status_code == 200
    assert set(response.json()) == {"email", "tags"}


def test_broker_still_serves_a_normal_client_after_the_fuzzing(protocol_client) -> None:
    assert protocol_client.get("/ping").text == "pong"
    assert "site-a/openai-community/gpt2" in protocol_client.get("/status").json()["deployments"]
    response = submit(protocol_client, envelope())
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    protocol_client.portal.call(protocol_client.service.drain)
    polled = protocol_client.get(f"/response/{job_id}", headers=ALICE).json()
    assert polled["status"] == "COMPLETED"
    download = protocol_client.get(polled["data"].removeprefix("http://broker.test"))
    assert download.status_code == 200 and download.content
