"""The bridge's side of bench/pipeline_bench.py: a process wired as `migctl-bridge` wires
itself (settings from MIGCTL_CONFIG, `runtime().intake` = the real RedisIntake on the
real CeleryDispatcher), feeding job messages to the bridge's `Handler.handle`.

Driven by one JSON command per stdin line; answers one JSON line on stdout:
- {"op": "burst", "first": ID, "n": N}: N messages back to back (as fast as it can);
- {"op": "open", "first": ID, "n": N, "rate": R}: message i is due at t0 + i/R (open
  loop: arrivals follow the clock, not the previous message's completion);
- {"op": "quit"}.
The answer lists [job_id, due, entry, exit] per message (epoch seconds; `due` = the
scheduled arrival, `entry` = handler entry) and the verdicts that were not ACK.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migctl import runtime as rt
from migctl.bridge.subscriber import Counters, Handler, Verdict
from migctl.settings import load_settings


def message(job_id: int, pool: str, org: str) -> bytes:
    """The Go controller's job message (the seed's PubSubMessage), as LocalStack sends it."""
    return json.dumps(
        {
            "org_id": "1",
            "org_name": org,
            "installation_id": 1,
            "repo_full_name": f"{org}/bench",
            "run_id": job_id + 7_000_000,
            "job_id": job_id,
            "labels": ["self-hosted", "linux"],
            "pool_id": pool,
            "priority": 0,
            "received_at": time.time(),
        }
    ).encode()


def main() -> None:
    settings = load_settings()
    rt.use_settings(settings)
    runtime = rt.runtime()
    pool, org = settings.pool.id, settings.github_app.org
    handler = Handler(runtime.intake, pool, Counters())
    # Warm the Celery producer and the Redis connections, as a running bridge has them.
    runtime.dispatch.send("migctl.canary")
    runtime.store.counters()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        first, n = int(cmd["first"]), int(cmd["n"])
        bodies = [message(first + i, pool, org) for i in range(n)]
        rate = float(cmd.get("rate") or 0)
        rows: list[tuple[str, float, float, float]] = []
        refused: list[str] = []
        t0 = time.time() + 0.05
        for i, body in enumerate(bodies):
            due = t0 + i / rate if rate else 0.0
            if rate:
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
            entry = time.time()
            decision = handler.handle(body, {}, f"bench-{first + i}", 1)
            done = time.time()
            rows.append((str(first + i), due or entry, entry, done))
            if decision.verdict is not Verdict.ACK:
                refused.append(f"{first + i}:{decision.verdict}")
        print(json.dumps({"rows": rows, "refused": refused}), flush=True)


if __name__ == "__main__":
    main()
