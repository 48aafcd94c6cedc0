"""The job service over scripted fake sites: relaying, delivery, and one terminal status always."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from broker_fakes import (
    GPT2_KEY,
    HANG,
    LLAMA_KEY,
    RESULT,
    FakeIdentity,
    RecordingSink,
    decode,
    describe,
    error,
    load_result,
    log,
    result,
    status,
)

from edif.errors import (
    BadRequest,
    ClientVersionError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SiteUnavailable,
    Unavailable,
    UnknownModel,
)
from proto import site_agent_pb2 as pb

ALICE = FakeIdentity("alice@example.org")
BOB = FakeIdentity("bob@example.org")


async def submit(service, identity=ALICE, session_id="", key=GPT2_KEY, version="0.8.1"):
    envelope = json.dumps({"model_key": key, "session_id": session_id, "compress": False})
    headers = {"nnsight-version": version}
    return await service.submit(identity, envelope, b"blob", headers, "http://broker.test/")


async def run_job(service, sink=None, identity=ALICE):
    """Submit one job on a fresh session and wait for it; returns (reply, decoded frames)."""
    sink = sink or RecordingSink()
    session_id = await service.open_session(sink, identity)
    reply = await submit(service, identity, session_id)
    await service.drain()
    return reply, [decode(frame) for frame in sink.frames], sink


def statuses(frames) -> list[str]:
    return [frame.status.value for frame in frames]


async def until(condition, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.fixture
async def service(make_service):
    service = make_service()
    await service.start()
    yield service
    await service.close()


async def test_happy_path_relays_everything_and_completes_inline(service, sites) -> None:
    reply, frames, sink = await run_job(service)
    assert reply.status == "RECEIVED" and reply.id
    assert statuses(frames) == ["QUEUED", "DISPATCHED", "QUEUED", "RUNNING", "LOG", "COMPLETED"]
    assert all(frame.id == reply.id for frame in frames)
    assert "site site-a (2 job(s) ahead)" in frames[2].description
    assert frames[4].description == "torch.Size([1, 7, 64])"
    completed = frames[-1]
    assert isinstance(sink.frames[-1], bytes)  # inline: a binary frame
    assert torch.equal(load_result(completed.data)["x"], torch.arange(5))
    assert completed.meta["site"] == "site-a"
    assert completed.meta["result_bytes"] == len(RESULT)
    assert completed.meta["execution_s"] == 0.25
    assert completed.meta["peak_memory_bytes"] == 1234
    assert "queue_s" in completed.meta
    assert service.job(reply.id).payload == b""  # not kept once the job has ended
    # the site got the payload byte for byte and its own model key
    site, request = sites.executed[0]
    assert (site, request.payload, request.model_key, request.job_id) == (
        "site-a",
        b"blob",
        GPT2_KEY,
        reply.id,
    )


async def test_polled_status_is_always_the_url_form(service) -> None:
    reply, frames, _ = await run_job(service)
    stored = await service.status_of(ALICE, reply.id)
    assert stored.status == "COMPLETED"
    token = service.job(reply.id).result.token
    assert stored.data == f"http://broker.test/results/{reply.id}/{token}"
    assert stored.meta == frames[-1].meta
    assert service.open_result(reply.id, token).path.read_bytes() == RESULT


async def test_large_result_goes_as_an_absolute_url(make_service) -> None:
    service = make_service(inline_max_bytes=10, public_url="https://edif.example.org/")
    await service.start()
    reply, frames, sink = await run_job(service)
    await service.close()
    assert isinstance(sink.frames[-1], str)
    token = service.job(reply.id).result.token
    assert frames[-1].data == f"https://edif.example.org/results/{reply.id}/{token}"


async def test_every_printed_line_is_one_log(service, sites) -> None:
    sites.script("site-a", [log("first\nsecond\n"), log(""), *result()])
    _, frames, _ = await run_job(service)
    logs = [f.description for f in frames if f.status == "LOG"]
    assert logs == ["first", "second", ""]


FAILURES = {
    "user error": (
        [status(pb.RUNNING), log("hi"), error(pb.USER, "Traceback ...\nAttributeError: '7'")],
        "Traceback ...\nAttributeError: '7'",
    ),
    "refused without text": ([error(pb.REFUSED, "")], "failed at site site-a (REFUSED)"),
    "refused by the site's code policy": (
        [error(pb.REFUSED, "line 3: import of 'os' is not allowed by site policy edif-default v1")],
        "Site site-a refused your job before running it: line 3: import of 'os' is not allowed "
        "by site policy edif-default v1",
    ),
    "stream breaks mid-result": (
        [status(pb.RUNNING), *result()[:2], SiteUnavailable("Site site-a is unavailable (X).")],
        "Site site-a is unavailable (X).",
    ),
    "stream ends without result": ([status(pb.RUNNING), log("x")], "without a result"),
    "corrupted result": (result(sha256="0" * 64), "damaged in transit"),
    "broken site client": ([status(pb.RUNNING), RuntimeError("bug")], "internal error"),
    "worker lost, no other site": ([error(pb.WORKER_LOST, "worker died")], "worker died"),
}


@pytest.mark.parametrize("case", FAILURES)
async def test_every_failure_ends_in_exactly_one_error(service, sites, case, tmp_path) -> None:
    script, expected = FAILURES[case]
    sites.script("site-a", script)
    reply, frames, _ = await run_job(service)
    terminal = [f for f in frames if f.status in ("COMPLETED", "ERROR")]
    assert [f.status.value for f in terminal] == ["ERROR"]
    assert frames[-1].status == "ERROR"
    assert expected in frames[-1].description
    assert frames[-1].meta["site"] == "site-a"
    assert (await service.status_of(ALICE, reply.id)).status == "ERROR"
    assert service.job(reply.id).state == "ERROR"
    assert list((tmp_path / "broker" / "results").iterdir()) == []


async def test_result_over_the_limit_is_an_error(make_service, sites) -> None:
    service = make_service(max_result_bytes=100)
    await service.start()
    _, frames, _ = await run_job(service)
    await service.close()
    assert frames[-1].status == "ERROR"
    assert "larger than this broker's limit" in frames[-1].description


async def test_heartbeat_repeats_the_current_status(make_service, sites) -> None:
    service = make_service(heartbeat_s=0.02)
    await service.start()
    sites.script("site-a", [status(pb.RUNNING), HANG, *result()])
    sink = RecordingSink()
    session_id = await service.open_session(sink, ALICE)
    await submit(service, ALICE, session_id)
    await until(lambda: [decode(f).status for f in sink.frames].count("RUNNING") >= 3)
    sites.release.set()
    await service.drain()
    await asyncio.sleep(0.06)  # a heartbeat after the end would show up now
    await service.close()
    frames = [decode(f) for f in sink.frames]
    assert frames[-1].status == "COMPLETED"
    assert [f.status for f in frames].count("COMPLETED") == 1


async def test_site_failure_redispatches_when_allowed(make_service, sites) -> None:
    sites.descriptions["site-b"] = describe("site-b", GPT2_KEY)
    sites.script("site-a", [status(pb.RUNNING), error(pb.WORKER_LOST, "worker died")])
    service = make_service(dispatch_attempts=2)
    await service.start()
    _, frames, _ = await run_job(service)
    await service.close()
    assert statuses(frames) == [
        "QUEUED",
        "DISPATCHED",
        "RUNNING",
        "QUEUED",
        "DISPATCHED",
        "QUEUED",
        "RUNNING",
        "LOG",
        "COMPLETED",
    ]
    assert "worker died" in frames[3].description
    assert frames[-1].meta["site"] == "site-b"
    assert [site for site, _ in sites.executed] == ["site-a", "site-b"]


async def test_user_errors_are_not_redispatched(make_service, sites) -> None:
    sites.descriptions["site-b"] = describe("site-b", GPT2_KEY)
    sites.script("site-a", [error(pb.USER, "ZeroDivisionError")])
    service = make_service(dispatch_attempts=2)
    await service.start()
    _, frames, _ = await run_job(service)
    await service.close()
    assert frames[-1].status == "ERROR"
    assert len(sites.executed) == 1


async def test_shutdown_ends_running_jobs_with_error(make_service, sites) -> None:
    service = make_service()
    await service.start()
    sites.script("site-a", [status(pb.RUNNING), HANG])
    sink = RecordingSink()
    reply = await submit(service, ALICE, await service.open_session(sink, ALICE))
    await until(lambda: any(decode(f).status == "RUNNING" for f in sink.frames))
    await service.close()
    last = decode(sink.frames[-1])
    assert last.status == "ERROR" and "broker stopped" in last.description
    assert sites.cancelled == [("site-a", reply.id)]
    assert sites.closed


async def test_a_client_that_goes_away_does_not_stop_the_job(service) -> None:
    sink = RecordingSink()
    sink.fail = True
    reply, _, _ = await run_job(service, sink)
    assert (await service.status_of(ALICE, reply.id)).status == "COMPLETED"


async def test_non_blocking_job_is_pollable(service) -> None:
    reply = await submit(service)
    await service.drain()
    assert (await service.status_of(ALICE, reply.id)).data.startswith("http://broker.test/results/")


async def test_jobs_and_sessions_belong_to_their_owner(service, sites) -> None:
    reply = await submit(service)
    await service.drain()
    with pytest.raises(NotFound):
        await service.status_of(BOB, reply.id)
    with pytest.raises(NotFound):
        await service.status_of(ALICE, "no-such-job")
    session_id = await service.open_session(RecordingSink(), ALICE)
    with pytest.raises(PermissionDenied):
        await submit(service, BOB, session_id)
    anonymous = await service.open_session(RecordingSink(), None)
    await submit(service, ALICE, anonymous)  # bound to the first identity that uses it
    with pytest.raises(PermissionDenied):
        await submit(service, BOB, anonymous)


async def test_a_session_carries_one_running_job(service, sites) -> None:
    sites.script("site-a", [HANG, *result()])
    session_id = await service.open_session(RecordingSink(), ALICE)
    await submit(service, ALICE, session_id)
    with pytest.raises(BadRequest, match="already carries"):
        await submit(service, ALICE, session_id)
    sites.release = sites.release or asyncio.Event()
    sites.release.set()
    await service.drain()
    await service.close_session(session_id)
    with pytest.raises(BadRequest, match="not open"):
        await submit(service, ALICE, session_id)


async def test_admission_errors(service, make_service) -> None:
    with pytest.raises(UnknownModel, match="Hosted models: openai-community/gpt2"):
        await submit(service, key=LLAMA_KEY)
    with pytest.raises(ClientVersionError, match="nnsight 0.7.0 is not served here"):
        await submit(service, version="0.7.0")
    with pytest.raises(PermissionDenied):
        await submit(service, FakeIdentity("site-a", "site"))
    with pytest.raises(PayloadTooLarge):
        small = make_service(max_payload_bytes=2)
        await small.start()
        try:
            await submit(small)
        finally:
            await small.close()


async def test_no_site_reachable_is_503(make_service, sites) -> None:
    sites.down.update({"site-a", "site-b"})
    service = make_service(startup_wait_s=0.0)
    await service.start()
    with pytest.raises(SiteUnavailable) as caught:
        await submit(service)
    await service.close()
    assert caught.value.http_status == 503


async def test_model_on_an_unreachable_site_is_503_not_404(service, sites) -> None:
    sites.down.add("site-a")
    await service._catalog.refresh()
    with pytest.raises(Unavailable) as caught:
        await submit(service)
    assert caught.value.http_status == 503


async def test_finished_jobs_are_pruned_after_retention(make_service, clock) -> None:
    service = make_service(job_retention_s=100, result_ttl_s=50)
    await service.start()
    reply = await submit(service)
    await service.drain()
    clock.advance(101)
    await service.sweep()
    with pytest.raises(NotFound):
        await service.status_of(ALICE, reply.id)
    await service.close()


async def test_logs_carry_the_pseudonym_not_the_user(service, caplog) -> None:
    caplog.set_level("DEBUG")
    await run_job(service)
    assert "u-pseudo" in caplog.text
    assert "alice" not in caplog.text
