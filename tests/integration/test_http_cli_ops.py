"""`migctl status|vms|jobs|explain|deadletters|drain|cancel` on a real Redis with a known
pool state, and their answers when the stack is not there or the id is unknown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from migctl.adapters.redis_store import RedisStore
from migctl.cli import main
from migctl.domain.model import JobState, Lifecycle
from migctl.http.testing import POOL, config_for, seed_world
from migctl.sim.stack import free_port
from migctl.worker.queues import queue

pytestmark = pytest.mark.integration

MIGCTL = [sys.executable, "-m", "migctl.cli"]


@pytest.fixture
def world(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, POOL)
    seed_world(store, time.time())
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump(config_for(redis_url)))
    monkeypatch.delenv("MIGCTL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    yield store, config
    client.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_is_the_pool_at_a_glance(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = world
    code, out, err = cli(capsys, "status", "--config", str(config))
    assert code == 0, err
    assert out.startswith("pool pool-ops\n  queue 2   assigned 1   running 1   connected VMs 4")
    assert "VMs (6): STOPPED 1  STARTING 1  READY 2  BUSY 1  UNHEALTHY 1" in out
    assert "worker: canary ran" in out
    assert "runner-busy-b2   BUSY       job_running  1001" in out
    assert "901   FAILED" in out and "gave up after 3 retries" in out
    assert "msg-2  labels: field required" in out
    code, out, _ = cli(capsys, "status", "--config", str(config), "--json")
    data = json.loads(out)
    assert data["queue_length"] == 2 and len(data["vms"]) == 6
    assert [j["id"] for j in data["jobs"]][:4] == ["1001", "1002", "1003", "1004"]


def test_vms_and_jobs(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = world
    code, out, _ = cli(capsys, "vms", "--config", str(config), "--state", "ready,busy")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "runner-busy-b2",
        "runner-ready-a1",
        "runner-rsvd-c3",
    ]
    code, out, _ = cli(capsys, "jobs", "--config", str(config), "--state", "FAILED", "--json")
    assert code == 0
    [job] = json.loads(out)
    assert job["id"] == "901" and job["retries"] == 4
    code, out, _ = cli(capsys, "jobs", "--config", str(config), "--limit", "2")
    assert len(out.splitlines()) == 3
    code, _, err = cli(capsys, "jobs", "--config", str(config), "--state", "DONE")
    assert code == 2 and "unknown state in 'DONE'" in err


def test_explain_tells_the_jobs_story(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = world
    code, out, err = cli(capsys, "explain", "1001", "--config", str(config))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "job 1001  RUNNING  acme/web  labels self-hosted,linux"
    hops = [line.split("  ")[0] for line in lines[3:11]]
    assert hops == [
        "received",
        "queued",
        "VM ready",
        "decided",
        "VM reserved",
        "register_runner sent",
        "runner registered",
        "started",
    ]
    assert lines[10].split()[-2:] == ["+3.0s", "12.0s"]
    assert "last decision: assigned: runner-busy-b2" in out
    assert "VM:            runner-busy-b2 is BUSY (agent job_running, connected" in out
    assert "waiting for:   the job to finish on runner-busy-b2" in out

    code, out, _ = cli(capsys, "explain", "1002", "--config", str(config))
    assert "the agent on runner-rsvd-c3 to take register_runner" in out
    code, out, _ = cli(capsys, "explain", "1004", "--config", str(config))
    assert "VM:            none: no VM of this pool has labels self-hosted,gpu" in out
    code, out, _ = cli(capsys, "explain", "901", "--config", str(config))
    assert "reason:        registration on runner-x failed" in out
    assert "waiting for:   nothing: the job is FAILED" in out
    code, out, _ = cli(capsys, "explain", "1003", "--config", str(config), "--json")
    story = json.loads(out)
    assert story["decision"]["text"].startswith("deferred: no free VM")
    assert story["waiting_for"].startswith("position 1 of 2 in the queue")


def test_unknown_ids_say_what_to_do(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = world
    code, out, err = cli(capsys, "explain", "4242", "--config", str(config))
    assert code == 2 and out == ""
    assert err.startswith("migctl explain: no job 4242 in pool pool-ops")
    assert "`migctl jobs` lists" in err and "Traceback" not in err
    code, _, err = cli(capsys, "drain", "runner-nope-z9", "--config", str(config))
    assert code == 2 and "no VM runner-nope-z9 in pool pool-ops; `migctl vms` lists" in err


def test_deadletters(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = world
    code, out, _ = cli(capsys, "deadletters", "--config", str(config))
    assert code == 0
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["msg-2", "msg-1"]
    code, out, _ = cli(capsys, "dead-letters", "--config", str(config), "--json", "--limit", "1")
    [record] = json.loads(out)
    assert record["reason"] == "labels: field required" and "data_b64" not in record
    code, out, _ = cli(capsys, "deadletters", "--config", str(config), "--json", "--with-data")
    assert all(r["data_b64"] for r in json.loads(out))


def test_drain(world: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    store, config = world
    code, _, err = cli(capsys, "drain", "runner-busy-b2", "--config", str(config))
    assert code == 1 and "is BUSY (running job 1001)" in err
    code, out, _ = cli(capsys, "drain", "runner-ready-a1", "--config", str(config), "--json")
    assert code == 0 and json.loads(out)["state"] == "DRAINING"
    assert store.get_vm("runner-ready-a1")[0].lifecycle is Lifecycle.DRAINING
    code, out, _ = cli(capsys, "drain", "runner-ready-a1", "--config", str(config))
    assert code == 0 and out.strip() == "VM runner-ready-a1 was already draining"


def test_cancel_through_the_installed_entry_point(world: tuple) -> None:
    # A subprocess: cancelling dispatches a Celery task, which builds the process's app.
    store, config = world
    done = subprocess.run(
        [*MIGCTL, "cancel", "1002", "--reason", "wrong repo", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "job 1002 CANCELLED; VM runner-rsvd-c3 back in the pool"
    job, _ = store.get_job("1002")
    assert job.state is JobState.CANCELLED and job.reason == "cancelled by an operator: wrong repo"
    # The freed VM's assign_vm went to the pool's Celery queue on the broker (this Redis).
    messages = [json.loads(m) for m in store.r.lrange(queue(POOL, "assign"), 0, -1)]
    assert [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages] == [
        ("migctl.assign_vm", "['runner-rsvd-c3']")
    ]
    again = subprocess.run(
        [*MIGCTL, "cancel", "1002", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert again.stderr.strip() == "migctl cancel: job 1002 is already CANCELLED; nothing to cancel"


def test_config_from_the_local_world_and_from_the_environment(
    world: tuple, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config = world
    state = Path(".migctl")
    state.mkdir()
    (state / "stack.json").write_text(json.dumps({"config": str(config)}))
    code, out, _ = cli(capsys, "vms", "--json")
    assert code == 0 and len(json.loads(out)) == 6
    (state / "stack.json").unlink()
    monkeypatch.setenv("MIGCTL_CONFIG", str(config))
    code, out, _ = cli(capsys, "jobs", "--json", "--state", "QUEUED")
    assert code == 0 and [j["id"] for j in json.loads(out)] == ["1003", "1004"]


def test_no_config_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLLER_")}
    env.pop("MIGCTL_CONFIG", None)
    done = subprocess.run(
        [*MIGCTL, "status"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 2
    assert "pass --config PATH, set MIGCTL_CONFIG, or start the local world" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["vms"],
        ["jobs"],
        ["explain", "1001"],
        ["deadletters"],
        ["drain", "runner-ready-a1"],
        ["cancel", "1002"],
    ],
)
def test_redis_not_reachable(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    config = tmp_path / "down.yaml"
    config.write_text(yaml.safe_dump(config_for(f"redis://127.0.0.1:{port}/0")))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *argv, "--config", str(config))
    assert code == 2 and out == ""
    assert err.startswith(
        f"migctl {argv[0]}: cannot reach Redis at 127.0.0.1:{port} (pool pool-ops)"
    )
    assert "migctl up --keep-running" in err and "Traceback" not in err
