"""The eBPF capture backend: cgroup connect4/connect6 + sock_ops on the apps cgroup, getsockopt
on the proxy cgroup, steered by pinned maps; and the DNS redirect hooks (bpf/mn_dns.c) on the
apps cgroup, off until `set_dns`; and inbound enforcement (meshnode.capture.inbound): the
sk_lookup program on the agent's netns, or, on a kernel without sk_lookup, the iptables chain.

Owns the pin dir and the cgroup attachments, their ledger kinds (`UNDO`) and the map sync.
Compiling runs in a subprocess (meshnode.bpf.loader) so this process never imports bcc; the
attachments are made here with raw bpf(2), each recorded in the ledger before it exists, so an
explicit removal from a fresh process finds them all (attachments outlive processes).

A restarted agent adopts what the ledger lists (`adopt`): the pinned maps keep their contents,
and attachments of the same program build stay as they are. A new build is loaded next to the
running one (its programs pinned under the build's tag, the maps shared through their pins)
and each attachment is swapped in one BPF_F_REPLACE attach: no connect runs uncaptured.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

from meshnode import constants
from meshnode.bpf import syscall
from meshnode.bpf.compile import BuildConfig, program_build
from meshnode.bpf.maps import CaptureMaps
from meshnode.bpf.probe import probe_sk_lookup
from meshnode.bpf.program import EntrySpec, all_entries
from meshnode.capture import (
    CAP_CGROUP_SOURCE,
    CAP_ORIGDST_MAP,
    CAP_STATS,
    CaptureContext,
)
from meshnode.capture.inbound import BpfInbound, InboundEnforcer, IptablesInbound, per_service
from meshnode.errors import BpfError, CaptureError, MeshnodeError, UnavailableError
from meshnode.host.ledger import Entry, Transaction, UndoFn
from meshnode.model import CaptureState, HostPort, InboundRule
from meshnode.sockdiag import SockDiag

log = logging.getLogger(__name__)

KIND_PIN_DIR = "bpf_pin_dir"
KIND_ATTACH = "bpf_attach"
# Compiling the programs takes about 1 s on a host, and over a minute on an emulated VM that
# shares its CPUs (measured: 3 TCG guests on 2 cores); only a wedged clang should reach this.
LOADER_TIMEOUT = 600.0


class BpfCapture:
    """Capture with cgroup eBPF programs. `install` → `sync`* → `remove`."""

    name = "ebpf"
    capabilities: frozenset[str] = frozenset({CAP_STATS, CAP_CGROUP_SOURCE, CAP_ORIGDST_MAP})

    def __init__(self, ctx: CaptureContext, python: str = sys.executable) -> None:
        self.ctx = ctx
        self._python = python  # interpreter that runs the loader (must see bcc)
        self._maps: CaptureMaps | None = None
        self.timings: dict[str, float] = {}  # seconds: "loader", "install"
        self.build = program_build(BuildConfig(ctx.pin_dir, ctx.outbound_port, ctx.proxy_mark))
        self.adopted = ""  # after adopt(): "kept" or "replaced"
        self._inbound: InboundEnforcer | None = None
        self._inbound_rules: frozenset[InboundRule] | None = None  # what it enforces now
        self._loaded_inbound: dict[str, object] | None = None  # the loader's sk_lookup program
        self._inbound_error = ""  # or why the loader could not load it
        self.inbound_reason = ""  # which mechanism enforces inbound mTLS modes, and why

    # -- lifecycle -------------------------------------------------------------------------

    def install(self) -> None:
        started = time.monotonic()
        for role, path in (("apps", self.ctx.apps_cgroup), ("proxy", self.ctx.proxy_cgroup)):
            if not path.is_dir():
                raise CaptureError(f"{role} cgroup {path} does not exist",
                                   "create the agent's cgroups before installing capture",
                                   errno=errno.ENOENT)
        # All or nothing: a failure takes back what this install recorded, newest first.
        with self.ctx.ledger.transaction(_tx_undo()) as tx:
            ensure_bpffs()
            self._make_pin_dir(tx)
            loaded = self._run_loader(self.build)
            for entry in all_entries():
                self._attach(entry, loaded[entry.function], tx)
            self._maps = CaptureMaps.open(self.ctx.pin_dir)
            self._install_inbound(tx)
        self.timings["install"] = time.monotonic() - started

    def _install_inbound(self, tx: Transaction) -> None:
        """Link the sk_lookup program the loader made; without one (a kernel without
        sk_lookup), enforce with the iptables chain instead, saying why in one line."""
        reason = (self._inbound_error or "not loaded" if self._loaded_inbound is None
                  else probe_sk_lookup())
        enforcer: InboundEnforcer
        if reason is None and self._loaded_inbound is not None:
            link = BpfInbound(self.ctx, self.build)
            link.install(self._loaded_inbound, tx)
            enforcer = link
            self.inbound_reason = "ebpf: sk_lookup on the agent's network namespace"
        else:
            log.warning("inbound mTLS enforcement: eBPF sk_lookup unavailable (%s); "
                        "using iptables", reason)
            fallback = IptablesInbound(self.ctx)
            fallback.install(tx)
            enforcer = fallback
            self.inbound_reason = f"iptables: eBPF sk_lookup unavailable ({reason})"
        self._inbound, self._inbound_rules = enforcer, frozenset()  # made empty

    def _adopt_inbound(self, ran_loader: bool) -> None:
        """Keep the inbound enforcement an earlier agent left (the link, its program swapped
        when the build changed; or the iptables chain it fell back to); make it anew when
        there is none whole (an agent from before inbound enforcement, say)."""
        self._inbound_rules = None
        link = BpfInbound(self.ctx, self.build)
        held = link.linked()
        if held is not None:
            if held.get("build") != self.build and not ran_loader:
                self._run_loader_for_inbound()
            try:
                how = link.adopt(self._loaded_inbound)
                if (how == "kept" and self._loaded_inbound is not None
                        and self._loaded_inbound["pin"] != held.get("prog_pin")):
                    # the loader ran for the capture programs only: its copy is not needed
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(self._loaded_inbound["pin"]))
                self._inbound = link
                self.inbound_reason = "ebpf: sk_lookup on the agent's network namespace"
                log.info("inbound enforcement (sk_lookup link): %s", how)
                return
            except MeshnodeError as exc:
                log.warning("cannot adopt the inbound sk_lookup link (%s): linking anew", exc)
        chain = IptablesInbound(self.ctx)
        if chain.own_entries():
            try:
                chain.adopt()
                self._inbound = chain
                self.inbound_reason = ("iptables: kept from the previous agent (eBPF "
                                       "sk_lookup was unavailable)")
                return
            except MeshnodeError as exc:
                log.warning("cannot adopt the inbound chain (%s): making it anew", exc)
        for failure in [*link.remove(), *chain.remove()]:
            log.warning("removing the old inbound enforcement: %s", failure)
        if self._loaded_inbound is None and not self._inbound_error:
            self._run_loader_for_inbound()
        with self.ctx.ledger.transaction(_tx_undo()) as tx:
            self._install_inbound(tx)

    def _run_loader_for_inbound(self) -> None:
        """A loader run for the sk_lookup program alone (the capture programs are kept): the
        programs it also pins under its own tag are unpinned again."""
        tag = f"{self.build}-{int(time.time())}"
        loaded = self._run_loader(tag)
        for entry in loaded.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(entry["pin"]))

    def adopt(self) -> None:
        """Take over the capture an earlier agent of this instance installed (the ledger's
        entries): maps as they are; programs of another build replaced atomically. Raises
        CaptureError when there is nothing whole to adopt (the caller reinstalls)."""
        started = time.monotonic()
        held = {str(e.get("function")): e for e in self._own_entries(KIND_ATTACH)}
        if not held or not self.ctx.pin_dir.is_dir():
            raise CaptureError("no eBPF capture of this instance to adopt",
                               "it is installed anew", errno=errno.ENOENT)
        self._maps = CaptureMaps.open(self.ctx.pin_dir)  # refuses maps of another layout
        stale = [e for e in all_entries()
                 if e.function not in held or held[e.function].get("build") != self.build
                 or not _attached(held[e.function])]
        if not stale:
            self.adopted = "kept"
            self._adopt_inbound(ran_loader=False)
            return
        # The maps are pinned already: the new programs share them. A tag of its own when this
        # build's pins exist (a program of it was detached behind our back).
        tag = self.build
        if any((self.ctx.pin_dir / f"prog_{e.function}-{tag}").exists() for e in stale):
            tag = f"{self.build}-{int(time.time())}"
        loaded = self._run_loader(tag)
        with self.ctx.ledger.transaction(_tx_undo()) as tx:
            for entry in stale:
                old = held.get(entry.function)
                self._attach(entry, loaded[entry.function], tx,
                             old if old is not None and _attached(old) else None)
        for entry in stale:  # the replaced programs: not attached any more, unpinned
            old = held.get(entry.function)
            if old is not None and old.get("pin") != str(loaded[entry.function]["pin"]):
                self.ctx.ledger.forget(old)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(old["pin"]))
        self.adopted = "replaced"
        self._adopt_inbound(ran_loader=True)
        self.timings["adopt"] = time.monotonic() - started
        log.info("eBPF programs replaced in place (build %s): %s", self.build,
                 ", ".join(e.function for e in stale))

    def sync(self, state: CaptureState) -> None:
        maps = self._require_maps()
        started = time.perf_counter()
        maps.sync(state)
        self._close_removed(maps)
        self._sync_inbound(state)
        # The kernel's share of a change, apart from the agent's reconcile (bench-scale
        # reads these lines from the agent's log).
        log.debug("capture sync: %d map writes in %.1f ms", maps.last_writes,
                  (time.perf_counter() - started) * 1000)

    def _close_removed(self, maps: CaptureMaps) -> None:
        """Close the kernel-path connections to endpoints that left the tables of services
        asking for it (closeRemovedConnections); the others finish on their own."""
        gone: dict[int, set[tuple[IPv4Address, int]]] = {}
        for old, new in maps.lb.changed.values():
            table = new or old
            if table is None or not table.close_removed:
                continue
            left = new.gone_since(old) if new is not None else {(a.ip, a.port)
                                                                  for a in table.slots}
            if left:
                gone.setdefault(table.service_id, set()).update(left)
        if not gone:
            return
        targets = set().union(*gone.values())
        diag = SockDiag()
        try:
            closed = diag.destroy(targets, lambda cookie: (
                (sid := maps.ksock_service(cookie)) is not None and sid in gone))
        except OSError as exc:
            log.warning("could not close connections to removed endpoints: %s", exc)
            return
        finally:
            diag.close()
        log.info("closed %d kernel-path connections to %d removed endpoints", closed,
                 len(targets))

    def set_dns(self, port: int | None) -> None:
        self._require_maps().set_dns(port)

    def stats(self) -> dict[str, int]:
        return self._require_maps().stats()

    def origdst(self, client: HostPort) -> HostPort | None:
        """Where a connection redirected to the proxy was going, by its client address."""
        dst = self._require_maps().origdst(client.ip, client.port)
        return HostPort(*dst) if dst is not None else None

    def _sync_inbound(self, state: CaptureState) -> None:
        if self._inbound is None or state.inbound == self._inbound_rules:
            return
        self._inbound_rules = None  # unknown until it succeeded: the next sync writes again
        self._inbound.sync(state.inbound_modes())
        self._inbound_rules = state.inbound

    def inbound_counts(self) -> dict[str, dict[str, int]]:
        if self._inbound is None or self._inbound_rules is None:
            return {}
        return per_service(self._inbound_rules, self._inbound.counts())

    def remove(self) -> None:
        # Inbound enforcement first (fail open: plaintext is let through again), whichever
        # mechanism the ledger lists, adopted by this object or not.
        failures = [*(self._inbound.remove() if self._inbound is not None else []),
                    *BpfInbound(self.ctx, self.build).remove(),
                    *IptablesInbound(self.ctx).remove()]
        self._inbound = self._inbound_rules = None
        # Fail open first: with no service flagged and DNS off, every connect and query passes
        # untouched even while the programs are still attached.
        if self._maps is not None:
            try:
                self._maps.clear_services()
            except MeshnodeError as exc:
                log.warning("clearing service flags failed: %s", exc)
            try:
                self._maps.set_dns(None)
            except MeshnodeError as exc:
                log.warning("turning DNS redirect off failed: %s", exc)
            self._maps.close()
            self._maps = None
        # Then detach, connect hooks first (see EntrySpec.detach_order), then unpin.
        order = {e.function: e.detach_order for e in all_entries()}
        failures += self.ctx.ledger.undo(
            [*self._own_entries(KIND_ATTACH), *self._own_entries(KIND_PIN_DIR)], UNDO,
            key=lambda e: (e["kind"] == KIND_PIN_DIR, order.get(str(e.get("function")), 99)))
        if failures:
            raise CaptureError("eBPF capture not fully removed: " + "; ".join(failures),
                               "the next agent start sweeps the rest (or run the sweep now)")

    # -- steps -----------------------------------------------------------------------------

    def _own_entries(self, kind: str) -> list[Entry]:
        pin_dir = str(self.ctx.pin_dir)
        return [e for e in self.ctx.ledger.entries(kind)
                if e.get("pin_dir") == pin_dir or e.get("path") == pin_dir]

    def _make_pin_dir(self, tx: Transaction) -> None:
        pin_dir = self.ctx.pin_dir
        # Checked before recording: a dir in use is not ours, and a sweep must not remove it.
        if pin_dir.is_dir() and any(pin_dir.iterdir()):
            raise CaptureError(
                f"BPF pin directory {pin_dir} is not empty",
                "another agent uses this instance name, or a crashed one was not swept: "
                "stop it or run the sweep", errno=errno.EEXIST)
        tx.record(KIND_PIN_DIR, path=str(pin_dir))
        # Parents (e.g. /sys/fs/bpf/meshnode) are shared by every instance and left in place
        # unless empty at removal; another instance may remove an empty parent meanwhile.
        for _ in range(3):
            try:
                pin_dir.parent.mkdir(parents=True, exist_ok=True)
                pin_dir.mkdir()
                break
            except FileExistsError:
                break
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise BpfError(f"cannot create {pin_dir}: {exc.strerror}",
                               "is bpffs mounted at /sys/fs/bpf?", errno=exc.errno) from exc

    def _run_loader(self, tag: str) -> dict[str, dict[str, object]]:
        cmd = [self._python, "-m", "meshnode.bpf.loader", "--pin-dir", str(self.ctx.pin_dir),
               "--outbound-port", str(self.ctx.outbound_port),
               "--proxy-mark", hex(self.ctx.proxy_mark), "--tag", tag]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LOADER_TIMEOUT,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise BpfError(f"BPF loader did not finish within {LOADER_TIMEOUT:.0f}s",
                           "clang may be stuck: run it by hand to see where, "
                           + " ".join(cmd) + ", or use --capture iptables") from exc
        except OSError as exc:
            raise BpfError(f"BPF loader did not run: {exc}",
                           "check `python -m meshnode.bpf.loader --help` with the agent's "
                           "interpreter") from exc
        self.timings["loader"] = time.monotonic() - started
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            stderr_tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BpfError(f"BPF loader failed (exit {proc.returncode}): {stderr_tail}",
                           "run the loader by hand to see its output: "
                           + " ".join(cmd)) from None
        if not result.get("ok"):
            raise UnavailableError(f"eBPF capture unavailable: {result.get('error')}",
                                   str(result.get("hint") or "use --capture iptables"))
        inbound = result.get("inbound") or {"error": "the loader did not say"}
        self._loaded_inbound = inbound if "pin" in inbound else None
        self._inbound_error = str(inbound.get("error", ""))
        return {str(e["function"]): e for e in result["entries"]}

    def _attach(self, entry: EntrySpec, loaded: dict[str, object], tx: Transaction,
                replaces: Entry | None = None) -> None:
        """Attach one program (in place of the one `replaces` records, atomically)."""
        cgroup = self.ctx.apps_cgroup if entry.cgroup == "apps" else self.ctx.proxy_cgroup
        tx.record(KIND_ATTACH, cgroup=str(cgroup), attach_type=int(entry.attach_type),
                  function=entry.function, pin=str(loaded["pin"]),
                  prog_id=int(str(loaded["prog_id"])), pin_dir=str(self.ctx.pin_dir),
                  build=self.build)
        prog_fd = syscall.obj_get(str(loaded["pin"]))
        old_fd = None
        try:
            cg_fd = _open_cgroup(cgroup)
            try:
                if replaces is not None:
                    old_fd = _find_prog(replaces, cg_fd, int(entry.attach_type))
                syscall.prog_attach(cg_fd, prog_fd, int(entry.attach_type),
                                    replace_fd=old_fd)
            finally:
                os.close(cg_fd)
        finally:
            os.close(prog_fd)
            if old_fd is not None:
                os.close(old_fd)

    def _require_maps(self) -> CaptureMaps:
        if self._maps is None:
            raise CaptureError("eBPF capture is not installed", "call install() first")
        return self._maps


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf unless it is there already (left mounted: it is shared)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == constants.BPF_FS and right.split()[0] == "bpf":
                return
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", constants.BPF_FS],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UnavailableError(f"cannot mount bpffs at {constants.BPF_FS}: "
                               f"{proc.stderr.strip()}",
                               f"mount it yourself: mount -t bpf bpf {constants.BPF_FS}")


def _open_cgroup(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise CaptureError(f"cannot open cgroup {path}: {exc.strerror}", errno=exc.errno) from exc


# -- ledger undo (must work from a fresh process: no state but the entry) -----------------------

def _undo_attach(entry: Entry) -> None:
    """Detach one program from one cgroup. A gone cgroup took its attachments with it; a gone
    program (neither pinned nor attached) is already detached."""
    try:
        cg_fd = os.open(entry["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        attach_type = int(entry["attach_type"])
        prog_fd = _find_prog(entry, cg_fd, attach_type)
        if prog_fd is None:
            return
        try:
            syscall.prog_detach(cg_fd, prog_fd, attach_type)  # False: not attached, done
        finally:
            os.close(prog_fd)
    finally:
        os.close(cg_fd)


def _attached(entry: Entry) -> bool:
    """Whether the program the entry records is still attached to its cgroup."""
    try:
        cg_fd = os.open(entry["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        return int(entry["prog_id"]) in syscall.prog_query(cg_fd, int(entry["attach_type"]))
    except BpfError:
        return False
    finally:
        os.close(cg_fd)


def _find_prog(entry: Entry, cg_fd: int, attach_type: int) -> int | None:
    """An fd of the attached program: through its pin, else by querying the cgroup for the
    recorded id (pins can be gone while the attachment lives on)."""
    try:
        return syscall.obj_get(str(entry["pin"]))
    except BpfError as exc:
        if exc.errno != errno.ENOENT:
            raise
    if int(entry["prog_id"]) not in syscall.prog_query(cg_fd, attach_type):
        return None
    try:
        return syscall.prog_fd_by_id(int(entry["prog_id"]))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _undo_pin_dir(entry: Entry) -> None:
    """Unpin everything in the pin dir, remove it, and its parent if now empty."""
    path = Path(entry["path"])
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            os.unlink(path / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BpfError(f"cannot unpin {path / name}: {exc.strerror}",
                           errno=exc.errno) from exc
    for d in (path, path.parent):
        if d == Path(constants.BPF_FS):
            break
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if d == path or exc.errno not in (errno.ENOTEMPTY, errno.EBUSY):
                raise BpfError(f"cannot remove {d}: {exc.strerror}", errno=exc.errno) from exc
            break  # a shared parent still in use by another instance


UNDO: dict[str, UndoFn] = {KIND_ATTACH: _undo_attach, KIND_PIN_DIR: _undo_pin_dir}


def _tx_undo() -> dict[str, UndoFn]:
    """What an install may record: ours, the inbound link, the iptables inbound fallback."""
    from meshnode.capture import inbound, iptables

    return {**UNDO, **inbound.UNDO, **iptables.UNDO}
