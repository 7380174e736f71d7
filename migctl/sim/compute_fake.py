"""An HTTP fake of the Compute Engine REST API for one zonal MIG, for tests at the wire.

Speaks the paths google-cloud-compute uses (FACTS A.5): get/patch/resize the MIG,
listManagedInstances, create/start/stop/suspend/resume/deleteInstances, zone operations
get/wait. Instances move through their actions on an injected clock; faults are injectable.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from migctl.ports import Clock, SystemClock

_V1 = "/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)"
_MIG_PATH = re.compile(_V1 + r"/instanceGroupManagers/(?P<mig>[^/]+)(?:/(?P<verb>[A-Za-z]+))?$")
_OP_PATH = re.compile(_V1 + r"/operations/(?P<op>[^/]+)(?P<wait>/wait)?$")
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# GCE's documented cap for the per-instance MIG methods.
MAX_INSTANCES_PER_CALL = 1000
# The action in progress -> (instanceStatus shown while it runs, status once done).
_PROGRESS = {
    "CREATING": ("", "RUNNING"),
    "STARTING": ("STAGING", "RUNNING"),
    "RESUMING": ("SUSPENDED", "RUNNING"),
    # A stopped VM reports TERMINATED, as a real Compute instance does.
    "STOPPING": ("STOPPING", "TERMINATED"),
    "SUSPENDING": ("SUSPENDING", "SUSPENDED"),
    "DELETING": ("STOPPING", ""),
}
_DEFAULT_REASON = {
    400: "invalid",
    401: "authError",
    403: "forbidden",
    404: "notFound",
    409: "alreadyExists",
    429: "rateLimitExceeded",
}


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class _Instance:
    name: str
    id: int
    status: str
    action: str = "NONE"
    target: str = "RUNNING"
    due: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _Fault:
    status: int
    reason: str
    code: str
    message: str
    match: str
    retry_after: float | None
    hang: bool = False


@dataclass
class _Op:
    name: str
    kind: str
    request_id: str
    polls_left: int
    error: _Fault | None = None


class _ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class FakeCompute:
    """A zonal MIG behind a local HTTP server. Thread-safe; every handler holds one lock."""

    def __init__(
        self,
        project: str = "proj",
        zone: str = "zone-a",
        mig: str = "mig1",
        *,
        clock: Clock | None = None,
        create_delay: float = 30.0,
        start_delay: float = 20.0,
        stop_delay: float = 20.0,
        suspend_delay: float = 20.0,
        resume_delay: float = 10.0,
        delete_delay: float = 20.0,
        page_size: int | None = None,
        op_polls: int = 1,
    ) -> None:
        self.project, self.zone, self.mig = project, zone, mig
        self.clock: Clock = clock or SystemClock()
        self._delay = {
            "CREATING": create_delay,
            "STARTING": start_delay,
            "STOPPING": stop_delay,
            "SUSPENDING": suspend_delay,
            "RESUMING": resume_delay,
            "DELETING": delete_delay,
        }
        self.page_size = page_size
        self.op_polls = op_polls
        self.requests: list[FakeRequest] = []
        self.target_size = 0
        self.target_stopped_size = 0
        self.target_suspended_size = 0
        self.standby_policy: dict[str, Any] = {"mode": "MANUAL", "initialDelaySec": 0}
        self._instances: dict[str, _Instance] = {}
        self._ops: dict[str, _Op] = {}
        self._by_request_id: dict[str, str] = {}
        self._faults: deque[_Fault] = deque()
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeCompute:
        handler = type("_Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._release.clear()
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeCompute.start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test controls -------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        reason: str = "",
        *,
        code: str = "",
        message: str = "",
        match: str = "",
        retry_after: float | None = None,
    ) -> None:
        """Fail the next `n` requests whose path contains `match`.

        With `code`, the request is accepted but its operation ends DONE with that error
        (as ZONE_RESOURCE_POOL_EXHAUSTED does); only mutating requests take such a fault.
        Otherwise the HTTP response is `status` with `errors[].reason` = `reason`.
        """
        reason = reason or ("" if code else _DEFAULT_REASON.get(status, "backendError"))
        text = message or code or reason
        with self._lock:
            for _ in range(n):
                self._faults.append(_Fault(status, reason, code, text, match, retry_after))

    def hang_next(self, n: int = 1, match: str = "") -> None:
        """Hold the next `n` matching requests until `stop()` (client timeouts)."""
        with self._lock:
            for _ in range(n):
                self._faults.append(_Fault(503, "backendError", "", "hung", match, None, True))

    def add(self, name: str, status: str = "RUNNING") -> None:
        """Seed a settled instance (RUNNING, TERMINATED or SUSPENDED), counted in the targets."""
        with self._lock:
            self._instances[name] = _Instance(name, next(self._ids), status, target=_target(status))
            self._count(status, +1)

    def vanish(self, name: str) -> None:
        """The instance disappears out of band (deleted behind the MIG's back)."""
        with self._lock:
            inst = self._instances.pop(name, None)
            if inst is not None:
                self._count(inst.status, -1)

    def instance(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            self._tick()
            inst = self._instances.get(name)
            return None if inst is None else self._managed(inst)

    def names(self) -> list[str]:
        with self._lock:
            self._tick()
            return list(self._instances)

    def mutations(self) -> list[FakeRequest]:
        """Recorded requests that change the MIG (POST/PATCH to it, listing excluded)."""
        return [
            r
            for r in self.requests
            if r.method in ("POST", "PATCH")
            and "/instanceGroupManagers/" in r.path
            and not r.path.endswith("/listManagedInstances")
        ]

    # -- request handling ----------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one request: (HTTP status, JSON payload, extra headers)."""
        with self._lock:
            self.requests.append(FakeRequest(method, path, query, body))
            self._tick()
            mig_m, op_m = _MIG_PATH.match(path), _OP_PATH.match(path)
            mutating = mig_m is not None and (
                method == "PATCH" or (method == "POST" and mig_m["verb"] != "listManagedInstances")
            )
            fault = self._take_fault(path, mutating)
        if fault is not None and fault.hang:
            self._release.wait()
        if fault is not None and not fault.code:
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else {}
            return fault.status, _error_body(fault.status, fault.reason, fault.message), headers
        with self._lock:
            try:
                if mig_m and self._is_ours(mig_m):
                    return 200, self._mig_call(method, mig_m["verb"], query, body, fault), {}
                if op_m and self._is_ours(op_m):
                    return 200, self._poll(op_m["op"]), {}
                raise _ApiError(404, "notFound", f"The resource '{path}' was not found")
            except _ApiError as err:
                return err.status, _error_body(err.status, err.reason, err.message), {}

    def _take_fault(self, path: str, mutating: bool) -> _Fault | None:
        for fault in self._faults:
            if fault.match in path and (mutating or not fault.code):
                self._faults.remove(fault)
                return fault
        return None

    def _is_ours(self, m: re.Match[str]) -> bool:
        if (m["project"], m["zone"]) != (self.project, self.zone):
            return False
        return "mig" not in m.groupdict() or m["mig"] == self.mig

    def _mig_call(
        self, method: str, verb: str | None, query: dict[str, str], body: Any, fault: _Fault | None
    ) -> dict[str, Any]:
        if verb is None and method == "GET":
            return self._resource()
        if verb == "listManagedInstances" and method == "POST":
            return self._list(query)
        actions: dict[str, Callable[[Any, dict[str, str]], None]] = {
            "createInstances": self._create,
            "startInstances": lambda b, q: self._move(b, "STARTING", {"TERMINATED", "STOPPED"}),
            "stopInstances": lambda b, q: self._move(b, "STOPPING", {"RUNNING"}),
            "suspendInstances": lambda b, q: self._move(b, "SUSPENDING", {"RUNNING"}),
            "resumeInstances": lambda b, q: self._move(b, "RESUMING", {"SUSPENDED"}),
            "deleteInstances": self._delete,
            "resize": self._resize,
        }
        apply: Callable[[Any, dict[str, str]], None]
        if verb is None and method == "PATCH":
            kind, apply = "patch", self._patch
        elif method == "POST" and verb in actions:
            kind, apply = verb, actions[verb]
        else:
            raise _ApiError(404, "notFound", f"no such method {method} {verb}")
        request_id = query.get("requestId", "")
        if request_id in self._by_request_id:
            # GCE ignores a repeated requestId and answers with the first operation.
            return self._op_json(self._ops[self._by_request_id[request_id]])
        if fault is None:
            apply(body or {}, query)
        op = _Op(f"operation-{next(self._ids)}", kind, request_id, self.op_polls, fault)
        self._ops[op.name] = op
        if request_id:
            self._by_request_id[request_id] = op.name
        return self._op_json(op)

    # -- MIG methods -----------------------------------------------------------------------

    def _create(self, body: Any, query: dict[str, str]) -> None:
        names = [str(item.get("name", "")) for item in body.get("instances", [])]
        self._check_batch(names)
        for name in names:
            if not _NAME.match(name):
                raise _ApiError(
                    400, "invalid", f"Invalid value for field 'instances.name': '{name}'"
                )
            if name in self._instances:
                raise _ApiError(409, "alreadyExists", f"The resource '{name}' already exists")
        for name in names:
            self._spawn(name)

    def _move(self, body: Any, action: str, allowed: set[str]) -> None:
        names = self._member_names(body)
        for name in names:
            inst = self._instances.get(name)
            if inst is None:
                raise _ApiError(
                    400, "invalid", f"Instance '{name}' is not a member of '{self.mig}'"
                )
            if inst.status not in allowed or inst.action != "NONE":
                raise _ApiError(
                    400,
                    "resourceNotReady",
                    f"The resource '{name}' is not ready: {inst.status or '-'}/{inst.action}",
                )
        for name in names:
            inst = self._instances[name]
            self._count(inst.status, -1)
            self._begin(inst, action)
            self._count(_PROGRESS[action][1], +1)

    def _delete(self, body: Any, query: dict[str, str]) -> None:
        names = self._member_names(body)
        skip = bool(body.get("skipInstancesOnValidationError"))
        doomed = []
        for name in names:
            inst = self._instances.get(name)
            if inst is None or inst.action == "DELETING":
                if not skip:
                    raise _ApiError(400, "invalid", f"Instance '{name}' cannot be deleted")
                continue
            doomed.append(inst)
        for inst in doomed:
            self._count(inst.status if inst.action == "NONE" else _PROGRESS[inst.action][1], -1)
            self._begin(inst, "DELETING")

    def _resize(self, body: Any, query: dict[str, str]) -> None:
        size = int(query.get("size", "-1"))
        if size < 0:
            raise _ApiError(400, "invalid", "Invalid value for field 'size'")
        while self.target_size < size:
            self._spawn(f"{self.mig}-{next(self._ids):04x}")
        active = [
            i for i in self._instances.values() if i.target == "RUNNING" and i.action != "DELETING"
        ]
        for inst in reversed(active[size:]):
            self._count("RUNNING", -1)
            self._begin(inst, "DELETING")

    def _patch(self, body: Any, query: dict[str, str]) -> None:
        # Only the bookkeeping: real GCE would also create/stop VMs to refill the pool.
        if "targetStoppedSize" in body:
            self.target_stopped_size = int(body["targetStoppedSize"])
        if "targetSuspendedSize" in body:
            self.target_suspended_size = int(body["targetSuspendedSize"])
        self.standby_policy.update(body.get("standbyPolicy") or {})

    # -- state ----------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        inst = _Instance(name, next(self._ids), "")
        self._instances[name] = inst
        self._begin(inst, "CREATING")
        self.target_size += 1

    def _begin(self, inst: _Instance, action: str) -> None:
        during, after = _PROGRESS[action]
        inst.action, inst.status = action, during or inst.status
        inst.target = "DELETED" if action == "DELETING" else _target(after)
        inst.due = self.clock.now() + self._delay[action]

    def _tick(self) -> None:
        now = self.clock.now()
        for inst in list(self._instances.values()):
            if inst.action != "NONE" and now >= inst.due:
                if inst.action == "DELETING":
                    del self._instances[inst.name]
                    continue
                inst.status, inst.action = _PROGRESS[inst.action][1], "NONE"

    def _count(self, status: str, delta: int) -> None:
        target = _target(status)
        if target == "STOPPED":
            self.target_stopped_size += delta
        elif target == "SUSPENDED":
            self.target_suspended_size += delta
        else:
            self.target_size += delta

    def _member_names(self, body: Any) -> list[str]:
        names = []
        for ref in body.get("instances", []):
            # Full URLs and `zones/Z/instances/N` both name an instance; take the zone from it.
            m = re.search(r"zones/([^/]+)/instances/([^/]+)$", str(ref))
            if m is None or m[1] != self.zone:
                raise _ApiError(400, "invalid", f"Invalid value for field 'instances': '{ref}'")
            names.append(m[2])
        self._check_batch(names)
        return names

    @staticmethod
    def _check_batch(names: list[str]) -> None:
        if not names:
            raise _ApiError(400, "required", "Required field 'instances' not specified")
        if len(names) > MAX_INSTANCES_PER_CALL:
            raise _ApiError(
                400, "invalid", f"At most {MAX_INSTANCES_PER_CALL} instances per request"
            )

    # -- JSON views ------------------------------------------------------------------------

    def _base(self) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{self.zone}"

    def _resource(self) -> dict[str, Any]:
        actions: dict[str, int] = {}
        for inst in self._instances.values():
            actions[inst.action.lower()] = actions.get(inst.action.lower(), 0) + 1
        return {
            "kind": "compute#instanceGroupManager",
            "name": self.mig,
            "zone": self._base(),
            "selfLink": f"{self._base()}/instanceGroupManagers/{self.mig}",
            "baseInstanceName": self.mig,
            "targetSize": self.target_size,
            "targetStoppedSize": self.target_stopped_size,
            "targetSuspendedSize": self.target_suspended_size,
            "standbyPolicy": dict(self.standby_policy),
            "listManagedInstancesResults": "PAGINATED" if self.page_size else "PAGELESS",
            "currentActions": actions,
            "status": {"isStable": set(actions) <= {"none"}},
        }

    def _managed(self, inst: _Instance) -> dict[str, Any]:
        out: dict[str, Any] = {
            "instance": f"{self._base()}/instances/{inst.name}",
            "name": inst.name,
            "id": str(inst.id),  # uint64 travels as a JSON string
            "currentAction": inst.action,
            "targetStatus": inst.target,
        }
        if inst.status:  # absent while the VM does not exist yet
            out["instanceStatus"] = inst.status
        if inst.errors:
            out["lastAttempt"] = {"errors": {"errors": inst.errors}}
        return out

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        items = [self._managed(i) for i in self._instances.values()]
        if not self.page_size:
            # PAGELESS (the GCE default) ignores maxResults and pageToken.
            return {"managedInstances": items}
        size = min(self.page_size, int(query.get("maxResults") or self.page_size))
        start = int(query.get("pageToken") or 0)
        page: dict[str, Any] = {"managedInstances": items[start : start + size]}
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return page

    def _poll(self, name: str) -> dict[str, Any]:
        op = self._ops.get(name)
        if op is None:
            raise _ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        op.polls_left = max(0, op.polls_left - 1)
        return self._op_json(op)

    def _op_json(self, op: _Op) -> dict[str, Any]:
        done = op.polls_left == 0
        out: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(abs(hash(op.name)) % 10**12),
            "name": op.name,
            "operationType": f"compute.instanceGroupManagers.{op.kind}",
            "status": "DONE" if done else "RUNNING",
            "progress": 100 if done else 0,
            "zone": self._base(),
            "targetLink": f"{self._base()}/instanceGroupManagers/{self.mig}",
            "selfLink": f"{self._base()}/operations/{op.name}",
        }
        if op.request_id:
            out["clientOperationId"] = op.request_id
        if done and op.error is not None:
            out["httpErrorStatusCode"] = op.error.status
            out["httpErrorMessage"] = _REASON_TEXT.get(op.error.status, "ERROR")
            out["error"] = {"errors": [{"code": op.error.code, "message": op.error.message}]}
        return out


_REASON_TEXT = {
    400: "BAD REQUEST",
    403: "FORBIDDEN",
    412: "PRECONDITION FAILED",
    503: "SERVICE UNAVAILABLE",
}


def _target(status: str) -> str:
    return {"TERMINATED": "STOPPED", "STOPPED": "STOPPED", "SUSPENDED": "SUSPENDED"}.get(
        status, "RUNNING"
    )


def _error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    domain = "usageLimits" if "RateLimit" in reason or "rateLimit" in reason else "global"
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
        }
    }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeCompute
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms per keep-alive request

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        status, payload, headers = self.fake.handle(self.command, parts.path, query, body)
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test): nothing to tell

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read `requests`, not stderr
