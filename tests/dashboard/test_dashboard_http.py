"""The dashboard's security rules over plain HTTP (no browser): cookies, CSRF, roles, headers,
plus the pure view helpers. These run wherever the suite runs, Chromium or not."""

from __future__ import annotations

import re

import httpx
import pytest
from live_broker import RESEARCHER_SUB, STAFF_SUB, LiveBroker

from auth.roles import Role
from broker.audit.model import AuditEntry
from broker.dashboard import views
from broker.quotas.policy import Period, PolicySet, QuotaPolicy
from broker.quotas.store import UsageRow

pytestmark = pytest.mark.timeout(60)


def _hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, f"no hidden field {name}"
    return found.group(1)


def signed_in(broker: LiveBroker, role: Role = Role.GOVERNANCE) -> tuple[httpx.Client, str]:
    """A client holding a dashboard session, and that session's CSRF token."""
    client = httpx.Client(base_url=broker.url, follow_redirects=False, timeout=10)
    nonce = _hidden(client.get("/admin/login").text, "login_csrf")
    token = broker.token(role, STAFF_SUB)
    reply = client.post("/admin/login", data={"token": token, "login_csrf": nonce})
    assert reply.status_code == 303 and reply.headers["location"] == "/admin/usage"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    assert token not in cookie
    page = client.get("/admin/quotas")
    assert page.status_code == 200 and token not in page.text
    return client, _hidden(page.text, "csrf")


def test_no_session_redirects_to_login(broker: LiveBroker) -> None:
    for path in ("/admin/usage", "/admin/quotas", "/admin/audit", "/admin/audit.csv"):
        reply = httpx.get(broker.url + path, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/admin/login"
    forged = httpx.get(broker.url + "/admin/usage", cookies={"edif_admin_session": "x" * 43})
    assert forged.status_code == 303 and forged.headers["location"] == "/admin/login"


def test_login_needs_the_login_form_token(broker: LiveBroker) -> None:
    token = broker.token(Role.GOVERNANCE, STAFF_SUB)
    reply = httpx.post(broker.url + "/admin/login", data={"token": token, "login_csrf": "x"})
    assert reply.status_code == 400
    assert "edif_admin_session" not in reply.headers.get("set-cookie", "")


def test_researcher_gets_403_and_no_session(broker: LiveBroker) -> None:
    client = httpx.Client(base_url=broker.url, follow_redirects=False, timeout=10)
    nonce = _hidden(client.get("/admin/login").text, "login_csrf")
    token = broker.token(Role.RESEARCHER, RESEARCHER_SUB)
    reply = client.post("/admin/login", data={"token": token, "login_csrf": nonce})
    assert reply.status_code == 403
    assert "edif_admin_session" not in reply.headers.get("set-cookie", "")
    assert token not in reply.text


def test_quota_form_without_the_csrf_token_changes_nothing(broker: LiveBroker) -> None:
    client, csrf = signed_in(broker)
    form = {"scope": "group", "name": "csrf-probe", "burst": "1"}
    assert client.post("/admin/quotas", data={**form, "csrf": "wrong"}).status_code == 403
    assert client.post("/admin/quotas", data=form).status_code == 403
    assert "csrf-probe" not in broker.app.state.quotas.policies().groups  # type: ignore[attr-defined]
    saved = client.post("/admin/quotas", data={**form, "csrf": csrf})
    assert saved.status_code == 303
    assert broker.app.state.quotas.policies().groups["csrf-probe"].burst == 1  # type: ignore[attr-defined]
    removed = client.post("/admin/quotas/delete", data={**form, "csrf": csrf})
    assert removed.status_code == 303


def test_quota_change_is_audited_and_invalid_input_is_a_400(broker: LiveBroker) -> None:
    client, csrf = signed_in(broker, Role.ADMIN)
    bad = client.post(
        "/admin/quotas", data={"csrf": csrf, "scope": "role", "name": "wizard", "burst": "2"}
    )
    assert bad.status_code == 400 and "is not a role" in bad.text
    bad = client.post(
        "/admin/quotas", data={"csrf": csrf, "scope": "group", "name": "g1", "burst": "-1"}
    )
    assert bad.status_code == 400 and "Invalid quota policy" in bad.text
    ok = client.post(
        "/admin/quotas", data={"csrf": csrf, "scope": "group", "name": "g1", "burst": "5"}
    )
    assert ok.status_code == 303
    exported = client.get("/admin/audit.csv", params={"action": "quota.change"}).text
    assert "quota.change" in exported and STAFF_SUB not in exported


def test_pages_send_a_strict_csp_and_no_store(broker: LiveBroker) -> None:
    client, _ = signed_in(broker)
    for path in ("/admin/usage", "/admin/quotas", "/admin/audit", "/admin/sites"):
        reply = client.get(path)
        assert reply.status_code == 200, path
        assert "default-src 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["cache-control"] == "no-store"
        assert "<script" not in reply.text and "style=" not in reply.text
    assert client.get("/admin/static/dashboard.css").headers["content-type"].startswith("text/css")


# -- views (pure) --------------------------------------------------------------------------


def test_usage_lines_meter_only_in_the_budget_period() -> None:
    rows = [UsageRow(scope="user", name="u-1", gpu_seconds=50.0, jobs=2)]
    policy = QuotaPolicy(gpu_seconds_per_period=100.0, period=Period.DAY)
    (line,) = views.user_lines(rows, {"u-1": 1}, policy, Period.DAY)
    assert (line.percent, line.running, line.over) == (50.0, 1, False)
    (weekly,) = views.user_lines(rows, {}, policy, Period.WEEK)
    assert weekly.percent is None and weekly.limit_text == "100.0 s / day"
    pools = PolicySet(groups={"lab": QuotaPolicy(group_gpu_seconds_per_period=10.0)})
    (group,) = views.group_lines([], pools, Period.DAY)
    assert group.name == "lab" and group.percent == 0.0


def test_bar_chart_scales_to_a_round_maximum() -> None:
    chart = views.bar_chart([("a", 0.0), ("b", 37.0)])
    assert chart.ticks[-1][1] == "50.0 s" and not chart.empty
    assert chart.bars[0].height == 0 and chart.bars[1].height > 0
    assert views.bar_chart([("a", 0.0)]).empty


def test_audit_query_parses_filters_and_paginates() -> None:
    query = views.AuditQuery.parse({"action": "job.complete", "since": "2026-01-02T03:04"})
    assert query.since_ts == 1767323040.0 and not query.errors
    assert views.AuditQuery.parse({"until": "yesterday"}).errors
    entries = [
        AuditEntry(
            seq=i,
            hash="h",
            prev="p",
            ts=float(i),
            action="job.submit",
            kid=None,
            pseudonym=None,
            erased=False,
            role=None,
            model="m",
            site="s",
            job_id=None,
            bytes_in=0,
            bytes_out=0,
            gpu_s=0.0,
            outcome=None,
            data={},
        )  # fmt: skip
        for i in range(1, 121)
    ]
    page = views.paginate(entries, 3)
    assert (page.number, page.pages, page.total) == (3, 3, 120)
    assert [e.seq for e in page.items] == list(range(20, 0, -1))
    assert views.paginate(entries, 99).number == 3
