"""Shared hypothesis settings, strategies and assertions for the fuzz suite."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.testclient import httpx as client_httpx  # httpx or httpx2, as installed

# What the test client raises for a URL it will not send (nothing reached the broker).
URL_ERRORS = (ValueError, client_httpx.InvalidURL)

# Reproducible in CI (derandomize), no example database written into the checkout, no
# per-example deadline (the first requests warm up imports), and the health checks that a
# fixture shared across examples or a slow first example would trip are off.
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Any code point, surrogates included (they survive JSON escapes and Python strings).
ANY_CHAR = st.characters(exclude_categories=())
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F)

small_text = st.text(ANY_CHAR, max_size=40)
texts = st.one_of(
    small_text,
    st.text(CONTROL, max_size=40),
    st.text(st.sampled_from("/.%?#&=;:@!$'()*+,[]{}\\\"<> \t~"), max_size=40),
    st.builds(lambda c, n: c * n, st.characters(), st.sampled_from([1000, 5000, 70_000])),
)

floats = st.floats(allow_nan=True, allow_infinity=True)
big_ints = st.one_of(st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**40]))
scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, small_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(small_text, inner, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    """JSON text as a sloppy client would send it: NaN/Infinity allowed, surrogates escaped."""
    return json.dumps(value).encode()


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# Header values: anything a raw HTTP/ASGI client could put on the wire (no CR/LF/NUL).
header_values = st.one_of(
    small_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.builds(lambda n: b"k" * n, st.sampled_from([1000, 20_000])),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Strings shaped like JWTs (three dot-separated base64url parts) with fuzzed JSON inside.
jwt_like = st.builds(
    lambda header, payload, sig: f"{b64(header)}.{b64(payload)}.{b64(sig)}",
    st.one_of(
        st.fixed_dictionaries(
            {"alg": st.one_of(st.sampled_from(["EdDSA", "none", "HS256", "RS256"]), json_values)},
            optional={"kid": json_values, "typ": json_values, "crit": json_values},
        ).map(dumps),
        json_values.map(dumps),
        st.binary(max_size=40),
    ),
    st.one_of(json_values.map(dumps), st.binary(max_size=40)),
    st.binary(max_size=80),
)

api_keys = st.one_of(header_values, jwt_like.map(str.encode))


def assert_handled(response: client_httpx.Response) -> None:
    """Never a 5xx; every 4xx is JSON with a string `detail` (what nnsight prints)."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("detail"), str | list), body


def assert_refused(response: client_httpx.Response) -> None:
    """Clearly malformed input: a 4xx with a JSON `detail`."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert_handled(response)
