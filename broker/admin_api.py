"""Governance staff's JSON API for fair-use quotas: policies and usage.

Routes (roles `governance` and `admin` only; any other valid token gets 403, none 401):

- `GET /admin/api/quotas`: defaults, role and group policies, and the precedence rule.
- `PUT /admin/api/quotas/{scope}/{name}`: create or change the policy of a role or group
  (`scope` is `role` or `group`); the JSON body is a `PolicyUpdate`, fields left out keep their
  value. Takes effect for the next admission and survives restarts (SQLite).
- `DELETE /admin/api/quotas/{scope}/{name}`: remove it (the next rule in precedence applies).
- `GET /admin/api/usage?period=day|week|month`: GPU-seconds per user pseudonym and per group in
  the current period, and unfinished jobs per pseudonym. Raw user ids never appear.

Every change (PUT, DELETE) is written to the audit log as a `quota.change` entry: who (the log
pseudonymizes the staff member's `sub`), their role, scope, name and the new policy (null when
removed). `record_quota_change` is the one way to write it; the dashboard's form does the same.

The token comes in the `ndif-api-key` header (as nnsight sends it) or `Authorization: Bearer`.
Errors are the broker's typed errors, answered `{"detail": ...}` by the app's handlers.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError

from auth.roles import Role
from broker.audit.model import AuditAction, AuditEvent
from broker.audit.store import AuditLog, NullAuditLog
from broker.ports import Authenticator, Identity
from broker.quotas.policy import Period, PolicyUpdate, Scope
from broker.quotas.service import QuotaService
from edif.errors import BadRequest, PermissionDenied

log = logging.getLogger(__name__)

API_KEY_HEADER = "ndif-api-key"
ADMIN_ROLES = frozenset({Role.GOVERNANCE.value, Role.ADMIN.value})
PRECEDENCE = (
    "A user's limits come from their groups' policies if any group has one (the most generous "
    "of them, field by field), else from their role's policy, else from the defaults. A group "
    "pool (group_gpu_seconds_per_period) is enforced in addition, per group."
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")


def add_admin_api_routes(
    app: FastAPI,
    quotas: QuotaService,
    authenticator: Authenticator,
    audit: AuditLog | None = None,  # None: changes are not audited (audit log turned off)
) -> None:
    journal: AuditLog = audit or NullAuditLog()

    def staff(request: Request) -> Identity:
        identity = authenticator.verify(_token(request))  # AuthenticationError -> 401
        if str(identity.role) not in ADMIN_ROLES:
            raise PermissionDenied(
                f"The quota API is for governance staff; tokens with role {str(identity.role)!r} "
                "cannot use it."
            )
        return identity

    @app.get("/admin/api/quotas")
    async def show_quotas(request: Request) -> dict[str, Any]:
        staff(request)
        return {"precedence": PRECEDENCE, **quotas.policies().model_dump(mode="json")}

    @app.put("/admin/api/quotas/{scope}/{name}")
    async def set_quota(scope: Scope, name: str, request: Request) -> dict[str, Any]:
        who = staff(request)  # before reading the body: strangers learn nothing about it
        _check_name(scope, name)
        update = _update_of(await request.body())
        policy = quotas.set_policy(scope, name, update)
        dumped = policy.model_dump(mode="json")
        await asyncio.to_thread(record_quota_change, journal, who, scope, name, dumped)
        log.info("quota policy %s/%s set by %s", scope.value, name, quotas.pseudonym(who.sub))
        return {"scope": scope.value, "name": name, "policy": policy.model_dump(mode="json")}

    @app.delete("/admin/api/quotas/{scope}/{name}")
    async def delete_quota(scope: Scope, name: str, request: Request) -> dict[str, Any]:
        who = staff(request)
        quotas.delete_policy(scope, name)
        await asyncio.to_thread(record_quota_change, journal, who, scope, name, None)
        log.info("quota policy %s/%s removed by %s", scope.value, name, quotas.pseudonym(who.sub))
        return {"scope": scope.value, "name": name, "deleted": True}

    @app.get("/admin/api/usage")
    async def usage(request: Request, period: Period = Period.DAY) -> dict[str, Any]:
        staff(request)
        return quotas.usage(period).model_dump(mode="json")


def record_quota_change(
    audit: AuditLog, who: Identity, scope: Scope, name: str, policy: dict[str, Any] | None
) -> None:
    """Write the `quota.change` entry for a change already made (policy None: removed).

    A failing audit log is logged, not raised: the change is in force and the caller's reply
    must say so.
    """
    data: dict[str, Any] = {"scope": scope.value, "name": name, "policy": policy}
    event = AuditEvent(action=AuditAction.QUOTA_CHANGE, user=who.sub, role=str(who.role), data=data)
    try:
        audit.append(event)
    except Exception:
        log.exception("could not audit quota change %s/%s", scope.value, name)


def _token(request: Request) -> str | None:
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return key
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None


def _update_of(body: bytes) -> PolicyUpdate:
    try:
        return PolicyUpdate.model_validate_json(body or b"{}")
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise BadRequest(f"Invalid quota policy: {problems}") from None


def _check_name(scope: Scope, name: str) -> None:
    if scope is Scope.ROLE and name not in {role.value for role in Role}:
        roles = ", ".join(role.value for role in Role)
        raise BadRequest(f"{name!r} is not a role; roles are: {roles}.")
    if not _NAME.match(name):
        raise BadRequest(
            "Group names are 1-128 characters: letters, digits and . _ @ : + - "
            "(starting with a letter or digit)."
        )
