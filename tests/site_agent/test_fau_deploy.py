"""deploy/sites/fau/: the Slurm batch script and the Apptainer definition.

The batch script runs here with stand-ins for `sbatch`, `squeue`, `scancel`, `hostname` and
`apptainer` on PATH that record how they were called: the successor allocation is chained with
`afterany` on this job, and the `edif agent join` command line it runs in the container parses
with the real CLI (every flag exists, the walltime is a Slurm time, the site file loads).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from edif.cli import agent_join
from site_agent.config import load_site_config
from site_agent.walltime import parse_walltime

REPO = Path(__file__).resolve().parents[2]
FAU = REPO / "deploy" / "sites" / "fau"
SCRIPT = FAU / "edif-agent.sbatch"

STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$RECORD_DIR/{name}.$$"
{body}
"""
STUBS = {
    "sbatch": "echo 4243",
    "squeue": "echo 0-23:58:10",
    "scancel": "",
    "hostname": "echo a0123.mi300x.example",
    "apptainer": 'exit "${FAKE_AGENT_STATUS:-0}"',
}


def run_script(tmp_path: Path, agent_status: int) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(STUB.format(name=name, body=body))
        stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RECORD_DIR": str(record),
        "EDIF_BROKER_URL": "https://broker.example",
        "EDIF_REPO": str(REPO),
        "EDIF_HOME": str(tmp_path / "edif"),
        "EDIF_JOIN_TOKEN": "join-token-for-the-first-allocation",
        "SLURM_JOB_ID": "4242",
        "FAKE_AGENT_STATUS": str(agent_status),
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    calls = {p.name.split(".")[0]: p.read_text().splitlines() for p in record.iterdir()}
    return done, calls


def test_script_is_valid_bash_with_an_mi300x_header() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --partition=mi300x" in header
    assert any(line.startswith("#SBATCH --gres=gpu:mi300x:") for line in header)
    assert any(line.startswith("#SBATCH --time=") for line in header)


def test_script_chains_the_next_allocation_and_joins_with_real_flags(tmp_path) -> None:
    done, calls = run_script(tmp_path, agent_status=0)
    assert done.returncode == 0, done.stderr
    assert calls["sbatch"] == ["--parsable", "--dependency=afterany:4242", str(SCRIPT)]
    assert "scancel" not in calls
    apptainer = calls["apptainer"]
    assert apptainer[:2] == ["exec", "--rocm"]
    assert str(tmp_path / "edif" / "edif-agent.sif") in apptainer
    edif_args = apptainer[apptainer.index("edif") + 1 :]
    assert edif_args[:2] == ["agent", "join"]
    # The real CLI parses the command line: every flag the script uses exists.
    ctx = agent_join.make_context("join", edif_args[2:])
    params = ctx.params
    assert params["broker_url"] == "https://broker.example"
    assert params["advertise"] == "a0123.mi300x.example:50051"
    assert parse_walltime(params["walltime"]) == 23 * 3600 + 58 * 60 + 10
    assert load_site_config(params["site_file"]).site == "fau"
    assert params["join_token"] is None  # the token travels in the environment only
    assert "EDIF_JOIN_TOKEN=join-token-for-the-first-allocation" in apptainer


def test_failed_agent_cancels_the_successor(tmp_path) -> None:
    done, calls = run_script(tmp_path, agent_status=1)
    assert done.returncode == 1
    assert calls["scancel"] == ["4243"]
    assert "cancelling the next allocation 4243" in done.stderr


def test_apptainer_definition_builds_from_this_repository() -> None:
    text = (FAU / "edif-agent.def").read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    base = re.search(r"^\s+BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("rocm/pytorch:")
    files = text.split("\n%files\n", 1)[1].split("\n%", 1)[0]
    sources = [line.split()[0] for line in files.strip().splitlines()]
    assert {"pyproject.toml", "constraints.txt", "site_agent", "edif"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
    post = text.split("\n%post\n", 1)[1].split("\n%", 1)[0]
    assert "grep -v '^torch=='" in post  # the base image's ROCm torch is kept
    assert "-c /opt/edif-mesh/constraints-rocm.txt /opt/edif-mesh" in post
    assert "torch.version.hip" in post
    # The site config points at this definition.
    site = load_site_config(REPO / "deploy" / "sites" / "fau.yaml")
    assert (REPO / site.container["apptainer"]) == FAU / "edif-agent.def"


@pytest.mark.skipif(not os.access("/usr/bin/shellcheck", os.X_OK), reason="no shellcheck")
def test_shellcheck_is_clean() -> None:
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def test_readme_documents_both_files() -> None:
    readme = (REPO / "README.md").read_text()
    for path in (SCRIPT, FAU / "edif-agent.def"):
        assert str(path.relative_to(REPO)) in readme
