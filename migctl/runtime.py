"""The composition root: settings in, wired services out. One per process, built lazily
(after a fork, so a prefork child never shares its parent's sockets)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis

from migctl.adapters.redis_store import RedisStore
from migctl.ports import Dispatcher, TokenIssuer, VmProvider
from migctl.settings import Settings, load_settings

log = logging.getLogger(__name__)


def redis_client(settings: Settings, **overrides: Any) -> redis.Redis:
    """A client of the pool's Redis (the jobs store) with our timeouts; `overrides` for
    a process that must fail faster (the webhook answers GitHub within 10 s)."""
    ep = settings.redis.jobs
    options: dict[str, Any] = {
        "host": ep.host,
        "port": ep.port,
        "db": ep.db,
        "password": ep.password or None,
        "ssl": ep.tls,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    options.update(overrides)
    return redis.Redis(**options)


def make_provider(settings: Settings, client: redis.Redis) -> VmProvider:
    if settings.vm_manager.provider == "sim":
        from migctl.sim.mig import SimMig, SimTimings

        s = settings.sim
        timings = SimTimings(
            create_s=s.create_s,
            start_s=s.start_s,
            resume_s=s.resume_s,
            stop_s=s.stop_s,
            suspend_s=s.stop_s,
            delete_s=s.stop_s,
        )
        if s.redis_url:
            client = redis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5)
        return SimMig(client, settings.pool.id, timings)
    from migctl.adapters.gce import GceMig

    # The API-call token bucket lives in Redis, so N workers share one budget.
    return GceMig(settings.gcp, redis=client)


def make_tokens(settings: Settings, client: redis.Redis) -> TokenIssuer:
    from migctl.adapters.github import GithubApp

    return GithubApp(settings.github_app, client, settings.pool.id)


@dataclass
class Runtime:
    settings: Settings
    dispatch: Dispatcher

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.settings)

    @cached_property
    def store(self) -> RedisStore:
        return RedisStore(self.redis, self.settings.pool.id)

    @cached_property
    def provider(self) -> VmProvider:
        return make_provider(self.settings, self.redis)

    @cached_property
    def tokens(self) -> TokenIssuer:
        return make_tokens(self.settings, self.redis)

    @cached_property
    def assigner(self) -> Any:
        from migctl.services.assignment import Assigner

        return Assigner(self.store, self.tokens, self.settings, self.dispatch)

    @cached_property
    def events(self) -> Any:
        from migctl.services.events import AgentEvents

        return AgentEvents(self.store, self.settings, self.dispatch)

    @cached_property
    def pool(self) -> Any:
        from migctl.services.pool import Pool

        return Pool(self.store, self.provider, self.settings, self.dispatch)

    @cached_property
    def hygiene(self) -> Any:
        from migctl.services.hygiene import Hygiene

        return Hygiene(
            self.store, self.tokens, self.settings, grace=self.settings.github_app.runner_grace
        )

    @cached_property
    def recovery(self) -> Any:
        from migctl.services.recovery import Recovery

        return Recovery(self.store, self.pool, self.tokens, self.intake, self.settings)

    @cached_property
    def intake(self) -> Any:
        from migctl.services.intake import RedisIntake

        return RedisIntake(self.store, self.settings, self.dispatch, self.events)


_lock = threading.Lock()
_settings: Settings | None = None
_runtime: tuple[int, Runtime] | None = None


def settings() -> Settings:
    """This process's settings, loaded once (MIGCTL_CONFIG + env)."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = load_settings()
        return _settings


def use_settings(value: Settings) -> None:
    """Set the process's settings explicitly (entry points with --config, tests)."""
    global _settings, _runtime
    with _lock:
        _settings = value
        _runtime = None


def runtime() -> Runtime:
    """The process's wired services; rebuilt in a forked child."""
    global _runtime
    pid = os.getpid()
    if _runtime is None or _runtime[0] != pid:
        from migctl.worker.dispatch import CeleryDispatcher

        s = settings()
        with _lock:
            if _runtime is None or _runtime[0] != pid:
                _runtime = (pid, Runtime(s, CeleryDispatcher(s)))
    return _runtime[1]
