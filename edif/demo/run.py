"""`edif demo` / `make demo`: start the demo mesh, run the researcher example, shut down.

Uses the same `DemoMesh` as `edif up --demo`; the example runs as its own Python process
with only `NDIF_HOST` and `NDIF_API_KEY` set, as a researcher's script would.
"""

from __future__ import annotations

import os
import subprocess
import sys

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.config import edif_home
from edif.up import REPO, DemoMesh, DemoOptions


def run_demo() -> int:
    home = edif_home()
    mesh = DemoMesh(DemoOptions(home=home))
    try:
        state = mesh.start()
        print(
            f"eDIF mesh (demo) up: broker {state.broker_url}, sites "
            f"{', '.join(sorted(state.agents))}; waiting for the models ...",
            flush=True,
        )
        mesh.wait_models()
        token = TokenIssuer(KeyStore(home / "keys")).issue("demo-researcher", Role.RESEARCHER, 3600)
        env = {
            **os.environ,
            "NDIF_HOST": state.broker_url,
            "NDIF_API_KEY": token,
            "EDIF_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
        }
        print(
            "running examples/quickstart.py (logit lens + activation patching, remote=True)",
            flush=True,
        )
        example = REPO / "examples" / "quickstart.py"
        return subprocess.run([sys.executable, str(example)], env=env).returncode
    finally:
        mesh.stop()
        print("eDIF mesh (demo) stopped", flush=True)
