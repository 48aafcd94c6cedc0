"""Fuzzing the production wiring (`build_app`: real JWT verifier, site joins, quota admin API):
arbitrary tokens, site names and bodies are answered below 500, and the broker keeps serving."""

from __future__ import annotations

import jwt
from fuzz_strategies import (
    FUZZ,
    URL_ERRORS,
    api_keys,
    assert_handled,
    dumps,
    json_values,
    small_text,
    texts,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from auth.keys import KeyStore
from auth.roles import Role

SITE = "site-x"
RECORD = {
    "site": SITE,
    "institution": "Example",
    "grpc_address": "127.0.0.1:50099",
    "agent_version": "0",
    "versions": {"nnsight": "0.8.1", "torch": "2", "transformers": "5", "python": "3.11"},
    "hardware": {"vendor": "cpu", "device_type": "cpu", "count": 1},
}


def segment(text: str) -> str:
    from urllib.parse import quote

    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def bearer(token) -> dict:
    if token is None:
        return {}
    if isinstance(token, str):
        token = token.encode()
    return {"authorization": b"Bearer " + token}


sites = st.one_of(st.just(SITE), st.sampled_from(["", "-", "a" * 300, "..", "SITE-X"]), texts)
tokens = st.one_of(
    st.none(), st.sampled_from(["join", "credential", "staff", "researcher"]), api_keys
)


def token_for(mesh, kind):
    """Real tokens for the named kinds; anything else is used as it is."""
    _, issuer, _ = mesh
    if kind == "join":
        return issuer.issue(f"site:{SITE}", Role.SITE, 900, site=SITE)
    if kind == "credential":
        return issuer.issue(f"site:{SITE}", Role.SITE, 900, audience="edif-broker-sites", site=SITE)
    if kind == "staff":
        return issuer.issue("gov@example.org", Role.GOVERNANCE, 900)
    if kind == "researcher":
        return issuer.issue("alice@example.org", Role.RESEARCHER, 900)
    return kind


bodies = st.one_of(
    json_values.map(dumps),
    st.binary(max_size=300),
    st.fixed_dictionaries(
        {},
        optional={
            "site": st.one_of(st.just(SITE), json_values),
            "address": st.one_of(
                st.sampled_from(["127.0.0.1:50099", "h:0", "h:65536", "[::1]:1", ":", "h:1e3"]),
                json_values,
            ),
            "institution": json_values,
            "agent_version": json_values,
        },
    ).map(dumps),
    st.fixed_dictionaries({}, optional={k: json_values for k in RECORD}).map(
        lambda d: dumps({**RECORD, **d})
    ),
)


@FUZZ
@given(token=tokens, body=bodies)
def test_join_never_5xx(mesh, token, body) -> None:
    client = mesh[0]
    headers = {**bearer(token_for(mesh, token)), "content-type": "application/json"}
    assert_handled(client.post("/sites/join", content=body, headers=headers))


@FUZZ
@given(
    site=sites,
    action=st.sampled_from(["register", "heartbeat", "credential", "leave", "join", ""]),
    token=tokens,
    body=bodies,
    scheme=st.sampled_from(["Bearer", "bearer", "Basic", ""]),
)
def test_site_calls_never_5xx(mesh, site, action, token, body, scheme) -> None:
    client = mesh[0]
    value = token_for(mesh, token)
    headers = {"content-type": "application/json"}
    if value is not None:
        raw = value if isinstance(value, bytes) else value.encode()
        headers["authorization"] = scheme.encode() + b" " + raw
    try:
        response = client.post(f"/sites/{segment(site)}/{action}", content=body, headers=headers)
    except URL_ERRORS:
        return
    assert_handled(response)


policy_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            name: st.one_of(floats_or_ints, json_values)
            for name, floats_or_ints in {
                "rate_per_s": st.floats(),
                "burst": st.integers(),
                "max_concurrent": st.integers(),
                "max_payload_bytes": st.integers(),
                "max_result_bytes": st.integers(),
                "gpu_seconds_per_period": st.floats(),
                "period": st.sampled_from(["day", "week", "month", "year"]),
                "group_gpu_seconds_per_period": st.floats(),
            }.items()
        },
    ).map(dumps),
    bodies,
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
    scope=st.one_of(st.sampled_from(["role", "group", "user", ""]), texts),
    name=st.one_of(st.sampled_from([r.value for r in Role] + ["lab-a"]), texts),
    token=st.one_of(st.just("staff"), tokens),
    body=policy_bodies,
    use_key_header=st.booleans(),
)
def test_quota_admin_api_never_5xx(mesh, method, scope, name, token, body, use_key_header):
    client = mesh[0]
    value = token_for(mesh, token)
    key_header = use_key_header and value is not None
    headers = {"ndif-api-key": value} if key_header else bearer(value)
    url = f"/admin/api/quotas/{segment(scope)}/{segment(name)}"
    try:
        response = client.request(method, url, content=body, headers=headers)
    except URL_ERRORS:
        return
    assert_handled(response)


@settings(FUZZ, max_examples=60)
@given(period=st.one_of(st.sampled_from(["day", "week", "month"]), small_text), token=tokens)
def test_quota_reads_never_5xx(mesh, period, token) -> None:
    client = mesh[0]
    headers = bearer(token_for(mesh, token))
    for url in ("/admin/api/quotas", "/admin/api/usage"):
        try:
            response = client.get(url, params={"period": period}, headers=headers)
        except URL_ERRORS:
            return
        assert_handled(response)


# Correctly signed tokens whose claims are garbage: only the key holder can make these, but
# the verifier must still refuse them with a 401, never fail.
claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.just("alice"), json_values),
        "role": st.one_of(st.sampled_from([r.value for r in Role]), json_values),
        "groups": json_values,
        "site": json_values,
        "iss": st.one_of(st.just("edif"), json_values),
        "aud": st.one_of(st.just("edif-broker"), json_values),
        "exp": st.one_of(st.just(1_800_000_900), json_values),
        "nbf": st.one_of(st.just(1_800_000_000), json_values),
        "iat": st.one_of(st.just(1_800_000_000), json_values),
        "jti": st.one_of(st.just("j"), json_values),
    },
)


@FUZZ
@given(payload=claims, kid_ok=st.booleans())
def test_signed_tokens_with_garbage_claims_are_401_not_5xx(mesh, tmp_path_factory, payload, kid_ok):
    client = mesh[0]
    store = KeyStore(mesh_keys(client))
    kid, key = store.signing_key()
    try:
        token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid if kid_ok else "x"})
    except (TypeError, ValueError, OverflowError):
        return  # PyJWT cannot encode it: no such token can exist
    for url in ("/whoami", "/admin/api/quotas"):
        response = client.get(url, headers={"ndif-api-key": token})
        assert_handled(response)
    response = client.post("/request", headers={"ndif-api-key": token}, content=b"")
    assert_handled(response)


def mesh_keys(client):
    return client.app.state.service._settings.keys_dir


def test_mesh_still_serves_after_the_fuzzing(mesh) -> None:
    client = mesh[0]
    assert client.get("/ping").text == "pong"
    reply = client.post(
        "/sites/join",
        json={"site": SITE, "address": "127.0.0.1:50099"},
        headers=bearer(token_for(mesh, "join")),
    )
    assert reply.status_code == 200, reply.text
    credential = {"authorization": f"Bearer {reply.json()['credential']}"}
    assert (
        client.post(f"/sites/{SITE}/register", json=RECORD, headers=credential).status_code == 204
    )
    assert client.post(f"/sites/{SITE}/heartbeat", headers=credential).status_code == 204
    staff = {"ndif-api-key": token_for(mesh, "staff")}
    assert client.get("/admin/api/quotas", headers=staff).status_code == 200
    assert (
        client.get("/whoami", headers={"ndif-api-key": token_for(mesh, "researcher")}).json()[
            "email"
        ]
        == "alice@example.org"
    )
