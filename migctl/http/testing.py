"""A pool with a known state, written straight to Redis: for the ops tests, the status
page screenshot and trying the CLI without a running world.

`seed_world` writes six VMs in six states, jobs in every state with timelines, counters,
dead letters, gateway sessions and a fresh worker canary, all relative to `now`.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlparse

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.settings import Settings

POOL = "pool-ops"
LABELS = ("self-hosted", "linux", "x64")
ADMIN_TOKEN = "test-admin-token-0123456789"
SECRET_IN_OUTBOX = "AREGISTRATIONTOKENNEVERSHOWN0"


def settings_for(redis_url: str, pool: str = POOL, admin_token: str = ADMIN_TOKEN) -> Settings:
    return Settings(**config_for(redis_url, pool, admin_token))


def config_for(redis_url: str, pool: str = POOL, admin_token: str = ADMIN_TOKEN) -> dict[str, Any]:
    """The settings tree as YAML data (for a --config file)."""
    url = urlparse(redis_url)
    endpoint = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 6379,
        "db": int(url.path.strip("/") or 0),
    }
    return {
        "pool": {"id": pool, "labels": list(LABELS)},
        "vm_manager": {"provider": "sim", "min_ready_vms": 1, "max_vms": 10},
        "scheduler": {"assignment_timeout": "300s"},
        "github_app": {"app_id": "1", "private_key": "unused"},
        "pubsub": {"source": "local"},
        "redis": {"jobs": endpoint, "vm_status": endpoint},
        "server": {"admin_token": admin_token},
    }


def _vm(vm_id: str, now: float, **fields: Any) -> Vm:
    base: dict[str, Any] = {
        "labels": LABELS,
        "infra": InfraStatus.RUNNING,
        "agent": AgentState.IDLE,
        "connected": True,
        "runner_registered": True,
        "created_at": now - 3600,
        "state_since": now - 3000,
        "last_heartbeat": now - 2,
        "last_active": now - 30,
    }
    base.update(fields)
    return Vm(id=vm_id, **base)


def _job(job_id: str, now: float, state: JobState, received_ago: float, **fields: Any) -> Job:
    base: dict[str, Any] = {
        "labels": ("self-hosted", "linux"),
        "state": state,
        "pool_id": POOL,
        "org": "acme",
        "repo": "acme/web",
        "run_id": f"7{job_id}",
        "received_at": now - received_ago,
        "updated_at": now - 1,
    }
    base.update(fields)
    return Job(id=job_id, **base)


def seed_world(store: RedisStore, now: float) -> dict[str, Any]:
    """Write the known state; returns the ids, for assertions."""
    vms = [
        _vm("runner-ready-a1", now, agent=AgentState.READY, runner_registered=False),
        _vm("runner-busy-b2", now, agent=AgentState.JOB_RUNNING, job_id="1001"),
        _vm(
            "runner-rsvd-c3",
            now,
            agent=AgentState.READY,
            runner_registered=False,
            reserved_job="1002",
            reserved_at=now - 15,
            cmd_id="cmd-register-1002",
        ),
        _vm(
            "runner-boot-d4",
            now,
            infra=InfraStatus.CREATING,
            agent=AgentState.NONE,
            lifecycle=Lifecycle.STARTING,
            connected=False,
            runner_registered=False,
            state_since=now - 40,
            last_heartbeat=0.0,
            last_active=0.0,
            created_at=now - 40,
        ),
        _vm(
            "runner-stop-e5",
            now,
            infra=InfraStatus.STOPPED,
            agent=AgentState.NONE,
            connected=False,
            runner_registered=False,
            last_heartbeat=now - 900,
        ),
        _vm("runner-sick-f6", now, unhealthy=True, last_heartbeat=now - 90),
    ]
    jobs = [
        _job(
            "1001",
            now,
            JobState.RUNNING,
            100,
            vm_id="runner-busy-b2",
            assigned_at=now - 95,
            started_at=now - 88,
        ),
        _job("1002", now, JobState.ASSIGNED, 20, vm_id="runner-rsvd-c3", assigned_at=now - 15),
        _job("1003", now, JobState.QUEUED, 10),
        _job("1004", now, JobState.QUEUED, 5, labels=("self-hosted", "gpu")),
        _job(
            "900",
            now,
            JobState.COMPLETED,
            600,
            vm_id="runner-ready-a1",
            assigned_at=now - 598,
            started_at=now - 590,
            finished_at=now - 500,
            conclusion="success",
        ),
        _job(
            "901",
            now,
            JobState.FAILED,
            400,
            retries=4,
            finished_at=now - 300,
            reason="registration on runner-x failed: 422; gave up after 3 retries",
        ),
        _job(
            "902",
            now,
            JobState.CANCELLED,
            200,
            finished_at=now - 150,
            conclusion="cancelled",
            reason="GitHub reports it cancelled",
        ),
    ]
    command = {
        "id": "cmd-register-1002",
        "type": "register_runner",
        "string_params": {"registration_token": SECRET_IN_OUTBOX, "runner_name": "runner-rsvd-c3"},
        "created_at": int(now - 14),
        "expires_at": now + 3000,
        "job_id": "1002",
    }
    store.save(
        Change(jobs={j.id: j for j in jobs}, vms={v.id: v for v in vms}),
        {},
        commands=[("runner-rsvd-c3", command, 3600)],
        counters={
            "assigned_jobs": 12,
            "failed_jobs": 1,
            "started_vms": 3,
            "created_vms": 5,
            "completed_jobs": 9,
            "cancelled_jobs": 1,
            "provider_errors_CapacityExhausted": 2,
            "provider_errors_RateLimited": 1,
        },
        timeline={
            "1001": {
                "received": now - 100,
                "queued": now - 99.9,
                "decision": "assigned: runner-busy-b2",
                "decided_at": now - 95,
                "vm": "runner-busy-b2",
                "vm_ready_at": now - 97,
                "command_sent_at": now - 94.5,
                "registered_at": now - 91,
            },
            "1002": {
                "received": now - 20,
                "queued": now - 19.9,
                "decision": "assigned: runner-rsvd-c3",
                "decided_at": now - 15,
                "vm": "runner-rsvd-c3",
                "command_sent_at": now - 14,
            },
            "1003": {
                "received": now - 10,
                "queued": now - 9.9,
                "decision": "deferred: no free VM whose labels cover the job; provisioning",
                "decided_at": now - 9.5,
            },
            "900": {"received": now - 600, "queued": now - 599.9, "decided_at": now - 598},
        },
    )
    for i, reason in enumerate(("message is not JSON", "labels: field required")):
        store.dead_letter(  # oldest first: the list keeps the newest at its head
            {
                "at": now - 120 + 60 * i,
                "reason": reason,
                "message_id": f"msg-{i + 1}",
                "attributes": {},
                "size": 9,
                "data_b64": base64.b64encode(b"{not json").decode(),
                "truncated": False,
            }
        )
    r = store.r
    # Two live replicas, and one killed a minute ago whose entry is not pruned yet: its
    # streams are gone and must not count.
    r.hset(store.k.prefix + "gateways", mapping={"gw-a": 3, "gw-b": 1, "gw-dead": 500})
    seen: dict[Any, Any] = {"gw-a": now - 0.5, "gw-b": now - 1, "gw-dead": now - 60}
    r.hset(store.k.prefix + "gateways:seen", mapping=seen)
    r.set(store.k.prefix + "canary", repr(now - 5), ex=3600)
    store.set_bridge_stats({"received": 20, "acked": 18, "dead_lettered": 2, "errors": 0})
    return {
        "vms": [vm.id for vm in vms],
        "jobs": {job.id: job.state.value for job in jobs},
        "command": json.dumps(command),
    }
