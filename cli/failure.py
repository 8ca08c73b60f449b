"""How a typed error reaches the user: one line with the fix, and its sysexits code. Shared by
the typer app and the agent's lean entry point (which must not load typer)."""

from __future__ import annotations

import sys
from typing import NoReturn

from meshnode.errors import MeshnodeError


def fail(err: MeshnodeError) -> NoReturn:
    msg = f"meshnode: error: {err.message}"
    if err.hint:
        msg += f" (hint: {err.hint})"
    print(msg, file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
