"""Pure tables for the GCE adapter's edge: statuses, error kinds, request ids, batching."""

from __future__ import annotations

import uuid

import pytest
from google.cloud import compute_v1

from migctl.adapters.gce import (
    MAX_PER_CALL,
    TokenBucket,
    chunked,
    error_kind,
    infra_status,
    provider_vm,
    request_id,
    to_error,
)
from migctl.domain.errors import (
    CapacityExhausted,
    NotFound,
    PermanentError,
    RateLimited,
    TemporaryError,
)
from migctl.domain.model import InfraStatus as S
from migctl.sim.compute_fake import ManualClock


@pytest.mark.parametrize(
    ("instance_status", "current_action", "expected"),
    [
        ("", "CREATING", S.CREATING),  # instanceStatus is empty until the VM exists
        ("", "CREATING_WITHOUT_RETRIES", S.CREATING),
        ("STAGING", "CREATING", S.CREATING),
        ("RUNNING", "RECREATING", S.CREATING),
        ("TERMINATED", "STARTING", S.STARTING),
        ("SUSPENDED", "RESUMING", S.STARTING),
        ("RUNNING", "RESTARTING", S.STARTING),
        ("RUNNING", "STOPPING", S.STOPPING),
        ("RUNNING", "SUSPENDING", S.SUSPENDING),
        ("RUNNING", "DELETING", S.DELETING),
        ("TERMINATED", "DELETING", S.DELETING),
        ("RUNNING", "ABANDONING", S.DELETING),
        ("RUNNING", "NONE", S.RUNNING),
        ("RUNNING", "VERIFYING", S.RUNNING),
        ("RUNNING", "REFRESHING", S.RUNNING),
        ("RUNNING", "", S.RUNNING),
        ("PROVISIONING", "NONE", S.STARTING),
        ("STAGING", "VERIFYING", S.STARTING),
        ("PENDING", "NONE", S.STARTING),
        ("STOPPING", "NONE", S.STOPPING),
        ("PENDING_STOP", "NONE", S.STOPPING),
        ("DEPROVISIONING", "NONE", S.STOPPING),
        ("TERMINATED", "NONE", S.STOPPED),
        ("STOPPED", "NONE", S.STOPPED),
        ("SUSPENDING", "NONE", S.SUSPENDING),
        ("SUSPENDED", "NONE", S.SUSPENDED),
        ("REPAIRING", "NONE", S.UNKNOWN),
        ("", "NONE", S.UNKNOWN),
        ("SOMETHING_NEW", "SOMETHING_ELSE", S.UNKNOWN),
        ("RUNNING", "UNDEFINED_CURRENT_ACTION", S.RUNNING),
    ],
)
def test_infra_status(instance_status: str, current_action: str, expected: S) -> None:
    assert infra_status(instance_status, current_action) is expected


@pytest.mark.parametrize(
    ("status", "reasons", "message", "kind"),
    [
        (404, ["notFound"], "The resource was not found", "not_found"),
        (None, ["RESOURCE_NOT_FOUND"], "", "not_found"),
        (403, ["rateLimitExceeded"], "Rate Limit Exceeded", "rate_limited"),
        (403, ["userRateLimitExceeded"], "", "rate_limited"),
        (429, [], "Quota exceeded for quota metric 'Read requests'", "rate_limited"),
        (429, ["quotaExceeded"], "", "rate_limited"),  # 429 is a rate, not a resource quota
        (500, ["backendError"], "", "temporary"),
        (502, [], "", "temporary"),
        (503, ["backendError"], "", "temporary"),
        (504, [], "", "temporary"),
        (408, [], "", "temporary"),
        (503, ["ZONE_RESOURCE_POOL_EXHAUSTED"], "", "capacity"),
        (None, ["ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"], "", "capacity"),
        (403, ["QUOTA_EXCEEDED"], "Quota 'CPUS' exceeded", "capacity"),
        (403, ["quotaExceeded"], "", "capacity"),
        (
            400,
            ["UNKNOWN"],
            "The zone does not have enough resources: resource pool exhausted",
            "capacity",
        ),
        (400, ["resourceNotReady"], "", "not_ready"),
        (400, ["RESOURCE_NOT_READY"], "", "not_ready"),
        (412, ["conditionNotMet"], "fingerprint", "not_ready"),
        (401, ["authError"], "", "auth"),
        (403, ["forbidden"], "Required 'compute.instanceGroupManagers.update'", "permission"),
        (403, [], "", "permission"),
        (400, ["invalid"], "", "invalid"),
        (409, ["alreadyExists"], "", "invalid"),
        (None, [], "", "invalid"),
    ],
)
def test_error_kind(status: int | None, reasons: list[str], message: str, kind: str) -> None:
    assert error_kind(status, reasons, message) == kind


@pytest.mark.parametrize(
    ("kind", "what", "error_type", "delay", "says"),
    [
        ("rate_limited", "stop", RateLimited, 10.0, "rate limit"),
        ("capacity", "create", CapacityExhausted, 60.0, "capacity"),
        ("temporary", "stop", TemporaryError, 5.0, "retry"),
        ("not_ready", "stop", TemporaryError, 5.0, "retry"),
        ("not_found", "stop", NotFound, None, "not found"),
        ("not_found", "list", PermanentError, None, "gcp.mig_name"),
        ("permission", "stop", PermanentError, None, "compute.instanceGroupManagers.update"),
        ("permission", "list", PermanentError, None, "compute.instanceGroupManagers.get"),
        ("permission", "poll", PermanentError, None, "compute.zoneOperations.get"),
        ("auth", "list", PermanentError, None, "gcp.credentials_file"),
        ("invalid", "create", PermanentError, None, "rejected"),
    ],
)
def test_to_error(kind: str, what: str, error_type: type, delay: float | None, says: str) -> None:
    error = to_error(kind, what, "projects/p/zones/z/instanceGroupManagers/m", "detail")
    assert type(error) is error_type
    assert says in str(error)
    assert getattr(error, "delay", None) == delay


def test_retry_after_overrides_the_default_delay() -> None:
    error = to_error("rate_limited", "stop", "m", "slow down", retry_after=7.0)
    assert isinstance(error, RateLimited)
    assert error.delay == 7.0


def test_request_id_with_intent_is_stable_and_order_free() -> None:
    one = request_id("stop", "mig", ["a", "b"], "task-1")
    assert one == request_id("stop", "mig", ["b", "a"], "task-1")
    assert uuid.UUID(one).version == 5
    others = {
        request_id("start", "mig", ["a", "b"], "task-1"),
        request_id("stop", "mig", ["a"], "task-1"),
        request_id("stop", "mig", ["a", "b"], "task-2"),
        request_id("stop", "other", ["a", "b"], "task-1"),
    }
    assert one not in others
    assert len(others) == 4


def test_request_id_without_intent_is_fresh() -> None:
    ids = {request_id("stop", "mig", ["a"], None) for _ in range(3)}
    assert len(ids) == 3
    assert all(uuid.UUID(i).int != 0 for i in ids)  # GCE rejects the zero UUID


@pytest.mark.parametrize(
    ("count", "sizes"),
    [
        (0, []),
        (1, [1]),
        (1000, [1000]),
        (1001, [1000, 1]),
        (1500, [1000, 500]),
        (2000, [1000, 1000]),
    ],
)
def test_chunked(count: int, sizes: list[int]) -> None:
    names = [f"vm-{i}" for i in range(count)]
    chunks = list(chunked(names))
    assert [len(c) for c in chunks] == sizes
    assert [n for c in chunks for n in c] == names
    assert MAX_PER_CALL == 1000


def test_chunked_drops_repeated_names() -> None:
    assert list(chunked(["a", "b", "a", "c"], size=2)) == [["a", "b"], ["c"]]


def test_provider_vm_from_managed_instance() -> None:
    mi = compute_v1.ManagedInstance(
        instance="https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/runner-1",
        current_action="CREATING",
    )
    vm = provider_vm(mi)
    assert (vm.name, vm.status, vm.created_at) == ("runner-1", S.CREATING, 0.0)
    assert vm.detail == "-/CREATING"


def test_provider_vm_detail_carries_the_last_attempt_error() -> None:
    mi = compute_v1.ManagedInstance.from_json(
        '{"name": "runner-2", "currentAction": "CREATING", "lastAttempt": {"errors": {"errors":'
        ' [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "no e2-standard-2"}]}}}',
        ignore_unknown_fields=True,
    )
    vm = provider_vm(mi)
    assert vm.status is S.CREATING
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in vm.detail


def test_token_bucket_allows_a_burst_then_paces() -> None:
    clock = ManualClock()
    bucket = TokenBucket(2.0, clock)
    assert bucket.take(0.0) == (True, 0.0)
    assert bucket.take(0.0) == (True, 0.0)
    assert bucket.take(0.0) == (False, 0.5)  # refused, nothing reserved
    assert bucket.take(1.0) == (True, 0.5)  # reserved: wait half a second first
    clock.advance(1.0)
    assert bucket.take(0.0) == (True, 0.0)


def test_token_bucket_below_one_call_per_second_still_allows_one() -> None:
    clock = ManualClock()
    bucket = TokenBucket(0.5, clock)
    assert bucket.take(0.0) == (True, 0.0)
    assert bucket.take(0.0) == (False, 2.0)
    clock.advance(2.0)
    assert bucket.take(0.0)[0]
