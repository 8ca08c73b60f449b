"""The agent's own entry point: `meshnode agent` validates its options, then execs
`python -m meshnode.cli.agent_main --log-level=L <AgentConfig argv>` (same PID).
`meshnode uninstall` with no agent running execs it with `--remove` first: the agent starts
(adopting what the last one left) only to remove it all.

Why a second entry point: the agent runs for months, and the typer app (typer, click, rich)
would stay loaded in it for nothing, about 7 MB of its resident memory. This module imports
only the agent.
"""

from __future__ import annotations

import logging
import sys

from meshnode.cli.failure import fail

from meshnode.config import AgentConfig
from meshnode.errors import MeshnodeError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str]) -> None:
    level, remove = "info", False
    if argv and argv[0] == "--remove":
        remove, argv = True, argv[1:]
    if argv and argv[0].startswith("--log-level="):
        level, argv = argv[0].partition("=")[2], argv[1:]
    try:
        logging.basicConfig(level=level.upper(), stream=sys.stderr, format=LOG_FORMAT)
        from meshnode.agent.main import remove_host, run_agent

        cfg = AgentConfig.from_argv(argv)
        if remove:
            remove_host(cfg)
        else:
            run_agent(cfg)
    except MeshnodeError as err:
        fail(err)
    except ValueError as exc:  # an unknown log level
        print(f"meshnode: error: {exc}", file=sys.stderr)
        sys.exit(64)


if __name__ == "__main__":
    main(sys.argv[1:])
