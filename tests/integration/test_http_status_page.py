"""The status page in headless Chromium (Debian's `chromium`): after its script ran, the
DOM shows the known pool state, and a screenshot is taken.

`MIGCTL_STATUS_SCREENSHOT=docs/status-page.png` also writes the screenshot there (how the
README's picture is made).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.http.server import OpsServer, serve
from migctl.http.testing import POOL, seed_world, settings_for
from migctl.sim.stack import free_port
from tests.helpers import require

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
# Virtual time runs the page's fetches and first render; the refresh timer fires later.
BUDGET_MS = 4000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    require(False, "chromium (Debian package `chromium`)")
    raise AssertionError("unreachable")


def run(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={BUDGET_MS}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture
def page(redis_url: str) -> Iterator[OpsServer]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, POOL)
    seed_world(store, time.time())
    server = serve(store, "127.0.0.1", 0, settings=settings_for(redis_url))
    yield server
    server.shutdown()
    server.server_close()
    client.close()


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.DOTALL)
    assert m, f"no #{element_id} in the page"
    return m.group(1).strip()


def rows(dom: str, table_id: str) -> list[list[str]]:
    m = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.DOTALL)
    assert m, f"no table #{table_id}"
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.DOTALL):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
        out.append([re.sub(r"<[^>]+>", "", c).strip() for c in cells])
    return out


def test_the_page_shows_the_known_state(page: OpsServer, tmp_path: Path) -> None:
    binary = chromium()
    url = f"http://127.0.0.1:{page.port}/"
    dom = run(binary, tmp_path / "profile-dom", "--dump-dom", url).stdout

    assert 'data-state="loaded"' in dom, dom[:2000]
    assert text_of(dom, "pool") == POOL
    assert text_of(dom, "ready") == "ready"
    tiles = {
        name: text_of(dom, name)
        for name in (
            "queue_length",
            "connected_vms",
            "running",
            "assigned_jobs",
            "failed_jobs",
            "started_vms",
            "created_vms",
            "dead_letters",
        )
    }
    assert tiles == {
        "queue_length": "2",
        "connected_vms": "4",
        "running": "1",
        "assigned_jobs": "12",
        "failed_jobs": "1",
        "started_vms": "3",
        "created_vms": "5",
        "dead_letters": "2",
    }
    chips = dict(re.findall(r'data-state="([A-Z]+)">.*?<b>(\d+)</b>', dom))
    assert chips == {"READY": "2", "BUSY": "1", "STARTING": "1", "STOPPED": "1", "UNHEALTHY": "1"}
    assert {row[0]: row[1] for row in rows(dom, "vms")} == {
        "runner-boot-d4": "STARTING",
        "runner-busy-b2": "BUSY",
        "runner-ready-a1": "READY",
        "runner-rsvd-c3": "READY",
        "runner-sick-f6": "UNHEALTHY",
        "runner-stop-e5": "STOPPED",
    }
    active = rows(dom, "active-jobs")
    assert [(r[0], r[1]) for r in active] == [
        ("1001", "RUNNING"),
        ("1002", "ASSIGNED"),
        ("1003", "QUEUED"),
        ("1004", "QUEUED"),
    ]
    assert active[0][4] == "12.0 s"  # started_at - received_at
    assert active[2][4].endswith("so far")
    recent = rows(dom, "recent-jobs")
    assert [(r[0], r[1], r[4]) for r in recent] == [
        ("902", "CANCELLED", "–"),
        ("901", "FAILED", "–"),
        ("900", "COMPLETED", "10.0 s"),
    ]
    failures = rows(dom, "failures")
    assert [(r[1], r[2]) for r in failures] == [
        ("dead letter", "msg-2"),
        ("dead letter", "msg-1"),
        ("failed job", "901"),
    ]
    assert "data_b64" not in dom

    shot = tmp_path / "status-page.png"
    run(binary, tmp_path / "profile-shot", "--window-size=1280,1040", f"--screenshot={shot}", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1040)
    assert len(data) > 20_000  # a rendered page, not a blank one
    if target := os.environ.get("MIGCTL_STATUS_SCREENSHOT"):
        shutil.copyfile(shot, target)


def test_the_page_names_what_is_not_ready(page: OpsServer, tmp_path: Path) -> None:
    binary = chromium()
    page.store.r.delete(page.store.k.prefix + "canary")
    dom = run(binary, tmp_path / "profile", "--dump-dom", f"http://127.0.0.1:{page.port}/").stdout
    assert text_of(dom, "ready").startswith("not ready — worker: no worker has consumed")


def test_the_page_shows_an_error_when_redis_is_down(redis_url: str, tmp_path: Path) -> None:
    binary = chromium()
    down = RedisStore(redis.Redis(host="127.0.0.1", port=free_port()), POOL)
    server = serve(down, "127.0.0.1", 0, settings=settings_for(redis_url))
    try:
        dom = run(binary, tmp_path / "p", "--dump-dom", f"http://127.0.0.1:{server.port}/").stdout
    finally:
        server.shutdown()
        server.server_close()
    assert 'data-state="error"' in dom
    assert "Could not refresh: /stats: 503 Redis unavailable" in text_of(dom, "error")
