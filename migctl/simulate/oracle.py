"""The best any policy could do with a trace: a lower bound to measure policies against.

Definition (perfect foresight, unlimited VMs and API budget, the same timings and the
same start as every simulated policy: an empty pool at t=0):

- The first runner anywhere can be online no earlier than `create + register` (a VM
  created at t=0, then its runner registered). From then on, foresight can have an idle
  registered runner waiting for every job the moment it arrives. GitHub still takes
  `pickup` to hand a queued job to an idle runner. So job j, arriving at a_j, waits at
  least

      w*_j = max(0, create + register - a_j) + pickup

  and every policy's wait for j is >= w*_j (the simulation never starts a job sooner).
  The bound holds job by job, so every order statistic (p50, p95, max) of a policy's
  waits is >= the oracle's.
- Running VM-hours: every job needs a VM running while its ephemeral runner registers
  and while it runs, on disjoint stretches of VM time, and the first VM is billed from
  its create call until it is ready. So running VM-hours >= (create + sum_j (register
  + d_j)) / 3600. Stopped/suspended disk hours and API calls have no useful bound (0).

It ignores max_vms and max_scale_up_per_minute on purpose: it bounds every policy,
whatever its limits. A policy at the oracle cannot do better on that trace. With
timing jitter, each step is taken at its shortest (1 - jitter) x its nominal time.
"""

from __future__ import annotations

from dataclasses import dataclass

from migctl.simulate.policy import Timings
from migctl.simulate.trace import Trace


@dataclass(frozen=True)
class Oracle:
    waits: list[tuple[float, float]]  # (arrival, least possible wait), arrival order
    running_vm_seconds: float


def oracle(trace: Trace, timings: Timings) -> Oracle:
    create, register, pickup = (timings.least(k) for k in ("create", "register", "pickup"))
    waits = sorted(
        (job.arrival, max(0.0, create + register - job.arrival) + pickup) for job in trace.jobs
    )
    busy = create + sum(register + job.duration for job in trace.jobs)
    return Oracle(waits, busy)
