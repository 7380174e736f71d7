"""GithubApp (requests + PyJWT) against the FakeGitHub HTTP server and a real Redis (DB 11).

Also drives the fake's simulation routes through SimRunnerClient: the dispatcher hands a
job to ANY matching runner and reports workflow_job events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
import requests
from redis import Redis, RedisError

from migctl.adapters.github import GithubApp
from migctl.domain.errors import NotFound, PermanentError, RateLimited, TemporaryError
from migctl.ports import RunnerScope
from migctl.settings import GithubAppSettings
from migctl.sim.github import FakeGitHub
from migctl.sim.keys import generate_app_key
from migctl.sim.runner_client import SimRunnerClient

pytestmark = pytest.mark.integration

APP_ID = "424242"
POOL = "p1"
LABELS = ["self-hosted", "linux", "x64"]
ORG = RunnerScope(org="acme")
REG_TOKEN = "POST /orgs/{org}/actions/runners/registration-token"
ACCESS_TOKEN = "POST /app/installations/{inst}/access_tokens"
JWT_HEADER = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"  # base64 of {"alg":"RS256","typ":"JWT"}


class OffsetClock:
    """The fake's notion of now; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_app_key()


@pytest.fixture
def redis_client() -> Iterator[Redis]:
    client = Redis.from_url("redis://127.0.0.1:6379/11")
    try:
        client.ping()
    except RedisError as exc:
        client.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at 127.0.0.1:6379 is required under CI: {exc}")
        pytest.skip(f"no Redis at 127.0.0.1:6379: {exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def fake(keys: tuple[bytes, bytes], events: list[dict[str, Any]], clock: OffsetClock):
    server = FakeGitHub(APP_ID, keys[1], on_event=events.append, clock=clock).start()
    yield server
    server.stop()


@pytest.fixture
def settings(keys: tuple[bytes, bytes], fake: FakeGitHub) -> GithubAppSettings:
    return GithubAppSettings(
        app_id=APP_ID,
        private_key=keys[0].decode(),
        base_url=fake.url,
        web_url="https://github.com",
        org="acme",
    )


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_app(
    settings: GithubAppSettings, redis_client: Redis, sleeps: list[float]
) -> Iterator[Callable[..., GithubApp]]:
    apps: list[GithubApp] = []

    def make(**overrides: Any) -> GithubApp:
        app = GithubApp(
            settings.model_copy(update=overrides), redis_client, POOL, sleep=sleeps.append
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def app(make_app: Callable[..., GithubApp]) -> GithubApp:
    return make_app()


@pytest.fixture
def runner(fake: FakeGitHub) -> Iterator[SimRunnerClient]:
    client = SimRunnerClient(fake.url)
    yield client
    client.close()


def _register(app: GithubApp, runner: SimRunnerClient, name: str, labels=LABELS) -> int:
    creds = app.runner_credentials(ORG, name, labels, jit=False)
    return runner.register(creds.runner_url, name, labels, token=creds.registration_token)


# -- tokens and caching ---------------------------------------------------------------------


def test_500_credentials_cost_one_registration_token_call(app: GithubApp, fake: FakeGitHub):
    creds = [app.runner_credentials(ORG, f"vm-{i}", LABELS, jit=False) for i in range(500)]
    assert len({c.registration_token for c in creds}) == 1
    assert creds[0].runner_url == "https://github.com/acme"
    assert creds[0].runner_group == ""
    assert creds[0].expires_at > time.time() + 3000
    assert fake.calls[REG_TOKEN] == 1
    assert fake.calls[ACCESS_TOKEN] == 1
    assert fake.calls["GET /orgs/{org}/installation"] == 1


def test_instances_sharing_redis_mint_once(make_app, fake: FakeGitHub):
    first = make_app().runner_credentials(ORG, "a", LABELS, jit=False)
    second = make_app().runner_credentials(ORG, "b", LABELS, jit=False)
    assert first.registration_token == second.registration_token
    assert fake.calls[REG_TOKEN] == 1
    assert fake.calls[ACCESS_TOKEN] == 1


def test_concurrent_processes_do_not_stampede(make_app, fake: FakeGitHub):
    apps = [make_app(), make_app()]
    barrier = threading.Barrier(16)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            creds = apps[i % 2].runner_credentials(ORG, f"vm-{i}", LABELS, jit=False)
            tokens.append(creds.registration_token)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(tokens) == 16 and len(set(tokens)) == 1
    assert fake.calls[REG_TOKEN] == 1
    assert fake.calls[ACCESS_TOKEN] == 1
    assert fake.calls["GET /orgs/{org}/installation"] == 1


def test_redis_never_holds_a_token_in_clear(app: GithubApp, fake: FakeGitHub, redis_client: Redis):
    app.runner_credentials(ORG, "vm-1", LABELS, jit=False)
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert "migctl:{p1}:gh:rtoken:acme" in keys
    assert any(k.startswith("migctl:{p1}:gh:itoken:") for k in keys)
    issued = [t["token"] for t in fake.tokens()]
    assert len(issued) == 2
    for key in keys:
        if redis_client.type(key) != b"string":
            continue
        value = redis_client.get(key) or b""
        assert not any(token.encode() in value for token in issued), key
    ttl = redis_client.ttl("migctl:{p1}:gh:rtoken:acme")
    assert 0 < ttl <= 3600 - 300


def test_installation_id_from_settings_skips_the_lookup(make_app, fake: FakeGitHub):
    inst = fake.install("acme")
    make_app(installation_id=inst).runner_credentials(ORG, "vm", LABELS, jit=False)
    assert fake.calls["GET /orgs/{org}/installation"] == 0
    assert fake.calls[ACCESS_TOKEN] == 1


def test_app_not_installed(make_app, fake: FakeGitHub):
    fake.auto_install = False
    with pytest.raises(PermanentError, match="not installed on acme"):
        make_app().runner_credentials(ORG, "vm", LABELS, jit=False)


# -- JIT, repo scope, runner groups -----------------------------------------------------------


def test_jit_config_registers_exactly_its_runner(app: GithubApp, fake: FakeGitHub, runner):
    creds = app.runner_credentials(ORG, "vm-jit", ["self-hosted", "gpu"], jit=True)
    assert creds.jit_config and not creds.registration_token
    assert creds.runner_url == "https://github.com/acme"
    again = app.runner_credentials(ORG, "vm-jit-2", ["self-hosted"], jit=True)
    assert again.jit_config != creds.jit_config
    assert fake.calls["POST /orgs/{org}/actions/runners/generate-jitconfig"] == 2  # never cached

    runner_id = runner.register("", "ignored-name", ["ignored"], jit_config=creds.jit_config)
    [info] = [r for r in app.list_runners(ORG) if r.id == runner_id]
    assert (info.name, info.status, info.labels) == ("vm-jit", "online", ("self-hosted", "gpu"))
    with pytest.raises(PermanentError):  # single use
        runner.register("", "x", [], jit_config=creds.jit_config)


def test_jit_name_conflict_is_permanent(app: GithubApp):
    app.runner_credentials(ORG, "vm-dup", LABELS, jit=True)
    with pytest.raises(PermanentError, match="vm-dup"):
        app.runner_credentials(ORG, "vm-dup", LABELS, jit=True)


def test_repo_scope(make_app, fake: FakeGitHub, runner):
    app = make_app(runner_scope="repo")
    scope = RunnerScope(org="acme", repo="acme/app")
    creds = app.runner_credentials(scope, "vm-r", LABELS, jit=False)
    assert creds.runner_url == "https://github.com/acme/app"
    assert fake.calls["POST /repos/{owner}/{repo}/actions/runners/registration-token"] == 1
    assert fake.calls["GET /repos/{owner}/{repo}/installation"] == 1
    runner_id = runner.register(creds.runner_url, "vm-r", LABELS, token=creds.registration_token)
    assert [r.id for r in app.list_runners(scope)] == [runner_id]
    assert app.list_runners(ORG) == []  # an org listing does not show repo runners
    jit = app.runner_credentials(scope, "vm-r-jit", LABELS, jit=True)
    assert jit.jit_config and jit.runner_url == "https://github.com/acme/app"


def test_registration_token_is_bound_to_its_url(app: GithubApp, runner):
    creds = app.runner_credentials(ORG, "vm", LABELS, jit=False)
    with pytest.raises(PermanentError, match="401"):
        runner.register("https://github.com/other", "vm", LABELS, token=creds.registration_token)


def test_runner_group_by_name_is_resolved_once(make_app, fake: FakeGitHub):
    group_id = fake.add_runner_group("acme", "gpu-pool")
    app = make_app(runner_group="gpu-pool")
    creds = app.runner_credentials(ORG, "vm-g1", LABELS, jit=True)
    assert creds.runner_group == "gpu-pool"
    app.runner_credentials(ORG, "vm-g2", LABELS, jit=True)
    make_app(runner_group="gpu-pool").runner_credentials(ORG, "vm-g3", LABELS, jit=False)
    assert fake.calls["GET /orgs/{org}/actions/runner-groups"] == 1
    assert {r["runner_group_id"] for r in fake.runners()} == {group_id}

    by_id = make_app(runner_group=str(group_id)).runner_credentials(ORG, "v", LABELS, jit=False)
    assert by_id.runner_group == "gpu-pool"
    with pytest.raises(PermanentError, match=r"github_app\.runner_group"):
        make_app(runner_group="nope").runner_credentials(ORG, "vm-x", LABELS, jit=True)


# -- listing and deleting runners ---------------------------------------------------------------


def test_list_runners_follows_pages(app: GithubApp, fake: FakeGitHub, runner):
    creds = app.runner_credentials(ORG, "x", LABELS, jit=False)
    ids = {
        runner.register(creds.runner_url, f"vm-{i}", LABELS, token=creds.registration_token)
        for i in range(205)
    }
    listed = app.list_runners(ORG)
    assert {r.id for r in listed} == ids
    assert all(r.labels == tuple(LABELS) and r.status == "online" for r in listed)
    assert fake.calls["GET /orgs/{org}/actions/runners"] == 3


def test_delete_runner_is_idempotent_and_refuses_busy(app: GithubApp, fake: FakeGitHub, runner):
    idle = _register(app, runner, "vm-idle")
    app.delete_runner(ORG, idle)
    app.delete_runner(ORG, idle)  # already gone: fine
    assert app.list_runners(ORG) == []

    busy = _register(app, runner, "vm-busy")
    fake.add_job("acme/app", LABELS)
    assert runner.next_job(busy, wait=0) is not None
    with pytest.raises(PermanentError, match="runner busy"):
        app.delete_runner(ORG, busy)


# -- faults -----------------------------------------------------------------------------------


def test_5xx_is_retried_with_backoff(app: GithubApp, fake: FakeGitHub, sleeps: list[float]):
    fake.fail_next(2, status=502, path_prefix="/orgs/acme/actions/runners/registration-token")
    creds = app.runner_credentials(ORG, "vm", LABELS, jit=False)
    assert creds.registration_token
    assert fake.calls[REG_TOKEN] == 3
    assert sleeps == [0.5, 1.5]


def test_5xx_gives_up_after_three_tries(app: GithubApp, fake: FakeGitHub):
    fake.fail_next(3, status=500, path_prefix="/orgs/acme/actions/runners")
    with pytest.raises(TemporaryError, match="500 after 3 tries") as err:
        app.list_runners(ORG)
    assert not isinstance(err.value, RateLimited)


def test_connection_errors_are_temporary(make_app):
    app = make_app(base_url="http://127.0.0.1:9", installation_id=1)
    with pytest.raises(TemporaryError, match="ConnectionError after 3 tries") as err:
        app.list_runners(ORG)
    assert isinstance(err.value.__cause__, requests.ConnectionError)


def test_rate_limit_raises_with_githubs_delay(app: GithubApp, fake: FakeGitHub):
    app.list_runners(ORG)
    assert app.rate_limit()["remaining"] > 0
    fake.rate_limit_next(1, retry_after=7)
    with pytest.raises(RateLimited) as err:
        app.list_runners(ORG)
    assert err.value.delay == 7
    assert app.rate_limit()["remaining"] == 0
    app.list_runners(ORG)  # the next call goes through


def test_jwt_signed_with_another_key_is_refused(make_app, fake: FakeGitHub):
    other_private, _ = generate_app_key()
    app = make_app(private_key=other_private.decode())
    with pytest.raises(PermanentError, match=f"JWT of App {APP_ID}.*github_app.app_id"):
        app.runner_credentials(RunnerScope(org="acme", installation_id=7), "vm", LABELS, False)
    assert fake.calls[ACCESS_TOKEN] == 1  # no retry of a 401


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": -60, "exp": 900, "iss": APP_ID},  # longer than GitHub's 10 minutes
        {"iat": -60, "exp": 540, "iss": "999"},  # another App
        {"iat": -700, "exp": -100, "iss": APP_ID},  # expired
    ],
)
def test_fake_checks_jwt_claims(keys, fake: FakeGitHub, claims: dict[str, Any]):
    now = int(time.time())
    token = jwt.encode(
        {**claims, "iat": now + claims["iat"], "exp": now + claims["exp"]},
        keys[0],
        algorithm="RS256",
    )
    resp = requests.post(
        f"{fake.url}/app/installations/1/access_tokens",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert resp.status_code == 401


def test_expired_installation_token_is_refused_then_replaced(
    app: GithubApp, fake: FakeGitHub, clock: OffsetClock
):
    fake.token_ttl = 400  # short enough that moving the fake's clock expires it
    app.list_runners(ORG)
    [old] = [t["token"] for t in fake.tokens() if t["kind"] == "installation"]
    clock.offset = 450  # the fake is past expiry; the adapter's clock still trusts its cache
    resp = requests.get(
        f"{fake.url}/orgs/acme/actions/runners",
        headers={"Authorization": f"Bearer {old}"},
        timeout=5,
    )
    assert resp.status_code == 401
    assert app.list_runners(ORG) == []
    assert fake.calls[ACCESS_TOKEN] == 2


def test_expired_registration_token_is_refused(
    app: GithubApp, fake: FakeGitHub, clock: OffsetClock, runner
):
    creds = app.runner_credentials(ORG, "vm", LABELS, jit=False)
    clock.offset = 3700
    with pytest.raises(PermanentError, match="expired"):
        runner.register(creds.runner_url, "vm", LABELS, token=creds.registration_token)


def test_no_secret_in_logs_errors_or_reprs(
    make_app, fake: FakeGitHub, keys, runner, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    app = make_app()
    texts: list[str] = [repr(app)]
    creds = app.runner_credentials(ORG, "vm-a", LABELS, jit=False)
    jit = app.runner_credentials(ORG, "vm-b", LABELS, jit=True)
    texts += [repr(creds), repr(jit)]
    runner_id = runner.register(creds.runner_url, "vm-a", LABELS, token=creds.registration_token)
    fake.add_job("acme/app", LABELS)
    runner.next_job(runner_id, wait=0)
    failures: list[Callable[[], object]] = [
        lambda: app.delete_runner(ORG, runner_id),  # busy
        lambda: (fake.rate_limit_next(1), app.list_runners(ORG)),  # rate limited
        lambda: app.runner_credentials(ORG, "vm-b", LABELS, jit=True),  # 409
        lambda: make_app(private_key=generate_app_key()[0].decode()).runner_credentials(
            RunnerScope(org="acme", installation_id=99), "vm", LABELS, jit=False
        ),  # bad JWT
    ]
    for fail in failures:
        with pytest.raises((PermanentError, TemporaryError)) as err:
            fail()
        texts += [str(err.value), repr(err.value)]
    secrets = [t["token"] for t in fake.tokens()] + [jit.jit_config, JWT_HEADER]
    secrets += [line for line in keys[0].decode().splitlines() if "-----" not in line]
    record_texts = [caplog.text] + [r.getMessage() for r in caplog.records]
    for secret in secrets:
        for text in texts + record_texts:
            assert secret not in text


# -- the simulation routes -----------------------------------------------------------------


def test_dispatcher_hands_a_job_to_any_matching_runner(
    app: GithubApp, fake: FakeGitHub, runner, events: list[dict[str, Any]]
):
    first = _register(app, runner, "vm-1")
    second = _register(app, runner, "vm-2")
    windows = _register(app, runner, "vm-win", labels=["self-hosted", "windows"])
    job = fake.add_job("acme/app", ["self-hosted", "Linux"])  # labels match case-insensitively
    assert job["job_id"].isdigit() and job["run_id"].isdigit()

    assert runner.next_job(windows, wait=0) is None  # its labels do not cover the job's
    got = runner.next_job(second, wait=0)  # whichever matching runner polls first gets it
    assert got == {
        "job_id": job["job_id"],
        "run_id": job["run_id"],
        "repository": "acme/app",
        "duration": 1.0,
        "conclusion": "success",
    }
    assert runner.next_job(first, wait=0) is None
    assert fake.job(job["job_id"])["state"] == "in_progress"
    assert fake.job(job["job_id"])["runner_name"] == "vm-2"

    runner.complete(second, job["job_id"], "success")
    done = fake.job(job["job_id"])
    assert (done["state"], done["conclusion"]) == ("completed", "success")
    assert second not in {r["id"] for r in fake.runners()}  # ephemeral: removed

    mine = [e for e in events if e["workflow_job"]["id"] == int(job["job_id"])]
    assert [e["action"] for e in mine] == ["queued", "in_progress", "completed"]
    queued, started, completed = mine
    assert queued["workflow_job"]["runner_name"] is None
    assert queued["workflow_job"]["labels"] == ["self-hosted", "Linux"]
    assert started["workflow_job"]["runner_name"] == "vm-2"
    assert started["workflow_job"]["runner_id"] == second
    assert started["workflow_job"]["status"] == "in_progress"
    assert completed["workflow_job"]["conclusion"] == "success"
    assert completed["workflow_job"]["run_id"] == int(job["run_id"])
    assert completed["repository"]["full_name"] == "acme/app"
    assert completed["organization"]["login"] == "acme"
    assert isinstance(completed["installation"]["id"], int)


def test_oldest_job_first_and_long_poll_wakes_up(app: GithubApp, fake: FakeGitHub, runner):
    runner_id = _register(app, runner, "vm-1")
    got: list[dict[str, Any] | None] = []
    poller = threading.Thread(target=lambda: got.append(runner.next_job(runner_id, wait=20)))
    poller.start()
    older = fake.add_job("acme/app", LABELS)
    poller.join(timeout=25)
    assert got and got[0] is not None and got[0]["job_id"] == older["job_id"]

    runner.complete(runner_id, older["job_id"], "failure")
    a = fake.add_job("acme/app", LABELS, duration=2.5, conclusion="failure")
    fake.add_job("acme/app", LABELS)
    again = _register(app, runner, "vm-1")
    taken = runner.next_job(again, wait=0)
    assert taken is not None
    assert (taken["job_id"], taken["duration"], taken["conclusion"]) == (
        a["job_id"],
        2.5,
        "failure",
    )


def test_job_routes_over_http(fake: FakeGitHub, events: list[dict[str, Any]]):
    body = {"org": "acme", "repo": "acme/app", "labels": LABELS, "duration": 0.5}
    created = requests.post(f"{fake.url}/_sim/jobs", json=body, timeout=5)
    assert created.status_code == 201
    job_id = created.json()["job_id"]
    assert requests.get(f"{fake.url}/_sim/jobs/{job_id}", timeout=5).json()["state"] == "queued"
    cancelled = requests.post(f"{fake.url}/_sim/jobs/{job_id}/cancel", timeout=5)
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert requests.post(f"{fake.url}/_sim/jobs/{job_id}/cancel", timeout=5).status_code == 409
    listed = requests.get(f"{fake.url}/_sim/jobs", timeout=5).json()["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]
    assert [(e["action"], e["workflow_job"]["conclusion"]) for e in events] == [
        ("queued", None),
        ("completed", "cancelled"),
    ]
    bad = requests.post(f"{fake.url}/_sim/jobs", json={"repo": "noslash"}, timeout=5)
    assert bad.status_code == 422


def test_removed_runner_is_gone(app: GithubApp, fake: FakeGitHub, runner):
    runner_id = _register(app, runner, "vm-1")
    fake.add_job("acme/app", LABELS)
    job = runner.next_job(runner_id, wait=0)
    runner.remove(runner_id)
    runner.remove(runner_id)  # idempotent
    assert fake.job(job["job_id"])["conclusion"] == "failure"  # lost mid-job
    with pytest.raises(NotFound):
        runner.next_job(runner_id, wait=0)


def test_a_silent_busy_runner_is_lost_and_its_job_failed(
    app: GithubApp, fake: FakeGitHub, runner, events: list[dict[str, Any]]
):
    fake.lost_runner_timeout = 0.5
    renewing = _register(app, runner, "vm-renews")
    silent = _register(app, runner, "vm-dies")
    idle = _register(app, runner, "vm-idle")
    kept = fake.add_job("acme/app", LABELS)
    lost = fake.add_job("acme/app", LABELS)
    assert runner.next_job(renewing, wait=0)["job_id"] == kept["job_id"]
    assert runner.next_job(silent, wait=0)["job_id"] == lost["job_id"]
    deadline = time.monotonic() + 10
    while fake.job(lost["job_id"])["state"] != "completed":
        assert time.monotonic() < deadline, "the silent runner's job was never failed"
        runner.renew(renewing, kept["job_id"])  # the live runner keeps renewing
        time.sleep(0.1)
    assert fake.job(lost["job_id"])["conclusion"] == "failure"
    assert fake.job(kept["job_id"])["state"] == "in_progress"
    assert fake.lost_runners == 1
    left = {r["id"]: r["status"] for r in fake.runners()}
    assert silent not in left  # dropped, as GitHub drops a lost ephemeral runner
    assert left[renewing] == "online"
    assert left[idle] == "offline"  # never polled again: its machine is gone
    with pytest.raises(NotFound):
        runner.renew(silent, lost["job_id"])  # the job was taken away
    completed = [e for e in events if e["action"] == "completed"]
    assert [e["workflow_job"]["id"] for e in completed] == [int(lost["job_id"])]
    runner.complete(renewing, kept["job_id"], "success")
    assert fake.job(kept["job_id"])["conclusion"] == "success"


def test_replace_registers_a_new_runner_under_the_same_name(app: GithubApp, fake, runner):
    old = _register(app, runner, "vm-1")
    new = _register(app, runner, "vm-1")
    assert new != old
    assert [r.id for r in app.list_runners(ORG)] == [new]


def test_on_event_failure_is_contained(fake: FakeGitHub, caplog: pytest.LogCaptureFixture):
    def boom(event: dict[str, Any]) -> None:
        raise RuntimeError("subscriber broke")

    fake.on_event = boom
    job = fake.add_job("acme/app", LABELS)
    assert fake.job(job["job_id"])["state"] == "queued"
    assert "on_event failed" in caplog.text


# -- GitHub's queue, read back ------------------------------------------------------------------


def test_queued_jobs_are_read_back_from_the_rest_api(app: GithubApp, fake: FakeGitHub, runner):
    waiting = [fake.add_job(f"acme/app-{i % 3}", LABELS)["job_id"] for i in range(7)]
    elsewhere = fake.add_job("other-org/app", LABELS)["job_id"]  # not the scope's org
    started = fake.add_job("acme/app-0", LABELS)["job_id"]
    runner_id = _register(app, runner, "vm-1")
    # The oldest queued job goes to the runner: it is in progress, not queued.
    taken = runner.next_job(runner_id, wait=0)
    assert taken is not None
    waiting.remove(taken["job_id"])
    waiting.append(started)
    fake.cancel_job(waiting.pop(0))  # a cancelled one is not queued either

    found = app.queued_jobs(ORG)

    assert sorted(j.job_id for j in found) == sorted(waiting)
    assert elsewhere not in {j.job_id for j in found}
    one = next(j for j in found if j.job_id == started)
    assert (one.repo, one.labels) == ("acme/app-0", tuple(LABELS))
    assert one.run_id == fake.job(started)["run_id"]
    assert fake.calls["GET /installation/repositories"] == 1


def test_queued_jobs_follow_pages(app: GithubApp, fake: FakeGitHub):
    ids = {fake.add_job("acme/busy", LABELS)["job_id"] for _ in range(130)}
    assert {j.job_id for j in app.queued_jobs(ORG)} == ids
