"""`edif agent install-service`: a systemd unit that keeps a joined site agent running.

Role: the supervised form of `edif agent join` for a site's own machine. The unit runs the agent
as a dedicated unprivileged user (`edif`), restarts it when it fails (a clean leave, exit 0,
stays down), gives it time to drain on stop, and takes every setting from an
`EnvironmentFile` (`EDIF_BROKER_URL`, the join token `EDIF_JOIN_TOKEN`, `EDIF_HOME`, ...)
so no secret is written into the unit itself, which is world-readable. The site credential
from the first join is kept in systemd's state directory (`/var/lib/edif-agent-<site>`, mode
0700), so restarts rejoin with it after the short-lived join token has expired.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

UNIT = """\
[Unit]
Description=eDIF site agent ({site})
Documentation=https://github.com/edif-mesh
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=edif
Group=edif
# EDIF_BROKER_URL, EDIF_JOIN_TOKEN (from `edif token issue --role site --site {site}`),
# EDIF_HOME and other EDIF_* settings; keep this file mode 0600, owned by root. The join
# token is needed for the first start only: the site credential it buys is stored (0600) in
# the state directory below and renewed, and restarts rejoin with it.
EnvironmentFile={env_file}
StateDirectory=edif-agent-{site}
StateDirectoryMode=0700
Environment=EDIF_AGENT_STATE_DIR=/var/lib/edif-agent-{site}
ExecStart={exec_start}
Restart=on-failure
RestartSec=5
# `edif agent leave` semantics: SIGTERM deregisters, then drains running jobs.
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
NoNewPrivileges=true
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""


def unit_name(site: str) -> str:
    return f"edif-agent-{site}.service"


def render_unit(site: str, site_file: Path, env_file: Path, drain_timeout_s: float = 60.0) -> str:
    """The unit text; the broker URL and join token come from the environment file."""
    argv = [
        sys.executable,
        "-m",
        "edif",
        "agent",
        "join",
        "--site",
        str(site_file.resolve()),
        "--broker",
        "${EDIF_BROKER_URL}",
    ]
    # systemd expands ${VAR} itself; shlex.join would quote it away.
    exec_start = " ".join(a if a.startswith("${") else shlex.quote(a) for a in argv)
    return UNIT.format(
        site=site,
        env_file=env_file,
        exec_start=exec_start,
        stop_timeout=int(drain_timeout_s + 30),
    )


def write_unit(site: str, site_file: Path, output: Path, env_file: Path) -> Path:
    """Write the unit to `output` (a file, or a folder to put `edif-agent-<site>.service` in)."""
    target = output / unit_name(site) if output.is_dir() else output
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_unit(site, site_file, env_file))
    return target
