"""The site catalog and the /status and /env documents built from it."""

from __future__ import annotations

from broker_fakes import GPT2_KEY, LLAMA_KEY, SITES, FakeSiteClient, describe

from broker.catalog import SiteCatalog
from broker.modelkey import parse_model_key
from broker.service_info import env_document, status_document
from proto import site_agent_pb2 as pb


async def test_wait_ready_retries_until_sites_answer() -> None:
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})
    sites.down.add("site-b")
    catalog = SiteCatalog(SITES, sites, refresh_s=60, startup_wait_s=0.0)
    await catalog.wait_ready()  # gives up at once, starts with what it has
    assert [v.reachable for v in catalog.views()] == [True, False]
    sites.down.clear()
    await catalog.refresh()
    assert all(v.reachable for v in catalog.views())


async def test_unreachable_site_keeps_its_models_as_unhealthy() -> None:
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})
    catalog = SiteCatalog(SITES, sites)
    await catalog.refresh()
    sites.down.add("site-a")
    await catalog.refresh()
    view = catalog.views()[0]
    assert not view.reachable and view.deployments
    reachable = {v.name: v.reachable for v in catalog.views()}
    entry = status_document(catalog.descriptions(), reachable)["deployments"]
    assert entry["site-a/openai-community/gpt2"]["application_state"] == "UNHEALTHY"


async def test_served_versions_follow_the_model() -> None:
    sites = FakeSiteClient(
        {
            "site-a": describe("site-a", GPT2_KEY, nnsight="0.9.0"),
            "site-b": describe("site-b", LLAMA_KEY),
        }
    )
    catalog = SiteCatalog(SITES, sites)
    await catalog.refresh()
    assert catalog.served_versions(parse_model_key(GPT2_KEY)) == {"0.9.0"}
    assert catalog.served_versions() == {"0.9.0", "0.8.1"}


def test_bad_site_keys_are_skipped() -> None:
    from broker.catalog import site_view

    description = describe("site-a", GPT2_KEY)
    description.models.append(pb.ModelDeployment(model_key="garbage", repo_id="x"))
    assert len(site_view("site-a", description).deployments) == 1


def test_status_document_names_and_states() -> None:
    a = describe("site-a", GPT2_KEY, GPT2_KEY.replace("text-generation", "fill-mask"))
    a.models[1].state = "EXPLODED"
    doc = status_document(
        {"site-a": a, "site-b": describe("site-b", GPT2_KEY)}, {"site-a": True, "site-b": True}
    )
    names = sorted(doc["deployments"])
    assert names == [
        "site-a/openai-community/gpt2",
        "site-a/openai-community/gpt2#2",
        "site-b/openai-community/gpt2",
    ]
    assert doc["deployments"]["site-a/openai-community/gpt2#2"]["application_state"] == "UNHEALTHY"


def test_env_document() -> None:
    doc = env_document({"site-a": describe("site-a"), "site-b": describe("site-b", nnsight="0.9")})
    assert doc["packages"]["nnsight"] == "0.8.1"  # first site by name
    assert set(doc["packages"]) == {"nnsight", "torch", "transformers"}
    assert env_document({})["packages"] == {}
