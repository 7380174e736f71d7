"""A working in-memory `Intake` for tests and the simulator, with fault injection."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from migctl.bridge.messages import JobEvent
from migctl.bridge.ports import Outcome
from migctl.domain.errors import TemporaryError


@dataclass(frozen=True)
class DeadLetter:
    raw: bytes
    attributes: dict[str, str]
    reason: str
    message_id: str


@dataclass
class _Faults:
    times: int = 0
    error: Exception | None = None

    def maybe_raise(self, what: str) -> None:
        if self.times <= 0:
            return
        self.times -= 1
        # delay=0: tests must not wait out a back-off timer.
        raise self.error or TemporaryError(f"{what}: store unavailable (simulated)", delay=0.0)


@dataclass
class MemoryIntake:
    """Dedupes on (job_id, action); a `queued` event for a new job is CREATED, a later action
    of a known job UPDATED, any other action of an unknown job IGNORED.

    `before_accept` runs first in every `accept` call (e.g. to block on an event in tests).
    """

    before_accept: Callable[[JobEvent], None] | None = None
    events: list[JobEvent] = field(default_factory=list)  # every event accept() was given
    outcomes: list[tuple[JobEvent, Outcome]] = field(default_factory=list)
    jobs: dict[str, JobEvent] = field(default_factory=dict)  # job_id -> latest event
    dead_letters: dict[str, DeadLetter] = field(default_factory=dict)  # by message_id
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _accept_faults: _Faults = field(default_factory=_Faults)
    _dead_letter_faults: _Faults = field(default_factory=_Faults)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_accept(self, times: int = 1, error: Exception | None = None) -> None:
        """The next `times` accept calls raise `error` (default: a TemporaryError)."""
        with self._lock:
            self._accept_faults = _Faults(times, error)

    def fail_dead_letter(self, times: int = 1, error: Exception | None = None) -> None:
        """The next `times` dead_letter calls raise `error` (default: a TemporaryError)."""
        with self._lock:
            self._dead_letter_faults = _Faults(times, error)

    def accept(self, event: JobEvent) -> Outcome:
        if self.before_accept is not None:
            self.before_accept(event)
        with self._lock:
            self.events.append(event)
            self._accept_faults.maybe_raise("accept")
            key = (event.job_id, event.action)
            if key in self._seen:
                outcome = Outcome.DUPLICATE
            elif event.job_id in self.jobs:
                outcome = Outcome.UPDATED
            elif event.action == "queued":
                outcome = Outcome.CREATED
            else:
                outcome = Outcome.IGNORED
            if outcome is not Outcome.DUPLICATE:
                self._seen.add(key)
            if outcome in (Outcome.CREATED, Outcome.UPDATED):
                self.jobs[event.job_id] = event
            self.outcomes.append((event, outcome))
            return outcome

    def dead_letter(
        self, raw: bytes, attributes: Mapping[str, str], reason: str, message_id: str
    ) -> None:
        with self._lock:
            self._dead_letter_faults.maybe_raise("dead_letter")
            self.dead_letters[message_id] = DeadLetter(raw, dict(attributes), reason, message_id)

    def deliveries(self, job_id: str) -> int:
        """How many times accept() was called for this job, failures included."""
        with self._lock:
            return sum(1 for e in self.events if e.job_id == job_id)
