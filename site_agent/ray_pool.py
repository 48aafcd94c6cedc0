"""Model workers as Ray actors: start, stream a job's updates, kill.

The agent connects to an existing Ray cluster (`--ray-address`) or starts a local one. Each
configured model gets its own actor process. The agent holds no secret (it verifies the broker
with public keys only); before it starts a local Ray it also drops any secret-looking variable
from its own environment, which the Ray processes and so the workers would inherit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator

from site_agent.config import ModelConfig
from site_agent.slots import WorkerDied
from site_agent.worker import ENDS

log = logging.getLogger("edif.agent.ray")

# Variables a worker may inherit; anything else (tokens, cloud credentials) stays out.
_WORKER_ENV_ALLOW = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")


LOOPBACK_NODE_IP = "127.0.0.2"

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE|CREDENTIAL", re.I)


def scrub_environment() -> list[str]:
    """Remove secret-looking variables from this process's environment; return their names."""
    names = [k for k in os.environ if _SECRET_NAME.search(k)]
    for name in names:
        del os.environ[name]
    return names


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one for this agent."""
    import ray

    if ray.is_initialized():
        return
    dropped = scrub_environment()
    if dropped:
        log.warning(
            "removed %d secret-looking variables before starting Ray: %s",
            len(dropped),
            ", ".join(sorted(dropped)),
        )
    # Local/test clusters: no token auth and no usage report. Production clusters set their
    # own RAY_AUTH_MODE before the agent starts (see README, "Ray in production").
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    # Ray starts its workers at nice 15 (its raylet and GCS stay responsive on a busy head
    # node). Here the workers are the model workers, on every job's critical path: at nice 15
    # any other process on the host takes the CPU from them first. Applies to clusters this
    # process starts; a site's own cluster sets RAY_worker_niceness when it starts.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A local cluster, or one on this host's loopback, stays on loopback: Ray would otherwise
    # bind and advertise the machine's interface address. Ray rewrites exactly "127.0.0.1" to
    # that interface address, so the node uses another loopback address.
    local = not address or address.startswith(("127.", "localhost"))
    node_ip = {"_node_ip_address": LOOPBACK_NODE_IP} if local else {}
    if address:
        ray.init(address=address, namespace="edif", log_to_driver=False, **node_ip)
    else:
        ray.init(
            num_cpus=num_cpus,
            namespace="edif",
            include_dashboard=False,
            log_to_driver=False,
            **node_ip,
        )


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _WORKER_ENV_ALLOW if k in os.environ}


class RayWorkerHandle:
    def __init__(self, actor) -> None:
        self.actor = actor

    async def execute(self, payload: bytes, compress: bool, env_json: str) -> AsyncIterator[tuple]:
        """The job's updates, fetched with plain actor calls (`ModelWorker.begin`/`more`).

        RUNNING is announced as the job is handed over: the worker runs one job at a time and
        the slot's lock makes this one next, so its own "running" need not make a round trip.
        The next call goes out before a batch is relayed, so the worker never waits for the
        agent's gRPC send to ask for more.
        """
        from ray.exceptions import RayActorError

        pending = self.actor.begin.remote(payload, compress, env_json)
        ended = False
        try:
            yield ("running",)
            while not ended:
                batch = await pending
                ended = any(item[0] in ENDS for item in batch)
                if not ended:
                    pending = self.actor.more.remote()
                for item in batch:
                    if item[0] != "running":
                        yield item
        except RayActorError as exc:
            raise WorkerDied(type(exc).__name__) from exc
        except GeneratorExit:
            # Closed early (the broker went away): let the job thread finish now, not at the
            # next `begin`. A worker that died or timed out is replaced, so it needs no call.
            if not ended:
                self._abandon()
            raise

    def _abandon(self) -> None:
        try:
            self.actor.abandon.remote()  # runs after the call in flight (actor calls are ordered)
        except Exception as exc:  # noqa: BLE001 - a dead actor has nothing to abandon
            log.debug("abandon: %s", exc)

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone is fine
            log.debug("kill: %s", exc)


class RayWorkerFactory:
    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes

    async def start(self, cfg: ModelConfig) -> RayWorkerHandle:
        import ray

        from site_agent.worker import ModelWorker

        actor_cls = ray.remote(ModelWorker)
        actor = actor_cls.options(
            num_cpus=cfg.cpus,
            max_restarts=0,
            runtime_env={"env_vars": _worker_env()},
        ).remote(cfg.model_dump_json(), self.chunk_bytes)
        info = await actor.info.remote()
        log.info("worker for %s ready (pid %s)", cfg.repo_id, info["pid"])
        return RayWorkerHandle(actor)
