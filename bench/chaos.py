"""Chaos benchmark: ≥ 1000 jobs while the broker and agents are killed with SIGKILL.

The long run of `tests/e2e/test_chaos.py`, with figures: starts `edif up --demo`, a broker of
its own (restarted on the same port and data directory after each kill, as a service manager
would), and `--clients` researcher processes running the unmodified nnsight client on
`edif-demo/tiny-gpt2` (half blocking over the websocket, half non-blocking polls). While they
run, every few seconds the broker (or, now and then, a demo agent) is SIGKILLed. Reported:
how every job ended (COMPLETED and `torch.equal` to local / ERROR / LOST), answers that
changed on a second poll, kills, the broker's restart-to-ready time, and job latency.

Usage: .venv/bin/python bench/chaos.py [--clients 6] [--jobs 1000] [--out bench/out/chaos.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "e2e")]

from chaos_harness import agent_pids, client_main  # noqa: E402
from failover import start_mesh, wait_running  # noqa: E402
from processes import BrokerProcess  # noqa: E402

from auth.keys import KeyStore  # noqa: E402
from auth.roles import Role  # noqa: E402
from auth.tokens import TokenIssuer  # noqa: E402
from edif.up import free_port  # noqa: E402


def chaos(futures, broker: BrokerProcess, home: Path, rng: random.Random, stats: dict) -> None:
    last_agent_kill = time.monotonic()
    while True:
        done, _ = wait(futures, timeout=rng.uniform(3.0, 8.0))
        if len(done) == len(futures):
            return
        if time.monotonic() - last_agent_kill > 45 and rng.random() < 0.4:
            name, pid = rng.choice(sorted(agent_pids(home / "mesh.json").items()))
            try:
                os.kill(pid, signal.SIGKILL)
                stats["kills"]["agent"] += 1
            except ProcessLookupError:
                pass
            last_agent_kill = time.monotonic()
            continue
        broker.kill()
        stats["kills"]["broker"] += 1
        time.sleep(rng.uniform(0.2, 1.5))
        broker.start()
        stats["restart_s"].append(broker.wait_ready())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=1000, help="in total, over all clients")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "chaos.json")
    args = parser.parse_args()
    per_client = -(-args.jobs // args.clients)
    home = Path(tempfile.mkdtemp(prefix="edif-chaos-"))
    mesh, state = start_mesh(home)
    broker = BrokerProcess(home, "broker-chaos", free_port())
    stats: dict = {"kills": Counter(), "restart_s": []}
    began = time.monotonic()
    try:
        wait_running(state["broker_url"], tuple(state["agents"]))
        broker.start()
        broker.wait_ready()
        issuer = TokenIssuer(KeyStore(home / "keys"))
        tokens = [
            issuer.issue(f"chaos-{i}@uni-example.eu", Role.RESEARCHER, 6 * 3600)
            for i in range(args.clients)
        ]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.clients, mp_context=context) as pool:
            futures = [
                pool.submit(
                    client_main,
                    i,
                    str(home),
                    broker.url,
                    tokens[i],
                    per_client,
                    args.seed + i,
                    900.0,
                )
                for i in range(args.clients)
            ]
            chaos(futures, broker, home, random.Random(args.seed), stats)
            outcomes = [o for future in futures for o in future.result()]
    finally:
        broker.stop()
        mesh.terminate()
        mesh.wait(timeout=60)
    report(outcomes, stats, time.monotonic() - began, args.out)


def report(outcomes, stats: dict, wall_s: float, out: Path) -> None:
    by_status = Counter(o.status for o in outcomes)
    completed = [o for o in outcomes if o.status == "COMPLETED"]
    latencies = sorted(o.seconds for o in completed)
    figures = {
        "jobs": len(outcomes),
        "outcomes": dict(by_status),
        "completed_equal_to_local": sum(1 for o in completed if o.equal),
        "changed_answer_on_second_poll": sum(1 for o in outcomes if o.confirmed != o.status),
        "lost": by_status.get("LOST", 0),
        "kills": dict(stats["kills"]),
        "broker_restart_to_ready_s_p50": _p(stats["restart_s"], 0.5),
        "broker_restart_to_ready_s_max": max(stats["restart_s"], default=None),
        "job_latency_s_p50": _p(latencies, 0.5),
        "job_latency_s_p95": _p(latencies, 0.95),
        "resubmitted_while_broker_down": sum(o.resubmits for o in outcomes),
        "error_texts": Counter(
            o.description.split(":")[0][:80] for o in outcomes if o.status == "ERROR"
        ).most_common(5),
        "wall_s": round(wall_s, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"figures": figures, "outcomes": [asdict(o) for o in outcomes]}, indent=1)
    )
    print(json.dumps(figures, indent=2))


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


if __name__ == "__main__":
    main()
