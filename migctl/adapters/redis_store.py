"""The pool's state in Redis: jobs, VMs, the queue, command outboxes, counters.

Every key is `migctl:{<pool>}:...`; the braces are a Redis Cluster hash tag, so one
pool's keys share a slot and every Lua script may touch them together. The store holds
no policy: the domain decides a `Change`, `save` writes it atomically with a compare on
each record's revision, and the indexes (queue, free VMs, in-flight registrations) are
derived from the new records here, in one place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import LockError

from migctl.adapters.codec import decode_job, decode_vm, encode, flat, pairs, queue_score
from migctl.domain.errors import TemporaryError
from migctl.domain.model import Job, JobState, Vm
from migctl.domain.states import is_free
from migctl.domain.transitions import Change

RECENT_JOBS_KEPT = 1000
FINISHED_JOB_TTL = 7 * 86400
DEAD_LETTERS_KEPT = 1000
ACK_TTL = 3600


class Keys:
    def __init__(self, pool_id: str) -> None:
        self.pool_id = pool_id
        self.prefix = f"migctl:{{{pool_id}}}:"
        p = self.prefix
        self.queue = p + "queue"  # zset: QUEUED job ids by priority, then arrival
        self.assigned = p + "assigned"  # zset: ASSIGNED job ids by assigned_at
        self.lost = p + "lost"  # zset: RUNNING job ids whose VM was lost, by lost_at
        self.recent = p + "recent"  # zset: finished job ids by finished_at
        self.vms = p + "vms"  # set: every VM id the pool knows
        self.free = p + "free"  # zset: free VM ids by last_active
        self.inflight = p + "inflight"  # zset: VMs with a registration sent, not acked
        self.counters = p + "counters"  # hash: the seed's counters and ours
        self.deadletters = p + "deadletters"  # list: newest first, bounded
        self.scaled = p + "scaled"  # zset: one member per VM started or created, by time
        self.wake = p + "wake"  # pub/sub channel: a VM id whose outbox has news
        self.bridge_stats = p + "bridge"  # hash: the bridge's counters
        self.epoch = p + "epoch"  # string: set once per life of the data (StateEpoch)
        self.vm_prefix = p + "vm:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def vm(self, vm_id: str) -> str:
        return f"{self.prefix}vm:{vm_id}"

    def outbox(self, vm_id: str) -> str:
        return f"{self.prefix}outbox:{vm_id}"

    def cmds(self, vm_id: str) -> str:
        return f"{self.prefix}cmds:{vm_id}"

    def timeline(self, job_id: str) -> str:
        return f"{self.prefix}timeline:{job_id}"

    def ack(self, command_id: str) -> str:
        return f"{self.prefix}ack:{command_id}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"


def _script(name: str) -> str:
    return resources.files("migctl.adapters").joinpath(f"lua/{name}.lua").read_text()


@dataclass(frozen=True)
class Snapshot:
    """What an assignment needs, read in one round trip."""

    job: Job | None
    job_rev: int
    inflight: int
    free: list[tuple[Vm, int]]


class Conflict(TemporaryError):
    """A record changed between read and write; re-read and decide again."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} changed underneath", delay=0.0)
        self.key = key


def _redis_errors(func: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TemporaryError(f"Redis unavailable: {exc}", delay=2.0) from exc

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


class RedisStore:
    """Jobs and VMs of one pool. Blocking; every method is one or two round trips."""

    def __init__(self, client: redis.Redis, pool_id: str) -> None:
        self.r = client
        self.pool_id = pool_id
        self.k = Keys(pool_id)
        self._commit = client.register_script(_script("commit"))
        self._claim = client.register_script(_script("claim"))
        self._create = client.register_script(_script("create_job"))
        self._snapshot = client.register_script(_script("snapshot"))
        self._heartbeat = client.register_script(_script("heartbeat"))
        self._ack = client.register_script(_script("ack"))

    # -- jobs ---------------------------------------------------------------------

    @_redis_errors
    def create_job(self, job: Job, queued_at: float | None = None) -> bool:
        """Store a new job, with its timeline's first hops, in one round trip; False when
        one with this id exists (intake dedupe)."""
        score = repr(queue_score(job)) if job.state is JobState.QUEUED else ""
        queued = repr(queued_at if queued_at is not None else time.time())
        keys = [self.k.job(job.id), self.k.queue, self.k.counters, self.k.timeline(job.id)]
        args: list[str | int] = [score, FINISHED_JOB_TTL, repr(job.received_at), queued]
        args += flat(encode(job))
        return bool(self._create(keys=keys, args=args))

    @_redis_errors
    def get_job(self, job_id: str) -> tuple[Job, int] | None:
        raw = self.r.hgetall(self.k.job(job_id))
        return decode_job(pairs(raw)) if raw else None

    @_redis_errors
    def get_jobs(self, job_ids: Sequence[str]) -> list[tuple[Job, int]]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.k.job(job_id))
        return [decode_job(pairs(raw)) for raw in pipe.execute() if raw]

    @_redis_errors
    def queued(self, limit: int = 100) -> list[tuple[Job, int]]:
        """The head of the queue, in order, with revisions."""
        ids = [_s(i) for i in self.r.zrange(self.k.queue, 0, limit - 1)]
        return [(job, rev) for job, rev in self.get_jobs(ids) if job.state is JobState.QUEUED]

    @_redis_errors
    def queue_length(self) -> int:
        return int(self.r.zcard(self.k.queue))

    @_redis_errors
    def assigned_before(self, deadline: float) -> list[str]:
        return [_s(i) for i in self.r.zrangebyscore(self.k.assigned, "-inf", deadline)]

    @_redis_errors
    def lost_before(self, deadline: float) -> list[str]:
        """RUNNING jobs whose VM was lost before `deadline`, still without GitHub's end."""
        return [_s(i) for i in self.r.zrangebyscore(self.k.lost, "-inf", deadline)]

    @_redis_errors
    def inflight_before(self, deadline: float) -> list[str]:
        """VMs whose command (registration or drain) was sent before `deadline`, unacked."""
        return [_s(i) for i in self.r.zrangebyscore(self.k.inflight, "-inf", deadline)]

    @_redis_errors
    def recent_jobs(self, limit: int = 50) -> list[Job]:
        ids = [_s(i) for i in self.r.zrevrange(self.k.recent, 0, limit - 1)]
        return [job for job, _ in self.get_jobs(ids)]

    @_redis_errors
    def all_job_ids(self) -> list[str]:
        """Every job the pool still holds a record of (active and recent)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrange(self.k.queue, 0, -1)
        pipe.zrange(self.k.assigned, 0, -1)
        pipe.zrange(self.k.recent, 0, -1)
        ids: list[str] = []
        for chunk in pipe.execute():
            ids += [_s(i) for i in chunk]
        ids += [
            key.rsplit(":", 1)[1] for key in map(_s, self.r.scan_iter(self.k.job("*"), count=1000))
        ]
        return list(dict.fromkeys(ids))

    # -- VMs ----------------------------------------------------------------------

    @_redis_errors
    def get_vm(self, vm_id: str) -> tuple[Vm, int] | None:
        raw = self.r.hgetall(self.k.vm(vm_id))
        return decode_vm(pairs(raw)) if raw else None

    @_redis_errors
    def get_vms(self, vm_ids: Iterable[str] | None = None) -> list[tuple[Vm, int]]:
        ids = sorted(_s(i) for i in self.r.smembers(self.k.vms)) if vm_ids is None else list(vm_ids)
        pipe = self.r.pipeline(transaction=False)
        for vm_id in ids:
            pipe.hgetall(self.k.vm(vm_id))
        return [decode_vm(pairs(raw)) for raw in pipe.execute() if raw]

    @_redis_errors
    def snapshot(self, job_id: str, candidates: int = 4) -> Snapshot:
        reply = self._snapshot(
            keys=[self.k.job(job_id), self.k.free, self.k.inflight],
            args=[self.k.vm_prefix, candidates],
        )
        job_raw, inflight, *vm_raws = reply
        job, job_rev = decode_job(pairs(job_raw)) if job_raw else (None, 0)
        return Snapshot(
            job, job_rev, int(inflight), [decode_vm(pairs(raw)) for raw in vm_raws if raw]
        )

    @_redis_errors
    def claim(
        self,
        job_id: str,
        job_rev: int,
        candidates: Sequence[tuple[Vm, int]],
        *,
        now: float,
        max_inflight: int,
    ) -> tuple[tuple[Vm, int] | None, str]:
        """Reserve the first candidate still free for the job. ((vm, rev), '') with the
        VM as it is after the claim, else (None, why): 'job' changed, 'limit' reached,
        or 'none' left."""
        keys = [
            self.k.job(job_id),
            self.k.queue,
            self.k.assigned,
            self.k.free,
            self.k.inflight,
            self.k.counters,
        ]
        args: list[Any] = [job_id, job_rev, repr(now), max_inflight]
        for vm, rev in candidates:
            keys.append(self.k.vm(vm.id))
            args += [vm.id, rev, "0" if vm.runner_registered else "1"]
        ok, detail, *rest = self._claim(keys=keys, args=args)
        if int(ok) != 1:
            return None, _s(detail)
        return decode_vm(pairs(rest[0])), ""

    @_redis_errors
    def touch_heartbeats(self, beats: Mapping[str, float]) -> int:
        if not beats:
            return 0
        ids = list(beats)
        return int(
            self._heartbeat(keys=[self.k.vm(i) for i in ids], args=[repr(beats[i]) for i in ids])
        )

    # -- the one write path -----------------------------------------------------------

    @_redis_errors
    def save(
        self,
        change: Change,
        revs: Mapping[str, int],
        *,
        deleted_vms: Sequence[str] = (),
        commands: Sequence[tuple[str, dict[str, Any], int]] = (),
        counters: Mapping[str, int] | None = None,
        wake: Sequence[str] = (),
        timeline: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write a domain Change atomically. `revs` maps job/VM ids (as `job:ID` or
        `vm:ID`) to the revision they were read at (0 = new). Raises Conflict.

        `commands`: (vm_id, command, ttl_s) to put in the VM's outbox; each VM is woken.
        """
        keys, args = self._commit_args(
            change,
            revs,
            deleted_vms=deleted_vms,
            commands=commands,
            counters=counters,
            wake=wake,
            timeline=timeline,
        )
        ok, *detail = self._commit(keys=keys, args=args)
        if int(ok) != 1:
            raise Conflict(_s(detail[0]))

    @_redis_errors
    def save_many(self, items: Sequence[tuple[Change, Mapping[str, int]]]) -> list[bool]:
        """Several independent Changes in one round trip (pipelined), each atomic with its
        own compare; returns which were written. For reconcilers touching many VMs."""
        if not items:
            return []
        pipe = self.r.pipeline(transaction=False)
        for change, revs in items:
            keys, args = self._commit_args(change, revs)
            self._commit(keys=keys, args=args, client=pipe)
        return [int(reply[0]) == 1 for reply in pipe.execute()]

    def _commit_args(
        self,
        change: Change,
        revs: Mapping[str, int],
        *,
        deleted_vms: Sequence[str] = (),
        commands: Sequence[tuple[str, dict[str, Any], int]] = (),
        counters: Mapping[str, int] | None = None,
        wake: Sequence[str] = (),
        timeline: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[list[str], list[str]]:
        ops: dict[str, list[Any]] = {
            k: [] for k in ("check", "put", "del", "zadd", "zrem", "sadd", "srem")
        }
        ops.update({k: [] for k in ("rpush", "hset", "expire", "incr", "trim", "publish")})
        keys: list[str] = []
        for job in change.jobs.values():
            key = self.k.job(job.id)
            keys.append(key)
            ops["check"].append([key, revs.get(f"job:{job.id}", 0)])
            ops["put"].append([key, flat(encode(job))])
            self._job_indexes(job, ops)
        for vm in change.vms.values():
            key = self.k.vm(vm.id)
            keys.append(key)
            ops["check"].append([key, revs.get(f"vm:{vm.id}", 0)])
            ops["put"].append([key, flat(encode(vm))])
            ops["sadd"].append([self.k.vms, vm.id])
            if is_free(vm):
                ops["zadd"].append([self.k.free, vm.last_active, vm.id])
            else:
                ops["zrem"].append([self.k.free, vm.id])
            if vm.cmd_id:
                sent = vm.cmd_sent_at or vm.reserved_at or time.time()
                ops["zadd"].append([self.k.inflight, sent, vm.id])
            else:
                ops["zrem"].append([self.k.inflight, vm.id])
        for vm_id in deleted_vms:
            ops["check"].append([self.k.vm(vm_id), revs.get(f"vm:{vm_id}", 0)])
            for key in (self.k.vm(vm_id), self.k.outbox(vm_id), self.k.cmds(vm_id)):
                ops["del"].append(key)
                keys.append(key)
            for index in (self.k.free, self.k.inflight):
                ops["zrem"].append([index, vm_id])
            ops["srem"].append([self.k.vms, vm_id])
        for vm_id, command, ttl in commands:
            ops["rpush"].append([self.k.outbox(vm_id), command["id"]])
            ops["hset"].append([self.k.cmds(vm_id), command["id"], json.dumps(command)])
            ops["expire"] += [[self.k.outbox(vm_id), ttl], [self.k.cmds(vm_id), ttl]]
            keys += [self.k.outbox(vm_id), self.k.cmds(vm_id)]
            ops["publish"].append([self.k.wake, vm_id])
        for vm_id in wake:
            ops["publish"].append([self.k.wake, vm_id])
        for name, n in (counters or {}).items():
            ops["incr"].append([self.k.counters, name, n])
        for job_id, hops in (timeline or {}).items():
            key = self.k.timeline(job_id)
            keys.append(key)
            ops["hset"] += [[key, hop, str(value)] for hop, value in hops.items()]
            ops["expire"].append([key, FINISHED_JOB_TTL])
        keys += [
            self.k.queue,
            self.k.assigned,
            self.k.lost,
            self.k.recent,
            self.k.vms,
            self.k.free,
            self.k.inflight,
        ]
        keys.append(self.k.counters)
        return list(dict.fromkeys(keys)), [json.dumps(_prune(ops))]

    def _job_indexes(self, job: Job, ops: dict[str, list[Any]]) -> None:
        key = self.k.job(job.id)
        if job.state is JobState.QUEUED:
            ops["zadd"].append([self.k.queue, queue_score(job), job.id])
        else:
            ops["zrem"].append([self.k.queue, job.id])
        if job.state is JobState.ASSIGNED:
            ops["zadd"].append([self.k.assigned, job.assigned_at, job.id])
        else:
            ops["zrem"].append([self.k.assigned, job.id])
        if job.state is JobState.RUNNING and job.lost_at:
            ops["zadd"].append([self.k.lost, job.lost_at, job.id])
        else:
            ops["zrem"].append([self.k.lost, job.id])
        if job.state.terminal:
            ops["zadd"].append([self.k.recent, job.finished_at or job.updated_at, job.id])
            ops["expire"].append([key, FINISHED_JOB_TTL])
            ops["trim"].append([self.k.recent, RECENT_JOBS_KEPT])

    # -- observations for /metrics -----------------------------------------------------

    @_redis_errors
    def observe(self, name: str, value: float, buckets: Sequence[float]) -> None:
        """One observation into a cumulative histogram kept in Redis (read by /metrics,
        in the same hash and layout as the scrape-folded job histograms)."""
        key = self.k.prefix + "metrics:hist"
        pipe = self.r.pipeline(transaction=False)
        for le in buckets:
            if value <= le:
                bound = str(int(le)) if float(le).is_integer() else repr(le)
                pipe.hincrby(key, f"{name}:{bound}", 1)
        pipe.hincrby(key, f"{name}:count", 1)
        pipe.hincrbyfloat(key, f"{name}:sum", value)
        pipe.execute()

    # -- per-job timeline ---------------------------------------------------------------

    @_redis_errors
    def mark(self, job_id: str, first: bool = True, **hops: Any) -> None:
        """Record when a job reached each hop (received, decided, delivered, ...), for
        `migctl explain` and the status page. `first`: keep the earliest time of a hop."""
        if not job_id or not hops:
            return
        key = self.k.timeline(job_id)
        pipe = self.r.pipeline(transaction=False)
        for hop, value in hops.items():
            (pipe.hsetnx if first else pipe.hset)(key, hop, str(value))
        pipe.expire(key, FINISHED_JOB_TTL)
        pipe.execute()

    @_redis_errors
    def get_timeline(self, job_id: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.k.timeline(job_id)).items()}

    # -- command outbox -------------------------------------------------------------

    @_redis_errors
    def pending_commands(self, vm_id: str, now: float | None = None) -> list[dict[str, Any]]:
        """Unacked, unexpired commands for a VM, oldest first. Expired ones are dropped."""
        now = time.time() if now is None else now
        ids = [_s(i) for i in self.r.lrange(self.k.outbox(vm_id), 0, -1)]
        if not ids:
            return []
        payloads = self.r.hmget(self.k.cmds(vm_id), ids)
        out, expired = [], []
        for cmd_id, payload in zip(ids, payloads, strict=True):
            if payload is None:
                expired.append(cmd_id)
                continue
            command = json.loads(payload)
            if command.get("expires_at", 0) and command["expires_at"] <= now:
                expired.append(cmd_id)
                continue
            out.append(command)
        if expired:
            pipe = self.r.pipeline(transaction=False)
            for cmd_id in expired:
                pipe.lrem(self.k.outbox(vm_id), 0, cmd_id)
                pipe.hdel(self.k.cmds(vm_id), cmd_id)
            pipe.execute()
        return out

    @_redis_errors
    def ack_command(self, vm_id: str, command_id: str, outcome: Mapping[str, Any]) -> bool:
        """Record an agent's ack; True when the command was still pending (first ack)."""
        keys = [self.k.outbox(vm_id), self.k.cmds(vm_id), self.k.ack(command_id)]
        return bool(self._ack(keys=keys, args=[command_id, json.dumps(dict(outcome)), ACK_TTL]))

    @_redis_errors
    def command_outcome(self, command_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k.ack(command_id))
        return json.loads(raw) if raw else None

    # -- counters, limits, dead letters -------------------------------------------------

    @_redis_errors
    def incr(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.k.counters, name, n)

    @_redis_errors
    def counters(self) -> dict[str, int]:
        return {_s(k): int(v) for k, v in self.r.hgetall(self.k.counters).items()}

    @_redis_errors
    def scaled_since(self, since: float) -> int:
        return int(self.r.zcount(self.k.scaled, since, "+inf"))

    @_redis_errors
    def record_scaled(self, vm_ids: Sequence[str], now: float) -> None:
        if vm_ids:
            pipe = self.r.pipeline(transaction=False)
            pipe.zadd(self.k.scaled, {f"{vm_id}@{now}": now for vm_id in vm_ids})
            pipe.zremrangebyscore(self.k.scaled, "-inf", now - 3600)
            pipe.execute()

    @_redis_errors
    def dead_letter(self, record: Mapping[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(self.k.deadletters, json.dumps(dict(record)))
        pipe.ltrim(self.k.deadletters, 0, DEAD_LETTERS_KEPT - 1)
        pipe.hincrby(self.k.counters, "dead_letters", 1)
        pipe.execute()

    @_redis_errors
    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.r.lrange(self.k.deadletters, 0, limit - 1)]

    @_redis_errors
    def set_bridge_stats(self, stats: Mapping[str, Any]) -> None:
        self.r.hset(self.k.bridge_stats, mapping={k: str(v) for k, v in stats.items()})

    @_redis_errors
    def bridge_stats(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.k.bridge_stats).items()}

    @contextmanager
    def try_lock(self, name: str, timeout: float, wait: float = 0.0) -> Iterator[bool]:
        """A per-pool lock with a TTL (a crashed holder frees it). Yields whether it was
        acquired within `wait` seconds; the body decides what not getting it means."""
        lock = self.r.lock(self.k.lock(name), timeout=timeout)
        try:
            got = lock.acquire(blocking=wait > 0, blocking_timeout=wait or None)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TemporaryError(f"Redis unavailable: {exc}", delay=2.0) from exc
        try:
            yield bool(got)
        finally:
            if got:
                try:
                    lock.release()
                except (LockError, redis.ConnectionError):
                    pass  # expired or Redis gone: the TTL frees it anyway

    @_redis_errors
    def synced_at(self) -> float:
        """When the GCloud sync last listed the provider; 0.0 if never since the data
        began (a first start, or a wiped Redis: the VM records are not to be trusted)."""
        value = self.r.get(self.k.prefix + "synced_at")
        return float(value) if value is not None else 0.0

    @_redis_errors
    def mark_synced(self, at: float) -> None:
        self.r.set(self.k.prefix + "synced_at", repr(at))

    @_redis_errors
    def once(self, name: str, ttl_s: float) -> bool:
        """True for the first caller within `ttl_s` (debounces follow-up work)."""
        return bool(self.r.set(self.k.prefix + "once:" + name, "1", nx=True, px=int(ttl_s * 1000)))

    @_redis_errors
    def forget(self, name: str) -> None:
        self.r.delete(self.k.prefix + "once:" + name)


def _prune(ops: dict[str, list[Any]]) -> dict[str, list[Any]]:
    # cjson turns an empty Lua-side table into an object; send only the non-empty lists.
    return {k: v for k, v in ops.items() if v}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class StateEpoch:
    """Notices that the controller's Redis lost its data (FLUSHALL, a Redis that came back
    empty without persistence).

    One key holds a value set by whoever finds it missing; every long-lived process
    remembers the value it saw. A key that had to be made again, or a value that changed,
    means everything else went with it: `check()` says so once per process, and the
    first process to notice counts it (`state_resets`) and records when
    (`state_reset_at`). One round trip per check.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.seen: str | None = None
        self.reset_at = 0.0  # when this process last noticed a wipe

    @_redis_errors
    def check(self) -> bool:
        now = time.time()
        mine = f"{now:.6f}:{os.getpid()}"
        r, k = self.store.r, self.store.k
        pipe = r.pipeline(transaction=False)
        pipe.set(k.epoch, mine, nx=True)
        pipe.get(k.epoch)
        created, value = pipe.execute()
        current = value.decode() if isinstance(value, bytes) else str(value or mine)
        wiped = self.seen is not None and (created or current != self.seen)
        self.seen = current
        if not wiped:
            return False
        self.reset_at = now
        if r.set(k.prefix + "reset:" + current, "1", nx=True, ex=7 * 86400):
            pipe = r.pipeline(transaction=False)
            pipe.hincrby(k.counters, "state_resets", 1)
            pipe.hset(k.counters, "state_reset_at", int(now))
            pipe.execute()
        return True
