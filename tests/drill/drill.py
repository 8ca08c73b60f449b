"""The fault drill (issue 13, item 7): on each capture backend, continuous load through the mesh
while each fault happens in turn, and what it cost per phase.

Phases, in order (a phase's window opens at the fault and closes `phase_seconds` after the
recovery step; anything lost after it, while the drill settles for the next fault, is charged
to the phase too and fails its target):

  baseline       no fault: the load alone (sanity: 0 failed, 0 broken)
  restart        agent SIGTERM, then started again                 0 failed calls, 0 broken
  kill-restart   agent SIGKILL, then started again                 0 failed calls, 0 broken
  upgrade        SIGTERM, started with a new MESHNODE_BUILD_ID     0 failed calls, 0 broken
                 (it replaces its workers one at a time, old ones drain)
  worker-kill-2  SIGKILL one of 2 workers                          0 failed new connections
  backend-kill   SIGKILL one of the 2 echo backends                0 failed new connections
  worker-kill-1  SIGKILL the only worker (a host with 1 worker)    gap <= 1 s until it serves
  crash-loop     the only worker SIGKILLed each time it is back,   0 failed new, gap <= 1 s
                 4 times (restart backoff 0.2, 0.4, 0.8, 1.6 s):
                 the proxy is down for seconds; the service (plain
                 TCP, fail open) is balanced in the kernel meanwhile
                 (eBPF only: the iptables backend has no kernel path)
  etcd-outage    1-member etcd stopped for `outage_seconds`        0 failed, 0 broken; a write
                                                                   fails with a clear error;
                                                                   a change converges after
  etcd-members   3-member etcd, each member restarted in turn      same as etcd-outage

"failed new": failed calls that started after the fault took effect; a call already under way
is a connection the killed process held, which the target allows to be lost. For a worker the
fault takes effect at the SIGKILL itself: connections its listener queued while it died are
the mesh's to keep (a listener shared by the workers keeps them). For a backend it is its exit:
what its own kernel accepted before is lost to any TCP proxy, only refused connects can fail
over. "gap": the longest time without a successful call, or the failure span if longer.

The first five phases share one host (2 workers, embedded registry); the others get a host
each, started when reached and removed when done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tests.drill.rig import CLOCK, LoadPlan, Rig, Tally, kinds_text
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
BUILD_ENV = "MESHNODE_BUILD_ID"
ETCD_PHASES = ("etcd-outage", "etcd-members")


@dataclass(frozen=True)
class Plan:
    phase_seconds: float = 10.0  # load after each fault's recovery step
    outage_seconds: float = 30.0  # etcd fully down
    drain_grace: float = 60.0  # the agent's: old workers' streams outlive the upgrade window
    load: LoadPlan = field(default_factory=LoadPlan)


@dataclass
class Outcome:
    """What a phase's fault step found besides the load's counts."""

    note: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # must all hold for MET
    effective: float | None = None  # when the fault took effect, if not at once (held calls)
    repeats: list[float] = field(default_factory=list)  # when it struck again in the window


@dataclass
class Row:
    backend: str
    phase: str
    ok: int
    failed: int
    failed_new: int
    broken: int
    recover_s: float
    stall_s: float
    target: str
    met: bool
    note: str
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    broken_kinds: dict[str, int] = field(default_factory=dict)
    reopen_fail: int = 0
    checks: dict[str, bool] = field(default_factory=dict)


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# -- targets --------------------------------------------------------------------------------
def _lossless(t: Tally) -> bool:
    return t.failed == 0 and t.broken == 0


def _new_ok(t: Tally) -> bool:
    return t.failed_new == 0


def _gap(t: Tally) -> float:
    return max(t.stall, t.recover)


@dataclass(frozen=True)
class Phase:
    name: str
    rig: str  # which host it runs on: main, single, etcd1, etcd3
    target: str
    met: Callable[[Tally], bool]
    backends: tuple[str, ...] = ("ebpf", "iptables")  # the capture backends it applies to


PHASES: list[Phase] = [
    Phase("baseline", "main", "0 failed, 0 broken", _lossless),
    Phase("restart", "main", "0 failed, 0 broken", _lossless),
    Phase("kill-restart", "main", "0 failed, 0 broken", _lossless),
    Phase("upgrade", "main", "0 failed, 0 broken", _lossless),
    Phase("worker-kill-2", "main", "0 failed new", _new_ok),
    Phase("backend-kill", "main", "0 failed new", _new_ok),
    Phase("worker-kill-1", "single", "gap <= 1 s", lambda t: _gap(t) <= 1.0),
    Phase("crash-loop", "single", "0 failed new, gap <= 1 s",
          lambda t: _new_ok(t) and _gap(t) <= 1.0, backends=("ebpf",)),
    Phase("etcd-outage", "etcd1", "0 failed, 0 broken, write refused, converges", _lossless),
    Phase("etcd-members", "etcd3", "0 failed, 0 broken, converges", _lossless),
]
NAMES = [p.name for p in PHASES]
RIGS: dict[str, tuple[int, int]] = {  # kind: (workers, etcd members; 0: embedded registry)
    "main": (2, 0), "single": (1, 0), "etcd1": (2, 1), "etcd3": (2, 3)}


# -- fault steps ----------------------------------------------------------------------------
class Drill:
    """One backend's run: the rigs it needs, one at a time, and a row per phase."""

    def __init__(self, backend: str, plan: Plan, tmp: Path,
                 log: Callable[[str], None] = print) -> None:
        self.backend = backend
        self.plan = plan
        self.tmp = tmp
        self._log = log
        self.t0 = CLOCK()
        self.upgrades = 0
        self.pending: tuple[Row, float] | None = None  # the last row, and its window's end

    def log(self, text: str) -> None:
        self._log(f"{CLOCK() - self.t0:6.1f}s [{self.backend}] {text}")

    def _stop_timeout(self) -> float:
        return self.plan.drain_grace + 30  # a stop may drain the streams for the full grace

    def _replaced(self, rig: Rig, gone: set[int], timeout: float) -> float | None:
        """Seconds until a full set of workers runs with none of the `gone` pids (None: not
        within `timeout`)."""
        t0 = CLOCK()
        want = rig.host.workers
        try:
            wait_for("replacement workers", lambda: len(
                [w for w in rig.workers() if w["pid"] not in gone]) >= want, timeout)
        except AssertionError:
            return None
        return CLOCK() - t0

    def _old_workers(self, rig: Rig, before: set[int], out: Outcome) -> None:
        """After a restart: the workers that were serving either run on, adopted by the new
        agent, or are orphans that drain and exit, cutting their streams when the drain time
        ends. The window stays open until they are gone, so such a cut is counted here."""
        now = {w["pid"] for w in rig.workers()}
        left = before - now
        if not left:
            out.note.append(f"re-adopted its {len(before)} workers")
            return
        if not any(map(_running, left)):
            out.note.append(f"its {len(left)} workers stopped with it (not re-adopted)")
            return
        t0 = CLOCK()
        try:
            wait_for("old workers to exit", lambda: not any(map(_running, left)),
                     self.plan.drain_grace + 10)
            out.note.append(f"{len(left)} old workers not re-adopted, exited "
                            f"{CLOCK() - t0:.1f}s after the new agent was ready")
        except AssertionError:
            out.note.append(f"{len(left)} old workers not re-adopted, still running after "
                            f"{CLOCK() - t0:.0f}s")

    def restart(self, rig: Rig, out: Outcome) -> None:
        before = {w["pid"] for w in rig.workers()}
        code = rig.host.stop(timeout=self._stop_timeout())
        took = rig.host.start()
        out.note.append(f"stop exit {code}, ready again in {took:.1f}s")
        self._old_workers(rig, before, out)

    def kill_restart(self, rig: Rig, out: Outcome) -> None:
        before = {w["pid"] for w in rig.workers()}
        rig.host.kill()
        took = rig.host.start()
        out.note.append(f"ready again in {took:.1f}s")
        self._old_workers(rig, before, out)

    def upgrade(self, rig: Rig, out: Outcome) -> None:
        self.upgrades += 1
        old = {w["pid"] for w in rig.workers()}
        t0 = CLOCK()
        rig.host.stop(timeout=self._stop_timeout())
        took = rig.host.start(env={BUILD_ENV: f"drill-upgrade-{self.upgrades}"})
        replaced = self._replaced(rig, old, 60)
        out.checks["workers replaced"] = replaced is not None  # else no upgrade was drilled
        out.note.append(f"ready again in {took:.1f}s")
        out.note.append("workers replaced " + (f"{CLOCK() - t0:.1f}s after the stop"
                                               if replaced is not None else "NOT within 60s"))

    def after_upgrade(self, rig: Rig) -> None:
        # the streams reopen on the new workers now, before the old ones' drain time ends
        # (which would cut them in some later phase)
        assert rig.load is not None
        rig.load.recycle()

    def worker_kill(self, rig: Rig, out: Outcome) -> None:
        victim = rig.workers()[0]["pid"]
        out.effective = CLOCK()
        os.kill(victim, signal.SIGKILL)
        took = self._replaced(rig, {victim}, 15)
        out.note.append(f"worker {victim} killed; " + (
            f"replacement alive (agent status) in {took:.2f}s" if took is not None
            else "no replacement within 15s"))

    def crash_loop(self, rig: Rig, out: Outcome, crashes: int = 4) -> None:
        """Kill the only worker each time it is back: every quick death doubles the restart
        backoff, so the proxy is down for seconds in all. The kernel's count of connects it
        balanced itself says who carried the calls meanwhile."""
        kernel0 = rig.host.status()["capture"]["kernel"].get("kernel", 0)
        down = 0.0
        for i in range(crashes):
            victim = rig.workers()[0]["pid"]
            if i == 0:
                out.effective = CLOCK()
            else:  # calls under way at each crash are the killed worker's to lose
                out.repeats.append(CLOCK())
            os.kill(victim, signal.SIGKILL)
            took = self._replaced(rig, {victim}, 15)
            if took is None:
                out.checks["worker replaced"] = False
                break
            down += took
        kernel = rig.host.status()["capture"]["kernel"].get("kernel", 0) - kernel0
        out.checks["kernel carried calls"] = kernel > 0
        out.note.append(f"{crashes} crashes, proxy down {down:.1f}s in all; "
                        f"{kernel} connects balanced in the kernel meanwhile")

    def backend_kill(self, rig: Rig, out: Outcome) -> None:
        t0 = CLOCK()
        port, proc = rig.kill_backend()
        proc.wait(10)
        out.effective = CLOCK()
        out.note.append(f"backend :{port} killed, gone {(out.effective - t0) * 1000:.0f} ms later")

    def after_backend_kill(self, rig: Rig) -> None:
        rig.start_backend()  # back to two, for the phases after this one
        rig.wait_backends()

    def _write(self, rig: Rig, name: str, timeout: float) -> tuple[int | None, str, float]:
        """`meshnode service add NAME --port 7100`: (exit code or None on timeout, the last
        line it printed, seconds)."""
        t0 = CLOCK()
        try:
            done = rig.host.cli("service", "add", name, "--port", "7100", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"no answer within {timeout:.0f}s", CLOCK() - t0
        text = (done.stderr.strip() or done.stdout.strip())
        lines = [ln for ln in text.splitlines() if ln.strip()]
        message = lines[-1] if lines else ""
        if "Traceback" in text:
            message = "a traceback: " + message
        return done.returncode, message, CLOCK() - t0

    def _converge(self, rig: Rig, name: str, out: Outcome, since: float,
                  event: str = "etcd was back") -> None:
        """A write accepted (retried while the registry comes back), then seen by the agent."""
        deadline = CLOCK() + 60
        code: int | None = None
        msg = ""
        while CLOCK() < deadline:
            code, msg, _ = self._write(rig, name, timeout=15)
            if code == 0:
                break
            time.sleep(0.5)  # a retry pace, not a barrier
        if code != 0:
            out.note.append(f"write after recovery still failing: {msg}")
            out.checks["converges"] = False
            return
        try:
            wait_for(f"service {name}", lambda: any(
                s["name"] == name for s in rig.host.status()["services"]), 30)
        except AssertionError:
            out.note.append(f"write accepted but {name} not in the agent's state after 30s")
            out.checks["converges"] = False
            return
        out.checks["converges"] = True
        out.note.append(f"a change converged {CLOCK() - since:.1f}s after {event}")

    def etcd_outage(self, rig: Rig, out: Outcome) -> None:
        outage = self.plan.outage_seconds
        rig.etcd_call("stop")
        down = CLOCK()
        time.sleep(min(1.0, outage / 4))  # the write comes once the outage is under way
        code, msg, took = self._write(rig, "drill-outage-write", timeout=max(2.0, outage - 2.5))
        clear = code not in (0, None) and bool(msg) and not msg.startswith("a traceback")
        out.checks["write refused clearly"] = clear
        verdict = ("refused" if code not in (0, None) else
                   "ACCEPTED" if code == 0 else "hung")
        out.note.append(f"write during outage {verdict} in {took:.1f}s: {msg[:160]}")
        time.sleep(max(0.0, down + outage - CLOCK()))  # the rest of the outage
        if not rig.agent_alive():
            out.note.append("the agent EXITED during the outage")
        rig.etcd_call("start")
        self._converge(rig, "drill-outage-write", out, CLOCK())

    def etcd_members(self, rig: Rig, out: Outcome) -> None:
        assert rig.etcd is not None
        for i in range(len(rig.etcd.members)):
            rig.etcd_call("stop", i)
            time.sleep(1.0)  # the member stays down a while: a leader election, not a blip
            rig.etcd_call("start", i)
        out.note.append(f"{len(rig.etcd.members)} members restarted in turn")
        self._converge(rig, "drill-members-write", out, CLOCK(), "the last restart")

    # -- running ----------------------------------------------------------------------------
    STEPS: dict[str, str] = {"baseline": "", "restart": "restart",
                             "kill-restart": "kill_restart", "upgrade": "upgrade",
                             "worker-kill-2": "worker_kill", "backend-kill": "backend_kill",
                             "worker-kill-1": "worker_kill", "crash-loop": "crash_loop",
                             "etcd-outage": "etcd_outage",
                             "etcd-members": "etcd_members"}
    AFTER: dict[str, str] = {"upgrade": "after_upgrade", "backend-kill": "after_backend_kill"}

    def _new_rig(self, kind: str) -> Rig:
        workers, members = RIGS[kind]
        rig = Rig(self.tmp / f"{self.backend}-{kind}", self.backend, self.plan.load,
                  workers=workers, drain_grace=self.plan.drain_grace, etcd_members=members)
        try:
            rig.up()
        except BaseException:
            rig.close()
            raise
        return rig

    def _late(self, rig: Rig) -> None:
        """Charge the previous phase with what was lost after its window (while settling, or
        before its host is removed): a fault's effect must not hide between two windows."""
        if self.pending is None or rig.load is None:
            return
        row, since = self.pending
        self.pending = None
        t = rig.load.tally(since, CLOCK())
        if t.failed or t.broken:
            row.note += ("; " if row.note else "") + (
                f"AFTER its window: {t.failed} failed calls ({kinds_text(t.kinds)}), "
                f"{t.broken} broken streams ({kinds_text(t.broken_kinds)})")
            row.checks["nothing lost after the window"] = False
            row.met = False
            self.log(f"{row.phase}: lost after its window: {t.failed} calls, "
                     f"{t.broken} streams")

    def phase(self, rig: Rig, phase: Phase) -> Row:
        assert rig.load is not None
        out = Outcome()
        settled = rig.settle()
        self._late(rig)
        if settled:
            out.note.append(settled)
        start = CLOCK()
        step = self.STEPS[phase.name]
        if step:
            getattr(self, step)(rig, out)
        time.sleep(self.plan.phase_seconds)  # the observation window after recovery
        end = CLOCK()
        t = rig.load.tally(start, end, out.effective, tuple(out.repeats))
        if phase.name == "worker-kill-1":
            out.note.append(f"gap {_gap(t):.2f}s")
        if after := self.AFTER.get(phase.name):
            getattr(self, after)(rig)
        met = phase.met(t) and all(out.checks.values())
        row = _row(self.backend, phase, t, met, out)
        self.pending = (row, end)
        return row

    def _retire(self, rig: Rig) -> None:
        """Remove a host, after charging its last phase with anything lost after its window."""
        try:
            if self.pending is not None and rig.agent_alive():
                rig.settle(timeout=10)
                self._late(rig)
        except Exception as exc:  # the host is going anyway: say so, but remove it
            self.log(f"checking after the last phase failed: {exc}")
        finally:
            self.pending = None
            rig.close()

    def run(self, names: list[str]) -> list[Row]:
        rows: list[Row] = []
        rig: Rig | None = None
        kind = ""
        try:
            for phase in (p for p in PHASES if p.name in names):
                if self.backend not in phase.backends:
                    self.log(f"{phase.name}: not on {self.backend} (only "
                             f"{', '.join(phase.backends)})")
                    continue
                if rig is not None and (kind != phase.rig or not rig.agent_alive()):
                    self._retire(rig)
                    rig = None
                    self.log("host removed")
                try:
                    if rig is None:
                        kind = phase.rig
                        t0 = CLOCK()
                        rig = self._new_rig(kind)
                        self.log(f"host '{kind}' up in {CLOCK() - t0:.1f}s")
                    row = self.phase(rig, phase)
                except Exception as exc:  # a phase that breaks its host: a row, and a new host
                    detail = "".join(traceback.format_exception_only(exc)).strip()
                    self.log(f"{phase.name} failed: {detail}\n"
                             + (rig.log_tail() if rig is not None else ""))
                    row = Row(self.backend, phase.name, 0, 0, 0, 0, 0.0, 0.0, phase.target,
                              False, f"ERROR: {detail[:300]}")
                    if rig is not None:
                        self.pending = None
                        rig.close()
                        rig = None
                rows.append(row)
                self.log(format_row(row))
        finally:
            if rig is not None:
                self._retire(rig)
        return rows


def _row(backend: str, phase: Phase, t: Tally, met: bool, out: Outcome) -> Row:
    note = list(out.note)
    if t.kinds:
        note.append("calls: " + kinds_text(t.kinds))
        if t.held:
            note.append(f"{t.held} of them under way as the fault took effect")
    if t.broken_kinds:
        note.append("streams: " + kinds_text(t.broken_kinds))
    if t.reopen_fail:
        note.append(f"{t.reopen_fail} failed stream reopenings")
    return Row(backend, phase.name, t.ok, t.failed, t.failed_new, t.broken, round(t.recover, 3),
               round(t.stall, 3), phase.target, met, "; ".join(note), round(t.seconds, 1),
               t.kinds, t.broken_kinds, t.reopen_fail, dict(out.checks))


# -- the table ------------------------------------------------------------------------------
COLUMNS = ("backend", "phase", "calls ok", "calls failed", "failed new", "streams broken",
           "recover s", "max stall s", "target", "result")


def _cells(r: Row) -> list[str]:
    return [r.backend, r.phase, str(r.ok), str(r.failed), str(r.failed_new), str(r.broken),
            f"{r.recover_s:.2f}", f"{r.stall_s:.2f}", r.target, "MET" if r.met else "NOT MET"]


def format_row(r: Row) -> str:
    return "  ".join(_cells(r)) + (f"  ({r.note})" if r.note else "")


def table_text(rows: list[Row]) -> str:
    cells = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i >= 8 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"  {r.backend}/{r.phase}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def table_markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " | note |", "|" + "---|" * (len(COLUMNS) + 1)]
    out += ["| " + " | ".join([*_cells(r), r.note.replace("|", "/")]) + " |" for r in rows]
    return "\n".join(out) + "\n"


def source_version() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write(rows: list[Row], out: Path, plan: Plan, wall: float) -> Path:
    now = datetime.now(UTC)
    stem = out / f"drill-{now:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"when": now.isoformat(), "source": source_version(),
                              "wall_s": round(wall, 1), "plan": asdict(plan),
                              "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    head = (f"meshnode drill, {now:%Y-%m-%d %H:%M} UTC, source {record['source']}, phases of "
            f"{plan.phase_seconds:g}s, etcd outage {plan.outage_seconds:g}s, {wall:.0f}s\n\n")
    stem.with_suffix(".md").write_text(head + table_markdown(rows))
    return stem


def run(backends: list[str], names: list[str], plan: Plan, tmp: Path,
        log: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    for backend in backends:
        rows += Drill(backend, plan, tmp, log).run(names)
    return rows
