"""The broker's job service: admit → enqueue → dispatch → relay → finish.

`submit` runs the admission policies, records the job as RECEIVED (the POST reply) and starts
one asyncio task per job. The task routes the job to a site, streams the site's updates back to
the client's websocket (statuses, one LOG per printed line, result chunks into the result
store) and finishes with exactly one COMPLETED or ERROR on every path: site errors, broken
streams, broker shutdown and bugs in the broker itself (the `finally` in `_run`). A heartbeat
task re-sends the job's current status while it waits or runs. COMPLETED goes inline as a
binary frame when the result is small and a socket is listening, else as an absolute result
URL; the status kept for `GET /response/{id}` is always the URL form.

Logs name jobs, sites and the owner's pseudonym, never the owner's `sub` or any token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from contextlib import aclosing
from typing import Any

from broker import admission
from broker.audit.hooks import JobAuditor
from broker.catalog import SiteCatalog
from broker.config import BrokerSettings
from broker.jobs import Job, JobState, Submission, new_job_id
from broker.modelkey import ModelKey, parse_model_key
from broker.ports import Identity
from broker.quotas import caps
from broker.quotas.service import Admission, QuotaService
from broker.result_safety import UnsafeResult, check_result_file
from broker.results import ResultFile, ResultRef, ResultStore, ResultWriter
from broker.routing import Route, choose_site
from broker.service_info import env_document, status_document
from broker.sessions import FrameSink, Session, SessionRegistry
from broker.sites import SiteClient
from broker.wire import StatusMessage, WireStatus, binary_frame
from edif.clock import Clock, SystemClock
from edif.errors import EdifError, NotFound, SiteUnavailable
from proto import site_agent_pb2 as pb

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 60.0
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
    ) -> None:
        self._settings = settings
        self._audit = audit or JobAuditor()
        self._quotas = quotas
        self._admissions: dict[str, Admission] = {}  # job id -> its claim on the owner's quotas
        self._catalog = catalog
        self._sites = sites
        self._results = results
        self._pseudonymize = pseudonymize
        self._clock = clock or SystemClock()
        self._jobs: dict[str, Job] = {}
        self._sessions = SessionRegistry()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn what the sites host (waiting for them a while), then keep it fresh."""
        await self._catalog.wait_ready()
        self._background = [
            asyncio.create_task(self._catalog.run(), name="catalog-refresh"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]

    async def close(self) -> None:
        """Stop background work; every unfinished job ends with ERROR first. Idempotent."""
        tasks = [*self._job_tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sites.close()

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
        self._jobs[job.id] = job
        self._audit.submitted(job, identity.role)
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

    def status_of(self, identity: Identity, job_id: str) -> StatusMessage:
        job = self._jobs.get(job_id)
        # The same answer for "no such job" and "someone else's job": ids are not disclosed.
        if job is None or not _same(job.owner_sub, identity.sub) or job.latest is None:
            raise NotFound("No job with this id belongs to you (or it is no longer kept).")
        return job.latest

    def open_result(self, job_id: str, token: str) -> ResultFile:
        return self._results.open(job_id, token)

    def deployments(self) -> dict[str, Any]:
        reachable = {view.name: view.reachable for view in self._catalog.views()}
        return status_document(self._catalog.descriptions(), reachable)

    def environment(self) -> dict[str, Any]:
        return env_document(self._catalog.descriptions())

    def job(self, job_id: str) -> Job | None:
        """The job record (tests, operator tools)."""
        return self._jobs.get(job_id)

    # -- one job -----------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job), name=f"heartbeat-{job.id}")
        try:
            await self._advance(job, JobState.QUEUED, TEXT[JobState.QUEUED])
            await self._dispatch(job)
        except asyncio.CancelledError:
            await self._on_shutdown(job)
            raise
        except EdifError as error:
            await self._fail(job, error.message)
        except Exception:
            log.exception("job %s: broker error", job.id)
            await self._fail(job, f"The broker failed while handling job {job.id}: internal error.")
        finally:
            heartbeat.cancel()
            job.payload = b""  # finished jobs are kept for polling; their payload need not be
            if not job.state.terminal:  # a path above that forgot to finish: never leave it open
                await self._fail(job, f"Job {job.id} ended without a result.")
            self._settle_quota(job)

    async def _dispatch(self, job: Job) -> None:
        """Run the job on the best site; on a site failure, on the next best while allowed."""
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
            result.write(update.chunk.data)
        elif kind == "done":
            await self._complete(job, result.commit(update.done), update.done)
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

    async def _complete(self, job: Job, ref: ResultRef, done: pb.ResultEnd) -> None:
        await self._check_safe(job, ref)
        job.result = ref
        job.meta.update(
            execution_s=round(done.execution_s, 6),
            result_bytes=ref.size,
            **({"peak_memory_bytes": done.peak_memory_bytes} if done.peak_memory_bytes else {}),
        )
        text = TEXT[JobState.COMPLETED]
        message = self._status(job, WireStatus.COMPLETED, text, data=self._result_url(job, ref))
        frame: str | bytes = message.to_json()
        if ref.size <= self._settings.inline_max_bytes and self._listening(job):
            # Prepared before the state changes: once COMPLETED, nothing else may be sent.
            inline = message.model_copy(update={"data": None})
            data = await asyncio.to_thread(self._results.read, ref)
            frame = await asyncio.to_thread(binary_frame, inline, data)
        job.advance(JobState.COMPLETED, self._clock.monotonic())
        job.record(message)
        self._audit.ended(job)
        log.info("job %s completed on %s: %d bytes", job.id, job.site, ref.size)
        await self._send(job, frame, final=True)

    async def _check_safe(self, job: Job, ref: ResultRef) -> None:
        """Refuse a result that is not plain data before any client can load it (inline or URL)."""
        stored = self._results.open(ref.job_id, ref.token)
        try:
            await asyncio.to_thread(
                check_result_file, stored.path, job.submission.compress, job.site or "?"
            )
        except UnsafeResult:
            log.warning("job %s: unsafe result from site %s refused", job.id, job.site)
            self._results.discard(ref.job_id)
            raise

    async def _fail(self, job: Job, description: str) -> None:
        """End the job with ERROR, unless it already ended (exactly one terminal status)."""
        if job.state.terminal:
            return
        message = self._status(job, WireStatus.ERROR, description or "Your job failed.")
        job.advance(JobState.ERROR, self._clock.monotonic())
        job.record(message)
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

    # -- statuses and frames -----------------------------------------------------------------

    async def _advance(self, job: Job, to: JobState, text: str) -> None:
        job.advance(to, self._clock.monotonic())
        await self._publish(job, self._status(job, WireStatus(to.value), text))

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
            self.sweep()

    def sweep(self) -> None:
        """Drop expired results and finished jobs past their retention."""
        self._results.sweep()
        horizon = self._clock.now() - self._settings.job_retention_s
        old = [j.id for j in self._jobs.values() if j.state.terminal and j.created_at < horizon]
        for job_id in old:
            del self._jobs[job_id]


class _PendingResult:
    """The result of one attempt: a store writer opened on the first chunk."""

    def __init__(self, store: ResultStore, job_id: str, limit: int | None = None) -> None:
        self._store = store
        self._job_id = job_id
        self._writer: ResultWriter | None = None
        self._limit = limit  # the owner's result-size quota; None: only the store's own cap
        self._received = 0

    def write(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._limit is not None:
            caps.check_result(self._received, self._limit)
        self._writer = self._writer or self._store.begin(self._job_id)
        self._writer.write(chunk)

    def commit(self, done: pb.ResultEnd) -> ResultRef:
        if self._limit is not None:
            caps.check_result(max(done.total_bytes, self._received), self._limit)
        writer, self._writer = self._writer or self._store.begin(self._job_id), None
        return writer.commit(done.total_bytes, done.sha256 or None)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _site_error(site: str, error: pb.JobError) -> EdifError:
    kind = pb.ErrorKind.Name(error.kind)
    if error.kind == pb.WORKER_LOST:
        return SiteUnavailable(
            error.description or f"Site {site} lost the worker running your job."
        )
    if error.kind == pb.REFUSED and error.description:
        # Sites differ in their code policies: say whose policy refused the code.
        return SiteJobError(f"Site {site} refused your job before running it: {error.description}")
    return SiteJobError(error.description or f"Your job failed at site {site} ({kind}).")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
