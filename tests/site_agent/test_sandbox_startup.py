"""The agent's start-up sandbox report: what it says, and when it refuses to serve."""

from __future__ import annotations

import pytest

from edif.errors import ConfigError
from site_agent import scratch
from site_agent.config import SiteConfig
from site_agent.containment import Support, probe
from site_agent.sandbox_startup import check_sandbox

MODEL = {"repo_id": "openai-community/gpt2"}


def report(sandbox: dict, seccomp: bool, landlock: bool) -> list[str]:
    cfg = SiteConfig(site="s", models=[MODEL], sandbox=sandbox)
    lines: list[str] = []
    check_sandbox(
        cfg,
        seccomp=lambda: Support(seccomp, "found" if seccomp else "no libseccomp"),
        landlock=lambda: (landlock, "ABI 7" if landlock else "the kernel has no Landlock"),
        say=lines.append,
    )
    return lines


def test_both_layers_on_and_the_policy_named() -> None:
    lines = report({"policy": {"name": "s-research", "version": 2}}, True, True)
    assert "seccomp job-thread containment on" in lines[0]
    assert "Landlock on (ABI 7)" in lines[1]
    assert lines[2].endswith("code policy s-research v2")


def test_without_landlock_the_agent_refuses_unless_the_site_opts_out() -> None:
    with pytest.raises(ConfigError, match="require_landlock: false"):
        report({}, True, False)
    lines = report({"require_landlock": False}, True, False)
    assert "WARNING Landlock unavailable (the kernel has no Landlock)" in lines[1]
    assert "no scratch directory" in lines[1] and "refuses every file write" in lines[1]


def test_without_seccomp_the_agent_refuses_unless_the_site_opts_out() -> None:
    with pytest.raises(ConfigError, match="require_seccomp: false"):
        report({}, False, True)
    lines = report({"require_seccomp": False, "require_landlock": False}, False, False)
    assert "WITHOUT OS-level containment" in lines[0]
    assert "file writes are NOT restricted" in lines[1]


@pytest.mark.skipif(
    not (probe().available and scratch.probe()[0]), reason="no seccomp or Landlock here"
)
def test_this_machine_reports_both_layers_on() -> None:
    lines: list[str] = []
    check_sandbox(SiteConfig(site="s", models=[MODEL]), say=lines.append)
    assert len(lines) == 3 and "WARNING" not in "".join(lines)
