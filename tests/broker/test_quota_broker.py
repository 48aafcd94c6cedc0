"""Quotas through the broker's HTTP front over fake sites: what a researcher's nnsight client
gets (a 4xx `{"detail": ...}` it prints as `RemoteError: Failed to send request: ...`, or the
job's ERROR) and what governance staff see on the admin API."""

from __future__ import annotations

import json
import time

import pytest
from broker_fakes import (
    GPT2_KEY,
    HANG,
    SITES,
    FakeAuthenticator,
    FakeIdentity,
    decode,
    settings_for,
    status,
)
from fastapi.testclient import TestClient

from broker.admin_api import add_admin_api_routes
from broker.app import create_app
from broker.catalog import SiteCatalog
from broker.main import lifespan_for
from broker.quotas.policy import QuotaPolicy
from broker.quotas.service import QuotaService
from broker.quotas.store import QuotaStore
from broker.results import DiskResultStore
from broker.service import BrokerService
from proto import site_agent_pb2 as pb

ALICE = {"ndif-api-key": "alice-token", "nnsight-version": "0.8.1"}  # group lab-a
BOB = {"ndif-api-key": "bob-token", "nnsight-version": "0.8.1"}
STAFF = {"ndif-api-key": "staff-token"}


class Authenticator(FakeAuthenticator):
    TOKENS = {
        **FakeAuthenticator.TOKENS,
        "staff-token": FakeIdentity("gov@example.org", "governance"),
        "admin-token": FakeIdentity("root@example.org", "admin"),
    }


@pytest.fixture
def make_client(tmp_path, sites, clock):
    opened: list[TestClient] = []

    def build(**defaults) -> TestClient:
        settings = settings_for(tmp_path)
        catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
        results = DiskResultStore(
            settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
        )
        store = QuotaStore(settings.data_dir / "quotas.sqlite3")
        quotas = QuotaService(store, lambda sub: "u-" + sub[:3], clock, QuotaPolicy(**defaults))
        service = BrokerService(
            settings, catalog, sites, results, lambda sub: "u-" + sub[:3], clock, quotas
        )
        auth = Authenticator()
        app = create_app(service, auth, settings, lambda: {"keys": []}, lifespan_for(service))
        add_admin_api_routes(app, quotas, auth)
        client = TestClient(app, base_url="http://broker.test")
        client.__enter__()
        client.service = service  # type: ignore[attr-defined]
        opened.append(client)
        return client

    yield build
    for client in opened:
        client.__exit__(None, None, None)


def envelope(session_id: str = "") -> str:
    return json.dumps({"model_key": GPT2_KEY, "session_id": session_id, "compress": False})


def post(client, headers=ALICE, blob: bytes = b"blob", session_id: str = ""):
    return client.post(
        "/request",
        data={"data": envelope(session_id)},
        files={"blob": ("request", blob, "application/octet-stream")},
        headers=headers,
    )


def run_on_socket(client, headers=ALICE):
    """Subscribe, POST, read frames until the terminal one; returns it."""
    with client.websocket_connect(
        "/subscribe", headers={"ndif-api-key": headers["ndif-api-key"]}
    ) as ws:
        session_id = json.loads(ws.receive()["text"])["session_id"]
        reply = post(client, headers, session_id=session_id)
        assert reply.status_code == 200, reply.text
        while True:
            message = ws.receive()
            frame = decode(message.get("bytes") or message.get("text"))
            if frame.status in ("COMPLETED", "ERROR"):
                return frame


def put(client, scope: str, name: str, body: dict, headers=STAFF):
    return client.put(f"/admin/api/quotas/{scope}/{name}", json=body, headers=headers)


def wait_charged(client, group: str) -> float:
    """The group's GPU-seconds today, once the finished job's charge is in the ledger."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = client.get("/admin/api/usage", headers=STAFF).json()["rows"]
        used = [r["gpu_seconds"] for r in rows if (r["scope"], r["name"]) == ("group", group)]
        if used:
            return used[0]
        time.sleep(0.01)
    raise AssertionError(f"no charge for group {group}")


def test_over_rate_is_429_with_the_reason(make_client) -> None:
    client = make_client(rate_per_s=0.5, burst=2)
    assert post(client).status_code == 200
    assert post(client).status_code == 200
    reply = post(client)
    assert reply.status_code == 429
    detail = reply.json()["detail"]
    assert "Quota exceeded: request rate: you used all 2 requests of your burst" in detail
    assert "allowed in 2.00 s" in detail
    assert post(client, BOB).status_code == 200  # buckets are per user


def test_too_many_concurrent_jobs_is_429(make_client, sites) -> None:
    sites.script("site-a", [status(pb.RUNNING), HANG])
    client = make_client(max_concurrent=1)
    assert post(client).status_code == 200
    reply = post(client)
    assert reply.status_code == 429
    assert "concurrent jobs: you have 1 unfinished job(s), the limit is 1" in reply.json()["detail"]


def test_concurrency_slot_is_freed_when_a_job_ends(make_client) -> None:
    client = make_client(max_concurrent=1)
    assert run_on_socket(client).status == "COMPLETED"
    assert run_on_socket(client).status == "COMPLETED"


def test_payload_over_the_users_cap_is_413_with_the_reason(make_client) -> None:
    client = make_client()
    assert put(client, "group", "lab-a", {"max_payload_bytes": 3}).status_code == 200
    reply = post(client, blob=b"four")
    assert reply.status_code == 413
    assert (
        "request payload size: this request is 4 bytes, your limit is 3" in reply.json()["detail"]
    )
    assert post(client, BOB, blob=b"four").status_code == 200  # not in lab-a


def test_gpu_budget_first_job_completes_and_is_charged_the_next_is_refused(make_client) -> None:
    client = make_client()
    # the fake site measures 0.25 s per job
    assert put(client, "group", "lab-a", {"gpu_seconds_per_period": 0.1}).status_code == 200
    assert run_on_socket(client).status == "COMPLETED"
    assert wait_charged(client, "lab-a") == pytest.approx(0.25)
    reply = post(client)
    assert reply.status_code == 429
    detail = reply.json()["detail"]
    assert "GPU-seconds budget (yours, per day): used 0.250 of 0.1 GPU-seconds" in detail
    assert "resets at" in detail and "UTC" in detail
    assert run_on_socket(client, BOB).status == "COMPLETED"  # bob has no budget


def test_result_over_the_users_cap_ends_the_job_in_error(make_client) -> None:
    client = make_client()
    assert put(client, "group", "lab-a", {"max_result_bytes": 100}).status_code == 200
    frame = run_on_socket(client)
    assert frame.status == "ERROR"
    assert "Quota exceeded: result size" in frame.description
    assert "your limit is 100 bytes per job" in frame.description
    assert client.service._admissions == {}  # the slot was released


def test_admin_api_is_for_governance_and_admin_only(make_client) -> None:
    client = make_client()
    assert client.get("/admin/api/quotas").status_code == 401
    reply = client.get("/admin/api/quotas", headers={"ndif-api-key": "alice-token"})
    assert reply.status_code == 403
    assert "governance" in reply.json()["detail"]
    assert (
        put(client, "group", "x", {"burst": 1}, headers={"ndif-api-key": "bob-token"}).status_code
        == 403
    )
    bearer = {"authorization": "Bearer admin-token"}
    assert client.get("/admin/api/usage", headers=bearer).status_code == 200


def test_admin_api_sets_shows_and_deletes_policies(make_client) -> None:
    client = make_client()
    reply = put(client, "role", "researcher", {"gpu_seconds_per_period": 3600, "period": "week"})
    assert reply.status_code == 200
    assert reply.json()["policy"]["period"] == "week"
    shown = client.get("/admin/api/quotas", headers=STAFF).json()
    assert shown["roles"]["researcher"]["gpu_seconds_per_period"] == 3600
    assert "groups' policies" in shown["precedence"]
    assert put(client, "role", "wizard", {}).status_code == 400
    assert put(client, "scope", "x", {}).status_code == 422
    bad = put(client, "group", "lab-a", {"burst": 0})
    assert bad.status_code == 400 and "burst" in bad.json()["detail"]
    assert put(client, "group", "lab-a", {"nonsense": 1}).status_code == 400
    deleted = client.delete("/admin/api/quotas/role/researcher", headers=STAFF)
    assert deleted.status_code == 200
    assert client.delete("/admin/api/quotas/role/researcher", headers=STAFF).status_code == 404


def test_cli_sets_shows_and_reports_usage_through_the_admin_api(make_client, monkeypatch) -> None:
    from click.testing import CliRunner

    import edif.admin_client
    from edif.cli import main

    client = make_client()
    monkeypatch.setattr(
        edif.admin_client.httpx,
        "request",
        lambda method, url, timeout=None, **kw: client.request(method, url, **kw),
    )
    monkeypatch.setenv("EDIF_TOKEN", "staff-token")
    monkeypatch.setenv("EDIF_BROKER_URL", "http://broker.test")
    runner = CliRunner()

    args = ["quota", "set", "--group", "lab-a", "--gpu-seconds", "60", "--period", "week"]
    done = runner.invoke(main, [*args, "--group-gpu-seconds", "600"])
    assert done.exit_code == 0, done.output
    policy = json.loads(done.output)["policy"]
    assert (policy["gpu_seconds_per_period"], policy["period"]) == (60.0, "week")
    assert policy["group_gpu_seconds_per_period"] == 600.0
    shown = json.loads(runner.invoke(main, ["quota", "show"]).output)
    assert shown["groups"]["lab-a"]["gpu_seconds_per_period"] == 60.0
    cleared = runner.invoke(
        main, ["quota", "set", "--group", "lab-a", "--gpu-seconds", "unlimited"]
    )
    assert json.loads(cleared.output)["policy"]["gpu_seconds_per_period"] is None

    assert run_on_socket(client).status == "COMPLETED"
    wait_charged(client, "lab-a")
    report = json.loads(runner.invoke(main, ["usage", "--period", "week"]).output)
    assert report["period"] == "week"
    assert {"scope": "user", "name": "u-ali", "gpu_seconds": 0.25, "jobs": 1} in report["rows"]

    refused = runner.invoke(main, ["quota", "show", "--token", "alice-token"])
    assert refused.exit_code == 1
    assert "403" in refused.output and "governance" in refused.output
    both = runner.invoke(main, ["quota", "set", "--role", "admin", "--group", "g"])
    assert both.exit_code == 2
    monkeypatch.delenv("EDIF_TOKEN")
    assert "No token" in runner.invoke(main, ["usage"]).output
