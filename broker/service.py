"""The broker's job service: admit → enqueue → dispatch → relay → finish.

`submit` runs the admission policies, writes the job to the job store (`broker.jobstore`)
and only then answers RECEIVED (the POST reply), and starts one asyncio task per job. Every
lifecycle change is written before the client hears of it; a restarted broker (or a replica,
once this one's lease lapses) adopts the unfinished jobs and finishes them (`_resume`), and
writes are fenced by instance, so a job is never finished twice. The task waits in the
fair-share scheduler (`broker.fairshare`: per-model queues ordered by decayed recent usage,
the client told its position) for a site with room, routes the job there, streams the
site's updates back to the client's websocket (statuses, one LOG per printed line, result
chunks into the result store) and finishes with exactly one COMPLETED or ERROR on every
path: site errors, broken streams, broker shutdown and bugs in the broker itself (the
`finally` in `_run`). A heartbeat task re-sends the job's current status while it waits or
runs. COMPLETED goes inline as a binary frame when the result is small and a socket is
listening, else as an absolute result URL; the status kept for `GET /response/{id}` is
always the URL form.

Logs name jobs, sites and the owner's pseudonym, never the owner's `sub` or any token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from contextlib import aclosing
from functools import partial
from typing import Any

from broker import admission
from broker.audit.hooks import JobAuditor
from broker.catalog import SiteCatalog
from broker.config import BrokerSettings
from broker.fairshare import FairShareScheduler, Grant, Position, follow_positions
from broker.jobs import Job, JobState, Submission, new_job_id
from broker.jobstore import DurableJobs, memory_jobs
from broker.modelkey import ModelKey, parse_model_key
from broker.ports import Identity
from broker.quotas import caps
from broker.quotas.service import Admission, QuotaService
from broker.result_safety import (
    UnsafeResult,
    check_result_bytes,
    check_result_file,
    checkable_in_memory,
)
from broker.results import ResultFile, ResultRef, ResultStore
from broker.results.pipeline import BackgroundWriter
from broker.routing import Route, choose_site
from broker.service_info import env_document, status_document
from broker.sessions import FrameSink, Session, SessionRegistry
from broker.sites import SiteClient
from broker.telemetry.observer import JobObserver
from broker.wire import StatusMessage, WireStatus, binary_frame
from edif.clock import Clock, SystemClock
from edif.errors import EdifError, NotFound, SiteUnavailable, Unavailable
from proto import site_agent_pb2 as pb

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 60.0
# States recorded without waiting for the store (see `_persist_soon`): losing such a record
# changes nothing a restart does, and the first QUEUED and RUNNING are on every job's path.
_RECORDED_IN_PASSING = frozenset({JobState.QUEUED, JobState.RUNNING})
# An inline frame this small is pickled on the event loop (tens of µs): cheaper than a thread.
_FRAME_ON_LOOP_BYTES = 256 * 1024
SHUTDOWN_NOTICE_S = 5.0

TEXT = {
    JobState.RECEIVED: "Your job has been received and is waiting to be queued.",
    JobState.QUEUED: "Your job has been queued.",
    JobState.RUNNING: "Your job has started running.",
    JobState.COMPLETED: "Your job has been completed.",
}


class SiteJobError(EdifError):
    """The site reported that the job failed; the message is the site's report, verbatim."""

    http_status = 502


class BrokerService:
    def __init__(
        self,
        settings: BrokerSettings,
        catalog: SiteCatalog,
        sites: SiteClient,
        results: ResultStore,
        pseudonymize: Callable[[str], str],
        clock: Clock | None = None,
        quotas: QuotaService | None = None,  # None: no fair-use quotas (tests, trusted set-ups)
        audit: JobAuditor | None = None,  # None: nothing audited (tests of other parts)
        jobs: DurableJobs | None = None,  # None: records live as long as this process
        fairshare: FairShareScheduler | None = None,  # None: straight to a site (its FIFO)
        observer: JobObserver | None = None,  # None: no telemetry (broker.telemetry)
    ) -> None:
        self._observer = observer or JobObserver()
        self._settings = settings
        self._audit = audit or JobAuditor()
        self._quotas = quotas
        self._admissions: dict[str, Admission] = {}  # job id -> its claim on the owner's quotas
        self._catalog = catalog
        self._sites = sites
        self._results = results
        self._pseudonymize = pseudonymize
        self._clock = clock or SystemClock()
        self._fairshare = fairshare
        self._store = jobs or memory_jobs(self._clock)
        self._jobs: dict[str, Job] = {}
        self._sessions = SessionRegistry()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn what the sites host (waiting for them a while), then keep it fresh."""
        await self._catalog.wait_ready()
        await self._store.heartbeat()
        # This instance's previous life (a crash, a kill -9) left these unfinished: finish them.
        for job in await self._store.claim_orphans(include_own=True):
            self._resume(job)
        self._background = [
            asyncio.create_task(self._catalog.run(), name="catalog-refresh"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self._lease(), name="job-lease"),
        ]

    async def close(self) -> None:
        """Stop background work; every unfinished job ends with ERROR first. Idempotent."""
        tasks = [*self._job_tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sites.close()
        await self._store.close()

    async def drain(self) -> None:
        """Wait until every job task has finished (tests, graceful stop)."""
        while self._job_tasks:
            await asyncio.gather(*list(self._job_tasks), return_exceptions=True)

    # -- JobService protocol -----------------------------------------------------------------

    async def open_session(self, sink: FrameSink, identity: Identity | None) -> str:
        return self._sessions.open(sink, identity.sub if identity else None).id

    async def close_session(self, session_id: str) -> None:
        self._sessions.close(session_id)

    async def submit(
        self,
        identity: Identity,
        envelope: str | bytes,
        payload: bytes,
        headers: Mapping[str, str],
        base_url: str,
    ) -> StatusMessage:
        try:
            return await self._submit(identity, envelope, payload, headers, base_url)
        except EdifError as refusal:
            self._audit.refused(identity, len(payload), refusal)
            self._observer.refused(refusal)
            raise

    async def _submit(
        self,
        identity: Identity,
        envelope: str | bytes,
        payload: bytes,
        headers: Mapping[str, str],
        base_url: str,
    ) -> StatusMessage:
        admission.check_role(identity.role)
        admission.check_payload_size(len(payload), self._settings.max_payload_bytes)
        request = admission.parse_envelope(envelope)
        key = parse_model_key(request.model_key)
        version = admission.check_client_version(
            headers.get("nnsight-version"), self._catalog.served_versions(key)
        )
        # 404 / 403 / 503 now, rather than an ERROR later
        self._route(key, version, exclude=(), groups=tuple(identity.groups))
        job = self._new_job(identity, request, key, version, payload, base_url)
        if request.session_id:
            self._sessions.claim(request.session_id, identity.sub, job.id, self._busy)
        if self._quotas is not None:  # last check: only a job that will run takes quota (429)
            self._admissions[job.id] = self._quotas.admit(identity, len(payload))
        job.entered_at[JobState.RECEIVED] = self._clock.monotonic()
        received = self._status(job, WireStatus.RECEIVED, TEXT[JobState.RECEIVED])
        job.record(received)
        await self._record_new(job)
        self._jobs[job.id] = job
        self._audit.submitted(job, identity.role)
        self._observer.received(job)
        log.info(
            "job %s received from %s: %s, %d bytes",
            job.id,
            job.owner_pseudonym,
            key.describe(),
            len(payload),
        )
        self._spawn(self._run(job), f"job-{job.id}")
        return received

    def _new_job(
        self,
        identity: Identity,
        request: admission.Envelope,
        key: ModelKey,
        version: str | None,
        payload: bytes,
        base_url: str,
    ) -> Job:
        submission = Submission(
            model_key=key,
            raw_model_key=request.model_key,
            compress=request.compress,
            env_json=admission.env_json(request),
            session_id=request.session_id,
            client_version=version or "",
            base_url=base_url.rstrip("/"),
        )
        return Job(
            id=new_job_id(),
            owner_sub=identity.sub,
            owner_pseudonym=self._pseudonymize(identity.sub),
            owner_groups=tuple(identity.groups),
            submission=submission,
            created_at=self._clock.now(),
            payload=payload,
        )

    async def status_of(self, identity: Identity, job_id: str) -> StatusMessage:
        job = self._jobs.get(job_id) or await self._stored(job_id)
        # The same answer for "no such job" and "someone else's job": ids are not disclosed.
        if job is None or not self._owns(job, identity) or job.latest is None:
            raise NotFound("No job with this id belongs to you (or it is no longer kept).")
        return job.latest

    def open_result(self, job_id: str, token: str) -> ResultFile:
        return self._results.open(job_id, token)

    def deployments(self) -> dict[str, Any]:
        reachable = {view.name: view.reachable for view in self._catalog.views()}
        document = status_document(self._catalog.descriptions(), reachable)
        if self._fairshare is not None:
            # Jobs waiting here for a site (the client reads only "deployments").
            document["broker_queue"] = self._fairshare.depths()
        return document

    def environment(self) -> dict[str, Any]:
        return env_document(self._catalog.descriptions())

    def job(self, job_id: str) -> Job | None:
        """The job record (tests, operator tools)."""
        return self._jobs.get(job_id)

    # -- one job -----------------------------------------------------------------------------

    async def _run(self, job: Job, resumed: bool = False) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job), name=f"heartbeat-{job.id}")
        superseded = False
        try:
            if resumed:
                await self._requeue_recovered(job)
            else:
                await self._advance(job, JobState.QUEUED, TEXT[JobState.QUEUED])
            await self._dispatch(job)
        except _Superseded:
            superseded = True
            self._jobs.pop(job.id, None)
            log.warning("job %s: taken over by another broker instance; stopped here", job.id)
        except asyncio.CancelledError:
            await self._on_shutdown(job)
            raise
        except EdifError as error:
            self._observer.failed(job, error)
            await self._fail(job, error.message)
        except Exception:
            log.exception("job %s: broker error", job.id)
            await self._fail(job, f"The broker failed while handling job {job.id}: internal error.")
        finally:
            heartbeat.cancel()
            job.payload = b""  # finished jobs are kept for polling; their payload need not be
            if not job.state.terminal and not superseded:  # never leave a job open
                await self._fail(job, f"Job {job.id} ended without a result.")
            self._settle_quota(job)
            self._observer.ended(job)

    async def _dispatch(self, job: Job) -> None:
        """Run the job on the best site; on a site failure, on the next best while allowed."""
        if self._fairshare is not None:
            return await self._dispatch_fairly(job, self._fairshare)
        sub = job.submission
        route = self._route(sub.model_key, sub.client_version or None, (), job.owner_groups)
        while True:
            try:
                await self._execute_on(job, route)
                return
            except SiteUnavailable as failure:
                self._catalog.mark_unreachable(route.site.name)
                route = self._reroute(job, failure)
                await self._advance(
                    job, JobState.QUEUED, f"{failure.message} Your job is queued for another site."
                )

    async def _dispatch_fairly(self, job: Job, fairshare: FairShareScheduler) -> None:
        """`_dispatch` through the fair-share scheduler: each attempt waits (QUEUED, with its
        position) until the scheduler grants it a site with room; the attempt's GPU-seconds
        are charged to the owner when it ends, and a failed-over job queues again."""
        failure: SiteUnavailable | None = None
        while True:
            try:
                grant = await self._granted(job, fairshare)
            except EdifError:
                if failure is not None:  # no other site to fail over to: the site's error
                    raise failure from None
                raise
            started = self._clock.monotonic()
            try:
                await self._execute_on(job, grant.route)
                return
            except SiteUnavailable as error:
                failure = error
                self._catalog.mark_unreachable(grant.route.site.name)
                if len(job.attempts) >= self._settings.dispatch_attempts:
                    raise
                await self._advance(
                    job, JobState.QUEUED, f"{error.message} Your job is queued for another site."
                )
            finally:
                grant.release(self._attempt_gpu_s(job, started))

    async def _granted(self, job: Job, fairshare: FairShareScheduler) -> Grant:
        """Wait in the model's queue; the client hears its position as it changes."""
        sub = job.submission
        queue = sub.model_key.describe()
        version = sub.client_version or None
        ticket = fairshare.enqueue(
            job.id,
            job.owner_pseudonym,
            queue,
            lambda full: self._route(
                sub.model_key, version, (*job.attempts, *full), job.owner_groups
            ),
            affinity=(queue, version, job.owner_groups, tuple(job.attempts)),
        )

        async def publish(position: Position) -> None:
            await self._publish(job, self._status(job, WireStatus.QUEUED, position.text()))

        interval = self._settings.fair_share_position_interval_s
        reporter = asyncio.create_task(follow_positions(ticket, publish, interval))
        try:
            return await ticket.granted()
        finally:
            reporter.cancel()

    def _attempt_gpu_s(self, job: Job, started: float) -> float:
        """What an attempt used: the site's measurement, else the time it ran (failures)."""
        if job.state is JobState.COMPLETED and "execution_s" in job.meta:
            return float(job.meta["execution_s"])
        running = job.entered_at.get(JobState.RUNNING)
        if running is None or running < started:  # never ran in this attempt
            return 0.0
        return max(0.0, self._clock.monotonic() - running)

    def _reroute(self, job: Job, failure: SiteUnavailable) -> Route:
        """The next site to try after `failure`, or `failure` itself when there is none."""
        if len(job.attempts) >= self._settings.dispatch_attempts:
            raise failure
        sub = job.submission
        try:
            return self._route(
                sub.model_key, sub.client_version or None, job.attempts, job.owner_groups
            )
        except EdifError:
            raise failure from None

    async def _execute_on(self, job: Job, route: Route) -> None:
        site = route.site.name
        job.site = site
        job.attempts.append(site)
        await self._advance(job, JobState.DISPATCHED, f"Your job has been sent to site {site}.")
        log.info("job %s dispatched to %s (attempt %d)", job.id, site, len(job.attempts))
        admitted = self._admissions.get(job.id)
        limit = admitted.policy.max_result_bytes if admitted is not None else None
        result = _PendingResult(self._results, job.id, limit)
        try:
            updates = self._sites.execute(site, self._execute_request(job, route))
            async with aclosing(updates):
                async for update in updates:
                    if await self._on_update(job, site, update, result):
                        return
            raise SiteUnavailable(f"Site {site} ended your job without a result.")
        finally:
            result.abort()

    async def _on_update(
        self, job: Job, site: str, update: pb.ExecuteUpdate, result: _PendingResult
    ) -> bool:
        """Relay one update from the site; True once the job has completed."""
        kind = update.WhichOneof("update")
        if kind == "status":
            await self._on_site_status(job, site, update.status)
        elif kind == "log":
            await self._on_log(job, update.log.text)
        elif kind == "chunk":
            await result.write(update.chunk.data)
        elif kind == "done":
            # fsync (disk) or completing a multipart upload (S3), then the safety check and,
            # for an inline result, reading it back: one trip to a thread (none for a small
            # result whose store's commit waits for nothing, broker.results.pipeline)
            inline = self._inline_wanted(job, update.done.total_bytes)
            ref, data = await result.commit(update.done, partial(self._checked, job, inline))
            await self._complete(job, ref, update.done, data)
            return True
        elif kind == "error":
            raise _site_error(site, update.error)
        return False

    def _execute_request(self, job: Job, route: Route) -> pb.ExecuteRequest:
        sub = job.submission
        return pb.ExecuteRequest(
            job_id=job.id,
            model_key=route.deployment.model_key,  # the site's own key, never the client's text
            payload=job.payload,
            compress=sub.compress,
            env_json=sub.env_json,
            time_limit_s=self._settings.job_time_limit_s,
        )

    async def _on_site_status(self, job: Job, site: str, status: pb.StatusUpdate) -> None:
        if status.phase == pb.RUNNING and job.state is JobState.DISPATCHED:
            await self._advance(job, JobState.RUNNING, f"Your job is running at site {site}.")
        elif status.phase == pb.QUEUED and job.state is JobState.DISPATCHED:
            # The job stays DISPATCHED (it is at the site); the client sees it waiting there.
            ahead = f"{status.position} job(s) ahead" if status.position else "next in line"
            text = f"Your job is queued at site {site} ({ahead})."
            await self._publish(job, self._status(job, WireStatus.QUEUED, text))

    async def _on_log(self, job: Job, text: str) -> None:
        for line in text.splitlines() or [""]:
            await self._send(job, self._status(job, WireStatus.LOG, line).to_json())

    async def _complete(
        self, job: Job, ref: ResultRef, done: pb.ResultEnd, data: bytes | None
    ) -> None:
        """Announce a committed, checked result: inline when `data` (its bytes) came along."""
        job.result = ref
        job.meta.update(
            execution_s=round(done.execution_s, 6),
            result_bytes=ref.size,
            **({"peak_memory_bytes": done.peak_memory_bytes} if done.peak_memory_bytes else {}),
        )
        text = TEXT[JobState.COMPLETED]
        message = self._status(job, WireStatus.COMPLETED, text, data=self._result_url(job, ref))
        frame: str | bytes = message.to_json()
        if data is not None and self._listening(job):
            # Prepared before the state changes: once COMPLETED, nothing else may be sent.
            inline = message.model_copy(update={"data": None})
            if len(data) <= _FRAME_ON_LOOP_BYTES:
                frame = binary_frame(inline, data)
            else:
                frame = await asyncio.to_thread(binary_frame, inline, data)
        job.advance(JobState.COMPLETED, self._clock.monotonic())
        job.record(message)
        await self._persist(job)  # before the client hears of it: a restart must not rerun it
        self._audit.ended(job)
        log.info("job %s completed on %s: %d bytes", job.id, job.site, ref.size)
        self._observer.delivering(job, inline=isinstance(frame, bytes))
        await self._send(job, frame, final=True)

    def _inline_wanted(self, job: Job, size: int) -> bool:
        return size <= self._settings.inline_max_bytes and self._listening(job)

    def _checked(self, job: Job, inline: bool, ref: ResultRef) -> bytes | None:
        """Refuse a result that is not plain data before any client can load it (inline or URL);
        the bytes of one to send inline. Runs on the commit's thread (blocking I/O)."""
        compressed, site = job.submission.compress, job.site or "?"
        try:
            data = self._results.read(ref) if inline else None
            if data is not None and checkable_in_memory(data, compressed):
                check_result_bytes(data, compressed, site)
            else:
                with self._results.local_file(ref) as path:  # object storage: a temporary copy
                    check_result_file(path, compressed, site)
        except UnsafeResult:
            log.warning("job %s: unsafe result from site %s refused", job.id, job.site)
            self._results.discard(ref.job_id)
            raise
        return data

    async def _fail(self, job: Job, description: str) -> None:
        """End the job with ERROR, unless it already ended (exactly one terminal status)."""
        if job.state.terminal:
            return
        message = self._status(job, WireStatus.ERROR, description or "Your job failed.")
        job.advance(JobState.ERROR, self._clock.monotonic())
        job.record(message)
        try:
            await self._persist(job)
        except _Superseded:
            return  # another broker instance finishes it
        self._audit.ended(job)
        log.info("job %s failed (site %s)", job.id, job.site or "-")
        await self._send(job, message.to_json(), final=True)

    async def _on_shutdown(self, job: Job) -> None:
        if job.site is not None and not job.state.terminal:
            try:
                await asyncio.wait_for(self._sites.cancel(job.site, job.id), SHUTDOWN_NOTICE_S)
            except (EdifError, TimeoutError):
                log.warning("job %s: could not cancel it at site %s", job.id, job.site)
        text = f"The broker stopped before job {job.id} finished; please submit it again."
        try:
            await asyncio.wait_for(self._fail(job, text), SHUTDOWN_NOTICE_S)
        except TimeoutError:
            log.warning("job %s: client not told of the shutdown in time", job.id)

    # -- durability --------------------------------------------------------------------------

    async def _record_new(self, job: Job) -> None:
        """Write the job down before the client is told it exists; refuse it if we cannot."""
        try:
            await self._store.create(job)
        except Exception:
            log.exception("job %s: could not be recorded", job.id)
            admitted = self._admissions.pop(job.id, None)
            if admitted is not None and self._quotas is not None:
                self._quotas.release(admitted)
            raise Unavailable(
                "The broker could not record your job (its job store is unavailable), so "
                "nothing was run. Please submit it again in a minute."
            ) from None

    async def _persist(self, job: Job) -> None:
        """Record the job's new state, or raise `_Superseded` if another instance owns it."""
        try:
            mine = await self._store.save(job)
        except Exception:  # the job goes on; a crash now would rerun it from its last record
            log.exception("job %s: could not record its %s state", job.id, job.state)
            return
        if not mine:
            raise _Superseded(job.id)

    async def _stored(self, job_id: str) -> Job | None:
        if len(job_id) > 64:  # not one of ours; spare the store
            return None
        try:
            return await self._store.load(job_id)
        except Exception:
            log.exception("job store lookup failed")
            raise Unavailable(
                "The broker cannot read its job store right now; try again."
            ) from None

    def _owns(self, job: Job, identity: Identity) -> bool:
        """The caller submitted `job` (a recovered, finished job knows only the pseudonym)."""
        same_pseudonym = _same(job.owner_pseudonym, self._pseudonymize(identity.sub))
        return same_pseudonym and (not job.owner_sub or _same(job.owner_sub, identity.sub))

    def _resume(self, job: Job) -> None:
        """Finish a job a broker instance that is gone had accepted."""
        log.info("job %s recovered in state %s (site %s)", job.id, job.state, job.site or "-")
        self._jobs[job.id] = job
        self._spawn(self._run(job, resumed=True), f"job-{job.id}")

    async def _requeue_recovered(self, job: Job) -> None:
        """Stop what the old instance started at its site, then queue the job again there or
        elsewhere. Cancelling first matters: the next attempt reuses the job id."""
        if job.site is not None and job.state in (JobState.DISPATCHED, JobState.RUNNING):
            try:
                await asyncio.wait_for(self._sites.cancel(job.site, job.id), SHUTDOWN_NOTICE_S)
            except (EdifError, TimeoutError):
                log.warning("job %s: could not cancel the earlier run at %s", job.id, job.site)
        job.attempts.clear()
        if job.state is not JobState.QUEUED:
            text = f"The broker restarted; your job {job.id} is queued again (nothing is lost)."
            await self._advance(job, JobState.QUEUED, text)

    async def _lease(self) -> None:
        """Keep this instance's lease, and adopt the unfinished jobs of instances that died."""
        while True:
            await asyncio.sleep(self._store.lease_s / 3)
            try:
                await self._store.heartbeat()
                for job in await self._store.claim_orphans(include_own=False):
                    self._resume(job)
            except Exception:
                log.exception("job store lease renewal failed")

    # -- statuses and frames -----------------------------------------------------------------

    async def _advance(self, job: Job, to: JobState, text: str) -> None:
        job.advance(to, self._clock.monotonic())
        self._observer.advanced(job, to)
        message = self._status(job, WireStatus(to.value), text)
        job.record(message)
        if to in _RECORDED_IN_PASSING:
            self._persist_soon(job)
        else:
            await self._persist(job)
        await self._send(job, message.to_json())

    def _persist_soon(self, job: Job) -> None:
        """Record a state whose loss a restart would not notice, without waiting for the store.

        A recovered RECEIVED job is queued again as a QUEUED one is, and a DISPATCHED one is
        cancelled at its site and queued again as a RUNNING one is, so nothing waits for these
        writes; the store writes them in order, before any later (awaited) record. If another
        instance owns the job by now, the next awaited record finds that out."""

        def noted(saved: asyncio.Future[bool]) -> None:
            if not saved.cancelled() and saved.exception() is not None:
                log.warning("job %s: could not record its %s state", job.id, job.state)

        self._store.save_soon(job).add_done_callback(noted)

    async def _publish(self, job: Job, message: StatusMessage) -> None:
        job.record(message)
        await self._send(job, message.to_json())

    async def _send(self, job: Job, frame: str | bytes, final: bool = False) -> None:
        session = self._session_of(job)
        if session is None:
            return
        wanted = None if final else (lambda: not job.state.terminal)
        await session.send(frame, wanted)

    async def _heartbeat(self, job: Job) -> None:
        while not job.state.terminal:
            await asyncio.sleep(self._settings.heartbeat_s)
            if job.latest is not None:
                await self._send(job, job.latest.to_json())

    def _status(
        self, job: Job, status: WireStatus, text: str, data: str | None = None
    ) -> StatusMessage:
        terminal = status in (WireStatus.COMPLETED, WireStatus.ERROR)
        return StatusMessage(
            id=job.id,
            status=status,
            description=text,
            data=data,
            meta=self._meta(job) if terminal else None,
        )

    def _meta(self, job: Job) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if job.site is not None:
            meta["site"] = job.site
        received = job.entered_at.get(JobState.RECEIVED)
        running = job.entered_at.get(JobState.RUNNING)
        if received is not None and running is not None:
            meta["queue_s"] = round(running - received, 6)
        meta.update(job.meta)
        return meta

    def _result_url(self, job: Job, ref: ResultRef) -> str:
        base = self._settings.public_url or job.submission.base_url
        return f"{base}/results/{job.id}/{ref.token}"

    def _session_of(self, job: Job) -> Session | None:
        session_id = job.submission.session_id
        session = self._sessions.get(session_id) if session_id else None
        return session if session is not None and session.job_id == job.id else None

    def _listening(self, job: Job) -> bool:
        session = self._session_of(job)
        return session is not None and session.open

    # -- helpers -----------------------------------------------------------------------------

    def _route(
        self,
        key: ModelKey,
        version: str | None,
        exclude: Collection[str],
        groups: Collection[str],
    ) -> Route:
        if not self._catalog.ever_described():
            raise SiteUnavailable("No site has registered with this broker yet; try again soon.")
        return choose_site(key, self._catalog.views(), version, exclude, groups)

    def _settle_quota(self, job: Job) -> None:
        """Free the job's concurrency slot and charge the GPU-seconds it ran: the site's
        measurement when it completed, else the broker's RUNNING -> end time (a failed job that
        ran still used the accelerator)."""
        admitted = self._admissions.pop(job.id, None)
        if admitted is None or self._quotas is None:
            return
        self._quotas.release(admitted)
        ran = job.meta.get("execution_s")
        started = job.entered_at.get(JobState.RUNNING)
        if ran is None and started is not None:
            ended = job.entered_at.get(JobState.ERROR, self._clock.monotonic())
            ran = max(0.0, ended - started)
        if ran:
            try:
                self._quotas.charge(admitted, float(ran), job.id)
            except Exception:  # the ledger must never turn a finished job into a broker error
                log.exception(
                    "job %s: could not charge %s s to %s", job.id, ran, job.owner_pseudonym
                )

    def _busy(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and not job.state.terminal

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_S, self._settings.result_ttl_s))
            try:
                await self.sweep()
            except Exception:
                log.exception("housekeeping failed")

    async def sweep(self) -> None:
        """Drop expired results and finished jobs past their retention (memory and store)."""
        self._results.sweep()
        horizon = self._clock.now() - self._settings.job_retention_s
        old = [j.id for j in self._jobs.values() if j.state.terminal and j.created_at < horizon]
        for job_id in old:
            del self._jobs[job_id]
        await self._store.purge(horizon)


class _Superseded(Exception):
    """Another broker instance took this job over (this one was presumed dead)."""


class _PendingResult:
    """The result of one attempt: a store writer opened on the first chunk, written on its own
    thread while the next chunks arrive (`broker.results.pipeline`)."""

    def __init__(self, store: ResultStore, job_id: str, limit: int | None = None) -> None:
        self._writer = BackgroundWriter(lambda: store.begin(job_id))
        self._limit = limit  # the owner's result-size quota; None: only the store's own cap
        self._received = 0

    async def write(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._limit is not None:
            caps.check_result(self._received, self._limit)
        await self._writer.write(chunk)

    async def commit(
        self, done: pb.ResultEnd, then: Callable[[ResultRef], bytes | None]
    ) -> tuple[ResultRef, bytes | None]:
        """Commit, then `then(ref)` on the commit's thread (see `BackgroundWriter.commit`)."""
        if self._limit is not None:
            caps.check_result(max(done.total_bytes, self._received), self._limit)
        return await self._writer.commit(done.total_bytes, done.sha256 or None, then)

    def abort(self) -> None:
        self._writer.abort()


def _site_error(site: str, error: pb.JobError) -> EdifError:
    kind = pb.ErrorKind.Name(error.kind)
    if error.kind == pb.WORKER_LOST:
        return SiteUnavailable(
            error.description or f"Site {site} lost the worker running your job."
        )
    if error.kind == pb.SITE_DRAINING:  # the site is leaving: a site failure, re-dispatched
        return SiteUnavailable(error.description or f"Site {site} is leaving and handed it back.")
    if error.kind == pb.REFUSED and error.description:
        # Sites differ in their code policies: say whose policy refused the code.
        return SiteJobError(f"Site {site} refused your job before running it: {error.description}")
    return SiteJobError(error.description or f"Your job failed at site {site} ({kind}).")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
