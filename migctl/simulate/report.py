"""From runs to numbers: wait percentiles, VM-hours, API calls; as a table for people and
as JSON (sorted keys, rounded floats: the same inputs give the same bytes)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from migctl.simulate.engine import Run
from migctl.simulate.oracle import Oracle
from migctl.simulate.policy import Timings, format_duration
from migctl.simulate.trace import Trace

CALL_KINDS = (
    "gce.create",
    "gce.start",
    "gce.resume",
    "gce.stop",
    "gce.suspend",
    "gce.delete",
    "github.registration_token",
    "github.remove_runner",
)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest rank: the smallest value with at least pct% of the values at or below it."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def wait_stats(waits: Sequence[float]) -> dict[str, float]:
    ordered = sorted(waits)
    return {
        "p50": _r(percentile(ordered, 50)),
        "p95": _r(percentile(ordered, 95)),
        "p99": _r(percentile(ordered, 99)),
        "max": _r(ordered[-1] if ordered else 0.0),
        "mean": _r(sum(ordered) / len(ordered) if ordered else 0.0),
    }


def _r(x: float, digits: int = 3) -> float:
    value = round(x, digits)
    return value + 0.0  # no -0.0


def policy_report(run: Run) -> dict[str, Any]:
    hours = {phase: _r(seconds / 3600.0) for phase, seconds in run.vm_seconds.items()}
    return {
        "name": run.policy.name,
        "policy": run.policy.as_dict(),
        "wait_s": wait_stats([w for _, w in run.waits]),
        "jobs_started": len(run.waits),
        "unfinished": run.unfinished,
        "vm_hours": hours,
        "api_calls": {kind: run.calls.get(kind, 0) for kind in CALL_KINDS},
        "api_calls_total": sum(run.calls.values()),
        "vm_actions": dict(sorted(run.vm_actions.items())),
        "decisions": dict(sorted(run.decisions.items())),
        "github": dict(sorted(run.events.items())),
        "peak_vms": run.peak_vms,
        "peak_running": max((row[1] for row in run.timeline), default=0),
        "end_s": _r(run.end),
    }


def build(
    trace: Trace,
    left_out: int,
    labels: Sequence[str],
    timings: Timings,
    bound: Oracle,
    runs: Sequence[Run],
) -> dict[str, Any]:
    observed = [j.observed_wait for j in trace.jobs if j.observed_wait is not None]
    report: dict[str, Any] = {
        "trace": {
            "name": trace.name,
            "jobs": len(trace.jobs),
            "left_out_not_for_pool": left_out,
            "horizon_s": _r(trace.horizon),
            "meta": dict(sorted(trace.meta.items())),
        },
        "pool_labels": list(labels),
        "timings_s": timings.as_dict(),
        "oracle": {
            "wait_s": wait_stats([w for _, w in bound.waits]),
            "vm_hours_running_min": _r(bound.running_vm_seconds / 3600.0),
        },
        "policies": [policy_report(run) for run in runs],
    }
    if observed:
        report["observed"] = {"wait_s": wait_stats(observed), "jobs": len(observed)}
    return report


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def table(report: dict[str, Any]) -> str:
    """The side-by-side comparison people read."""
    head = (
        f"{'policy':<16}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'p95 gap':>10}"
        f"{'VM-h run':>10}{'VM-h stop':>10}{'VM-h susp':>10}{'API calls':>10}{'peak VMs':>9}"
    )
    oracle = report["oracle"]
    bound_p95 = oracle["wait_s"]["p95"]
    lines = [head, "-" * len(head)]
    ow = oracle["wait_s"]
    lines.append(
        f"{'oracle (bound)':<16}{_secs(ow['p50']):>8}{_secs(ow['p95']):>8}{_secs(ow['max']):>8}"
        f"{'0':>10}{oracle['vm_hours_running_min']:>10.1f}{'-':>10}{'-':>10}{'-':>10}{'-':>9}"
    )
    if "observed" in report:
        o = report["observed"]["wait_s"]
        lines.append(
            f"{'observed (trace)':<16}{_secs(o['p50']):>8}{_secs(o['p95']):>8}"
            f"{_secs(o['max']):>8}{'+' + _secs(o['p95'] - bound_p95):>10}"
            + "".join(f"{'-':>10}" for _ in range(4))
            + f"{'-':>9}"
        )
    for p in report["policies"]:
        w, h = p["wait_s"], p["vm_hours"]
        lines.append(
            f"{p['name'][:15]:<16}{_secs(w['p50']):>8}{_secs(w['p95']):>8}{_secs(w['max']):>8}"
            f"{'+' + _secs(w['p95'] - bound_p95):>10}{h['running']:>10.1f}{h['stopped']:>10.1f}"
            f"{h['suspended']:>10.1f}{p['api_calls_total']:>10}{p['peak_vms']:>9}"
        )
    lines.append("")
    kinds = [k for k in CALL_KINDS if any(p["api_calls"][k] for p in report["policies"])]
    short = {k: k.split(".", 1)[1].replace("registration_token", "reg_token") for k in kinds}
    lines.append(f"{'API calls':<16}" + "".join(f"{short[k]:>11}" for k in kinds))
    for p in report["policies"]:
        lines.append(f"{p['name'][:15]:<16}" + "".join(f"{p['api_calls'][k]:>11}" for k in kinds))
    lines.append("")
    for p in report["policies"]:
        lines.append(f"{p['name']}: {_describe(p['policy'])}")
        if p["unfinished"]:
            lines.append(f"  ! {p['unfinished']} job(s) never ran under this policy")
    return "\n".join(lines)


def _describe(policy: dict[str, Any]) -> str:
    text = (
        f"min_ready={policy['min_ready_vms']} idle={format_duration(policy['idle_timeout'])} "
        f"action={policy['idle_action']} max_vms={policy['max_vms']} "
        f"rate={policy['max_scale_up_per_minute']}/min "
        f"inflight={policy['max_concurrent_assignments']}"
    )
    if policy["warm"]:
        text += " warm=" + "+".join(policy["warm"])
    return text
