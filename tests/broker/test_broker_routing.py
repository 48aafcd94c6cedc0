"""Routing is a pure function of the request key and the catalog's view of the sites."""

from __future__ import annotations

import pytest
from broker_fakes import GPT2_KEY, LLAMA_KEY

from broker.modelkey import parse_model_key
from broker.routing import DeploymentView, SiteView, choose_site
from edif.errors import PermissionDenied, Unavailable, UnknownModel

GPT2 = parse_model_key(GPT2_KEY)


def site(name: str, state: str = "RUNNING", queue: int = 0, reachable: bool = True, **kw):
    deployment = DeploymentView(GPT2, GPT2_KEY, state, queue)
    versions = kw.get("versions", {"nnsight": "0.8.1"})
    return SiteView(name, reachable, (deployment,), versions)


def other(name: str) -> SiteView:
    return SiteView(name, True, (DeploymentView(parse_model_key(LLAMA_KEY), LLAMA_KEY, "RUNNING"),))


def test_routes_to_the_site_hosting_the_model() -> None:
    route = choose_site(GPT2, [other("a"), site("b")])
    assert route.site.name == "b"
    assert route.deployment.model_key == GPT2_KEY


def test_spelling_of_the_request_key_does_not_matter() -> None:
    compact = parse_model_key(GPT2_KEY.replace(", ", ",").replace(": ", ":"))
    assert choose_site(compact, [site("a")]).site.name == "a"


def test_prefers_running_then_shorter_queue_then_name() -> None:
    assert choose_site(GPT2, [site("a", "DEPLOYING"), site("b", queue=9)]).site.name == "b"
    assert choose_site(GPT2, [site("a", queue=3), site("b", queue=1)]).site.name == "b"
    assert choose_site(GPT2, [site("c"), site("b"), site("d")]).site.name == "b"
    assert choose_site(GPT2, [site("b"), site("a")]).site.name == "a"


def test_unhealthy_unreachable_and_excluded_sites_get_no_work() -> None:
    sites = [site("a", "UNHEALTHY"), site("b", reachable=False), site("c"), site("d", queue=5)]
    assert choose_site(GPT2, sites).site.name == "c"
    assert choose_site(GPT2, sites, exclude={"c"}).site.name == "d"
    with pytest.raises(Unavailable) as caught:
        choose_site(GPT2, sites, exclude={"c", "d"})
    assert caught.value.http_status == 503


def test_only_sites_serving_the_client_version() -> None:
    sites = [site("a", versions={"nnsight": "0.9.0"}), site("b", queue=4)]
    assert choose_site(GPT2, sites, nnsight_version="0.8.1").site.name == "b"
    assert choose_site(GPT2, sites, nnsight_version="0.9.0").site.name == "a"
    unreported = [site("a", versions={})]
    assert choose_site(GPT2, unreported, nnsight_version="0.8.1").site.name == "a"


def test_unknown_model_lists_what_is_hosted() -> None:
    with pytest.raises(UnknownModel) as caught:
        choose_site(parse_model_key(LLAMA_KEY), [site("a"), site("b")])
    assert caught.value.http_status == 404
    assert "meta-llama/Llama-3.1-8B" in caught.value.message
    assert "Hosted models: openai-community/gpt2 (TransformersModel, text-generation)" in (
        caught.value.message
    )


def test_unknown_model_with_nothing_hosted() -> None:
    with pytest.raises(UnknownModel, match="none yet"):
        choose_site(GPT2, [SiteView("a", True)])


def timed(name: str, queue: int, recent_s: float, groups: frozenset[str] = frozenset()) -> SiteView:
    deployment = DeploymentView(GPT2, GPT2_KEY, "RUNNING", queue, recent_s)
    return SiteView(name, True, (deployment,), {}, groups)


def test_expected_wait_beats_a_shorter_queue_of_slow_jobs() -> None:
    # a: 2 jobs of 0.1 s ahead (0.2 s); b: 1 job of 5 s ahead (5 s): a is the shorter wait.
    assert choose_site(GPT2, [timed("b", 1, 5.0), timed("a", 2, 0.1)]).site.name == "a"
    # Untimed sites fall back to the queue depth, then the name.
    assert choose_site(GPT2, [timed("b", 1, 0.0), timed("a", 2, 0.0)]).site.name == "b"
    assert choose_site(GPT2, [timed("b", 0, 3.0), timed("a", 0, 1.0)]).site.name == "a"


def test_sovereignty_routes_only_to_sites_that_admit_the_users_groups() -> None:
    fau_only = timed("a-fau", 0, 0.0, frozenset({"fau"}))
    open_site = timed("z-open", 5, 1.0)
    assert choose_site(GPT2, [fau_only, open_site], groups=["fau"]).site.name == "a-fau"
    assert choose_site(GPT2, [fau_only, open_site], groups=["tum"]).site.name == "z-open"
    assert choose_site(GPT2, [fau_only, open_site], groups=[]).site.name == "z-open"
    with pytest.raises(PermissionDenied, match="do not serve your groups"):
        choose_site(GPT2, [fau_only], groups=["tum"])
