"""Per-site code policies: the `sandbox.policy` YAML section, built into a SourcePolicy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edif.errors import ConfigError, SourceRefused
from site_agent.config import SiteConfig, load_site_config
from site_agent.executor import PoolExecutor
from site_agent.hardware import DetectedHardware
from site_agent.runtime_guard import restricted_builtins
from site_agent.sandbox_policy import PolicyConfig, build_source_policy
from site_agent.source_policy import SourcePolicy, check_source

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "sites"
MODEL = {"repo_id": "openai-community/gpt2"}


def policy(**section) -> SourcePolicy:
    return build_source_policy(PolicyConfig(**section))


def verdict(source: str, site: SourcePolicy) -> str:
    """'admitted', or the refusal message."""
    try:
        check_source(source, "/home/researcher/probe.py", site)
    except SourceRefused as exc:
        return exc.message
    return "admitted"


def test_no_section_is_the_default_policy() -> None:
    assert build_source_policy(PolicyConfig()) == SourcePolicy()
    assert SiteConfig(site="s", models=[MODEL]).sandbox.policy == PolicyConfig()


def test_a_site_widens_and_narrows_the_allowlists() -> None:
    site = policy(
        name="fau-research",
        version=3,
        allow_imports=["statistics"],
        deny_imports=["einops", "torch.linalg"],
        allow_dunders=["__add__"],
        deny_dunders=["__call__"],
    )
    base = SourcePolicy()
    assert site.label == "fau-research v3"
    assert site.import_roots == (base.import_roots | {"statistics"}) - {"einops"}
    assert "torch.linalg" in site.denied and site.denies("torch.linalg.svd")
    assert "__add__" in site.dunder_allowlist and "__call__" not in site.dunder_allowlist
    assert site.forbidden_calls == base.forbidden_calls  # the rest is the default's
    described = site.describe()
    assert described["name"] == "fau-research" and "statistics" in described["import_roots"]


@pytest.mark.parametrize(
    ("source", "default", "custom"),
    [
        ("import statistics\ny = statistics.mean([1, 2])", "refused", "admitted"),
        ("import einops", "admitted", "refused"),
        ("import torch\nq, r = torch.linalg.qr(torch.eye(2))", "admitted", "refused"),
        ("y = (1).__add__(2)", "refused", "admitted"),
    ],
)
def test_two_site_policies_give_different_verdicts_on_the_same_source(
    source: str, default: str, custom: str
) -> None:
    other = policy(
        name="hn-teaching",
        version=2,
        allow_imports=["statistics"],
        deny_imports=["einops", "torch.linalg"],
        allow_dunders=["__add__"],
    )
    got = {name: verdict(source, p) for name, p in (("default", SourcePolicy()), ("c", other))}
    assert (got["default"] == "admitted") == (default == "admitted")
    assert (got["c"] == "admitted") == (custom == "admitted")
    for name, label in (("default", "edif-default v1"), ("c", "hn-teaching v2")):
        if got[name] != "admitted":
            assert f"site policy {label}" in got[name]  # the refusal names whose policy


def test_the_runtime_guard_follows_the_site_policy() -> None:
    site = policy(name="hn-teaching", allow_imports=["statistics"], deny_imports=["einops"])
    imp = restricted_builtins(site)["__import__"]
    assert imp("statistics").mean([1, 3]) == 2
    with pytest.raises(Exception, match="hn-teaching v1"):
        imp("einops")


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"name": "x", "allow_imports": ["os"]}, "'os' cannot be allowed"),
        ({"name": "x", "allow_imports": ["subprocess"]}, "cannot be allowed"),
        ({"name": "x", "allow_imports": ["site_agent"]}, "cannot be allowed"),
        ({"name": "x", "allow_imports": ["scipy.special"]}, "top-level modules"),
        ({"name": "x", "allow_imports": ["_thread"]}, "top-level modules"),
        ({"name": "x", "allow_dunders": ["__globals__"]}, "'__globals__' cannot be allowed"),
        ({"name": "x", "allow_dunders": ["__builtins__"]}, "cannot be allowed"),
        ({"name": "x", "allow_dunders": ["__subclasses__"]}, "cannot be allowed"),
        ({"name": "x", "allow_dunders": ["add"]}, "not a dunder name"),
        ({"name": "x", "deny_imports": ["torch..nn"]}, "not a dotted module path"),
        ({"allow_imports": ["statistics"]}, "needs a name of its own"),
        ({"deny_dunders": ["__call__"]}, "needs a name of its own"),
        ({"name": "x", "allow_imports": ["scipy"], "deny_imports": ["scipy"]}, "at once"),
        ({"name": "Bad Name"}, "string should match"),
        ({"name": "x", "version": 0}, "greater than or equal to 1"),
        ({"name": "x", "allow_everything": True}, "extra inputs are not permitted"),
    ],
)
def test_a_bad_policy_fails_when_the_site_config_loads(
    tmp_path: Path, section: dict, fragment: str
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump({"site": "s", "models": [MODEL], "sandbox": {"policy": section}})
    )
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert "sandbox.policy" in caught.value.message
    assert fragment.lower() in caught.value.message.lower()


def test_every_model_worker_gets_the_site_policy() -> None:
    cfg = SiteConfig(
        site="s",
        models=[MODEL, {"repo_id": "openai-community/gpt2-medium"}],
        sandbox={"policy": {"name": "s-policy", "version": 4, "allow_imports": ["statistics"]}},
    )
    for model in cfg.models:
        # What the worker builds its PayloadPolicy from (it receives only its model's config).
        rebuilt = type(model).model_validate_json(model.model_dump_json())
        assert build_source_policy(rebuilt.sandbox.policy).label == "s-policy v4"


def test_describe_shows_the_site_policy() -> None:
    cfg = SiteConfig(
        site="s",
        models=[MODEL],
        sandbox={"policy": {"name": "s-policy", "version": 4, "deny_imports": ["einops"]}},
    )
    executor = PoolExecutor(cfg, factory=None, hardware=DetectedHardware("cpu", "CPU", 1, 1))
    shown = executor.describe().policy
    assert (shown.name, shown.version) == ("s-policy", 4)
    described = json.loads(shown.describe_json)
    assert "einops" not in described["import_roots"] and "torch" in described["import_roots"]


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_the_deployed_site_configs_name_valid_policies(path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDIF_HOME", "/nonexistent")
    cfg = load_site_config(path)
    built = build_source_policy(cfg.sandbox.policy)
    assert built.name != "edif-default" and built.version >= 1
