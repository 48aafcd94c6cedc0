"""Bodies of the unauthenticated service endpoints `GET /status` and `GET /env` (spec §7).

Pure functions over the catalog's last Describe replies. `/status` lists one entry per model
replica, named `<site>/<repo_id>`, in the `deployments` shape `nnsight.status()` folds by
model key; a site that stopped answering shows its models as UNHEALTHY at deployment level
COLD, which `nnsight.status()` leaves out and `is_model_running` reads as not running.
`/env` reports the pinned site environment (`nnsight.compare()` flags nnsight, torch and
transformers mismatches).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from proto import site_agent_pb2 as pb

log = logging.getLogger(__name__)

APPLICATION_STATES = ("RUNNING", "DEPLOYING", "NOT_STARTED", "UNHEALTHY")
ENV_PACKAGES = ("nnsight", "torch", "transformers")


def status_document(
    descriptions: Mapping[str, pb.SiteDescription], reachable: Mapping[str, bool]
) -> dict[str, Any]:
    deployments: dict[str, dict[str, Any]] = {}
    for site in sorted(descriptions):
        for model in descriptions[site].models:
            name = _unique(deployments, f"{site}/{model.repo_id}")
            deployments[name] = _entry(model, reachable.get(site, False))
    return {"deployments": deployments}


def env_document(descriptions: Mapping[str, pb.SiteDescription]) -> dict[str, Any]:
    """Versions from the first site (by name) that reports them; python is the broker's."""
    packages: dict[str, str] = {}
    for site in sorted(descriptions):
        versions = descriptions[site].versions
        for package in ENV_PACKAGES:
            version = versions.get(package)
            if not version:
                continue
            if packages.setdefault(package, version) != version:
                log.warning(
                    "site %s runs %s %s, others %s", site, package, version, packages[package]
                )
    return {"python_version": sys.version, "packages": packages}


def _entry(model: pb.ModelDeployment, reachable: bool) -> dict[str, Any]:
    state = model.state if model.state in APPLICATION_STATES else "UNHEALTHY"
    return {
        "model_key": model.model_key,
        "repo_id": model.repo_id,
        "revision": model.revision or "main",
        "task": model.task or None,
        "trust_remote_code": model.trust_remote_code,
        "deployment_level": "HOT" if reachable else "COLD",
        "application_state": state if reachable else "UNHEALTHY",
        "queue_depth": model.queue_depth,
    }


def _unique(existing: Mapping[str, Any], name: str) -> str:
    if name not in existing:
        return name
    n = 2
    while f"{name}#{n}" in existing:
        n += 1
    return f"{name}#{n}"
