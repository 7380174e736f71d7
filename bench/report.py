"""Write bench/RESULTS.md from the JSON the benches wrote (bench/run calls this).

    python bench/report.py RESULTS_DIR [--out bench/RESULTS.md] [--elapsed SECONDS]

Every figure is listed with its floor (measured in the same run), its target and
PASS/SHORT; a bench that failed or was skipped is listed as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_bench import per_task

Row = tuple[str, str, str, str, str]  # figure, value, floor / ratio, target, verdict


def load(d: Path, name: str) -> dict[str, Any] | None:
    path = d / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**SHORT**")


def num(x: float, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def machine(d: Path) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("celery", "kombu", "redis", "hiredis", "grpcio", "protobuf", "psutil"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        redis_v = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.split()[2]
    except (OSError, IndexError):
        redis_v = "?"
    bg = load(d, "background") or {}
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {', '.join(versions)}; redis-server {redis_v}",
        f"- background load when the run started (other work on this machine): "
        f"{num(bg.get('busy_pct'), '{:.0f}')}% of all cores busy, load average "
        f"{num(bg.get('loadavg'), '{:.1f}')}; figures are ratios to floors measured in the "
        "same run for that reason",
    ]


def both(*oks: bool) -> str:
    """One verdict per target of a row with several targets."""
    return " / ".join(verdict(ok) for ok in oks)


def pipeline_rows(p: dict[str, Any]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    lc = str(p.get("latency_concurrency", 2))
    for c, lv in p["levels"].items():
        runs = ", ".join(num(r["jobs_per_s"]) for r in lv["runs"])
        floors = ", ".join(num(f) for f in lv["floor_tasks_per_s"])
        rows.append(
            (
                f"1. sustained jobs/s, {c} worker process{'es' if c != '1' else ''} (-c {c})",
                f"{num(lv['jobs_per_s'])} (runs {runs})",
                f"Celery no-op {num(lv['floor'])} tasks/s (runs {floors}); "
                f"ratio {num(lv['ratio'], '{:.2f}')}",
                ">= 500 jobs/s / >= 0.5x",
                both(lv["jobs_per_s"] >= 500, lv["ratio"] >= 0.5),
            )
        )
    lf = p.get("latency_floor", {})
    for rate, run in p["latency"].items():
        p99_ratio = run["p99_ms"] / lf["p99_ms"] if lf.get("p99_ms") else math.nan
        rows.append(
            (
                f"1. latency at {rate} jobs/s, open loop (-c {lc})",
                f"p50 {num(run['p50_ms'], '{:.1f}')} / p95 {num(run['p95_ms'], '{:.1f}')} / "
                f"p99 {num(run['p99_ms'], '{:.1f}')} ms ({run['matched']}/{run['jobs']} jobs)",
                f"Celery send->start at 100/s: p50 {num(lf.get('p50_ms'), '{:.1f}')}, "
                f"p99 {num(lf.get('p99_ms'), '{:.1f}')} ms; p99 ratio {num(p99_ratio, '{:.1f}')}",
                "p99 <= 50 ms" if rate == "100" else "(reported)",
                verdict(run["p99_ms"] <= 50) if rate == "100" else "n/a",
            )
        )
    cost = p.get("redis_cost")
    floor = (p.get("redis_cost_floor") or {}).get("roles", {}).get("floor", {})
    if cost:
        roles = cost["roles"]
        worker_tasks = per_task(roles.get("worker", {}))
        assign = worker_tasks.get("assign_job", (math.nan, math.nan))
        bridge = roles.get("bridge", {}).get("ours_rt", math.nan)
        # The gateway's delivery of one command is one script call (the outbox read).
        path = bridge + assign[0] + 1
        total_ours = sum(r.get("ours_rt", 0) for r in roles.values())
        total_celery = sum(r.get("celery_rt", 0) for r in roles.values())
        floor_rt = floor.get("celery_rt", math.nan)
        rows += [
            (
                "2. Redis round trips of ours per assignment (the assign_job task)",
                num(assign[0], "{:.2f}"),
                f"Celery's own per no-op task {num(floor_rt, '{:.2f}')}",
                "<= 4",
                verdict(assign[0] <= 4),
            ),
            (
                "2. ... ours on the path handler -> agent (bridge + assign_job + delivery)",
                num(path, "{:.2f}"),
                f"bridge {num(bridge, '{:.2f}')} + assign_job {num(assign[0], '{:.2f}')} "
                "+ gateway outbox read 1",
                "<= 4",
                verdict(path <= 4),
            ),
            (
                "2. ... per job in all (with the ack, runner_registered and agent states)",
                f"ours {num(total_ours, '{:.1f}')}, Celery {num(total_celery, '{:.1f}')}",
                f"{num((total_ours + total_celery) / floor_rt, '{:.1f}')}x a no-op task's; "
                f"server-side commands {num(cost['server_commands'], '{:.0f}')} "
                f"({num(cost['script_commands'], '{:.0f}')} inside our scripts)",
                "(reported)",
                "n/a",
            ),
        ]
        for role, c in sorted(roles.items()):
            if max(abs(c.get("ours_rt", 0)), abs(c.get("celery_rt", 0))) < 0.05:
                continue
            names = ", ".join(
                f"{k.split(':', 1)[1]} {v:.2f}"
                for k, v in sorted(c.items(), key=lambda kv: -kv[1])
                if k.count(":") == 1 and abs(v) >= 0.05
            )
            notes.append(
                f"- Redis per job, {role}: ours {c['ours_rt']:.2f} round trips / "
                f"{c['ours_cmds']:.2f} commands, Celery {c['celery_rt']:.2f} / "
                f"{c['celery_cmds']:.2f} (by first command, + = pipeline: {names})"
            )
        if worker_tasks:
            notes.append(
                "- Redis per job inside each worker task (ours/Celery round trips): "
                + ", ".join(f"{t} {o:.2f}/{g:.2f}" for t, (o, g) in worker_tasks.items())
            )
        if floor:
            notes.append(
                f"- Celery's own cost per no-op task: {floor['celery_rt']:.2f} round trips / "
                f"{floor['celery_cmds']:.2f} commands"
            )
    rest, floor_rss = p.get("rss_rest_mib", {}), p.get("rss_floor_mib", {})
    for name in ("worker", "bridge", "gateway"):
        level = p["levels"].get(lc) or next(iter(p["levels"].values()))
        peak = max((r["peak_rss_mib"].get(name, 0) for r in level["runs"]), default=math.nan)
        floor_mib = floor_rss.get(name)
        rows.append(
            (
                f"6. RSS {name}{' (-c ' + lc + ', with its pool)' if name == 'worker' else ''}"
                " at rest / peak under load, MiB",
                f"{num(rest.get(name), '{:.0f}')} / {num(peak, '{:.0f}')}",
                f"floor {num(floor_mib, '{:.0f}')}; peak ratio "
                f"{num(peak / floor_mib if floor_mib else math.nan, '{:.2f}')}",
                "(reported)",
                "n/a",
            )
        )
    peaks = {
        c: max((r["peak_rss_mib"].get("worker", 0) for r in lv["runs"]), default=0)
        for c, lv in p["levels"].items()
    }
    notes.append(
        "- worker RSS peak by -c (main + pool, MiB): "
        + ", ".join(f"-c {c}: {v:.0f}" for c, v in peaks.items())
    )
    for c, lv in p["levels"].items():
        r = lv["runs"][0]
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in r["cpu_pct"].items())
        notes.append(f"- CPU during a sustained run at -c {c} (% of one core): {cpu}")
    if p.get("agent_anomalies"):
        notes.append(f"- agent anomalies: {p['agent_anomalies'][:5]}")
    return rows, notes


def gateway_rows(g: dict[str, Any]) -> list[Row]:
    gw, fl = g["gateway"], g["floor"]
    streams = g.get("streams", 10_000)
    hb_ratio = gw["hb_in_s"] / fl["hb_in_s"] if fl.get("hb_in_s") else math.nan
    mb = gw["rss_mib"] * 2**20 / 1e6
    return [
        (
            f"3. gateway RSS at {streams:,} streams, MiB",
            f"{num(gw['rss_mib'])} ({mb:.0f} MB)",
            f"bare grpc.aio {num(fl['rss_mib'])}; "
            f"ratio {num(gw['rss_mib'] / fl['rss_mib'], '{:.2f}')}",
            "<= 400 MB",
            verdict(mb <= 400),
        ),
        (
            "3. gateway heartbeats/s ingested (10,000/s offered)",
            num(gw["hb_in_s"]),
            f"bare grpc.aio {num(fl['hb_in_s'])}; ratio {num(hb_ratio, '{:.2f}')}",
            ">= 10,000/s / >= 0.5x",
            both(gw["hb_in_s"] >= 10_000, hb_ratio >= 0.5),
        ),
        (
            "3. gateway relay latency p50 / p99, ms",
            f"{num(gw['p50_ms'], '{:.1f}')} / {num(gw['p99_ms'], '{:.1f}')}",
            f"bare grpc.aio {num(fl['p50_ms'], '{:.1f}')} / {num(fl['p99_ms'], '{:.1f}')}",
            "p99 <= 10 ms",
            verdict(gw["p99_ms"] <= 10),
        ),
    ]


def reconcile_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for kind, k in r["kinds"].items():
        calls = ", ".join(f"{c} x{n}" for c, n in k["provider_calls"].items())
        rows.append(
            (
                f"4. reconcile pass, {r['vms']} VMs, {kind}: CPU (ms)",
                f"{num(k['cpu_ms'], '{:.1f}')} (wall {num(k['wall_ms'], '{:.0f}')}; "
                f"{k['round_trips']} Redis round trips)",
                f"read the pool once {num(k['floor_cpu_ms'], '{:.1f}')}; "
                f"ratio {num(k['ratio'], '{:.1f}')}",
                "<= 50 ms",
                verdict(k["cpu_ms"] <= 50),
            )
        )
        rows.append(
            (
                f"4. ... provider calls ({kind})",
                calls,
                "one per action kind",
                "1 batched call per kind",
                verdict(k["one_call_per_kind"]),
            )
        )
    return rows


def cold_rows(c: dict[str, Any]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes = []
    for p in c["phases"]:
        rows.append(
            (
                f"5. cold path, phase {p['phase']} ({p['action']}, {p['jobs']} jobs): overhead p95",
                f"{num(p['overhead_p95'], '{:.2f}')} s "
                f"(queue-to-start p95 {num(p['queue_to_start_p95'], '{:.2f}')} s)",
                f"VM's own time {num(p['vm_time_median'], '{:.2f}')} s",
                "<= 2 s",
                verdict(p["overhead_p95"] <= 2),
            )
        )
        notes.append(
            f"- cold path phase {p['phase']} median hops: "
            + "; ".join(f"{k} {v:.2f} s" for k, v in p["hops_median"].items())
        )
    rows.append(
        (
            "5. cold path overhead p95, both phases",
            f"{num(c['overhead_p95'], '{:.2f}')} s",
            f"queue-to-start / VM time p95 {num(c['ratio_p95'], '{:.2f}')}x",
            "<= 2 s",
            verdict(c["overhead_p95"] <= 2),
        )
    )
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--elapsed", type=float, default=math.nan)
    args = parser.parse_args()
    d = Path(args.dir)
    rows: list[Row] = []
    notes: list[str] = []
    missing = []
    status = load(d, "status") or {}
    p = load(d, "pipeline")
    if p:
        r, n = pipeline_rows(p)
        rows += r
        notes += n
    else:
        missing.append("pipeline (1, 2, 6)")
    g = load(d, "gateway")
    if g:
        rows += gateway_rows(g)
    else:
        missing.append(f"gateway (3): {status.get('gateway', 'no result')}")
    rc = load(d, "reconcile")
    if rc:
        rows += reconcile_rows(rc)
    else:
        missing.append("reconcile (4)")
    c = load(d, "cold")
    if c:
        r, n = cold_rows(c)
        rows += r
        notes += n
    else:
        missing.append("cold path (5)")
    rows.sort(key=lambda row: row[0][:2])
    lines = [
        "# Benchmark results",
        "",
        "Regenerated by `bench/run` (see bench/README.md); do not edit by hand.",
        "",
        *machine(d),
        f"- runner wall time: {num(args.elapsed, '{:.0f}')} s",
        "",
        "| figure | value | floor (same run) / ratio | target | verdict |",
        "|---|---|---|---|---|",
        *(f"| {a} | {b} | {c_} | {t} | {v} |" for a, b, c_, t, v in rows),
        "",
    ]
    if missing:
        lines += ["Not measured in this run: " + "; ".join(missing), ""]
    if notes:
        lines += ["## Details", "", *notes, ""]
    lines += [
        "## How the figures are made",
        "",
        "1/2/6: `bench/pipeline_bench.py`; 3: `bench/gateway_bench.py`; 4: "
        "`bench/reconcile_bench.py`; 5: `bench/cold_bench.py`. Each script's docstring says "
        "what it measures and against which floor.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
