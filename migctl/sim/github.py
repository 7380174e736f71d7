"""A local HTTP fake of GitHub: the App/runner REST API plus the runner side of the simulator.

REST half: verifies App JWTs (RS256, the App's public key) and the tokens it minted, issues
installation and registration tokens and JIT configs, lists and deletes runners.
Simulation half (`/_sim/...`): runners register with those tokens and long-poll for jobs;
the dispatcher hands the oldest queued job to ANY online runner whose labels cover it, as
GitHub does, and reports `workflow_job` webhook payloads through `on_event`.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization

from migctl.domain.model import covers

log = logging.getLogger(__name__)

MAX_JWT_LIFETIME = 600  # GitHub refuses an App JWT whose exp is more than 10 minutes out
JWT_SKEW = 60  # iat may be this far in the future (clock drift)
MAX_WAIT = 30.0  # longest long-poll of /_sim/runners/{id}/job
RATE_LIMIT = 5000  # GitHub's installation-token floor per hour
CONCLUSIONS = ("success", "failure", "cancelled")
SCOPES = ("/orgs/{org}", "/repos/{owner}/{repo}")

# (method, path template, handler); "{scope}" expands to an org and a repo route.
_ROUTES = (
    ("POST", "/app/installations/{inst}/access_tokens", "_access_token"),
    ("GET", "/orgs/{org}/installation", "_installation"),
    ("GET", "/repos/{owner}/{repo}/installation", "_installation"),
    ("POST", "{scope}/actions/runners/registration-token", "_registration_token"),
    ("POST", "{scope}/actions/runners/generate-jitconfig", "_jitconfig"),
    ("GET", "{scope}/actions/runners", "_list_runners"),
    ("GET", "{scope}/actions/runners/{runner_id}", "_get_runner"),
    ("DELETE", "{scope}/actions/runners/{runner_id}", "_delete_runner"),
    ("GET", "/orgs/{org}/actions/runner-groups", "_runner_groups"),
    ("GET", "/installation/repositories", "_installation_repos"),
    ("GET", "/repos/{owner}/{repo}/actions/runs", "_list_runs"),
    ("GET", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs", "_list_run_jobs"),
    ("POST", "/_sim/runners", "_sim_register"),
    ("GET", "/_sim/runners/{runner_id}/job", "_sim_next_job"),
    ("POST", "/_sim/runners/{runner_id}/complete", "_sim_complete"),
    ("POST", "/_sim/runners/{runner_id}/renew", "_sim_renew"),
    ("DELETE", "/_sim/runners/{runner_id}", "_sim_remove"),
    ("POST", "/_sim/jobs", "_sim_add_job"),
    ("GET", "/_sim/jobs", "_sim_jobs"),
    ("GET", "/_sim/jobs/{job_id}", "_sim_job"),
    ("POST", "/_sim/jobs/{job_id}/cancel", "_sim_cancel"),
)


def _placeholder(match: re.Match[str]) -> str:
    name = match.group(1)
    return (
        f"(?P<{name}>\\d+)"
        if name in ("inst", "runner_id", "job_id", "run_id")
        else f"(?P<{name}>[^/]+)"
    )


def _compile() -> list[tuple[str, re.Pattern[str], str, str]]:
    routes = []
    for method, template, handler in _ROUTES:
        for path in (
            [template.replace("{scope}", s) for s in SCOPES]
            if "{scope}" in template
            else [template]
        ):
            pattern = re.sub(r"\{(\w+)\}", _placeholder, path)
            routes.append((method, re.compile(f"^{pattern}$"), handler, f"{method} {path}"))
    return routes


_COMPILED = _compile()


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Req:
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]

    @property
    def target(self) -> str:
        """The org ("acme") or repository ("acme/app") of a scoped route."""
        if "owner" in self.params:
            return f"{self.params['owner']}/{self.params['repo']}"
        return self.params["org"]


@dataclass
class _Runner:
    id: int
    name: str
    target: str
    labels: list[str]
    group_id: int = 1
    status: str = "online"
    busy: bool = False
    ephemeral: bool = True
    job_id: str = ""
    seen: float = field(default_factory=time.monotonic)  # the runner's last call
    polling: int = 0  # long-polls open now (a waiting runner is in contact)


@dataclass
class _Job:
    job_id: str
    run_id: str
    org: str
    repo: str
    labels: list[str]
    duration: float
    planned: str
    created_at: float
    state: str = "queued"
    conclusion: str = ""
    runner_id: int | None = None
    runner_name: str = ""
    runner_group_id: int | None = None
    started_at: float = 0.0
    completed_at: float = 0.0


@dataclass
class _Token:
    kind: str  # installation | registration
    expires_at: float
    installation_id: int = 0
    target: str = ""


@dataclass
class _Faults:
    count: int
    status: int
    prefix: str
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected fault"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _target_of_url(url: str) -> str:
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if len(parts) not in (1, 2):
        raise _HttpError(422, f"not an org or repository URL: {url!r}")
    return "/".join(parts)


class FakeGitHub:
    """GitHub for one App, on a local port. Thread-safe; `calls` counts requests per route."""

    def __init__(
        self,
        app_id: str,
        public_key_pem: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        token_ttl: float = 3600,
        clock: Callable[[], float] = time.time,
        lost_runner_timeout: float = 10.0,
    ) -> None:
        self.app_id = str(app_id)
        self._public_key = serialization.load_pem_public_key(public_key_pem)
        self._host, self._port = host, port
        self.on_event = on_event
        self.token_ttl = token_ttl
        self._clock = clock
        # A runner silent this long (no poll, no renewal of its job) is lost: its job
        # fails and it goes offline, as GitHub does when a runner's machine dies.
        self.lost_runner_timeout = lost_runner_timeout
        self.lost_runners = 0
        self.auto_install = True  # any org/installation id is accepted, as if installed
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._emit_lock = threading.Lock()
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._installations: dict[int, str] = {}  # id -> account login ("*" = any)
        self._tokens: dict[str, _Token] = {}
        self._jit: dict[str, int] = {}  # JIT nonce -> runner id, single use
        self._runners: dict[int, _Runner] = {}
        self._jobs: dict[str, _Job] = {}  # every job ever added
        self._queued: dict[str, _Job] = {}  # insertion order = queue order
        self._groups: dict[str, list[dict[str, Any]]] = {}
        self._repo_ids: dict[str, int] = {}
        self._faults: list[_Faults] = []
        self._ids = iter(range(1000, 10**12))
        self._window = (0.0, 0)  # rate-limit window reset time, calls in it
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeGitHub:
        server = _Server((self._host, self._port), _Handler)
        server.fake = self
        self._server = server
        self._port = server.server_address[1]
        self._stopping = False
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap_lost_runners, daemon=True)
        self._reaper.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # long-polls answer 204 now
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # -- test controls -----------------------------------------------------------------------

    def install(self, account: str, installation_id: int | None = None) -> int:
        """Install the App on an org/user (`"*"` = every account); returns the installation id."""
        with self._lock:
            inst = installation_id or next(self._ids)
            self._installations[inst] = account
            return inst

    def add_runner_group(self, org: str, name: str) -> int:
        with self._lock:
            group_id = next(self._ids)
            group = {"id": group_id, "name": name, "default": False, "visibility": "all"}
            self._org_groups(org).append(group)
            return group_id

    def fail_next(self, n: int, status: int = 500, path_prefix: str = "") -> None:
        """The next `n` requests under `path_prefix` answer `status` (REST routes only unless
        the prefix starts with /_sim)."""
        with self._lock:
            self._faults.append(_Faults(n, status, path_prefix))

    def rate_limit_next(self, n: int, retry_after: int = 1, status: int = 403) -> None:
        """The next `n` REST requests are refused as over a secondary rate limit."""
        reset = int(self._clock()) + retry_after
        headers = {
            "Retry-After": str(retry_after),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        }
        with self._lock:
            self._faults.append(
                _Faults(n, status, "", headers, "You have exceeded a secondary rate limit.")
            )

    def tokens(self) -> list[dict[str, Any]]:
        """Every token minted so far (tests check none leaks), with its kind and expiry."""
        with self._lock:
            return [
                {"token": t, "kind": v.kind, "expires_at": v.expires_at}
                for t, v in self._tokens.items()
            ]

    def jit_configs(self) -> list[str]:
        with self._lock:
            return list(self._jit)

    def set_runner_offline(self, runner_id: int) -> None:
        """A runner whose machine died: still registered, no longer polling."""
        with self._cond:
            runner = self._runners.get(runner_id)
            if runner is not None:
                runner.status = "offline"
                self._cond.notify_all()

    # -- jobs (the workload side) ------------------------------------------------------------

    def add_job(
        self,
        repo: str,
        labels: Sequence[str],
        org: str = "",
        duration: float = 1.0,
        conclusion: str = "success",
    ) -> dict[str, str]:
        """Queue a job for `repo` ("owner/name"); returns {"job_id", "run_id"}."""
        owner, _, name = repo.partition("/")
        if not owner or not name or conclusion not in CONCLUSIONS:
            raise ValueError("repo must be 'owner/name' and conclusion success|failure|cancelled")
        if not isinstance(labels, list | tuple) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels must be a list of strings")
        with self._cond:
            job = _Job(
                job_id=str(next(self._ids)),
                run_id=str(next(self._ids)),
                org=org or owner,
                repo=repo,
                labels=list(labels),
                duration=float(duration),
                planned=conclusion,
                created_at=self._clock(),
            )
            self._jobs[job.job_id] = job
            self._queued[job.job_id] = job
            self._event("queued", job)
            self._cond.notify_all()
        self._flush()
        return {"job_id": job.job_id, "run_id": job.run_id}

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._job_json(j) for j in self._jobs.values()]

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return self._job_json(job) if job else None

    def cancel_job(self, job_id: str) -> bool:
        """Cancel a queued job (True), or do nothing to one already taken/finished (False)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state != "queued":
                return False
            job.state, job.conclusion, job.completed_at = "cancelled", "cancelled", self._clock()
            self._queued.pop(job_id, None)
            self._event("completed", job)
        self._flush()
        return True

    def runners(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._runner_json(r) | {"target": r.target} for r in self._runners.values()]

    # -- HTTP dispatch -------------------------------------------------------------------------

    def _dispatch(
        self, method: str, raw_path: str, headers: Any, raw_body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/") or "/"
        query = dict(parse_qsl(parts.query))
        route = next(
            (
                (h, m.groupdict(), key)
                for meth, rx, h, key in _COMPILED
                if meth == method and (m := rx.match(path))
            ),
            None,
        )
        with self._lock:
            self.calls[route[2] if route else f"{method} (unmatched)"] += 1
            limits = self._limit_headers(path)
            fault = self._take_fault(path)
        if fault is not None:
            return fault.status, {"message": fault.message}, {**limits, **fault.headers}
        if route is None:
            return 404, {"message": "Not Found"}, limits
        try:
            body = json.loads(raw_body) if raw_body else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}, limits
        try:
            handler = getattr(self, route[0])
            status, payload, extra = handler(_Req(path, route[1], query, headers, body))
        except _HttpError as exc:
            status, payload, extra = exc.status, {"message": exc.message}, {}
        except Exception:
            log.exception("fake GitHub: %s %s failed", method, path)
            status, payload, extra = 500, {"message": "fake GitHub error"}, {}
        finally:
            self._flush()
        return status, payload, {**limits, **extra}

    def _limit_headers(self, path: str) -> dict[str, str]:
        now = self._clock()
        reset, used = self._window
        if now >= reset:
            reset, used = float(int(now) + 3600), 0
        if not path.startswith("/_sim"):
            used += 1
        self._window = (reset, used)
        return {
            "X-RateLimit-Limit": str(RATE_LIMIT),
            "X-RateLimit-Remaining": str(max(0, RATE_LIMIT - used)),
            "X-RateLimit-Used": str(used),
            "X-RateLimit-Reset": str(int(reset)),
            "X-RateLimit-Resource": "core",
        }

    def _take_fault(self, path: str) -> _Faults | None:
        for fault in self._faults:
            sim_ok = fault.prefix.startswith("/_sim") or not path.startswith("/_sim")
            if fault.count > 0 and sim_ok and path.startswith(fault.prefix):
                fault.count -= 1
                self._faults = [f for f in self._faults if f.count > 0]
                return fault
        return None

    # -- auth -------------------------------------------------------------------------------------

    @staticmethod
    def _bearer(req: _Req) -> str:
        scheme, _, value = str(req.headers.get("authorization", "")).partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value:
            raise _HttpError(401, "Requires authentication")
        return value.strip()

    def _require_jwt(self, req: _Req) -> None:
        try:
            claims = jwt.decode(
                self._bearer(req),
                self._public_key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                options={
                    "require": ["iat", "exp", "iss"],
                    "verify_exp": False,  # checked below against the fake's clock
                    "verify_iat": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _HttpError(401, "A JSON web token could not be decoded") from exc
        now = self._clock()
        try:
            iat, exp = float(claims["iat"]), float(claims["exp"])
        except (TypeError, ValueError) as exc:
            raise _HttpError(401, "'iat' and 'exp' must be numbers") from exc
        if str(claims["iss"]) != self.app_id:
            raise _HttpError(401, "'Issuer' claim ('iss') does not match the App")
        if exp - iat > MAX_JWT_LIFETIME:
            raise _HttpError(401, "'Expiration time' claim ('exp') is too far in the future")
        if exp <= now:
            raise _HttpError(401, "'Expiration time' claim ('exp') is in the past")
        if iat > now + JWT_SKEW:
            raise _HttpError(401, "'Issued at' claim ('iat') is in the future")

    def _require_installation(self, req: _Req, target: str) -> None:
        with self._lock:
            token = self._tokens.get(self._bearer(req))
            if token is None or token.kind != "installation" or token.expires_at <= self._clock():
                raise _HttpError(401, "Bad credentials")
            account = self._installations.get(token.installation_id)
            if account not in ("*", target.split("/")[0]):
                raise _HttpError(403, "Resource not accessible by integration")

    def _mint(
        self, kind: str, prefix: str, alphabet: str, length: int, **kw: Any
    ) -> tuple[str, _Token]:
        token = prefix + "".join(secrets.choice(alphabet) for _ in range(length))
        record = _Token(kind, self._clock() + self.token_ttl, **kw)
        self._tokens[token] = record
        return token, record

    def _installation_for(self, account: str) -> int | None:
        for inst, acc in self._installations.items():
            if acc == account:
                return inst
        for inst, acc in self._installations.items():
            if acc == "*":
                return inst
        if self.auto_install:
            inst = next(self._ids)
            self._installations[inst] = account
            return inst
        return None

    # -- REST routes ---------------------------------------------------------------------------

    def _access_token(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_jwt(req)
        inst = int(req.params["inst"])
        with self._lock:
            if inst not in self._installations:
                if not self.auto_install:
                    raise _HttpError(404, "Not Found")
                self._installations[inst] = "*"
            token, record = self._mint(
                "installation",
                "ghs_",
                string.ascii_letters + string.digits,
                36,
                installation_id=inst,
            )
        body = {
            "token": token,
            "expires_at": _iso(record.expires_at),
            "permissions": {"organization_self_hosted_runners": "write", "administration": "write"},
            "repository_selection": "all",
        }
        return 201, body, {}

    def _installation(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_jwt(req)
        account = req.params.get("org") or req.params["owner"]
        with self._lock:
            inst = self._installation_for(account)
        if inst is None:
            raise _HttpError(404, "Not Found")
        body = {
            "id": inst,
            "app_id": int(self.app_id) if self.app_id.isdigit() else 0,
            "account": {"login": account, "type": "Organization"},
            "target_type": "Organization",
        }
        return 200, body, {}

    def _registration_token(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        with self._lock:
            token, record = self._mint(
                "registration",
                "A",
                string.ascii_uppercase + string.digits,
                28,
                target=req.target,
            )
        return 201, {"token": token, "expires_at": _iso(record.expires_at)}, {}

    def _jitconfig(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        target = req.target
        self._require_installation(req, target)
        name, group_id, labels = (req.body.get(k) for k in ("name", "runner_group_id", "labels"))
        if not isinstance(name, str) or not name:
            raise _HttpError(422, "Invalid request: name is required")
        if not isinstance(group_id, int):
            raise _HttpError(422, "Invalid request: runner_group_id is required")
        if not isinstance(labels, list) or not 1 <= len(labels) <= 100:
            raise _HttpError(422, "Invalid request: labels must have 1 to 100 items")
        with self._lock:
            if "/" not in target and group_id not in {g["id"] for g in self._org_groups(target)}:
                raise _HttpError(404, "Runner group not found")
            if any(r.name == name and r.target == target for r in self._runners.values()):
                raise _HttpError(
                    409, "Already exists - A runner with the same name already exists."
                )
            runner = _Runner(next(self._ids), name, target, [str(x) for x in labels], group_id)
            runner.status = "offline"  # until the runner process starts with the config
            self._runners[runner.id] = runner
            nonce = secrets.token_urlsafe(24)
            self._jit[nonce] = runner.id
            runner_json = self._runner_json(runner)
        config = {"nonce": nonce, "runner_id": runner.id, "name": name, "target": target}
        encoded = base64.b64encode(json.dumps(config).encode()).decode()
        return 201, {"runner": runner_json, "encoded_jit_config": encoded}, {}

    def _list_runners(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        with self._lock:
            items = [
                self._runner_json(r)
                for r in sorted(self._runners.values(), key=lambda r: r.id)
                if r.target == req.target and r.name == req.query.get("name", r.name)
            ]
        page, links = self._page(items, req)
        return 200, {"total_count": len(items), "runners": page}, links

    def _get_runner(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        with self._lock:
            runner = self._runner_in(req)
            return 200, self._runner_json(runner), {}

    def _delete_runner(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        with self._cond:
            runner = self._runner_in(req)
            if runner.busy:
                raise _HttpError(
                    422, f'Bad request - Runner "{runner.name}" is still running a job"'
                )
            del self._runners[runner.id]
            self._cond.notify_all()
        return 204, None, {}

    def _runner_groups(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.params["org"])
        with self._lock:
            items = [dict(g) for g in self._org_groups(req.params["org"])]
        page, links = self._page(items, req)
        return 200, {"total_count": len(items), "runner_groups": page}, links

    def _runner_in(self, req: _Req) -> _Runner:
        runner = self._runners.get(int(req.params["runner_id"]))
        if runner is None or runner.target != req.target:
            raise _HttpError(404, "Not Found")
        return runner

    def _org_groups(self, org: str) -> list[dict[str, Any]]:
        default = {"id": 1, "name": "Default", "default": True, "visibility": "all"}
        return self._groups.setdefault(org, [default])

    def _page(self, items: list[Any], req: _Req) -> tuple[list[Any], dict[str, str]]:
        try:
            per_page = min(max(int(req.query.get("per_page", 30)), 1), 100)
            page = max(int(req.query.get("page", 1)), 1)
        except ValueError as exc:
            raise _HttpError(422, "per_page and page must be integers") from exc
        last = max(1, math.ceil(len(items) / per_page))

        kept = "".join(f"&{k}={v}" for k, v in req.query.items() if k not in ("page", "per_page"))

        def link(number: int, rel: str) -> str:
            query = f"per_page={per_page}&page={number}{kept}"
            return f'<{self.url}{req.path}?{query}>; rel="{rel}"'

        links = []
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(page - 1, "prev"), link(1, "first")]
        chunk = items[(page - 1) * per_page : page * per_page]
        return chunk, ({"Link": ", ".join(links)} if links else {})

    def _installation_repos(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        """The repositories the installation can reach: here, every repo that has jobs
        under the installation's account."""
        with self._lock:
            token = self._tokens.get(self._bearer(req))
            if token is None or token.kind != "installation" or token.expires_at <= self._clock():
                raise _HttpError(401, "Bad credentials")
            account = self._installations.get(token.installation_id)
            repos = sorted(
                {j.repo for j in self._jobs.values() if account in ("*", j.repo.split("/")[0])}
            )
        items = [
            {"id": self._repo_id(r), "full_name": r, "owner": {"login": r.split("/")[0]}}
            for r in repos
        ]
        page, links = self._page(items, req)
        return 200, {"total_count": len(items), "repositories": page}, links

    def _repo_id(self, repo: str) -> int:
        return self._repo_ids.setdefault(repo, next(self._ids))

    def _runs(self, repo: str) -> dict[str, list[_Job]]:
        runs: dict[str, list[_Job]] = {}
        for job in self._jobs.values():
            if job.repo == repo:
                runs.setdefault(job.run_id, []).append(job)
        return runs

    @staticmethod
    def _run_status(jobs: list[_Job]) -> str:
        states = {j.state for j in jobs}
        if states <= {"queued"}:
            return "queued"
        if states <= {"completed", "cancelled"}:
            return "completed"
        return "in_progress"

    def _list_runs(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        wanted = req.query.get("status", "")
        with self._lock:
            items = [
                {"id": int(run_id), "status": status, "repository": {"full_name": req.target}}
                for run_id, jobs in self._runs(req.target).items()
                if (status := self._run_status(jobs)) == wanted or not wanted
            ]
        page, links = self._page(items, req)
        return 200, {"total_count": len(items), "workflow_runs": page}, links

    def _list_run_jobs(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        self._require_installation(req, req.target)
        with self._lock:
            jobs = self._runs(req.target).get(req.params["run_id"])
            if jobs is None:
                raise _HttpError(404, "Not Found")
            items = [
                {
                    "id": int(j.job_id),
                    "run_id": int(j.run_id),
                    "status": "completed" if j.state == "cancelled" else j.state,
                    "conclusion": j.conclusion or None,
                    "labels": list(j.labels),
                    "runner_id": j.runner_id,
                    "runner_name": j.runner_name or None,
                }
                for j in jobs
            ]
        page, links = self._page(items, req)
        return 200, {"total_count": len(items), "jobs": page}, links

    def _runner_json(self, runner: _Runner) -> dict[str, Any]:
        return {
            "id": runner.id,
            "name": runner.name,
            "os": "Linux",
            "status": runner.status,
            "busy": runner.busy,
            "ephemeral": runner.ephemeral,
            "runner_group_id": runner.group_id,
            "labels": [
                {"id": i + 1, "name": label, "type": "custom"}
                for i, label in enumerate(runner.labels)
            ],
        }

    # -- simulation routes (what the runner binary does) ----------------------------------

    def _sim_register(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        body = req.body
        with self._cond:
            if body.get("jit_config"):
                runner = self._take_jit(str(body["jit_config"]))
            else:
                runner = self._register_with_token(body)
            runner.status, runner.seen = "online", time.monotonic()
            self._cond.notify_all()
        return 201, {"id": runner.id}, {}

    def _take_jit(self, encoded: str) -> _Runner:
        try:
            nonce = json.loads(base64.b64decode(encoded, validate=True))["nonce"]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise _HttpError(401, "invalid JIT config") from exc
        runner_id = self._jit.pop(str(nonce), None)  # single use
        runner = self._runners.get(runner_id) if runner_id is not None else None
        if runner is None:
            raise _HttpError(401, "JIT config unknown, used or its runner deleted")
        return runner

    def _register_with_token(self, body: dict[str, Any]) -> _Runner:
        target = _target_of_url(str(body.get("url", "")))
        token = self._tokens.get(str(body.get("token", "")))
        if token is None or token.kind != "registration" or token.target != target:
            raise _HttpError(401, "invalid registration token for this URL")
        if token.expires_at <= self._clock():
            raise _HttpError(401, "registration token expired")
        name, labels = body.get("name"), body.get("labels", [])
        if not isinstance(name, str) or not name or not isinstance(labels, list):
            raise _HttpError(422, "name (string) and labels (list) are required")
        for old in [r for r in self._runners.values() if r.name == name and r.target == target]:
            self._drop_runner(old, "failure")  # config.sh --replace
        runner = _Runner(next(self._ids), name, target, [str(x) for x in labels])
        runner.ephemeral = bool(body.get("ephemeral", True))
        self._runners[runner.id] = runner
        return runner

    def _sim_next_job(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        runner_id = int(req.params["runner_id"])
        try:
            wait = min(max(float(req.query.get("wait", 0)), 0.0), MAX_WAIT)
        except ValueError as exc:
            raise _HttpError(422, "wait must be a number of seconds") from exc
        deadline = time.monotonic() + wait  # real time: this is a socket's long-poll
        with self._cond:
            runner = self._runners.get(runner_id)
            if runner is None or runner.status != "online":
                raise _HttpError(404, "runner not found or offline")
            runner.polling += 1
            try:
                return self._next_job(runner_id, deadline)
            finally:
                runner.polling -= 1
                runner.seen = time.monotonic()

    def _next_job(self, runner_id: int, deadline: float) -> tuple[int, Any, dict[str, str]]:
        """The long-poll's wait; called holding the lock."""
        while True:
            runner = self._runners.get(runner_id)
            if runner is None or runner.status != "online":
                raise _HttpError(404, "runner not found or offline")
            if runner.job_id:  # a lost answer: hand the same job again
                return 200, self._assignment(self._jobs[runner.job_id]), {}
            job = self._oldest_match(runner)
            if job is not None:
                self._start(job, runner)
                return 200, self._assignment(job), {}
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return 204, None, {}
            self._cond.wait(remaining)

    def _oldest_match(self, runner: _Runner) -> _Job | None:
        for job in self._queued.values():
            same_place = job.org == runner.target or job.repo == runner.target
            if same_place and covers(runner.labels, job.labels):
                return job
        return None

    def _start(self, job: _Job, runner: _Runner) -> None:
        job.state, job.started_at = "in_progress", self._clock()
        self._queued.pop(job.job_id, None)
        job.runner_id, job.runner_name, job.runner_group_id = (
            runner.id,
            runner.name,
            runner.group_id,
        )
        runner.busy, runner.job_id = True, job.job_id
        self._event("in_progress", job)

    @staticmethod
    def _assignment(job: _Job) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "run_id": job.run_id,
            "repository": job.repo,
            "duration": job.duration,
            "conclusion": job.planned,
        }

    def _sim_complete(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        runner_id = int(req.params["runner_id"])
        job_id = str(req.body.get("job_id", ""))
        conclusion = str(req.body.get("conclusion", ""))
        if conclusion not in CONCLUSIONS:
            raise _HttpError(422, "conclusion must be success, failure or cancelled")
        with self._cond:
            runner = self._runners.get(runner_id)
            if runner is None:
                raise _HttpError(404, "runner not found")
            if runner.job_id != job_id:
                raise _HttpError(409, f"runner {runner_id} is not running job {job_id}")
            runner.seen = time.monotonic()
            self._finish(self._jobs[job_id], conclusion)
            if runner.ephemeral:
                del self._runners[runner.id]
            else:
                runner.busy, runner.job_id = False, ""
            self._cond.notify_all()
        return 200, {}, {}

    def _sim_renew(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        """The runner renews its job's lock (the real runner does every minute)."""
        runner_id = int(req.params["runner_id"])
        job_id = str(req.body.get("job_id", ""))
        with self._cond:
            runner = self._runners.get(runner_id)
            if runner is None or runner.job_id != job_id:
                raise _HttpError(404, f"runner {runner_id} no longer holds job {job_id}")
            runner.seen = time.monotonic()
        return 200, {}, {}

    def _reap_lost_runners(self) -> None:
        """Fail the job of a busy runner silent past `lost_runner_timeout` and drop the
        runner; mark an idle silent one offline (its machine is gone)."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(0.25)
                if self._stopping:
                    return
                limit = time.monotonic() - self.lost_runner_timeout
                for runner in list(self._runners.values()):
                    if runner.status != "online" or runner.polling or runner.seen > limit:
                        continue
                    if runner.job_id and self._jobs[runner.job_id].state == "in_progress":
                        log.info("runner %s lost mid-job %s", runner.name, runner.job_id)
                        self.lost_runners += 1
                        self._drop_runner(runner, "failure")
                    elif not runner.job_id:
                        runner.status = "offline"
            self._flush()

    def _sim_remove(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        with self._cond:
            runner = self._runners.get(int(req.params["runner_id"]))
            if runner is None:
                raise _HttpError(404, "runner not found")
            self._drop_runner(runner, "failure")
            self._cond.notify_all()
        return 204, None, {}

    def _drop_runner(self, runner: _Runner, conclusion: str) -> None:
        # A runner that vanishes mid-job fails it, as GitHub does once the runner is lost.
        if runner.job_id and self._jobs[runner.job_id].state == "in_progress":
            self._finish(self._jobs[runner.job_id], conclusion)
        self._runners.pop(runner.id, None)

    def _finish(self, job: _Job, conclusion: str) -> None:
        job.state, job.conclusion, job.completed_at = "completed", conclusion, self._clock()
        self._event("completed", job)

    def _sim_add_job(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        body = req.body
        try:
            duration = float(body.get("duration", 1.0))
        except (TypeError, ValueError) as exc:
            raise _HttpError(422, "duration must be a number") from exc
        try:
            ids = self.add_job(
                repo=str(body.get("repo", "")),
                labels=body.get("labels", []),
                org=str(body.get("org", "") or ""),
                duration=duration,
                conclusion=str(body.get("conclusion", "success")),
            )
        except ValueError as exc:
            raise _HttpError(422, str(exc)) from exc
        return 201, ids, {}

    def _sim_jobs(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        return 200, {"jobs": self.jobs()}, {}

    def _sim_job(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        job = self.job(req.params["job_id"])
        if job is None:
            raise _HttpError(404, "job not found")
        return 200, job, {}

    def _sim_cancel(self, req: _Req) -> tuple[int, Any, dict[str, str]]:
        if self.job(req.params["job_id"]) is None:
            raise _HttpError(404, "job not found")
        if not self.cancel_job(req.params["job_id"]):
            raise _HttpError(409, "only a queued job can be cancelled")
        return 200, self.job(req.params["job_id"]), {}

    @staticmethod
    def _job_json(job: _Job) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "run_id": job.run_id,
            "org": job.org,
            "repository": job.repo,
            "labels": list(job.labels),
            "duration": job.duration,
            "state": job.state,
            "runner_id": job.runner_id,
            "runner_name": job.runner_name,
            "conclusion": job.conclusion or None,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
        }

    # -- webhook events --------------------------------------------------------------------

    def _event(self, action: str, job: _Job) -> None:
        """Queue a `workflow_job` payload; called under the lock, delivered by `_flush`."""
        owner, _, name = job.repo.partition("/")
        repo_id = self._repo_ids.setdefault(job.repo, next(self._ids))
        group_name = None
        if job.runner_group_id is not None:
            group_name = next(
                (g["name"] for g in self._org_groups(job.org) if g["id"] == job.runner_group_id),
                "Default",
            )
        api = f"{self.url}/repos/{job.repo}"
        payload: dict[str, Any] = {
            "action": action,
            "workflow_job": {
                "id": int(job.job_id),
                "run_id": int(job.run_id),
                "run_attempt": 1,
                "run_url": f"{api}/actions/runs/{job.run_id}",
                "head_sha": f"{int(job.run_id):040x}",
                "head_branch": "main",
                "node_id": f"CR_{job.job_id}",
                "name": "build",
                "workflow_name": "CI",
                "html_url": f"{self.url}/{job.repo}/actions/runs/{job.run_id}/job/{job.job_id}",
                "url": f"{api}/actions/jobs/{job.job_id}",
                "check_run_url": f"{api}/check-runs/{job.job_id}",
                "status": "completed" if action == "completed" else action,
                "conclusion": job.conclusion or None,
                "labels": list(job.labels),
                "runner_id": job.runner_id,
                "runner_name": job.runner_name or None,
                "runner_group_id": job.runner_group_id,
                "runner_group_name": group_name,
                "created_at": _iso(job.created_at),
                "started_at": _iso(job.started_at or job.created_at),
                "completed_at": _iso(job.completed_at) if job.completed_at else None,
                "steps": [],
            },
            "repository": {
                "id": repo_id,
                "name": name,
                "full_name": job.repo,
                "private": True,
                "owner": {"login": owner, "type": "Organization"},
            },
            "organization": {"login": job.org},
            "sender": {"login": "octocat", "type": "User"},
        }
        inst = self._installation_for(job.org)
        if inst is not None:
            payload["installation"] = {"id": inst, "node_id": f"MDIz{inst}"}
        self._outbox.append(payload)

    def _flush(self) -> None:
        """Deliver queued events in order, outside the state lock; one thread at a time."""
        while self._outbox:
            if not self._emit_lock.acquire(blocking=False):
                return  # the thread holding it delivers ours too (it loops until empty)
            try:
                while self._outbox:
                    payload = self._outbox.popleft()
                    if self.on_event is None:
                        continue
                    try:
                        self.on_event(payload)
                    except Exception:
                        log.exception("fake GitHub: on_event failed for %s", payload["action"])
            finally:
                self._emit_lock.release()


class _Server(ThreadingHTTPServer):
    fake: FakeGitHub
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs under a burst: 1 s client stalls


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for the clients' sessions
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    def _serve(self, method: str) -> None:
        assert isinstance(self.server, _Server)
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, body, extra = fake._dispatch(method, self.path, headers, raw)
        data = b"" if body is None or status == 204 else json.dumps(body).encode()
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake GitHub: " + format, *args)
