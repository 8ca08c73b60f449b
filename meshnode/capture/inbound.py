"""Inbound enforcement: what a plaintext TCP connection from another host to a local endpoint
port gets, by its service's mTLS mode (CaptureState.inbound): STRICT refused at once with a
reset, PERMISSIVE let through and counted, DISABLE untouched. Local sources always pass
(loopback, and source == destination: the agent's inbound mTLS proxy connecting to a local
endpoint from the host's address).

Two mechanisms behind one small interface, owned by the capture backends (each backend keeps
one enforcer; the eBPF backend falls back to the iptables one on a kernel without sk_lookup):
- `BpfInbound`: bpf/mn_inbound.c, a sk_lookup program linked to the agent's network namespace
  by a bpf_link pinned next to the capture maps, so it outlives the agent (a restart adopts
  it; a new build swaps the program with BPF_LINK_UPDATE); SK_DROP on a listener lookup makes
  TCP answer the SYN with a reset.
- `IptablesInbound`: a filter chain jumped to from INPUT: `REJECT --reject-with tcp-reset`
  for STRICT ports, a counting RETURN for PERMISSIVE ones; rewritten whole with
  iptables-restore, carrying its counters over (`-c`).
Both count SYNs looked up, so a client's retransmitted SYN counts twice.

Owns the ledger kind of the link (`UNDO`); the chain and its jump are the iptables backend's
kinds. IPv4 only (the mesh is).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from meshnode.bpf import inbound as bpf_inbound
from meshnode.bpf import syscall
from meshnode.bpf.inbound import InboundCount, InboundMaps
from meshnode.capture import CaptureContext
from meshnode.errors import BpfError, CaptureError, IptablesError
from meshnode.host.ledger import Entry, Transaction, UndoFn
from meshnode.model import InboundRule

log = logging.getLogger(__name__)

KIND_LINK = "bpf_link"


class InboundEnforcer(Protocol):
    name: str  # "ebpf" or "iptables"

    def sync(self, strict_by_port: dict[int, bool]) -> None:
        """Enforce exactly these ports (True: STRICT, False: PERMISSIVE)."""

    def counts(self) -> dict[int, InboundCount]:
        """Port -> plaintext connections from other hosts, by verdict."""

    def remove(self) -> list[str]:
        """Stop enforcing (fail open) and remove everything; returns what could not be."""


def per_service(rules: Iterable[InboundRule], counts: dict[int, InboundCount]
                ) -> dict[str, dict[str, int]]:
    """Service name -> {"accepted": n, "refused": n} from per-port counts. A port two services
    share is counted once, for the service that decides it (the strict one, else the first
    name)."""
    owner: dict[int, InboundRule] = {}
    for r in sorted(rules, key=lambda r: (not r.strict, r.service)):
        owner.setdefault(r.port, r)
    out: dict[str, dict[str, int]] = {r.service: {"accepted": 0, "refused": 0}
                                      for r in owner.values()}
    for port, c in counts.items():
        rule = owner.get(port)
        if rule is not None:
            out[rule.service]["accepted"] += c.accepted
            out[rule.service]["refused"] += c.refused
    return out


# -- eBPF: sk_lookup on the netns ---------------------------------------------------------------

class BpfInbound:
    """The sk_lookup program linked to the calling thread's network namespace (the agent's).
    `install` or `adopt`, then `sync`* → `remove`."""

    name = "ebpf"

    def __init__(self, ctx: CaptureContext, build: str) -> None:
        self.ctx = ctx
        self.build = build
        self.link_pin = ctx.pin_dir / bpf_inbound.LINK_PIN
        self._maps: InboundMaps | None = None

    def _own_entries(self) -> list[Entry]:
        return [e for e in self.ctx.ledger.entries(KIND_LINK)
                if e.get("pin_dir") == str(self.ctx.pin_dir)]

    def install(self, loaded: dict[str, object], tx: Transaction) -> None:
        """Link the program the loader pinned (`loaded`: its function, pin, prog_id) to this
        network namespace and pin the link. The maps exist already (the loader made them)."""
        netns = Path("/proc/thread-self/ns/net")
        tx.record(KIND_LINK, pin=str(self.link_pin), pin_dir=str(self.ctx.pin_dir),
                  prog_pin=str(loaded["pin"]), prog_id=int(str(loaded["prog_id"])),
                  netns_ino=os.stat(netns).st_ino, build=self.build)
        prog_fd = syscall.obj_get(str(loaded["pin"]))
        try:
            ns_fd = os.open(netns, os.O_RDONLY)
            try:
                link_fd = syscall.link_create(prog_fd, ns_fd, bpf_inbound.ENTRY.attach_type)
            finally:
                os.close(ns_fd)
            try:
                syscall.obj_pin(link_fd, str(self.link_pin))
            finally:
                os.close(link_fd)  # the pin holds it now
        finally:
            os.close(prog_fd)
        self._maps = InboundMaps.open(self.ctx.pin_dir)

    def linked(self) -> Entry | None:
        """The ledger's link entry, if its link is pinned and still attached to a netns."""
        for entry in self._own_entries():
            try:
                fd = syscall.obj_get(str(entry["pin"]))
            except BpfError:
                continue
            try:
                info = syscall.link_info(fd)
            finally:
                os.close(fd)
            if info.netns_ino and info.prog_id == int(entry["prog_id"]):
                return entry
        return None

    def adopt(self, loaded: dict[str, object] | None) -> str:
        """Take over the link an earlier agent pinned: "kept" (same build), "replaced" (the
        program swapped in place with BPF_LINK_UPDATE: `loaded` is the new build's), or
        CaptureError when there is no attached link to adopt."""
        entry = self.linked()
        if entry is None:
            raise CaptureError("no inbound sk_lookup link of this instance to adopt",
                               "it is linked anew", errno=errno.ENOENT)
        if entry.get("build") == self.build or loaded is None:
            self._maps = InboundMaps.open(self.ctx.pin_dir)
            return "kept"
        new = self.ctx.ledger.record(
            KIND_LINK, pin=str(self.link_pin), pin_dir=str(self.ctx.pin_dir),
            prog_pin=str(loaded["pin"]), prog_id=int(str(loaded["prog_id"])),
            netns_ino=entry.get("netns_ino"), build=self.build)
        link_fd = syscall.obj_get(str(self.link_pin))
        try:
            new_fd = syscall.obj_get(str(loaded["pin"]))
            try:
                old_fd = syscall.prog_fd_by_id(int(entry["prog_id"]))
                try:
                    syscall.link_update(link_fd, new_fd, old_fd)
                finally:
                    os.close(old_fd)
            finally:
                os.close(new_fd)
        except BpfError:
            self.ctx.ledger.forget(new)
            raise
        finally:
            os.close(link_fd)
        self.ctx.ledger.forget(entry)
        if entry.get("prog_pin") != str(loaded["pin"]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(entry["prog_pin"]))
        self._maps = InboundMaps.open(self.ctx.pin_dir)
        return "replaced"

    def sync(self, strict_by_port: dict[int, bool]) -> None:
        self._require_maps().sync(strict_by_port)

    def counts(self) -> dict[int, InboundCount]:
        return self._require_maps().counts()

    def remove(self) -> list[str]:
        if self._maps is not None:
            try:
                self._maps.sync({})  # fail open first: no port listed, every SYN passes
            except BpfError as exc:
                log.warning("clearing the inbound ports failed: %s", exc)
            self._maps.close()
            self._maps = None
        return self.ctx.ledger.undo(self._own_entries(), UNDO)

    def _require_maps(self) -> InboundMaps:
        if self._maps is None:
            raise CaptureError("eBPF inbound enforcement is not installed",
                               "install or adopt the capture first")
        return self._maps


def _undo_link(entry: Entry) -> None:
    """Detach the netns link and unpin it (and its program). A gone pin is a gone link: only
    a pin keeps it alive once the agent that made it exits."""
    try:
        fd = syscall.obj_get(str(entry["pin"]))
    except BpfError as exc:
        if exc.errno != errno.ENOENT:
            raise
    else:
        try:
            syscall.link_detach(fd)
        finally:
            os.close(fd)
    for pin in (entry["pin"], entry.get("prog_pin")):
        if pin:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(pin))


# -- iptables: a filter chain from INPUT ----------------------------------------------------------

_RULE_COUNTS = re.compile(r"--dport (\d+)\b.* -c (\d+) (\d+) -j (REJECT|RETURN)")


class IptablesInbound:
    """A filter chain jumped to from INPUT. `install` or `adopt`, then `sync`* → `remove`.
    Uses the iptables backend's chain and jump ledger kinds (its undo functions)."""

    name = "iptables"

    def __init__(self, ctx: CaptureContext, binary: str | None = None) -> None:
        from meshnode.capture import iptables

        self._ipt = iptables
        self.ctx = ctx
        self.binary = binary
        self.chain = iptables.chain_name("IN", ctx.instance)
        self._rendered: str | None = None

    def _bin(self) -> str:
        if self.binary is None:
            self.binary = self._ipt.detect_binary()
        return self.binary

    def jump(self) -> list[str]:
        """The INPUT rule into our chain: TCP SYNs only (the packets of established
        connections never walk our rules), first in INPUT (before a host firewall's broad
        ACCEPTs)."""
        return ["-p", "tcp", "--syn", "-m", "comment", "--comment",
                f"meshnode:{self.ctx.instance}", "-j", self.chain]

    def own_entries(self) -> list[Entry]:
        ipt = self._ipt
        return [e for e in self.ctx.ledger.entries()
                if e["kind"] in (ipt.KIND_JUMP, ipt.KIND_CHAIN) and e.get("chain") == self.chain]

    def install(self, tx: Transaction) -> None:
        ipt, binary = self._ipt, self._bin()
        tx.record(ipt.KIND_CHAIN, binary=binary, table="filter", chain=self.chain)
        self._rendered = None
        self.sync({})
        rule = self.jump()
        tx.record(ipt.KIND_JUMP, binary=binary, table="filter", parent="INPUT",
                  chain=self.chain, rule=rule)
        if not ipt._rule_exists(binary, "filter", "INPUT", rule):
            ipt._check(ipt._run([binary, "-w", ipt.WAIT_SECONDS, "-t", "filter", "-I", "INPUT",
                               "1", *rule]), "adding the filter INPUT jump")

    def adopt(self) -> None:
        """IptablesError unless the chain and its jump are both there."""
        ipt = self._ipt
        mine = self.own_entries()
        if {e["kind"] for e in mine} != {ipt.KIND_JUMP, ipt.KIND_CHAIN}:
            raise IptablesError("no inbound chain of this instance to adopt", "it is made anew")
        self.binary = str(mine[0]["binary"])
        if not ipt._rule_exists(self.binary, "filter", "INPUT", self.jump()):
            raise IptablesError(f"the INPUT jump to {self.chain} is gone", "it is made anew")
        self._rendered = None

    def render(self, strict_by_port: dict[int, bool], counts: dict[int, InboundCount]) -> str:
        """iptables-restore input (for `-c`) that makes our chain enforce these ports, each
        rule starting from the packet count it had."""
        lines = []
        for port, strict in sorted(strict_by_port.items()):
            c = counts.get(port, InboundCount())
            lines.append(self._ipt._template(
                "capture-filter-inbound-strict.rules" if strict
                else "capture-filter-inbound-permissive.rules").substitute(
                chain=self.chain, port=port, packets=c.refused if strict else c.accepted))
        return self._ipt._template("capture-filter-inbound.rules").substitute(
            chain=self.chain, rules="".join(lines))

    def sync(self, strict_by_port: dict[int, bool]) -> None:
        ipt = self._ipt
        plain = self.render(strict_by_port, {})  # what the chain enforces, counts aside
        if plain == self._rendered:
            return
        self._rendered = None  # unknown until the restore succeeds
        # Declaring the chain flushes it: the counters are read first and restored with it.
        proc = ipt._run([self._bin(), "-w", ipt.WAIT_SECONDS, "-t", "filter", "-S",
                         self.chain, "-v"])
        counts = _parse_counts(proc.stdout) if proc.returncode == 0 else {}
        ipt._check(ipt._run([self._bin() + "-restore", "-w", ipt.WAIT_SECONDS, "--noflush",
                             "--counters"], self.render(strict_by_port, counts)),
                   "iptables-restore of the inbound chain")
        self._rendered = plain

    def counts(self) -> dict[int, InboundCount]:
        ipt = self._ipt
        proc = ipt._run([self._bin(), "-w", ipt.WAIT_SECONDS, "-t", "filter", "-S",
                         self.chain, "-v"])
        ipt._check(proc, f"reading the counters of {self.chain}")
        return _parse_counts(proc.stdout)

    def remove(self) -> list[str]:
        ipt = self._ipt
        self._rendered = None
        # the jump first: enforcement stops at once (fail open), then the chain goes
        return self.ctx.ledger.undo(self.own_entries(), ipt.UNDO,
                                    key=lambda e: e["kind"] != ipt.KIND_JUMP)


def _parse_counts(listing: str) -> dict[int, InboundCount]:
    """Per-port counts from `iptables -S CHAIN -v` (each rule shows `-c PACKETS BYTES`)."""
    out: dict[int, InboundCount] = {}
    for m in _RULE_COUNTS.finditer(listing):
        port, packets, target = int(m.group(1)), int(m.group(2)), m.group(4)
        out[port] = (InboundCount(refused=packets) if target == "REJECT"
                     else InboundCount(accepted=packets))
    return out


UNDO: dict[str, UndoFn] = {KIND_LINK: _undo_link}
