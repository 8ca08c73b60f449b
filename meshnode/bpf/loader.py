"""The short-lived loader: `python -m meshnode.bpf.loader --pin-dir DIR [--outbound-port P]
[--proxy-mark M] [--tag BUILD]`.

Compiles every capture program with bcc, pins maps and programs under DIR (maps already pinned
there are reused, so a new build shares them with the running one), prints one JSON object on
stdout and exits. The agent runs it as a subprocess so LLVM's ~130 MB never stays in
a long-running process; it attaches the pinned programs itself afterwards with raw syscalls.
Attaching is deliberately not done here: an attachment outlives its process, and only the agent
records it in its ledger first.

Output, exit 0: {"ok": true, "entries": [{"function", "pin", "prog_id"}...],
                 "maps": {"<name>": [key size, value size]...}, "elapsed_ms",
                 "inbound": {"function", "pin", "prog_id"} or {"error": "<one line>"}}
(the sk_lookup program for inbound enforcement is optional: without it the capture stands)
Output, exit 1: {"ok": false, "error": "<one line>", "hint": "<what to do>"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from meshnode import constants
from meshnode.errors import MeshnodeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshnode.bpf.loader",
        description="Compile meshnode's capture programs and pin them (maps and programs).",
        epilog="example: python -m meshnode.bpf.loader --pin-dir /sys/fs/bpf/meshnode/default",
    )
    parser.add_argument("--pin-dir", required=True, type=Path,
                        help="existing empty directory on bpffs")
    parser.add_argument("--outbound-port", type=int, default=constants.OUTBOUND_PORT,
                        help="the proxy's outbound listener port on 127.0.0.1")
    parser.add_argument("--proxy-mark", type=lambda v: int(v, 0), default=constants.PROXY_MARK,
                        help="SO_MARK of the proxy's upstream sockets (never captured)")
    parser.add_argument("--tag", default="",
                        help="pin programs as prog_<function>-<tag> (next to a running build)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        from meshnode.bpf.compile import BuildConfig, load_and_pin

        loaded = load_and_pin(BuildConfig(args.pin_dir, args.outbound_port, args.proxy_mark,
                                              args.tag))
    except MeshnodeError as exc:
        print(json.dumps({"ok": False, "error": exc.message.splitlines()[0] if exc.message
                          else type(exc).__name__, "hint": exc.hint}))
        return 1
    result = {
        "ok": True,
        "entries": [{"function": e.function, "pin": e.pin, "prog_id": e.prog_id}
                    for e in loaded.entries],
        "maps": loaded.layouts,
        "inbound": ({"function": loaded.inbound.function, "pin": loaded.inbound.pin,
                     "prog_id": loaded.inbound.prog_id} if loaded.inbound is not None
                    else {"error": loaded.inbound_error}),
        "elapsed_ms": round((time.monotonic() - started) * 1000),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
