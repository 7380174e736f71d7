"""Shared fixtures: a redis-server of the suite's own, and the CI rule that a tier whose
service is missing fails under CI=true instead of skipping."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from migctl.sim.stack import RedisServer
from tests.helpers import require


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="migctl-test-redis-"))
    server = RedisServer(workdir).start()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the suite's own redis-server, emptied before each test."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    yield client
    client.close()
