"""GitHub App adapter (`TokenIssuer`): App JWT, installation and registration tokens, JIT, runners.

Tokens are cached per process and, encrypted, in Redis so that every worker shares one;
one refresh runs at a time across processes. GitHub's vocabulary (status codes, rate-limit
headers) stops here: callers see `TemporaryError`, `RateLimited` or `PermanentError`.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis import Redis, RedisError

from migctl.domain.errors import (
    PermanentError,
    RateLimited,
    RunnerBusy,
    RunnerNameTaken,
    TemporaryError,
)
from migctl.ports import (
    Clock,
    QueuedJob,
    RunnerCredentials,
    RunnerInfo,
    RunnerScope,
    SystemClock,
)
from migctl.settings import GithubAppSettings, env_hint

log = logging.getLogger(__name__)
_T = TypeVar("_T")

JWT_BACKDATE = 60  # GitHub's advice: iat 60 s in the past against clock drift
JWT_LIFETIME = 540  # GitHub refuses exp > 600 s ahead; 60 s of slack for skew
JWT_REUSE = 300  # re-sign well before expiry so a slow request never carries a stale JWT
TOKEN_MARGIN = 300.0  # a cached token is dropped 5 min early: a runner still has to use it
TIMEOUT = (5.0, 15.0)  # connect, read
TRIES = 3
BACKOFF = (0.5, 1.5)  # seconds before try 2 and 3
LOCK_TTL_MS = 10_000  # covers one mint; a crashed holder blocks others at most this long
LOCK_POLL = 0.05
LOCK_WAIT = 12.0  # losers give up (TemporaryError) after this
ID_CACHE_TTL = 3600  # installation ids and runner groups rarely change
MAX_PAGES = 200  # 20k runners: a guard against a Link loop, not a real limit
DEFAULT_GROUP_ID = 1  # the org's "Default" runner group
API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


def _where(*path: str) -> str:
    return f"{'.'.join(path)} (env {env_hint(path)})"


def load_app_key(settings: GithubAppSettings) -> rsa.RSAPrivateKey:
    """The App's RSA key from `private_key` or `private_key_path`; `PermanentError` if unusable."""
    where = _where("github_app", "private_key_path")
    if settings.private_key:
        source = _where("github_app", "private_key")
        pem = settings.private_key.encode()
    elif settings.private_key_path:
        source = f"{where} = {settings.private_key_path!r}"
        try:
            pem = Path(settings.private_key_path).expanduser().read_bytes()
        except OSError as exc:
            raise PermanentError(
                f"{source}: cannot read the file ({exc.strerror or exc}); "
                "expected the GitHub App's private key (.pem)"
            ) from exc
    else:
        raise PermanentError(f"{where}: not set; expected the GitHub App's private key (.pem)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:
        raise PermanentError(f"{source}: the key is encrypted; GitHub App keys are not") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PermanentError(
            f"{source}: not a PEM private key; expected the RSA key downloaded from the App"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PermanentError(f"{source}: not an RSA key; GitHub App keys are RSA")
    return key


def make_app_jwt(app_id: str, key: rsa.RSAPrivateKey, now: float) -> str:
    """The App JWT (RS256) GitHub accepts for `now`: backdated 60 s, 9 minutes of validity."""
    issued = int(now)
    claims = {"iat": issued - JWT_BACKDATE, "exp": issued + JWT_LIFETIME, "iss": app_id}
    return jwt.encode(claims, key, algorithm="RS256")


def token_cipher(key: rsa.RSAPrivateKey) -> Fernet:
    """Encrypts cached tokens; derived from the App key so every process of the App agrees."""
    # Canonical DER, so PKCS#1 and PKCS#8 files of the same key derive the same cipher.
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"migctl/gh-token-cache/v1")
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(der)))


def parse_time(text: str) -> float:
    """GitHub's ISO 8601 timestamps ("2026-01-01T00:00:00Z", "...-08:00") as epoch seconds."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class _Target:
    """Where runners of a scope live on GitHub."""

    api: str  # "/orgs/acme" or "/repos/acme/app"
    url: str  # runner_url for config.sh
    name: str  # "acme" or "acme/app", for keys and messages
    org: str
    is_repo: bool


class GithubApp:
    """`TokenIssuer` for one GitHub App. Thread-safe; share one per process."""

    def __init__(
        self,
        settings: GithubAppSettings,
        redis: Redis,
        pool_id: str,
        clock: Clock | None = None,
        session: requests.Session | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        max_in_flight: int = 10,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._prefix = f"migctl:{{{pool_id}}}:gh:"  # {pool} is a Redis cluster hash tag
        self._clock = clock or SystemClock()
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._session.headers.update(API_HEADERS)
        self._base = settings.base_url.rstrip("/")
        self._sleep = sleep
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._key: rsa.RSAPrivateKey | None = None
        self._cipher: Fernet | None = None
        self._jwt: tuple[str, float] | None = None
        self._local: dict[str, tuple[str, float]] = {}
        self._ids: dict[str, str] = {}  # looked-up ids, by Redis key
        self._limits: dict[str, Any] = {}
        self._release = redis.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"GithubApp(app_id={self._settings.app_id!r}, base_url={self._base!r})"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    # -- the App key and JWT ------------------------------------------------------------

    def check_key(self) -> None:
        """Load and validate the App key now (process start); `PermanentError` says what to fix."""
        if not self._settings.app_id:
            raise PermanentError(f"{_where('github_app', 'app_id')}: not set")
        self._app_key()

    def _app_key(self) -> rsa.RSAPrivateKey:
        with self._lock:
            if self._key is None:
                self._key = load_app_key(self._settings)
                self._cipher = token_cipher(self._key)
            return self._key

    def _fernet(self) -> Fernet:
        self._app_key()
        assert self._cipher is not None
        return self._cipher

    def _app_jwt(self) -> str:
        if not self._settings.app_id:
            raise PermanentError(f"{_where('github_app', 'app_id')}: not set")
        key = self._app_key()
        now = self._clock.now()
        with self._lock:
            if self._jwt is None or now - self._jwt[1] > JWT_REUSE or now < self._jwt[1]:
                self._jwt = (make_app_jwt(self._settings.app_id, key, now), now)
            return self._jwt[0]

    # -- TokenIssuer ----------------------------------------------------------------------

    def runner_credentials(
        self, scope: RunnerScope, runner_name: str, labels: Sequence[str], jit: bool
    ) -> RunnerCredentials:
        target = self._target(scope)
        inst = self._installation_id(scope, target)
        group_id, group_name = self._runner_group(target, inst)
        if jit:
            return self._jit(target, inst, runner_name, labels, group_id, group_name)
        token, expires_at = self._shared_secret(
            f"rtoken:{target.name}", lambda: self._mint_registration(target, inst)
        )
        return RunnerCredentials(
            runner_url=target.url,
            registration_token=token,
            runner_group=group_name,
            expires_at=expires_at,
        )

    def list_runners(self, scope: RunnerScope) -> list[RunnerInfo]:
        target = self._target(scope)
        inst = self._installation_id(scope, target)
        runners: list[RunnerInfo] = []
        for page in self._pages(inst, f"{target.api}/actions/runners"):
            for item in page.get("runners", []):
                try:
                    runners.append(
                        RunnerInfo(
                            id=int(item["id"]),
                            name=str(item["name"]),
                            status=str(item.get("status", "")),
                            busy=bool(item.get("busy", False)),
                            labels=tuple(str(lab["name"]) for lab in item.get("labels", [])),
                        )
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise TemporaryError(f"GitHub list runners of {target.name}: bad item") from exc
        return runners

    def queued_jobs(self, scope: RunnerScope) -> list[QueuedJob]:
        """Jobs still queued on GitHub: every repository the installation reaches in the
        scope's org (or the scope's one repository), its runs queued or in progress, and
        their jobs that are queued. Costs 1 + repos x 2 + runs calls: for recovery, not
        for every tick."""
        target = self._target(scope)
        inst = self._installation_id(scope, target)
        if target.is_repo:
            repos = [target.name]
        else:
            repos = [
                str(repo["full_name"])
                for page in self._pages(inst, "/installation/repositories")
                for repo in page.get("repositories", [])
                if str(repo.get("full_name", "")).split("/")[0].lower() == target.org.lower()
            ]
        found: dict[str, QueuedJob] = {}
        for repo in repos:
            for status in ("queued", "in_progress"):
                runs = self._pages(inst, f"/repos/{repo}/actions/runs", {"status": status})
                for run in (r for page in runs for r in page.get("workflow_runs", [])):
                    found.update((job.job_id, job) for job in self._queued_in_run(inst, repo, run))
        return list(found.values())

    def _queued_in_run(self, inst: int, repo: str, run: dict[str, Any]) -> list[QueuedJob]:
        runs = f"/repos/{repo}/actions/runs"
        path = f"{runs}/{_field(lambda: int(run['id']), f'GET {runs}')}/jobs"
        items = [j for page in self._pages(inst, path) for j in page.get("jobs", [])]
        return [
            _field(functools.partial(_queued_job, item, repo), f"GET {path}")
            for item in items
            if item.get("status") == "queued"
        ]

    def delete_runner(self, scope: RunnerScope, runner_id: int) -> None:
        target = self._target(scope)
        inst = self._installation_id(scope, target)
        path = f"{target.api}/actions/runners/{int(runner_id)}"
        resp = self._authed(inst, "DELETE", path)
        if resp.status_code in (204, 404):  # 404: already gone, which is what we wanted
            return
        if resp.status_code == 422:
            raise RunnerBusy(
                f"runner busy: GitHub refused to delete runner {runner_id} of {target.name} "
                f"(422 {_message(resp)})"
            )
        fail(resp, f"DELETE {path}")

    def rate_limit(self) -> dict[str, Any]:
        """The last rate-limit headers seen: remaining, limit, used, reset (epoch), resource."""
        with self._lock:
            return dict(self._limits)

    # -- scope, installation, group ---------------------------------------------------------

    def _target(self, scope: RunnerScope) -> _Target:
        web = self._settings.web_url.rstrip("/")
        org = scope.org or self._settings.org
        if self._settings.runner_scope == "repo" and scope.repo:
            owner, _, name = scope.repo.rpartition("/")
            owner = owner or org  # a bare repo name belongs to the scope's org
            if not owner:
                where = _where("github_app", "org")
                raise PermanentError(f"repo {scope.repo!r} has no owner; set {where}")
            full = f"{owner}/{name}"
            return _Target(f"/repos/{full}", f"{web}/{full}", full, owner, True)
        if not org:
            raise PermanentError(f"no GitHub organisation: set {_where('github_app', 'org')}")
        return _Target(f"/orgs/{org}", f"{web}/{org}", org, org, False)

    def _installation_id(self, scope: RunnerScope, target: _Target) -> int:
        if scope.installation_id:
            return scope.installation_id
        if self._settings.installation_id:
            return self._settings.installation_id
        return int(self._shared_plain(f"installation:{target.name}", lambda: self._lookup(target)))

    def _lookup(self, target: _Target) -> str:
        path = f"{target.api}/installation"
        resp = self._request("GET", path, self._app_jwt())
        if resp.status_code == 404:
            raise PermanentError(
                f"the GitHub App {self._settings.app_id} is not installed on {target.name}: "
                f"install it, or set {_where('github_app', 'installation_id')}"
            )
        body = json_answer(resp, f"GET {path}", dict)
        return str(_field(lambda: int(body["id"]), f"GET {path}"))

    def _runner_group(self, target: _Target, inst: int) -> tuple[int, str]:
        wanted = self._settings.runner_group.strip()
        # Repo runners cannot join org runner groups; GitHub still wants an id for JIT.
        if not wanted or target.is_repo or wanted == str(DEFAULT_GROUP_ID):
            return DEFAULT_GROUP_ID, ""
        value = self._shared_plain(
            f"rgroup:{target.org}:{wanted}", lambda: self._find_group(target, inst, wanted)
        )
        group_id, name = json.loads(value)
        return int(group_id), str(name)

    def _find_group(self, target: _Target, inst: int, wanted: str) -> str:
        for page in self._pages(inst, f"/orgs/{target.org}/actions/runner-groups"):
            for group in page.get("runner_groups", []):
                name = str(group.get("name", ""))
                if str(group.get("id")) == wanted or name.lower() == wanted.lower():
                    return json.dumps([int(group["id"]), "" if group.get("default") else name])
        raise PermanentError(
            f"runner group {wanted!r} not found in org {target.org}: "
            f"check {_where('github_app', 'runner_group')}"
        )

    # -- minting -----------------------------------------------------------------------------

    def _installation_token(self, inst: int) -> str:
        token, _ = self._shared_secret(f"itoken:{inst}", lambda: self._mint_installation(inst))
        return token

    def _mint_installation(self, inst: int) -> tuple[str, float]:
        path = f"/app/installations/{inst}/access_tokens"
        resp = self._request("POST", path, self._app_jwt())
        if resp.status_code == 401:
            raise PermanentError(
                f"GitHub refused the JWT of App {self._settings.app_id} (401 {_message(resp)}): "
                f"check {_where('github_app', 'app_id')} and that the private key is this App's"
            )
        if resp.status_code == 404:
            self._forget_ids()
            raise PermanentError(
                f"GitHub App {self._settings.app_id} has no installation {inst}: is the App "
                f"installed? (check {_where('github_app', 'installation_id')})"
            )
        token, expires_at = self._token_body(resp, f"POST {path}")
        log.info("GitHub installation token minted for installation %s", inst)
        return token, expires_at

    def _mint_registration(self, target: _Target, inst: int) -> tuple[str, float]:
        path = f"{target.api}/actions/runners/registration-token"
        resp = self._authed(inst, "POST", path)
        if resp.status_code in (403, 404):
            perm = "administration" if target.is_repo else "organization_self_hosted_runners"
            raise PermanentError(
                f"GitHub POST {path}: {resp.status_code} {_message(resp)}; does the App have "
                f"'{perm}: write' on {target.name}?"
            )
        token, expires_at = self._token_body(resp, f"POST {path}")
        log.info("GitHub registration token minted for %s", target.name)
        return token, expires_at

    def _jit(
        self,
        target: _Target,
        inst: int,
        runner_name: str,
        labels: Sequence[str],
        group_id: int,
        group_name: str,
    ) -> RunnerCredentials:
        if not 1 <= len(labels) <= 100:
            raise PermanentError(f"a JIT runner needs 1 to 100 labels, got {len(labels)}")
        path = f"{target.api}/actions/runners/generate-jitconfig"
        body = {
            "name": runner_name,
            "runner_group_id": group_id,
            "labels": list(labels),
            "work_folder": "_work",
        }
        resp = self._authed(inst, "POST", path, json_body=body)
        if resp.status_code == 409:
            raise RunnerNameTaken(
                f"GitHub POST {path}: a runner named {runner_name!r} exists in {target.name}"
            )
        data = json_answer(resp, f"POST {path}", dict)
        config = _field(lambda: str(data["encoded_jit_config"]), f"POST {path}")
        log.info("GitHub JIT config minted for runner %s of %s", runner_name, target.name)
        return RunnerCredentials(runner_url=target.url, jit_config=config, runner_group=group_name)

    def _token_body(self, resp: requests.Response, what: str) -> tuple[str, float]:
        data = json_answer(resp, what, dict)
        token, expires_at = _field(lambda: (data["token"], data["expires_at"]), what)
        return str(token), _field(lambda: parse_time(str(expires_at)), what)

    def _forget_ids(self) -> None:
        # An uninstall/reinstall changes the id: looked-up ids must be looked up again.
        for key in [k for k in self._ids if k.startswith(self._prefix + "installation:")]:
            self._ids.pop(key, None)
            self._redis_call(self._redis.delete, key)

    # -- the shared secret cache -------------------------------------------------------------

    def _shared_secret(self, name: str, mint: Callable[[], tuple[str, float]]) -> tuple[str, float]:
        """The cached secret `name` (encrypted in Redis), else a fresh one from `mint`."""
        key = self._prefix + name

        def make() -> tuple[str, float]:
            secret, expires_at = mint()
            self._store(key, secret, expires_at)
            return secret, expires_at

        return self._once(name, lambda: self._local_get(key) or self._redis_get(key), make)

    def _shared_plain(self, name: str, fetch: Callable[[], str]) -> str:
        """A non-secret looked-up value (ids), cached in clear for ID_CACHE_TTL."""
        key = self._prefix + name

        def read() -> str | None:
            value = self._ids.get(key)
            if value is None:
                raw = self._redis_call(self._redis.get, key)
                value = raw.decode() if isinstance(raw, bytes) else raw
            if value is not None:
                self._ids[key] = value
            return value

        def make() -> str:
            value = fetch()
            self._ids[key] = value
            self._redis_call(self._redis.set, key, value, ex=ID_CACHE_TTL)
            return value

        return self._once(name, read, make)

    def _once(self, name: str, read: Callable[[], _T | None], make: Callable[[], _T]) -> _T:
        """`read()` the cached value, else `make()` it in one process while the others wait."""
        hit = read()
        if hit is not None:
            return hit
        lock = f"{self._prefix}{name}:lock"
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            owner = uuid.uuid4().hex
            if self._redis_call(self._redis.set, lock, owner, nx=True, px=LOCK_TTL_MS):
                try:
                    # Another process may have stored it between our read and our lock.
                    hit = read()
                    return hit if hit is not None else make()
                finally:
                    self._redis_call(self._release, keys=[lock], args=[owner])
            if time.monotonic() > deadline:
                raise TemporaryError(f"another process is refreshing GitHub {name}", delay=1.0)
            time.sleep(LOCK_POLL)  # real time: waiting on another process, not on a timer
            hit = read()
            if hit is not None:
                return hit

    def _local_get(self, key: str) -> tuple[str, float] | None:
        with self._lock:
            hit = self._local.get(key)
        if hit and hit[1] - TOKEN_MARGIN > self._clock.now():
            return hit
        return None

    def _redis_get(self, key: str) -> tuple[str, float] | None:
        raw = self._redis_call(self._redis.get, key)
        if raw is None:
            return None
        try:
            secret, expires_at = json.loads(self._fernet().decrypt(raw))
        except (InvalidToken, ValueError, TypeError):
            log.warning("cached GitHub token unreadable (App key changed?); minting a new one")
            return None
        if float(expires_at) - TOKEN_MARGIN <= self._clock.now():
            return None
        with self._lock:
            self._local[key] = (str(secret), float(expires_at))
        return str(secret), float(expires_at)

    def _store(self, key: str, secret: str, expires_at: float) -> None:
        ttl = expires_at - self._clock.now() - TOKEN_MARGIN
        if ttl <= 0:
            return  # too short-lived to share; the caller still uses it once
        with self._lock:
            self._local[key] = (secret, expires_at)
        blob = self._fernet().encrypt(json.dumps([secret, expires_at]).encode())
        self._redis_call(self._redis.set, key, blob, px=int(ttl * 1000))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._local.pop(self._prefix + name, None)
        self._redis_call(self._redis.delete, self._prefix + name)

    def _redis_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise TemporaryError(f"Redis, GitHub token cache: {exc}", delay=2.0) from exc

    # -- HTTP ------------------------------------------------------------------------------

    def _authed(
        self, inst: int, method: str, path: str, json_body: Any = None, params: Any = None
    ) -> requests.Response:
        """A request with the installation token; a refused token is replaced once."""
        resp = self._request(method, path, self._installation_token(inst), json_body, params)
        if resp.status_code == 401:
            # Revoked, or expired early by clock skew: mint a fresh token and try once more.
            self._forget(f"itoken:{inst}")
            resp = self._request(method, path, self._installation_token(inst), json_body, params)
            if resp.status_code == 401:
                raise PermanentError(
                    f"GitHub {method} {urlsplit(path).path}: 401 {_message(resp)} with a fresh "
                    "installation token"
                )
        return resp

    def _pages(
        self, inst: int, path: str, query: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        pages: list[dict[str, Any]] = []
        url: str | None = path
        params: dict[str, Any] | None = {"per_page": 100, **(query or {})}
        while url and len(pages) < MAX_PAGES:
            resp = self._authed(inst, "GET", url, params=params)
            pages.append(json_answer(resp, f"GET {urlsplit(url).path}", dict))
            url = resp.links.get("next", {}).get("url")
            params = None  # the Link URL carries them
        return pages

    def _request(
        self, method: str, path: str, auth: str, json_body: Any = None, params: Any = None
    ) -> requests.Response:
        """One call with bounded retries on 5xx and connection errors; rate limits raise."""
        url = path if path.startswith(("http://", "https://")) else self._base + path
        what = f"{method} {urlsplit(url).path}"
        headers = {"Authorization": f"Bearer {auth}"}
        for attempt in range(1, TRIES + 1):
            try:
                with self._in_flight:
                    resp = self._session.request(
                        method, url, headers=headers, json=json_body, params=params, timeout=TIMEOUT
                    )
            except requests.RequestException as exc:
                if attempt == TRIES:
                    raise TemporaryError(
                        f"GitHub {what}: {type(exc).__name__} after {TRIES} tries"
                    ) from exc
                log.warning("GitHub %s: %s, try %d of %d", what, type(exc).__name__, attempt, TRIES)
                self._sleep(BACKOFF[attempt - 1])
                continue
            self._note_limits(resp)
            if resp.status_code >= 500:
                if attempt == TRIES:
                    raise TemporaryError(f"GitHub {what}: {resp.status_code} after {TRIES} tries")
                log.warning("GitHub %s: %s, try %d of %d", what, resp.status_code, attempt, TRIES)
                self._sleep(BACKOFF[attempt - 1])
                continue
            self._raise_if_limited(resp, what)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_limits(self, resp: requests.Response) -> None:
        found: dict[str, Any] = {}
        for name in ("limit", "remaining", "used", "reset"):
            value = resp.headers.get(f"X-RateLimit-{name}")
            if value is not None and value.isdigit():
                found[name] = int(value)
        if not found:
            return
        found["resource"] = resp.headers.get("X-RateLimit-Resource", "")
        with self._lock:
            self._limits = found
        # Shared with /metrics (controller_github_rate_limit_*): any process may scrape.
        key = self._prefix + "rate_limit"
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping={k: str(v) for k, v in found.items()})
            pipe.expire(key, 3600)
            pipe.execute()
        except Exception as exc:  # a courtesy for metrics; never fail a GitHub call for it
            log.debug("rate-limit figures not written to Redis: %s", exc)

    def _raise_if_limited(self, resp: requests.Response, what: str) -> None:
        if resp.status_code not in (403, 429):
            return
        retry_after = resp.headers.get("Retry-After", "")
        remaining = resp.headers.get("X-RateLimit-Remaining")
        reset = resp.headers.get("X-RateLimit-Reset", "")
        if retry_after.isdigit():
            delay = max(1.0, float(retry_after))
        elif remaining == "0" and reset.isdigit():
            delay = max(1.0, float(reset) - self._clock.now())
        elif resp.status_code == 429:
            delay = 60.0  # GitHub's advice when it names no time: wait at least a minute
        else:
            return  # a plain 403: permission, handled by the caller
        raise RateLimited(f"GitHub {what}: rate limited ({resp.status_code})", delay=delay)


def _message(resp: requests.Response) -> str:
    """GitHub's own error text (JSON `message`), short."""
    try:
        text = str(resp.json().get("message", ""))
    except (ValueError, AttributeError):
        text = ""
    return (text or resp.reason or "").strip()[:200]


# What to check when the App's own calls are refused.
APP_HINTS = {
    401: "check github_app.app_id and the private key",
    403: "does the App have the permission for this endpoint?",
    404: "is the App installed there, with the permission for this endpoint?",
}


def fail(resp: requests.Response, what: str, hints: Mapping[int, str] = APP_HINTS) -> NoReturn:
    """A refused call as a PermanentError naming the call, GitHub's reason and a hint."""
    hint = hints.get(resp.status_code, "")
    raise PermanentError(
        f"GitHub {what}: {resp.status_code} {_message(resp)}" + (f"; {hint}" if hint else "")
    )


def json_answer(
    resp: requests.Response,
    what: str,
    kind: type[_T],
    hints: Mapping[int, str] = APP_HINTS,
) -> _T:
    """The JSON body of a 2xx answer, of the expected kind; other statuses become migctl
    errors."""
    if not resp.ok:
        fail(resp, what, hints)
    try:
        data = resp.json()
    except ValueError as exc:
        raise TemporaryError(f"GitHub {what}: the answer is not JSON") from exc
    if not isinstance(data, kind):
        raise TemporaryError(f"GitHub {what}: expected a JSON {kind.__name__}")
    return data


def _queued_job(item: dict[str, Any], repo: str) -> QueuedJob:
    return QueuedJob(
        job_id=str(int(item["id"])),
        run_id=str(int(item["run_id"])),
        repo=repo,
        labels=tuple(str(label) for label in item.get("labels", [])),
    )


def _field(get: Callable[[], Any], what: str) -> Any:
    try:
        return get()
    except (KeyError, TypeError, ValueError) as exc:
        raise TemporaryError(f"GitHub {what}: unexpected answer ({type(exc).__name__})") from exc
