"""GceMig with the real google-cloud-compute client against FakeCompute, at the HTTP wire."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import google.auth.exceptions
import pytest
import requests
from google.api_core import exceptions as api_exceptions

from migctl.adapters.gce import GceMig, RedisTokenBucket, StandbyPool
from migctl.domain.errors import (
    CapacityExhausted,
    NotFound,
    PermanentError,
    RateLimited,
    TemporaryError,
)
from migctl.domain.model import InfraStatus as S
from migctl.settings import GcpSettings
from migctl.sim.compute_fake import FakeCompute, ManualClock

pytestmark = pytest.mark.integration

MIG = "/compute/v1/projects/proj/zones/zone-a/instanceGroupManagers/mig1"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock: ManualClock) -> Iterator[FakeCompute]:
    server = FakeCompute(clock=clock).start()
    yield server
    server.stop()


def make_mig(endpoint: str, clock: ManualClock, rate: float = 1000.0, **kwargs: Any) -> GceMig:
    settings = GcpSettings(
        project_id="proj",
        zone="zone-a",
        mig_name="mig1",
        api_endpoint=endpoint,
        anonymous=True,
        api_calls_per_second=rate,
    )
    return GceMig(settings, clock, sleep=lambda seconds: None, **kwargs)


@pytest.fixture
def mig(fake: FakeCompute, clock: ManualClock) -> GceMig:
    return make_mig(fake.url, clock)


def calls(fake: FakeCompute, verb: str) -> list[Any]:
    return [r for r in fake.requests if r.path == f"{MIG}/{verb}"]


def statuses(mig: GceMig) -> dict[str, S]:
    return {vm.name: vm.status for vm in mig.list()}


# -- listing ---------------------------------------------------------------------------------


def test_list_is_one_call_when_pageless(fake: FakeCompute, mig: GceMig) -> None:
    for name, status in [("a", "RUNNING"), ("b", "TERMINATED"), ("c", "SUSPENDED")]:
        fake.add(name, status)
    assert statuses(mig) == {"a": S.RUNNING, "b": S.STOPPED, "c": S.SUSPENDED}
    assert len(calls(fake, "listManagedInstances")) == 1
    details = {vm.name: vm.detail for vm in mig.list()}
    assert details["b"] == "TERMINATED/NONE"


def test_list_follows_next_page_token(fake: FakeCompute, mig: GceMig) -> None:
    fake.page_size = 2
    for i in range(5):
        fake.add(f"vm-{i}")
    assert sorted(statuses(mig)) == [f"vm-{i}" for i in range(5)]
    pages = calls(fake, "listManagedInstances")
    assert [r.query.get("pageToken") for r in pages] == [None, "2", "4"]


def test_list_of_a_missing_mig_says_what_to_check(fake: FakeCompute, clock: ManualClock) -> None:
    settings = GcpSettings(
        project_id="proj", zone="zone-a", mig_name="nope", api_endpoint=fake.url, anonymous=True
    )
    with pytest.raises(PermanentError, match=r"gcp\.mig_name") as info:
        GceMig(settings, clock, sleep=lambda s: None).list()
    assert isinstance(info.value.__cause__, api_exceptions.NotFound)


# -- create and the lifecycle -----------------------------------------------------------------


def test_create_by_names(fake: FakeCompute, mig: GceMig, clock: ManualClock) -> None:
    mig.create(["runner-a", "runner-b"])
    (request,) = calls(fake, "createInstances")
    assert request.body == {"instances": [{"name": "runner-a"}, {"name": "runner-b"}]}
    assert statuses(mig) == {"runner-a": S.CREATING, "runner-b": S.CREATING}
    assert mig.standby().target_size == 2
    clock.advance(30)
    assert statuses(mig) == {"runner-a": S.RUNNING, "runner-b": S.RUNNING}


def test_actions_name_instances_by_zone_path(fake: FakeCompute, mig: GceMig) -> None:
    fake.add("a")
    mig.stop(["a"])
    mig.delete(["a"])
    assert calls(fake, "stopInstances")[0].body["instances"] == ["zones/zone-a/instances/a"]
    assert calls(fake, "deleteInstances")[0].body == {
        "instances": ["zones/zone-a/instances/a"],
        "skipInstancesOnValidationError": True,
    }


def test_stop_and_start_keep_the_targets_in_step(
    fake: FakeCompute, mig: GceMig, clock: ManualClock
) -> None:
    fake.add("a")
    fake.add("b")
    mig.stop(["a"])
    assert mig.standby() == StandbyPool(1, 1, 0, "MANUAL", 0)
    clock.advance(20)
    mig.start(["a"])
    assert mig.standby() == StandbyPool(2, 0, 0, "MANUAL", 0)
    mig.suspend(["b"])
    assert mig.standby().target_suspended_size == 1


def test_1500_names_make_two_calls_per_action(
    fake: FakeCompute, mig: GceMig, clock: ManualClock
) -> None:
    names = [f"r-{i:04d}" for i in range(1500)]
    mig.create(names)
    clock.advance(30)
    mig.stop(names)
    mig.delete(names)
    for verb, body_key in [
        ("createInstances", None),
        ("stopInstances", None),
        ("deleteInstances", None),
    ]:
        sent = calls(fake, verb)
        assert [len(r.body["instances"]) for r in sent] == [1000, 500], (verb, body_key)
    create = calls(fake, "createInstances")
    assert [i["name"] for r in create for i in r.body["instances"]] == names
    stop = calls(fake, "stopInstances")
    assert [i for r in stop for i in r.body["instances"]] == [
        f"zones/zone-a/instances/{n}" for n in names
    ]
    assert all(r.body["skipInstancesOnValidationError"] for r in calls(fake, "deleteInstances"))
    assert not calls(fake, "listManagedInstances")  # no settling was needed


# -- request ids and operations -------------------------------------------------------------------


def test_every_mutation_carries_a_request_id(
    fake: FakeCompute, mig: GceMig, clock: ManualClock
) -> None:
    mig.create(["a"])
    clock.advance(30)
    mig.suspend(["a"])
    clock.advance(30)
    mig.resume(["a"])
    clock.advance(30)
    mig.stop(["a"])
    clock.advance(30)
    mig.start(["a"])
    mig.set_standby(stopped=1)
    mig.delete(["a"])
    sent = fake.mutations()
    assert len(sent) == 7
    ids = [r.query["requestId"] for r in sent]
    assert all(uuid.UUID(i).int for i in ids)
    assert len(set(ids)) == 7


def test_a_retried_intent_is_deduplicated_by_gce(fake: FakeCompute, mig: GceMig) -> None:
    fake.add("a")
    fake.fail_next(1, 503, match="/operations/")  # the stop went through; its poll did not
    with pytest.raises(TemporaryError):
        mig.stop(["a"], intent="task-42")
    mig.stop(["a"], intent="task-42")
    first, second = calls(fake, "stopInstances")
    assert first.query["requestId"] == second.query["requestId"]
    assert (fake.target_size, fake.target_stopped_size) == (0, 1)  # stopped once, not twice
    assert not calls(fake, "listManagedInstances")  # the fake answered with the first operation


def test_operations_are_polled_at_the_configured_endpoint(fake: FakeCompute, mig: GceMig) -> None:
    fake.op_polls = 3
    fake.add("a")
    mig.stop(["a"])
    polls = [r for r in fake.requests if "/operations/" in r.path]
    assert len(polls) == 3
    assert {r.method for r in polls} == {"GET"}
    assert len({r.path for r in polls}) == 1
    assert polls[0].path.startswith("/compute/v1/projects/proj/zones/zone-a/operations/operation-")


def test_an_operation_that_never_finishes_becomes_temporary(
    fake: FakeCompute, clock: ManualClock
) -> None:
    fake.op_polls = 10**6
    fake.add("a")
    mig = make_mig(fake.url, clock, op_timeout=60.0)
    mig._sleep = clock.advance  # polling waits pass on the fake clock
    with pytest.raises(TemporaryError, match="still RUNNING"):
        mig.stop(["a"])


# -- idempotency and vanished VMs ------------------------------------------------------------


def test_repeats_are_idempotent(fake: FakeCompute, mig: GceMig, clock: ManualClock) -> None:
    mig.create(["a"])
    mig.create(["a"])  # 409 alreadyExists -> listed -> already there
    clock.advance(30)
    mig.stop(["a"])
    mig.stop(["a"])  # STOPPING
    clock.advance(20)
    mig.stop(["a"])  # STOPPED
    assert statuses(mig) == {"a": S.STOPPED}
    assert (fake.target_size, fake.target_stopped_size) == (0, 1)
    mig.delete(["a"])
    mig.delete(["a"])
    clock.advance(20)
    mig.delete(["a"])
    assert statuses(mig) == {}


def test_a_mixed_batch_acts_on_the_ready_names(fake: FakeCompute, mig: GceMig) -> None:
    fake.add("a")
    fake.add("b", "TERMINATED")
    mig.stop(["a", "b", "ghost"])
    assert statuses(mig) == {"a": S.STOPPING, "b": S.STOPPED}
    second = calls(fake, "stopInstances")[-1]
    assert second.body["instances"] == ["zones/zone-a/instances/a"]


def test_a_vm_not_ready_for_the_action_is_temporary(fake: FakeCompute, mig: GceMig) -> None:
    mig.create(["a"])
    with pytest.raises(TemporaryError, match="a \\(CREATING\\)"):
        mig.stop(["a"])


def test_a_vm_in_the_wrong_settled_state_is_permanent(fake: FakeCompute, mig: GceMig) -> None:
    fake.add("a", "SUSPENDED")
    with pytest.raises(PermanentError, match="a \\(SUSPENDED\\)"):
        mig.start(["a"])


def test_vanished_vm(fake: FakeCompute, mig: GceMig) -> None:
    fake.add("a")
    fake.add("b")
    fake.vanish("a")
    assert statuses(mig) == {"b": S.RUNNING}
    with pytest.raises(NotFound) as info:
        mig.stop(["a"])
    assert isinstance(info.value.__cause__, api_exceptions.BadRequest)
    mig.stop(["a", "b"])
    assert statuses(mig) == {"b": S.STOPPING}
    mig.delete(["a"])  # already gone: done


# -- error mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "error_type", "kind"),
    [
        (503, "backendError", TemporaryError, "temporary"),
        (500, "backendError", TemporaryError, "temporary"),
        (429, "rateLimitExceeded", RateLimited, "rate_limited"),
        (403, "rateLimitExceeded", RateLimited, "rate_limited"),
        (403, "userRateLimitExceeded", RateLimited, "rate_limited"),
        (403, "forbidden", PermanentError, "permission"),
        (400, "invalid", PermanentError, "invalid"),
        (404, "notFound", PermanentError, "not_found"),  # listing: the MIG itself is missing
    ],
)
def test_http_errors_on_list(
    fake: FakeCompute, mig: GceMig, status: int, reason: str, error_type: type, kind: str
) -> None:
    fake.fail_next(1, status, reason)
    with pytest.raises(error_type) as info:
        mig.list()
    assert type(info.value) is error_type
    assert isinstance(info.value.__cause__, api_exceptions.GoogleAPICallError)
    assert info.value.__cause__.code == status
    assert mig.errors_by_kind == {kind: 1}


@pytest.mark.parametrize(
    ("status", "reason", "error_type", "says"),
    [
        (503, "backendError", TemporaryError, "retry"),
        (429, "rateLimitExceeded", RateLimited, "rate limit"),
        (403, "rateLimitExceeded", RateLimited, "rate limit"),
        (403, "forbidden", PermanentError, "compute.instanceGroupManagers.update"),
        (400, "invalid", PermanentError, "rejected"),
        (404, "notFound", NotFound, "not found"),
    ],
)
def test_http_errors_on_stop(
    fake: FakeCompute, mig: GceMig, status: int, reason: str, error_type: type, says: str
) -> None:
    fake.add("a")
    fake.fail_next(1, status, reason, match="stopInstances")
    with pytest.raises(error_type, match=says) as info:
        mig.stop(["a"])
    assert type(info.value) is error_type
    assert isinstance(info.value.__cause__, api_exceptions.GoogleAPICallError)
    assert fake.target_stopped_size == 0


def test_unauthorized_is_permanent(fake: FakeCompute, mig: GceMig) -> None:
    # The session answers a 401 by refreshing the token; anonymous credentials cannot.
    fake.fail_next(1, 401, "authError")
    with pytest.raises(PermanentError, match=r"gcp\.credentials_file") as info:
        mig.list()
    assert isinstance(info.value.__cause__, google.auth.exceptions.GoogleAuthError)
    assert mig.errors_by_kind == {"auth": 1}


def test_rate_limit_delay_comes_from_retry_after(fake: FakeCompute, mig: GceMig) -> None:
    fake.fail_next(1, 429, retry_after=7)
    with pytest.raises(RateLimited) as info:
        mig.list()
    assert info.value.delay == 7.0


@pytest.mark.parametrize(
    ("code", "status", "message", "error_type"),
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", 503, "", CapacityExhausted),
        ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", 503, "", CapacityExhausted),
        ("QUOTA_EXCEEDED", 403, "Quota 'CPUS' exceeded. Limit: 24.0", CapacityExhausted),
        ("UNSUPPORTED_OPERATION", 400, "The zone does not have enough resources "
         "available to fulfill the request: resource pool exhausted", CapacityExhausted),
        ("INTERNAL_ERROR", 500, "", TemporaryError),
        ("PERMISSION_DENIED", 403, "iam.serviceAccounts.actAs", PermanentError),
    ],
)  # fmt: skip
def test_operation_errors_on_create(
    fake: FakeCompute, mig: GceMig, code: str, status: int, message: str, error_type: type
) -> None:
    fake.fail_next(1, status, code=code, message=message)
    with pytest.raises(error_type) as info:
        mig.create(["a"])
    assert type(info.value) is error_type
    assert code in str(info.value.__cause__)
    assert fake.names() == []  # a failed operation changes nothing


def test_capacity_error_is_not_settled_away(fake: FakeCompute, mig: GceMig) -> None:
    fake.fail_next(1, 503, code="ZONE_RESOURCE_POOL_EXHAUSTED")
    with pytest.raises(CapacityExhausted) as info:
        mig.create(["a"])
    assert info.value.delay == 60.0
    assert mig.errors_by_kind["capacity"] == 1


def test_connection_refused_is_temporary(clock: ManualClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mig = make_mig(f"http://127.0.0.1:{port}", clock)
    with pytest.raises(TemporaryError) as info:
        mig.list()
    assert isinstance(info.value.__cause__, requests.ConnectionError)
    assert mig.errors_by_kind == {"temporary": 1}


def test_a_timeout_is_temporary(fake: FakeCompute, clock: ManualClock) -> None:
    fake.hang_next(1, match="listManagedInstances")
    mig = make_mig(fake.url, clock, timeout=0.3)
    with pytest.raises(TemporaryError) as info:
        mig.list()
    assert isinstance(info.value.__cause__, requests.Timeout)


def test_errors_are_counted_by_kind(fake: FakeCompute, mig: GceMig) -> None:
    fake.fail_next(2, 503)
    fake.fail_next(1, 403, "rateLimitExceeded")
    for _ in range(3):
        with pytest.raises(TemporaryError):
            mig.list()
    assert mig.errors_by_kind == {"temporary": 2, "rate_limited": 1}


# -- standby pool ----------------------------------------------------------------------------------


def test_standby_read_and_patch(fake: FakeCompute, mig: GceMig) -> None:
    assert mig.standby() == StandbyPool(0, 0, 0, "MANUAL", 0)
    mig.set_standby(stopped=2, suspended=0, mode="SCALE_OUT_POOL", initial_delay_sec=60)
    (patch,) = [r for r in fake.requests if r.method == "PATCH"]
    assert patch.path == MIG
    assert patch.body == {
        "targetStoppedSize": 2,
        "targetSuspendedSize": 0,
        "standbyPolicy": {"mode": "SCALE_OUT_POOL", "initialDelaySec": 60},
    }
    assert mig.standby() == StandbyPool(0, 2, 0, "SCALE_OUT_POOL", 60)


def test_standby_patch_sends_only_what_changes(fake: FakeCompute, mig: GceMig) -> None:
    mig.set_standby(mode="MANUAL")
    mig.set_standby()  # nothing to change: no call
    patches = [r.body for r in fake.requests if r.method == "PATCH"]
    assert patches == [{"standbyPolicy": {"mode": "MANUAL"}}]
    with pytest.raises(ValueError, match="SCALE_OUT_POOL"):
        mig.set_standby(mode="AUTO")


# -- client-side rate limit ----------------------------------------------------------------------


def test_the_local_bucket_refuses_instead_of_blocking(
    fake: FakeCompute, clock: ManualClock
) -> None:
    mig = make_mig(fake.url, clock, rate=2.0, max_throttle_wait=0.0)
    mig.list()
    mig.list()
    with pytest.raises(RateLimited, match=r"gcp\.api_calls_per_second") as info:
        mig.list()
    assert info.value.delay == 0.5
    assert len(calls(fake, "listManagedInstances")) == 2
    clock.advance(0.5)
    mig.list()


@pytest.fixture
def redis_db13() -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/13")
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI") == "true":
            pytest.fail("Redis at 127.0.0.1:6379 is required under CI=true")
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield client
    client.close()


def test_the_redis_bucket_is_shared_between_processes(redis_db13: Any, clock: ManualClock) -> None:
    key = f"test:gce-bucket:{uuid.uuid4()}"
    try:
        one = RedisTokenBucket(2.0, clock, redis_db13, key)
        two = RedisTokenBucket(2.0, clock, redis_db13, key)
        assert one.take(0.0) == (True, 0.0)
        assert two.take(0.0) == (True, 0.0)
        assert one.take(0.0) == (False, 0.5)
        assert two.take(1.0) == (True, 0.5)
        clock.advance(1.0)
        assert one.take(0.0) == (True, 0.0)
    finally:
        redis_db13.delete(key)


def test_gce_mig_uses_the_redis_bucket(
    fake: FakeCompute, redis_db13: Any, clock: ManualClock
) -> None:
    mig = make_mig(fake.url, clock, rate=1.0, max_throttle_wait=0.0, redis=redis_db13)
    other = make_mig(fake.url, clock, rate=1.0, max_throttle_wait=0.0, redis=redis_db13)
    assert isinstance(mig.bucket, RedisTokenBucket)
    try:
        mig.list()
        with pytest.raises(RateLimited):
            other.list()
    finally:
        redis_db13.delete(mig.bucket.key)


def test_the_redis_bucket_falls_back_when_redis_is_down(clock: ManualClock) -> None:
    import redis
    import redis.backoff
    import redis.retry

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    down = redis.Redis(port=port, socket_connect_timeout=0.5, retry=no_retry)
    bucket = RedisTokenBucket(1.0, clock, down, "k")
    assert bucket.take(0.0) == (True, 0.0)
    assert bucket.take(0.0) == (False, 1.0)
    down.close()


# -- the fake's own dialect -----------------------------------------------------------------


def test_fake_resize_and_operation_wait_with_the_raw_client(fake: FakeCompute) -> None:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1

    options = ClientOptions(api_endpoint=fake.url)
    creds = AnonymousCredentials()
    migs = compute_v1.InstanceGroupManagersClient(credentials=creds, client_options=options)
    ops = compute_v1.ZoneOperationsClient(credentials=creds, client_options=options)
    ids = {"project": "proj", "zone": "zone-a", "instance_group_manager": "mig1"}
    op = migs.resize_unary(**ids, size=3)
    assert op.status == compute_v1.Operation.Status.RUNNING
    done = ops.wait(project="proj", zone="zone-a", operation=op.name)
    assert done.status == compute_v1.Operation.Status.DONE
    assert fake.requests[-1].path.endswith(f"/operations/{op.name}/wait")
    assert migs.get(**ids).target_size == 3
    assert len(fake.names()) == 3
    migs.resize_unary(**ids, size=1)
    assert migs.get(**ids).target_size == 1
    assert sum(i["currentAction"] == "DELETING" for i in map(fake.instance, fake.names())) == 2
