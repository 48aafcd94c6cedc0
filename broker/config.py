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
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from auth.external import ExternalIssuer
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
    # Where results live (`broker.results`): local disk under data_dir, or an S3-compatible
    # bucket (credentials: these settings, else boto3's usual chain; never logged).
    result_store: Literal["disk", "s3"] = "disk"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None  # None: AWS; e.g. http://127.0.0.1:9000 for MinIO
    s3_region: str = "us-east-1"
    s3_prefix: str = "results/"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_part_bytes: int = Field(default=8 * MiB, ge=5 * MiB)  # multipart part size
    s3_orphan_grace_s: float = Field(default=3600.0, ge=0)  # other replicas' uploads in flight
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
    # Key rotation (`edif key rotate`, `auth.rotation`): how long the keys a rotation replaced
    # keep verifying the tokens they signed; then they are retired (and leave the JWKS).
    key_grace_s: float = Field(default=7 * 86400.0, ge=0)
    # Institutions' OIDC providers trusted besides our own issuer (`auth.external`): a JSON
    # list in EDIF_BROKER_EXTERNAL_ISSUERS of {name, issuer, jwks_url, audience, algorithms,
    # claims: {sub, role, groups, role_values}, default_role, allowed_roles, groups}.
    external_issuers: list[ExternalIssuer] = Field(default_factory=list)

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
    # TLS to sites that serve it (`broker.site_tls`): verify them against this CA bundle
    # instead of the certificate each pinned at join; a client certificate for mTLS sites.
    site_ca_file: Path | None = None
    site_client_cert_file: Path | None = None
    site_client_key_file: Path | None = None

    # Fair-use quotas (`broker.quotas`): the policy for anyone no role/group policy covers
    # (generous: a JSON object in EDIF_BROKER_QUOTA_DEFAULTS), and where policies and the usage
    # ledger live (None: <data_dir>/quotas.sqlite3).
    quota_defaults: QuotaPolicy = Field(default_factory=QuotaPolicy)
    quota_db: Path | None = None

    # Fair-share queueing (`broker.fairshare`): jobs wait at the broker per model and get a
    # site's worker in order of their owner's recent GPU-seconds, decayed with this half-life
    # (Slurm fair share). Off: every job goes straight to a site and waits in its FIFO.
    fair_share_enabled: bool = True
    fair_share_half_life_s: float = Field(default=24 * 3600.0, gt=0)
    fair_share_order: Literal["usage", "arrival"] = "usage"  # arrival: FIFO (comparisons)
    fair_share_jobs_per_worker: int = Field(default=1, ge=1)  # granted at once per model worker
    fair_share_position_interval_s: float = Field(default=1.0, ge=0)  # QUEUED position updates
    fair_share_unroutable_s: float = Field(default=60.0, ge=0)  # waiting with no usable site

    # Durable jobs (`broker.jobstore`): SQLite in WAL mode under data_dir by default; PostgreSQL
    # (a DSN, kept secret) when several broker replicas share the jobs. Each replica needs its
    # own instance id (default host:port); a replica whose lease lapses has its unfinished jobs
    # taken over by the others.
    job_store: Literal["sqlite", "postgres"] = "sqlite"
    job_db: Path | None = None  # None: <data_dir>/jobs.sqlite3
    job_store_dsn: SecretStr | None = None
    job_store_sync: Literal["normal", "full"] = "normal"
    instance_id: str | None = None
    job_lease_s: float = Field(default=10.0, gt=0)

    # Telemetry (`broker.telemetry`): Prometheus text at GET /metrics (aggregates, no user
    # labels), finished spans appended to a JSON-lines file when set, and JSON log lines
    # (ts, level, logger, msg, job_id, trace_id) instead of the default text format.
    metrics_enabled: bool = True
    traces_file: Path | None = None
    log_format: Literal["text", "json"] = "text"

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

    @model_validator(mode="after")
    def _s3_has_bucket(self) -> BrokerSettings:
        if self.result_store == "s3" and not self.s3_bucket:
            raise ValueError("result_store s3 needs s3_bucket (EDIF_BROKER_S3_BUCKET)")
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
