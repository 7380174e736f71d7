"""celery-redbeat, made to survive Redis restarts.

Plain redbeat lets a Redis ConnectionError escape `tick()`, and Celery's beat service
then exits: a Redis restart kills the pool's only beat. Here a lost connection skips the
tick, and a lost lock (expired during the outage, or gone with a Redis that kept no
data) is taken again before anything is scheduled, so a standby that won it meanwhile
keeps the schedule and this beat becomes the standby.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redbeat import RedBeatScheduler
from redis.exceptions import LockError

logger = logging.getLogger(__name__)

RETRY_S = 1.0


class MigctlScheduler(RedBeatScheduler):  # type: ignore[misc]
    def setup_schedule(self) -> None:
        # A beat that starts while Redis is down waits for it instead of exiting.
        while True:
            try:
                super().setup_schedule()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("beat: Redis unavailable at start (%s); retrying", exc)
                time.sleep(RETRY_S)

    _epoch: Any = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            self._notice_wipe()
            return float(super().tick(*args, **kwargs))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("beat: Redis unavailable (%s); retrying in %.0fs", exc, RETRY_S)
            return RETRY_S
        except LockError:
            logger.warning("beat: lost the schedule lock; waiting to take it again")
            self._reacquire()
            return RETRY_S

    def _notice_wipe(self) -> None:
        """Redis lost its data (FLUSHALL, an empty restart): the schedule went with it.
        Put it back and start the recovery (VMs from the provider, jobs from GitHub)."""
        if self._epoch is None:
            from migctl.adapters.redis_store import StateEpoch
            from migctl.runtime import runtime

            self._epoch = StateEpoch(runtime().store)
        try:
            wiped = self._epoch.check()
        except Exception as exc:  # Redis down: the tick's own call reports it
            logger.debug("beat: state epoch check failed: %s", exc)
            return
        if not wiped:
            return
        logger.error(
            "beat: the controller's Redis lost its data (state epoch gone); restoring the "
            "schedule and recovering VMs from the provider and queued jobs from GitHub"
        )
        super().setup_schedule()
        self.app.send_task("migctl.recover")

    def _reacquire(self) -> None:
        if self.lock is None:
            return
        try:
            self.lock.acquire()  # blocks while another beat holds it: we are the standby
            logger.info("beat: took the schedule lock again")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("beat: Redis unavailable while taking the lock back (%s)", exc)
