"""`edif agent install-service`, `edif agent leave` without an agent, and automatic placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edif.cli import main
from site_agent.autoplace import plan_models
from site_agent.config import SiteConfig
from site_agent.hardware import DetectedHardware

GB = 10**9
SITE_YAML = {
    "site": "ansbach",
    "institution": "Hochschule Ansbach",
    "models": [{"repo_id": "openai-community/gpt2", "task": "text-generation"}],
}


@pytest.fixture
def site_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDIF_HOME", str(tmp_path / "home"))
    path = tmp_path / "ansbach.yaml"
    path.write_text(yaml.safe_dump(SITE_YAML))
    return path


def test_install_service_writes_a_unit_without_secrets(tmp_path, site_file) -> None:
    out = tmp_path / "units"
    out.mkdir()
    result = CliRunner().invoke(
        main, ["agent", "install-service", "--site", str(site_file), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    unit = out / "edif-agent-ansbach.service"
    assert result.stdout.strip() == str(unit)
    text = unit.read_text()
    for line in ("Restart=on-failure", "User=edif", "EnvironmentFile=/etc/edif/agent.env"):
        assert line in text
    assert "agent join --site" in text and str(site_file.resolve()) in text
    assert "--broker ${EDIF_BROKER_URL}" in text
    assert "--token" not in text and "eyJ" not in text  # the join token stays in the env file


def test_leave_without_a_running_agent_says_so(site_file) -> None:
    result = CliRunner().invoke(main, ["agent", "leave", "--site", str(site_file)])
    assert result.exit_code == 1
    assert "no running agent for site ansbach" in result.output


def _hardware(vendor: str, count: int, memory: int) -> DetectedHardware:
    return DetectedHardware(vendor, "cpu" if vendor == "cpu" else "GPU", count, memory)


def test_cpu_machine_places_on_cpu() -> None:
    cfg, planned = plan_models(SiteConfig.model_validate(SITE_YAML), _hardware("cpu", 2, 64 * GB))
    assert cfg.models[0].device_map == "cpu" and cfg.models[0].max_memory is None
    assert planned[0].estimate.parameter_count == 124_439_808  # GPT-2 small
    assert planned[0].where == "cpu"


def test_gpu_placement_and_explicit_override() -> None:
    models = [
        {**SITE_YAML["models"][0]},
        {**SITE_YAML["models"][0], "task": "fill-mask", "device_map": "cuda:1"},
    ]
    cfg = SiteConfig.model_validate({**SITE_YAML, "models": models})
    placed, planned = plan_models(cfg, _hardware("nvidia", 2, 48 * GB))
    assert placed.models[0].device_map == "cuda:0"
    assert placed.models[1].device_map == "cuda:1"  # the YAML's choice wins
    assert planned[1].overridden and planned[1].where == "cuda:1 (config)"
