"""ConsulCatalog: the shared catalog contract against FakeConsul and, when `EDIF_CONSUL_ADDR`
is set, against that real Consul; then what only the Consul adapter does, on the fake."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket

import httpx
import pytest
from catalog_suite import CatalogContract, Harness, site_record, watching
from grpc_health_server import grpc_health_server

from edif.errors import CatalogUnavailable, ConfigError, UnknownSite
from registry.catalog import Catalog
from registry.consul import (
    ConsulCatalog,
    ConsulSettings,
    grpc_check_id,
    next_index,
    service_id,
    ttl_check_id,
)
from registry.consul_fake import FakeConsul

HEALTH_PATH = "/v1/health/service/edif-site"
REAL = ConsulSettings()  # EDIF_CONSUL_* from the environment


def settings_for(fake: FakeConsul, **changes: object) -> ConsulSettings:
    quick = {"backoff_initial_s": 0.1, "backoff_max_s": 0.4, "min_query_interval_s": 0.02}
    return ConsulSettings(addr=fake.url, **{**quick, **changes})


@pytest.fixture
async def fake():
    async with FakeConsul() as fake:
        yield fake


@pytest.fixture
async def catalog(fake: FakeConsul):
    catalog = ConsulCatalog(settings_for(fake))
    yield catalog
    await catalog.aclose()


@pytest.fixture
def harness(fake: FakeConsul, catalog: ConsulCatalog) -> Harness:
    async def elapse(seconds: float) -> None:
        fake.advance(seconds)
        fake.reap()

    def watch_requests() -> int:
        return fake.request_count("GET", HEALTH_PATH)

    return Harness(catalog, elapse, 15.0, 60.0, watch_requests=watch_requests)


class TestConsulCatalogOnFakeConsul(CatalogContract):
    pass


@pytest.mark.skipif(
    not REAL.addr,
    reason="EDIF_CONSUL_ADDR is not set: no real Consul to run the catalog contract against",
)
class TestConsulCatalogOnRealConsul(CatalogContract):
    """Real time: TTL 2 s; Consul's deregister floor (1 min) and ~30 s reaper make the
    expiry test take ~95 s (marked slow). The Consul agent must reach 127.0.0.1 to probe the
    test's gRPC health server (`consul agent -dev` on this host)."""

    @pytest.fixture
    async def harness(self):
        async with grpc_health_server() as (address, _):
            catalog = ConsulCatalog(
                REAL.model_copy(update={"grpc_interval_s": 1.0, "wait_s": 10.0})
            )
            prefix = f"t{secrets.token_hex(4)}-"
            try:
                yield Harness(
                    catalog,
                    asyncio.sleep,
                    ttl_s=2.0,
                    deregister_after_s=60.0,
                    reap_slack_s=35.0,
                    settle_s=15.0,
                    grpc_address=address,
                    prefix=prefix,
                    exclusive=False,
                )
            finally:
                for record in await catalog.snapshot():
                    if record.site.startswith(prefix):
                        await catalog.deregister(record.site)
                await catalog.aclose()


# -- what the adapter writes -----------------------------------------------------------------


def test_it_is_a_catalog(fake: FakeConsul) -> None:
    assert isinstance(ConsulCatalog(settings_for(fake)), Catalog)


async def test_registration_has_the_documented_shape(harness: Harness, fake: FakeConsul) -> None:
    record = site_record(harness, "shape")
    await harness.register(record)
    service = fake.state.services[service_id(record.site)]
    assert (service.name, service.address, service.port) == ("edif-site", "127.0.0.1", 50051)
    assert service.tags == [record.site, "edif"]
    assert service.meta == record.to_meta()
    assert service.check_ids == [ttl_check_id(record.site), grpc_check_id(record.site)]
    ttl, grpc = (fake.state.checks[c] for c in service.check_ids)
    assert (ttl.kind, ttl.state.ttl_s, ttl.state.status) == ("ttl", 15.0, "passing")
    assert (grpc.kind, grpc.grpc, grpc.grpc_use_tls) == ("grpc", "127.0.0.1:50051", False)
    assert grpc.interval == "10s"
    assert ttl.state.deregister_after_s == grpc.state.deregister_after_s == 60.0


async def test_a_sites_health_is_its_worst_check(harness: Harness, fake: FakeConsul) -> None:
    site = harness.site("probed")
    await harness.register(site_record(harness, "probed"))
    fake.set_check_status(grpc_check_id(site), "critical", "connection refused")
    assert [r.health for r in await harness.mine()] == ["critical"]
    fake.set_check_status(grpc_check_id(site), "passing")
    await harness.catalog.set_health(site, "warning", "one GPU down")
    assert [r.health for r in await harness.mine()] == ["warning"]


async def test_a_critical_grpc_check_alone_gets_the_site_reaped(
    harness: Harness, fake: FakeConsul
) -> None:
    site = harness.site("hung")
    await harness.register(site_record(harness, "hung"))
    fake.set_check_status(grpc_check_id(site), "critical", "deadline exceeded")
    for _ in range(3):  # heartbeats keep coming: the agent's heartbeat thread is fine
        await harness.elapse(15.5)
        await harness.catalog.heartbeat(site)
    assert [r.health for r in await harness.mine()] == ["critical"]
    await harness.elapse(15.5)  # critical for 62 s
    assert await harness.mine() == []
    with pytest.raises(UnknownSite):  # the agent learns it must register again
        await harness.catalog.heartbeat(site)


async def test_old_consuls_unknown_check_answer_means_unknown_site(
    catalog: ConsulCatalog, fake: FakeConsul
) -> None:
    body = 'CheckID "edif-site-x:ttl" does not have associated TTL'
    fake.fail_requests("/v1/agent/check/pass/", 500, times=1, body=body)
    with pytest.raises(UnknownSite):
        await catalog.heartbeat("x")
    fake.fail_requests("/v1/agent/check/pass/", 500, times=1)
    with pytest.raises(CatalogUnavailable):
        await catalog.heartbeat("x")


# -- the watch -------------------------------------------------------------------------------


async def test_the_watch_backs_off_on_errors_and_recovers(
    harness: Harness, fake: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    async with watching(harness) as watcher:
        assert await watcher.next() == []
        await fake.until_held()
        fake.fail_requests(HEALTH_PATH, 500)  # the held query still answers; the next fail
        await harness.register(site_record(harness, "a"))
        await watcher.until(lambda s: len(s) == 1)
        before = fake.request_count("GET", HEALTH_PATH)
        await asyncio.sleep(1.2)
        failed = fake.request_count("GET", HEALTH_PATH) - before
        assert 2 <= failed <= 6, f"{failed} queries in 1.2 s of errors: no backoff?"
        await harness.register(site_record(harness, "b"))
        fake.clear_failures()
        await watcher.until(lambda s: len(s) == 2, timeout=2.0)
    assert "catalog watch" in caplog.text


async def test_the_watch_starts_over_when_the_index_goes_backwards(
    harness: Harness, fake: FakeConsul
) -> None:
    async with watching(harness) as watcher:
        await watcher.next()
        for i in range(5):  # push the index well up
            await harness.register(site_record(harness, f"s{i}"))
        await watcher.until(lambda s: len(s) == 5)
        await fake.until_held()  # (a query arriving after the restore waits out its `wait`)
        fake.force_index(1)  # a snapshot restore: indexes drop, blocking queries end
        await asyncio.sleep(0.2)
        await harness.register(site_record(harness, "after-restore"))  # index 2, below ours
        await watcher.until(lambda s: len(s) == 6, timeout=2.0)


async def test_cancelling_a_watch_drops_its_blocking_query_at_once(
    harness: Harness, fake: FakeConsul
) -> None:
    loop = asyncio.get_running_loop()
    async with watching(harness) as watcher:
        await watcher.next()
        await fake.until_held()  # a 30 s blocking query
        started = loop.time()
        await watcher.close()
    assert loop.time() - started < 0.5


def test_next_index_follows_consuls_rules() -> None:
    assert next_index(0, 7) == 7
    assert next_index(7, 7) == 7  # timed out: block on the same index again
    assert next_index(12, 3) == 0  # went backwards: start over
    assert next_index(0, 0) == 1  # never block on 0: that is a hot loop


async def test_entries_that_do_not_decode_are_skipped(
    harness: Harness, fake: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    good = site_record(harness, "good")
    await harness.register(good)
    async with httpx.AsyncClient(base_url=fake.url) as http:
        foreign = {"Name": "edif-site", "ID": "edif-site-foreign", "Meta": {"owner": "else"}}
        await http.put("/v1/agent/service/register", json=foreign)
        impostor = {"Name": "edif-site", "ID": "not-the-id", "Meta": good.to_meta()}
        await http.put("/v1/agent/service/register", json=impostor)
    with caplog.at_level(logging.WARNING):
        assert await harness.mine() == [good]
    assert "edif-site-foreign" in caplog.text and "not-the-id" in caplog.text


# -- configuration and failures --------------------------------------------------------------


async def test_the_token_is_sent_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    token = "s3cret-" + secrets.token_hex(8)
    caplog.set_level(logging.DEBUG)
    async with FakeConsul(token=token) as fake:
        harness = Harness(ConsulCatalog(settings_for(fake, token=token)), asyncio.sleep, 15, 60)
        await harness.register(site_record(harness, "acl"))
        assert len(await harness.mine()) == 1
        anonymous = ConsulCatalog(settings_for(fake))
        with pytest.raises(CatalogUnavailable, match="EDIF_CONSUL_TOKEN") as refused:
            await anonymous.snapshot()
        await harness.catalog.aclose()
        await anonymous.aclose()
    assert token not in str(refused.value)
    assert token not in caplog.text
    assert token not in repr(settings_for(fake, token=token))


async def test_an_unreachable_consul_is_catalog_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    catalog = ConsulCatalog(ConsulSettings(addr=f"http://127.0.0.1:{port}", request_timeout_s=2))
    harness = Harness(catalog, asyncio.sleep, 15, 60)
    with pytest.raises(CatalogUnavailable, match="could not"):
        await catalog.snapshot()
    with pytest.raises(CatalogUnavailable):
        await harness.register(site_record(harness, "lonely"))
    await catalog.aclose()


def test_settings_come_from_edif_consul_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDIF_CONSUL_ADDR", "https://consul.edif.example.eu:8501")
    monkeypatch.setenv("EDIF_CONSUL_TOKEN", "do-not-print-me")
    monkeypatch.setenv("EDIF_CONSUL_WAIT_S", "45")
    settings = ConsulSettings()
    assert settings.addr == "https://consul.edif.example.eu:8501"
    assert settings.token is not None and settings.token.get_secret_value() == "do-not-print-me"
    assert settings.wait_s == 45.0
    assert "do-not-print-me" not in repr(settings) + str(settings)


@pytest.mark.parametrize("addr", [None, "", "127.0.0.1:8500", "ftp://consul:8500"])
def test_an_unusable_address_is_a_config_error(addr: str | None) -> None:
    with pytest.raises(ConfigError):
        ConsulCatalog(ConsulSettings(addr=addr))
