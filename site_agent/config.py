"""Site configuration: one YAML file per institution, validated once at agent start.

The file says who the site is, which models it hosts (Hub repo id, revision, task, and where
the weights come from), how the agent listens, which broker it trusts and the execution
limits. `${VAR}` in `source` paths is expanded (the demo points at `${EDIF_HOME}/models/...`).
Anything invalid fails at start with one ConfigError naming the field, never at request time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edif.errors import ConfigError
from site_agent.sandbox_policy import PolicyConfig

MODEL_CLASS = "nnsight.modeling.transformers.TransformersModel"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxConfig(_Strict):
    """The site sandbox: OS layer, isolation checks, code policy (see site_agent/containment.py)."""

    # Without seccomp on this machine the agent refuses to serve unless this is false.
    require_seccomp: bool = True
    # Without Landlock (per-job scratch directories, writes elsewhere refused) the agent
    # refuses to serve unless this is false; job threads then stay read-only (scratch.py).
    require_landlock: bool = True
    # Where workers make their private scratch roots (default: the system temp directory);
    # a local tmpfs (e.g. /dev/shm) makes each job's fresh directory cheapest.
    scratch_dir: str | None = None
    # Fingerprint shared state after each job; a job that changed it is failed and the
    # worker replaced (site_agent/isolation.py).
    check_isolation: bool = True
    # The site's code policy: name, version, and changes to the default allowlists
    # (site_agent/sandbox_policy.py).
    policy: PolicyConfig = PolicyConfig()


class ModelConfig(_Strict):
    repo_id: str = Field(min_length=1, description="Hub-canonical repo id researchers name")
    revision: str | None = None
    task: str = "text-generation"
    # Where the weights come from: None = the Hub repo itself; else a local folder.
    source: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    # Explicit placement (e.g. "cpu", "cuda:1", "auto"); None: `edif agent join` places the
    # model from its memory estimate (`site_agent.placement`), `edif agent run` uses "auto".
    device_map: str | None = None
    # Per-device memory budgets for accelerate (bytes by GPU index or "cpu"); set by the
    # placement when a model spans devices.
    max_memory: dict[int | str, int] | None = None
    cpus: float = Field(default=1.0, ge=0, description="Ray CPUs reserved for the worker")
    torch_threads: int = Field(default=1, ge=1)
    # The site's `sandbox:` section, copied here so the worker (which gets only its model's
    # config) applies it; set from SiteConfig, not per model.
    sandbox: SandboxConfig = SandboxConfig()

    @field_validator("source")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return os.path.expandvars(value) if value else value

    @property
    def model_key(self) -> str:
        """The key a researcher's client sends for this model (nnsight's json.dumps layout)."""
        suffix = json.dumps({"repo_id": self.repo_id, "revision": self.revision, "task": self.task})
        return f"{MODEL_CLASS}:{suffix}"

    @property
    def load_from(self) -> str:
        return self.source or self.repo_id


class HardwareConfig(_Strict):
    """What the site declares; the agent reports what it detects beside it."""

    accelerator: Literal["cuda", "rocm", "cpu"] = "cpu"
    device_type: str = "CPU"
    count: int = Field(default=1, ge=0)
    memory_gb: float = Field(default=0, ge=0)


class BrokerTrust(_Strict):
    # JWKS of the broker whose signed credentials this agent accepts: a file path or an
    # http(s) URL (the broker serves /.well-known/jwks.json). Only public keys: the agent
    # and its workers hold no secret.
    jwks: str = ""
    issuer: str = "edif"

    @field_validator("jwks")
    @classmethod
    def _expand(cls, value: str) -> str:
        return os.path.expandvars(value)


class Limits(_Strict):
    execution_time_s: float = Field(default=300.0, gt=0)
    max_queue_per_model: int = Field(default=64, ge=1)
    # One Ray item and one gRPC message per chunk. Streaming 1 GiB from a Ray actor took
    # 0.27-0.53 s in 8 MiB items, 0.56-0.83 s in 4 MiB and 1.3-2.5 s in 16 MiB ones
    # (docs/benchmarks.md, section 2).
    result_chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)


class AccessPolicy(_Strict):
    """Site sovereignty: who may use this site, and how much of it at once."""

    # Groups (institution or project names in the researcher's token) this site serves;
    # empty means every authenticated researcher of the federation.
    allowed_groups: list[str] = Field(default_factory=list)
    max_concurrent_jobs: int = Field(default=0, ge=0, description="0: one per model worker")


class TlsConfig(_Strict):
    """TLS on the agent's gRPC server (see README, "TLS between broker and sites").

    The agent serves `cert` (PEM chain) with `key`. At join it sends the broker `ca` (the PEM
    that issued `cert`; default: `cert` itself, for a self-signed certificate), which the broker
    pins for this site unless it has its own CA bundle (`EDIF_BROKER_SITE_CA_FILE`).
    `client_ca`: require the broker to present a client certificate signed by it (mTLS).
    `server_name`: the name the broker checks in the certificate when the advertised address
    is not in it (e.g. an IP address).
    """

    cert: Path
    key: Path
    ca: Path | None = None
    client_ca: Path | None = None
    server_name: str | None = None

    @field_validator("cert", "key", "ca", "client_ca", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        return os.path.expandvars(str(value)) if value is not None else value


class WalltimeConfig(_Strict):
    """Time-limited allocations (`--walltime`, Slurm): see site_agent/walltime.py."""

    # Stop taking new work this long before the allocation ends ...
    drain_margin_s: float = Field(default=600.0, gt=0)
    # ... and hand back whatever still runs this long before it (time to deregister, stop).
    handback_margin_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> WalltimeConfig:
        if self.handback_margin_s >= self.drain_margin_s:
            raise ValueError("handback_margin_s must be smaller than drain_margin_s")
        return self


class SchedulerConfig(_Strict):
    kind: Literal["none", "slurm"] = "none"
    options: dict[str, str] = Field(default_factory=dict)


class SiteConfig(_Strict):
    site: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    institution: str = ""
    listen: str = "127.0.0.1:50051"
    broker: BrokerTrust = BrokerTrust()
    hardware: HardwareConfig = HardwareConfig()
    limits: Limits = Limits()
    access: AccessPolicy = AccessPolicy()
    scheduler: SchedulerConfig = SchedulerConfig()
    container: dict[str, str] = Field(default_factory=dict)
    sandbox: SandboxConfig = SandboxConfig()
    tls: TlsConfig | None = None  # None: plaintext gRPC (loopback, or a trusted network)
    walltime: WalltimeConfig = WalltimeConfig()
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _sandbox_to_models(cls, data: object) -> object:
        # Every worker applies the site's sandbox settings: hand each model a copy.
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            sandbox = data.get("sandbox") or {}
            models = [
                {**m, "sandbox": sandbox} if isinstance(m, dict) else m for m in data["models"]
            ]
            data = {**data, "models": models}
        return data

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        keys = [m.model_key for m in models]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"models listed twice: {dupes}")
        return models


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML; every problem becomes one ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read site config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"site config {path} must be a YAML mapping")
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid site config {path}: {problems}") from exc
