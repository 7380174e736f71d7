"""The simulated MIG of the local world: a `VmProvider` whose instances live in Redis.

Every worker process sees the same MIG. Progress is computed from timestamps on read
(no background process): each record holds the transitional status, when it began, the
status it settles into and when (`done_at`, fixed at mutation time so processes with
different `SimTimings` still agree on what `list()` shows).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from migctl.domain import errors
from migctl.domain.errors import (
    CapacityExhausted,
    MigctlError,
    NotFound,
    PermanentError,
    TemporaryError,
)
from migctl.domain.model import InfraStatus
from migctl.ports import ProviderVm


@dataclass(frozen=True)
class SimTimings:
    """Seconds each GCE action takes in the simulation (local demo defaults: short)."""

    create_s: float = 3.0
    start_s: float = 2.0
    resume_s: float = 1.0
    stop_s: float = 1.0
    suspend_s: float = 1.0
    delete_s: float = 1.0

    @classmethod
    def gce_like(cls) -> SimTimings:
        """Roughly what GCE takes for a runner image (the benchmarks use these)."""
        return cls(
            create_s=40.0, start_s=20.0, resume_s=8.0, stop_s=10.0, suspend_s=10.0, delete_s=15.0
        )


# One script for every mutation so a batch is validated and applied atomically, and the
# fault knobs (stored beside the MIG, so every process sees them) are consumed in the same step.
_MUTATE = """
local action = ARGV[1]
local now = tonumber(ARGV[2])
local duration = tonumber(ARGV[3])

local fail_n = tonumber(redis.call('HGET', KEYS[2], 'fail_n') or '0')
if fail_n > 0 then
  redis.call('HINCRBY', KEYS[2], 'fail_n', -1)
  local f = redis.call('HMGET', KEYS[2], 'fail_error', 'fail_message', 'fail_delay')
  return {'fail', f[1] or 'TemporaryError', f[2] or '', f[3] or '0'}
end

local RULES = {
  start   = {from = {STOPPED = 1}, noop = {STARTING = 1, RUNNING = 1, CREATING = 1},
             via = 'STARTING', to = 'RUNNING'},
  resume  = {from = {SUSPENDED = 1}, noop = {STARTING = 1, RUNNING = 1},
             via = 'STARTING', to = 'RUNNING'},
  stop    = {from = {RUNNING = 1}, noop = {STOPPING = 1, STOPPED = 1},
             via = 'STOPPING', to = 'STOPPED'},
  suspend = {from = {RUNNING = 1}, noop = {SUSPENDING = 1, SUSPENDED = 1},
             via = 'SUSPENDING', to = 'SUSPENDED'},
  delete  = {from = nil, noop = {DELETING = 1}, via = 'DELETING', to = 'GONE'},
  create  = {from = nil, noop = nil, via = 'CREATING', to = 'RUNNING'},
}
local rule = RULES[action]

local function current(name)
  local raw = redis.call('HGET', KEYS[1], name)
  if not raw then return nil end
  local rec = cjson.decode(raw)
  if rec.target ~= '' and now >= rec.done_at then
    rec.status = rec.target
    rec.since = rec.done_at
    rec.target = ''
  end
  if rec.status == 'GONE' then return nil end
  return rec
end

local todo = {}
local known = 0
for i = 4, #ARGV do
  local name = ARGV[i]
  local rec = current(name)
  if action == 'create' then
    if rec == nil then todo[#todo + 1] = {name, now} end
  elseif rec ~= nil then
    known = known + 1
    if rule.noop[rec.status] then
      -- already heading there: idempotent no-op
    elseif rule.from == nil or rule.from[rec.status] then
      todo[#todo + 1] = {name, rec.created_at}
    else
      return {'permanent', name, rec.status}
    end
  end
end

if action ~= 'create' and known == 0 then return {'notfound'} end

if #todo > 0 and (action == 'create' or action == 'start') then
  local until_ts = tonumber(redis.call('HGET', KEYS[2], 'capacity_until') or '0')
  if now < until_ts then return {'capacity', tostring(until_ts)} end
end

for _, item in ipairs(todo) do
  redis.call('HSET', KEYS[1], item[1], cjson.encode({
    status = rule.via, since = now, target = rule.to, done_at = now + duration,
    created_at = item[2]}))
end
return {'ok', tostring(#todo)}
"""

# Reading also forgets instances whose deletion has finished, so the hash does not grow
# forever across benchmark runs; atomic, so a name re-created meanwhile is not lost.
_LIST = """
local now = tonumber(ARGV[1])
local raw = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #raw, 2 do
  local rec = cjson.decode(raw[i + 1])
  if rec.target == 'GONE' and now >= rec.done_at then
    redis.call('HDEL', KEYS[1], raw[i])
  else
    out[#out + 1] = raw[i]
    out[#out + 1] = raw[i + 1]
  end
end
return out
"""

# GCE's own words for each state, shown to people in `ProviderVm.detail`.
_GCE_WORDS = {
    InfraStatus.CREATING: "PROVISIONING (currentAction=CREATING)",
    InfraStatus.STARTING: "STAGING (currentAction=STARTING)",
    InfraStatus.RUNNING: "RUNNING",
    InfraStatus.STOPPING: "STOPPING (currentAction=STOPPING)",
    InfraStatus.STOPPED: "TERMINATED",
    InfraStatus.SUSPENDING: "SUSPENDING (currentAction=SUSPENDING)",
    InfraStatus.SUSPENDED: "SUSPENDED",
    InfraStatus.DELETING: "STOPPING (currentAction=DELETING)",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error_class(name: str) -> type[MigctlError]:
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, MigctlError):
        return found
    return TemporaryError


class SimMig:
    """The simulated MIG (`VmProvider`): one Redis hash, name -> JSON record."""

    def __init__(
        self,
        redis: redis.Redis,
        pool_id: str,
        timings: SimTimings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self.pool_id = pool_id
        self.timings = timings or SimTimings()
        self._clock = clock
        # Literal braces: a Redis-cluster hash tag, so both keys live in one slot.
        self.key = f"migctl:{{{pool_id}}}:sim:mig"
        self.faults_key = f"migctl:{{{pool_id}}}:sim:mig:faults"
        self._mutate = redis.register_script(_MUTATE)
        self._list = redis.register_script(_LIST)

    # -- VmProvider -------------------------------------------------------------------

    def list(self) -> list[ProviderVm]:
        """Every instance, with its status as of now."""
        self._maybe_fail("list")
        now = self._clock()
        raw = self._call(self._list, [self.key], [now])
        vms = []
        for i in range(0, len(raw), 2):
            rec = json.loads(_text(raw[i + 1]))
            status = rec["status"]
            if rec["target"] and now >= rec["done_at"]:
                status = rec["target"]
            infra = InfraStatus(status)
            vms.append(
                ProviderVm(
                    name=_text(raw[i]),
                    status=infra,
                    created_at=float(rec["created_at"]),
                    detail=_GCE_WORDS.get(infra, status),
                )
            )
        return sorted(vms, key=lambda vm: vm.name)

    def create(self, names: Sequence[str]) -> None:
        self._apply("create", names, self.timings.create_s)

    def start(self, names: Sequence[str]) -> None:
        self._apply("start", names, self.timings.start_s)

    def stop(self, names: Sequence[str]) -> None:
        self._apply("stop", names, self.timings.stop_s)

    def suspend(self, names: Sequence[str]) -> None:
        self._apply("suspend", names, self.timings.suspend_s)

    def resume(self, names: Sequence[str]) -> None:
        self._apply("resume", names, self.timings.resume_s)

    def delete(self, names: Sequence[str]) -> None:
        self._apply("delete", names, self.timings.delete_s)

    # -- fault knobs --------------------------------------------------------------------

    def fail_next(self, n: int, error: MigctlError | type[MigctlError]) -> None:
        """The next `n` mutating calls (from any process) raise `error` (a migctl error)."""
        if isinstance(error, type):
            error = error(f"simulated {error.__name__}")
        delay = float(getattr(error, "delay", 0.0))
        fields: dict[Any, str | int | float] = {  # redis-py types keys invariantly
            "fail_n": n,
            "fail_error": type(error).__name__,
            "fail_message": str(error),
            "fail_delay": delay,
        }
        self._call(lambda: self._redis.hset(self.faults_key, mapping=fields))

    def fail_rate(self, rate: float) -> None:
        """From now on (any process), each call fails with this probability, with a
        TemporaryError like a GCE backend error; 0 stops it."""
        self._call(lambda: self._redis.hset(self.faults_key, "fail_rate", rate))

    def capacity_exhausted_until(self, ts: float) -> None:
        """Until `ts` (this MIG's clock), create and start raise `CapacityExhausted`."""
        self._call(lambda: self._redis.hset(self.faults_key, "capacity_until", ts))

    def vanish(self, name: str) -> None:
        """The VM disappears at once, as if deleted out of band."""
        self._call(lambda: self._redis.hdel(self.key, name))

    # -- internals ----------------------------------------------------------------------

    def _maybe_fail(self, action: str) -> None:
        rate = self._call(lambda: self._redis.hget(self.faults_key, "fail_rate"))
        if rate is not None and random.random() < float(rate):
            raise TemporaryError(f"simulated backend error on {action} (fail_rate {_text(rate)})")

    def _apply(self, action: str, names: Sequence[str], duration: float) -> None:
        unique = list(dict.fromkeys(names))
        if not unique:
            return
        self._maybe_fail(action)
        out = [
            _text(x)
            for x in self._call(
                self._mutate,
                [self.key, self.faults_key],
                [action, self._clock(), duration, *unique],
            )
        ]
        kind = out[0]
        if kind == "ok":
            return
        if kind == "fail":
            cls = _error_class(out[1])
            if issubclass(cls, TemporaryError):
                raise cls(out[2], float(out[3]))
            raise cls(out[2])
        if kind == "permanent":
            raise PermanentError(f"cannot {action} VM {out[1]}: it is {out[2]}")
        if kind == "notfound":
            raise NotFound(f"cannot {action}: no such VM in pool {self.pool_id}: {unique}")
        if kind == "capacity":
            raise CapacityExhausted(
                f"cannot {action} {unique}: simulated ZONE_RESOURCE_POOL_EXHAUSTED "
                f"until {float(out[1]):.0f}"
            )
        raise AssertionError(f"unexpected sim MIG script answer {out!r}")

    def _call(self, fn: Callable[..., Any], keys: Any = None, args: Any = None) -> Any:
        """Run a Redis call, turning Redis's errors into migctl's (adapter edge)."""
        try:
            if keys is None:
                return fn()
            return fn(keys=keys, args=args)
        except redis.RedisError as exc:
            raise TemporaryError(f"sim MIG: Redis unavailable: {exc}") from exc
