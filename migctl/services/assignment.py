"""Giving queued jobs runners: claim a free VM atomically, then send `register_runner`.

Two entry points, both idempotent: `assign_job` (a job arrived or came back) and
`assign_vm` (a VM became free: the agent said ready/idle, or a reservation was
released). Neither waits for the world: with no free VM it asks for provisioning and
returns; the new VM's `ready` finishes the job's path.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.domain.errors import PermanentError, RunnerNameTaken
from migctl.domain.model import Job, JobState, Vm
from migctl.domain.scheduler import Limits, candidates
from migctl.domain.states import is_free, needs_registration
from migctl.domain.transitions import Change, requeue
from migctl.faults import pause
from migctl.ports import Clock, Dispatcher, RunnerScope, SystemClock, TokenIssuer
from migctl.settings import Settings

log = logging.getLogger(__name__)

# A registration token lives an hour; a command older than this is not worth delivering.
COMMAND_TTL_S = 3000
CLAIM_ATTEMPTS = 4


@dataclass(frozen=True)
class Outcome:
    result: str  # assigned / reserved / deferred / noop / limit
    vm_id: str = ""
    detail: str = ""


def limits_of(settings: Settings) -> Limits:
    vm = settings.vm_manager
    return Limits(
        max_vms=vm.max_vms,
        max_scale_up_per_minute=vm.max_scale_up_per_minute,
        max_concurrent_assignments=settings.scheduler.max_concurrent_assignments,
    )


class Assigner:
    def __init__(
        self,
        store: RedisStore,
        tokens: TokenIssuer,
        settings: Settings,
        dispatch: Dispatcher,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.settings = settings
        self.dispatch = dispatch
        self.clock = clock or SystemClock()
        self.limits = limits_of(settings)

    def assign_job(self, job_id: str) -> Outcome:
        for _ in range(CLAIM_ATTEMPTS):
            snap = self.store.snapshot(job_id)
            job = snap.job
            if job is None:
                return Outcome("noop", detail="unknown job")
            if job.state is JobState.ASSIGNED:
                return self._resume_registration(job)
            if job.state is not JobState.QUEUED:
                return Outcome("noop", detail=f"job is {job.state}")
            free = [(vm, rev) for vm, rev in snap.free if is_free(vm)]
            found = {vm.id for vm in candidates(job, [vm for vm, _ in free])}
            ordered = [(vm, rev) for vm, rev in free if vm.id in found]
            if not ordered:
                self.dispatch.provision()
                return self._deferred(job.id, "no free VM whose labels cover the job; provisioning")
            claimed, why = self.store.claim(
                job.id,
                snap.job_rev,
                ordered,
                now=self.clock.now(),
                max_inflight=self.limits.max_concurrent_assignments,
            )
            if claimed:
                return self._after_claim(job, *claimed)
            if why == "job":
                return Outcome("noop", detail="job changed meanwhile")
            if why == "limit":
                return self._deferred(
                    job.id, "max_concurrent_assignments registrations in flight", "limit"
                )
        self.dispatch.provision()
        return self._deferred(job.id, "the free VMs were taken by other assignments")

    def _deferred(self, job_id: str, reason: str, result: str = "deferred") -> Outcome:
        self.store.mark(
            job_id, first=False, decision=f"{result}: {reason}", decided_at=self.clock.now()
        )
        return Outcome(result, detail=reason)

    def assign_vm(self, vm_id: str) -> Outcome:
        """A VM may be free: give it the oldest queued job its labels cover."""
        got = self.store.get_vm(vm_id)
        if got is None or not is_free(got[0]):
            return Outcome("noop", detail="VM not free")
        vm, rev = got
        for job, job_rev in self.store.queued(limit=50):
            if not candidates(job, [vm]):
                continue
            claimed, why = self.store.claim(
                job.id,
                job_rev,
                [(vm, rev)],
                now=self.clock.now(),
                max_inflight=self.limits.max_concurrent_assignments,
            )
            if claimed:
                return self._after_claim(job, *claimed)
            if why in ("none", "limit"):
                return Outcome(why if why == "limit" else "noop", detail=f"VM {why}")
        return Outcome("noop", detail="no queued job for this VM")

    def _after_claim(self, job: Job, vm: Vm, rev: int) -> Outcome:
        pause("assign.after_claim")
        if vm.runner_registered:
            # An idle registered runner: GitHub hands it a matching job by itself.
            now = self.clock.now()
            self.store.mark(
                job.id,
                first=False,
                decision=f"reserved: idle runner on {vm.id}",
                decided_at=now,
                vm=vm.id,
            )
            return Outcome("reserved", vm_id=vm.id)
        return self._register(job, vm, rev)

    def _resume_registration(self, job: Job) -> Outcome:
        """A worker died between claim and send: finish what it started."""
        got = self.store.get_vm(job.vm_id) if job.vm_id else None
        if got is None:
            return Outcome("noop", detail="assigned; VM unknown")
        vm, rev = got
        if vm.reserved_job == job.id and needs_registration(vm):
            return self._register(job, vm, rev)
        return Outcome("noop", detail="already assigned")

    def _register(self, job: Job, vm: Vm, rev: int) -> Outcome:
        job_id = job.id
        try:
            command = self._registration_command(job, vm)
        except PermanentError as exc:
            self._registration_failed(job_id, vm.id, str(exc))
            return Outcome("deferred", vm_id=vm.id, detail=f"registration failed: {exc}")
        now = self.clock.now()
        for _ in range(CLAIM_ATTEMPTS):
            if not needs_registration(vm):
                return Outcome("noop", vm_id=vm.id, detail="a runner is registered or on its way")
            # A job_started elsewhere may have moved another job's reservation onto this
            # VM meanwhile: its runner is still needed, for whichever job it now holds.
            job_id = vm.reserved_job
            try:
                self.store.save(
                    Change(
                        vms={
                            vm.id: vm.with_(cmd_id=command["id"], reserved_at=now, cmd_sent_at=now)
                        }
                    ),
                    {f"vm:{vm.id}": rev},
                    commands=[(vm.id, command, COMMAND_TTL_S)],
                    timeline={
                        job_id: {
                            "decision": f"assigned: {vm.id}",
                            "decided_at": now,
                            "vm": vm.id,
                            "vm_ready_at": vm.last_active,
                            "command_sent_at": now,
                        }
                    },
                )
                return Outcome("assigned", vm_id=vm.id)
            except Conflict:
                got_vm = self.store.get_vm(vm.id)
                if got_vm is None:
                    return Outcome("noop", detail="VM vanished")
                vm, rev = got_vm
        return Outcome("deferred", vm_id=vm.id, detail="VM kept changing")

    def _registration_command(self, job: Job, vm: Vm) -> dict[str, Any]:
        gh = self.settings.github_app
        scope = RunnerScope(
            org=job.org or gh.org,
            repo=job.repo if gh.runner_scope == "repo" else "",
            installation_id=job.installation_id,
        )
        labels = list(vm.labels or self.settings.pool.labels)
        jit = gh.use_jit and "jit" in vm.capabilities
        try:
            creds = self.tokens.runner_credentials(scope, vm.id, labels, jit)
        except RunnerNameTaken:
            # A JIT runner minted for this VM earlier and never started (its command
            # expired, or its reservation moved) still holds the name: remove it if it
            # is idle and offline, then mint again, once.
            self._remove_stale_runner(scope, vm.id)
            creds = self.tokens.runner_credentials(scope, vm.id, labels, jit)
        now = self.clock.now()
        params = {
            "runner_url": creds.runner_url,
            "runner_group": creds.runner_group,
            "runner_name": vm.id,
        }
        if creds.jit_config:
            params["jit_config"] = creds.jit_config
        if creds.registration_token:
            params["registration_token"] = creds.registration_token
        expires = creds.expires_at - 60 if creds.expires_at else now + COMMAND_TTL_S
        return {
            "id": uuid.uuid4().hex,
            "type": "register_runner",
            "string_params": params,
            "string_array_params": labels,
            "created_at": int(now),
            "expires_at": expires,
            "job_id": job.id,
        }

    def _remove_stale_runner(self, scope: RunnerScope, name: str) -> None:
        for runner in self.tokens.list_runners(scope):
            if runner.name == name and not runner.busy and runner.status != "online":
                log.info("removing stale runner %s (id %d) to register it again", name, runner.id)
                self.tokens.delete_runner(scope, runner.id)

    def _registration_failed(self, job_id: str, vm_id: str, reason: str) -> None:
        log.error("runner registration for job %s on %s failed: %s", job_id, vm_id, reason)
        for _ in range(CLAIM_ATTEMPTS):
            got_job, got_vm = self.store.get_job(job_id), self.store.get_vm(vm_id)
            if got_job is None or got_vm is None:
                return
            (job, job_rev), (vm, vm_rev) = got_job, got_vm
            if job.state is not JobState.ASSIGNED or job.vm_id != vm_id:
                return
            change = Change()
            new = change.job(
                requeue(job, self.clock.now(), reason, self.settings.scheduler.max_retries)
            )
            change.vm(vm.with_(reserved_job="", reserved_at=0.0))
            try:
                self.store.save(
                    change,
                    {f"job:{job.id}": job_rev, f"vm:{vm.id}": vm_rev},
                    counters={"failed_jobs": 1} if new.state is JobState.FAILED else None,
                )
            except Conflict:
                continue
            # Not re-dispatched at once: the failure (bad key, GitHub down) is likely to
            # repeat; the queue sweep retries it on its next pass.
            return
