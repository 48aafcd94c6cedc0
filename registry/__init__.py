"""The site catalog: where site agents announce themselves and the broker finds them.

One interface, `Catalog` (`registry.catalog`), two implementations:

- `EmbeddedCatalog` (`registry.embedded`): in the broker's process, TTL expiry on the injected
  clock, for one machine (`edif up --demo`, tests). Not shared between processes.
- `ConsulCatalog` (`registry.consul`): a Consul service `edif-site` per site, with a TTL
  heartbeat check and a gRPC health check; the broker watches it with blocking queries.
  Talks to Consul through py-consul on an httpx transport (`registry.consul_http`).

What a site publishes is a `SiteRecord` (`registry.model`); in Consul it travels as service
Meta (`registry.meta`: keys, chunking and limits). `FakeConsul` (`registry.consul_fake`) is an
in-repo fake of the Consul HTTP endpoints the adapter uses, for tests and demos (import it
from there; it is not re-exported, so importing `registry` loads no web server).

Against a real Consul (e.g. `consul agent -dev` on this host, so it can probe 127.0.0.1):

    EDIF_CONSUL_ADDR=http://127.0.0.1:8500 [EDIF_CONSUL_TOKEN=...] \\
        .venv/bin/pytest tests/registry          # add -m "not slow" to skip the ~95 s test

The same contract tests then also run against it; without the variable they are skipped.
"""

from registry.catalog import Catalog
from registry.consul import ConsulCatalog, ConsulSettings
from registry.embedded import EmbeddedCatalog
from registry.model import Hardware, Health, ModelEntry, SiteRecord, Versions, worst_health

__all__ = [
    "Catalog",
    "ConsulCatalog",
    "ConsulSettings",
    "EmbeddedCatalog",
    "Hardware",
    "Health",
    "ModelEntry",
    "SiteRecord",
    "Versions",
    "worst_health",
]
