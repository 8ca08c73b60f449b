"""`meshnode explain PID HOST:PORT [--method M --path P]`: what would happen to a connection from
that process to that address right now, and to one request on it (the agent decides; this
renders it)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from meshnode.cli.options import Instance, OutputOpt, client
from meshnode.cli.output import Output, emit_json, table


def explain_text(r: dict[str, Any]) -> str:
    out = [r["verdict"], ""]
    out += [f"  {i}. {step}" for i, step in enumerate(r["steps"], 1)]
    rows = []
    for c in r["candidates"]:
        health = c["health"]
        state = "ok" if c["healthy"] else "DOWN"
        if health.get("reason"):
            state += f" ({health['reason']})"
        ejected = f"{c['ejected_for']:.0f}s" if c["ejected_for"] else "-"
        rows.append([c["addr"], c.get("node") or "-", c.get("zone") or "-", state, ejected,
                     "yes" if c["in_rotation"] else "no"])
    if rows:
        out += ["", table(rows, ["ENDPOINT", "NODE", "ZONE", "HEALTH", "EJECTED", "IN_ROTATION"])]
    return "\n".join(out)


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(pid: Annotated[int, typer.Argument(help="the process that would connect")],
                dest: Annotated[str, typer.Argument(
                    help="HOST:PORT, HOST an IPv4 address or SERVICE.mesh")],
                method: Annotated[str | None, typer.Option(
                    help="also explain a request with this HTTP method (default GET when "
                         "--path is given)")] = None,
                path: Annotated[str | None, typer.Option(
                    help="...and this path, e.g. /api/users or, for gRPC, "
                         "/package.Service/Method (default /)")] = None,
                instance: Instance = "default", output: OutputOpt = Output.table) -> None:
        """What would happen to a connection from PID to DEST right now: captured or not,
        which service and endpoints, how the balancer picks, fail-open or fail-closed, and
        whether authorization lets it (or, with --method/--path, that request) through.

        Example: meshnode explain 4242 web.mesh:80 --method DELETE --path /api/users/7"""
        request = {k: v for k, v in (("method", method), ("path", path)) if v is not None}
        r = client(instance).call("explain", pid=pid, dest=dest, **request)
        if output is Output.json:
            emit_json(r)
        else:
            typer.echo(explain_text(r))
