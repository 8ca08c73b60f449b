"""`meshnode explain PID HOST:PORT [--method M --path P]`: what would happen to a connection from
that process to that address right now, and to one request on it; `meshnode explain PID
http://HOST/PATH [-X M] [-H 'NAME: VALUE']`: to that HTTP request, with the Route rule that
takes it, its split and backend (the agent decides; this renders it)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from meshnode.cli.options import Instance, OutputOpt, client
from meshnode.cli.output import Output, emit_json, table


def explain_text(r: dict[str, Any]) -> str:
    out = [r["verdict"], ""]
    out += [f"  {i}. {step}" for i, step in enumerate(r["steps"], 1)]
    split = (r.get("request") or {}).get("split") or []
    if len(split) > 1:
        rows = [[b["text"], str(b["weight"]), f"{b['percent']:g}%",
                 str(b.get("endpoints", "-")), b.get("reason") or ""] for b in split]
        out += ["", table(rows, ["BACKEND", "WEIGHT", "SHARE", "ENDPOINTS", "NOTE"])]
    rows = []
    for c in r["candidates"]:
        health = c["health"]
        state = "ok" if c["healthy"] else "DOWN"
        if health.get("reason"):
            state += f" ({health['reason']})"
        ejected = f"{c['ejected_for']:.0f}s" if c["ejected_for"] else "-"
        labels = ",".join(f"{k}={v}" for k, v in sorted((c.get("labels") or {}).items()))
        rows.append([c["addr"], c.get("node") or "-", c.get("zone") or "-", labels or "-",
                     state, ejected, "yes" if c["in_rotation"] else "no"])
    if rows:
        out += ["", table(rows, ["ENDPOINT", "NODE", "ZONE", "LABELS", "HEALTH", "EJECTED",
                                 "IN_ROTATION"])]
    return "\n".join(out)


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(pid: Annotated[int, typer.Argument(help="the process that would connect")],
                dest: Annotated[str, typer.Argument(
                    help="HOST:PORT, HOST an IPv4 address or SERVICE.mesh; or an HTTP "
                         "request's URL: http://SERVICE.mesh/PATH, http://VIP:PORT/PATH, "
                         "or http://HOST/PATH for a host a Route serves at the gateway")],
                method: Annotated[str | None, typer.Option(
                    "--method", "-X",
                    help="also explain a request with this HTTP method (default GET when "
                         "--path or a URL is given)")] = None,
                path: Annotated[str | None, typer.Option(
                    help="...and this path, e.g. /api/users or, for gRPC, "
                         "/package.Service/Method (default /; a URL has its own)")] = None,
                header: Annotated[list[str] | None, typer.Option(
                    "--header", "-H",
                    help="a request header of the URL's request, 'NAME: VALUE' "
                         "(repeatable)")] = None,
                instance: Instance = "default", output: OutputOpt = Output.table) -> None:
        """What would happen to a connection from PID to DEST right now: captured or not,
        which service and endpoints, how the balancer picks, fail-open or fail-closed, and
        whether authorization lets it (or, with --method/--path, that request) through.
        With a URL: which Route rule takes the request and why, the split, the backend
        (service and subset) and its endpoints, faults, mirror, rate limit, timeouts and
        retries.

        Examples: meshnode explain 4242 web.mesh:80 --method DELETE --path /api/users/7
                  meshnode explain 4242 http://reviews.mesh/api -H 'x-canary: 1'"""
        request: dict[str, Any] = {k: v for k, v in (("method", method), ("path", path))
                                   if v is not None}
        if header:
            request["headers"] = list(header)
        r = client(instance).call("explain", pid=pid, dest=dest, **request)
        if output is Output.json:
            emit_json(r)
        else:
            typer.echo(explain_text(r))
