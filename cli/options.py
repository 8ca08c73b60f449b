"""Options and helpers every read command shares: which agent, which output, the client."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from meshnode.cli.output import Output

from meshnode.agent.client import AgentClient
from meshnode.config import control_socket_path, instance_name

__all__ = ["Instance", "Output", "OutputOpt", "client", "complete_service"]

Instance = Annotated[str, typer.Option("--instance", envvar="MESHNODE_INSTANCE",
                                       help="Which agent (several can run side by side).")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json")]


def client(instance: str, timeout: float = 30.0) -> AgentClient:
    return AgentClient(control_socket_path(instance_name(instance)), timeout)


def complete_service(incomplete: str) -> list[str]:
    """Shell completion of service names, from the running agent (none when it is down)."""
    try:
        status = client(os.environ.get("MESHNODE_INSTANCE", "default"), 2.0).call("status")
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [s["name"] for s in status["services"] if s["name"].startswith(incomplete)]
