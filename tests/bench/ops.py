"""The loop every bench load generator runs (`python -m tests.bench.client`, `.http_load`,
`.app_load`): it says it is ready, then answers one JSON command per stdin line with one JSON
line, `{"error": ...}` when the operation failed. Standard library only: it runs inside test
namespaces."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["serve"]


def serve(ops: Mapping[str, Callable[..., dict[str, Any]]]) -> None:
    """Run `{"op": NAME, ...args}` commands from stdin until EOF, with every descriptor the
    hard limit allows (a load generator holds thousands of connections)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = ops[cmd.pop("op")]
        try:
            result = op(**cmd)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
