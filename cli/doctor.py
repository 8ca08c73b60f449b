"""`meshnode doctor`: whether this host can run the agent, and the fix for each check that
failed. Exits 0 when it can (warnings allowed), 69 (EX_UNAVAILABLE) when it cannot.

Examples:
  sudo meshnode doctor
  sudo meshnode doctor -o json
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import typer
from meshnode.cli.options import Instance, OutputOpt
from meshnode.cli.output import Output, emit_json

from meshnode.errors import EX_UNAVAILABLE

if TYPE_CHECKING:
    from meshnode.diagnose.doctor import Check

# meshnode.diagnose.doctor (with the BPF probe and both capture backends) is imported where it
# is used: it is a third of every other command's start-up time otherwise.

_LABELS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}  # capitals: failures stand out


def doctor_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"  {_LABELS[c.status]:<4}  {c.name:<{width}}  {c.detail}"
        if c.fix and not c.ok:
            line += f"  -> fix: {c.fix}"
        lines.append(line)
    lines.append("")
    lines.append(verdict(checks))
    return "\n".join(lines)


def verdict(checks: list[Check]) -> str:
    from meshnode.diagnose.doctor import can_run, capture_backend

    failed = sum(1 for c in checks if c.status == "fail")
    if can_run(checks):
        also = f"; {failed} optional check{'s' if failed != 1 else ''} failed" if failed else ""
        return f"the agent can run (capture: {capture_backend(checks)}){also}"
    return f"the agent cannot run: {failed} problem{'s' if failed != 1 else ''}"


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(instance: Instance = "default", output: OutputOpt = Output.table) -> None:
        """Check whether this host can run the agent (root, cgroup v2, a capture backend, free
        ports) and print the exact fix for what cannot."""
        from meshnode.diagnose.doctor import can_run, capture_backend, run_checks

        checks = run_checks(instance)
        runnable = can_run(checks)
        if output is Output.json:
            emit_json({"can_run": runnable, "capture": capture_backend(checks),
                       "checks": [asdict(c) for c in checks]})
        else:
            typer.echo(doctor_text(checks))
        if not runnable:
            raise typer.Exit(EX_UNAVAILABLE)
