"""Broker settings, read once from `EDIF_BROKER_*` variables, and the sites file they point to.

`BrokerSettings()` is built once by whoever starts the broker (`edif broker run`, tests) and
passed down; nothing else in the broker reads the environment. The sites file is YAML:

    sites:
      - name: site-a
        address: "127.0.0.1:50051"
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.quotas.policy import QuotaPolicy
from edif.config import edif_home
from edif.errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB

# Site names end up in URLs, /status entry names and token audiences.
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class SiteEntry(BaseModel):
    """One site agent the broker dispatches to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    address: str  # host:port of the agent's gRPC endpoint

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError("site names use letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("address")
    @classmethod
    def _address_has_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {value!r} must be host:port")
        return value


class SitesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[SiteEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> SitesFile:
        names = [site.name for site in self.sites]
        if len(names) != len(set(names)):
            raise ValueError("site names must be unique")
        return self


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDIF_BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Base of result URLs given to clients; None: the base URL the client's POST arrived on.
    public_url: str | None = None
    sites_file: Path | None = None
    data_dir: Path = Field(default_factory=lambda: edif_home() / "broker")

    inline_max_bytes: int = 8 * MiB
    max_payload_bytes: int = 256 * MiB
    max_result_bytes: int = 4 * GiB
    result_ttl_s: float = 3600.0
    job_retention_s: float = 24 * 3600.0
    heartbeat_s: float = 15.0
    # How many sites a job may be tried on when a site fails before running it to the end.
    dispatch_attempts: int = 3
    job_time_limit_s: float = 0.0  # 0: each site's own default

    describe_refresh_s: float = 30.0
    describe_timeout_s: float = 5.0  # one Describe call
    startup_wait_s: float = 30.0  # how long start-up retries until every site answered
    grpc_max_message_bytes: int = 512 * MiB

    issuer: str = "edif"
    audience: str = "edif-broker"
    keys_dir: Path | None = None  # None: the shared key store under $EDIF_HOME
    site_token_ttl_s: float = 300.0

    # Audit log (broker.audit): detailed job entries older than this become accounting rows.
    audit_detailed_retention_days: float = 90.0
    audit_key_rotation_days: float = 90.0  # a new audit pseudonym key this often
    audit_enabled: bool = True

    # Joining sites (`broker.joins`): the credential a joined agent heartbeats with, and the
    # catalog rules it registers under (embedded catalog, or Consul with EDIF_CONSUL_ADDR).
    site_credential_audience: str = "edif-broker-sites"
    site_credential_ttl_s: int = Field(default=24 * 3600, ge=60)
    site_heartbeat_ttl_s: float = Field(default=15.0, gt=0)
    site_deregister_after_s: float = Field(default=120.0, gt=0)

    # Fair-use quotas (`broker.quotas`): the policy for anyone no role/group policy covers
    # (generous: a JSON object in EDIF_BROKER_QUOTA_DEFAULTS), and where policies and the usage
    # ledger live (None: <data_dir>/quotas.sqlite3).
    quota_defaults: QuotaPolicy = Field(default_factory=QuotaPolicy)
    quota_db: Path | None = None

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        # Clients concatenate paths onto it; a trailing slash would give `//results`.
        return value.rstrip("/") if value else None

    @model_validator(mode="after")
    def _payload_fits_grpc(self) -> BrokerSettings:
        if self.max_payload_bytes >= self.grpc_max_message_bytes:
            raise ValueError("max_payload_bytes must stay below grpc_max_message_bytes")
        if self.dispatch_attempts < 1:
            raise ValueError("dispatch_attempts must be at least 1")
        return self

    def load_sites(self) -> list[SiteEntry]:
        """The agents listed in `sites_file` (none when unset)."""
        return load_sites_file(self.sites_file) if self.sites_file else []


def load_sites_file(path: Path) -> list[SiteEntry]:
    """Parse a sites YAML file; any problem is a `ConfigError` naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return SitesFile.model_validate(raw).sites
    except OSError as error:
        raise ConfigError(f"cannot read sites file {path}: {error.strerror}") from error
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"invalid sites file {path}: {error}") from error
