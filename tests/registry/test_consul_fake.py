"""FakeConsul on its own, over HTTP: does it keep Consul's documented semantics?

Indexes and blocking queries, TTL expiry and the reaper, registration decoding and limits,
error codes, ACL tokens, gRPC probes. If these hold, tests of the adapter against the fake
mean something for a real Consul.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from grpc_health_server import NOT_SERVING, grpc_health_server

from edif.clock import SystemClock
from registry.consul_fake import FakeConsul

HEALTH = "/v1/health/service/web"


@pytest.fixture
async def fake():
    async with FakeConsul(jitter=False) as fake:
        yield fake


@pytest.fixture
async def http(fake: FakeConsul):
    async with httpx.AsyncClient(base_url=fake.url, timeout=30) as client:
        yield client


def ttl_service(sid: str = "web-1", ttl: str = "10s", **check: Any) -> dict[str, Any]:
    ttl_check = {"CheckID": f"{sid}:ttl", "TTL": ttl, "Status": "passing", **check}
    return {"Name": "web", "ID": sid, "Port": 8080, "Meta": {"k": "v"}, "Checks": [ttl_check]}


async def register(http: httpx.AsyncClient, body: dict[str, Any], **params: str) -> None:
    response = await http.put("/v1/agent/service/register", json=body, params=params)
    assert response.status_code == 200, response.text


async def health(http: httpx.AsyncClient, path: str = HEALTH, **params: Any) -> tuple[int, list]:
    response = await http.get(path, params=params)
    assert response.status_code == 200, response.text
    return int(response.headers["X-Consul-Index"]), response.json()


async def statuses(http: httpx.AsyncClient) -> dict[str, str]:
    _, entries = await health(http)
    return {c["CheckID"]: c["Status"] for e in entries for c in e["Checks"]}


# -- indexes and blocking queries ------------------------------------------------------------


async def test_the_index_moves_on_every_change_and_only_then(http: httpx.AsyncClient) -> None:
    seen = [(await health(http))[0]]

    async def step(method: str, path: str, moves: bool, **params: str) -> None:
        response = await http.request(method, path, params=params)
        assert response.status_code == 200, response.text
        index = (await health(http))[0]
        assert (index > seen[-1]) if moves else (index == seen[-1]), path
        seen.append(index)

    await register(http, ttl_service())
    assert (await health(http))[0] > seen[-1]
    seen.append((await health(http))[0])
    await step("PUT", "/v1/agent/check/pass/web-1:ttl", moves=False)  # passing → passing
    await step("PUT", "/v1/agent/check/warn/web-1:ttl", moves=True)
    await step("PUT", "/v1/agent/check/fail/web-1:ttl", moves=True)
    await step("PUT", "/v1/agent/check/pass/web-1:ttl", moves=True, note="back")
    await step("PUT", "/v1/agent/check/pass/web-1:ttl", moves=False, note="back")
    await step("PUT", "/v1/agent/service/deregister/web-1", moves=True)


async def test_a_blocking_query_returns_as_soon_as_something_changes(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    index, _ = await health(http)
    loop = asyncio.get_running_loop()
    started = loop.time()
    query = asyncio.create_task(health(http, index=index, wait="10s"))
    await fake.until_held()
    assert not query.done()
    await register(http, ttl_service())
    new_index, entries = await asyncio.wait_for(query, 2.0)
    assert new_index > index and len(entries) == 1
    assert loop.time() - started < 2.0


async def test_a_blocking_query_without_change_returns_after_wait_with_the_same_index(
    http: httpx.AsyncClient,
) -> None:
    await register(http, ttl_service())
    index, entries = await health(http)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await health(http, index=index, wait="400ms") == (index, entries)
    assert 0.4 <= loop.time() - started < 1.0


async def test_jitter_stays_within_a_sixteenth_of_wait() -> None:
    async with FakeConsul() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        index, _ = await health(http)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await health(http, index=index, wait="800ms")
        assert 0.8 <= loop.time() - started < 0.8 * 17 / 16 + 0.3


async def test_an_index_behind_the_current_one_returns_at_once(http: httpx.AsyncClient) -> None:
    await register(http, ttl_service("web-1"))
    await register(http, ttl_service("web-2"))
    index, _ = await health(http)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await health(http, index=index - 1, wait="10s"))[0] == index
    assert loop.time() - started < 0.5


async def test_writes_to_another_service_do_not_end_a_blocking_query(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    await register(http, ttl_service())
    index, _ = await health(http)
    query = asyncio.create_task(health(http, index=index, wait="1s"))
    await fake.until_held()
    await register(http, {"Name": "db", "Checks": [{"TTL": "10s"}]})
    await asyncio.sleep(0.3)
    assert not query.done()
    assert (await query)[0] == index


async def test_a_restore_releases_blocking_queries_with_a_lower_index(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    for i in range(4):
        await register(http, ttl_service(f"web-{i}"))
    index, _ = await health(http)
    query = asyncio.create_task(health(http, index=index, wait="10s"))
    await fake.until_held()
    fake.force_index(2)
    new_index, entries = await asyncio.wait_for(query, 1.0)
    assert new_index == 2 < index and len(entries) == 4


async def test_passing_filters_out_entries_with_any_failing_check(
    http: httpx.AsyncClient,
) -> None:
    await register(http, ttl_service("web-1"))
    await register(http, ttl_service("web-2"))
    await http.put("/v1/agent/check/warn/web-2:ttl")
    _, everything = await health(http)
    _, passing = await health(http, passing="1")
    assert len(everything) == 2
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]


async def test_entries_have_consuls_shape(http: httpx.AsyncClient) -> None:
    await register(http, ttl_service())
    _, [entry] = await health(http)
    assert set(entry) == {"Node", "Service", "Checks"}
    assert entry["Service"]["ID"] == "web-1" and entry["Service"]["Meta"] == {"k": "v"}
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "web-1:ttl"]
    assert entry["Checks"][1]["ServiceID"] == "web-1" and entry["Checks"][1]["Type"] == "ttl"


# -- TTLs and the reaper ---------------------------------------------------------------------


async def test_a_ttl_not_passed_turns_critical_and_the_reaper_removes_the_service(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    await register(http, ttl_service(DeregisterCriticalServiceAfter="1m"))
    fake.advance(10.0)
    assert await statuses(http) == {"serfHealth": "passing", "web-1:ttl": "passing"}
    fake.advance(0.5)
    _, [entry] = await health(http)
    assert (entry["Checks"][1]["Status"], entry["Checks"][1]["Output"]) == (
        "critical",
        "TTL expired",
    )
    fake.advance(59.0)  # critical since t=10 for 59.5 s
    assert fake.reap() == []
    fake.advance(1.0)
    assert fake.reap() == ["web-1"]
    assert (await health(http))[1] == []


async def test_a_pass_restarts_the_ttl(http: httpx.AsyncClient, fake: FakeConsul) -> None:
    await register(http, ttl_service())
    for _ in range(5):
        fake.advance(8.0)
        await http.put("/v1/agent/check/pass/web-1:ttl")
    assert (await statuses(http))["web-1:ttl"] == "passing"


async def test_the_deregister_window_has_consuls_one_minute_floor(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    await register(http, ttl_service(ttl="1s", DeregisterCriticalServiceAfter="5s"))
    fake.advance(30.0)  # critical since t=1 for 29 s: far past 5 s, not past 1 min
    assert fake.reap() == []
    fake.advance(32.0)
    assert fake.reap() == ["web-1"]


async def test_without_a_deregister_window_a_critical_service_stays(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    await register(http, ttl_service())
    fake.advance(3600.0)
    assert fake.reap() == []
    assert (await statuses(http))["web-1:ttl"] == "critical"


async def test_on_the_system_clock_auto_tick_expires_and_reaps() -> None:
    async with FakeConsul(SystemClock(), auto_tick_s=0.05) as fake:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            await register(http, ttl_service(ttl="200ms"))
            await asyncio.sleep(0.5)
            assert (await statuses(http))["web-1:ttl"] == "critical"
        with pytest.raises(TypeError):
            fake.advance(1.0)


# -- registration ----------------------------------------------------------------------------


async def test_check_ids_default_as_in_consul_and_checks_start_critical(
    http: httpx.AsyncClient,
) -> None:
    await register(http, {"Name": "web", "Checks": [{"TTL": "10s"}, {"TTL": "20s"}]})
    await register(http, {"Name": "solo", "ID": "solo-1", "Check": {"TTL": "10s"}})
    assert await statuses(http) == {
        "serfHealth": "passing",
        "service:web:1": "critical",
        "service:web:2": "critical",
    }
    _, [solo] = await health(http, "/v1/health/service/solo")
    assert solo["Checks"][1]["CheckID"] == "service:solo-1"


async def test_field_names_match_case_insensitively_and_in_snake_case(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    body = {  # how py-consul and hand-written JSON spell things
        "name": "web",
        "id": "web-1",
        "port": 8080,
        "checks": [
            {"check_id": "t", "ttl": "5s", "status": "passing"},
            {"CheckId": "g", "grpc": "127.0.0.1:1", "grpc_use_tls": True, "interval": "2s"},
        ],
    }
    await register(http, body)
    assert fake.state.services["web-1"].port == 8080
    assert fake.state.checks["t"].state.ttl_s == 5.0
    assert fake.state.checks["g"].grpc_use_tls is True


async def test_replace_existing_checks_drops_unlisted_checks(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    a, b = {"CheckID": "a", "TTL": "5s"}, {"CheckID": "b", "TTL": "5s"}
    two = {"Name": "web", "ID": "web-1", "Checks": [a, b]}
    one = {"Name": "web", "ID": "web-1", "Checks": [a]}
    await register(http, two)
    await register(http, one)
    assert fake.state.services["web-1"].check_ids == ["a", "b"]
    await register(http, one, **{"replace-existing-checks": "true"})
    assert fake.state.services["web-1"].check_ids == ["a"]
    assert "b" not in fake.state.checks


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({f"k{i}": "v" for i in range(65)}, "64 key/value pairs"),
        ({"k": "x" * 513}, "Value is too long"),
        ({"k": "ä" * 257}, "Value is too long"),  # 257 characters, 514 bytes
        ({"k" * 129: "v"}, "Key is too long"),
        ({"consul-version": "1"}, "reserved"),
        ({"bad key": "v"}, "invalid characters"),
    ],
)
async def test_meta_over_consuls_limits_is_refused(
    http: httpx.AsyncClient, meta: dict[str, str], reason: str
) -> None:
    response = await http.put("/v1/agent/service/register", json={"Name": "web", "Meta": meta})
    assert response.status_code == 400
    assert reason in response.text


async def test_meta_at_consuls_limits_is_accepted(http: httpx.AsyncClient) -> None:
    meta = {f"k{i:02d}": "x" * 512 for i in range(64)}
    await register(http, {"Name": "web", "Meta": meta})
    _, [entry] = await health(http)
    assert entry["Service"]["Meta"] == meta


@pytest.mark.parametrize(
    "body",
    [
        {"ID": "no-name"},
        {"Name": "web", "Check": {"HTTP": "http://127.0.0.1/", "Interval": "5s"}},
        {"Name": "web", "Check": {"GRPC": "127.0.0.1:1"}},  # no interval
        {"Name": "web", "Check": {"TTL": "soon"}},
        {"Name": "web", "Check": {"TTL": "5s", "Status": "fine"}},
    ],
)
async def test_bad_registrations_are_400(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert (await http.put("/v1/agent/service/register", json=body)).status_code == 400


# -- errors, ACLs, probes, fault injection ---------------------------------------------------


async def test_unknown_ids_get_consuls_answers(http: httpx.AsyncClient) -> None:
    grpc_check = {"CheckID": "g", "GRPC": "127.0.0.1:1", "Interval": "5s"}
    await register(http, {"Name": "web", "ID": "web-1", "Check": grpc_check})
    missing = await http.put("/v1/agent/check/pass/nope")
    assert (missing.status_code, 'Unknown check ID "nope"' in missing.text) == (404, True)
    not_ttl = await http.put("/v1/agent/check/pass/g")
    assert not_ttl.status_code == 500
    assert 'CheckID "g" does not have associated TTL' in not_ttl.text
    assert (await http.put("/v1/agent/service/deregister/nope")).status_code == 404
    assert (await http.get("/v1/agent/service/register")).status_code == 405


async def test_with_a_token_requests_must_carry_it() -> None:
    async with FakeConsul(token="t0k3n") as fake, httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get(HEALTH)).status_code == 403
        assert (await http.get(HEALTH, headers={"X-Consul-Token": "other"})).text == "ACL not found"
        assert (await http.get(HEALTH, headers={"X-Consul-Token": "t0k3n"})).status_code == 200
        bearer = {"Authorization": "Bearer t0k3n"}
        assert (await http.get(HEALTH, headers=bearer)).status_code == 200


async def test_grpc_checks_are_probed_with_the_health_protocol(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    async with grpc_health_server() as (address, servicer):
        check = {"CheckID": "g", "GRPC": address, "Interval": "5s"}
        await register(http, {"Name": "web", "ID": "web-1", "Check": check})
        assert (await statuses(http))["g"] == "critical"  # not probed yet
        await fake.probe_grpc()
        assert (await statuses(http))["g"] == "passing"
        await servicer.set("", NOT_SERVING)
        await fake.probe_grpc()
        _, [entry] = await health(http)
        assert entry["Checks"][1]["Status"] == "critical"
        assert "NOT_SERVING" in entry["Checks"][1]["Output"]
    await fake.probe_grpc()  # server gone
    assert (await statuses(http))["g"] == "critical"


async def test_requests_are_counted_and_failures_injected(
    http: httpx.AsyncClient, fake: FakeConsul
) -> None:
    fake.fail_requests("/v1/health/", 503, times=2)
    assert [(await http.get(HEALTH)).status_code for _ in range(3)] == [503, 503, 200]
    await register(http, ttl_service())
    assert fake.request_count("GET", "/v1/health/") == 3
    assert fake.request_count("PUT") == 1
    assert fake.request_count() == 4
