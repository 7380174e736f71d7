"""Celery's logging, made ours: Celery sets up its own handlers, so the redaction filter
is installed again after it does, and each task's records carry its job or VM id."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

from migctl.redact import bind, install, unbind

# The first argument of these tasks is a job id; of the others that take one, a VM id.
_JOB_TASKS = {"migctl.assign_job"}
_VM_TASKS = {"migctl.assign_vm", "migctl.agent_event", "migctl.command_acked", "migctl.agent_state"}
_tokens: dict[str, Any] = {}


def _pool_id() -> str:
    from migctl.runtime import settings

    return settings().pool.id


@after_setup_logger.connect
def _root(logger: logging.Logger, **_: Any) -> None:
    install(_pool_id(), logger)


@after_setup_task_logger.connect
def _task(logger: logging.Logger, **_: Any) -> None:
    install(_pool_id(), logger)


@task_prerun.connect
def _bind(task_id: str, task: Any, args: tuple[Any, ...] = (), **_: Any) -> None:
    first = str(args[0]) if args else ""
    if task.name in _JOB_TASKS:
        _tokens[task_id] = bind(job_id=first)
    elif task.name in _VM_TASKS:
        _tokens[task_id] = bind(vm_id=first)


@task_postrun.connect
def _unbind(task_id: str, **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        try:
            unbind(token)
        except ValueError:  # reset from another context: harmless, the task is over
            pass
