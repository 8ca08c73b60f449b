"""Operators' read commands on live traffic: `stat`, `top` and `tap`. HTTP, HTTP/2 and gRPC
services are shown in requests (rate, success, request latency, retries), TCP ones in
connections; the agent computes every figure (success included), this only renders. When a
service's connections take the kernel path (no proxy), the TCP tables gain a PATH column and
an RTT one (the kernel's smoothed RTT; it has no connect latency, so P50..P99 show "-")."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from meshnode.cli.options import Instance, Output, OutputOpt, client, complete_service
from meshnode.cli.output import emit_json, table

Window = Annotated[float, typer.Option(help="seconds the rates and percentiles cover (≤ 600)")]
_CLEAR = "\x1b[H\x1b[2J"


def register(app: typer.Typer) -> None:
    app.command()(stat)
    app.command()(top)
    app.command()(tap)


def stat(service: Annotated[str | None, typer.Argument(
             help="one service (default: all)", autocompletion=complete_service)] = None,
         window: Window = 60.0, instance: Instance = "default",
         output: OutputOpt = Output.table) -> None:
    """Per service over a window (traffic from this host's clients). HTTP, HTTP/2 and gRPC
    services: request rate, success rate (not 5xx; gRPC: OK), request-latency percentiles and
    retries per second (one service: per route too). TCP services: connection rate, active
    connections, throughput, error rate and connect-latency percentiles."""
    r = client(instance).call("stat", service=service, window=window)
    if output is Output.json:
        emit_json(r)
        return
    typer.echo(stat_text(r))


def stat_text(r: dict[str, Any]) -> str:
    head: str = f"window {r['window']:g}s" + ("" if r["span"] >= r["window"] - 1
                                         else f" (only {r['span']:.0f}s of data so far)")
    l7 = [s for s in r["services"] if s.get("requests") is not None]
    l4 = [s for s in r["services"] if s.get("requests") is None]
    tables: list[str] = []
    if l7:
        rows = [[s["service"], f"{s['vip']}:{s['port'] or '*'}",
                 f"{s['healthy']}/{s['endpoints']}", *_request_cells(s["requests"]),
                 str(s["active"])] for s in l7]
        tables.append(table(rows, ["SERVICE", "VIP", "HEALTHY", "RPS", "SUCCESS", "P50", "P95",
                                   "P99", "RETRY/S", "ACTIVE"]))
    if l4:
        rows = [[s["service"], f"{s['vip']}:{s['port'] or '*'}",
                 f"{s['healthy']}/{s['endpoints']}", f"{s['rate']:.1f}", str(s["active"]),
                 _bytes_rate(s), _percent(s), _ms(s["p50_ms"]), _ms(s["p95_ms"]),
                 _ms(s["p99_ms"])] for s in l4]
        tables.append(_with_path(l4, rows, ["SERVICE", "VIP", "HEALTHY", "CONN/S", "ACTIVE",
                                            "THROUGHPUT", "ERRORS", "P50", "P95", "P99"]))
    if l7 and l4:
        head += "; latency: per request (RPS rows), to connect (CONN/S rows)"
    if len(l7) == 1 and len(r["services"]) == 1 and l7[0]["routes"]:
        routes = [[x["route"], f"{x['rate']:.1f}", _success(x["success_rate"]),
                   f"{x['retry_rate']:.1f}", str(x["budget_exhausted"]), _failures(x)]
                  for x in l7[0]["routes"]]
        tables.append(table(routes, ["ROUTE", "RPS", "SUCCESS", "RETRY/S", "BUDGET_OUT",
                                     "FAILURES"]))
    return "\n\n".join([head + "\n" + tables[0], *tables[1:]]) if tables else head


def _request_cells(q: dict[str, Any]) -> list[str]:
    """RPS, SUCCESS, P50, P95, P99 and RETRY/S of a request figures object."""
    return [f"{q['rate']:.1f}", _success(q["success_rate"]), _ms(q["p50_ms"]), _ms(q["p95_ms"]),
            _ms(q["p99_ms"]), f"{q['retry_rate']:.1f}"]


def _success(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _failures(q: dict[str, Any]) -> str:
    """Requests that got no answer from an endpoint, by reason: "timeout 3, reset 1"."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(q["failures"].items())) or "-"


def top(window: Window = 10.0,
        limit: Annotated[int, typer.Option(help="pairs shown")] = 20,
        interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
        iterations: Annotated[int, typer.Option(help="refreshes before exiting (0: until "
                                                     "Ctrl-C)")] = 0,
        instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """A live view of the busiest source → destination pairs: HTTP and gRPC ones by requests
    (rate, success, latency, retries), TCP ones by connections (JSON: one line per refresh)."""
    agent = client(instance)
    n = 0
    while True:
        r = agent.call("top", window=window, limit=limit)
        if output is Output.json:
            typer.echo(json.dumps(r, sort_keys=True))
        else:
            text = top_text(r)
            typer.echo((_CLEAR if sys.stdout.isatty() else "") + text)
        n += 1
        if iterations and n >= iterations:
            return
        time.sleep(interval)


def top_text(r: dict[str, Any]) -> str:
    head: str = f"busiest pairs over {r['window']:g}s, {time.strftime('%H:%M:%S')}"
    l7 = [p for p in r["pairs"] if p.get("requests") is not None]
    l4 = [p for p in r["pairs"] if p.get("requests") is None]
    if not l7 and not l4:
        return head + "\n(no traffic)"
    tables: list[str] = []
    if l7:
        rows = [[p["src"], p["dst"], *_request_cells(p["requests"]), str(p["active"])]
                for p in l7]
        tables.append(table(rows, ["SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50", "P95",
                                   "P99", "RETRY/S", "ACTIVE"]))
    if l4:
        rows = [[p["src"], p["dst"], f"{p['rate']:.1f}", str(p["active"]), _bytes_rate(p),
                 _percent(p), _ms(p["p50_ms"]), _ms(p["p99_ms"])] for p in l4]
        tables.append(_with_path(l4, rows, ["SOURCE", "DESTINATION", "CONN/S", "ACTIVE",
                                            "THROUGHPUT", "ERRORS", "P50", "P99"]))
    return head + "\n" + "\n\n".join(tables)


def tap(service: Annotated[str, typer.Argument(
            help="connections and requests from or to this service (* for all)",
            autocompletion=complete_service)],
        to: Annotated[str | None, typer.Option("--to", help="only to this service")] = None,
        from_: Annotated[str | None, typer.Option("--from", help="only from this service")] =
            None,
        failed: Annotated[bool, typer.Option(
            help="only connections and requests that failed (a request: 5xx, a gRPC status "
                 "other than OK, or no answer)")] = False,
        max_events: Annotated[int, typer.Option("--max", help="stop after N events (0: no "
                                                              "limit)")] = 0,
        duration: Annotated[float, typer.Option(help="stop after this many seconds (0: until "
                                                     "Ctrl-C)")] = 0.0,
        instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """A live stream of a service's connection events (open and close) and, on HTTP, HTTP/2
    and gRPC ports, of its requests as they finish (method, path, status, duration, endpoint
    and retries)."""
    stream = client(instance).stream(
        "tap", deadline=time.monotonic() + duration if duration else None, service=service,
        src=from_, dst=to, failed_only=failed)
    try:
        for n, event in enumerate(stream, 1):
            typer.echo(json.dumps(event, sort_keys=True) if output is Output.json
                       else tap_line(event))
            if n == max_events:
                break
    finally:
        stream.close()


def tap_line(e: dict[str, Any]) -> str:
    if e.get("event") == "missed":
        return f"... {e['count']} events missed (this terminal fell behind)"
    if e.get("event") == "request":
        return request_line(e)
    src = e["src"] + (f"[{e['pid']}]" if e.get("pid") else "")
    dst = e.get("dst") or "passthrough"
    line = (f"{e['start'][11:23]} {e['event']:<5} {src} -> {dst} {e.get('orig_dst')}"
            f" via {e.get('endpoint') or '-'}")
    if e.get("connect_ms") is not None:
        line += f" connect {e['connect_ms']:.2f}ms"
    if e["event"] == "close":
        line += (f" {e['outcome']} {e['duration_ms']:.1f}ms up {e['bytes_up']}B"
                 f" down {e['bytes_down']}B")
    return line


def request_line(e: dict[str, Any]) -> str:
    """A request tap event: time, who called whom, method, path, status (the gRPC status name
    for gRPC calls, "-" without an answer), duration, endpoint and retries."""
    status = str(e.get("status_class") or "-") if e.get("grpc_status") is not None \
        else str(e.get("status") or "-")
    line = (f"{e['start'][11:23]} {'req':<5} {e['src']} -> {e['dst']} {e.get('method') or '-'}"
            f" {e.get('path') or '-'} {status} {e['duration_ms']:.2f}ms"
            f" via {e.get('endpoint') or '-'}")
    if e.get("retries"):
        line += f" retries {e['retries']}"
    if e.get("outcome") not in (None, "ok"):
        line += f" {e['outcome']}"
    return line


def _with_path(items: list[dict[str, Any]], rows: list[list[str]], head: list[str]) -> str:
    """A TCP table; with PATH and RTT columns once any row took the kernel path."""
    if any("kernel" in str(i.get("path", "")) for i in items):
        rows = [[*row, str(i.get("path") or "proxy"), _ms(i.get("rtt_ms"))]
                for i, row in zip(items, rows, strict=True)]
        head = [*head, "PATH", "RTT"]
    text: str = table(rows, head)
    return text


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}ms"


def _percent(r: dict[str, Any]) -> str:
    return f"{r['error_rate'] * 100:.1f}%"


def _bytes_rate(r: dict[str, Any]) -> str:
    v = float(r["bytes_up_rate"] + r["bytes_down_rate"])
    for unit in ("B/s", "KB/s", "MB/s"):
        if v < 1000:
            return f"{v:.0f}{unit}" if unit == "B/s" else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.1f}GB/s"
