"""Runner hygiene end to end at the wire: the real GithubApp against the FakeGitHub HTTP
server (JWT-checked), a real Redis, and runners registered the way the runner binary does."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis

from migctl.adapters.github import GithubApp
from migctl.adapters.redis_store import RedisStore
from migctl.domain.errors import TemporaryError
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.ports import RunnerCredentials, RunnerInfo, RunnerScope
from migctl.services.hygiene import Hygiene
from migctl.settings import Settings
from migctl.sim.github import FakeGitHub
from migctl.sim.keys import generate_app_key
from migctl.sim.runner_client import SimRunnerClient

pytestmark = pytest.mark.integration

APP_ID = "4242"
POOL = "pool-h"
ORG = "acme"
LABELS = ["self-hosted", "linux", "x64"]
DELETE = "DELETE /orgs/{org}/actions/runners/{runner_id}"


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        return self.t


@dataclasses.dataclass
class World:
    fake: FakeGitHub
    app: GithubApp
    store: RedisStore
    client: SimRunnerClient
    clock: Clock
    key_pem: str

    def settings(self, **github: Any) -> Settings:
        return Settings(
            pool={"id": POOL, "labels": LABELS},
            vm_manager={"provider": "sim"},
            github_app={
                "app_id": APP_ID,
                "private_key": self.key_pem,
                "base_url": self.fake.url,
                "org": ORG,
                **github,
            },
            pubsub={"source": "local"},
        )

    def hygiene(self, tokens: Any = None, **github: Any) -> Hygiene:
        return Hygiene(self.store, tokens or self.app, self.settings(**github), clock=self.clock)

    def register(
        self, name: str, labels: Sequence[str] = LABELS, scope: RunnerScope | None = None
    ) -> int:
        """config.sh with a registration token the real adapter minted."""
        scope = scope or RunnerScope(org=ORG)
        creds: RunnerCredentials = self.app.runner_credentials(scope, name, labels, jit=False)
        return self.client.register(
            creds.runner_url, name, list(labels), token=creds.registration_token
        )

    def offline(self, name: str, labels: Sequence[str] = LABELS) -> int:
        """A runner whose machine died: registered, no longer polling."""
        runner_id = self.register(name, labels)
        self.fake.set_runner_offline(runner_id)
        return runner_id

    def busy(self, name: str) -> int:
        """A runner that took a job (and then lost its machine: offline and still busy)."""
        runner_id = self.register(name)
        self.fake.add_job(f"{ORG}/app", LABELS, org=ORG, duration=60)
        job = self.client.next_job(runner_id, wait=5)
        assert job is not None
        self.fake.set_runner_offline(runner_id)
        return runner_id

    def names(self) -> set[str]:
        return {r["name"] for r in self.fake.runners()}

    def put(self, *vms: Vm) -> None:
        self.store.save(Change(vms={vm.id: vm for vm in vms}), {})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_app_key()


@pytest.fixture
def world(redis_url: str, keys: tuple[bytes, bytes]) -> Iterator[World]:
    r = redis.Redis.from_url(redis_url)
    fake = FakeGitHub(APP_ID, keys[1]).start()
    clock = Clock()
    key_pem = keys[0].decode()
    gh = Settings(
        pool={"id": POOL},
        vm_manager={"provider": "sim"},
        github_app={"app_id": APP_ID, "private_key": key_pem, "base_url": fake.url, "org": ORG},
        pubsub={"source": "local"},
    ).github_app
    app = GithubApp(gh, r, POOL, sleep=lambda _s: None)
    client = SimRunnerClient(fake.url)
    yield World(fake, app, RedisStore(r, POOL), client, clock, key_pem)
    client.close()
    app.close()
    fake.stop()
    r.close()


def live(vm_id: str, **kw: Any) -> Vm:
    fields: dict[str, Any] = dict(
        labels=tuple(LABELS),
        infra=InfraStatus.RUNNING,
        agent=AgentState.READY,
        connected=True,
        created_at=time.time() - 600,
    )
    fields.update(kw)
    return Vm(id=vm_id, **fields)


def test_orphans_go_busy_and_live_and_foreign_runners_stay_and_a_missing_runner_is_flagged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.offline("pool-h-0a0a0a")  # no VM record: orphan
    world.offline("pool-h-0b0b0b")  # its VM is stopped: orphan
    world.busy("pool-h-0c0c0c")  # no VM, but running a job: never deleted
    world.offline("pool-h-0d0d0d")  # its VM is alive (a blip): kept
    world.register("pool-h-0e0e0e")  # online, VM alive: kept
    world.offline("pool-other-0f0f0f")  # another pool's
    world.offline("pool-h-gpu-1a1a1a")  # a pool whose id extends ours
    world.offline("laptop")  # somebody's own runner
    world.offline("pool-h-2b2b2b", labels=["self-hosted", "windows"])  # our name, not our labels
    now = world.clock.now()
    world.put(
        live("pool-h-0b0b0b", infra=InfraStatus.STOPPED, connected=False, agent=AgentState.NONE),
        live("pool-h-0d0d0d"),
        live("pool-h-0e0e0e", agent=AgentState.IDLE, runner_registered=True),
        # Registration sent 5 minutes ago and acked: its runner should be online by now.
        live("pool-h-3c3c3c", reserved_job="77", reserved_at=now - 300),
        # Sent 10 s ago: still within the grace period.
        live("pool-h-4d4d4d", reserved_job="78", reserved_at=now - 10),
    )

    with caplog.at_level(logging.INFO, logger="migctl.services.hygiene"):
        report = world.hygiene().run()

    assert sorted(report.deleted) == ["pool-h-0a0a0a", "pool-h-0b0b0b"]
    assert report.busy == ["pool-h-0c0c0c"]
    assert report.never_appeared == ["pool-h-3c3c3c"]
    assert report.failed == [] and report.strays == []
    assert report.scopes == [ORG]
    assert report.ours == 5 and report.listed == 9
    assert world.names() == {
        "pool-h-0c0c0c",
        "pool-h-0d0d0d",
        "pool-h-0e0e0e",
        "pool-other-0f0f0f",
        "pool-h-gpu-1a1a1a",
        "laptop",
        "pool-h-2b2b2b",
    }
    assert world.fake.calls[DELETE] == 2  # the busy runner was never even tried
    counters = world.store.counters()
    assert counters["hygiene_deleted_runners"] == 2
    assert counters["runner_never_appeared"] == 1
    flagged = [r for r in caplog.records if "pool-h-3c3c3c" in r.getMessage()]
    assert [r.levelno for r in flagged] == [logging.WARNING]
    assert "reserved for job 77" in flagged[0].getMessage()
    # The flag changes no VM record.
    got = world.store.get_vm("pool-h-3c3c3c")
    assert got is not None and got[0].reserved_job == "77" and not got[0].unhealthy
    assert report.actions == {
        "deleted": report.deleted,
        "busy": ["pool-h-0c0c0c"],
        "never_appeared": ["pool-h-3c3c3c"],
    }

    # Level-triggered: a second pass deletes nothing more, reports the flag again and
    # counts it once.
    again = world.hygiene().run()
    assert again.deleted == [] and again.never_appeared == ["pool-h-3c3c3c"]
    assert world.store.counters()["runner_never_appeared"] == 1
    assert world.fake.calls[DELETE] == 2


class StaleListing:
    """The real adapter, but its listing is from a moment earlier: runners in `idle` were
    idle then (GitHub hands them a job between our list and our delete)."""

    def __init__(self, app: GithubApp, idle: set[str]) -> None:
        self.app, self.idle = app, idle

    def list_runners(self, scope: RunnerScope) -> list[RunnerInfo]:
        return [
            dataclasses.replace(r, busy=False) if r.name in self.idle else r
            for r in self.app.list_runners(scope)
        ]

    def delete_runner(self, scope: RunnerScope, runner_id: int) -> None:
        self.app.delete_runner(scope, runner_id)

    def runner_credentials(self, *args: Any, **kwargs: Any) -> RunnerCredentials:
        raise AssertionError("hygiene never mints credentials")


def test_a_runner_that_took_a_job_since_the_listing_is_skipped_when_github_refuses(
    world: World,
) -> None:
    world.busy("pool-h-5e5e5e")
    world.offline("pool-h-6f6f6f")
    report = world.hygiene(StaleListing(world.app, {"pool-h-5e5e5e"})).run()
    assert report.busy == ["pool-h-5e5e5e"]  # GitHub's 422, logged and skipped
    assert report.deleted == ["pool-h-6f6f6f"]  # and the pass went on
    assert report.failed == []
    assert world.names() == {"pool-h-5e5e5e"}
    assert world.store.counters()["hygiene_busy_skipped"] == 1


def test_repo_scope_lists_the_repositories_of_the_pools_jobs(world: World) -> None:
    repo = f"{ORG}/app"
    scope = RunnerScope(org=ORG, repo=repo)
    app = GithubApp(
        world.settings(runner_scope="repo").github_app,
        world.store.r,
        POOL,
        sleep=lambda _s: None,
    )
    try:
        creds = app.runner_credentials(scope, "pool-h-7a7a7a", LABELS, jit=False)
        runner_id = world.client.register(
            creds.runner_url, "pool-h-7a7a7a", LABELS, token=creds.registration_token
        )
        world.fake.set_runner_offline(runner_id)
        hygiene = world.hygiene(app, runner_scope="repo")
        assert hygiene.run().scopes == []  # no job yet: no repository known
        job = Job(id="9", labels=tuple(LABELS), org=ORG, repo=repo, state=JobState.COMPLETED)
        world.store.save(Change(jobs={job.id: job}), {})
        report = hygiene.run()
    finally:
        app.close()
    assert report.scopes == [repo]
    assert report.deleted == ["pool-h-7a7a7a"]
    assert not any(r["target"] == repo for r in world.fake.runners())


def test_a_listing_that_fails_for_good_acts_on_nothing_and_says_why(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.offline("pool-h-8b8b8b")
    world.put(live("pool-h-9c9c9c", reserved_job="1", reserved_at=world.clock.now() - 600))
    world.app.list_runners(RunnerScope(org=ORG))  # warm the token cache: the fault hits the list
    world.fake.fail_next(1, status=403, path_prefix=f"/orgs/{ORG}/actions/runners")
    with caplog.at_level(logging.ERROR, logger="migctl.services.hygiene"):
        report = world.hygiene().run()
    assert report.deleted == [] and report.never_appeared == []
    assert "could not be listed" in report.detail
    assert any("cannot list the runners of acme" in r.getMessage() for r in caplog.records)
    assert world.store.counters()["hygiene_list_errors"] == 1
    assert "pool-h-8b8b8b" in world.names()


def test_a_temporary_listing_failure_is_raised_for_the_task_to_retry(world: World) -> None:
    world.app.list_runners(RunnerScope(org=ORG))
    world.fake.fail_next(3, status=502, path_prefix=f"/orgs/{ORG}/actions/runners")
    with pytest.raises(TemporaryError):
        world.hygiene().run()


def test_one_pass_at_a_time(world: World) -> None:
    world.offline("pool-h-0a1b2c")
    with world.store.try_lock("hygiene", timeout=10) as got:
        assert got
        report = world.hygiene().run()
    assert report.detail == "another hygiene pass is running" and report.deleted == []
    assert world.hygiene().run().deleted == ["pool-h-0a1b2c"]


def test_deletes_per_pass_are_bounded(world: World) -> None:
    for i in range(5):
        world.offline(f"pool-h-00000{i}")
    hygiene = Hygiene(world.store, world.app, world.settings(), clock=world.clock, max_deletes=2)
    assert len(hygiene.run().deleted) == 2
    assert len(hygiene.run().deleted) == 2
    assert len(hygiene.run().deleted) == 1
    assert not any(n.startswith("pool-h-0000") for n in world.names())


def test_a_vm_going_down_and_a_draining_vm_keep_their_runners_unflagged(world: World) -> None:
    world.offline("pool-h-1d1d1d")
    now = world.clock.now()
    world.put(
        live(
            "pool-h-1d1d1d", lifecycle=Lifecycle.STOPPING, reserved_job="5", reserved_at=now - 900
        ),
        live(
            "pool-h-2e2e2e", lifecycle=Lifecycle.DRAINING, reserved_job="6", reserved_at=now - 900
        ),
    )
    report = world.hygiene().run()
    assert report.deleted == [] and report.never_appeared == []
    assert "pool-h-1d1d1d" in world.names()
