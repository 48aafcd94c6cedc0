"""`SiteRecord`: what a site agent publishes in the catalog, and the health the catalog sees.

Flow: the agent builds a record from its site config and what it has loaded, and registers
it (`Catalog.register`); the catalog stores it (in memory, or as Consul service metadata via
`to_meta`/`from_meta`, see `registry.meta`) and hands it back to the broker with `health`
filled in from the catalog's own checks. The `health` an agent puts in is ignored.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Health = Literal["passing", "warning", "critical"]
HEALTH_ORDER: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2}

# Same rule as the broker's sites file: names end up in URLs, service IDs and check IDs.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def worst_health(statuses: list[str]) -> Health:
    """The worst of some check statuses; anything unknown (e.g. Consul's 'maintenance') counts
    as critical, and no checks at all as passing."""
    worst: Health = "passing"
    for status in statuses:
        rank = HEALTH_ORDER.get(status, 2)
        if rank > HEALTH_ORDER[worst]:
            worst = "critical" if rank == 2 else "warning"
    return worst


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Versions(_Frozen):
    nnsight: str
    torch: str
    transformers: str
    python: str


class Hardware(_Frozen):
    vendor: Literal["cuda", "rocm", "cpu"]
    device_type: str  # e.g. "NVIDIA RTX A6000", "AMD Instinct MI300X", "cpu"
    count: int = Field(ge=0)
    # One entry per device when known (len == count), empty when the agent cannot tell.
    free_memory_bytes: list[int] = Field(default_factory=list)
    total_memory_bytes: int = Field(default=0, ge=0, description="per device")

    @model_validator(mode="after")
    def _one_free_figure_per_device(self) -> Hardware:
        if self.free_memory_bytes and len(self.free_memory_bytes) != self.count:
            raise ValueError("free_memory_bytes needs one entry per device, or none")
        return self


class ModelEntry(_Frozen):
    model_key: str  # canonical nnsight model key the broker routes on
    repo_id: str
    revision: str = ""  # "" when the site config names none
    task: str
    # RUNNING | DEPLOYING | NOT_STARTED | UNHEALTHY today; kept a string so a newer agent's
    # state does not make its whole record unreadable (the router never picks unknown states).
    state: str = Field(pattern=r"^[A-Z_]{1,32}$")


class SiteRecord(_Frozen):
    site: str
    institution: str
    grpc_address: str  # "host:port" of the agent's gRPC endpoint
    agent_version: str
    versions: Versions
    hardware: Hardware
    models: list[ModelEntry] = Field(default_factory=list)
    allowed_groups: list[str] = Field(default_factory=list)  # empty: every researcher
    max_concurrent_jobs: int = Field(default=0, ge=0)  # 0: one per model worker
    health: Health = "passing"  # as seen by the catalog; ignored on register

    @field_validator("site")
    @classmethod
    def _site_is_simple(cls, value: str) -> str:
        if not SITE_NAME.match(value):
            raise ValueError("site names use letters, digits, '.', '_' and '-' only (max 63)")
        return value

    @field_validator("grpc_address")
    @classmethod
    def _address_has_port(cls, value: str) -> str:
        split_address(value)
        return value

    def with_health(self, health: Health) -> SiteRecord:
        return self.model_copy(update={"health": health})

    def to_meta(self) -> dict[str, str]:
        from registry.meta import to_meta  # meta imports this module

        return to_meta(self)

    @classmethod
    def from_meta(cls, meta: dict[str, str], health: Health = "passing") -> SiteRecord:
        from registry.meta import from_meta

        return from_meta(meta, health)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)
