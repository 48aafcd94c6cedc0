"""The governance dashboard's HTTP routes under `/admin` (HTML pages, one CSV export).

Pages: Usage (`/admin/usage`), Quotas (`/admin/quotas`, with the edit form), Audit
(`/admin/audit`, filters + pagination, `/admin/audit.csv` export) and Sites (`/admin/sites`).
Only roles `governance` and `admin` get in.

Flow: `GET /admin/login` shows a form and sets a login-CSRF cookie; `POST /admin/login` takes
the governance JWT from the form body, verifies it with the broker's own verifier (the same
`Authenticator` as the API), refuses other roles with a 403 page, and otherwise opens a
server-side session (`sessions.SessionStore`) whose opaque id goes into an HttpOnly,
SameSite=Strict, `Path=/admin` cookie (Secure behind https). The JWT is never stored, echoed
or redirected with. Every page looks the session up; none -> 303 to the login page.
State-changing forms (quota save/delete, logout) are POSTs that must carry the session's CSRF
token. Every response carries a strict CSP (no inline script or style, nothing from other
origins: CSS is served from `/admin/static`), `no-store` and `frame-ancestors 'none'`.

People appear only as pseudonyms: usage comes keyed by the quota pseudonym, audit entries by the
audit pseudonym; the logged-in person is shown by their pseudonym too.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from auth.roles import Role
from broker.admin_api import ADMIN_ROLES, PRECEDENCE, _check_name  # one name rule for both
from broker.audit.export import to_csv
from broker.audit.model import AuditAction, AuditEntry, AuditEvent, AuditFilter
from broker.audit.store import AuditLog, NullAuditLog
from broker.dashboard import views
from broker.dashboard.sessions import Session, SessionStore
from broker.ports import Authenticator
from broker.quotas.policy import Period, PolicyUpdate, QuotaPolicy, Scope
from broker.quotas.service import QuotaService
from edif.clock import Clock, SystemClock
from edif.errors import BadRequest, EdifError, NotFound

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "edif_admin_session"
LOGIN_COOKIE = "edif_admin_login"  # double-submit token against login CSRF
COOKIE_PATH = "/admin"
CHART_DAYS = 14
MAX_TOKEN_CHARS = 8192  # a JWT is a few hundred bytes; anything longer is not one
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NAV = [("usage", "Usage"), ("quotas", "Quotas"), ("audit", "Audit"), ("sites", "Sites")]
POLICY_FIELDS = (
    "rate_per_s", "burst", "max_concurrent", "max_payload_bytes", "max_result_bytes",
    "gpu_seconds_per_period", "period", "group_gpu_seconds_per_period",
)  # fmt: skip


def add_dashboard_routes(
    app: FastAPI,
    quotas: QuotaService,
    authenticator: Authenticator,
    audit: AuditLog | None,
    deployments: Callable[[], dict[str, Any]],
    clock: Clock | None = None,
) -> None:
    """Mount the dashboard on `app` (see the module docstring)."""
    Dashboard(quotas, authenticator, audit, deployments, clock or SystemClock()).mount(app)


class Dashboard:
    def __init__(
        self,
        quotas: QuotaService,
        authenticator: Authenticator,
        audit: AuditLog | None,
        deployments: Callable[[], dict[str, Any]],
        clock: Clock,
    ) -> None:
        self.quotas = quotas
        self.authenticator = authenticator
        self.audit: AuditLog = audit or NullAuditLog()
        self.deployments = deployments
        self.clock = clock
        self.sessions = SessionStore(clock)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(utc=views.utc, seconds=views.seconds, size=views.size)

    # -- plumbing ----------------------------------------------------------------------------

    def render(
        self,
        template: str,
        request: Request,
        session: Session | None = None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        html = self.templates.get_template(template).render(
            session=session, path=request.url.path, nav=NAV, now=self.clock.now(), **context
        )
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    async def checked_post(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The session and form of a state-changing POST, or the response refusing it.

        Every form that changes something goes through here: a live session and its CSRF token.
        """
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not session.csrf_ok(form.get("csrf")):
            return self.forbidden(request, session, "The form's security token did not match.")
        return session, form

    def to_login(self) -> RedirectResponse:
        return RedirectResponse("/admin/login", status_code=303, headers=SECURITY_HEADERS)

    def forbidden(self, request: Request, session: Session | None, why: str) -> HTMLResponse:
        return self.render("error.html", request, session, 403, title="Access denied", why=why)

    @staticmethod
    def secure(request: Request) -> bool:
        # Behind a TLS-terminating proxy the app sees http; the proxy's header says the truth.
        proto = request.headers.get("x-forwarded-proto", request.url.scheme)
        return proto.split(",")[0].strip() == "https"

    # -- routes ------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        app.add_api_route("/admin", self.home, methods=["GET"], include_in_schema=False)
        app.add_api_route("/admin/", self.home, methods=["GET"], include_in_schema=False)
        app.add_api_route("/admin/login", self.login_form, methods=["GET"])
        app.add_api_route("/admin/login", self.login, methods=["POST"])
        app.add_api_route("/admin/logout", self.logout, methods=["POST"])
        app.add_api_route("/admin/usage", self.usage_page, methods=["GET"])
        app.add_api_route("/admin/quotas", self.quotas_page, methods=["GET"])
        app.add_api_route("/admin/quotas", self.save_quota, methods=["POST"])
        app.add_api_route("/admin/quotas/delete", self.delete_quota, methods=["POST"])
        app.add_api_route("/admin/audit", self.audit_page, methods=["GET"])
        app.add_api_route("/admin/audit.csv", self.audit_csv, methods=["GET"])
        app.add_api_route("/admin/sites", self.sites_page, methods=["GET"])
        app.add_api_route("/admin/static/dashboard.css", self.stylesheet, methods=["GET"])

    async def home(self, request: Request) -> Response:
        if self.session_of(request) is None:
            return self.to_login()
        return RedirectResponse("/admin/usage", status_code=303, headers=SECURITY_HEADERS)

    async def stylesheet(self) -> FileResponse:
        headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"}
        return FileResponse(
            HERE / "static" / "dashboard.css", media_type="text/css", headers=headers
        )

    async def login_form(self, request: Request) -> Response:
        if self.session_of(request) is not None:
            return RedirectResponse("/admin/usage", status_code=303, headers=SECURITY_HEADERS)
        return self.login_page(request)

    def login_page(self, request: Request, error: str = "", status_code: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self.render(
            "login.html", request, None, status_code, login_csrf=nonce, error=error
        )
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=600, path=COOKIE_PATH, httponly=True,
            samesite="strict", secure=self.secure(request),
        )  # fmt: skip
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        presented = str(form.get("login_csrf", ""))
        if not nonce or not secrets.compare_digest(nonce, presented):
            return self.login_page(request, "Your login form expired; please try again.", 400)
        token = str(form.get("token", "")).strip()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return self.login_page(request, "Paste your eDIF governance token.", 400)
        try:
            identity = self.authenticator.verify(token)
        except EdifError as error:
            # The verifier's message says what was wrong (expired, foreign issuer, ...) and
            # never quotes the token back.
            return self.login_page(request, error.message, error.http_status)
        role = str(identity.role)
        pseudonym = self.quotas.pseudonym(identity.sub)
        if role not in ADMIN_ROLES:
            log.info("dashboard login refused for %s (role %s)", pseudonym, role)
            return self.forbidden(
                request,
                None,
                f"The governance dashboard is for governance staff and administrators; "
                f"your token's role is “{role}”.",
            )
        exp = getattr(identity, "exp", None)
        session_id = self.sessions.create(
            identity.sub, role, pseudonym, float(exp) if exp is not None else None
        )
        log.info("dashboard login: %s (%s)", pseudonym, role)
        response = RedirectResponse("/admin/usage", status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(
            SESSION_COOKIE, session_id, max_age=self.sessions.max_age(session_id),
            path=COOKIE_PATH, httponly=True, samesite="strict", secure=self.secure(request),
        )  # fmt: skip
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        return response

    async def logout(self, request: Request) -> Response:
        checked = await self.checked_post(request)
        if isinstance(checked, Response):
            return checked
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = self.to_login()
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return response

    # -- usage -------------------------------------------------------------------------------

    async def usage_page(self, request: Request, period: str = "day") -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        chosen = Period(period) if period in {p.value for p in Period} else Period.DAY
        report = await run_in_threadpool(self.quotas.usage, chosen)
        policies = self.quotas.policies()
        researcher = policies.roles.get(Role.RESEARCHER.value, policies.defaults)
        users = views.user_lines(report.rows, report.active_jobs, researcher, chosen)
        groups = views.group_lines(report.rows, policies, chosen)
        chart = views.bar_chart(await run_in_threadpool(self.daily_usage))
        return self.render(
            "usage.html",
            request,
            session,
            report=report,
            period=chosen,
            periods=list(Period),
            users=users,
            groups=groups,
            chart=chart,
            researcher=researcher,
            total=sum(line.gpu_seconds for line in users),
            jobs=sum(line.jobs for line in users),
            running=sum(report.active_jobs.values()),
        )

    def daily_usage(self) -> list[tuple[str, float]]:
        """Users' GPU-seconds per UTC day over the last `CHART_DAYS` days, oldest first."""
        today = datetime.fromtimestamp(self.clock.now(), UTC).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        points = []
        for back in range(CHART_DAYS - 1, -1, -1):
            day = today - timedelta(days=back)
            rows = self.quotas.usage(Period.DAY, at=day.timestamp() + 1).rows
            total = sum(r.gpu_seconds for r in rows if r.scope == "user")
            points.append((day.strftime("%d %b"), total))
        return points

    # -- quotas ------------------------------------------------------------------------------

    async def quotas_page(
        self,
        request: Request,
        scope: str = "role",
        name: str = Role.RESEARCHER.value,
        saved: str = "",
        deleted: str = "",
    ) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        scope = scope if scope in {s.value for s in Scope} else Scope.ROLE.value
        notice = (
            f"Saved the {scope} policy “{name}”: it applies from the next request."
            if saved
            else "Policy removed: the next rule in precedence applies."
            if deleted
            else ""
        )
        return self.quota_view(request, session, scope, name[:128], notice=notice)

    def quota_view(
        self,
        request: Request,
        session: Session,
        scope: str,
        name: str,
        values: Mapping[str, str] | None = None,
        error: str = "",
        notice: str = "",
        status_code: int = 200,
    ) -> HTMLResponse:
        policies = self.quotas.policies()
        table = policies.roles if scope == Scope.ROLE.value else policies.groups
        current = table.get(name, policies.defaults)
        form = dict(values) if values is not None else _form_values(current)
        return self.render(
            "quotas.html",
            request,
            session,
            status_code,
            policies=policies,
            precedence=PRECEDENCE,
            roles=[r.value for r in Role],
            periods=[p.value for p in Period],
            scope=scope,
            name=name,
            form=form,
            exists=name in table,
            error=error,
            notice=notice,
        )

    async def save_quota(self, request: Request) -> Response:
        checked = await self.checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        scope, name = form.get("scope", ""), form.get("name", "").strip()
        try:
            chosen = Scope(scope)
            _check_name(chosen, name)
            update = _update_from(form)
        except (ValueError, BadRequest) as error:
            message = error.message if isinstance(error, BadRequest) else "Unknown scope."
            values = {k: form.get(k, "") for k in POLICY_FIELDS}
            return self.quota_view(
                request, session, scope or "role", name, values, message, status_code=400
            )
        policy = self.quotas.set_policy(chosen, name, update)  # in force for the next admission
        self.record_change(session, chosen, name, policy.model_dump(mode="json"))
        log.info("quota policy %s/%s set by %s (dashboard)", chosen.value, name, session.pseudonym)
        query = urlencode({"scope": chosen.value, "name": name, "saved": "1"})
        return RedirectResponse(f"/admin/quotas?{query}", status_code=303, headers=SECURITY_HEADERS)

    async def delete_quota(self, request: Request) -> Response:
        checked = await self.checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        try:
            chosen = Scope(form.get("scope", ""))
            self.quotas.delete_policy(chosen, form.get("name", ""))
        except (ValueError, NotFound):
            return self.quota_view(
                request, session, "role", Role.RESEARCHER.value,
                error="No such policy.", status_code=404,
            )  # fmt: skip
        self.record_change(session, chosen, form.get("name", ""), None)
        query = urlencode({"deleted": "1"})
        return RedirectResponse(f"/admin/quotas?{query}", status_code=303, headers=SECURITY_HEADERS)

    def record_change(
        self, session: Session, scope: Scope, name: str, policy: dict[str, Any] | None
    ) -> None:
        """A `quota.change` audit entry: who (pseudonymized by the log), what, the new policy."""
        data: dict[str, Any] = {"scope": scope.value, "name": name, "policy": policy}
        try:
            self.audit.append(
                AuditEvent(
                    action=AuditAction.QUOTA_CHANGE, user=session.sub, role=session.role, data=data
                )
            )
        except Exception:  # the change is made; losing its paperwork must not undo the page
            log.exception("could not audit quota change %s/%s", scope.value, name)

    # -- audit -------------------------------------------------------------------------------

    async def audit_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        query = views.AuditQuery.parse(request.query_params)
        entries = await run_in_threadpool(self.filtered, query)
        page = views.paginate(entries, query.page)
        return self.render(
            "audit.html",
            request,
            session,
            query=query,
            page=page,
            actions=[a.value for a in AuditAction],
            link=lambda number: "/admin/audit?" + urlencode(query.params(number)),
            export="/admin/audit.csv?" + urlencode(query.params()),
        )

    async def audit_csv(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        query = views.AuditQuery.parse(request.query_params)
        entries = await run_in_threadpool(self.filtered, query)
        log.info("audit export (%d entries) by %s", len(entries), session.pseudonym)
        stamp = datetime.fromtimestamp(self.clock.now(), UTC).strftime("%Y%m%d-%H%M%S")
        headers = {
            **SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="edif-audit-{stamp}.csv"',
        }
        return Response(to_csv(entries, []), media_type="text/csv; charset=utf-8", headers=headers)

    def filtered(self, query: views.AuditQuery) -> list[AuditEntry]:
        """Entries matching the page's filters (the whole log is read: fine at today's size;
        push model/site/paging into SQL when it grows)."""
        if query.errors:
            return []
        wanted = AuditFilter(
            since=query.since_ts,
            until=query.until_ts,
            actions=frozenset({query.action}) if query.action else None,
        )
        return [e for e in self.audit.entries(wanted) if query.matches(e)]

    # -- sites -------------------------------------------------------------------------------

    async def sites_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login()
        status = self.deployments()
        sites = views.sites_of(status)
        return self.render(
            "sites.html",
            request,
            session,
            sites=sites,
            models=sum(len(s.models) for s in sites),
            queued=sum(s.queue_depth for s in sites),
            waiting=sum((status.get("broker_queue") or {}).values()),
            healthy=sum(1 for s in sites if s.health == "HEALTHY"),
        )


def _form_values(policy: QuotaPolicy) -> dict[str, str]:
    values = policy.model_dump(mode="json")
    return {k: "" if values.get(k) is None else str(values[k]) for k in POLICY_FIELDS}


def _update_from(form: Mapping[str, str]) -> PolicyUpdate:
    """The whole policy as the form shows it; a blank GPU budget means unlimited."""
    fields: dict[str, Any] = {}
    for key in POLICY_FIELDS:
        value = form.get(key, "").strip()
        if value:
            fields[key] = value
    fields["unlimited_gpu_seconds"] = "gpu_seconds_per_period" not in fields
    fields["unlimited_group_gpu_seconds"] = "group_gpu_seconds_per_period" not in fields
    try:
        return PolicyUpdate.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in error.errors()
        )
        raise BadRequest(f"Invalid quota policy: {problems}") from None
