"""The Dispatcher port on Celery: follow-up work becomes tasks on the pool's queues."""

from __future__ import annotations

from typing import Any

from migctl.settings import Settings
from migctl.worker.queues import queue_for

# Many assignments may ask for provisioning at once; one pass a second is plenty, and
# the pass reads the whole queue anyway.
PROVISION_DEBOUNCE_S = 1.0


class CeleryDispatcher:
    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.settings = settings
        self.pool_id = settings.pool.id
        self._app = app

    @property
    def app(self) -> Any:
        if self._app is None:
            from migctl.worker.app import get_app

            self._app = get_app()
        return self._app

    def send(self, name: str, *args: Any, countdown: float | None = None) -> None:
        self.app.send_task(
            name, args=list(args), queue=queue_for(self.pool_id, name), countdown=countdown
        )

    def assign_job(self, job_id: str) -> None:
        self.send("migctl.assign_job", job_id)

    def assign_vm(self, vm_id: str) -> None:
        self.send("migctl.assign_vm", vm_id)

    def provision(self) -> None:
        from migctl.runtime import runtime

        if runtime().store.once("provision", PROVISION_DEBOUNCE_S):
            self.send("migctl.provision")


class RecordingDispatcher:
    """The Dispatcher port's in-memory fake: records the follow-up work it is asked for
    (tests, benchmarks, and services run without Celery)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def assign_job(self, job_id: str) -> None:
        self.calls.append(("assign_job", job_id))

    def assign_vm(self, vm_id: str) -> None:
        self.calls.append(("assign_vm", vm_id))

    def provision(self) -> None:
        self.calls.append(("provision", ""))
