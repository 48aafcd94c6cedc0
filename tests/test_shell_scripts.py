"""Every shell script in the repository passes shellcheck (CI installs it: `make shellcheck`)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    p
    for p in REPO.glob("**/*.sh")
    if not any(part in {".venv", "node_modules", ".devrun"} for part in p.parts)
)


def test_there_are_scripts_to_check() -> None:
    assert REPO / "bench" / "gpu" / "conformance.sh" in SCRIPTS


@pytest.mark.skipif(not os.access("/usr/bin/shellcheck", os.X_OK), reason="no shellcheck")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_is_clean(script: Path) -> None:
    subprocess.run(["shellcheck", str(script)], check=True)
