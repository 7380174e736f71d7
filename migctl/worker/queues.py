"""Queue names. They carry the pool id, so two pools sharing one Redis never consume
each other's tasks."""

from __future__ import annotations

ROUTES = {
    "migctl.assign_job": "assign",
    "migctl.assign_vm": "assign",
    "migctl.provision": "vm",
    "migctl.sync": "vm",
    "migctl.agent_event": "events",
    "migctl.command_acked": "events",
    "migctl.agent_state": "events",
    "migctl.sweep": "reconcile",
    "migctl.reconcile": "reconcile",
    "migctl.canary": "reconcile",
    "migctl.hygiene": "reconcile",
    "migctl.recover": "vm",
}
KINDS = ("assign", "vm", "events", "reconcile")


def queue(pool_id: str, kind: str) -> str:
    return f"migctl.{pool_id}.{kind}"


def queue_for(pool_id: str, task_name: str) -> str:
    return queue(pool_id, ROUTES[task_name])
