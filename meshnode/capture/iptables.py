"""The iptables capture backend: nat REDIRECT for ready mesh destinations, filter REJECT for
fail-closed ones, both only for connects from the apps cgroup (`-m cgroup --path`, which also
matches descendants, i.e. every service's cgroup below it); and a nat REDIRECT of DNS queries
(UDP and TCP port 53) to the agent's DNS server, filled only while `set_dns` says so.

Owns this instance's three chains and their OUTPUT jumps, their ledger kinds (`UNDO`) and the
rendering of iptables/*.rules templates. A sync that changes what the kernel does rewrites only
our chains, atomically, with `iptables-restore --noflush`; one that changes nothing the chains
show (same state, or a change to services neither ready nor fail-closed) runs nothing. The
rewrite stays whole on purpose: iptables has no cheaper atomic edit of a chain, and rule-by-rule
`-I`/`-D` would let a connect see half a change; its cost grows with the mesh (one
iptables-restore of every rule per change: `make bench-scale` measures it). The proxy reads
SO_ORIGINAL_DST from conntrack in this mode. Inbound enforcement (CaptureState.inbound) is a
fourth chain, in filter INPUT (meshnode.capture.inbound.IptablesInbound).
Works with iptables-nft and iptables-legacy (whichever `detect_binary` finds usable, or the
one the caller names).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template

from meshnode import constants
from meshnode.capture import CaptureContext
from meshnode.capture.inbound import BpfInbound, IptablesInbound, per_service
from meshnode.errors import IptablesError, MeshnodeError, UnavailableError
from meshnode.host.ledger import Entry, UndoFn
from meshnode.model import CaptureRule, CaptureState, HostPort, InboundRule

log = logging.getLogger(__name__)

KIND_CHAIN = "iptables_chain"
KIND_JUMP = "iptables_jump"
CHAIN_MAX = 28  # iptables chain names: at most 28 characters
CANDIDATES = ("iptables", "iptables-nft", "iptables-legacy")
WAIT_SECONDS = "5"  # -w: wait for the xtables lock rather than fail
TIMEOUT = 30.0


def _template(name: str) -> Template:
    return Template(resources.files("meshnode.iptables_rules").joinpath(name).read_text())


def chain_name(tag: str, instance: str) -> str:
    """`MESHNODE-<tag>-<instance>`, shortened with a hash when too long (still unique)."""
    name = f"MESHNODE-{tag}-{instance}"
    if len(name) <= CHAIN_MAX:
        return name
    digest = hashlib.sha1(instance.encode()).hexdigest()[:6]
    keep = CHAIN_MAX - len(f"MESHNODE-{tag}--{digest}")
    return f"MESHNODE-{tag}-{instance[:keep]}-{digest}"


@dataclass(frozen=True, slots=True)
class Chains:
    nat: str
    filter: str
    dns: str  # nat table too

    @classmethod
    def for_instance(cls, instance: str) -> Chains:
        return cls(chain_name("NAT", instance), chain_name("REJ", instance),
                   chain_name("DNS", instance))

    def all(self) -> tuple[str, ...]:
        return (self.nat, self.filter, self.dns)


def _rule_line(template: Template, chain: str, rule: CaptureRule, outbound_port: int) -> str:
    dport = f" --dport {rule.port}" if rule.port else ""  # port 0: every port of a VIP
    return template.substitute(chain=chain, ip=rule.ip, dport=dport,
                               outbound_port=outbound_port)


def render_rules(chains: Chains, state: CaptureState, outbound_port: int,
                 proxy_mark: int) -> str:
    """The iptables-restore input that makes our two chains match `state` exactly."""
    redirect = _template("capture-nat-redirect.rules")
    refuse = _template("capture-filter-refuse.rules")
    nat_lines = "".join(_rule_line(redirect, chains.nat, r, outbound_port)
                        for r in state.redirected())
    filter_lines = "".join(_rule_line(refuse, chains.filter, r, outbound_port)
                           for r in state.refused())
    mark = f"{proxy_mark:#x}"
    nat = _template("capture-nat.rules").substitute(
        chain=chains.nat, proxy_mark=mark, outbound_port=outbound_port, rules=nat_lines)
    filt = _template("capture-filter.rules").substitute(
        chain=chains.filter, proxy_mark=mark, rules=filter_lines)
    return nat + filt


def render_dns(chain: str, port: int | None, proxy_mark: int) -> str:
    """The iptables-restore input for the DNS chain: redirect to 127.0.0.1:`port`, or (None)
    nothing but the mark exemption."""
    rules = ""
    if port is not None:
        rules = _template("capture-nat-dns-redirect.rules").substitute(
            chain=chain, dns_service_port=constants.DNS_SERVICE_PORT, dns_port=port)
    return _template("capture-nat-dns.rules").substitute(
        chain=chain, proxy_mark=f"{proxy_mark:#x}", rules=rules)


def jump_rule(chain: str, apps_cgroup_rel: str, instance: str,
              protocol: str | None = "tcp") -> list[str]:
    """The OUTPUT rule that sends the apps cgroup's TCP connects (or, with `protocol` None,
    all its packets: the DNS chain sorts UDP and TCP itself) into our chain."""
    proto = ["-p", protocol] if protocol else []
    return [*proto, "-m", "cgroup", "--path", apps_cgroup_rel,
            "-m", "comment", "--comment", f"meshnode:{instance}", "-j", chain]


def _run(cmd: Sequence[str], input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), input=input_text, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IptablesError(f"{cmd[0]} did not run: {exc}",
                            "install iptables (nft or legacy)") from exc


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise IptablesError(f"{what}: {msg}",
                            "check that the xt_cgroup, xt_mark, REDIRECT and REJECT targets "
                            "are available (`iptables -m cgroup -h`)",
                            errno=proc.returncode)


def usable(binary: str) -> bool:
    """Whether `binary` can list the nat table here (module loaded, backend works)."""
    if shutil.which(binary) is None or shutil.which(binary + "-restore") is None:
        return False
    proc = _run([binary, "-w", WAIT_SECONDS, "-t", "nat", "-S", "OUTPUT"])
    return proc.returncode == 0


def detect_binary() -> str:
    for binary in CANDIDATES:
        if usable(binary):
            return binary
    raise UnavailableError("no usable iptables (tried " + ", ".join(CANDIDATES) + ")",
                           "install iptables: apt-get install iptables")


class IptablesCapture:
    """Capture with nat REDIRECT / filter REJECT. `install` → `sync`* → `remove`."""

    name = "iptables"
    # None of CAP_*: REDIRECT counters count packets, not connections; conntrack answers
    # SO_ORIGINAL_DST without the dialing process.
    capabilities: frozenset[str] = frozenset()

    def __init__(self, ctx: CaptureContext, binary: str | None = None) -> None:
        self.ctx = ctx
        self.binary = binary  # resolved by install() when None
        self.chains = Chains.for_instance(ctx.instance)
        self._installed = False
        # The last state synced and the text it rendered to: what our chains hold now.
        self._state: CaptureState | None = None
        self._rendered: str | None = None
        self.restores = 0  # iptables-restore runs for the capture chains (tests, timing logs)
        self._inbound = IptablesInbound(ctx, binary)
        # What the inbound chain enforces now (None: unknown, the next sync writes it).
        self._inbound_rules: frozenset[InboundRule] | None = frozenset()
        self.inbound_reason = "iptables: filter INPUT chain"

    def _bin(self) -> str:
        if self.binary is None:
            self.binary = detect_binary()
        return self.binary

    def install(self) -> None:
        binary = self._bin()
        if not usable(binary):
            raise UnavailableError(f"{binary} is not usable here",
                                   "choose another with the iptables binary setting")
        apps = self.ctx.apps_cgroup_rel
        self._state = self._rendered = None  # the chains are made anew: nothing to skip
        # All or nothing: a failure takes back what this install recorded, newest first.
        with self.ctx.ledger.transaction(UNDO) as tx:
            # Chains first (created by an empty sync, DNS off), then the jumps into them.
            for table, chain in (("nat", self.chains.nat), ("filter", self.chains.filter),
                                 ("nat", self.chains.dns)):
                tx.record(KIND_CHAIN, binary=binary, table=table, chain=chain)
            self._restore(CaptureState())
            self._restore_dns(None)
            # The DNS jump is inserted first, so it ends up after the mesh capture jump: a TCP
            # connect to a mesh destination's port 53 is mesh traffic, as under eBPF.
            jumps = (("nat", jump_rule(self.chains.dns, apps, self.ctx.instance, None)),
                     ("nat", jump_rule(self.chains.nat, apps, self.ctx.instance)),
                     ("filter", jump_rule(self.chains.filter, apps, self.ctx.instance)))
            for table, rule in jumps:
                tx.record(KIND_JUMP, binary=binary, table=table, parent="OUTPUT",
                          chain=rule[-1], rule=rule)
                if not _rule_exists(binary, table, "OUTPUT", rule):
                    # First in OUTPUT: our cgroup match is narrow, and must win over broad
                    # rules appended by others.
                    _check(_run([binary, "-w", WAIT_SECONDS, "-t", table, "-I", "OUTPUT", "1",
                                 *rule]), f"adding the {table} OUTPUT jump")
            self._inbound = IptablesInbound(self.ctx, binary)
            self._inbound.install(tx)
        self._inbound_rules = frozenset()  # made empty
        self._installed = True

    def adopt(self) -> None:
        """Take over the chains and jumps an earlier agent of this instance installed (the
        ledger's entries). Nothing is rewritten here: the first sync replaces the chains'
        rules in one iptables-restore, so capture never pauses. IptablesError when they are
        not all there (the caller reinstalls)."""
        mine = self._own_entries()
        if not mine:
            raise IptablesError("no iptables capture of this instance to adopt",
                                "it is installed anew")
        binary = self.binary = str(mine[0]["binary"])
        for e in mine:
            there = (_rule_exists(binary, e["table"], e["parent"], [str(x) for x in e["rule"]])
                     if e["kind"] == KIND_JUMP else
                     _run([binary, "-w", WAIT_SECONDS, "-t", e["table"], "-S",
                           e["chain"]]).returncode == 0)
            if not there:
                raise IptablesError(f"{e['table']} {e['kind']} {e['chain']} is gone",
                                    "the capture is installed anew")
        self._inbound = IptablesInbound(self.ctx, binary)
        try:
            self._inbound.adopt()
        except IptablesError as exc:  # e.g. an agent from before inbound enforcement
            log.warning("cannot adopt the inbound chain (%s): making it anew", exc)
            for failure in self._inbound.remove():
                log.warning("removing the old inbound chain: %s", failure)
            with self.ctx.ledger.transaction(UNDO) as tx:
                self._inbound.install(tx)
        self._inbound_rules = None
        self._installed = True
        self._state = self._rendered = None  # unknown: the first sync writes

    def _own_entries(self) -> list[Entry]:
        return [e for e in self.ctx.ledger.entries()
                if e["kind"] in (KIND_JUMP, KIND_CHAIN) and e.get("chain") in self.chains.all()]

    def sync(self, state: CaptureState) -> None:
        if not self._installed:
            raise IptablesError("iptables capture is not installed", "call install() first")
        started = time.perf_counter()
        if state == self._state:  # cheap when the caller reuses unchanged sets
            return
        restores = self.restores
        self._restore(state)
        if state.inbound != self._inbound_rules:
            self._inbound_rules = None
            try:
                self._inbound.sync(state.inbound_modes())
            except MeshnodeError:
                self._state = None  # the next sync (a retry of this one) must write again
                raise
            self._inbound_rules = state.inbound
        log.debug("capture sync: %s in %.1f ms",
                  "iptables-restore" if self.restores > restores else "chains unchanged",
                  (time.perf_counter() - started) * 1000)

    def _restore(self, state: CaptureState) -> None:
        text = render_rules(self.chains, state, self.ctx.outbound_port, self.ctx.proxy_mark)
        if text != self._rendered:
            # Unknown until it succeeds: a failed restore leaves the chains as they were or,
            # if iptables died midway, unknown; either way the next sync must write.
            self._state = self._rendered = None
            _check(_run([self._bin() + "-restore", "-w", WAIT_SECONDS, "--noflush"], text),
                   "iptables-restore of the capture chains")
            self.restores += 1
            self._rendered = text
        self._state = state

    def set_dns(self, port: int | None) -> None:
        if not self._installed:
            raise IptablesError("iptables capture is not installed", "call install() first")
        if port is not None and not 0 < port < 65536:
            raise IptablesError(f"invalid DNS port {port}", "use 1..65535")
        self._restore_dns(port)

    def _restore_dns(self, port: int | None) -> None:
        text = render_dns(self.chains.dns, port, self.ctx.proxy_mark)
        _check(_run([self._bin() + "-restore", "-w", WAIT_SECONDS, "--noflush"], text),
               "iptables-restore of the DNS chain")

    def stats(self) -> dict[str, int]:
        return {}  # packet counters of REDIRECT rules count packets, not connections

    def origdst(self, client: HostPort) -> HostPort | None:
        return None  # only the kernel path's stragglers ask, and this backend has none

    def inbound_counts(self) -> dict[str, dict[str, int]]:
        if self._inbound_rules is None:
            return {}
        return per_service(self._inbound_rules, self._inbound.counts())

    def remove(self) -> None:
        # Inbound refusal first (fail open), also a sk_lookup link an eBPF agent left; then
        # the capture jumps: capture stops at once, then the chains go.
        failures = [*self._inbound.remove(), *BpfInbound(self.ctx, "").remove()]
        self._inbound_rules = None
        mine = self._own_entries()
        failures += self.ctx.ledger.undo(
            mine, UNDO, key=lambda e: (e["kind"] != KIND_JUMP, e["table"] != "nat"))
        self._installed = False
        self._state = self._rendered = None
        if failures:
            raise IptablesError("iptables capture not fully removed: " + "; ".join(failures),
                                "the next agent start sweeps the rest")


def _rule_exists(binary: str, table: str, parent: str, rule: list[str]) -> bool:
    # -C exits 1 when the rule is absent (or its target chain is gone): both mean "not there".
    proc = _run([binary, "-w", WAIT_SECONDS, "-t", table, "-C", parent, *rule])
    return proc.returncode == 0


def _undo_jump(entry: Entry) -> None:
    binary, table, parent = entry["binary"], entry["table"], entry["parent"]
    rule = [str(x) for x in entry["rule"]]
    for _ in range(16):  # duplicates (an interrupted install retried) are removed too
        if not _rule_exists(binary, table, parent, rule):
            return
        _check(_run([binary, "-w", WAIT_SECONDS, "-t", table, "-D", parent, *rule]),
               f"removing the {table} {parent} jump")
    raise IptablesError(f"{table} {parent} jump keeps reappearing", "is another agent running?")


def _undo_chain(entry: Entry) -> None:
    binary, table, chain = entry["binary"], entry["table"], entry["chain"]
    if _run([binary, "-w", WAIT_SECONDS, "-t", table, "-S", chain]).returncode != 0:
        return  # no such chain: done
    _check(_run([binary, "-w", WAIT_SECONDS, "-t", table, "-F", chain]), f"flushing {chain}")
    _check(_run([binary, "-w", WAIT_SECONDS, "-t", table, "-X", chain]), f"deleting {chain}")


UNDO: dict[str, UndoFn] = {KIND_JUMP: _undo_jump, KIND_CHAIN: _undo_chain}
