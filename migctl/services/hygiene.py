"""Runner hygiene (beat): delete the pool's offline runners that no VM owns, flag VMs whose
runner never appeared. Observes GitHub and Redis, lets `hygiene_plan` decide, acts.

Runs under a per-pool lock; every action is idempotent (a runner already gone is not an
error), so a pass run twice or concurrently with the assigner is safe. VM records are
only read: a flag is a counter, a log line and a report field, never a state change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from migctl.adapters.redis_store import RedisStore
from migctl.domain.errors import MigctlError, PermanentError, TemporaryError
from migctl.domain.hygiene import HygienePlan, hygiene_plan, pool_prefix
from migctl.domain.model import Job
from migctl.ports import Clock, RunnerInfo, RunnerScope, SystemClock, TokenIssuer
from migctl.settings import Settings

log = logging.getLogger(__name__)

# Registration to an online runner takes seconds; two minutes is well past any normal lag
# and well inside scheduler.assignment_timeout (300 s), after which the reservation is gone.
NEVER_APPEARED_GRACE_S = 120.0
# GitHub's secondary limit is 900 points/min per endpoint and a DELETE costs 5: 50 deletes
# use under a third of it; what is left over waits for the next pass.
MAX_DELETES_PER_PASS = 50
LOCK_TTL_S = 300.0  # 200 pages of runners at worst; a crashed holder frees it after this
FLAG_MEMORY_S = 86400.0  # a flagged reservation is counted once, not once per pass
JOBS_FOR_SCOPES = 200  # repo scope: repositories of the pool's most recent jobs


@dataclass
class HygieneReport:
    listed: int = 0  # runners GitHub listed, all scopes
    ours: int = 0  # of those, the pool's
    deleted: list[str] = field(default_factory=list)  # runner names
    busy: list[str] = field(default_factory=list)  # kept: GitHub says they run a job
    failed: list[str] = field(default_factory=list)  # delete refused for another reason
    never_appeared: list[str] = field(default_factory=list)  # VM ids (flagged)
    strays: list[str] = field(default_factory=list)  # online runners of ours with no VM
    scopes: list[str] = field(default_factory=list)  # listed, as "org" or "owner/repo"
    detail: str = ""

    @property
    def actions(self) -> dict[str, list[str]]:
        """Non-empty lists, as the pool reconcilers report (task results: names only)."""
        named = {
            "deleted": self.deleted,
            "busy": self.busy,
            "failed": self.failed,
            "never_appeared": self.never_appeared,
            "strays": self.strays,
        }
        return {k: list(v) for k, v in named.items() if v}


class Hygiene:
    def __init__(
        self,
        store: RedisStore,
        tokens: TokenIssuer,
        settings: Settings,
        clock: Clock | None = None,
        *,
        grace: float | None = None,
        max_deletes: int = MAX_DELETES_PER_PASS,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.settings = settings
        self.clock = clock or SystemClock()
        # Past assignment_timeout the reservation is released, so a longer grace sees nothing.
        self.grace = (
            grace
            if grace is not None
            else min(NEVER_APPEARED_GRACE_S, settings.scheduler.assignment_timeout / 2)
        )
        self.max_deletes = max_deletes
        self.prefix = pool_prefix(settings.gcp.mig_name, settings.pool.id)

    def run(self) -> HygieneReport:
        with self.store.try_lock("hygiene", timeout=LOCK_TTL_S) as got:
            if not got:
                return HygieneReport(detail="another hygiene pass is running")
            return self._run()

    def _run(self) -> HygieneReport:
        report = HygieneReport()
        scopes = self.scopes()
        if not scopes:
            report.detail = "nothing to list: no github_app.org, and no recent job names a scope"
            return report
        runners, owner, complete = self._list(scopes, report)
        # VMs are read after the listing: a runner registered by a VM created since is then
        # matched to its record, never taken for an orphan.
        vms = [vm for vm, _ in self.store.get_vms()]
        now = self.clock.now()
        plan = hygiene_plan(
            runners,
            vms,
            now,
            prefix=self.prefix,
            pool_labels=self.settings.pool.labels,
            grace=self.grace,
            complete=complete,
        )
        report.listed, report.ours = len(runners), plan.ours
        self._delete(plan, owner, report)
        self._flag(plan, report)
        for stray in plan.strays:
            report.strays.append(stray.name)
            if self.store.once(f"hygiene-stray:{stray.runner_id}", FLAG_MEMORY_S):
                log.warning("runner %s (id %s): %s", stray.name, stray.runner_id, stray.reason)
        for name in plan.kept_busy:
            report.busy.append(name)
        if not complete:
            report.detail = "some scopes could not be listed: no never-appeared flags this pass"
        return report

    # -- observe ------------------------------------------------------------------------

    def scopes(self) -> list[RunnerScope]:
        """Where the pool's runners register: the configured org, or (repo scope, or no org
        configured) the orgs/repositories of the pool's recent jobs, as the assigner does."""
        gh = self.settings.github_app
        if gh.runner_scope == "org" and gh.org:
            return [RunnerScope(org=gh.org)]
        found: dict[str, RunnerScope] = {}
        for job in self._recent_jobs():
            org = job.org or gh.org
            if gh.runner_scope == "repo" and job.repo:
                found.setdefault(
                    job.repo,
                    RunnerScope(org=org, repo=job.repo, installation_id=job.installation_id),
                )
            elif gh.runner_scope == "org" and org:
                found.setdefault(org, RunnerScope(org=org, installation_id=job.installation_id))
        return list(found.values())

    def _recent_jobs(self) -> list[Job]:
        vms = [vm for vm, _ in self.store.get_vms()]
        held = {vm.job_id for vm in vms} | {vm.reserved_job for vm in vms}
        jobs = [job for job, _ in self.store.get_jobs(sorted(held - {""}))]
        jobs += [job for job, _ in self.store.queued(limit=JOBS_FOR_SCOPES)]
        recent: list[Job] = self.store.recent_jobs(limit=JOBS_FOR_SCOPES)
        return jobs + recent

    def _list(
        self, scopes: list[RunnerScope], report: HygieneReport
    ) -> tuple[list[RunnerInfo], dict[int, RunnerScope], bool]:
        """Every scope's runners; a scope that fails is skipped (and the listing is then
        incomplete). A temporary failure of every scope is raised: the task retries."""
        runners: list[RunnerInfo] = []
        owner: dict[int, RunnerScope] = {}
        failed: list[MigctlError] = []
        for scope in scopes:
            name = scope.repo or scope.org
            try:
                listed = self.tokens.list_runners(scope)
            except MigctlError as exc:
                failed.append(exc)
                self.store.incr("hygiene_list_errors")
                level = logging.WARNING if isinstance(exc, TemporaryError) else logging.ERROR
                log.log(level, "runner hygiene: cannot list the runners of %s: %s", name, exc)
                continue
            report.scopes.append(name)
            runners += listed
            owner.update((runner.id, scope) for runner in listed)
        if failed and len(failed) == len(scopes) and isinstance(failed[-1], TemporaryError):
            raise failed[-1]
        return runners, owner, not failed

    # -- act ----------------------------------------------------------------------------

    def _delete(
        self, plan: HygienePlan, owner: dict[int, RunnerScope], report: HygieneReport
    ) -> None:
        for item in plan.delete[: self.max_deletes]:
            try:
                self.tokens.delete_runner(owner[item.runner_id], item.runner_id)
            except PermanentError as exc:
                if "busy" in str(exc):
                    # It took a job between the listing and now: exactly what must not go.
                    log.info("runner %s is busy; not deleted: %s", item.name, exc)
                    report.busy.append(item.name)
                    self.store.incr("hygiene_busy_skipped")
                else:
                    log.error("runner hygiene: cannot delete runner %s: %s", item.name, exc)
                    report.failed.append(item.name)
                    self.store.incr("hygiene_delete_errors")
                continue
            except TemporaryError as exc:
                log.warning("runner hygiene: deleting %s failed, next pass: %s", item.name, exc)
                self.store.incr("hygiene_delete_errors")
                break  # GitHub is slow or limiting us: stop, the next pass goes on
            log.info("deleted runner %s (id %s): %s", item.name, item.runner_id, item.reason)
            report.deleted.append(item.name)
        if report.deleted:
            self.store.incr("hygiene_deleted_runners", len(report.deleted))
        if len(plan.delete) > self.max_deletes:
            log.info(
                "runner hygiene: %d offline runners left for the next pass",
                len(plan.delete) - self.max_deletes,
            )

    def _flag(self, plan: HygienePlan, report: HygieneReport) -> None:
        for flag in plan.never_appeared:
            report.never_appeared.append(flag.vm_id)
            if self.store.once(f"hygiene-flag:{flag.vm_id}:{flag.reserved_at!r}", FLAG_MEMORY_S):
                self.store.incr("runner_never_appeared")
                log.warning(
                    "VM %s (reserved for job %s): %s",
                    flag.vm_id,
                    flag.reserved_job,
                    flag.reason,
                )
