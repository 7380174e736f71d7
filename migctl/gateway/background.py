"""The gateway's loops besides the streams: wake-ups, the heartbeat/stats flush, and the
outbox sweep that makes up for wake-ups Redis pub/sub lost."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
import redis.asyncio as aioredis

from migctl.gateway import stats
from migctl.gateway.outbox import taken_channel

if TYPE_CHECKING:
    from migctl.gateway.server import Gateway

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_S = 1.0
# Pub/sub is at-most-once; a command whose wake-up was lost waits at most this long.
OUTBOX_SWEEP_S = 30.0
EPOCH_CHECK_S = 2.0  # how soon a wiped Redis is noticed


async def wakeups(gw: Gateway) -> None:
    """One pub/sub connection per gateway, whatever the number of VMs."""
    backoff = 0.5
    while True:
        client = aioredis.Redis.from_url(
            gw.redis_url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30
        )
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            taken = taken_channel(gw.store.k)
            await pubsub.subscribe(gw.store.k.wake, taken)
            backoff = 0.5
            # Wake-ups published while we were not subscribed are lost: sweep.
            gw.spawn(sweep(gw))
            async for message in pubsub.listen():
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                channel = message["channel"]
                if (channel.decode() if isinstance(channel, bytes) else channel) == taken:
                    gw.taken_elsewhere(text)
                    continue
                vm_id = text
                holder = gw.sessions.get(vm_id)
                if holder is not None:
                    gw.spawn(gw.deliver(holder))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("wake-up subscription lost (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
        finally:
            await client.aclose()


async def sweep(gw: Gateway) -> None:
    """Deliver to every held VM whose outbox is not empty (one pipelined read)."""
    vm_ids = gw.sessions.vm_ids()
    if not vm_ids:
        return
    try:
        waiting = await gw.outbox.nonempty(vm_ids)
    except Exception as exc:
        log.warning("outbox sweep failed: %s", exc)
        return
    for vm_id in waiting:
        holder = gw.sessions.get(vm_id)
        if holder is not None:
            gw.spawn(gw.deliver(holder))


async def sweep_loop(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(OUTBOX_SWEEP_S)
        await sweep(gw)


async def epoch_loop(gw: Gateway) -> None:
    """Notice that Redis lost its data (FLUSHALL, an empty restart): every session's
    record went with it. End every stream so each agent reconnects and reports its state
    afresh to the record the GCloud sync rebuilds; meanwhile an agent whose VM is not
    rediscovered yet is told to retry, not refused (`Authenticator.rebuilding`)."""
    epoch = gw.auth.epoch
    handled = 0.0
    while True:
        try:
            await gw.relay.run(epoch.check)
        except Exception as exc:
            log.debug("state epoch check failed: %s", exc)
        if epoch.reset_at > handled:
            handled = epoch.reset_at
            gw.beats = {}
            n = gw.sessions.close_all(
                grpc.StatusCode.UNAVAILABLE, "controller state was reset; reconnect"
            )
            log.error(
                "gateway %s: the controller's Redis lost its data; ended %d streams so their "
                "agents reconnect and report afresh",
                gw.id,
                n,
            )
        await asyncio.sleep(EPOCH_CHECK_S)


async def flush_loop(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_FLUSH_S)
        await flush(gw)


async def flush(gw: Gateway) -> None:
    beats, gw.beats = gw.beats, {}
    if beats:
        try:
            gw.stats.heartbeats_written += await gw.outbox.touch_heartbeats(beats)
        except Exception as exc:
            log.warning("heartbeat flush failed (%s); keeping %d for the next", exc, len(beats))
            for vm_id, at in beats.items():  # newer beats taken meanwhile win
                gw.beats.setdefault(vm_id, at)
    try:
        fields = gw.stats.fields(len(gw.sessions))
        await gw.relay.run(stats.publish, gw.store, gw.id, fields, len(gw.sessions))
    except Exception as exc:
        log.debug("stats publish failed: %s", exc)


async def final_flush(gw: Gateway) -> None:
    """At shutdown: the last heartbeats, and this replica out of the pool's stats."""
    await flush(gw)
    try:
        await gw.relay.run(stats.withdraw, gw.store, gw.id, gw.stats.fields(len(gw.sessions)))
    except Exception as exc:
        log.warning("could not withdraw gateway %s from the stats: %s", gw.id, exc)
