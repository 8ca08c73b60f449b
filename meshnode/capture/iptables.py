"""The iptables capture backend: nat REDIRECT for ready mesh destinations, filter REJECT for
fail-closed ones, both only for connects from the apps cgroup (`-m cgroup --path`, which also
matches descendants, i.e. every service's cgroup below it).

Owns this instance's two chains and their OUTPUT jumps, their ledger kinds (`UNDO`) and the
rendering of iptables/*.rules templates. Each sync rewrites only our chains, atomically, with
`iptables-restore --noflush`. The proxy reads SO_ORIGINAL_DST from conntrack in this mode.
Works with iptables-nft and iptables-legacy (whichever `detect_binary` finds usable, or the
one the caller names).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template

from meshnode.capture import CaptureContext
from meshnode.errors import IptablesError, MeshnodeError, UnavailableError
from meshnode.host.ledger import Entry, UndoFn
from meshnode.model import CaptureRule, CaptureState

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

    @classmethod
    def for_instance(cls, instance: str) -> Chains:
        return cls(chain_name("NAT", instance), chain_name("REJ", instance))


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


def jump_rule(chain: str, apps_cgroup_rel: str, instance: str) -> list[str]:
    """The OUTPUT rule that sends the apps cgroup's TCP connects into our chain."""
    return ["-p", "tcp", "-m", "cgroup", "--path", apps_cgroup_rel,
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

    def __init__(self, ctx: CaptureContext, binary: str | None = None) -> None:
        self.ctx = ctx
        self.binary = binary  # resolved by install() when None
        self.chains = Chains.for_instance(ctx.instance)
        self._installed = False

    def _bin(self) -> str:
        if self.binary is None:
            self.binary = detect_binary()
        return self.binary

    def install(self) -> None:
        binary = self._bin()
        if not usable(binary):
            raise UnavailableError(f"{binary} is not usable here",
                                   "choose another with the iptables binary setting")
        created: list[Entry] = []
        try:
            # Chains first (created by an empty sync), then the jumps that lead into them.
            for table, chain in (("nat", self.chains.nat), ("filter", self.chains.filter)):
                created.append(self.ctx.ledger.record(KIND_CHAIN, binary=binary, table=table,
                                                      chain=chain))
            self._restore(CaptureState())
            rule = {t: jump_rule(c, self.ctx.apps_cgroup_rel, self.ctx.instance)
                    for t, c in (("nat", self.chains.nat), ("filter", self.chains.filter))}
            for table in ("nat", "filter"):
                created.append(self.ctx.ledger.record(
                    KIND_JUMP, binary=binary, table=table, parent="OUTPUT",
                    chain=rule[table][-1], rule=rule[table]))
                if not _rule_exists(binary, table, "OUTPUT", rule[table]):
                    # First in OUTPUT: our cgroup match is narrow, and must win over broad
                    # rules appended by others.
                    _check(_run([binary, "-w", WAIT_SECONDS, "-t", table, "-I", "OUTPUT", "1",
                                 *rule[table]]), f"adding the {table} OUTPUT jump")
        except BaseException:
            for rec in reversed(created):
                try:
                    UNDO[rec["kind"]](rec)
                    self.ctx.ledger.forget(rec)
                except MeshnodeError:
                    pass  # stays in the ledger for the next sweep
            raise
        self._installed = True

    def sync(self, state: CaptureState) -> None:
        if not self._installed:
            raise IptablesError("iptables capture is not installed", "call install() first")
        self._restore(state)

    def _restore(self, state: CaptureState) -> None:
        text = render_rules(self.chains, state, self.ctx.outbound_port, self.ctx.proxy_mark)
        _check(_run([self._bin() + "-restore", "-w", WAIT_SECONDS, "--noflush"], text),
               "iptables-restore of the capture chains")

    def stats(self) -> dict[str, int]:
        return {}  # packet counters of REDIRECT rules count packets, not connections

    def remove(self) -> None:
        # Jumps first: capture stops at once (fail open), then the chains go.
        mine = [e for e in self.ctx.ledger.entries()
                if e["kind"] in (KIND_JUMP, KIND_CHAIN)
                and e.get("chain") in (self.chains.nat, self.chains.filter)]
        failures: list[str] = []
        for rec in sorted(mine, key=lambda e: (e["kind"] != KIND_JUMP, e["table"] != "nat")):
            try:
                UNDO[rec["kind"]](rec)
                self.ctx.ledger.forget(rec)
            except MeshnodeError as exc:
                failures.append(str(exc))
        self._installed = False
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
