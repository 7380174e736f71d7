"""One contract for every VmProvider: GceMig over FakeCompute (HTTP) and SimMig (Redis).

A world is a provider plus the means to let time pass; every case starts from an empty MIG.
To add a provider, add a factory to WORLDS.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pytest

from migctl.adapters.gce import GceMig
from migctl.domain.errors import NotFound
from migctl.domain.model import InfraStatus as S
from migctl.ports import VmProvider
from migctl.settings import GcpSettings
from migctl.sim.compute_fake import FakeCompute, ManualClock

pytestmark = pytest.mark.integration

SETTLE_S = 600.0  # longer than any action takes in either world


@dataclass
class World:
    provider: VmProvider
    advance: Callable[[float], None]
    vanish: Callable[[str], None]

    def settle(self) -> None:
        self.advance(SETTLE_S)

    def statuses(self) -> dict[str, S]:
        return {vm.name: vm.status for vm in self.provider.list()}


def gce_world() -> Iterator[World]:
    clock = ManualClock()
    fake = FakeCompute(clock=clock).start()
    settings = GcpSettings(
        project_id=fake.project,
        zone=fake.zone,
        mig_name=fake.mig,
        api_endpoint=fake.url,
        anonymous=True,
        api_calls_per_second=10_000.0,
    )
    try:
        yield World(GceMig(settings, clock, sleep=lambda s: None), clock.advance, fake.vanish)
    finally:
        fake.stop()


def sim_world() -> Iterator[World]:
    import redis

    from migctl.sim.mig import SimMig, SimTimings

    client = redis.Redis.from_url("redis://127.0.0.1:6379/13")
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI") == "true":
            pytest.fail("Redis at 127.0.0.1:6379 is required under CI=true")
        pytest.skip("no Redis at 127.0.0.1:6379")
    client.flushdb()  # DB 13 belongs to this suite
    clock = ManualClock()
    sim = SimMig(client, "contract", SimTimings.gce_like(), clock.now)
    try:
        yield World(sim, clock.advance, sim.vanish)
    finally:
        client.flushdb()
        client.close()


WORLDS: dict[str, Callable[[], Iterator[World]]] = {"gce": gce_world, "sim": sim_world}


@pytest.fixture(params=sorted(WORLDS))
def world(request: Any) -> Iterator[World]:
    yield from WORLDS[request.param]()


def running(world: World, *names: str) -> None:
    world.provider.create(list(names))
    world.settle()
    assert world.statuses() == dict.fromkeys(names, S.RUNNING)


def test_an_empty_mig_lists_nothing(world: World) -> None:
    assert world.provider.list() == []


def test_create_appears_then_runs(world: World) -> None:
    world.provider.create(["vm-a", "vm-b"])
    assert set(world.statuses().values()) <= {S.CREATING, S.RUNNING}
    assert set(world.statuses()) == {"vm-a", "vm-b"}
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING, "vm-b": S.RUNNING}


def test_stop_then_stopped(world: World) -> None:
    running(world, "vm-a", "vm-b")
    world.provider.stop(["vm-a"])
    assert world.statuses()["vm-a"] in {S.STOPPING, S.STOPPED}
    world.settle()
    assert world.statuses() == {"vm-a": S.STOPPED, "vm-b": S.RUNNING}


def test_start_a_stopped_vm(world: World) -> None:
    running(world, "vm-a")
    world.provider.stop(["vm-a"])
    world.settle()
    world.provider.start(["vm-a"])
    assert world.statuses()["vm-a"] in {S.STARTING, S.RUNNING}
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING}


def test_suspend_then_resume(world: World) -> None:
    running(world, "vm-a")
    world.provider.suspend(["vm-a"])
    assert world.statuses()["vm-a"] in {S.SUSPENDING, S.SUSPENDED}
    world.settle()
    assert world.statuses() == {"vm-a": S.SUSPENDED}
    world.provider.resume(["vm-a"])
    assert world.statuses()["vm-a"] in {S.STARTING, S.RUNNING}
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING}


def test_delete_then_gone(world: World) -> None:
    running(world, "vm-a", "vm-b")
    world.provider.delete(["vm-a"])
    assert world.statuses().get("vm-a", S.GONE) in {S.DELETING, S.GONE}
    world.settle()
    assert world.statuses() == {"vm-b": S.RUNNING}


def test_repeats_are_idempotent(world: World) -> None:
    p = world.provider
    p.create(["vm-a"])
    p.create(["vm-a"])
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING}
    p.stop(["vm-a"])
    p.stop(["vm-a"])  # while stopping
    world.settle()
    p.stop(["vm-a"])  # once stopped
    assert world.statuses() == {"vm-a": S.STOPPED}
    p.start(["vm-a"])
    p.start(["vm-a"])
    world.settle()
    p.start(["vm-a"])
    p.suspend(["vm-a"])
    p.suspend(["vm-a"])
    world.settle()
    p.suspend(["vm-a"])
    p.resume(["vm-a"])
    p.resume(["vm-a"])
    world.settle()
    p.resume(["vm-a"])
    assert world.statuses() == {"vm-a": S.RUNNING}
    p.delete(["vm-a"])
    p.delete(["vm-a"])
    world.settle()
    assert world.statuses() == {}


def test_repeated_names_in_one_batch_count_once(world: World) -> None:
    world.provider.create(["vm-a", "vm-a", "vm-b"])
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING, "vm-b": S.RUNNING}


def test_an_empty_batch_does_nothing(world: World) -> None:
    for action in ("create", "start", "stop", "suspend", "resume", "delete"):
        getattr(world.provider, action)([])
    assert world.provider.list() == []


@pytest.mark.parametrize("action", ["start", "stop", "suspend", "resume"])
def test_unknown_names_are_not_found(world: World, action: str) -> None:
    running(world, "vm-a")
    with pytest.raises(NotFound):
        getattr(world.provider, action)(["ghost-1", "ghost-2"])
    assert world.statuses() == {"vm-a": S.RUNNING}


def test_deleting_unknown_names_is_done_or_not_found(world: World) -> None:
    # GceMig: done (GCE skips them); SimMig: NotFound. Callers treat both as "gone".
    with suppress(NotFound):
        world.provider.delete(["ghost"])
    assert world.provider.list() == []


def test_a_batch_acts_on_the_names_it_knows(world: World) -> None:
    running(world, "vm-a", "vm-b")
    world.provider.stop(["vm-a", "ghost"])
    world.settle()
    assert world.statuses() == {"vm-a": S.STOPPED, "vm-b": S.RUNNING}


def test_a_vanished_vm_is_gone(world: World) -> None:
    running(world, "vm-a", "vm-b")
    world.vanish("vm-a")
    assert world.statuses() == {"vm-b": S.RUNNING}
    with pytest.raises(NotFound):
        world.provider.stop(["vm-a"])
    world.provider.create(["vm-a"])  # the name is free again
    world.settle()
    assert world.statuses() == {"vm-a": S.RUNNING, "vm-b": S.RUNNING}
