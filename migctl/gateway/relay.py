"""The gateway's blocking dependencies, run off the event loop.

Celery's `send_task` and the domain services (`AgentEvents`: connect, disconnect, agent
state, on redis-py) block, so the gateway awaits them through `Relay.run`, a thread
pool: the event loop that holds thousands of streams never waits on a socket of its
own. The gateway's own Redis operations are async instead (outbox.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from migctl.adapters.redis_store import RedisStore
from migctl.services.events import AgentEvents
from migctl.settings import Settings

log = logging.getLogger(__name__)

# Enough for the round trips of a reconnect burst; more would only contend for the GIL
# with the event loop (see outbox.py). Each thread holds one Redis connection.
RELAY_THREADS = 16


class Relay:
    """The blocking dependencies, with the thread pool they run on."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        events: AgentEvents,
        send_task: Callable[..., None],
        threads: int = RELAY_THREADS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.send_task = send_task
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="relay")

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
