"""The simulated world around the controller, on a virtual clock: a discrete-event loop
with the MIG's timings, the agents, and GitHub's dispatcher. Nothing sleeps; a day of
jobs replays in a second or two.

GitHub is modelled as it behaves: a queued job goes to ANY online idle runner whose
labels cover it (oldest job first), whichever VM the controller reserved for it; the
controller learns which from `job_started`. Runners are ephemeral: one job each.

Every run starts from an empty pool at t=0 and ends at the trace's horizon (or when
its last job ends, if later). VM-hours "running" count from the create/start/resume
call until the instance is down (GCE bills from boot, so a few seconds per start are
counted high); "stopped" and "suspended" count the time down, when disks (and, when
suspended, memory) are still paid for.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from migctl.domain.model import covers
from migctl.simulate.controller import Controller
from migctl.simulate.policy import Policy, Timings
from migctl.simulate.trace import Trace

SWEEP_S = 5.0  # beat: sweep every 5 x scheduler.poll_interval (1 s)
RECONCILE_S = 10.0  # beat: reconcile (idle stop + provision) every 10 s
GIVE_UP_S = 7 * 86400.0  # past the horizon with jobs still queued: a policy that cannot run them

# Event kinds; at one instant they run in this order (ticks last, after the world moved).
ARRIVE, READY, REGISTERING, REGISTERED, START, COMPLETE, DOWN, DRAINED, TICK = range(9)

PHASES = ("running", "stopped", "suspended")


@dataclass
class Run:
    """What one policy did with one trace: the raw material of the report."""

    policy: Policy
    waits: list[tuple[float, float]]  # (arrival, wait) per job that started, arrival order
    vm_seconds: dict[str, float]
    calls: Counter[str]
    vm_actions: Counter[str]
    decisions: Counter[str]
    events: Counter[str]
    timeline: list[tuple[float, int, int, int, int, int]] = field(repr=False)
    """(time, running, busy, stopped, suspended, waiting jobs) at each change."""
    end: float = 0.0
    unfinished: int = 0
    peak_vms: int = 0


class Simulation:
    def __init__(
        self,
        trace: Trace,
        policy: Policy,
        timings: Timings,
        labels: tuple[str, ...],
        seed: int = 0,
    ) -> None:
        self.trace = trace
        self.timings = timings
        self._rng = random.Random(seed)
        self.ctl = Controller(policy, self, labels)
        self._heap: list[tuple[float, int, int, str, str]] = []
        self._seq = 0
        self._jobs = {job.id: job for job in trace.jobs}
        # GitHub's side
        self._pending: list[str] = []  # jobs no runner has taken, oldest first
        self._idle: dict[str, tuple[str, ...]] = {}  # online idle runner (VM id) -> labels
        self._handoff: dict[str, float] = {}  # VM id -> when its runner starts the job
        # the cloud's side, for billing
        self._phase: dict[str, str] = {}
        self._since: dict[str, float] = {}
        self._count: Counter[str] = Counter()
        self._seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._busy = 0
        self._waiting = 0
        self._waits: list[tuple[float, float]] = []
        self._timeline: list[tuple[float, int, int, int, int, int]] = []
        self._peak = 0

    def _push(self, time: float, kind: int, a: str = "", b: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, kind, self._seq, a, b))

    def _delay(self, step: str) -> float:
        nominal = float(getattr(self.timings, step))
        jitter = self.timings.jitter
        return nominal * self._rng.uniform(1.0 - jitter, 1.0 + jitter) if jitter else nominal

    # -- World: what the controller asks -------------------------------------------------------

    def vm_action(self, action: str, ids: Sequence[str], now: float) -> None:
        for vm_id in ids:
            if action in ("create", "start", "resume"):
                self._set_phase(vm_id, "running", now)
                self._push(now + self._delay(action), READY, vm_id)
            else:
                self._push(now + self._delay(action), DOWN, vm_id, action)

    def register(self, vm_id: str, command_id: str, now: float) -> None:
        self._push(now, REGISTERING, vm_id)
        self._push(now + self._delay("register"), REGISTERED, vm_id, command_id)

    def drain(self, vm_id: str, now: float) -> None:
        self._idle.pop(vm_id, None)
        # A runner GitHub already handed a job keeps it: the drain ends after it started.
        done = max(now + self._delay("register"), self._handoff.get(vm_id, 0.0))
        self._push(done, DRAINED, vm_id)

    # -- billing and the timeline ---------------------------------------------------------------

    def _set_phase(self, vm_id: str, phase: str, now: float) -> None:
        old = self._phase.get(vm_id)
        if old is not None:
            self._seconds[old] += now - self._since[vm_id]
            self._count[old] -= 1
        if phase == "gone":
            self._phase.pop(vm_id, None)
            self._since.pop(vm_id, None)
            return
        self._phase[vm_id] = phase
        self._since[vm_id] = now
        self._count[phase] += 1
        self._peak = max(self._peak, sum(self._count.values()))

    def _sample(self, now: float) -> None:
        row = (
            now,
            self._count["running"],
            self._busy,
            self._count["stopped"],
            self._count["suspended"],
            self._waiting,
        )
        if not self._timeline or self._timeline[-1][1:] != row[1:]:
            if self._timeline and self._timeline[-1][0] == now:
                self._timeline[-1] = row
            else:
                self._timeline.append(row)

    # -- GitHub ---------------------------------------------------------------------------------

    def _github(self, now: float) -> None:
        """Hand the oldest queued jobs to idle runners that cover their labels."""
        while self._idle and self._pending:
            pick = None
            for i, job_id in enumerate(self._pending):
                labels = self._jobs[job_id].labels
                runner = next((vm for vm, have in self._idle.items() if covers(have, labels)), None)
                if runner is not None:
                    pick = (i, job_id, runner)
                    break
            if pick is None:
                return
            i, job_id, runner = pick
            del self._pending[i]
            del self._idle[runner]
            start = now + self._delay("pickup")
            self._handoff[runner] = start
            self._push(start, START, runner, job_id)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> Run:
        ctl = self.ctl
        for job in self.trace.jobs:
            self._push(job.arrival, ARRIVE, job.id)
        self._push(0.0, TICK, "reconcile")
        self._push(0.0, TICK, "sweep")
        horizon = self.trace.horizon
        total, done, last_done = len(self.trace.jobs), 0, 0.0
        while self._heap:
            now, kind, _, a, b = heapq.heappop(self._heap)
            if done == total and now > horizon:
                break
            if now > horizon + GIVE_UP_S:
                break
            if kind == ARRIVE:
                self._pending.append(a)
                self._waiting += 1
                ctl.job_arrived(self._jobs[a], now)
            elif kind == READY:
                ctl.vm_ready(a, now)
            elif kind == REGISTERING:
                ctl.registering(a, now)
            elif kind == REGISTERED:
                self._idle[a] = ctl.vms[a].labels
                ctl.runner_registered(a, b, now)
            elif kind == START:
                self._handoff.pop(a, None)
                self._busy += 1
                self._waiting -= 1
                self._waits.append((self._jobs[b].arrival, now - self._jobs[b].arrival))
                ctl.job_started(a, b, now)
                self._push(now + self._jobs[b].duration, COMPLETE, a, b)
            elif kind == COMPLETE:
                self._busy -= 1
                done += 1
                last_done = now
                ctl.job_completed(a, b, now)
            elif kind == DOWN:
                self._set_phase(a, {"stop": "stopped", "suspend": "suspended"}.get(b, "gone"), now)
                ctl.vm_down(a, b, now)
            elif kind == DRAINED:
                ctl.drained(a, now)
            else:
                ctl.periodic(a, now)
                self._push(now + (SWEEP_S if a == "sweep" else RECONCILE_S), TICK, a)
            ctl.run_tasks(now)
            self._github(now)
            self._sample(now)
        end = max(horizon, last_done)
        for vm_id in list(self._phase):
            self._set_phase(vm_id, "gone", end)
        self._waits.sort()
        return Run(
            policy=ctl.policy,
            waits=self._waits,
            vm_seconds=dict(self._seconds),
            calls=ctl.calls,
            vm_actions=ctl.vm_actions,
            decisions=ctl.decisions,
            events=ctl.events,
            timeline=self._timeline,
            end=end,
            unfinished=total - done,
            peak_vms=self._peak,
        )


def simulate(
    trace: Trace, policy: Policy, timings: Timings, labels: tuple[str, ...], seed: int = 0
) -> Run:
    """Replay `trace` under `policy`, from an empty pool at t=0. `seed` drives the timing
    jitter only (none by default): the same inputs give the same run."""
    return Simulation(trace, policy, timings, labels, seed).run()
