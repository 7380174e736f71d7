"""The controller's invariants under any interleaving, against a real Redis (DB 15 only).

A hypothesis state machine wires the real RedisStore, Assigner, AgentEvents, RedisIntake
and Pool to an in-memory MIG, a fake token issuer, model agents and a model of GitHub
that hands a queued job to ANY registered idle runner whose labels cover it. Follow-up
work (what the Dispatcher would make Celery tasks of), agent events and acks, and
Pub/Sub job events wait in one list and run in any order, twice, or not at all; that
is Celery's and Pub/Sub's reordering and redelivery. After every step the state in
Redis must be consistent; at the end everything is driven to completion and every job
must end terminal exactly once, as GitHub saw it.

A few focused scenarios at the bottom replay, step by step, interleavings the machine
found or that need two workers at once.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import migctl.services.pool as pool_module
from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.bridge.messages import JobEvent
from migctl.domain.errors import NotFound, PermanentError, TemporaryError
from migctl.domain.model import (
    AgentState,
    InfraStatus,
    Job,
    JobState,
    Lifecycle,
    Vm,
    VmState,
    covers,
)
from migctl.domain.states import is_free
from migctl.domain.transitions import Change
from migctl.ports import ProviderVm, RunnerCredentials, RunnerInfo, RunnerScope
from migctl.services.assignment import Assigner
from migctl.services.events import AgentEvents
from migctl.services.intake import RedisIntake
from migctl.services.pool import Pool
from migctl.settings import Settings

pytestmark = pytest.mark.integration

POOL = "sm"
T0 = 1_700_000_000.0
POOL_LABELS = ("self-hosted", "linux", "x64")
JOB_LABELS: list[tuple[str, ...]] = [
    ("self-hosted",),
    ("self-hosted", "Linux"),
    ("SELF-HOSTED", "linux", "x64"),
    ("self-hosted", "gpu"),  # not this pool's: ignored at intake, never on our runners
]
ASSIGNMENT_TIMEOUT = 3600.0
FOREIGN_RUNNER = "someone-elses-runner"


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


class Names:
    """Deterministic VM names, so hypothesis can replay and shrink a run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counter = itertools.count(1)

    def token_hex(self, nbytes: int = 3) -> str:
        return f"{next(self.counter):0{nbytes * 2}x}"


NAMES = Names()


@pytest.fixture(autouse=True)
def names(monkeypatch: pytest.MonkeyPatch) -> Names:
    monkeypatch.setattr(pool_module, "secrets", NAMES)
    NAMES.reset()
    return NAMES


# -- the world around the controller -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> float:
        return self.t


class Tokens:
    """TokenIssuer: a dummy registration token; `outage` next calls fail permanently."""

    def __init__(self) -> None:
        self.outage = 0

    def runner_credentials(
        self, scope: RunnerScope, runner_name: str, labels: Sequence[str], jit: bool
    ) -> RunnerCredentials:
        if self.outage:
            self.outage -= 1
            raise PermanentError("GitHub App is not installed on acme (simulated)")
        return RunnerCredentials(
            runner_url="https://github.com/acme", registration_token="dummy-token"
        )

    def list_runners(self, scope: RunnerScope) -> list[RunnerInfo]:
        return []

    def delete_runner(self, scope: RunnerScope, runner_id: int) -> None:
        return None


class Mig:
    """VmProvider: an in-memory MIG. Actions are scheduled; `boot` finishes a start."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.vms: dict[str, ProviderVm] = {}

    def list(self) -> list[ProviderVm]:
        return [self.vms[name] for name in sorted(self.vms)]

    def _set(self, names: Sequence[str], status: InfraStatus) -> None:
        if not any(name in self.vms for name in names):
            raise NotFound(f"none of {list(names)} exists")
        for name in names:
            if name in self.vms:
                old = self.vms[name]
                self.vms[name] = ProviderVm(name, status, old.created_at)

    def create(self, names: Sequence[str]) -> None:
        for name in names:
            self.vms.setdefault(name, ProviderVm(name, InfraStatus.CREATING, self.clock.now()))

    def start(self, names: Sequence[str]) -> None:
        self._set(names, InfraStatus.STARTING)

    def resume(self, names: Sequence[str]) -> None:
        self._set(names, InfraStatus.STARTING)

    def stop(self, names: Sequence[str]) -> None:
        self._set(names, InfraStatus.STOPPED)

    def suspend(self, names: Sequence[str]) -> None:
        self._set(names, InfraStatus.SUSPENDED)

    def delete(self, names: Sequence[str]) -> None:
        if not any(name in self.vms for name in names):
            raise NotFound(f"none of {list(names)} exists")
        for name in names:
            self.vms.pop(name, None)


@dataclass(frozen=True)
class Item:
    """Work in flight: a Celery task (follow-up, agent event, ack) or a Pub/Sub message."""

    kind: str  # assign_job / assign_vm / provision / agent_event / command_acked / intake
    args: tuple[Any, ...] = ()
    redelivered: bool = field(default=False, compare=False)

    @property
    def follow_up(self) -> bool:
        """A dispatch that a crash right before it loses for good (the task that made it
        finds its work done when redelivered); the sweep is what recovers from that. A
        task already in the broker is redelivered instead (acks_late)."""
        return self.kind in ("assign_job", "assign_vm", "provision") and not self.redelivered


class Recorder:
    """Dispatcher: records follow-ups; the machine runs them later, in any order.
    `provision` is debounced while one is pending, as the Celery dispatcher does."""

    def __init__(self, pending: list[Item]) -> None:
        self.pending = pending

    def assign_job(self, job_id: str) -> None:
        self.pending.append(Item("assign_job", (job_id,)))

    def assign_vm(self, vm_id: str) -> None:
        self.pending.append(Item("assign_vm", (vm_id,)))

    def provision(self) -> None:
        if Item("provision") not in self.pending:
            self.pending.append(Item("provision"))


@dataclass
class Agent:
    """A MIGlet and its ephemeral runner, as GitHub and the VM see them."""

    session: str
    up: bool = True
    runner: str = ""  # "" none, "idle" registered and waiting, "busy" running `job`
    job: str = ""
    labels: tuple[str, ...] = ()


@dataclass
class GhJob:
    labels: tuple[str, ...]
    state: str = "queued"  # queued / in_progress / completed / cancelled
    runner: str = ""
    conclusion: str = ""
    how: str = ""  # ran (to its end on our runner) / lost (runner died) / foreign / cancelled


class WorkerCrash(Exception):
    """kill -9 of a worker between two steps of a task."""


@dataclass
class Config:
    max_vms: int = 3
    min_ready_vms: int = 0
    max_scale_up_per_minute: int = 2
    max_concurrent_assignments: int = 2
    max_retries: int = 2
    idle_action: str = "stop"


def make_settings(cfg: Config) -> Settings:
    return Settings(
        pool={"id": POOL, "labels": list(POOL_LABELS), "idle_action": cfg.idle_action},
        scheduler={
            "assignment_timeout": ASSIGNMENT_TIMEOUT,
            "max_concurrent_assignments": cfg.max_concurrent_assignments,
            "max_retries": cfg.max_retries,
        },
        vm_manager={
            "provider": "sim",
            "max_vms": cfg.max_vms,
            "min_ready_vms": cfg.min_ready_vms,
            "max_scale_up_per_minute": cfg.max_scale_up_per_minute,
            "heartbeat_timeout": 60.0,
            "idle_timeout": 600.0,
        },
        github_app={"app_id": "1", "private_key": "not-used"},
        pubsub={"source": "local"},
    )


@dataclass
class Seen:
    """What the invariants remember between steps."""

    terminal: dict[str, tuple[JobState, float, str]] = field(default_factory=dict)
    uncounted_completed: set[str] = field(default_factory=set)


class Lazy:
    """A failure message part computed only when an assertion fails."""

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make

    def __format__(self, spec: str) -> str:
        return self.make()


class World:
    """The controller's real services on a real Redis, and the world they act on."""

    def __init__(self, client: redis.Redis, cfg: Config, seed: int = 0) -> None:
        client.flushdb()
        NAMES.reset()
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.settings = make_settings(cfg)
        self.store = RedisStore(client, POOL)
        self.pending: list[Item] = []
        self.dispatch = Recorder(self.pending)
        self.tokens = Tokens()
        self.mig = Mig(self.clock)
        self.assigner = Assigner(self.store, self.tokens, self.settings, self.dispatch, self.clock)
        self.events = AgentEvents(self.store, self.settings, self.dispatch, self.clock)
        self.intake = RedisIntake(self.store, self.settings, self.dispatch, self.events, self.clock)
        self.pool = Pool(self.store, self.mig, self.settings, self.dispatch, self.clock)
        self.agents: dict[str, Agent] = {}
        self.gh: dict[str, GhJob] = {}
        self.seen = Seen()
        self.sessions = itertools.count(1)
        self.log: list[str] = []

    # -- GitHub's job events (Pub/Sub) -----------------------------------------------------------

    def job_event(
        self, action: str, job_id: str, *, runner: str = "", conclusion: str = ""
    ) -> Item:
        gh = self.gh[job_id]
        event = JobEvent(
            action=action,  # type: ignore[arg-type]
            job_id=job_id,
            run_id=f"run-{job_id}",
            labels=gh.labels,
            org="acme",
            repo="acme/app",
            installation_id=7,
            pool_id=POOL,
            priority=0,
            received_at=T0 + int(job_id.removeprefix("j")),
            runner_name=runner,
            conclusion=conclusion,
            source="workflow_job",
        )
        return Item("intake", (event,))

    def new_job(self, labels: tuple[str, ...], copies: int = 1) -> str:
        job_id = f"j{len(self.gh) + 1}"
        self.gh[job_id] = GhJob(labels=labels)
        self.pending.extend([self.job_event("queued", job_id)] * copies)
        self.log.append(f"job {job_id} {labels} queued x{copies}")
        return job_id

    # -- running work in flight ------------------------------------------------------------------

    def run(self, item: Item) -> None:
        self.log.append(f"run {item.kind}{item.args if item.kind != 'intake' else self._ev(item)}")
        if item.kind == "assign_job":
            self.assigner.assign_job(*item.args)
        elif item.kind == "assign_vm":
            self.assigner.assign_vm(*item.args)
        elif item.kind == "provision":
            self.pool.provision()
        elif item.kind == "agent_event":
            self.events.event(*item.args)
        elif item.kind == "command_acked":
            self.events.command_acked(*item.args)
        elif item.kind == "intake":
            event: JobEvent = item.args[0]
            unknown = self.store.get_job(event.job_id) is None
            self.intake.accept(event)
            if unknown and event.action == "completed":
                # Its end arrived before its `queued`: recorded, but not counted.
                self.seen.uncounted_completed.add(event.job_id)
        else:
            raise AssertionError(item)

    @staticmethod
    def _ev(item: Item) -> str:
        e: JobEvent = item.args[0]
        return f"({e.action} {e.job_id} runner={e.runner_name!r} conclusion={e.conclusion!r})"

    def take(self, index: int) -> Item:
        return self.pending.pop(index % len(self.pending))

    def crash_after_claim(self, item: Item) -> None:
        """Run an assignment whose worker dies right after the claim committed; acks_late
        puts the task back (redelivery)."""
        real = self.store.claim

        def claim_then_die(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            if result[0] is not None:
                raise WorkerCrash("killed after the claim")
            return result

        self.store.claim = claim_then_die  # type: ignore[method-assign]
        try:
            self.log.append(f"crash-after-claim {item.kind}{item.args}")
            self.run(item)
        except WorkerCrash:
            pass
        finally:
            del self.store.claim
        self.pending.append(Item(item.kind, item.args, redelivered=True))

    # -- the MIG and the agents ------------------------------------------------------------------

    def already_running(self, n: int) -> None:
        names = [f"{POOL}-up{i}" for i in range(1, n + 1)]
        self.mig.create(names)
        self.mig.vms.update({name: ProviderVm(name, InfraStatus.RUNNING, T0) for name in names})
        self.pool.sync()  # discovers them
        for name in names:
            self.boot(name)
        self.run_all()
        self.pass_time(61.0)

    def bootable(self) -> list[str]:
        return [
            name
            for name, pvm in sorted(self.mig.vms.items())
            if pvm.status in (InfraStatus.CREATING, InfraStatus.STARTING)
        ]

    def boot(self, vm_id: str) -> None:
        """The instance runs; its MIGlet connects (as the gateway's `_connected`) and
        reports `ready`."""
        pvm = self.mig.vms[vm_id]
        self.mig.vms[vm_id] = ProviderVm(vm_id, InfraStatus.RUNNING, pvm.created_at)
        if self.store.get_vm(vm_id) is None:
            return  # the gateway refuses a VM it does not know
        session = f"s{next(self.sessions)}"
        self.agents[vm_id] = Agent(session=session)
        now = self.clock.now()

        def connected(vm: Vm) -> Vm:
            agent = vm.agent if vm.agent is not AgentState.NONE else AgentState.CONNECTING
            lifecycle = Lifecycle.NONE if vm.lifecycle is Lifecycle.STARTING else vm.lifecycle
            return vm.with_(
                connected=True,
                session=session,
                capabilities=(),
                agent=agent,
                lifecycle=lifecycle,
                last_heartbeat=now,
                unhealthy=False,
            )

        self.log.append(f"boot {vm_id} ({session})")
        self.events._update_vm(vm_id, connected)
        self.events.agent_state(vm_id, AgentState.READY)

    def down(self, vm_id: str) -> None:
        """The agent's stream ends (VM stopped or gone); its runner goes with it."""
        agent = self.agents.pop(vm_id, None)
        if agent is None:
            return
        if agent.runner == "busy":
            self.github_loses(agent.job)
        self.events.disconnected(vm_id, agent.session)

    def up_agents(self, runner: str | None = None) -> list[str]:
        return [
            vm_id
            for vm_id, a in sorted(self.agents.items())
            if a.up and (runner is None or a.runner == runner)
        ]

    def next_command(self, vm_id: str) -> dict[str, Any] | None:
        """The oldest pending command, if the agent can act on it now."""
        commands = self.store.pending_commands(vm_id, now=self.clock.now())
        if not commands:
            return None
        if commands[0]["type"] == "drain" and self.agents[vm_id].runner == "busy":
            return None  # the agent lets the job run to its end first
        return commands[0]

    def _ack(self, vm_id: str, command: dict[str, Any], success: bool, message: str) -> None:
        outcome = {"success": success, "message": message}
        if self.store.ack_command(vm_id, command["id"], outcome):
            self.pending.append(Item("command_acked", (vm_id, command["id"], success, message)))

    def take_command(self, vm_id: str, ok: bool) -> bool:
        """The agent runs its oldest pending command, as the simulated MIGlet does."""
        command = self.next_command(vm_id)
        if command is None:
            return False
        agent = self.agents[vm_id]
        self.log.append(
            f"agent {vm_id} runs {command['type']} {command['id'][:6]}"
            f" ok={ok} runner={agent.runner!r}"
        )
        if command["type"] == "drain":
            if agent.runner == "idle":
                self.events.agent_state(vm_id, AgentState.DRAINING)
                agent.runner = ""  # removed from GitHub
            self._ack(vm_id, command, True, "drained")
            self.events.agent_state(vm_id, AgentState.READY)
            return True
        if command["type"] != "register_runner":
            self._ack(vm_id, command, True, "ok")
            return True
        params = command["string_params"]
        assert params["registration_token"] == "dummy-token", params
        assert params["runner_url"] == "https://github.com/acme", params
        assert "token" not in params and "url" not in params, params
        if agent.runner:
            self._ack(vm_id, command, False, f"cannot register a runner while {agent.runner}")
            return True
        self.events.agent_state(vm_id, AgentState.REGISTERING)
        if not ok:
            self._ack(vm_id, command, False, "config.sh failed")
            self.events.agent_state(vm_id, AgentState.READY)
            return True
        agent.runner = "idle"
        agent.labels = tuple(command["string_array_params"])
        self._ack(vm_id, command, True, "runner registered")
        data = {"runner_url": params["runner_url"], "runner_group": params["runner_group"]}
        self.pending.append(Item("agent_event", (vm_id, "runner_registered", data)))
        self.events.agent_state(vm_id, AgentState.IDLE)
        return True

    def faults(self) -> list[tuple[str, str]]:
        out = [("cancel", job_id) for job_id in self.gh_queued()]
        out += [("foreign", job_id) for job_id in self.gh_queued()]
        out += [("lose", str(n)) for n, i in enumerate(self.pending) if i.follow_up]
        out += [
            ("die_after_claim", str(n))
            for n, i in enumerate(self.pending)
            if i.kind in ("assign_job", "assign_vm")
        ]
        out += [("crash", vm_id) for vm_id in self.up_agents("idle") + self.up_agents("busy")]
        out += [("vm_lost", vm_id) for vm_id in sorted(self.mig.vms)]
        return out

    def fault(self, fault: tuple[str, str]) -> None:
        kind, arg = fault
        if kind == "cancel":
            self.cancel(arg)
        elif kind == "foreign":
            self.foreign(arg)
        elif kind == "lose":
            item = self.pending.pop(int(arg))
            self.log.append(f"lost {item.kind}{item.args}")
        elif kind == "die_after_claim":
            self.crash_after_claim(self.pending.pop(int(arg)))
        elif kind == "crash":
            self.crash_runner(arg)
        else:
            self.lose_vm(arg)

    def moves(self) -> list[tuple[str, ...]]:
        """What the world outside the controller may do next."""
        out: list[tuple[str, ...]] = [("boot", vm_id) for vm_id in self.bootable()]
        out += [("command", vm_id) for vm_id in self.up_agents() if self.next_command(vm_id)]
        out += [("hand", job_id, vm_id) for job_id, vm_id in self.matches()]
        out += [("finish", vm_id) for vm_id in self.up_agents("busy")]
        return out

    def move(self, move: tuple[str, ...], ok: bool) -> None:
        kind, *args = move
        if kind == "boot":
            self.boot(*args)
        elif kind == "command":
            self.take_command(args[0], ok)
        elif kind == "hand":
            self.hand(*args)
        else:
            self.finish(args[0], ok)

    # -- GitHub ----------------------------------------------------------------------------------

    def gh_queued(self) -> list[str]:
        return [job_id for job_id, j in self.gh.items() if j.state == "queued"]

    def matches(self) -> list[tuple[str, str]]:
        """(job, runner) pairs GitHub may make: any idle runner whose labels cover the job."""
        return [
            (job_id, vm_id)
            for job_id in self.gh_queued()
            for vm_id in self.up_agents("idle")
            if covers(self.agents[vm_id].labels, self.gh[job_id].labels)
        ]

    def hand(self, job_id: str, vm_id: str) -> None:
        gh, agent = self.gh[job_id], self.agents[vm_id]
        got = self.store.get_job(job_id)
        gh.state, gh.runner = "in_progress", vm_id
        agent.runner, agent.job = "busy", job_id
        self.log.append(f"github hands {job_id} to {vm_id} (redis: {got and got[0].state})")
        self.events.agent_state(vm_id, AgentState.JOB_RUNNING)
        data = {"job_id": job_id, "run_id": f"run-{job_id}"}
        self.pending.append(Item("agent_event", (vm_id, "job_started", data)))
        self.pending.append(self.job_event("in_progress", job_id, runner=vm_id))

    def finish(self, vm_id: str, success: bool) -> None:
        agent = self.agents[vm_id]
        job_id = agent.job
        gh = self.gh[job_id]
        gh.state, gh.how = "completed", "ran"
        gh.conclusion = "success" if success else "failure"
        agent.runner, agent.job = "", ""
        self.log.append(f"{job_id} finishes on {vm_id}: {gh.conclusion}")
        self.events.agent_state(vm_id, AgentState.READY)
        data = {"job_id": job_id, "run_id": f"run-{job_id}", "success": str(success).lower()}
        self.pending.append(Item("agent_event", (vm_id, "job_completed", data)))
        self.pending.append(
            self.job_event("completed", job_id, runner=vm_id, conclusion=gh.conclusion)
        )

    def github_loses(self, job_id: str) -> None:
        """The runner died mid-job: GitHub fails the job and says so."""
        gh = self.gh[job_id]
        gh.state, gh.how, gh.conclusion = "completed", "lost", "failure"
        self.pending.append(
            self.job_event("completed", job_id, runner=gh.runner, conclusion="failure")
        )

    def crash_runner(self, vm_id: str) -> None:
        agent = self.agents[vm_id]
        self.log.append(f"runner on {vm_id} crashes ({agent.runner} {agent.job})")
        if agent.runner == "busy":
            self.github_loses(agent.job)
        agent.runner, agent.job = "", ""
        at = self.clock.now()  # the agent's own timestamp travels with the event
        self.pending.append(Item("agent_event", (vm_id, "runner_crashed", {"reason": "oom"}, at)))
        self.events.agent_state(vm_id, AgentState.READY)

    def cancel(self, job_id: str) -> None:
        gh = self.gh[job_id]
        gh.state, gh.how, gh.conclusion = "cancelled", "cancelled", "cancelled"
        self.log.append(f"github cancels {job_id}")
        self.pending.append(self.job_event("completed", job_id, conclusion="cancelled"))

    def foreign(self, job_id: str) -> None:
        gh = self.gh[job_id]
        gh.state, gh.how, gh.runner, gh.conclusion = (
            "completed",
            "foreign",
            FOREIGN_RUNNER,
            "success",
        )
        self.log.append(f"{job_id} runs on a runner not of this pool")
        self.pending.append(self.job_event("in_progress", job_id, runner=FOREIGN_RUNNER))
        self.pending.append(
            self.job_event("completed", job_id, runner=FOREIGN_RUNNER, conclusion="success")
        )

    def lose_vm(self, vm_id: str) -> None:
        self.log.append(f"MIG loses {vm_id}")
        self.mig.vms.pop(vm_id, None)
        self.down(vm_id)

    def after_provider_actions(self) -> None:
        """Agents on instances the MIG stopped or suspended go down with them."""
        for vm_id in list(self.agents):
            pvm = self.mig.vms.get(vm_id)
            if pvm is None or pvm.status in (InfraStatus.STOPPED, InfraStatus.SUSPENDED):
                self.down(vm_id)

    def beat(self, seconds: float, which: str) -> None:
        """Time passes (agents keep heartbeating), then a reconciler (if any) runs."""
        if seconds:
            self.pass_time(seconds)
        if which:
            self.log.append(which)
            {"sweep": self.pool.sweep, "sync": self.pool.sync, "idle_stop": self.pool.idle_stop}[
                which
            ]()
            self.after_provider_actions()

    def pass_time(self, seconds: float) -> None:
        if seconds > 60:
            # The gateway re-delivers outboxes every 30 s: over a long quiet spell, every
            # live agent has run what it was sent. (A command left to expire unacked is a
            # scenario of its own, below.)
            while any(self.take_command(vm_id, ok=True) for vm_id in self.up_agents()):
                pass
        self.clock.t += seconds
        self.log.append(f"time +{seconds:g}s")
        beats = {vm_id: self.clock.now() for vm_id in self.up_agents()}
        self.store.touch_heartbeats(beats)  # the gateway's coalesced heartbeats

    # -- reading Redis -------------------------------------------------------------------------

    def jobs(self) -> dict[str, Job]:
        ids = sorted(self.store.all_job_ids())
        return {job.id: job for job, _ in self.store.get_jobs(ids)}

    def vms(self) -> dict[str, Vm]:
        return {vm.id: vm for vm, _ in self.store.get_vms()}

    def index(self, key: str) -> set[str]:
        r = self.store.r
        raw = r.zrange(key, 0, -1) if r.type(key) == b"zset" else r.smembers(key)
        return {m.decode() for m in raw}

    # -- the invariants --------------------------------------------------------------------------

    def check(self) -> None:
        jobs, vms, k = self.jobs(), self.vms(), self.store.k
        where = Lazy(lambda: self.describe(jobs, vms))

        # No VM holds two jobs; no job is held by two VMs.
        bound = Counter(vm.job_id for vm in vms.values() if vm.job_id)
        reserved = Counter(vm.reserved_job for vm in vms.values() if vm.reserved_job)
        assert all(n == 1 for n in bound.values()), f"a job bound to two VMs: {bound}{where}"
        assert all(n == 1 for n in reserved.values()), f"demand reserved twice: {reserved}{where}"
        for vm in vms.values():
            assert not (vm.job_id and vm.job_id == vm.reserved_job), (
                f"{vm.id} holds one job twice{where}"
            )
            if vm.reserved_job:
                j = jobs.get(vm.reserved_job)
                assert j is not None and j.state is JobState.ASSIGNED and j.vm_id == vm.id, (
                    f"{vm.id} reserved for {vm.reserved_job}: {j and (j.state, j.vm_id)}{where}"
                )
            if vm.job_id:
                j = jobs.get(vm.job_id)
                assert j is not None and j.state is JobState.RUNNING and j.vm_id == vm.id, (
                    f"{vm.id} runs {vm.job_id}, which is {j and (j.state, j.vm_id)}{where}"
                )
        for j in jobs.values():
            assert isinstance(j.state, JobState)
            if j.state is JobState.ASSIGNED:
                vm = vms.get(j.vm_id)
                assert vm is not None and vm.reserved_job == j.id, (
                    f"{j.id} ASSIGNED to {j.vm_id!r}, which holds {vm and vm.reserved_job!r}{where}"
                )
            if j.state is JobState.RUNNING:
                # Not always bound back: the job_started of the runner's next job may be
                # applied before this one's (Celery reorders); its completion settles it.
                on = [vm.id for vm in vms.values() if vm.job_id == j.id]
                assert on in ([], [j.vm_id]), f"{j.id} RUNNING on {j.vm_id!r}, bound on {on}{where}"

        # One state per job, and the indexes derived from the records.
        by_state = {s: {j.id for j in jobs.values() if j.state is s} for s in JobState}
        assert self.index(k.queue) == by_state[JobState.QUEUED], f"queue index{where}"
        assert self.index(k.assigned) == by_state[JobState.ASSIGNED], f"assigned index{where}"
        terminal = {j.id for j in jobs.values() if j.state.terminal}
        assert self.index(k.recent) == terminal, f"recent index{where}"
        free = {vm.id for vm in vms.values() if is_free(vm)}
        assert self.index(k.free) == free, f"free index {self.index(k.free)} != {free}{where}"
        inflight = {vm.id for vm in vms.values() if vm.cmd_id}
        assert self.index(k.inflight) == inflight, f"inflight index{where}"
        assert self.index(k.vms) == set(vms), f"vms index{where}"

        # Limits. A VM being deleted no longer counts (scheduler: all states but deleted).
        counted = [vm.id for vm in vms.values() if vm.state is not VmState.DELETING]
        assert len(counted) <= self.cfg.max_vms, f"{counted} VM records > max_vms{where}"
        assert len(self.mig.vms) <= self.cfg.max_vms, f"{len(self.mig.vms)} instances > max_vms"
        scaled = self.store.scaled_since(self.clock.now() - 60)
        assert scaled <= self.cfg.max_scale_up_per_minute, f"{scaled} VMs scaled in a minute"

        # Terminal is forever, and each completion is counted once.
        for j in jobs.values():
            if j.id in self.seen.terminal:
                was = self.seen.terminal[j.id]
                now = (j.state, j.finished_at, j.conclusion)
                assert now == was, f"terminal {j.id} changed: {was} -> {now}{where}"
            elif j.state.terminal:
                self.seen.terminal[j.id] = (j.state, j.finished_at, j.conclusion)
        assert set(self.seen.terminal) <= set(jobs), "a finished job disappeared"
        completed = by_state[JobState.COMPLETED] - self.seen.uncounted_completed
        n = self.store.counters().get("completed_jobs", 0)
        assert n == len(completed), f"completed_jobs={n} for {sorted(completed)}{where}"

    def describe(self, jobs: dict[str, Job] | None = None, vms: dict[str, Vm] | None = None) -> str:
        jobs = self.jobs() if jobs is None else jobs
        vms = self.vms() if vms is None else vms
        lines = ["", "-- jobs:"]
        for j in jobs.values():
            gh = self.gh.get(j.id)
            lines.append(
                f"  {j.id}: {j.state} vm={j.vm_id!r} retries={j.retries} {j.conclusion!r}"
                f" {j.reason!r} | github: {gh and (gh.state, gh.how, gh.runner, gh.conclusion)}"
            )
        lines.append("-- vms:")
        for vm in vms.values():
            a = self.agents.get(vm.id)
            pvm = self.mig.vms.get(vm.id)
            lines.append(
                f"  {vm.id}: {vm.state} agent={vm.agent.value!r} reg={vm.runner_registered}"
                f" reserved={vm.reserved_job!r} job={vm.job_id!r} cmd={vm.cmd_id[:6]!r}"
                f" | agent: {a and (a.runner, a.job)} mig: {pvm and pvm.status}"
            )
        pending = [(i.kind, self._ev(i) if i.kind == "intake" else i.args) for i in self.pending]
        lines.append(f"-- pending: {pending}")
        log = [line for n, line in enumerate(self.log) if n == 0 or line != self.log[n - 1]]
        open_jobs = {j.id for j in jobs.values() if not j.state.terminal}
        watch = open_jobs | {j.vm_id for j in jobs.values() if j.id in open_jobs and j.vm_id}
        if watch:
            pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(watch))) + r")\b")
            lines.append(f"-- log of {sorted(watch)}:")
            lines += [f"  {line}" for line in log if pattern.search(line)][-150:]
        lines.append("-- log (tail):")
        lines += [f"  {line}" for line in log[-40:]]
        return "\n".join(lines)

    # -- driving everything to completion ----------------------------------------------------------

    def drain(self, budget: int = 3000) -> None:
        """Run work in flight and let agents and GitHub act until nothing moves."""
        while budget > 0:
            budget -= 1
            if self.pending:
                self.run(self.take(self.rng.randrange(len(self.pending))))
                continue
            if boot := self.bootable():
                self.boot(boot[0])
                continue
            if any(self.take_command(vm_id, ok=True) for vm_id in self.up_agents()):
                continue
            if pairs := self.matches():
                self.hand(*pairs[0])
                continue
            if busy := self.up_agents("busy"):
                self.finish(busy[0], success=self.rng.random() < 0.8)
                continue
            return
        raise AssertionError(f"no quiescence after the drain budget{self.describe()}")

    def run_all(self, hold: Callable[[Item], bool] = lambda item: False) -> None:
        """Run work in flight in order, leaving the `hold` items pending."""
        while ready := [n for n, item in enumerate(self.pending) if not hold(item)]:
            self.run(self.pending.pop(ready[0]))

    def unfinished(self) -> list[str]:
        jobs = self.jobs()
        open_gh = [job_id for job_id, j in self.gh.items() if j.state in ("queued", "in_progress")]
        open_redis = [j.id for j in jobs.values() if not j.state.terminal]
        holding = [
            f"vm:{v.id}" for v in self.vms().values() if v.reserved_job or v.job_id or v.cmd_id
        ]
        return sorted(set(open_gh) | set(open_redis)) + holding

    def fingerprint(self) -> tuple[Any, ...]:
        jobs = tuple((j.id, j.state, j.vm_id, j.retries) for j in self.jobs().values())
        vms = tuple(
            (v.id, v.state, v.reserved_job, v.job_id, v.cmd_id, v.runner_registered)
            for v in self.vms().values()
        )
        gh = tuple((job_id, j.state) for job_id, j in self.gh.items())
        return jobs, vms, gh, tuple(sorted(self.mig.vms))

    def reconcile_round(self) -> None:
        """One pass of what beat schedules, with everything in flight run to its end."""
        self.drain()
        self.check()
        for reconcile in (self.pool.sweep, self.pool.sync, self.pool.idle_stop):
            reconcile()
            self.after_provider_actions()
        self.drain()
        self.check()
        # GitHub eventually drops jobs no runner of ours will take: not this pool's, or
        # given up on here while GitHub still had them queued.
        jobs = self.jobs()
        for job_id in self.gh_queued():
            j = jobs.get(job_id)
            if not covers(POOL_LABELS, self.gh[job_id].labels) or (j and j.state.terminal):
                self.cancel(job_id)
        self.drain()

    def settle(self, step: float, *, calm_rounds: int, max_rounds: int) -> bool:
        """Reconcile passes `step` seconds apart until every job is done (True), or until
        nothing changed for `calm_rounds` passes in a row (False)."""
        calm = 0
        for _ in range(max_rounds):
            before = self.fingerprint()
            self.reconcile_round()
            if not self.unfinished():
                return True
            calm = calm + 1 if self.fingerprint() == before else 0
            if calm >= calm_rounds:
                return False
            self.pass_time(step)
        return not self.unfinished()

    def quiesce(self) -> None:
        # Passes a minute apart (a scale-up budget and the MIG listing grace renew), well
        # under assignment_timeout in all: a healthy controller finishes every job with no
        # timeout having to fire. A job still waiting when nothing moves any more is stuck.
        max_rounds = int(ASSIGNMENT_TIMEOUT // 61) - 2
        live = self.settle(61.0, calm_rounds=4, max_rounds=max_rounds)
        assert live, (
            "stuck with nothing in flight; only assignment_timeout could free them. "
            f"Unfinished: {self.unfinished()}{self.describe()}"
        )
        self.final_check()

    def final_check(self) -> None:
        jobs, vms = self.jobs(), self.vms()
        where = Lazy(lambda: self.describe(jobs, vms))
        assert set(jobs) <= set(self.gh), f"jobs GitHub never had: {set(jobs) - set(self.gh)}"
        for job_id, gh in self.gh.items():
            j = jobs.get(job_id)
            if not covers(POOL_LABELS, gh.labels):
                assert j is None or j.state.terminal, job_id
                continue
            assert j is not None, f"{job_id} never recorded{where}"
            got = (j.state, j.conclusion)
            if gh.how == "ran":
                # It ran to its end on our runner: COMPLETED as the runner said, unless this
                # controller had already given up on it (FAILED is final).
                assert got == (JobState.COMPLETED, gh.conclusion) or j.state is JobState.FAILED, (
                    f"{job_id} ran to {gh.conclusion} on {gh.runner} but is {got}{where}"
                )
            elif gh.how == "lost":
                assert j.state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED), where
                assert j.conclusion != "success", f"{job_id} lost mid-run but {got}{where}"
            elif gh.how == "foreign":
                assert j.state.terminal, where
            else:
                assert gh.how == "cancelled", gh
                assert j.state in (JobState.CANCELLED, JobState.FAILED), (
                    f"{job_id} was cancelled while queued but is {got}{where}"
                )
        for vm in vms.values():
            assert not (vm.reserved_job or vm.job_id or vm.cmd_id), (
                f"{vm.id} still holds work{where}"
            )
        # COMPLETED here is what GitHub saw run to its end on our runners, each once,
        # but for jobs given up on first (FAILED is final); and what ended elsewhere.
        ran = {job_id for job_id, gh in self.gh.items() if gh.how == "ran"}
        completed = {j.id for j in jobs.values() if j.state is JobState.COMPLETED}
        given_up = {j.id for j in jobs.values() if j.state is JobState.FAILED}
        assert completed & ran == ran - given_up, where
        ended_elsewhere = {
            job_id for job_id, gh in self.gh.items() if gh.how in ("lost", "foreign")
        }
        assert completed - ran <= ended_elsewhere, where
        counted = self.store.counters().get("completed_jobs", 0)
        assert counted == len(completed - self.seen.uncounted_completed), where


# -- the state machine ----------------------------------------------------------------------------

PICK = st.integers(min_value=0, max_value=10_000)
SECONDS = st.sampled_from([0.0, 0.0, 0.0, 1.0, 11.0, 61.0, 601.0, ASSIGNMENT_TIMEOUT + 1])
RECONCILER = st.sampled_from(["", "", "sweep", "sync", "idle_stop"])


class ControllerMachine(RuleBasedStateMachine):
    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.w: World | None = None
        self.failed = False

    @property
    def world(self) -> World:
        assert self.w is not None
        return self.w

    def _guard(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException:
            self.failed = True
            raise

    @initialize(
        max_vms=st.integers(1, 3),
        min_ready=st.integers(0, 1),
        scale=st.integers(1, 3),
        concurrent=st.sampled_from([1, 2, 4]),
        retries=st.integers(0, 2),
        idle_action=st.sampled_from(["stop", "suspend"]),
        seed=st.integers(0, 2**16),
        running=st.integers(0, 3),
    )
    def setup(
        self,
        max_vms: int,
        min_ready: int,
        scale: int,
        concurrent: int,
        retries: int,
        idle_action: str,
        seed: int,
        running: int,
    ) -> None:
        """The pool's limits; `running`: VMs already up in the MIG when the controller
        starts (found by the cloud sync, their agents connect)."""
        cfg = Config(
            max_vms=max_vms,
            min_ready_vms=min(min_ready, max_vms),
            max_scale_up_per_minute=scale,
            max_concurrent_assignments=concurrent,
            max_retries=retries,
            idle_action=idle_action,
        )
        self.w = World(self.client, cfg, seed)
        self._guard(lambda: self.w and self.w.already_running(min(running, max_vms)))

    # -- GitHub's jobs -----------------------------------------------------------------------

    @rule(
        labels=st.sampled_from(JOB_LABELS),
        copies=st.sampled_from([1, 1, 1, 2]),
        outage=st.sampled_from([False] * 5 + [True]),
    )
    def job_arrives(self, labels: tuple[str, ...], copies: int, outage: bool) -> None:
        """A job is queued in GitHub (its message sometimes published twice). `outage`:
        the next registration token cannot be minted (GitHub App not installed)."""
        self.world.new_job(labels, copies)
        if outage:
            self.world.tokens.outage = 1

    # -- work in flight ----------------------------------------------------------------------

    @precondition(lambda self: self.w is not None and bool(self.w.pending))
    @rule(
        picks=st.lists(PICK, min_size=1, max_size=6),
        twice=st.sampled_from([-1, -1, 0]),
        seconds=SECONDS,
        then=RECONCILER,
    )
    def workers_run_tasks(self, picks: list[int], twice: int, seconds: float, then: str) -> None:
        """Workers run a few tasks, any of them (Celery reorders); one may be delivered
        again later (acks_late redelivery, Pub/Sub at-least-once). Then time may pass
        and a reconciler may run."""

        def go() -> None:
            for n, pick in enumerate(picks):
                if not self.world.pending:
                    break
                item = self.world.take(pick)
                if n == twice:
                    self.world.pending.append(item)
                self.world.run(item)
            self.world.beat(seconds, then)

        self._guard(go)

    # -- the MIG, the agents and GitHub's dispatcher -------------------------------------------

    @precondition(lambda self: self.w is not None and bool(self.w.moves()))
    @rule(
        picks=st.lists(PICK, min_size=1, max_size=4),
        ok=st.sampled_from([True, True, True, False]),
        seconds=SECONDS,
        then=RECONCILER,
    )
    def the_world_moves(self, picks: list[int], ok: bool, seconds: float, then: str) -> None:
        """VMs boot, agents run their commands (register_runner, drain), GitHub hands
        queued jobs to idle runners, jobs end (a registration or a job fails unless `ok`).
        Then time may pass and a reconciler may run."""

        def go() -> None:
            for pick in picks:
                moves = self.world.moves()
                if not moves:
                    break
                self.world.move(moves[pick % len(moves)], ok)
            self.world.beat(seconds, then)

        self._guard(go)

    # -- faults --------------------------------------------------------------------------------

    @precondition(lambda self: self.w is not None and bool(self.w.faults()))
    @rule(pick=PICK)
    def something_goes_wrong(self, pick: int) -> None:
        """One of: a queued job is cancelled in GitHub or taken by a runner not ours; a
        follow-up dispatch is lost (the process died before sending it); a worker dies
        right after its claim committed (acks_late redelivers the task); a runner
        crashes; the MIG loses a VM."""
        faults = self.world.faults()
        self._guard(lambda: self.world.fault(faults[pick % len(faults)]))

    # -- the reconcilers (beat) --------------------------------------------------------------

    @precondition(lambda self: self.w is not None and not self.w.pending and not self.w.moves())
    @rule(seconds=SECONDS, which=RECONCILER)
    def beat(self, seconds: float, which: str) -> None:
        """Nothing else to do: time passes and a reconciler runs."""
        self._guard(lambda: self.world.beat(seconds, which))

    # -- checks ----------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if self.w is not None:
            self._guard(self.w.check)

    def teardown(self) -> None:
        if self.w is not None and not self.failed:
            self.w.quiesce()


def test_controller_state_machine(r: redis.Redis) -> None:
    # Shrinking a run this size can take minutes; the failure report already names the
    # stuck jobs and VMs and their history. MIGCTL_SHRINK=1 shrinks (for a local session).
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("MIGCTL_SHRINK") == "1":
        phases.append(Phase.shrink)
    ControllerMachine.client = r
    run_state_machine_as_test(
        ControllerMachine,
        settings=hsettings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
            phases=phases,
        ),
    )


# -- focused scenarios: one interleaving each, step by step ---------------------------------------


def one_vm_pool(r: redis.Redis, **cfg: Any) -> tuple[World, str]:
    """A pool with one booted VM whose agent is READY, and nothing in flight."""
    w = World(r, Config(**{"max_vms": 1, "min_ready_vms": 1, **cfg}))
    w.pool.provision()
    (vm_id,) = w.bootable()
    w.boot(vm_id)
    w.run_all()
    w.check()
    return w, vm_id


def ran(w: World, job_id: str) -> bool:
    got = w.store.get_job(job_id)
    return w.gh[job_id].how == "ran" and got is not None and got[0].state is JobState.COMPLETED


def test_scenario_happy_path(r: redis.Redis) -> None:
    """Queued -> provision -> boot -> register -> GitHub hands it -> completed, with
    every event and webhook applied, in order, exactly once."""
    w = World(r, Config(max_vms=1))
    job_id = w.new_job(("self-hosted", "linux"))
    w.run_all()
    assert w.bootable(), "a VM was created for the job"
    w.drain()
    w.check()
    assert ran(w, job_id), w.describe()
    assert w.store.counters()["completed_jobs"] == 1
    vm = next(iter(w.vms().values()))
    assert is_free(vm) and not vm.runner_registered  # ephemeral: it needs a new runner
    w.final_check()


def test_scenario_stale_runner_registered_after_the_runner_is_gone(r: redis.Redis) -> None:
    """The `runner_registered` event travels through Celery and may be applied after the
    `job_completed` of the same (ephemeral) runner. It must not mark the VM, whose agent
    is READY with no runner, as registered: the next job would be "reserved" on a runner
    that does not exist and wait for assignment_timeout."""
    w, vm_id = one_vm_pool(r)
    first = w.new_job(("self-hosted",))
    w.run_all()
    assert w.take_command(vm_id, ok=True)
    late = [i for i in w.pending if i.kind == "agent_event" and i.args[1] == "runner_registered"]
    w.run_all(hold=lambda item: item in late)
    w.hand(first, vm_id)
    w.finish(vm_id, success=True)
    w.run_all(hold=lambda item: item in late)
    assert ran(w, first)
    w.run_all()  # the runner_registered of the runner that just exited
    second = w.new_job(("self-hosted",))
    w.drain()  # no time passes: no timeout may be needed
    w.check()
    assert ran(w, second), w.describe()


def test_scenario_job_given_up_here_but_run_by_our_runner(r: redis.Redis) -> None:
    """This controller gives up on a job (FAILED after max_retries) while GitHub still
    has it queued, and GitHub hands it to our runner registered for another job: the
    runner is consumed all the same, so that other job must find another runner (not
    wait for assignment_timeout)."""
    w, vm_id = one_vm_pool(r, max_retries=0)
    w.tokens.outage = 1
    given_up = w.new_job(("self-hosted",))
    w.run_all()
    got = w.store.get_job(given_up)
    assert got is not None and got[0].state is JobState.FAILED, w.describe()
    other = w.new_job(("self-hosted",))
    w.run_all()
    assert w.take_command(vm_id, ok=True)
    w.run_all()
    w.hand(given_up, vm_id)  # GitHub's oldest queued job, to the only idle runner
    w.finish(vm_id, success=True)
    w.drain()  # no time passes
    w.check()
    assert ran(w, other), w.describe()


def test_scenario_worker_dies_after_claiming_for_a_free_vm(r: redis.Redis) -> None:
    """A worker dies between the claim and the register_runner of `assign_vm`. The
    redelivered `assign_vm` finds the VM no longer free; the sweep's next pass (more than
    STALE_ASSIGNMENT_S later) re-kicks the ASSIGNED job, whose `assign_job` finishes the
    registration, well before assignment_timeout."""
    w, vm_id = one_vm_pool(r)
    job_id = w.new_job(("self-hosted",))
    w.run_all(hold=lambda item: item.kind == "assign_job")
    w.pending.clear()  # its assign_job ran on a worker that found no VM, long ago
    w.dispatch.assign_vm(vm_id)  # the VM is free: a worker takes it ...
    w.crash_after_claim(w.pending.pop())  # ... claims the job and dies
    got = w.store.get_job(job_id)
    assert got is not None and got[0].state is JobState.ASSIGNED
    w.run_all()  # the redelivered task
    w.pass_time(11.0)
    w.pool.sweep()  # the safety net
    w.drain()
    w.check()
    assert ran(w, job_id), w.describe()


def test_scenario_worker_dies_after_claiming_for_a_job(r: redis.Redis) -> None:
    """The same crash in `assign_job`: the redelivered task resumes the registration."""
    w, _ = one_vm_pool(r)
    job_id = w.new_job(("self-hosted",))
    w.run_all(hold=lambda item: item.kind == "assign_job")
    (item,) = w.pending
    w.pending.clear()
    w.crash_after_claim(item)
    w.drain()
    w.check()
    assert ran(w, job_id), w.describe()


def test_scenario_registration_never_acked(r: redis.Redis) -> None:
    """BUG (services/pool.py `sweep`; nothing else clears `Vm.cmd_id`): a VM's pending
    registration is cleared only by the ack of that command (or a runner crash or VM
    loss). An agent that never acks it — the MIGlet restarted mid-registration after the
    command expired, so no reconnect replays it — leaves `cmd_id` set forever: the VM is
    never free again and holds a max_concurrent_assignments slot; assignment_timeout
    requeues the job but does not free the VM. With max_vms=1 no job ever runs again.
    The inflight index is scored by the time the registration was sent: the sweep could
    fail registrations older than the command TTL as a refused ack would."""
    w, vm_id = one_vm_pool(r)
    job_id = w.new_job(("self-hosted",))
    w.run_all()
    (command,) = w.store.pending_commands(vm_id, now=w.clock.now())  # delivered ...
    w.events.agent_state(vm_id, AgentState.REGISTERING)  # ... config.sh hangs ...
    w.clock.t = command["expires_at"] + 1
    w.down(vm_id)  # ... and the MIGlet restarts, its command forgotten
    w.boot(vm_id)
    assert w.store.pending_commands(vm_id, now=w.clock.now()) == []  # nothing to replay
    for _ in range(3):  # beat passes; the assignment timeout fires too
        w.pass_time(ASSIGNMENT_TIMEOUT + 1)
        w.reconcile_round()
    w.check()
    assert ran(w, job_id), w.describe()
    assert w.index(w.store.k.inflight) == set()


def test_scenario_job_ran_on_a_vm_lost_before_its_events_were_applied(r: redis.Redis) -> None:
    """BUG (services/intake.py `_in_progress`): a job runs to success on our VM; the VM is
    then lost and the sync deletes its record before the job's events are applied. The
    `in_progress` webhook names a runner the store no longer knows, so the job is ended
    CANCELLED "taken by runner ..., not of this pool" (counted as cancelled), and
    GitHub's own `completed: success` is then dropped as a duplicate. The runner name has
    this pool's prefix: it is ours, and the job's end is GitHub's word."""
    w, vm_id = one_vm_pool(r)
    job_id = w.new_job(("self-hosted",))
    w.run_all()
    assert w.take_command(vm_id, ok=True)
    w.hand(job_id, vm_id)
    w.finish(vm_id, success=True)
    w.lose_vm(vm_id)
    w.pass_time(61.0)
    w.pool.sync()
    assert w.store.get_vm(vm_id) is None
    w.run_all()
    w.check()
    got = w.store.get_job(job_id)
    assert got is not None and (got[0].state, got[0].conclusion) == (
        JobState.COMPLETED,
        "success",
    ), w.describe()
    assert w.store.counters().get("cancelled_jobs", 0) == 0


def test_scenario_late_runner_crashed_hits_the_next_runner(r: redis.Redis) -> None:
    """BUG (domain/transitions.py `runner_crashed`, services/events.py): the event names
    no runner, job or registration, so it applies to whatever the VM holds when it is
    applied. A runner crashes while idle; its `runner_crashed` task is delayed (a worker
    killed -9 holding it is redelivered after the visibility timeout, 300 s); meanwhile
    the sweep re-registers the VM for the same job (needs_registration) and GitHub runs
    the job on the new runner. The late event then requeues that RUNNING job, counted:
    with max_retries=0 a job that runs to success ends FAILED, and its demand is
    provisioned again. It could carry the command id of the crashed registration (or be
    ignored when the VM's runner started after it was sent)."""
    w, vm_id = one_vm_pool(r, max_retries=0)
    job_id = w.new_job(("self-hosted",))
    w.run_all()
    assert w.take_command(vm_id, ok=True)
    w.run_all()
    w.crash_runner(vm_id)  # the agent reports ready again at once (heartbeat)
    (late,) = [i for i in w.pending if i.kind == "agent_event" and i.args[1] == "runner_crashed"]
    w.pending.remove(late)  # held by a worker that is killed
    w.pass_time(11.0)
    w.pool.sweep()  # re-kicks the job whose VM needs a runner again
    w.run_all()
    assert w.take_command(vm_id, ok=True), w.describe()
    w.run_all()
    w.hand(job_id, vm_id)
    w.run_all()
    w.run(late)  # redelivered
    w.finish(vm_id, success=True)
    w.drain()
    w.check()
    got = w.store.get_job(job_id)
    assert got is not None and (got[0].state, got[0].retries) == (JobState.COMPLETED, 0), (
        w.describe()
    )


def test_scenario_state_report_written_after_its_streams_disconnect(r: redis.Redis) -> None:
    """The gateway writes an agent's state change and its stream's disconnect from
    different relay threads, so the disconnect can land first. The late report must not
    mark the VM connected again (it stayed "connected" to a dead stream until the
    heartbeat timeout: seen once in CI, test_a_vanished_agent_is_unregistered), nor
    overwrite what a newer stream of the VM reported."""
    w, vm_id = one_vm_pool(r)
    old = w.agents[vm_id].session
    w.down(vm_id)
    # The gateway removed the stream before writing its disconnect: it no longer holds it.
    for holds in (None, lambda: False):
        assert w.events.agent_state(vm_id, AgentState.IDLE, session=old, holds=holds) == "noop"
    vm = w.vms()[vm_id]
    assert (vm.connected, vm.session, vm.agent) == (False, "", AgentState.READY)

    w.boot(vm_id)  # a new stream, which reports ready
    new = w.agents[vm_id].session
    # Another replica's stream still held, until that replica hears of the new one.
    report = w.events.agent_state(vm_id, AgentState.DRAINING, session=old, holds=lambda: True)
    assert report == "noop"
    assert w.vms()[vm_id].agent is AgentState.READY
    assert w.events.agent_state(vm_id, AgentState.IDLE, session=new) == "applied"
    vm = w.vms()[vm_id]
    assert (vm.connected, vm.session, vm.agent) == (True, new, AgentState.IDLE)
    w.check()


def test_scenario_a_report_that_keeps_losing_its_write_is_retried_not_dropped(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every compare-and-set attempt of a report lost to other writers: the report must
    come back as a TemporaryError (the Celery task retries it, the gateway ends the stream
    for the agent to send again, the bridge nacks), not return quietly with nothing
    written."""
    w, vm_id = one_vm_pool(r)
    before = w.vms()[vm_id]
    session = w.agents[vm_id].session
    real_save = w.store.save

    def contended(*args: Any, **kwargs: Any) -> None:
        raise Conflict(f"vm:{vm_id}")

    monkeypatch.setattr(w.store, "save", contended)
    reports: list[Callable[[], str]] = [
        lambda: w.events.agent_state(vm_id, AgentState.IDLE, session=session),
        lambda: w.events.event(vm_id, "job_started", {"job_id": "j-x", "run_id": "1"}),
        lambda: w.events.disconnected(vm_id, session),
    ]
    for report in reports:
        with pytest.raises(TemporaryError, match="attempts"):
            report()
    assert w.vms()[vm_id] == before
    monkeypatch.setattr(w.store, "save", real_save)
    assert [report() for report in reports] == ["applied"] * 3


def test_scenario_a_lost_connect_write_is_healed_by_the_streams_next_report(
    r: redis.Redis,
) -> None:
    """Redis restarted (AOF everysec) and lost the write that recorded a VM's stream: the
    record says no stream. The agent's next state report, over the stream the gateway
    still holds, records the VM connected on it again, so the stream's disconnect later
    matches."""
    w, vm_id = one_vm_pool(r)
    session = w.agents[vm_id].session
    got = w.store.get_vm(vm_id)
    assert got is not None
    lost = got[0].with_(connected=False, session="")
    w.store.save(Change(vms={vm_id: lost}), {f"vm:{vm_id}": got[1]})

    report = w.events.agent_state(vm_id, AgentState.IDLE, session=session, holds=lambda: True)
    assert report == "applied"
    vm = w.vms()[vm_id]
    assert (vm.connected, vm.session, vm.agent) == (True, session, AgentState.IDLE)
    assert w.events.disconnected(vm_id, session) == "applied"
    assert not w.vms()[vm_id].connected
