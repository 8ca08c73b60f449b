"""Rendering for read commands: human tables by default, `--output json` on each."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import typer


class Output(StrEnum):
    table = "table"
    json = "json"


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cols]
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def status_text(s: dict[str, Any]) -> str:
    cap = s["capture"]
    alive = sum(1 for w in s["workers"] if w["alive"])
    reg = s.get("registry", {})
    out = [
        f"agent     instance {s['instance']}, node {s.get('node', '-')}, pid {s['pid']}, "
        f"{'ready' if s['ready'] else 'NOT READY (capture passes through)'}, "
        f"started in {s['ready_after_s']}s",
        f"capture   {cap['reason']}",
        f"workers   {alive}/{len(s['workers'])} alive"
        + "".join(f", #{w['id']} pid {w['pid']}" + ("" if w["alive"] else " DOWN")
                  + (" adopted" if w.get("adopted") else "")
                  + (" draining (replaced)" if w.get("retiring") else "")
                  for w in s["workers"]),
        f"cgroup    {s['cgroup']}",
        f"registry  {reg.get('backend', '?')}, revision {reg.get('revision', '?')}, "
        f"applied {reg.get('applied_revision', '?')}"
        + ("" if reg.get("connected", True) else f" (DISCONNECTED: {reg.get('last_error')})"),
    ]
    dns = s.get("dns")
    if dns:
        c = dns.get("counters", {})
        out.append(f"dns       {dns['address']}, *.{dns['suffix']}"
                   f"{'' if dns.get('redirecting') else ' (redirect OFF)'}: "
                   f"{c.get('answers', 0)} answered, {c.get('nxdomain', 0)} nxdomain, "
                   f"{c.get('forwarded', 0)} forwarded"
                   f" to {', '.join(dns.get('upstreams', [])) or 'no upstream'}")
    kernel = cap.get("kernel") or {}
    if kernel:
        out.append("kernel    " + ", ".join(f"{k} {v}" for k, v in sorted(kernel.items())))
    out.append("")
    rows, eps = [], []
    for svc in s["services"]:
        c = svc["counters"]
        healthy = sum(1 for e in svc["endpoints"] if e["health"]["healthy"])
        rows.append([svc["name"], svc["vip"], str(svc["port"] or "*"), svc["lb"]["algorithm"],
                     f"{healthy}/{len(svc['endpoints'])}",
                     str(c.get("connections", 0)), str(c.get("active", 0)),
                     str(c.get("bytes_up", 0)), str(c.get("bytes_down", 0)),
                     str(c.get("connect_errors", 0))])
        for e in svc["endpoints"]:
            p = e.get("proxy", {})
            ejected = p.get("ejected_for", 0)
            labels = ",".join(f"{k}={v}" for k, v in (e.get("labels") or {}).items())
            eps.append([svc["name"], e["addr"], e.get("node") or "-", str(e.get("weight", 1)),
                        labels or "-",
                        ("ok" if e["health"]["healthy"] else "DOWN")
                        + (f", ejected {ejected:.0f}s" if ejected else ""),
                        e["health"]["reason"], str(p.get("active", 0)),
                        str(p.get("connections", 0))])
    out.append(table(rows, ["SERVICE", "VIP", "PORT", "LB", "HEALTHY", "CONNS", "ACTIVE",
                            "BYTES_UP", "BYTES_DOWN", "CONN_ERRS"]) if rows
               else "no services (add one: meshnode service add NAME)")
    if eps:
        out.append("")
        out.append(table(eps, ["SERVICE", "ENDPOINT", "NODE", "WEIGHT", "LABELS", "STATE", "WHY",
                               "ACTIVE", "CONNS"]))
    out.append("")
    procs = [[str(e["pid"]), e["service"], ", ".join(e["endpoints"]) or "-"]
             for e in s["enrolled"]]
    out.append(table(procs, ["PID", "SERVICE", "LISTENING"]) if procs
               else "no enrolled processes (meshnode enroll PID --service NAME)")
    return "\n".join(out)
