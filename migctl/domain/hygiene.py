"""Runner hygiene as a plan: which of GitHub's runners to delete and which VMs to flag. Pure.

Ownership is by name: a VM's runner is named after the VM, and the pool names its VMs
`<prefix><token>` (`<mig or pool>-<hex>`), so a runner is the pool's when its name is the
prefix plus one token with no further dash (another pool `<prefix>gpu` names its runners
`<prefix>gpu-<hex>`) and its labels cover the pool's. Nothing else is ever touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from migctl.domain.model import Lifecycle, Vm, VmState, covers

# A VM in one of these states runs no runner process: a runner named after it is left over.
NOT_RUNNING = frozenset({VmState.STOPPED, VmState.SUSPENDED, VmState.DELETING})
# ...and in these a runner is not expected to appear (flags are for VMs that should have one).
GOING_DOWN = NOT_RUNNING | {VmState.STOPPING}

_TOKEN = re.compile(r"[a-z0-9]+")  # GCE names: lowercase letters, digits, dashes


class Runner(Protocol):
    """What the plan reads of a runner GitHub lists (`migctl.ports.RunnerInfo` fits)."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def busy(self) -> bool: ...

    @property
    def labels(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class DeleteRunner:
    """An offline runner of the pool that no live VM owns."""

    runner_id: int
    name: str
    reason: str


@dataclass(frozen=True)
class NeverAppeared:
    """A VM whose registration was acked long ago, with no online runner in GitHub's list."""

    vm_id: str
    reserved_job: str
    reserved_at: float  # when the registration was sent: one flag per reservation
    reason: str


@dataclass(frozen=True)
class Stray:
    """An online runner of the pool with no live VM: something runs it; left alone, reported."""

    runner_id: int
    name: str
    reason: str


@dataclass(frozen=True)
class HygienePlan:
    delete: tuple[DeleteRunner, ...] = ()
    never_appeared: tuple[NeverAppeared, ...] = ()
    strays: tuple[Stray, ...] = ()
    kept_busy: tuple[str, ...] = ()  # names of the pool's busy runners with no live VM
    ours: int = 0  # runners of the pool in the listing


def pool_prefix(mig_name: str, pool_id: str) -> str:
    """The prefix of the pool's VM ids, hence of its runners' names."""
    return f"{mig_name or pool_id}-"


def is_ours(runner: Runner, prefix: str, pool_labels: Sequence[str]) -> bool:
    """Named `<prefix><token>` and labelled with (at least) the pool's labels."""
    if not runner.name.startswith(prefix):
        return False
    token = runner.name[len(prefix) :]
    return bool(_TOKEN.fullmatch(token)) and covers(runner.labels, pool_labels)


def hygiene_plan(
    runners: Sequence[Runner],
    vms: Sequence[Vm],
    now: float,
    *,
    prefix: str,
    pool_labels: Sequence[str],
    grace: float,
    complete: bool = True,
) -> HygienePlan:
    """What to do about the pool's runners, given every runner listed and every VM record.

    - Only the pool's runners count (`is_ours`); a busy one is never deleted.
    - An offline runner whose VM has no record, or is STOPPED, SUSPENDED or DELETING, is
      deleted. A live VM (any other state, STOPPING included) owns its runner.
    - An online runner with no live VM is a stray: reported, not deleted.
    - A VM reserved for a job whose registration was acked (`cmd_id` cleared) more than
      `grace` seconds ago, still holding no job and not going down, with no online runner
      of its name, is flagged. Only when the listing is `complete` (every scope listed):
      a scope that failed to list would make every VM look runnerless.
    """
    by_id = {vm.id: vm for vm in vms}
    delete: list[DeleteRunner] = []
    strays: list[Stray] = []
    kept_busy: list[str] = []
    online: set[str] = set()
    listed: set[str] = set()
    ours = 0
    for runner in runners:
        if not is_ours(runner, prefix, pool_labels):
            continue
        ours += 1
        listed.add(runner.name)
        is_online = runner.status.lower() == "online"
        if is_online or runner.busy:
            online.add(runner.name)
        vm = by_id.get(runner.name)
        if vm is not None and vm.state not in NOT_RUNNING:
            continue  # owned
        why = "no VM record" if vm is None else f"its VM is {vm.state.value}"
        if runner.busy:
            kept_busy.append(runner.name)
        elif is_online:
            strays.append(Stray(runner.id, runner.name, f"online, {why}"))
        else:
            delete.append(DeleteRunner(runner.id, runner.name, f"offline, {why}"))
    flags: list[NeverAppeared] = []
    if complete:
        for vm in vms:
            if vm.id in online or not _expects_runner(vm, now, grace):
                continue
            seen = "listed but never online" if vm.id in listed else "not in GitHub's list"
            waited = now - vm.reserved_at
            reason = f"runner {seen} {waited:.0f}s after the registration was sent"
            flags.append(NeverAppeared(vm.id, vm.reserved_job, vm.reserved_at, reason))
    return HygienePlan(tuple(delete), tuple(flags), tuple(strays), tuple(kept_busy), ours)


def _expects_runner(vm: Vm, now: float, grace: float) -> bool:
    acked = bool(vm.reserved_job) and not vm.cmd_id and not vm.job_id and vm.reserved_at > 0
    if not acked or now - vm.reserved_at <= grace:
        return False
    return vm.state not in GOING_DOWN and vm.lifecycle is not Lifecycle.DRAINING
