"""The fair-share scheduler over fake site views: slots, grants by priority, positions, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from broker.fairshare import (
    DecayedUsage,
    FairShareScheduler,
    Position,
    arrival_order,
    follow_positions,
)
from broker.modelkey import parse_model_key
from broker.routing import DeploymentView, SiteView, choose_site
from edif.clock import FakeClock
from edif.errors import PermissionDenied, Unavailable, UnknownModel

GPT2 = (
    "nnsight.modeling.transformers.TransformersModel:"
    '{"repo_id": "openai-community/gpt2", "revision": null, "task": "text-generation"}'
)
LLAMA = GPT2.replace("openai-community/gpt2", "meta-llama/Llama-3.1-8B")
GPT2_KEY, LLAMA_KEY = parse_model_key(GPT2), parse_model_key(LLAMA)
Q = GPT2_KEY.describe()


def site(name: str, *keys: str, reachable: bool = True, groups: Sequence[str] = ()) -> SiteView:
    deps = tuple(DeploymentView(parse_model_key(k), k, "RUNNING") for k in keys)
    return SiteView(name, reachable, deps, {}, frozenset(groups))


class Mesh:
    """Site views a test can change; finders route over the current ones (as the service's do)."""

    def __init__(self, *sites: SiteView, limits: dict[str, int] | None = None) -> None:
        self.sites = list(sites)
        self.limits = limits or {}

    def finder(self, key=GPT2_KEY, groups: Sequence[str] = ()):
        return lambda full: choose_site(key, self.sites, None, full, groups)

    def limit(self, name: str) -> int:
        return self.limits.get(name, 0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def scheduler_for(mesh: Mesh, clock: FakeClock, **options) -> FairShareScheduler:
    return FairShareScheduler(DecayedUsage(3600.0, clock), mesh.limit, clock, **options)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_one_slot_goes_to_the_lowest_usage_then_arrival(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock)
    heavy = [fair.enqueue(f"h{i}", "heavy", Q, mesh.finder()) for i in range(3)]
    light = fair.enqueue("l0", "light", Q, mesh.finder())
    first = await heavy[0].granted()  # the slot was free: the first arrival got it
    assert first.route.site.name == "site-a"
    assert not light.done and fair.queue_order(Q) == ["h1", "h2", "l0"]  # nobody used anything

    first.release(gpu_s=10.0)  # heavy's first job ran 10 GPU-seconds
    second = await light.granted()  # light overtakes heavy's backlog
    assert not heavy[1].done
    assert fair.queue_order(Q) == ["h1", "h2"]
    assert fair.usage.usage("heavy") == pytest.approx(10.0)

    second.release(gpu_s=1.0)
    assert (await heavy[1].granted()).route.site.name == "site-a"


async def test_arrival_order_keeps_the_light_job_behind_the_backlog(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock, order=arrival_order)
    heavy = [fair.enqueue(f"h{i}", "heavy", Q, mesh.finder()) for i in range(2)]
    light = fair.enqueue("l0", "light", Q, mesh.finder())
    (await heavy[0].granted()).release(gpu_s=10.0)
    assert (await heavy[1].granted()).route.site.name == "site-a"  # FIFO: heavy again
    assert not light.done and light.position == Position(1, 1, Q)


async def test_several_sites_take_one_job_per_worker_each(clock) -> None:
    mesh = Mesh(site("site-a", GPT2), site("site-b", GPT2))
    fair = scheduler_for(mesh, clock)
    tickets = [fair.enqueue(f"j{i}", "u", Q, mesh.finder()) for i in range(3)]
    grants = [await tickets[0].granted(), await tickets[1].granted()]
    assert sorted(g.route.site.name for g in grants) == ["site-a", "site-b"]
    assert not tickets[2].done
    assert fair.busy("site-a") == fair.busy("site-b") == 1
    grants[1].release()
    assert (await tickets[2].granted()).route.site.name == grants[1].route.site.name


async def test_jobs_per_worker_and_the_site_limit_bound_the_grants(clock) -> None:
    # site-a hosts both models but takes 1 job at once; 2 per worker would otherwise allow 4.
    mesh = Mesh(site("site-a", GPT2, LLAMA), limits={"site-a": 1})
    fair = scheduler_for(mesh, clock, jobs_per_worker=2)
    g = fair.enqueue("g", "u", Q, mesh.finder())
    ll = fair.enqueue("l", "v", LLAMA_KEY.describe(), mesh.finder(LLAMA_KEY))
    grant = await g.granted()
    assert not ll.done  # the site is at its limit, though llama's worker is idle
    grant.release()
    assert (await ll.granted()).slot == ("site-a", LLAMA)

    mesh.limits = {}
    fair = scheduler_for(mesh, clock, jobs_per_worker=2)
    tickets = [fair.enqueue(f"j{i}", "u", Q, mesh.finder()) for i in range(3)]
    assert [t.done for t in tickets] == [True, True, False]


async def test_waiting_jobs_learn_their_position_per_model(clock) -> None:
    mesh = Mesh(site("site-a", GPT2, LLAMA))
    fair = scheduler_for(mesh, clock)
    running = fair.enqueue("r", "u", Q, mesh.finder())
    a = fair.enqueue("a", "u", Q, mesh.finder())
    b = fair.enqueue("b", "w", Q, mesh.finder())
    assert running.position is None  # granted at once: never queued
    assert (a.position, b.position) == (Position(1, 2, Q), Position(2, 2, Q))
    assert a.changed.is_set() and b.changed.is_set()
    assert a.position.text() == (
        "Your job is queued (position 1 of 2 for model "
        "openai-community/gpt2 (TransformersModel, text-generation))."
    )
    a.changed.clear()
    (await running.granted()).release(5.0)  # "u" used 5: "w"'s job b moves ahead of a
    assert (await b.granted()).route.site.name == "site-a"
    assert a.position == Position(1, 1, Q) and a.changed.is_set()
    a.changed.clear()
    fair.pump()
    assert not a.changed.is_set()  # unchanged: no news


async def test_a_job_no_site_can_take_fails_at_once(clock) -> None:
    mesh = Mesh(site("site-a", GPT2, reachable=False))
    fair = scheduler_for(mesh, clock)
    with pytest.raises(Unavailable, match="No site can run"):
        await fair.enqueue("j", "u", Q, mesh.finder()).granted()
    assert fair.depths() == {}


async def test_a_waiting_job_outlives_a_short_outage_but_not_a_long_one(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock, unroutable_s=30.0)
    busy = await fair.enqueue("busy", "u", Q, mesh.finder()).granted()
    waiting = fair.enqueue("w", "u", Q, mesh.finder())
    mesh.sites = [site("site-a", GPT2, reachable=False)]  # marked unreachable meanwhile
    clock.advance(20.0)
    fair.pump()
    clock.advance(20.0)
    fair.pump()  # unroutable for 20 s: still waiting
    assert not waiting.done
    mesh.sites = [site("site-a", GPT2)]  # back after a Describe
    busy.release()
    assert (await waiting.granted()).route.site.name == "site-a"

    late = fair.enqueue("late", "u", Q, mesh.finder())
    mesh.sites = [site("site-a", GPT2, reachable=False)]
    fair.pump()
    clock.advance(31.0)
    fair.pump()
    with pytest.raises(Unavailable):
        await late.granted()


@pytest.mark.parametrize(
    ("sites", "error"),
    [([], UnknownModel), ([site("site-a", GPT2, groups=["fau"])], PermissionDenied)],
)
async def test_permanent_routing_errors_end_the_wait_at_once(clock, sites, error) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock, unroutable_s=3600.0)
    busy = await fair.enqueue("busy", "u", Q, mesh.finder()).granted()
    waiting = fair.enqueue("w", "u", Q, mesh.finder())
    mesh.sites = sites
    busy.release()
    with pytest.raises(error):
        await waiting.granted()


async def test_sovereignty_lets_a_lower_priority_job_use_a_site_the_best_cannot(clock) -> None:
    mesh = Mesh(site("open", GPT2), site("fau-only", GPT2, groups=["fau"]))
    fair = scheduler_for(mesh, clock)
    fair.usage.charge("fau-user", 100.0)
    first = await fair.enqueue("o1", "outsider", Q, mesh.finder(groups=())).granted()
    outsider = fair.enqueue("o2", "outsider", Q, mesh.finder(groups=()))
    fau = fair.enqueue("f1", "fau-user", Q, mesh.finder(groups=["fau"]))
    assert first.route.site.name == "open"
    assert (await fau.granted()).route.site.name == "fau-only"
    assert not outsider.done


async def test_a_cancelled_waiter_leaves_and_a_late_grant_is_given_back(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock)
    busy = await fair.enqueue("busy", "u", Q, mesh.finder()).granted()
    waiter = asyncio.create_task(fair.acquire("w", "u", Q, mesh.finder()))
    await settle()
    assert fair.depths() == {Q: 1}
    waiter.cancel()
    await settle()
    assert fair.depths() == {}

    ticket = fair.enqueue("x", "u", Q, mesh.finder())
    waiter = asyncio.create_task(ticket.granted())
    await settle()
    busy.release()  # granted to x ...
    waiter.cancel()  # ... but its job was cancelled before it woke up
    await settle()
    assert fair.busy("site-a") == 0  # the slot was given back
    assert (await fair.enqueue("y", "u", Q, mesh.finder()).granted()).route.site.name == "site-a"


async def test_release_is_idempotent(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock)
    grant = await fair.enqueue("j", "u", Q, mesh.finder()).granted()
    grant.release(2.0)
    grant.release(2.0)
    assert fair.busy("site-a") == 0
    assert fair.usage.usage("u") == pytest.approx(2.0)


async def test_equal_affinity_is_not_placed_again_once_the_sites_are_full(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    calls = 0

    def finder(full):
        nonlocal calls
        calls += 1
        return choose_site(GPT2_KEY, mesh.sites, None, full, ())

    fair = scheduler_for(mesh, clock)
    for i in range(5):
        fair.enqueue(f"j{i}", "u", Q, finder, affinity=("gpt2", ()))
    calls = 0
    fair.pump()  # j1 finds site-a full (2 calls); j2..j4 share its affinity: not tried
    assert calls == 2


async def test_follow_positions_sends_the_latest_at_most_once_per_interval(clock) -> None:
    mesh = Mesh(site("site-a", GPT2))
    fair = scheduler_for(mesh, clock)
    await fair.enqueue("busy", "u", Q, mesh.finder()).granted()
    ticket = fair.enqueue("w", "u", Q, mesh.finder())
    sent: list[Position] = []

    async def publish(position: Position) -> None:
        sent.append(position)

    follower = asyncio.create_task(follow_positions(ticket, publish, 0.2))
    await settle()
    assert sent == [Position(1, 1, Q)]
    for n in (2, 3, 4):  # three changes within the interval
        fair.enqueue(f"x{n}", "u", Q, mesh.finder())
        ticket._move_to(Position(1, n, Q))
    await asyncio.sleep(0.35)
    follower.cancel()
    assert sent == [Position(1, 1, Q), Position(1, 4, Q)]
