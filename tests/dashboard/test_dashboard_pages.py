"""The governance dashboard in real headless Chromium against a real broker (fake sites).

Each test logs in through the form with a real governance JWT, as a person would, and takes a
screenshot of the page it checks into `tests/dashboard/screenshots/` (gitignored).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from live_broker import RESEARCHER_SUB, STAFF_SUB, LiveBroker, screenshot

from auth.roles import Role

pytestmark = pytest.mark.timeout(120)


def login(page, broker: LiveBroker, token: str):
    page.goto(f"{broker.url}/admin/login")
    page.fill("#token", token)
    with page.expect_response(
        lambda r: r.url.endswith("/admin/login") and r.request.method == "POST"
    ) as answer:
        page.click("button[type=submit]")
    page.wait_for_load_state()
    return answer.value


@pytest.fixture(scope="module")
def jobs(broker: LiveBroker) -> list[str]:
    """Two jobs run by a researcher in group lab-a before the pages are looked at."""
    token = broker.token(Role.RESEARCHER, RESEARCHER_SUB, ("lab-a",))
    ids = []
    for _ in range(2):
        reply = broker.submit(token)
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["id"])
    broker.wait_charged(2)
    return ids


def test_no_session_goes_to_the_login_page(page, broker: LiveBroker) -> None:
    for target in ("/admin", "/admin/usage", "/admin/quotas", "/admin/audit", "/admin/sites"):
        page.goto(broker.url + target)
        assert page.url == f"{broker.url}/admin/login", target
    assert page.is_visible("textarea#token")
    screenshot(page, "login")


def test_researcher_token_is_refused(page, broker: LiveBroker) -> None:
    token = broker.token(Role.RESEARCHER, RESEARCHER_SUB, ("lab-a",))
    answer = login(page, broker, token)
    assert answer.status == 403
    assert "Access denied" in page.inner_text("h1")
    assert "researcher" in page.inner_text("main")
    assert token not in page.content()
    assert not [c for c in page.context.cookies() if c["name"] == "edif_admin_session"]
    screenshot(page, "refused")
    page.goto(f"{broker.url}/admin/usage")
    assert page.url.endswith("/admin/login")  # no session was opened


def test_a_forged_token_stays_on_the_login_page(page, broker: LiveBroker) -> None:
    answer = login(page, broker, "eyJhbGciOiJub25lIn0.e30.")
    assert answer.status == 401
    assert page.is_visible(".alert-error")
    assert page.url.endswith("/admin/login")


def test_usage_shows_the_jobs_just_run(page, broker: LiveBroker, jobs: list[str]) -> None:
    token = broker.token(Role.GOVERNANCE, STAFF_SUB)
    answer = login(page, broker, token)
    assert answer.status == 303
    assert page.url == f"{broker.url}/admin/usage"
    users = page.inner_text("#users")
    assert broker.pseudonym(RESEARCHER_SUB) in users
    assert "lab-a" in page.inner_text("#groups")
    assert "0.50 s" in users  # two jobs x 0.25 GPU-seconds
    assert page.locator("svg.chart rect.bar").count() == 14
    # Pseudonyms only; the token is neither in the page nor in the URL nor in a cookie.
    content = page.content()
    assert RESEARCHER_SUB not in content and STAFF_SUB not in content
    assert token not in content and token not in page.url
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["edif_admin_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["path"] == "/admin" and token not in session["value"]
    assert all(token not in c["value"] for c in cookies.values())
    screenshot(page, "usage")


def test_a_quota_saved_in_the_form_is_enforced_on_the_next_request(
    page, broker: LiveBroker, jobs: list[str]
) -> None:
    researcher = broker.token(Role.RESEARCHER, RESEARCHER_SUB, ("lab-a",))
    login(page, broker, broker.token(Role.ADMIN, "root@edif.example"))
    page.click("nav >> text=Quotas")
    assert page.url.endswith("/admin/quotas")
    page.select_option("#scope", "role")
    page.fill("#name", "researcher")
    page.fill("#gpu_seconds_per_period", "0.1")  # already 0.5 s used today
    page.select_option("#period", "day")
    page.click("#quota-form button[type=submit]")
    assert "it applies from the next request" in page.inner_text(".alert-ok")
    assert "researcher" in page.inner_text("#policies")
    screenshot(page, "quotas")

    refused = broker.submit(researcher)
    assert refused.status_code == 429, refused.text
    assert "Quota exceeded" in refused.json()["detail"]

    page.click("#policies button[aria-label='Remove role policy researcher']")
    assert "Policy removed" in page.inner_text(".alert-ok")
    assert broker.submit(researcher).status_code == 200


def test_audit_filters_and_exports_csv(page, broker: LiveBroker, jobs: list[str]) -> None:
    login(page, broker, broker.token(Role.GOVERNANCE, STAFF_SUB))
    page.click("nav >> text=Audit")
    table = page.inner_text("#audit")
    assert "job.submit" in table and "job.complete" in table
    page.select_option("#action", "job.complete")
    page.click("#audit-filters button[type=submit]")
    assert "action=job.complete" in page.url
    actions = page.locator("#audit tbody tr td:nth-child(3)").all_inner_texts()
    assert actions and set(actions) == {"job.complete"}
    assert RESEARCHER_SUB not in page.content()
    screenshot(page, "audit")

    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    exported = {row["job_id"] for row in rows}
    assert set(jobs) <= exported
    assert {row["action"] for row in rows} == {"job.complete"}
    assert all(row["pseudonym"].startswith("a-") for row in rows)


def test_sites_page_shows_status_data(page, broker: LiveBroker) -> None:
    login(page, broker, broker.token(Role.GOVERNANCE, STAFF_SUB))
    page.click("nav >> text=Sites")
    site_a = page.inner_text("#site-site-a")
    assert "openai-community/gpt2" in site_a and "HEALTHY" in site_a
    site_b = page.inner_text("#site-site-b")
    assert "meta-llama/Llama-3.1-8B" in site_b and "DEPLOYING" in site_b
    assert "DEGRADED" in site_b
    assert page.locator("#site-site-a td.num").first.inner_text() == "2"  # queue depth
    screenshot(page, "sites")


def test_sign_out_ends_the_session(page, broker: LiveBroker) -> None:
    login(page, broker, broker.token(Role.GOVERNANCE, STAFF_SUB))
    page.click("text=Sign out")
    assert page.url.endswith("/admin/login")
    page.goto(f"{broker.url}/admin/usage")
    assert page.url.endswith("/admin/login")
