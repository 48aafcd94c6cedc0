"""A small client for the broker's governance API (`/admin/api/...`), used by `edif quota` and
`edif usage`.

Where and as whom: `AdminClientSettings` reads `EDIF_BROKER_URL` and `EDIF_TOKEN` (a governance
or admin token); command-line options override them. The token travels in the `ndif-api-key`
header, as every eDIF client sends it, and is never printed. A refusal from the broker becomes
`AdminApiError` carrying the broker's `detail` message.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from edif.errors import EdifError

TIMEOUT_S = 10.0


class AdminClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDIF_", extra="ignore")

    broker_url: str = "http://127.0.0.1:8000"
    token: str | None = None


class AdminApiError(EdifError):
    """The broker refused or could not be reached; the message says which and why."""


class AdminClient:
    def __init__(self, broker_url: str, token: str | None) -> None:
        if not token:
            raise AdminApiError(
                "No token: pass --token or set EDIF_TOKEN to a governance or admin token."
            )
        self._base = broker_url.rstrip("/")
        self._headers = {"ndif-api-key": token}

    def quotas(self) -> dict[str, Any]:
        return self._call("GET", "/admin/api/quotas")

    def set_quota(self, scope: str, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", f"/admin/api/quotas/{scope}/{name}", json=changes)

    def delete_quota(self, scope: str, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/api/quotas/{scope}/{name}")

    def usage(self, period: str) -> dict[str, Any]:
        return self._call("GET", "/admin/api/usage", params={"period": period})

    def _call(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            reply = httpx.request(
                method, self._base + path, headers=self._headers, timeout=TIMEOUT_S, **options
            )
        except httpx.HTTPError as error:
            raise AdminApiError(f"Cannot reach the broker at {self._base}: {error}") from None
        if reply.is_success:
            return reply.json()
        try:
            detail = reply.json().get("detail", reply.text)
        except ValueError:
            detail = reply.text
        raise AdminApiError(f"The broker answered {reply.status_code}: {detail}")
