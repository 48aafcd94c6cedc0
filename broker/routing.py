"""Which site runs a job: a pure function over the catalog's current view of the sites.

`choose_site` keeps the sites that are reachable, serve the client's nnsight version, admit
the user's groups (site sovereignty: a site that names its groups serves nobody else) and host
a deployment whose parsed key matches the request; it prefers deployments that are RUNNING over
ones still DEPLOYING or NOT_STARTED (UNHEALTHY ones never get work), then the shortest expected
wait (queue depth × recent execution time; the queue depth alone while no job has been timed),
and breaks ties by site name so the choice is stable. `exclude` lets a caller re-dispatch a job
away from the sites that already failed it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from broker.modelkey import ModelKey
from edif.errors import PermissionDenied, Unavailable, UnknownModel

# Lower is better; states not listed (UNHEALTHY, unknown strings) are never chosen.
_STATE_RANK = {"RUNNING": 0, "DEPLOYING": 1, "NOT_STARTED": 2}


@dataclass(frozen=True)
class DeploymentView:
    key: ModelKey
    model_key: str  # the site's own spelling: what the broker sends in ExecuteRequest
    state: str
    queue_depth: int = 0
    recent_execution_s: float = 0.0

    @property
    def expected_wait_s(self) -> float:
        return self.queue_depth * self.recent_execution_s


@dataclass(frozen=True)
class SiteView:
    name: str
    reachable: bool
    deployments: tuple[DeploymentView, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    allowed_groups: frozenset[str] = frozenset()  # empty: everyone

    def admits(self, groups: Collection[str]) -> bool:
        return not self.allowed_groups or bool(self.allowed_groups.intersection(groups))

    def deployment_for(self, key: ModelKey) -> DeploymentView | None:
        return next((d for d in self.deployments if d.key.matches(key)), None)


@dataclass(frozen=True)
class Route:
    site: SiteView
    deployment: DeploymentView


def choose_site(
    key: ModelKey,
    sites: Sequence[SiteView],
    nnsight_version: str | None = None,
    exclude: Collection[str] = (),
    groups: Collection[str] | None = None,
) -> Route:
    """The best site for `key`; `UnknownModel` if none hosts it, `Unavailable` if none can now.

    `groups` are the user's groups; None skips the sovereignty check (operator tools only).
    """
    hosting = [(site, dep) for site in sites if (dep := site.deployment_for(key)) is not None]
    if not hosting:
        raise UnknownModel(unknown_model_message(key, sites))
    if groups is not None:
        hosting = [(site, dep) for site, dep in hosting if site.admits(groups)]
        if not hosting:
            raise PermissionDenied(
                f"Model {key.describe()} is hosted only by sites that do not serve your groups "
                f"({', '.join(sorted(groups)) or 'none'}); ask your institution's eDIF contact."
            )
    usable = [
        (site, dep)
        for site, dep in hosting
        if site.reachable
        and site.name not in exclude
        and dep.state in _STATE_RANK
        and _serves(site, nnsight_version)
    ]
    if not usable:
        where = ", ".join(sorted(site.name for site, _ in hosting))
        raise Unavailable(
            f"No site can run {key.describe()} right now: it is normally hosted at {where}, "
            "and none of them is reachable and healthy. Try again later."
        )
    site, dep = min(usable, key=lambda pair: _rank(*pair))
    return Route(site, dep)


def hosted_models(sites: Sequence[SiteView]) -> list[str]:
    """Every distinct model any site hosts, as short labels, sorted."""
    return sorted({dep.key.describe() for site in sites for dep in site.deployments})


def unknown_model_message(key: ModelKey, sites: Sequence[SiteView]) -> str:
    models = hosted_models(sites)
    listing = ", ".join(models) if models else "none yet"
    return f"Model {key.describe()} is not hosted here. Hosted models: {listing}."


def _serves(site: SiteView, nnsight_version: str | None) -> bool:
    # A site that does not report its version is not held against the client.
    served = site.versions.get("nnsight")
    return nnsight_version is None or not served or served == nnsight_version


def _rank(site: SiteView, dep: DeploymentView) -> tuple[int, float, int, str]:
    return (_STATE_RANK[dep.state], dep.expected_wait_s, dep.queue_depth, site.name)
