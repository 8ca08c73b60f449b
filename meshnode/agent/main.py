"""The agent process's entry points (cli/agent_main.py calls them): run an agent until it is
stopped, re-executing in place after SIGHUP; remove meshnode from the host when no agent runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshnode.agent import systemd
from meshnode.agent.host_agent import HostAgent
from meshnode.config import AgentConfig
from meshnode.errors import ConflictError, MeshnodeError

log = logging.getLogger(__name__)


async def _main(cfg: AgentConfig) -> bool:
    agent = HostAgent(cfg)
    await agent.run()
    return agent.reload


def run_agent(cfg: AgentConfig) -> None:
    """Entry point for `meshnode agent`: stdlib asyncio (netlink work needs it, not uvloop).
    After SIGHUP the process re-executes itself (same PID, for systemd): the new code and the
    configuration as the command line names it now, adopting the data plane as a restart."""
    reload = False
    with contextlib.suppress(KeyboardInterrupt):
        reload = asyncio.run(_main(cfg))
    if reload:
        systemd.reexec()


def remove_host(cfg: AgentConfig) -> None:
    """`meshnode uninstall` with no agent running: start one (it adopts what the last agent
    left) and stop it with a removal. When even that cannot start, the kernel objects the
    ledger lists and the workers in the proxy cgroup are removed directly."""
    async def remove() -> None:
        agent = HostAgent(cfg)
        if not agent.ledger.entries():
            log.info("nothing of meshnode instance %r is installed here", cfg.instance)
            return
        try:
            await agent.start()
        except MeshnodeError as exc:
            if isinstance(exc, ConflictError):
                raise  # an agent runs after all: it must be asked, not overrun
            log.error("cannot start to remove cleanly (%s): removing what the ledger lists",
                      exc)
            agent.remove_leftovers()
            return
        await agent.stop(remove=True)

    asyncio.run(remove())
