"""The soak (issue 13, item 9): `python -m tests.drill soak [--minutes N]`, as root.

One host (2 workers, access log on, every connection logged) under a fixed rate of short calls
plus long-lived streams for N minutes (default 10, at most 10). Every few seconds it samples the
RSS and open descriptors of the agent and of each worker (psutil; worker pids from the agent's
status). At the end: the error count, and per process the least-squares slope of RSS (KiB/min)
and of descriptors (per min), fitted after a warm-up.

The agent keeps a per-second history of its counters for `meshnode stat`/`top` (a few KiB a
sample, 600 s by default): it grows until that window is full, which a soak of at most 10
minutes would read as a leak. So the agent runs with --history-seconds 30 (--history-seconds
sets it), and the warm-up lasts at least until the history is full.

Flat, the target: the slope projected over 10 minutes moves the value by less than 1% of its
value at the start of the fit (RSS), and by less than 1 descriptor (fds). Each descriptor sample
is the lowest of a few quick reads, so connections in flight at that instant do not count as
growth; a leak is what stays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tests.drill.drill import REPO, source_version
from tests.drill.rig import CLOCK, LoadPlan, Rig, Tally, kinds_text

MAX_MINUTES = 10.0


@dataclass
class Series:
    """One process's samples: (minutes since start, RSS KiB, fds)."""

    name: str
    pid: int
    points: list[tuple[float, float, int]] = field(default_factory=list)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than 2 distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def sample(pid: int, reads: int = 5) -> tuple[float, int] | None:
    """(RSS KiB, fds): fds the lowest of `reads` reads 10 ms apart (see the module doc)."""
    try:
        p = psutil.Process(pid)
        rss = p.memory_info().rss / 1024
        fds = p.num_fds()
        for _ in range(reads - 1):
            time.sleep(0.01)  # spacing between reads, not a barrier
            fds = min(fds, p.num_fds())
    except psutil.Error:
        return None
    return rss, fds


@dataclass
class Verdict:
    name: str
    pid: int
    samples: int
    rss_start: float
    rss_end: float
    rss_slope: float  # KiB/min
    rss_flat: bool
    fds_start: float
    fds_end: float
    fds_slope: float  # per min
    fds_flat: bool


def judge(s: Series, warmup: float) -> Verdict | None:
    pts = [p for p in s.points if p[0] >= warmup] or s.points
    if len(pts) < 3:
        return None
    xs = [p[0] for p in pts]
    rss = slope(xs, [p[1] for p in pts])
    fds = slope(xs, [float(p[2]) for p in pts])
    return Verdict(s.name, s.pid, len(pts), pts[0][1], pts[-1][1], rss,
                   abs(rss) * 10 < 0.01 * pts[0][1], pts[0][2], pts[-1][2], fds,
                   abs(fds) * 10 < 1.0)


def report(verdicts: list[Verdict]) -> str:
    head = (f"{'process':<12}{'pid':>8}{'n':>5}{'RSS start':>12}{'RSS end':>10}"
            f"{'KiB/min':>10}{'limit':>8}{'flat':>6}{'fds':>6}{'end':>5}{'/min':>8}"
            f"{'limit':>7}{'flat':>6}")
    lines = [head, "-" * len(head)]
    for v in verdicts:
        lines.append(
            f"{v.name:<12}{v.pid:>8}{v.samples:>5}{v.rss_start / 1024:>9.1f}MiB"
            f"{v.rss_end / 1024:>7.1f}MiB{v.rss_slope:>10.1f}{0.001 * v.rss_start:>8.1f}"
            f"{'yes' if v.rss_flat else 'NO':>6}{v.fds_start:>6.0f}{v.fds_end:>5.0f}"
            f"{v.fds_slope:>8.2f}{0.1:>7.2f}{'yes' if v.fds_flat else 'NO':>6}")
    return "\n".join(lines)


def _kinds(kinds: dict[str, int]) -> str:
    return f" ({kinds_text(kinds)})" if kinds else ""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.drill soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="at most 10 (default 10)")
    p.add_argument("--backend", choices=("ebpf", "iptables"), default="ebpf")
    p.add_argument("--rate", type=float, default=200.0, help="short calls per second")
    p.add_argument("--streams", type=int, default=8, help="long-lived streams")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--history-seconds", type=float, default=30.0,
                   help="the agent's --history-seconds (it fills before the fit starts)")
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "drill")
    p.add_argument("--keep", action="store_true", help="keep the agent's logs")
    a = p.parse_args(argv)
    minutes = min(a.minutes, MAX_MINUTES)
    if minutes != a.minutes:
        print(f"the soak is bounded to {MAX_MINUTES:g} minutes", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-soak-"))
    access_log = tmp / "access.log"
    plan = LoadPlan(threads=4, rate=a.rate, streams=a.streams, bucket=0.5)
    rig = Rig(tmp / "host", a.backend, plan, workers=2, drain_grace=5,
              agent_args=("--access-log", str(access_log), "--access-log-sample", "1",
                          "--history-seconds", f"{a.history_seconds:g}"))
    series: dict[tuple[str, int], Series] = {}
    try:
        rig.up()
        assert rig.load is not None and rig.host.agent is not None
        agent_pid = rig.host.agent.pid  # `meshnode agent` execs the agent: same pid
        t0 = CLOCK()
        end = t0 + minutes * 60
        next_print = t0 + 30
        print(f"soak: {minutes:g} min on {a.backend}, {a.rate:g} calls/s + {a.streams} "
              f"streams, access log {access_log}", file=sys.stderr)
        while (now := CLOCK()) < end:
            procs = [("agent", agent_pid)] + [(f"worker {w['id']}", w["pid"])
                                             for w in rig.workers()]
            for name, pid in procs:
                if (got := sample(pid)) is not None:
                    s = series.setdefault((name, pid), Series(name, pid))
                    s.points.append(((now - t0) / 60, got[0], got[1]))
            if now >= next_print:
                t = rig.load.tally(t0, now)
                print(f"  {now - t0:5.0f}s: calls ok {t.ok}, failed {t.failed}, streams broken "
                      f"{t.broken}; " + ", ".join(
                          f"{s.name} {s.points[-1][1] / 1024:.1f} MiB {s.points[-1][2]} fds"
                          for s in series.values() if s.points[-1][0] >= (now - t0) / 60 - 0.2),
                      file=sys.stderr, flush=True)
                next_print += 30
            time.sleep(max(0.0, min(a.sample - (CLOCK() - now), end - CLOCK())))  # pacing
        total: Tally = rig.load.tally(t0, CLOCK())
        rig.load.stop()
    except KeyboardInterrupt:
        print("interrupted: every process and namespace has been removed", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(Exception):
            rig.close()
        log_bytes = access_log.stat().st_size if access_log.exists() else 0
        log_lines = sum(1 for _ in access_log.open("rb")) if access_log.exists() else 0
        if a.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # minutes: allocator arenas and caches fill up first, and the agent's history
    warmup = max(min(1.0, minutes * 0.25), (a.history_seconds + 10) / 60)
    verdicts = [v for s in series.values() if (v := judge(s, warmup)) is not None]
    restarted = sorted({name for name, _ in series if sum(k[0] == name for k in series) > 1})
    errors = total.failed + total.broken + total.reopen_fail
    flat = all(v.rss_flat and v.fds_flat for v in verdicts)
    print(f"soak: {minutes:g} min on {a.backend}, {a.rate:g} calls/s + {a.streams} streams, "
          f"access log on ({log_lines} lines, {log_bytes / 1048576:.1f} MiB)")
    print(f"calls ok {total.ok}, failed {total.failed}{_kinds(total.kinds)}; streams broken "
          f"{total.broken}{_kinds(total.broken_kinds)}; stream reopenings failed "
          f"{total.reopen_fail}; errors: {errors}")
    print(report(verdicts))
    print(f"flat: |slope| x 10 min < 1% of the start (RSS; limit column in KiB/min) and "
          f"< 1 descriptor (fds; limit per min), fitted after a {warmup * 60:.0f}s warm-up "
          f"(agent history {a.history_seconds:g}s)")
    if restarted:
        print(f"restarted during the soak (a series per pid): {', '.join(restarted)}")
    print(f"result: {'flat' if flat else 'NOT flat'}, {errors} errors")
    now_utc = datetime.now(UTC)
    path = a.out / f"soak-{now_utc:%Y%m%d-%H%M%S}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "when": now_utc.isoformat(), "source": source_version(), "minutes": minutes,
        "backend": a.backend, "rate": a.rate, "streams": a.streams, "warmup_min": warmup,
        "history_seconds": a.history_seconds,
        "calls_ok": total.ok, "calls_failed": total.failed, "kinds": total.kinds,
        "streams_broken": total.broken, "reopen_fail": total.reopen_fail, "errors": errors,
        "access_log_lines": log_lines, "verdicts": [v.__dict__ for v in verdicts],
        "samples": {f"{s.name} ({s.pid})": s.points for s in series.values()}}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if flat and errors == 0 else 1
