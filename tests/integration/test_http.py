"""The operator HTTP server on a real Redis with a known pool state: the seed's endpoints,
the admin API (reads, drain, cancel) and its refusals, and /metrics parsed with
prometheus-client's own parser."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState, Lifecycle
from migctl.domain.transitions import Change
from migctl.http.server import OpsServer, serve
from migctl.http.testing import ADMIN_TOKEN, POOL, SECRET_IN_OUTBOX, seed_world, settings_for
from migctl.metrics import METRIC_NAMES
from migctl.sim.stack import free_port
from migctl.worker.dispatch import RecordingDispatcher

pytestmark = pytest.mark.integration

WAIT = 10
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


Recorder = RecordingDispatcher


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, POOL)
    seed_world(store, time.time())
    yield store
    client.close()


def start(store: RedisStore, redis_url: str, **kwargs: Any) -> OpsServer:
    kwargs.setdefault("settings", settings_for(redis_url))
    kwargs.setdefault("dispatch", Recorder())
    return serve(store, "127.0.0.1", 0, kwargs.pop("gateway_check", None), **kwargs)


@pytest.fixture
def server(store: RedisStore, redis_url: str) -> Iterator[OpsServer]:
    srv = start(store, redis_url)
    yield srv
    srv.shutdown()
    srv.server_close()


def url(server: OpsServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def get(server: OpsServer, path: str) -> requests.Response:
    return requests.get(url(server, path), timeout=WAIT)


def post(server: OpsServer, path: str, **kwargs: Any) -> requests.Response:
    return requests.post(url(server, path), timeout=WAIT, **kwargs)


# -- the seed's endpoints --------------------------------------------------------------------


def test_health_ready_and_stats(server: OpsServer) -> None:
    assert get(server, "/health").json() == {"status": "ok"}
    ready = get(server, "/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "failing": [],
        "checks": {"redis": "ok", "worker": "ok"},
    }
    stats = get(server, "/stats").json()
    assert {
        k: stats[k]
        for k in (
            "queue_length",
            "assigned_jobs",
            "failed_jobs",
            "started_vms",
            "created_vms",
            "connected_vms",
        )
    } == {
        "queue_length": 2,
        "assigned_jobs": 12,
        "failed_jobs": 1,
        "started_vms": 3,
        "created_vms": 5,
        "connected_vms": 4,
    }
    pool = stats["pool_stats"]
    assert pool["total_vms"] == 6
    assert {k: v for k, v in pool["vms_by_state"].items() if v} == {
        "READY": 2,
        "BUSY": 1,
        "STARTING": 1,
        "STOPPED": 1,
        "UNHEALTHY": 1,
    }
    assert pool["jobs_by_state"] == {"QUEUED": 2, "ASSIGNED": 1, "RUNNING": 1}
    assert pool["registrations_in_flight"] == 1
    assert pool["dead_letters"] == 2
    assert stats["bridge"]["received"] == "20"
    assert stats["gateways"] == {"gw-a": 3, "gw-b": 1}


def test_ready_names_a_stale_worker_and_a_gateway_not_serving(
    store: RedisStore, redis_url: str
) -> None:
    store.r.set(store.k.prefix + "canary", repr(time.time() - 600))
    srv = start(store, redis_url, gateway_check=lambda: "shutting down")
    try:
        answer = get(srv, "/ready")
        assert answer.status_code == 503
        body = answer.json()
        assert body["failing"] == ["worker", "gateway"]
        assert "canary last consumed 600s ago" in body["checks"]["worker"]
        assert body["checks"]["gateway"] == "shutting down"
        store.r.delete(store.k.prefix + "canary")
        assert "no worker has consumed" in get(srv, "/ready").json()["checks"]["worker"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_redis_down_gives_ready_503_naming_redis_and_metrics_say_so(redis_url: str) -> None:
    down = RedisStore(redis.Redis(host="127.0.0.1", port=free_port()), POOL)
    srv = start(down, redis_url)
    try:
        answer = get(srv, "/ready")
        assert answer.status_code == 503
        body = answer.json()
        assert body["failing"] == ["redis", "worker"]
        assert body["checks"]["redis"].startswith("unreachable")
        assert get(srv, "/health").status_code == 200
        stats = get(srv, "/stats")
        assert stats.status_code == 503 and "Redis unavailable" in stats.json()["error"]
        metrics = get(srv, "/metrics")
        assert metrics.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        assert families["controller_redis_up"].samples[0].value == 0
    finally:
        srv.shutdown()
        srv.server_close()


# -- admin API reads --------------------------------------------------------------------------


def test_pool_endpoints(server: OpsServer) -> None:
    assert get(server, f"/api/v1/pools/{POOL}/stats").json()["queue_length"] == 2
    vms = get(server, f"/api/v1/pools/{POOL}/vms").json()["vms"]
    assert {vm["id"]: vm["state"] for vm in vms} == {
        "runner-ready-a1": "READY",
        "runner-busy-b2": "BUSY",
        "runner-rsvd-c3": "READY",
        "runner-boot-d4": "STARTING",
        "runner-stop-e5": "STOPPED",
        "runner-sick-f6": "UNHEALTHY",
    }
    ready = get(server, f"/api/v1/pools/{POOL}/vms?state=ready").json()["vms"]
    assert sorted(vm["id"] for vm in ready) == ["runner-ready-a1", "runner-rsvd-c3"]
    jobs = get(server, f"/api/v1/pools/{POOL}/jobs").json()["jobs"]
    assert [(j["id"], j["state"]) for j in jobs] == [
        ("1001", "RUNNING"),
        ("1002", "ASSIGNED"),
        ("1003", "QUEUED"),
        ("1004", "QUEUED"),
        ("902", "CANCELLED"),
        ("901", "FAILED"),
        ("900", "COMPLETED"),
    ]
    assert jobs[0]["wait_s"] == pytest.approx(12.0)
    assert jobs[0]["assignment_s"] == pytest.approx(5.0)
    failed = get(server, f"/api/v1/pools/{POOL}/jobs?state=FAILED,CANCELLED&limit=1").json()
    assert [j["id"] for j in failed["jobs"]] == ["902"]
    dead = get(server, f"/api/v1/pools/{POOL}/deadletters").json()["dead_letters"]
    assert [d["message_id"] for d in dead] == ["msg-2", "msg-1"]
    assert all("data_b64" not in d for d in dead)


def test_another_pool_in_the_same_redis_is_readable(server: OpsServer, redis_url: str) -> None:
    other = RedisStore(redis.Redis.from_url(redis_url), "pool-other")
    other.incr("assigned_jobs", 7)
    body = get(server, "/api/v1/pools/pool-other/stats").json()
    assert body["pool_id"] == "pool-other" and body["assigned_jobs"] == 7
    missing = get(server, "/api/v1/pools/pool-nowhere/vms")
    assert missing.status_code == 404
    assert "no pool pool-nowhere" in missing.json()["error"]


def test_vm_and_job_records(server: OpsServer) -> None:
    vm = get(server, "/api/v1/vms/runner-rsvd-c3")
    assert vm.status_code == 200
    assert SECRET_IN_OUTBOX not in vm.text
    body = vm.json()
    assert body["vm"]["reserved_job"] == "1002"
    assert body["reserved"]["id"] == "1002"
    assert body["pending_commands"] == [
        {
            "id": "cmd-register-1002",
            "type": "register_runner",
            "job_id": "1002",
            "created_at": body["pending_commands"][0]["created_at"],
            "expires_at": body["pending_commands"][0]["expires_at"],
        }
    ]
    job = get(server, "/api/v1/jobs/1001").json()
    assert job["job"]["state"] == "RUNNING"
    assert [hop["hop"] for hop in job["timeline"]] == [
        "received",
        "queued",
        "VM ready",
        "decided",
        "VM reserved",
        "register_runner sent",
        "runner registered",
        "started",
    ]
    assert job["timeline"][-1]["since_received_s"] == pytest.approx(12.0)
    assert job["decision"]["text"] == "assigned: runner-busy-b2"
    assert job["vm"]["id"] == "runner-busy-b2"
    assert "running for" in job["waiting_for"]
    queued = get(server, "/api/v1/jobs/1004").json()
    assert "no VM of this pool has labels self-hosted,gpu" in queued["waiting_for"]


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/api/v1/vms/runner-nope-z9", 404, "no VM runner-nope-z9 in pool pool-ops"),
        ("/api/v1/jobs/4242", 404, "no job 4242 in pool pool-ops"),
        ("/api/v1/jobs/..%2F..%2Fetc", 400, "malformed id"),
        ("/api/v1/pools/pool-ops/nothing", 404, "no such endpoint"),
        ("/api/v1/pools/pool-ops/jobs?state=DONE", 400, "unknown job state"),
        ("/api/v1/pools/pool-ops/jobs?limit=-1", 400, "limit must be a positive integer"),
        ("/static/../server.py", 404, "no such endpoint"),
        ("/nothing", 404, "no such endpoint /nothing"),
    ],
)
def test_unknown_and_malformed_requests(
    server: OpsServer, path: str, status: int, text: str
) -> None:
    answer = get(server, path)
    assert answer.status_code == status, answer.text
    assert text in answer.json()["error"]


def test_wrong_method(server: OpsServer) -> None:
    answer = post(server, "/stats", headers=AUTH)
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET"
    answer = get(server, "/api/v1/vms/runner-ready-a1/drain")
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"


# -- admin API writes -------------------------------------------------------------------------


def test_writes_need_the_admin_token(server: OpsServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        answer = post(server, "/api/v1/vms/runner-ready-a1/drain", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    answer = post(server, "/api/v1/jobs/1003/cancel", headers={"Authorization": "Basic x"})
    assert answer.status_code == 401
    # Nothing moved.
    assert server.store.get_vm("runner-ready-a1")[0].lifecycle is Lifecycle.NONE  # type: ignore[index]
    assert server.store.get_job("1003")[0].state is JobState.QUEUED  # type: ignore[index]


def test_writes_are_refused_when_no_admin_token_is_configured(
    store: RedisStore, redis_url: str
) -> None:
    srv = start(store, redis_url, settings=settings_for(redis_url, admin_token=""))
    try:
        answer = post(srv, "/api/v1/jobs/1003/cancel", headers=AUTH)
        assert answer.status_code == 403
        assert "server.admin_token" in answer.json()["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_bodies(server: OpsServer) -> None:
    for data in (b"{not json", b"[1, 2]"):
        answer = post(server, "/api/v1/jobs/1003/cancel", headers=AUTH, data=data)
        assert answer.status_code == 400, data
    answer = post(server, "/api/v1/jobs/1003/cancel", headers=AUTH, data=b"x" * (65 * 1024))
    assert answer.status_code == 413
    assert server.store.get_job("1003")[0].state is JobState.QUEUED  # type: ignore[index]


def test_drain_a_free_vm_like_the_idle_pass(server: OpsServer) -> None:
    answer = post(server, "/api/v1/vms/runner-ready-a1/drain", headers=AUTH, json={"reason": "x"})
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["state"] == "DRAINING" and not body["already_draining"]
    vm, _ = server.store.get_vm("runner-ready-a1")  # type: ignore[misc]
    assert vm.lifecycle is Lifecycle.DRAINING and vm.cmd_id == body["command_id"]
    [command] = server.store.pending_commands("runner-ready-a1")
    assert command["type"] == "drain" and command["id"] == body["command_id"]
    assert get(server, "/api/v1/vms/runner-ready-a1").json()["vm"]["state"] == "DRAINING"
    again = post(server, "/api/v1/vms/runner-ready-a1/drain", headers=AUTH)
    assert again.status_code == 200 and again.json()["already_draining"]
    assert len(server.store.pending_commands("runner-ready-a1")) == 1


def test_drain_refuses_a_busy_or_unknown_vm(server: OpsServer) -> None:
    busy = post(server, "/api/v1/vms/runner-busy-b2/drain", headers=AUTH)
    assert busy.status_code == 409
    assert "BUSY (running job 1001)" in busy.json()["error"]
    assert post(server, "/api/v1/vms/runner-nope-z9/drain", headers=AUTH).status_code == 404


def test_cancel_releases_the_reserved_vm(server: OpsServer) -> None:
    answer = post(server, "/api/v1/jobs/1002/cancel", headers=AUTH, json={"reason": "wrong repo"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["job"]["state"] == "CANCELLED"
    assert body["job"]["reason"] == "cancelled by an operator: wrong repo"
    assert body["freed_vms"] == ["runner-rsvd-c3"]
    vm, _ = server.store.get_vm("runner-rsvd-c3")  # type: ignore[misc]
    assert vm.reserved_job == ""
    assert server.store.counters()["cancelled_jobs"] == 2
    assert server.dispatch.calls == [("assign_vm", "runner-rsvd-c3")]  # type: ignore[union-attr]
    assert get(server, f"/api/v1/pools/{POOL}/stats").json()["queue_length"] == 2
    again = post(server, "/api/v1/jobs/1002/cancel", headers=AUTH)
    assert again.status_code == 409 and "already CANCELLED" in again.json()["error"]
    assert post(server, "/api/v1/jobs/4242/cancel", headers=AUTH).status_code == 404


def test_cancel_a_queued_job_takes_it_out_of_the_queue(server: OpsServer) -> None:
    assert post(server, "/api/v1/jobs/1003/cancel", headers=AUTH).status_code == 200
    assert server.store.queue_length() == 1
    assert get(server, "/api/v1/jobs/1003").json()["waiting_for"].startswith("nothing")


# -- /metrics ---------------------------------------------------------------------------------


def scrape(server: OpsServer) -> dict[str, Any]:
    answer = get(server, "/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(answer.text)}


def value(family: Any, sample: str = "", **labels: str) -> float:
    for s in family.samples:
        if (not sample or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return float(s.value)
    raise AssertionError(f"no {sample or family.name} with {labels}")


def test_metrics_have_the_seed_names_and_the_controller_families(server: OpsServer) -> None:
    families = scrape(server)
    for name in ("queue_length", "assigned_jobs", "failed_jobs", "started_vms", "created_vms"):
        assert families[name].samples[0].name == name  # exactly as the seed writes them
    assert value(families["queue_length"], pool=POOL) == 2
    assert value(families["connected_vms"], pool=POOL) == 4
    assert value(families["assigned_jobs"], pool=POOL) == 12
    assert value(families["created_vms"], pool=POOL) == 5
    assert value(families["controller_vms"], state="BUSY") == 1
    assert value(families["controller_vms"], state="READY") == 2
    assert value(families["controller_jobs"], state="QUEUED") == 2
    assert value(families["controller_jobs_finished"], state="COMPLETED") == 9
    assert value(families["controller_provider_errors"], kind="CapacityExhausted") == 2
    assert value(families["controller_dead_letters"]) == 2
    assert value(families["controller_registrations_in_flight"]) == 1
    assert value(families["controller_vm_oldest_starting_seconds"]) >= 40
    assert value(families["controller_gateway_sessions"], gateway="gw-a") == 3
    assert value(families["controller_bridge_messages"], outcome="received") == 20
    wait = families["controller_job_wait_seconds"]
    assert wait.type == "histogram"
    assert value(wait, "controller_job_wait_seconds_count") == 1  # job 900: 10 s
    assert value(wait, "controller_job_wait_seconds_bucket", le="5.0") == 0
    assert value(wait, "controller_job_wait_seconds_bucket", le="10.0") == 1
    assert value(wait, "controller_job_wait_seconds_sum") == pytest.approx(10.0)
    assigned = families["controller_assignment_duration_seconds"]
    assert value(assigned, "controller_assignment_duration_seconds_bucket", le="2.0") == 1
    every_label = {s.labels.get("pool") for f in families.values() for s in f.samples}
    assert every_label == {POOL}
    assert "controller_github_rate_limit_remaining" not in families
    assert set(families) <= set(METRIC_NAMES)


def test_histograms_count_each_job_once_across_replicas(
    server: OpsServer, store: RedisStore, redis_url: str
) -> None:
    replica = start(store, redis_url)
    try:
        for _ in range(3):
            for srv in (server, replica):
                wait = scrape(srv)["controller_job_wait_seconds"]
                assert value(wait, "controller_job_wait_seconds_count") == 1
        now = time.time()
        job, rev = store.get_job("1001")  # type: ignore[misc]
        store.save(
            Change(jobs={job.id: job.with_(state=JobState.COMPLETED, finished_at=now)}),
            {"job:1001": rev},
        )
        counts = []
        for srv in (replica, server, replica):
            wait = scrape(srv)["controller_job_wait_seconds"]
            counts.append(value(wait, "controller_job_wait_seconds_count"))
            assert value(wait, "controller_job_wait_seconds_sum") == pytest.approx(22.0)
        assert counts == [2, 2, 2]
    finally:
        replica.shutdown()
        replica.server_close()


def test_github_rate_limit_when_published(server: OpsServer, store: RedisStore) -> None:
    store.r.hset(
        store.k.prefix + "gh:rate_limit",
        mapping={"remaining": 4321, "limit": 5000, "reset": 1_800_000_000, "resource": "core"},
    )
    families = scrape(server)
    assert value(families["controller_github_rate_limit_remaining"], resource="core") == 4321
    assert value(families["controller_github_rate_limit_limit"]) == 5000


# -- the page's files -------------------------------------------------------------------------


def test_status_page_files_are_served_with_a_strict_policy(server: OpsServer) -> None:
    page = get(server, "/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert '<script src="/static/status.js"' in page.text
    script = get(server, "/static/status.js")
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "innerHTML" not in script.text
    assert get(server, "/static/status.css").status_code == 200


def test_answers_are_json_with_no_secret(server: OpsServer) -> None:
    for path in (
        "/stats",
        f"/api/v1/pools/{POOL}/vms",
        f"/api/v1/pools/{POOL}/jobs",
        f"/api/v1/pools/{POOL}/deadletters",
        "/api/v1/vms/runner-rsvd-c3",
        "/api/v1/jobs/1002",
    ):
        text = get(server, path).text
        assert SECRET_IN_OUTBOX not in text and ADMIN_TOKEN not in text, path
        json.loads(text)
