"""`meshnode get routes`: the effective routing per service (each Route's rules in order,
their weighted backends and how many endpoints each subset has now; services without a Route
as "direct") and the gateway's hosts. `get` itself (cli/resources.py) hands this word over."""

from __future__ import annotations

from typing import Any

import typer
import yaml
from meshnode.cli.options import client
from meshnode.cli.output import emit_json, table

from meshnode.errors import NotFoundError

__all__ = ["WORD", "routes_text", "show_routes"]

WORD = "routes"  # `meshnode get routes` (a view, unlike the kinds, which are capitalised)


def show_routes(instance: str, output: str, service: str | None = None) -> None:
    r = client(instance).call("routes")
    if service is not None:
        r = {"services": [s for s in r["services"] if s["service"] == service],
             "hosts": [h for h in r["hosts"] if h["service"] == service]}
        if not r["services"] and not r["hosts"]:
            raise NotFoundError(f"no service named {service!r}",
                                "list them: meshnode get routes")
    if output == "json":
        emit_json(r)
    elif output == "yaml":
        typer.echo(yaml.safe_dump(r, sort_keys=False).rstrip())
    else:
        typer.echo(routes_text(r))


def _backends(rule: dict[str, Any]) -> str:
    parts = []
    for b in rule["backends"]:
        text = b["text"]
        if len(rule["backends"]) > 1:
            text += f" {b['percent']:g}%"
        count = f"{b['endpoints']}/{b['registered']} ep"
        if b["problem"]:
            count += " NONE: 503"
        parts.append(f"{text} ({count})")
    return ", ".join(parts)


def _marks(rule: dict[str, Any]) -> str:
    marks = [f"{k} {rule[k]}" for k in ("fault", "mirror") if rule[k]]
    if rule["rate_limit"]:
        marks.append(f"rateLimit {rule['rate_limit']}")
    marks += [k for k in ("timeouts", "retry") if rule[k]]
    return "; ".join(marks) or "-"


def _rows(where: str, route: str, rules: list[dict[str, Any]]) -> list[list[str]]:
    return [[where if i == 0 else "", route if i == 0 else "", f"{i + 1}. {r['name']}",
             " | ".join(r["match"]), _backends(r), _marks(r)] for i, r in enumerate(rules)]


def routes_text(r: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for s in r["services"]:
        if s["mode"] == "direct":
            rows.append([s["service"], "-", "direct", "every request", s["service"], "-"])
            continue
        rows += _rows(s["service"], s["route"], s["rules"])
        if s["tcp"]:
            first = not s["rules"]  # a Route with only a TCP split
            rows.append([s["service"] if first else "", s["route"] if first else "", "tcp",
                         "every connection", _backends({"backends": s["tcp"]}), "-"])
    head = ["SERVICE", "ROUTE", "RULE", "MATCH", "BACKENDS (ENDPOINTS HEALTHY/ALL)", "MARKS"]
    out = [table(rows, head) if rows else "no services"]
    hrows: list[list[str]] = []
    for h in r["hosts"]:
        hrows += _rows(h["host"], h["route"], h["rules"])
    if hrows:
        out += ["", table(hrows, ["GATEWAY HOST", "ROUTE", "RULE", "MATCH",
                                  "BACKENDS (ENDPOINTS HEALTHY/ALL)", "MARKS"])]
    return "\n".join(out)
