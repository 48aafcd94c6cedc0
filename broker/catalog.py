"""What each configured site hosts, kept fresh by calling Describe on every agent.

Flow: at start-up `wait_ready` calls Describe on all sites, retrying until each has answered
once or `startup_wait_s` passes (the broker then starts with whatever it knows and logs the
rest); afterwards `run` refreshes every `describe_refresh_s` (every 2 s while a site or model
is still starting). A site that stops answering stays in the view as unreachable with its last
known models, so its models are still "known" (an unreachable host gives 503, not 404) but get
no work. Routing reads `views()` snapshots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from broker.config import SiteEntry
from broker.modelkey import ModelKey, parse_model_key
from broker.routing import DeploymentView, SiteView
from broker.sites import SiteClient
from edif.errors import BadRequest, EdifError
from proto import site_agent_pb2 as pb

log = logging.getLogger(__name__)

# While a site is unreachable or a model still loading, look again this often.
SETTLING_REFRESH_S = 2.0


class SiteCatalog:
    def __init__(
        self,
        sites: Sequence[SiteEntry],
        client: SiteClient,
        refresh_s: float = 30.0,
        startup_wait_s: float = 30.0,
    ) -> None:
        self._sites = list(sites)
        self._client = client
        self._refresh_s = refresh_s
        self._startup_wait_s = startup_wait_s
        self._views: dict[str, SiteView] = {s.name: SiteView(s.name, False) for s in self._sites}
        self._descriptions: dict[str, pb.SiteDescription] = {}

    def views(self) -> list[SiteView]:
        return [self._views[s.name] for s in self._sites]

    def descriptions(self) -> dict[str, pb.SiteDescription]:
        """The last Describe reply of every site that ever answered."""
        return dict(self._descriptions)

    def served_versions(self, key: ModelKey | None = None) -> set[str]:
        """nnsight versions of the reachable sites (hosting `key`, when some do)."""
        reachable = [view for view in self.views() if view.reachable]
        hosting = [view for view in reachable if key and view.deployment_for(key)]
        return {v for view in hosting or reachable if (v := view.versions.get("nnsight"))}

    def mark_unreachable(self, name: str) -> None:
        """Take a site out of routing at once (a job just lost it); Describe brings it back."""
        view = self._views.get(name)
        if view is not None and view.reachable:
            log.warning("site %s failed a job; no new work until it answers Describe", name)
            self._views[name] = SiteView(
                name, False, view.deployments, view.versions, view.allowed_groups
            )

    def ever_described(self) -> bool:
        return bool(self._descriptions)

    async def refresh(self) -> None:
        """Describe every site once, concurrently."""
        await asyncio.gather(*(self._refresh_site(s.name) for s in self._sites))

    async def wait_ready(self) -> None:
        """Refresh until every site has answered once, or `startup_wait_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_wait_s
        while True:
            await self.refresh()
            missing = [v.name for v in self.views() if not v.reachable]
            if not missing:
                return
            if loop.time() >= deadline:
                log.warning("starting without sites that did not answer: %s", ", ".join(missing))
                return
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def run(self) -> None:
        """Refresh forever (until cancelled); faster while some site or model is not up yet."""
        while True:
            await asyncio.sleep(self._refresh_s if self._settled() else SETTLING_REFRESH_S)
            await self.refresh()

    def _settled(self) -> bool:
        return all(
            view.reachable and all(d.state == "RUNNING" for d in view.deployments)
            for view in self.views()
        )

    async def _refresh_site(self, name: str) -> None:
        try:
            description = await self._client.describe(name)
        except EdifError as error:
            previous = self._views[name]
            if previous.reachable:
                log.warning("site %s became unreachable: %s", name, error.message)
            self._views[name] = SiteView(
                name, False, previous.deployments, previous.versions, previous.allowed_groups
            )
            return
        if not self._views[name].reachable:
            log.info("site %s is reachable (%d models)", name, len(description.models))
        self._descriptions[name] = description
        self._views[name] = site_view(name, description)


def site_view(name: str, description: pb.SiteDescription) -> SiteView:
    """The routing view of one Describe reply; models whose key does not parse are skipped."""
    deployments = []
    for model in description.models:
        try:
            key = parse_model_key(model.model_key)
        except BadRequest as error:
            log.error("site %s reports an unusable model key: %s", name, error.message)
            continue
        deployments.append(
            DeploymentView(
                key,
                model.model_key,
                model.state,
                int(model.queue_depth),
                float(model.recent_execution_s),
            )
        )
    return SiteView(
        name,
        True,
        tuple(deployments),
        dict(description.versions),
        frozenset(description.allowed_groups),
    )
