"""Redis round-trip probe for the benchmarks (bench/pipeline_bench.py), loaded only when
the bench puts this directory on PYTHONPATH of the processes it starts.

It wraps redis-py's `send_packed_command` (sync and asyncio; kombu uses the sync one):
one call is one request written to Redis, i.e. one round trip (a pipeline is one call).
Each call is attributed to "ours" (it names a `migctl:{...}` key, or its connection has
named one before: keyless PINGs of migctl's own clients) or "celery" (kombu, Celery
events); its commands are counted by parsing the RESP arrays; round trips are also
counted by first command name (`+` marks a pipeline) and, inside a Celery task (its
task_prerun/task_postrun signals), by task name. Counting is off until
the file `$BENCH_PROBE_DIR/active` exists (checked every 100 ms by a thread), so
processes run at full speed outside the measured windows. Counts go to
`$BENCH_PROBE_DIR/<pid>.json` every 100 ms, from a thread that is restarted in forked
children (Celery's prefork pool).
"""

from __future__ import annotations

import json
import os
import threading
import time

_DIR = os.environ.get("BENCH_PROBE_DIR", "")
_ACTIVE = False
_DEBUG = bool(os.environ.get("BENCH_PROBE_DEBUG"))
_TASK: list[str] = []  # the Celery task running in this process, if any
_COUNTS = {"ours_rt": 0, "ours_cmds": 0, "celery_rt": 0, "celery_cmds": 0}
_MARK = b"migctl:{"


def _commands(data: bytes) -> int:
    """Number of RESP arrays (commands) in a packed request."""
    n, i, end = 0, 0, len(data)
    try:
        while i < end:
            if data[i : i + 1] != b"*":
                return max(n, 1)
            j = data.index(b"\r\n", i)
            items = int(data[i + 1 : j])
            i = j + 2
            for _ in range(items):
                j = data.index(b"\r\n", i)
                size = int(data[i + 1 : j])
                i = j + 2 + size + 2
            n += 1
    except ValueError:
        return max(n, 1)
    return n


def _name(data: bytes) -> str:
    """The first command's name (a pipeline is named by its first command, with a +)."""
    try:
        j = data.index(b"\r\n", data.index(b"$")) + 2
        size = int(data[data.index(b"$") + 1 : j - 2])
        name = data[j : j + size].decode().upper()
    except ValueError:
        return "?"
    return name + ("+" if _commands(data) > 1 else "")


def _count(conn: object, command: object) -> None:
    if isinstance(command, (bytes, bytearray, memoryview)):
        data = bytes(command)
    elif isinstance(command, str):
        data = command.encode()
    else:
        data = b"".join(bytes(c) if not isinstance(c, str) else c.encode() for c in command)
    ours = _MARK in data or getattr(conn, "_bench_ours", False)
    if ours and not getattr(conn, "_bench_ours", False):
        try:
            conn._bench_ours = True  # type: ignore[attr-defined]
        except Exception:
            pass
    key = "ours" if ours else "celery"
    if _DEBUG:
        with open(os.path.join(_DIR, f"debug-{os.getpid()}.log"), "ab") as f:
            f.write(key.encode() + b" " + data[:300].replace(b"\r\n", b" ") + b"\n")
    _COUNTS[key + "_rt"] += 1
    _COUNTS[key + "_cmds"] += _commands(data)
    name = f"{key}:{_name(data)}"
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _TASK:
        name = f"task:{_TASK[0]}:{key}"
        _COUNTS[name] = _COUNTS.get(name, 0) + 1


def _writer() -> None:
    global _ACTIVE
    path = os.path.join(_DIR, f"{os.getpid()}.json")
    flag = os.path.join(_DIR, "active")
    last = None
    while True:
        _ACTIVE = os.path.exists(flag)
        snap = dict(_COUNTS)
        if snap != last:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, path)
            last = snap
        time.sleep(0.1)


def _start() -> None:
    for k in list(_COUNTS):
        if ":" in k:
            del _COUNTS[k]
        else:
            _COUNTS[k] = 0
    threading.Thread(target=_writer, name="bench-probe", daemon=True).start()


def _install() -> None:
    try:
        import redis.asyncio.connection as aconn
        import redis.connection as sconn
    except Exception:
        return
    for cls in (sconn.AbstractConnection,):  # CacheProxyConnection delegates to one
        original = cls.send_packed_command

        def wrapped(self, command, check_health=True, _orig=original):  # type: ignore[no-untyped-def]
            if _ACTIVE:
                _count(self, command)
            return _orig(self, command, check_health)

        cls.send_packed_command = wrapped  # type: ignore[method-assign]

    aoriginal = aconn.AbstractConnection.send_packed_command

    async def awrapped(self, command, check_health=True):  # type: ignore[no-untyped-def]
        if _ACTIVE:
            _count(self, command)
        return await aoriginal(self, command, check_health)

    aconn.AbstractConnection.send_packed_command = awrapped  # type: ignore[method-assign]
    os.register_at_fork(after_in_child=_start)
    _start()
    try:  # round trips made inside a Celery task are also counted per task name
        from celery import signals

        def prerun(sender=None, **_: object) -> None:  # type: ignore[no-untyped-def]
            _TASK[:] = [getattr(sender, "name", "?")]

        def postrun(**_: object) -> None:
            _TASK.clear()

        signals.task_prerun.connect(prerun, weak=False)
        signals.task_postrun.connect(postrun, weak=False)
    except Exception:
        pass


if _DIR:
    _install()
