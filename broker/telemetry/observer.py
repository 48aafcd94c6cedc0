"""The hooks the job service and the site client call; the base classes do nothing.

`BrokerService` reports a job's life to a `JobObserver`: `received` (it answered RECEIVED),
`advanced` (a state change through QUEUED / DISPATCHED / RUNNING), `delivering` (the final
COMPLETED frame is about to go out), `failed` (the error that ends it), `ended` (its task is
done: called once, last) and `refused` (admission turned a submission away). `GrpcSiteClient`
asks `site_call(job_id, site)` for a `SiteCallObserver` per Execute call: the trace headers to
send and each update the site streams back. `broker.telemetry.BrokerTelemetry` implements
both; these no-op bases keep the service and client free of `if telemetry` checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proto import site_agent_pb2 as pb

if TYPE_CHECKING:
    from broker.jobs import Job, JobState


class SiteCallObserver:
    """One Execute call to a site, seen from the broker."""

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Extra gRPC metadata (the W3C trace context)."""
        return ()

    def update(self, update: pb.ExecuteUpdate) -> None:
        """One streamed update, as it arrives."""

    def close(self) -> None:
        """The call is over (done, failed, or abandoned by the broker)."""


NO_SITE_CALL = SiteCallObserver()


class JobObserver:
    def received(self, job: Job) -> None: ...

    def advanced(self, job: Job, state: JobState) -> None: ...

    def delivering(self, job: Job, inline: bool) -> None: ...

    def failed(self, job: Job, error: BaseException) -> None: ...

    def ended(self, job: Job) -> None: ...

    def refused(self, error: BaseException) -> None: ...

    def site_call(self, job_id: str, site: str) -> SiteCallObserver:
        return NO_SITE_CALL
