"""`python -m tests.drill [options]` (the drill), `python -m tests.drill soak [options]`, as root.

  make drill DRILL_ARGS="--backend ebpf --only restart,upgrade"
  make soak SOAK_ARGS="--minutes 2"

Everything started (namespaces, agents, workers, etcd, load) is removed on success, failure or
Ctrl-C. The drill exits 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from tests.drill import drill
from tests.etcd_cluster import etcd_available

_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _MAIN_PID:
        # a forked helper (pyroute2 forks to work in a namespace) inherits this handler:
        # unwinding a copy of our stack there would tear down the real run's hosts
        os._exit(128 + signum)
    raise KeyboardInterrupt  # unwinds through every close(): nothing is left behind


def _phases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in drill.NAMES]:
        raise argparse.ArgumentTypeError(f"unknown phase {', '.join(unknown)} "
                                         f"(phases: {', '.join(drill.NAMES)})")
    return names


def main_drill(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.drill", description=drill.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("ebpf", "iptables", "both"), default="both")
    p.add_argument("--phase-seconds", type=float, default=None,
                   help="load after each fault's recovery (default 10, --quick 4)")
    p.add_argument("--outage-seconds", type=float, default=None,
                   help="how long etcd is down (default 30, --quick 8)")
    p.add_argument("--drain-grace", type=float, default=None,
                   help="the agent's --drain-grace (default 60, --quick 20)")
    p.add_argument("--quick", action="store_true", help="short phases (what CI runs)")
    p.add_argument("--only", type=_phases, default=drill.NAMES,
                   help=f"comma-separated phases, of: {','.join(drill.NAMES)}")
    p.add_argument("--out", type=Path, default=drill.REPO / "artifacts" / "drill",
                   help="where the table goes as JSON and markdown (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the agents' logs")
    a = p.parse_args(argv)
    plan = drill.Plan(
        phase_seconds=a.phase_seconds or (4.0 if a.quick else 10.0),
        outage_seconds=a.outage_seconds or (8.0 if a.quick else 30.0),
        drain_grace=a.drain_grace or (20.0 if a.quick else 60.0))
    names = list(a.only)
    if not etcd_available() and (skipped := [n for n in names if n in drill.ETCD_PHASES]):
        print(f"etcd is not installed: skipping {', '.join(skipped)}", file=sys.stderr)
        names = [n for n in names if n not in drill.ETCD_PHASES]
    backends = ["ebpf", "iptables"] if a.backend == "both" else [a.backend]
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-drill-"))
    started = time.monotonic()
    try:
        rows = drill.run(backends, names, plan, tmp,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("interrupted: every process and namespace has been removed", file=sys.stderr)
        return 130
    finally:
        if a.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - started
    stem = drill.write(rows, a.out, plan, wall)
    print(drill.table_text(rows))
    print(f"wrote {stem}.json and {stem}.md ({wall:.0f}s)")
    return 0 if all(r.met for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.geteuid() != 0:
        print("the drill needs root (namespaces, BPF, iptables): sudo make drill",
              file=sys.stderr)
        return 77
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    if argv[:1] == ["soak"]:
        from tests.drill import soak

        return soak.main(argv[1:])
    return main_drill(argv)


if __name__ == "__main__":
    sys.exit(main())
