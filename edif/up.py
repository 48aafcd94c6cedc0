"""`edif up --demo`: the whole mesh on one machine — broker, three demo sites, one local Ray.

Flow: build the demo models and the broker's signing key under `$EDIF_HOME` → start a local
Ray cluster in this process (the agents join it with `--ray-address`, so the machine runs one
Ray, not three) → start the broker (embedded site catalog, heartbeat TTL `site_ttl_s`) and wait
for its `/ping` → for each demo site issue a short-lived join token with the mesh's KeyStore and
start `edif agent join` on a free loopback port (the token travels in `EDIF_JOIN_TOKEN`, not on
the command line) → run until SIGINT/SIGTERM, then stop the children and Ray. The agents'
addresses are also written to `run/sites.yaml`, a static sites file for extra brokers (the
e2e tests' URL-only broker). While running it supervises the agents like a service manager
with `Restart=on-failure`: an agent that dies (a crash, or `kill -9` in a failover test) goes
critical in the catalog once its heartbeats stop, and is restarted after a short backoff with a
fresh join token and joins again; one that left cleanly (`edif agent leave`, exit 0) stays
gone. The broker dying ends the mesh. Tests start this same command as a subprocess, so
what they exercise is exactly what `make demo` runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer

REPO = Path(__file__).resolve().parent.parent
DEMO_SITES_DIR = REPO / "deploy" / "sites" / "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MeshState:
    """What a running demo mesh wrote for tools and tests (`--state-file`)."""

    broker_url: str
    broker_pid: int
    agents: dict[str, dict] = field(default_factory=dict)  # site -> {"pid", "port", "config"}
    ray_address: str = ""
    logs_dir: str = ""


@dataclass
class DemoOptions:
    home: Path
    port: int = 0
    time_limit_s: float | None = None
    heartbeat_s: float | None = None
    inline_max_bytes: int | None = None
    state_file: Path | None = None
    sites_dir: Path = DEMO_SITES_DIR
    restart_backoff_s: float = 2.0
    site_ttl_s: float = 3.0  # catalog heartbeat TTL: a killed agent is critical within ~3 s
    site_deregister_after_s: float = 60.0
    join_token_ttl_s: int = 15 * 60


class DemoMesh:
    def __init__(self, options: DemoOptions) -> None:
        self.opt = options
        self.run_dir = options.home / "run"
        self.logs_dir = self.run_dir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.join_site: dict[str, str] = {}  # process name -> site, for a fresh join token
        self.keys: KeyStore | None = None
        self.died_at: dict[str, float] = {}
        self.state: MeshState | None = None
        # The broker's own settings as given, taken before the Ray start scrubs this process's
        # environment of secret-looking names (which also matches EDIF_BROKER_SITE_TOKEN_TTL_S
        # and the like): the broker runs no Ray workers, and it needs its settings.
        self.broker_env = {k: v for k, v in os.environ.items() if k.startswith("EDIF_BROKER_")}

    def start(self) -> MeshState:
        from edif.demo.models import ensure_all
        from site_agent import ray_pool

        self.logs_dir.mkdir(parents=True, exist_ok=True)
        ensure_all(self.opt.home)
        self.keys = KeyStore(self.opt.home / "keys")
        self.keys.signing_key()
        ray_pool.connect(None, num_cpus=os.cpu_count())
        import ray

        ray_address = ray.get_runtime_context().gcs_address
        broker_port = self.opt.port or free_port()
        broker_url = f"http://127.0.0.1:{broker_port}"
        self._start_broker(broker_port)
        self._wait_ping(broker_url)
        agents = self._start_agents(ray_address, broker_url)
        self._write_sites_file(agents)
        self.state = MeshState(
            broker_url=broker_url,
            broker_pid=self.procs["broker"].pid,
            agents=agents,
            ray_address=ray_address,
            logs_dir=str(self.logs_dir),
        )
        self._write_state()
        return self.state

    def _write_state(self) -> None:
        if self.opt.state_file and self.state:
            tmp = self.opt.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.state), indent=2))
            tmp.replace(self.opt.state_file)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["EDIF_HOME"] = str(self.opt.home)
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        if name in self.join_site:  # each (re)start joins with a fresh short-lived token
            env = {**env, "EDIF_JOIN_TOKEN": self._join_token(self.join_site[name])}
        log = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        self.argv[name] = (argv, env)
        return proc

    def _join_token(self, site: str) -> str:
        assert self.keys is not None
        issuer = TokenIssuer(self.keys)
        return issuer.issue(f"site:{site}", Role.SITE, self.opt.join_token_ttl_s, site=site)

    def _start_agents(self, ray_address: str, broker_url: str) -> dict[str, dict]:
        from site_agent.config import load_site_config

        agents: dict[str, dict] = {}
        for config in sorted(self.opt.sites_dir.glob("*.yaml")):
            site = load_site_config(config).site
            port = free_port()
            env = self._env()
            env.pop("EDIF_JOIN_TOKEN", None)
            if self.opt.time_limit_s:
                env["EDIF_AGENT_EXECUTION_TIME_S"] = str(self.opt.time_limit_s)
            argv = [
                *(sys.executable, "-m", "edif", "agent", "join"),
                *("--broker", broker_url, "--site", str(config)),
                *("--listen", f"127.0.0.1:{port}", "--ray-address", ray_address),
                *("--drain-timeout", "10"),
            ]
            self.join_site[f"agent-{site}"] = site
            proc = self._spawn(f"agent-{site}", argv, env)
            agents[site] = {"pid": proc.pid, "port": port, "config": str(config)}
        return agents

    def _write_sites_file(self, agents: dict[str, dict]) -> None:
        """The agents as a static sites file, for brokers that do not follow the catalog."""
        sites = [{"name": s, "address": f"127.0.0.1:{a['port']}"} for s, a in agents.items()]
        # JSON is valid YAML; written whole, then renamed, so a reader never sees half of it.
        tmp = self.run_dir / "sites.yaml.tmp"
        tmp.write_text(json.dumps({"sites": sites}, indent=2))
        tmp.replace(self.run_dir / "sites.yaml")

    def _start_broker(self, port: int) -> None:
        env = {**self._env(), **self.broker_env}
        env.pop("EDIF_CONSUL_ADDR", None)  # the demo's catalog is the broker's embedded one
        env.update(
            {
                "EDIF_BROKER_HOST": "127.0.0.1",
                "EDIF_BROKER_PORT": str(port),
                "EDIF_BROKER_DATA_DIR": str(self.run_dir / "broker"),
                "EDIF_BROKER_SITE_HEARTBEAT_TTL_S": str(self.opt.site_ttl_s),
                "EDIF_BROKER_SITE_DEREGISTER_AFTER_S": str(self.opt.site_deregister_after_s),
                "EDIF_BROKER_STARTUP_WAIT_S": "0",  # sites join after the broker is up
            }
        )
        env.pop("EDIF_BROKER_SITES_FILE", None)
        if self.opt.heartbeat_s:
            env["EDIF_BROKER_HEARTBEAT_S"] = str(self.opt.heartbeat_s)
        if self.opt.inline_max_bytes is not None:
            env["EDIF_BROKER_INLINE_MAX_BYTES"] = str(self.opt.inline_max_bytes)
        self._spawn("broker", [sys.executable, "-m", "edif", "broker", "run"], env)

    def _wait_ping(self, url: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_children()
            try:
                if httpx.get(f"{url}/ping", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"broker did not answer /ping within {timeout_s:g} s; see {self.logs_dir}/broker.log"
        )

    def _check_children(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and not name.startswith("agent-"):
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; see {self.logs_dir}/{name}.log"
                )

    def supervise(self) -> None:
        """Restart agents that failed, after a backoff; a dead broker is fatal.

        Like systemd's Restart=on-failure: an agent that exits 0 left on purpose
        (`edif agent leave`) and stays down."""
        self._check_children()
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if not name.startswith("agent-") or proc.poll() in (None, 0):
                continue
            died = self.died_at.setdefault(name, now)
            if now - died < self.opt.restart_backoff_s:
                continue
            del self.died_at[name]
            print(f"{name} exited with code {proc.returncode}; restarting it", flush=True)
            argv, env = self.argv[name]
            restarted = self._spawn(name, argv, env)
            if self.state:
                self.state.agents[name.removeprefix("agent-")]["pid"] = restarted.pid
                self._write_state()

    def wait_models(self, timeout_s: float = 180.0) -> dict:
        """Block until /status lists every demo deployment as RUNNING; return the status."""
        assert self.state is not None
        deadline = time.monotonic() + timeout_s
        status: dict = {}
        while time.monotonic() < deadline:
            self._check_children()
            status = httpx.get(f"{self.state.broker_url}/status", timeout=5.0).json()
            states = [d.get("application_state") for d in status.get("deployments", {}).values()]
            if states and all(s == "RUNNING" for s in states) and len(states) >= 4:
                return status
            time.sleep(0.5)
        raise RuntimeError(f"models not RUNNING within {timeout_s:g} s: {status}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_foreground(options: DemoOptions, wait_models: bool) -> None:
    """Start the mesh, print where it is, and run until SIGINT/SIGTERM."""
    mesh = DemoMesh(options)
    stopping = False

    def _stop(signum, frame) -> None:  # noqa: ARG001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        state = mesh.start()
        print(
            f"eDIF mesh (demo) broker at {state.broker_url}; logs in {state.logs_dir}", flush=True
        )
        if wait_models:
            mesh.wait_models()
            print("all demo models RUNNING", flush=True)
        while not stopping:
            mesh.supervise()
            time.sleep(0.5)
    finally:
        mesh.stop()
