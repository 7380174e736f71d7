"""The bridge's sink: a parsed job event becomes durable demand, then an `assign_job`.

`queued` creates the job if absent (idempotent on job id) and enqueues its assignment;
`in_progress` binds it to our VM or, when the runner is not ours, releases its demand;
`completed` ends it (cancelled included); `waiting` holds. Any order of arrival ends in
the same state, because a late `queued` finds the record and changes nothing.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.bridge.messages import JobEvent
from migctl.bridge.ports import Outcome
from migctl.domain import transitions as t
from migctl.domain.model import Job, JobState, covers
from migctl.ports import Clock, Dispatcher, SystemClock
from migctl.services.events import AgentEvents
from migctl.settings import Settings

log = logging.getLogger(__name__)

RAW_KEPT_BYTES = 64 * 1024


class RedisIntake:
    def __init__(
        self,
        store: RedisStore,
        settings: Settings,
        dispatch: Dispatcher,
        events: AgentEvents,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.dispatch = dispatch
        self.events = events
        self.clock = clock or SystemClock()

    def accept(self, event: JobEvent) -> Outcome:
        if event.action == "queued":
            return self._queued(event)
        if event.action == "in_progress":
            return self._in_progress(event)
        if event.action == "completed":
            return self._completed(event)
        return Outcome.IGNORED  # waiting: approval or concurrency gate; no demand yet

    def dead_letter(
        self, raw: bytes, attributes: Mapping[str, str], reason: str, message_id: str
    ) -> None:
        self.store.dead_letter(
            {
                "at": self.clock.now(),
                "reason": reason,
                "message_id": message_id,
                "attributes": dict(attributes),
                "size": len(raw),
                "data_b64": base64.b64encode(raw[:RAW_KEPT_BYTES]).decode(),
                "truncated": len(raw) > RAW_KEPT_BYTES,
            }
        )
        log.warning("dead-lettered message %s: %s", message_id, reason)

    def _job(self, event: JobEvent, state: JobState = JobState.QUEUED, **extra: object) -> Job:
        now = self.clock.now()
        return Job(
            id=event.job_id,
            labels=tuple(event.labels),
            state=state,
            pool_id=self.store.pool_id,
            org=event.org,
            repo=event.repo,
            run_id=event.run_id,
            installation_id=event.installation_id,
            priority=event.priority,
            received_at=event.received_at or now,
            updated_at=now,
        ).with_(**extra)

    def _queued(self, event: JobEvent) -> Outcome:
        if not covers(self.settings.pool.labels, event.labels):
            log.info(
                "job %s wants labels %s this pool does not have; ignored",
                event.job_id,
                list(event.labels),
            )
            self.store.incr("ignored_jobs")
            return Outcome.IGNORED
        if not self.store.create_job(self._job(event), queued_at=self.clock.now()):
            # A redelivery (e.g. the bridge died after storing it, before sending the task):
            # make sure a still-queued job has its assignment coming (the task is idempotent).
            got = self.store.get_job(event.job_id)
            if got is not None and got[0].state is JobState.QUEUED:
                self.dispatch.assign_job(event.job_id)
            return Outcome.DUPLICATE
        self.dispatch.assign_job(event.job_id)
        return Outcome.CREATED

    def _in_progress(self, event: JobEvent) -> Outcome:
        runner = event.runner_name
        if not runner:
            return Outcome.IGNORED
        if self.store.get_vm(runner) is not None:
            result = self.events.event(
                runner, "job_started", {"job_id": event.job_id, "run_id": event.run_id}
            )
            return Outcome.UPDATED if result == "applied" else Outcome.DUPLICATE
        prefix = (self.settings.gcp.mig_name or self.settings.pool.id) + "-"
        if runner.startswith(prefix):
            # One of our VMs, gone (lost, replaced) before this arrived: the job did run
            # here; its `completed` settles it. Not "taken elsewhere".
            return Outcome.IGNORED
        reason = f"taken by runner {runner}, not of this pool"
        return self._end(event, JobState.CANCELLED, reason, "")

    def _completed(self, event: JobEvent) -> Outcome:
        cancelled = event.conclusion in ("cancelled", "skipped")
        runner = event.runner_name
        known = self.store.get_job(event.job_id) is not None
        if not cancelled and runner and known and self.store.get_vm(runner) is not None:
            # It ran on one of our VMs: end it there, which also binds it to that VM if
            # the agent's own events were lost (an outage) and moves reservations right.
            success = "true" if event.conclusion == "success" else "false"
            data = {"job_id": event.job_id, "run_id": event.run_id, "success": success}
            if self.events.event(runner, "job_completed", data) == "applied":
                return Outcome.UPDATED
        state = JobState.CANCELLED if cancelled else JobState.COMPLETED
        return self._end(
            event, state, f"GitHub reports it {event.conclusion or 'completed'}", event.conclusion
        )

    def _end(self, event: JobEvent, state: JobState, reason: str, conclusion: str) -> Outcome:
        for _ in range(5):
            got = self.store.get_job(event.job_id)
            if got is None:
                # Its end arrived first: remember it, so a late `queued` is a duplicate.
                now = self.clock.now()
                job = self._job(
                    event,
                    state,
                    reason=reason,
                    conclusion=conclusion,
                    finished_at=now,
                    vm_id=event.runner_name,  # where GitHub says it ran, if it did
                )
                try:
                    self.store.save(t.Change(jobs={job.id: job}), {})
                    return Outcome.UPDATED
                except Conflict:
                    continue
            job, rev = got
            if job.state.terminal:
                return Outcome.DUPLICATE
            revs = {f"job:{job.id}": rev}
            vm = None
            if job.vm_id and (got_vm := self.store.get_vm(job.vm_id)):
                vm, revs[f"vm:{job.vm_id}"] = got_vm
            change = t.job_ended_elsewhere(
                job, vm, state=state, reason=reason, conclusion=conclusion, now=self.clock.now()
            )
            counters = (
                {"cancelled_jobs": 1} if state is JobState.CANCELLED else {"completed_jobs": 1}
            )
            try:
                self.store.save(change, revs, counters=counters)
            except Conflict:
                continue
            for vm_id in change.freed:
                self.dispatch.assign_vm(vm_id)
            return Outcome.UPDATED
        raise Conflict(f"job {event.job_id}")
