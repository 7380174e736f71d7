"""After the controller's Redis lost its data (FLUSHALL, a Redis that came back empty):
rebuild what the outside world still knows, and say what was lost.

- VMs: the GCloud sync lists the MIG again; the gateway has already closed every stream,
  so each agent reconnects to its rediscovered record and reports its state.
- Jobs running on our VMs: GitHub's `in_progress`/`completed` and the agents' own events
  bind and end them (the intake records an end it has no job for).
- Jobs queued: GitHub still holds them; they are read back from its REST API and taken
  in as if their `queued` message had just arrived (`recovered_jobs`).

What cannot come back is counted, not hidden: `state_resets` (and `state_reset_at`) say
a wipe happened; the job counters restart from zero with it.
"""

from __future__ import annotations

import logging

from migctl.adapters.redis_store import RedisStore
from migctl.bridge.messages import JobEvent
from migctl.bridge.ports import Outcome
from migctl.domain.errors import PermanentError
from migctl.ports import Clock, RunnerScope, SystemClock, TokenIssuer
from migctl.services.intake import RedisIntake
from migctl.services.pool import Pool, Report
from migctl.settings import Settings

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        store: RedisStore,
        pool: Pool,
        tokens: TokenIssuer,
        intake: RedisIntake,
        settings: Settings,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.tokens = tokens
        self.intake = intake
        self.settings = settings
        self.clock = clock or SystemClock()

    def run(self) -> Report:
        report = self.pool.sync()
        gh = self.settings.github_app
        if not gh.org:
            log.error(
                "recovery: github_app.org is not set, so GitHub's queue cannot be read back; "
                "queued jobs come back only when their messages are delivered again"
            )
            report.detail = "no github_app.org: queued jobs not read back"
            return report
        try:
            queued = self.tokens.queued_jobs(RunnerScope(org=gh.org))
        except PermanentError as exc:
            log.error("recovery: cannot read GitHub's queue: %s", exc)
            report.detail = f"GitHub's queue not read: {exc}"
            return report
        now = self.clock.now()
        recovered = []
        for item in queued:
            event = JobEvent(
                action="queued",
                job_id=item.job_id,
                run_id=item.run_id,
                labels=item.labels,
                org=gh.org,
                repo=item.repo,
                installation_id=gh.installation_id or 0,
                pool_id=self.store.pool_id,
                priority=0,
                received_at=now,
                runner_name="",
                conclusion="",
                source="workflow_job",
            )
            if self.intake.accept(event) is Outcome.CREATED:
                recovered.append(item.job_id)
        if recovered:
            self.store.incr("recovered_jobs", len(recovered))
        report.add("recovered_jobs", recovered)
        log.warning(
            "recovery after a state loss: %d VM(s) rediscovered from the provider; GitHub "
            "holds %d queued job(s), %d taken in again",
            len(report.actions.get("discovered", [])),
            len(queued),
            len(recovered),
        )
        return report
