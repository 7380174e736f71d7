"""Thin Celery tasks: explicit names, ids as arguments, no secrets in or out, no logic.

Every task is idempotent (acks_late redelivers after a crash). A TemporaryError is
retried after its delay; anything else is a bug and is logged loudly by Celery.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task, shared_task

from migctl.domain.errors import TemporaryError
from migctl.domain.model import AgentState
from migctl.runtime import runtime

RETRIES = 20


def _retrying(task: Task, func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except TemporaryError as exc:
        raise task.retry(exc=exc, countdown=max(exc.delay, 0.2), max_retries=RETRIES) from None


@shared_task(name="migctl.assign_job", bind=True)
def assign_job(self: Task, job_id: str) -> str:
    return _retrying(self, lambda: runtime().assigner.assign_job(job_id).result)


@shared_task(name="migctl.assign_vm", bind=True)
def assign_vm(self: Task, vm_id: str) -> str:
    return _retrying(self, lambda: runtime().assigner.assign_vm(vm_id).result)


@shared_task(name="migctl.provision", bind=True)
def provision(self: Task) -> dict[str, list[str]]:
    rt = runtime()
    rt.store.forget("provision")
    return _retrying(self, lambda: rt.pool.provision().actions)


@shared_task(name="migctl.agent_event", bind=True)
def agent_event(self: Task, vm_id: str, kind: str, data: dict[str, str], at: float = 0.0) -> str:
    return _retrying(self, lambda: runtime().events.event(vm_id, kind, data, at))


@shared_task(name="migctl.command_acked", bind=True)
def command_acked(self: Task, vm_id: str, command_id: str, success: bool, message: str) -> str:
    return _retrying(
        self, lambda: runtime().events.command_acked(vm_id, command_id, success, message)
    )


@shared_task(name="migctl.agent_state", bind=True)
def agent_state(self: Task, vm_id: str, state: str) -> str:
    parsed = AgentState.parse(state)
    if parsed is AgentState.NONE:
        return "ignored: unknown agent state"  # never overwrite what we know with nothing
    return _retrying(self, lambda: runtime().events.agent_state(vm_id, parsed))


@shared_task(name="migctl.sync", bind=True)
def sync(self: Task) -> dict[str, list[str]]:
    return _retrying(self, lambda: runtime().pool.sync().actions)


@shared_task(name="migctl.sweep", bind=True)
def sweep(self: Task) -> dict[str, list[str]]:
    return _retrying(self, lambda: runtime().pool.sweep().actions)


@shared_task(name="migctl.reconcile", bind=True)
def reconcile(self: Task) -> dict[str, list[str]]:
    rt = runtime()

    def run() -> dict[str, list[str]]:
        actions = dict(rt.pool.idle_stop().actions)
        actions.update(rt.pool.provision().actions)
        return actions

    return _retrying(self, run)


@shared_task(name="migctl.hygiene", bind=True)
def hygiene(self: Task) -> dict[str, list[str]]:
    """Runner hygiene: remove our offline runners that no live VM owns (never busy ones)."""
    return _retrying(self, lambda: runtime().hygiene.run().actions)


@shared_task(name="migctl.recover", bind=True)
def recover(self: Task) -> dict[str, list[str]]:
    """After a state wipe (beat noticed): VMs from the provider, queued jobs from GitHub."""
    return _retrying(self, lambda: runtime().recovery.run().actions)


@shared_task(name="migctl.canary")
def canary() -> float:
    """Proves a worker consumes: /ready checks how long ago this last ran."""
    now = time.time()
    runtime().store.r.set(runtime().store.k.prefix + "canary", repr(now), ex=3600)
    return now
