"""What each configured site hosts, kept fresh by calling Describe on every agent.

Flow: at start-up `wait_ready` calls Describe on all sites, retrying until each has answered
once or `startup_wait_s` passes (the broker then starts with whatever it knows and logs the
rest); afterwards `run` refreshes every `describe_refresh_s` (every 2 s while a site or model
is still starting). A site that stops answering stays in the view as unreachable with its last
known models, so its models are still "known" (an unreachable host gives 503, not 404) but get
no work. Routing reads `views()` snapshots.

Which sites exist comes from the static `sites` list (the sites file) plus, when given, a
`SiteSource` (`broker.site_source`: the live site catalog that joined agents register in).
`wait_ready` starts following the source (its first list counts as the start-up list) and
`run` keeps following it: a site that appears is described at once, one the catalog marks
critical is kept in the view as unreachable (no work, COLD in /status) without being called,
and one the catalog drops disappears from routing and /status. `on_addresses` hears every
change of the name → address map (the gRPC client's channels follow it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

from broker.config import SiteEntry
from broker.modelkey import ModelKey, parse_model_key
from broker.routing import DeploymentView, SiteView
from broker.site_source import SiteSource, SourcedSite
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
        source: SiteSource | None = None,
        on_addresses: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self._static = {s.name: SourcedSite(s.name, s.address) for s in sites}
        self._sites: dict[str, SourcedSite] = dict(self._static)
        self._client = client
        self._refresh_s = refresh_s
        self._startup_wait_s = startup_wait_s
        self._source = source
        self._on_addresses = on_addresses
        self._following: asyncio.Task | None = None
        self._first_list = asyncio.Event()
        self._views: dict[str, SiteView] = {name: SiteView(name, False) for name in self._sites}
        self._descriptions: dict[str, pb.SiteDescription] = {}

    def views(self) -> list[SiteView]:
        return [self._views[name] for name in self._sites]

    def descriptions(self) -> dict[str, pb.SiteDescription]:
        """The last Describe reply of every site that ever answered."""
        return dict(self._descriptions)

    def max_concurrent_jobs(self, name: str) -> int:
        """How many jobs site `name` says it takes at once (0: unknown, no limit)."""
        description = self._descriptions.get(name)
        return int(description.max_concurrent_jobs) if description is not None else 0

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
        await asyncio.gather(*(self._refresh_site(name) for name in list(self._sites)))

    async def wait_ready(self) -> None:
        """Refresh until every site has answered once, or `startup_wait_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_wait_s
        await self._start_following(self._startup_wait_s)
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
        await self._start_following(0.0)
        try:
            while True:
                await asyncio.sleep(self._refresh_s if self._settled() else SETTLING_REFRESH_S)
                await self.refresh()
        finally:
            if self._following is not None:
                self._following.cancel()

    def apply_sites(self, listed: Sequence[SourcedSite]) -> list[str]:
        """Take the source's current list (the static sites always stay); the names to describe
        now (new, moved, or healthy again) are returned."""
        merged = dict(self._static)  # the sites file wins over a catalog entry of that name
        for site in listed:
            merged.setdefault(site.name, site)
        fresh = [s.name for s in merged.values() if s.healthy and self._sites.get(s.name) != s]
        for name in set(self._sites) - set(merged):
            log.info("site %s left the catalog", name)
            self._views.pop(name, None)
            self._descriptions.pop(name, None)
        for site in merged.values():
            if not site.healthy and self._views.get(site.name, SiteView("", False)).reachable:
                log.warning("site %s is critical in the catalog; no new work", site.name)
            if site.name not in self._views or not site.healthy:
                self._take_out(site.name)
        addresses_changed = {n: s.address for n, s in self._sites.items()} != {
            n: s.address for n, s in merged.items()
        }
        self._sites = merged
        if addresses_changed and self._on_addresses is not None:
            self._on_addresses({n: s.address for n, s in merged.items()})
        return fresh

    async def _start_following(self, wait_s: float) -> None:
        if self._source is None:
            return
        if self._following is None:
            self._following = asyncio.create_task(self._follow(), name="site-source")
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_list.wait(), wait_s)

    async def _follow(self) -> None:
        assert self._source is not None
        try:
            async for listed in self._source.watch():
                fresh = self.apply_sites(listed)
                self._first_list.set()
                await asyncio.gather(*(self._refresh_site(name) for name in fresh))
        except asyncio.CancelledError:
            raise
        except Exception:  # the routing table must not silently freeze
            log.exception("site source failed; routing keeps the last list")
            raise

    def _take_out(self, name: str) -> None:
        view = self._views.get(name) or SiteView(name, False)
        self._views[name] = SiteView(
            name, False, view.deployments, view.versions, view.allowed_groups
        )

    def _settled(self) -> bool:
        return all(
            view.reachable and all(d.state == "RUNNING" for d in view.deployments)
            for view in self.views()
        )

    async def _refresh_site(self, name: str) -> None:
        site = self._sites.get(name)
        if site is None or not site.healthy:  # left, or critical: the catalog has the say
            return
        try:
            description = await self._client.describe(name)
        except EdifError as error:
            previous = self._views.get(name, SiteView(name, False))
            if previous.reachable:
                log.warning("site %s became unreachable: %s", name, error.message)
            self._views[name] = SiteView(
                name, False, previous.deployments, previous.versions, previous.allowed_groups
            )
            return
        site = self._sites.get(name)
        if site is None or not site.healthy:  # left or turned critical during the call
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
        not description.draining,  # a leaving site keeps its models known but gets no work
        tuple(deployments),
        dict(description.versions),
        frozenset(description.allowed_groups),
    )
