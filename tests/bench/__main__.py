"""`python -m tests.bench [--quick] [--out DIR] [--keep]`, as root (`make bench`).

Sets every variant up once, measures memory on the fresh processes, then repeats the load
measures with the variants interleaved (round robin, a different one first each repetition) and
reports medians: the table, JSON and a PNG chart in --out, and whether each target holds. Then
mTLS between two hosts (tests/bench/tunnel.py), then HTTP/1.1 and h2 through L7 proxies
(tests/bench/http.py), then the ingress gateway terminating TLS against HAProxy and nginx
(tests/bench/gateway.py), then the kernel fast path against the proxy path, direct and HAProxy,
with real clients (tests/bench/kernel.py): each its own table, JSON and targets line, last.
Everything started is stopped, and every namespace removed, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from tests.bench import measures, report, variants
from tests.bench.client import ClientError
from tests.bench.measures import Metrics, Plan
from tests.bench.procs import ALL_CPUS, RssPeak, interrupt_on_signals
from tests.bench.variants import Variant

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
Step = tuple[str, bool, Callable[[Variant, Plan], Metrics]]  # title, TCP only, measure

STEPS: list[Step] = [
    ("bulk", True, measures.bulk),
    ("ping-pong 1 B", True, measures.pingpong(1, pin=False)),
    ("ping-pong 1 KiB", True, measures.pingpong(1024, pin=False)),
    ("ping-pong 1 B, pinned", True, measures.pingpong(1, pin=True)),
    ("ping-pong 1 KiB, pinned", True, measures.pingpong(1024, pin=True)),
    ("connection setup, 1 client", True, measures.connrate(many=False)),
    ("connection setup, many clients", True, measures.connrate(many=True)),
    ("HTTP keep-alive (wrk)", False, measures.http),
]


def _missing() -> list[str]:
    need = [t for t in ("haproxy", "nginx", "wrk", "h2load", "nsenter")
            if shutil.which(t) is None]
    if not variants.NGINX_STREAM_MODULE.exists():
        need.append("libnginx-mod-stream")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        need.append("python3-matplotlib")
    return need




def _rotate(items: Sequence[T], rep: int) -> list[T]:
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _attempt(v: Variant, fn: Callable[[Variant, Plan], Metrics], plan: Plan,
             title: str) -> Metrics:
    """One measurement; a failure is reported and leaves a gap, not a dead run."""
    try:
        return fn(v, plan)
    except (ClientError, OSError, KeyError, ValueError) as exc:
        print(f"  {v.name}: {title} failed: {exc}", file=sys.stderr)
        return {}


def _record(raw: report.Raw, name: str, metrics: Metrics) -> None:
    for key, value in metrics.items():
        if value is not None:
            raw.setdefault(name, {}).setdefault(key, []).append(value)


def _set_up(stack: contextlib.ExitStack, tmp: Path) -> tuple[list[Variant], list[Variant]]:
    """Every variant, in the table's column order, plus the explicit proxy with 1..N workers."""
    enter = stack.enter_context
    ebpf = enter(variants.meshnode_captured(tmp / "ebpf", "ebpf"))
    ipt = enter(variants.meshnode_captured(tmp / "iptables", "iptables"))
    ns = enter(variants.plain_namespace(tmp / "plain"))
    explicit = enter(variants.meshnode_explicit(ns))
    chosen = [enter(variants.direct(ns)), ebpf, ipt, explicit, enter(variants.haproxy(ns)),
              enter(variants.nginx(ns, "stream")), enter(variants.nginx(ns, "http"))]
    scaling = [explicit, *(enter(variants.meshnode_explicit(ns, k))
                           for k in range(2, len(ALL_CPUS) + 1))]
    return chosen, scaling


def _run(plan: Plan, chosen: list[Variant], scaling: list[Variant]) -> report.Raw:
    raw: report.Raw = {}
    for v in chosen:  # fresh processes, before any load (see measures.memory)
        _record(raw, v.name, _attempt(v, measures.memory, plan, "memory"))
    for rep in range(plan.reps):
        peaks = dict.fromkeys((v.name for v in chosen), 0)
        for title, tcp_only, fn in STEPS:
            t0 = time.monotonic()
            for v in _rotate([v for v in chosen if v.tcp or not tcp_only], rep):
                with RssPeak(v.rss_pids) as peak:
                    _record(raw, v.name, _attempt(v, fn, plan, title))
                peaks[v.name] = max(peaks[v.name], peak.peak)
            print(f"[{rep + 1}/{plan.reps}] {title}: {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)
        for v in chosen:
            if v.rss_pids:
                _record(raw, v.name, {"rss_load": peaks[v.name] / measures.MB})
        t0 = time.monotonic()
        for k, v in _rotate(list(enumerate(scaling, 1)), rep):
            _record(raw, report.EXPLICIT,
                    _attempt(v, measures.connrate(True, f"scale_w{k}"), plan, "scaling"))
        print(f"[{rep + 1}/{plan.reps}] scaling 1..{len(scaling)} workers: "
              f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    return raw


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale-fabric"]:  # its three-host twin (tests/bench/scale_fabric.py)
        from tests.bench import scale_fabric

        return scale_fabric.main(argv[1:])
    if argv[:1] == ["scale"]:  # `make bench-scale`: its own run (tests/bench/scale.py)
        from tests.bench import scale

        return scale.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the regression guard: short runs, 256 MiB bulk, under 2 minutes")
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench",
                   help="where the JSON record and the PNG chart go (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmarks need root (namespaces, BPF, iptables): sudo make bench",
              file=sys.stderr)
        return 77
    if missing := _missing():
        print(f"missing: {', '.join(missing)}; install with: sudo ./setup.sh bench",
              file=sys.stderr)
        return 69
    # the load generators and backends run as `python -m tests.bench.*` inside namespaces
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    interrupt_on_signals()

    plan = measures.plan(args.quick, len(ALL_CPUS))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            chosen, scaling = _set_up(stack, tmp)
            print(f"set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            raw = _run(plan, chosen, scaling)
    except KeyboardInterrupt:
        print("interrupted: every process and namespace has been removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - started

    names = [v.name for v in chosen]
    table = report.medians(raw)
    ms = report.metrics(plan.many_clients, len(scaling))
    ts = report.targets(table)
    now = datetime.now(UTC)
    version = report.source_version(REPO)
    head = (f"meshnode bench ({plan.mode}): {len(ALL_CPUS)} CPUs, Linux {platform.release()}, "
            f"{version.get('commit', 'unknown commit')}; median of {plan.reps}; "
            f"bulk {plan.bulk_bytes >> 20} MiB each way; one worker per proxy; {wall:.0f}s")
    stem = args.out / f"bench-{now:%Y%m%d-%H%M%S}-{plan.mode}"
    report.write_json(stem.with_suffix(".json"), {
        "when": now.isoformat(), "source": version, "mode": plan.mode, "wall_s": wall,
        "machine": {"cpus": len(ALL_CPUS), "kernel": platform.release()},
        "plan": plan.__dict__, "variants": names, "raw": raw, "median": table,
        "ratio_to_direct": {v: {m.key: report.ratio(table, v, report.DIRECT, m.key)
                                for m in ms} for v in names},
        "ratio_to_haproxy": {v: {m.key: report.ratio(table, v, report.HAPROXY, m.key)
                                 for m in ms} for v in names},
        "targets": [{"name": t.name, "value": t.value, "met": t.met} for t in ts]})
    report.chart(stem.with_suffix(".png"), table, names, ms, head)
    print(head)
    print(report.table_text(table, names, ms))
    print(f"wrote {stem}.json and {stem}.png")
    print(report.targets_line(ts))
    # mTLS between two hosts (issue 14 item 8): its own namespaces, table and targets line
    from tests.bench import tunnel

    print()
    sys.stdout.flush()
    rc = tunnel.run(args.quick, args.out, keep=args.keep)
    if rc == 130:
        return rc
    # HTTP/1.1 and h2 through L7 proxies (issue 15 item 7): its own namespace, table, targets
    from tests.bench import http

    print()
    sys.stdout.flush()
    rc = http.run(args.quick, args.out, keep=args.keep) or rc
    if rc == 130:
        return rc
    # the ingress gateway against HAProxy and nginx terminating TLS (issue 16 item 7)
    from tests.bench import gateway

    print()
    sys.stdout.flush()
    rc = gateway.run(args.quick, args.out, keep=args.keep) or rc
    if rc == 130:
        return rc
    # the kernel fast path against the proxy path, direct and HAProxy; real clients (issue 17)
    from tests.bench import kernel

    print()
    sys.stdout.flush()
    return kernel.run(args.quick, args.out, keep=args.keep) or rc


if __name__ == "__main__":
    sys.exit(main())
