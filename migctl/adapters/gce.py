"""The VmProvider of a real zonal MIG, through google-cloud-compute (REST).

GCE vocabulary (instance statuses, current actions, HTTP reasons, operation error codes)
stops here: `infra_status` and `error_kind` map it to migctl's own types.
"""

from __future__ import annotations

import builtins
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from migctl.domain.errors import (
    CapacityExhausted,
    MigctlError,
    NotFound,
    PermanentError,
    RateLimited,
    TemporaryError,
)
from migctl.domain.model import InfraStatus
from migctl.ports import Clock, ProviderVm, SystemClock
from migctl.settings import GcpSettings

S = InfraStatus

# The MIG's current action wins over the VM's status: it says where the VM is going.
_BY_ACTION = {
    "CREATING": S.CREATING,
    "CREATING_WITHOUT_RETRIES": S.CREATING,
    "RECREATING": S.CREATING,
    "STARTING": S.STARTING,
    "RESUMING": S.STARTING,
    "RESTARTING": S.STARTING,
    "STOPPING": S.STOPPING,
    "SUSPENDING": S.SUSPENDING,
    "DELETING": S.DELETING,
    "ABANDONING": S.DELETING,  # leaving the group: gone from the pool's point of view
}
_BY_STATUS = {
    "PENDING": S.STARTING,
    "PROVISIONING": S.STARTING,
    "STAGING": S.STARTING,
    "RUNNING": S.RUNNING,
    "PENDING_STOP": S.STOPPING,
    "STOPPING": S.STOPPING,
    "DEPROVISIONING": S.STOPPING,
    "STOPPED": S.STOPPED,
    "TERMINATED": S.STOPPED,  # a stopped Compute instance reports TERMINATED
    "SUSPENDING": S.SUSPENDING,
    "SUSPENDED": S.SUSPENDED,
}


def infra_status(instance_status: str, current_action: str) -> InfraStatus:
    """Map a managed instance's `instanceStatus` and `currentAction` to an InfraStatus."""
    if current_action in _BY_ACTION:
        return _BY_ACTION[current_action]
    return _BY_STATUS.get(instance_status, S.UNKNOWN)


# Reasons (HTTP errors[].reason) and codes (operation error[].code), as GCE spells them.
_RATE = {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}
_CAPACITY = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "QUOTA_EXCEEDED",
    "quotaExceeded",
}
_NOT_FOUND = {"notFound", "RESOURCE_NOT_FOUND"}
# Not ready yet (an instance mid-action, a fingerprint race): worth retrying soon.
_NOT_READY = {"resourceNotReady", "RESOURCE_NOT_READY", "conditionNotMet", "CONDITION_NOT_MET"}

KINDS = ("rate_limited", "capacity", "not_found", "not_ready", "temporary", "auth", "permission")


def error_kind(status: int | None, reasons: Iterable[str] = (), message: str = "") -> str:
    """Classify a GCE error by HTTP status, reasons/codes and message (one of KINDS or invalid)."""
    found = set(reasons)
    text = message.lower()
    if status == 429 or found & _RATE:
        return "rate_limited"
    if found & _CAPACITY or "resource pool exhausted" in text or "resource_pool_exhausted" in text:
        return "capacity"
    if status == 404 or found & _NOT_FOUND:
        return "not_found"
    if found & _NOT_READY:
        return "not_ready"
    if status is not None and (status == 408 or status >= 500):
        return "temporary"
    if status == 401:
        return "auth"
    if status == 403:
        return "permission"
    return "invalid"


_DELAY = {"rate_limited": 10.0, "capacity": 60.0, "not_ready": 5.0, "temporary": 5.0}
_PERMISSION = {
    "list": "compute.instanceGroupManagers.get",
    "get": "compute.instanceGroupManagers.get",
    "poll": "compute.zoneOperations.get",
}


def to_error(
    kind: str, what: str, where: str, detail: str, retry_after: float | None = None
) -> MigctlError:
    """The migctl error for a classified GCE error; the message says what to check."""
    if kind == "rate_limited":
        return RateLimited(
            f"GCE rate limit on {what} {where}: {detail}", retry_after or _DELAY[kind]
        )
    if kind == "capacity":
        return CapacityExhausted(f"GCE out of capacity or quota on {what} {where}: {detail}")
    if kind in ("not_ready", "temporary"):
        return TemporaryError(
            f"GCE {what} {where} failed, retry: {detail}", retry_after or _DELAY[kind]
        )
    if kind == "not_found" and what in ("list", "get", "patch"):
        return PermanentError(
            f"GCE MIG {where} not found on {what}: check gcp.project_id, gcp.zone and "
            f"gcp.mig_name: {detail}"
        )
    if kind == "not_found":
        return NotFound(f"GCE {what} {where}: not found: {detail}")
    if kind == "permission":
        perm = _PERMISSION.get(what, "compute.instanceGroupManagers.update")
        return PermanentError(
            f"GCE permission denied on {what} {where}: the caller needs {perm} "
            f"(roles/compute.instanceAdmin.v1 has it); check the service account of "
            f"gcp.credentials_file or ADC and its IAM roles: {detail}"
        )
    if kind == "auth":
        return PermanentError(
            f"GCE rejected the credentials on {what} {where}: check gcp.credentials_file "
            f"or Application Default Credentials: {detail}"
        )
    return PermanentError(f"GCE rejected {what} {where}: {detail}")


def request_id(action: str, target: str, names: Sequence[str], intent: str | None) -> str:
    """GCE `requestId`: deterministic per (action, target, names, intent) so a retry of the
    same intent is deduplicated server-side; random without an intent, because an identical
    id for a later, different intent (stop, start, stop again) would be ignored by GCE."""
    if not intent:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_NAMESPACE, "\n".join([action, target, intent, *sorted(names)])))


_NAMESPACE = uuid.UUID("6f1c1c52-6b39-4d8e-9d0a-3c7f3ad2f0a1")
MAX_PER_CALL = 1000  # GCE's cap on instances per start/stop/suspend/resume/delete/create call


def chunked(names: Sequence[str], size: int = MAX_PER_CALL) -> Iterator[list[str]]:
    """Distinct names in order, `size` at a time (GCE rejects a name twice in one call)."""
    unique = list(dict.fromkeys(names))
    for i in range(0, len(unique), size):
        yield unique[i : i + size]


def provider_vm(mi: compute_v1.ManagedInstance) -> ProviderVm:
    """One `ManagedInstance` as a ProviderVm; creation time is not in the listing (0.0)."""
    name = mi.name or mi.instance.rsplit("/", 1)[-1]
    detail = f"{mi.instance_status or '-'}/{mi.current_action or 'NONE'}"
    errors = list(mi.last_attempt.errors.errors)
    if errors:  # e.g. CREATING forever on ZONE_RESOURCE_POOL_EXHAUSTED
        detail += f" last error {errors[0].code}: {errors[0].message}"
    return ProviderVm(name, infra_status(mi.instance_status, mi.current_action), 0.0, detail)


# -- client-side rate limit ----------------------------------------------------------------

_BUCKET_LUA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(s[1]), tonumber(s[2])
if tokens == nil then tokens = burst; ts = now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate); ts = now end
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate end
if wait > max_wait then return {0, tostring(wait)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', tostring(ts))
redis.call('EXPIRE', KEYS[1], 3600)
return {1, tostring(wait)}
"""


class TokenBucket:
    """A token bucket of `rate` calls per second (burst = max(1, rate)), in this process.

    `take(max_wait)` reserves a call and returns (True, seconds to wait first), or
    (False, seconds needed) without reserving when that exceeds `max_wait`.
    """

    def __init__(self, rate: float, clock: Clock) -> None:
        self.rate, self.burst, self._clock = rate, max(1.0, rate), clock
        self._tokens, self._ts = self.burst, clock.now()
        self._lock = threading.Lock()

    def take(self, max_wait: float) -> tuple[bool, float]:
        with self._lock:
            now = self._clock.now()
            if now > self._ts:
                self._tokens = min(self.burst, self._tokens + (now - self._ts) * self.rate)
                self._ts = now
            wait = max(0.0, (1 - self._tokens) / self.rate)
            if wait > max_wait:
                return False, wait
            self._tokens -= 1
            return True, wait


class RedisTokenBucket(TokenBucket):
    """The same bucket kept in Redis, shared by every process; falls back to the local one
    when Redis is unreachable (the limit is a courtesy, not worth failing a call for)."""

    def __init__(self, rate: float, clock: Clock, redis: Any, key: str) -> None:
        super().__init__(rate, clock)
        self._script = redis.register_script(_BUCKET_LUA)
        self.key = key

    def take(self, max_wait: float) -> tuple[bool, float]:
        args = [repr(self.rate), repr(self.burst), repr(self._clock.now()), repr(max_wait)]
        try:
            ok, wait = self._script(keys=[self.key], args=args)
        except Exception:  # redis.RedisError and socket errors alike
            return super().take(max_wait)
        return bool(int(ok)), float(wait)


# -- the adapter ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StandbyPool:
    """The MIG's standby pool targets (FACTS A.3)."""

    target_size: int
    target_stopped_size: int
    target_suspended_size: int
    mode: str
    initial_delay_sec: int


@dataclass(frozen=True)
class _Rule:
    """Which listed states let an action go ahead, count as already done, or must wait."""

    ready: frozenset[InfraStatus]
    done: frozenset[InfraStatus]


_TRANSIENT = {S.CREATING, S.STARTING, S.STOPPING, S.SUSPENDING, S.DELETING, S.UNKNOWN}
_RULES = {
    "create": _Rule(frozenset({S.GONE}), frozenset(set(S) - {S.GONE, S.DELETING})),
    "start": _Rule(frozenset({S.STOPPED}), frozenset({S.CREATING, S.STARTING, S.RUNNING})),
    "stop": _Rule(frozenset({S.RUNNING}), frozenset({S.STOPPING, S.STOPPED})),
    "suspend": _Rule(frozenset({S.RUNNING}), frozenset({S.SUSPENDING, S.SUSPENDED})),
    "resume": _Rule(frozenset({S.SUSPENDED}), frozenset({S.STARTING, S.RUNNING})),
    "delete": _Rule(frozenset(set(S) - {S.GONE, S.DELETING}), frozenset({S.DELETING, S.GONE})),
}
_CALLS = {
    "create": ("create_instances_unary", compute_v1.CreateInstancesInstanceGroupManagerRequest,
               "instance_group_managers_create_instances_request_resource",
               compute_v1.InstanceGroupManagersCreateInstancesRequest),
    "start": ("start_instances_unary", compute_v1.StartInstancesInstanceGroupManagerRequest,
              "instance_group_managers_start_instances_request_resource",
              compute_v1.InstanceGroupManagersStartInstancesRequest),
    "stop": ("stop_instances_unary", compute_v1.StopInstancesInstanceGroupManagerRequest,
             "instance_group_managers_stop_instances_request_resource",
             compute_v1.InstanceGroupManagersStopInstancesRequest),
    "suspend": ("suspend_instances_unary", compute_v1.SuspendInstancesInstanceGroupManagerRequest,
                "instance_group_managers_suspend_instances_request_resource",
                compute_v1.InstanceGroupManagersSuspendInstancesRequest),
    "resume": ("resume_instances_unary", compute_v1.ResumeInstancesInstanceGroupManagerRequest,
               "instance_group_managers_resume_instances_request_resource",
               compute_v1.InstanceGroupManagersResumeInstancesRequest),
    "delete": ("delete_instances_unary", compute_v1.DeleteInstancesInstanceGroupManagerRequest,
               "instance_group_managers_delete_instances_request_resource",
               compute_v1.InstanceGroupManagersDeleteInstancesRequest),
}  # fmt: skip


class _Refused(Exception):
    """A mutating call refused for its names (400/404/409, not ready): worth a look."""

    def __init__(self, error: MigctlError) -> None:
        super().__init__(str(error))
        self.error = error


class GceMig:
    """VmProvider over one zonal MIG. Blocking HTTP; each mutating call returns once GCE has
    scheduled the action (its operation is DONE). Repeats are idempotent: a call refused
    because some names are already there (or on their way) lists the MIG and carries on
    with the rest. Pass `intent` (e.g. a Celery task id) so retries reuse one requestId.
    """

    def __init__(
        self,
        settings: GcpSettings,
        clock: Clock | None = None,
        *,
        redis: Any = None,
        sleep: Callable[[float], None] | None = None,
        timeout: float = 30.0,
        op_timeout: float = 60.0,
        max_throttle_wait: float = 1.0,
    ) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._sleep = sleep or time.sleep
        self._timeout, self._op_timeout = timeout, op_timeout
        self._max_throttle_wait = max_throttle_wait
        self.errors_by_kind: Counter[str] = Counter()
        self.path = (
            f"projects/{settings.project_id}/zones/{settings.zone}"
            f"/instanceGroupManagers/{settings.mig_name}"
        )
        rate = settings.api_calls_per_second
        self.bucket: TokenBucket = (
            RedisTokenBucket(rate, self._clock, redis, f"migctl:gce:calls:{settings.project_id}")
            if redis is not None
            else TokenBucket(rate, self._clock)
        )
        options = (
            ClientOptions(api_endpoint=settings.api_endpoint) if settings.api_endpoint else None
        )
        credentials = _credentials(settings)
        try:
            self._migs = compute_v1.InstanceGroupManagersClient(
                credentials=credentials, client_options=options, transport="rest"
            )
            # Our own poller with the same endpoint: ExtendedOperation.result() would poll
            # compute.googleapis.com whatever api_endpoint says (FACTS A.4).
            self._ops = compute_v1.ZoneOperationsClient(
                credentials=credentials, client_options=options, transport="rest"
            )
        except auth_exceptions.DefaultCredentialsError as exc:
            raise PermanentError(
                "no Google credentials: set gcp.credentials_file (CONTROLLER_GCP_CREDENTIALS_FILE) "
                f"or configure Application Default Credentials: {exc}"
            ) from exc

    # -- VmProvider ------------------------------------------------------------------------

    def list(self) -> list[ProviderVm]:
        """Every managed instance, following nextPageToken when the MIG is PAGINATED."""
        request = compute_v1.ListManagedInstancesInstanceGroupManagersRequest(**self._ids())
        pager = self._call("list", self._migs.list_managed_instances, request=request)
        vms: list[ProviderVm] = []
        pages = iter(pager.pages)
        while True:
            page = self._guard("list", lambda: next(pages, None))
            if page is None:
                return vms
            vms += [provider_vm(mi) for mi in page.managed_instances]
            if page.next_page_token:
                self._throttle()

    def create(self, names: Sequence[str], *, intent: str | None = None) -> None:
        """Create instances named `names` (the VM ids); existing names are left alone."""
        self._batch("create", names, intent)

    def start(self, names: Sequence[str], *, intent: str | None = None) -> None:
        self._batch("start", names, intent)

    def stop(self, names: Sequence[str], *, intent: str | None = None) -> None:
        self._batch("stop", names, intent)

    def suspend(self, names: Sequence[str], *, intent: str | None = None) -> None:
        self._batch("suspend", names, intent)

    def resume(self, names: Sequence[str], *, intent: str | None = None) -> None:
        self._batch("resume", names, intent)

    def delete(self, names: Sequence[str], *, intent: str | None = None) -> None:
        """Delete; names already gone or being deleted are skipped (no NotFound: done is done)."""
        self._batch("delete", names, intent)

    # -- standby pool ----------------------------------------------------------------------

    def standby(self) -> StandbyPool:
        mig = self._call(
            "get", self._migs.get, request=compute_v1.GetInstanceGroupManagerRequest(**self._ids())
        )
        return StandbyPool(
            target_size=mig.target_size,
            target_stopped_size=mig.target_stopped_size,
            target_suspended_size=mig.target_suspended_size,
            mode=mig.standby_policy.mode or "MANUAL",
            initial_delay_sec=mig.standby_policy.initial_delay_sec,
        )

    def set_standby(
        self,
        stopped: int | None = None,
        suspended: int | None = None,
        mode: str | None = None,
        initial_delay_sec: int | None = None,
        *,
        intent: str | None = None,
    ) -> None:
        """PATCH only the fields given; mode is MANUAL or SCALE_OUT_POOL."""
        if mode is not None and mode not in ("MANUAL", "SCALE_OUT_POOL"):
            raise ValueError(f"standby mode must be MANUAL or SCALE_OUT_POOL, got {mode!r}")
        resource = compute_v1.InstanceGroupManager()
        if stopped is not None:
            resource.target_stopped_size = stopped
        if suspended is not None:
            resource.target_suspended_size = suspended
        if mode is not None:
            resource.standby_policy.mode = mode
        if initial_delay_sec is not None:
            resource.standby_policy.initial_delay_sec = initial_delay_sec
        fields = (stopped, suspended, mode, initial_delay_sec)
        if all(v is None for v in fields):
            return
        request = compute_v1.PatchInstanceGroupManagerRequest(
            **self._ids(),
            instance_group_manager_resource=resource,
            request_id=request_id("patch", self.path, [repr(fields)], intent),
        )
        self._wait("patch", self._call("patch", self._migs.patch_unary, request=request))

    # -- internals ---------------------------------------------------------------------------

    def _ids(self) -> dict[str, str]:
        s = self.settings
        return {"project": s.project_id, "zone": s.zone, "instance_group_manager": s.mig_name}

    def _batch(self, action: str, names: Sequence[str], intent: str | None) -> None:
        for chunk in chunked(names):
            try:
                self._act(action, chunk, intent, refusable=True)
            except _Refused as refused:
                self._settle(action, chunk, intent, refused.error)

    def _act(
        self, action: str, names: Sequence[str], intent: str | None, refusable: bool = False
    ) -> None:
        method, request_type, body_field, body_type = _CALLS[action]
        body: Any
        if action == "create":
            body = body_type(instances=[compute_v1.PerInstanceConfig(name=n) for n in names])
        else:
            refs = [f"zones/{self.settings.zone}/instances/{n}" for n in names]
            body = body_type(instances=refs)
            if action == "delete":
                # Names not in the group or already being deleted are skipped, not fatal.
                body.skip_instances_on_validation_error = True
        request = request_type(
            **self._ids(),
            request_id=request_id(action, self.path, names, intent),
            **{body_field: body},
        )
        op = self._call(action, getattr(self._migs, method), refusable, request=request)
        self._wait(action, op, refusable)

    def _settle(
        self, action: str, names: Sequence[str], intent: str | None, error: MigctlError
    ) -> None:
        """After a refusal: list, skip names already done, retry the ready ones once."""
        rule = _RULES[action]
        current = {vm.name: vm.status for vm in self.list()}
        ready: builtins.list[str] = []
        waiting: builtins.list[str] = []
        stuck: builtins.list[str] = []
        unknown: builtins.list[str] = []
        for name in names:
            status = current.get(name, S.GONE)
            if status in rule.ready:
                ready.append(name)
            elif status in rule.done:
                continue
            elif status is S.GONE:
                unknown.append(name)
            elif status in _TRANSIENT:
                waiting.append(f"{name} ({status})")
            else:
                stuck.append(f"{name} ({status})")
        cause = error.__cause__ or error  # chain GCE's own error, not our wrapper
        if ready and len(ready) == len(names):
            raise error from cause  # refused for reasons other than the names' states
        if ready:
            self._act(action, ready, intent)
        if waiting:
            raise TemporaryError(f"cannot {action} yet: {', '.join(waiting)}", 5.0) from cause
        if stuck:
            raise PermanentError(f"cannot {action}: {', '.join(stuck)}") from cause
        if len(unknown) == len(names):
            raise NotFound(f"none of {', '.join(names)} is in {self.path}") from cause

    def _wait(self, what: str, op: compute_v1.Operation, refusable: bool = False) -> None:
        """Poll (GET) until DONE, i.e. scheduled; then map the operation's error, if any."""
        deadline = self._clock.now() + self._op_timeout
        polls = 0
        while op.status != compute_v1.Operation.Status.DONE:
            if polls >= 600 or self._clock.now() >= deadline:
                raise TemporaryError(
                    f"GCE {what} on {self.path}: operation {op.name} still {op.status.name} "
                    f"after {polls} polls; it continues server-side, list to see progress",
                    10.0,
                )
            self._sleep(min(2.0, 0.2 * 2**polls))
            op = self._call(
                "poll",
                self._ops.get,
                project=self.settings.project_id,
                zone=self.settings.zone,
                operation=op.name,
            )
            polls += 1
        errors = list(op.error.errors)
        if not errors and not op.http_error_status_code:
            return
        codes = [e.code for e in errors]
        detail = "; ".join(f"{e.code}: {e.message}" for e in errors) or op.http_error_message
        kind = error_kind(op.http_error_status_code or None, codes, detail)
        self.errors_by_kind[kind] += 1
        error = to_error(kind, what, self.path, f"operation {op.name}: {detail}")
        error.__cause__ = _OperationFailed(op.name, op.http_error_status_code, detail)
        if refusable and kind in ("not_found", "not_ready", "invalid"):
            raise _Refused(error)
        raise error

    def _throttle(self) -> None:
        granted, wait = self.bucket.take(self._max_throttle_wait)
        if not granted:
            self.errors_by_kind["throttled"] += 1
            raise RateLimited(
                f"client-side limit of {self.settings.api_calls_per_second}/s "
                "(gcp.api_calls_per_second) reached",
                wait,
            )
        if wait > 0:
            self._sleep(wait)

    def _call(
        self, what: str, fn: Callable[..., Any], refusable: bool = False, **kwargs: Any
    ) -> Any:
        self._throttle()
        # retry=None: retrying is the caller's job (TemporaryError.delay); the library's
        # default would block a worker for up to 600 s on 503s.
        return self._guard(what, lambda: fn(retry=None, timeout=self._timeout, **kwargs), refusable)

    def _guard(self, what: str, thunk: Callable[[], Any], refusable: bool = False) -> Any:
        try:
            return thunk()
        except Exception as exc:
            classified = self._classify(what, exc)
            if classified is None:
                raise  # not a vendor error: a bug, let it show
            kind, error = classified
            self.errors_by_kind[kind] += 1
            if refusable and kind in ("not_found", "not_ready", "invalid"):
                error.__cause__ = exc
                raise _Refused(error) from exc
            raise error from exc

    def _classify(self, what: str, exc: Exception) -> tuple[str, MigctlError] | None:
        if isinstance(exc, api_exceptions.RetryError):
            return "temporary", to_error("temporary", what, self.path, str(exc))
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            code = getattr(exc, "code", None)
            status = code if isinstance(code, int) else None
            if what == "poll" and status == 404:
                status = 503  # an operation GCE just returned cannot be gone: a blip
            reasons = [str(e.get("reason", "")) for e in _errors_of(exc)]
            kind = error_kind(status, reasons, str(getattr(exc, "message", exc)))
            return kind, to_error(kind, what, self.path, str(exc), _retry_after(exc))
        if isinstance(exc, auth_exceptions.RefreshError):
            kind = "temporary" if getattr(exc, "retryable", False) else "auth"
            return kind, to_error(kind, what, self.path, f"token refresh failed: {exc}")
        if isinstance(exc, requests.RequestException | auth_exceptions.TransportError):
            kind = "temporary"  # connection refused/reset, timeouts
            return kind, to_error(kind, what, self.path, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, auth_exceptions.GoogleAuthError):
            # e.g. a 401 the session could not cure by refreshing the token
            return "auth", to_error("auth", what, self.path, f"{type(exc).__name__}: {exc}")
        return None


class _OperationFailed(Exception):
    """The vendor-side error of a DONE operation, chained under the migctl error."""

    def __init__(self, name: str, status: int, detail: str) -> None:
        super().__init__(f"operation {name} failed: HTTP {status}: {detail}")


def _errors_of(exc: Exception) -> list[dict[str, Any]]:
    return [e for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)]


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to the default delay


def _credentials(settings: GcpSettings) -> Any:
    if settings.anonymous:
        return AnonymousCredentials()  # type: ignore[no-untyped-call]
    if settings.credentials_file:
        import google.auth

        try:
            credentials, _ = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                settings.credentials_file,
                scopes=["https://www.googleapis.com/auth/cloud-platform"],
            )
        except (OSError, auth_exceptions.GoogleAuthError) as exc:
            raise PermanentError(
                f"gcp.credentials_file {settings.credentials_file!r} is not usable "
                f"(expected a service account JSON key): {exc}"
            ) from exc
        return credentials
    return None  # Application Default Credentials, resolved by the client
