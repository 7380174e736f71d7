"""Helpers shared by the benchmark scripts: the private world (redis-server, fake GitHub,
a generated controller config), processes (spawn, stop, RSS and CPU), statistics.

Every bench prints its figures with the floor it measured in the same run, and can
write them as JSON (`--json PATH`) for `bench/report.py`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PROBE_DIR = BENCH / "probe"
PYTHON = sys.executable
BIN = Path(sys.executable).parent
LABELS = ["self-hosted", "linux", "x64"]
ORG = "bench-org"
APP_ID = "424242"


# -- statistics ---------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks; nan when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- the private world ----------------------------------------------------------------------------


def controller_config(
    workdir: Path,
    redis_url: str,
    pool: str,
    *,
    github_url: str,
    key_path: Path,
    grpc_port: int,
    http_port: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A controller YAML of LocalStack._config's shape (sim provider, local job source)."""
    from urllib.parse import urlparse

    url = urlparse(redis_url)
    endpoint = {"host": url.hostname, "port": url.port, "db": int(url.path.strip("/") or 0)}
    cfg: dict[str, Any] = {
        "pool": {"id": pool, "labels": LABELS},
        "scheduler": {
            "poll_interval": "1s",
            "assignment_timeout": "300s",
            "max_concurrent_assignments": 50,
        },
        "vm_manager": {
            "provider": "sim",
            "poll_interval": "2s",
            "heartbeat_timeout": "120s",
            "min_ready_vms": 0,
            "max_vms": 50,
            "idle_timeout": "3600s",
            "max_scale_up_per_minute": 50,
        },
        "github_app": {
            "app_id": APP_ID,
            "private_key_path": str(key_path),
            "base_url": github_url,
            "web_url": "https://github.com",
            "org": ORG,
            "installation_id": 1,
        },
        "redis": {"jobs": endpoint, "vm_status": endpoint},
        "pubsub": {
            "project_id": "bench",
            "subscription": "jobs-bench-sub",
            "topic": "jobs",
            "source": "local",
        },
        "server": {"grpc_port": grpc_port, "http_port": http_port, "bind": "127.0.0.1"},
        "logging": {"level": "warning", "format": "console"},
    }
    for path, value in (extra or {}).items():
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = workdir / "controller.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def app_key(workdir: Path) -> tuple[Path, bytes]:
    from migctl.sim.keys import generate_app_key

    private_pem, public_pem = generate_app_key()
    key_path = workdir / "github-app-key.pem"
    key_path.write_bytes(private_pem)
    key_path.chmod(0o600)
    return key_path, public_pem


def product_env(config: Path, probe_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a product process: our config, no stray CONTROLLER_* vars, and
    (optionally) the Redis round-trip probe on PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONTROLLER_", "GITHUB_APP", "REDIS_", "PUBSUB_", "BENCH_PROBE"))
    }
    paths = [str(ROOT)]
    if probe_dir is not None:
        paths.insert(0, str(PROBE_DIR))
        env["BENCH_PROBE_DIR"] = str(probe_dir)
    env.update(
        MIGCTL_CONFIG=str(config),
        MIGCTL_VISIBILITY_TIMEOUT="300",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(paths),
        PATH=str(BIN) + os.pathsep + env.get("PATH", ""),
    )
    env.update(extra)
    return env


# -- processes ------------------------------------------------------------------------------------


def spawn(
    args: Sequence[str],
    env: dict[str, str] | None,
    log: Path | None,
    *,
    stdin: Any = None,
    stdout: Any = None,
) -> subprocess.Popen[Any]:
    out = stdout if stdout is not None else (open(log, "ab") if log else subprocess.DEVNULL)  # noqa: SIM115
    return subprocess.Popen(
        list(args),
        env=env,
        cwd=ROOT,
        stdin=stdin,
        stdout=out,
        stderr=open(log, "ab") if log else subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 20) -> None:
    """SIGTERM the process's group (it was started in its own session), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mib(pid: int) -> float:
    """RSS of a process and its children (a prefork worker counts its pool), MiB."""
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process and its live children."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_for(pred: Callable[[], Any], what: str, timeout: float, every: float = 0.05) -> float:
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(every)


def import_floor_rss(modules: Sequence[str]) -> float:
    """RSS (MiB) of a bare interpreter that imported `modules`: the floor a process of
    that stack cannot go below."""
    code = (
        "import sys, time\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('ok', flush=True)\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.2)
        return rss_mib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=float))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
