"""The VMs' side of the local world: one simulated agent per RUNNING instance of the SimMig.

A VM that reaches RUNNING boots its agent; a VM that stops, suspends, is deleted or
vanishes loses it abruptly (its stream just breaks, as when a VM goes away). Also runs
as a process: `python -m migctl.sim.fleet --redis URL --pool ID --org ORG --gateway
HOST:PORT --github URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from migctl.domain.model import InfraStatus
from migctl.sim.agent import AgentTls, RunnerClient, SimAgent, default_executor
from migctl.sim.mig import SimMig

log = logging.getLogger(__name__)


def _sim_runner_client(github_url: str) -> RunnerClient:
    from migctl.sim.runner_client import SimRunnerClient

    return SimRunnerClient(github_url)


class Fleet:
    """Boots and kills `SimAgent`s to follow what the SimMig says is RUNNING."""

    def __init__(
        self,
        mig: SimMig,
        pool_id: str,
        org_id: str,
        gateway_target: str,
        github_url: str,
        heartbeat_interval: float = 2.0,
        poll_interval: float = 0.5,
        tls: AgentTls | None = None,
        token: str = "",
        capabilities: Iterable[str] = (),
        runner_client_factory: Callable[[str], RunnerClient] = _sim_runner_client,
        executor: ThreadPoolExecutor | None = None,
        agent_options: dict[str, Any] | None = None,
    ) -> None:
        self.mig = mig
        self.pool_id, self.org_id = pool_id, org_id
        self.gateway_target, self.github_url = gateway_target, github_url
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = poll_interval
        self.capabilities = tuple(capabilities)
        self._tls, self._token = tls, token
        # One client for every agent: it keeps one HTTP session per thread, not per agent.
        self.github = runner_client_factory(github_url)
        self._executor = executor or default_executor()
        self._agent_options = agent_options or {}
        self.agents: dict[str, SimAgent] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the SimMig every `poll_interval` until `stop` is set; then kill every agent."""
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    vms = await loop.run_in_executor(self._executor, self.mig.list)
                except Exception as exc:  # Redis blip: keep the agents, look again later
                    log.warning("fleet %s: cannot list the sim MIG: %s", self.pool_id, exc)
                else:
                    self.reconcile({vm.name for vm in vms if vm.status == InfraStatus.RUNNING})
                try:
                    await asyncio.wait_for(stop.wait(), self.poll_interval)
                except TimeoutError:
                    pass
        finally:
            tasks = list(self._tasks.values())
            self.reconcile(set())
            await asyncio.gather(*tasks, return_exceptions=True)
            close = getattr(self.github, "close", None)
            if close is not None:
                close()

    def reconcile(self, running: set[str]) -> None:
        """Boot an agent on each running VM without one; kill agents of VMs not running."""
        for name in list(self.agents):
            if name not in running:
                # The VM went away: no shutdown message, the stream just breaks.
                self._tasks.pop(name).cancel()
                del self.agents[name]
        for name in sorted(running - self.agents.keys()):
            agent = SimAgent(
                name,
                self.pool_id,
                self.org_id,
                self.gateway_target,
                self.github,
                heartbeat_interval=self.heartbeat_interval,
                capabilities=self.capabilities,
                tls=self._tls,
                token=self._token,
                executor=self._executor,
                **self._agent_options,
            )
            self.agents[name] = agent
            # An agent that ended (shutdown, rejected) stays listed until its VM stops,
            # so it is not booted again on a VM that is still up.
            self._tasks[name] = asyncio.create_task(agent.run(), name=f"sim-agent-{name}")


def main(argv: list[str] | None = None) -> None:
    """Run a fleet as its own process until SIGINT/SIGTERM."""
    import redis

    parser = argparse.ArgumentParser(prog="python -m migctl.sim.fleet", description=__doc__)
    parser.add_argument("--redis", required=True, help="Redis URL holding the sim MIG")
    parser.add_argument("--pool", required=True, help="pool id")
    parser.add_argument("--org", required=True, help="GitHub org the agents report")
    parser.add_argument("--gateway", required=True, help="gateway HOST:PORT")
    parser.add_argument("--github", required=True, help="fake GitHub base URL")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat seconds")
    parser.add_argument("--poll", type=float, default=0.5, help="SimMig poll seconds")
    parser.add_argument("--capability", action="append", default=[], help="e.g. jit")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to trust the gateway")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    parser.add_argument("--tls-key", help="client key (PEM) for mTLS")
    parser.add_argument("--threads", type=int, default=1024, help="GitHub client threads")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")

    tls = None
    if args.tls_ca or args.tls_cert:
        tls = AgentTls.from_files(args.tls_ca, args.tls_cert, args.tls_key)
    # The token is a secret: from the environment, never the command line (ps shows it).
    token = os.environ.get("MIGCTL_AGENT_TOKEN", "")
    fleet = Fleet(
        SimMig(redis.Redis.from_url(args.redis), args.pool),
        args.pool,
        args.org,
        args.gateway,
        args.github,
        heartbeat_interval=args.heartbeat,
        poll_interval=args.poll,
        tls=tls,
        token=token,
        capabilities=args.capability,
        executor=ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="sim-github"),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await fleet.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
