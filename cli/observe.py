"""Operators' read commands on live traffic: `stat`, `top` and `tap`."""

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
    """Per service: connection rate, active connections, throughput, error rate and
    connect-latency percentiles over a window (traffic from this host's clients)."""
    r = client(instance).call("stat", service=service, window=window)
    if output is Output.json:
        emit_json(r)
        return
    typer.echo(stat_text(r))


def stat_text(r: dict[str, Any]) -> str:
    rows = [[s["service"], f"{s['vip']}:{s['port'] or '*'}", f"{s['healthy']}/{s['endpoints']}",
             f"{s['rate']:.1f}", str(s["active"]), _bytes_rate(s), _percent(s),
             _ms(s["p50_ms"]), _ms(s["p95_ms"]), _ms(s["p99_ms"])] for s in r["services"]]
    head: str = f"window {r['window']:g}s" + ("" if r["span"] >= r["window"] - 1
                                         else f" (only {r['span']:.0f}s of data so far)")
    body: str = table(rows, ["SERVICE", "VIP", "HEALTHY", "CONN/S", "ACTIVE", "THROUGHPUT",
                             "ERRORS", "P50", "P95", "P99"])
    return head + "\n" + body


def top(window: Window = 10.0,
        limit: Annotated[int, typer.Option(help="pairs shown")] = 20,
        interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
        iterations: Annotated[int, typer.Option(help="refreshes before exiting (0: until "
                                                     "Ctrl-C)")] = 0,
        instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """A live view of the busiest source → destination pairs (JSON: one line per refresh)."""
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
    rows = [[p["src"], p["dst"], f"{p['rate']:.1f}", str(p["active"]), _bytes_rate(p),
             _percent(p), _ms(p["p50_ms"]), _ms(p["p99_ms"])] for p in r["pairs"]]
    head: str = f"busiest pairs over {r['window']:g}s, {time.strftime('%H:%M:%S')}"
    if not rows:
        return head + "\n(no traffic)"
    body: str = table(rows, ["SOURCE", "DESTINATION", "CONN/S", "ACTIVE", "THROUGHPUT",
                             "ERRORS", "P50", "P99"])
    return head + "\n" + body


def tap(service: Annotated[str, typer.Argument(
            help="connections from or to this service (* for all)",
            autocompletion=complete_service)],
        to: Annotated[str | None, typer.Option("--to", help="only to this service")] = None,
        from_: Annotated[str | None, typer.Option("--from", help="only from this service")] =
            None,
        failed: Annotated[bool, typer.Option(help="only connections that failed")] = False,
        max_events: Annotated[int, typer.Option("--max", help="stop after N events (0: no "
                                                              "limit)")] = 0,
        duration: Annotated[float, typer.Option(help="stop after this many seconds (0: until "
                                                     "Ctrl-C)")] = 0.0,
        instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """A live stream of connection events (open and close) for a service."""
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
