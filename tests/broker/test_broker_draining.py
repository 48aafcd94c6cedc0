"""A leaving site (walltime, `edif agent leave`): the broker re-dispatches what it hands back and
routes nothing to a site whose Describe says `draining`."""

from __future__ import annotations

import json

from broker_fakes import GPT2_KEY, FakeIdentity, RecordingSink, decode, describe, error, status

from broker.catalog import site_view
from proto import site_agent_pb2 as pb

ALICE = FakeIdentity("alice@example.org")


async def run_job(service) -> list:
    sink = RecordingSink()
    session_id = await service.open_session(sink, ALICE)
    envelope = json.dumps({"model_key": GPT2_KEY, "session_id": session_id, "compress": False})
    await service.submit(ALICE, envelope, b"blob", {"nnsight-version": "0.8.1"}, "http://b.test/")
    await service.drain()
    return [decode(frame) for frame in sink.frames]


async def test_handed_back_job_runs_at_another_site(make_service, sites) -> None:
    sites.descriptions["site-b"] = describe("site-b", GPT2_KEY)
    handed_back = "Site site-a is leaving (draining) and handed your job back unfinished."
    sites.script("site-a", [status(pb.RUNNING), error(pb.SITE_DRAINING, handed_back)])
    service = make_service(dispatch_attempts=2)
    await service.start()
    frames = await run_job(service)
    await service.close()
    assert [f.status.value for f in frames].count("COMPLETED") == 1
    assert frames[-1].status == "COMPLETED" and frames[-1].meta["site"] == "site-b"
    requeued = next(f for f in frames if handed_back in (f.description or ""))
    assert requeued.status == "QUEUED"
    assert requeued.description.endswith("Your job is queued for another site.")
    assert [site for site, _ in sites.executed] == ["site-a", "site-b"]


def test_draining_site_keeps_its_models_known_but_gets_no_work() -> None:
    description = describe("site-a", GPT2_KEY)
    assert site_view("site-a", description).reachable
    description.draining = True
    view = site_view("site-a", description)
    assert not view.reachable  # routing skips it; /status shows it COLD
    assert [d.model_key for d in view.deployments] == [GPT2_KEY]
