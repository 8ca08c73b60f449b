"""The etcd registry's resource writes: an apply as one transaction (compare-and-swap on
every resource's mod revision, the VIP reservations, the history entries, a deleted
Service's endpoints and claims), planned again after a lost race; and the history reads.

Owns the resources/, history/ and vips/ keys' writes (layout in etcd_keys.py). Calls go
through the registry's session; the results go into its mirror at once (read your writes),
and `on_applied` tells the registry. Imports no etcd client: only request messages.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import Any

from meshnode.discovery.etcd_keys import EndpointKey, KeyLayout, prefix_end
from meshnode.discovery.etcd_mirror import Mirror
from meshnode.discovery.etcd_requests import cmp as _cmp
from meshnode.discovery.etcd_requests import delete as _delete
from meshnode.discovery.etcd_requests import put as _put
from meshnode.discovery.etcd_session import EtcdSession
from meshnode.discovery.registry import VipRange
from meshnode.errors import MeshnodeError, TemporaryError, UsageError
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome

log = logging.getLogger(__name__)

# an apply costs each resource a compare and two puts (document and history), a new VIP one
# more of each; etcd refuses more than 128 of either (--max-txn-ops)
TXN_RESOURCES = 40
TXN_DELETES = 100
# Optimistic transactions retry when another agent wrote in between; each failure returns
# the current state, so only new concurrent writers can make one fail again.
MAX_ATTEMPTS = 100


class ResourceWriter:
    def __init__(self, session: EtcdSession, keys: KeyLayout, mirror: Mirror, vips: VipRange,
                 on_applied: Callable[[bool], None]) -> None:
        self._session = session
        self._keys = keys
        self._mirror = mirror
        self._vips = vips
        self._on_applied = on_applied

    async def apply(self, puts: Sequence[Resource], deletes: Sequence[Delete] = ()
                    ) -> list[Outcome]:
        """One etcd transaction for the whole apply: every resource compared at the version
        the plan was made from (its mod revision, or absent), every new VIP reservation
        compared absent. When another writer came first the transaction fails, the mirror
        catches up from etcd, and the plan is made again: a document that named the version
        it expects then fails with ConflictError; one that did not replaces the newer one,
        as `kubectl apply` does."""
        if len(puts) + len(deletes) > TXN_RESOURCES:
            raise UsageError(f"an apply may change at most {TXN_RESOURCES} resources at once "
                             f"with etcd (its --max-txn-ops); this one has "
                             f"{len(puts) + len(deletes)}",
                             "split the documents over several applies")
        client = self._session.live()
        for _ in range(MAX_ATTEMPTS):
            # a copy: the watch may change the mirror while the transaction is built (awaits),
            # and the compares must be the versions the plan was made from
            stored = dict(self._mirror.resources())
            outcomes = store.plan(stored, puts, deletes)
            if all(o.action == "unchanged" for o in outcomes):
                return outcomes
            txn = await self._apply_txn(client, stored, puts, deletes, outcomes)
            resp = await self._session.txn(client, "apply", *txn)
            if resp.succeeded:
                rev = int(resp.header.revision)
                self._applied(txn[1], rev)
                await self._trim_history(client, [(o.kind, o.name) for o in outcomes
                                                   if o.action != "unchanged"])
                return [o if o.action in ("unchanged", "deleted") else
                        Outcome(o.kind, o.name, o.action, rev) for o in outcomes]
            await self._catch_up(client, [r.key for r in puts] + [d.key for d in deletes])
        raise TemporaryError("too many concurrent changes to these resources",
                             "retry the command")

    async def _apply_txn(self, client: Any, stored: dict[tuple[str, str], Resource],
                         puts: Sequence[Resource], deletes: Sequence[Delete],
                         outcomes: list[Outcome]) -> tuple[list[Any], list[Any], list[Any]]:
        compare: list[Any] = []
        success: list[Any] = []
        now = time.time()
        changed = [r for r, o in zip(puts, outcomes, strict=False) if o.action != "unchanged"]
        gone = list(deletes)
        current = self._mirror.service_vips()
        vips = self._vips.assign(current, self._mirror.reserved_vips(), changed,
                                 [d.name for d in gone if d.kind == "Service"])
        for r in changed:
            key = self._keys.resource(r.kind, r.name)
            old = stored.get(r.key)
            compare.append(_cmp(key, "mod", old.version) if old else _cmp(key, "create", 0))
            status = None
            if r.kind == "Service":
                vip = vips[r.name]
                status = {"vip": str(vip)}
                if current.get(r.name) != vip:
                    vkey = self._keys.vip(vip)
                    compare.append(_cmp(vkey, "create", 0))
                    success.append(_put(vkey, r.name.encode()))
                    if r.name in current:
                        success.append(_delete(self._keys.vip(current[r.name])))
            success.append(_put(key, store.encode(r, status)))
            success.append(_put(self._history_key(r.kind, r.name),
                                json.dumps(HistoryEntry(0, r.spec_builtins(), now).to_json())
                                .encode()))
        for d in gone:
            key = self._keys.resource(d.kind, d.name)
            compare.append(_cmp(key, "mod", stored[d.key].version))
            success += [_delete(key), _put(self._history_key(d.kind, d.name),
                                           json.dumps(HistoryEntry(0, None, now).to_json())
                                           .encode())]
            if d.kind == "Service":
                success += await self._service_teardown(client, d.name, current.get(d.name),
                                                        compare)
        return compare, success, []

    def _history_key(self, kind: str, name: str) -> bytes:
        """A new history key: its mod revision, set by the transaction that writes it beside
        the version it records, is that version; the token only has to be unique."""
        return self._keys.history(kind, name, f"{time.time_ns():020d}-{secrets.token_hex(4)}")

    async def _service_teardown(self, client: Any, name: str, vip: IPv4Address | None,
                                compare: list[Any]) -> list[Any]:
        """What deleting a Service also deletes: its VIP reservation, its endpoints and their
        address claims. The comparison fails the transaction if an endpoint was added since
        the read: no address claim may outlive its service."""
        start = self._keys.endpoints_of(name)
        eps = await self._session.range(client, start)
        claims = [self._keys.claim(p.addr, name, p.node) for kv in eps.kvs
                  if isinstance(p := self._keys.parse(kv.key), EndpointKey)]
        if len(claims) > TXN_DELETES:
            raise UsageError(f"Service {name} has {len(claims)} endpoints: too many to delete "
                             "in one transaction",
                             f"remove its endpoints first: meshnode service remove {name} "
                             "--endpoint ...")
        compare.append(_cmp(start, "mod", int(eps.header.revision) + 1, "<", prefix_end(start)))
        ops = [_delete(start, prefix_end(start))] + [_delete(c) for c in claims]
        if vip is not None:
            ops.append(_delete(self._keys.vip(vip)))
        return ops

    def _applied(self, success: list[Any], rev: int) -> None:
        """Our transaction's puts and deletes, into the mirror at once (read your writes)."""
        removed_service = False
        for op in success:
            if op.HasField("request_put"):
                self._mirror.put(bytes(op.request_put.key), bytes(op.request_put.value), rev,
                                 int(op.request_put.lease))
            elif op.HasField("request_delete_range") and not op.request_delete_range.range_end:
                self._mirror.delete(bytes(op.request_delete_range.key), rev, local=True)
            else:  # a range: a deleted service's endpoints
                start = bytes(op.request_delete_range.key)
                for (svc, node, addr) in [k for k in self._mirror_endpoint_ids()
                                          if self._keys.endpoint(*k).startswith(start)]:
                    self._mirror.delete(self._keys.endpoint(svc, node, addr), rev, local=True)
                removed_service = True
        self._on_applied(removed_service)

    def _mirror_endpoint_ids(self) -> list[tuple[str, str, HostPort]]:
        return [(svc, node, addr) for svc, rec in self._mirror.services().items()
                for e in rec.endpoints for node, addr in [(e.node, e.addr)]]

    async def _catch_up(self, client: Any, keys: list[tuple[str, str]]) -> None:
        """After a failed compare: read the resources concerned and the VIP reservations from
        etcd, so the next plan starts from what is stored, not from a mirror the watch has
        yet to update."""
        vips = await self._session.range(client, self._keys.vips())
        for kv in vips.kvs:
            self._mirror.put(bytes(kv.key), bytes(kv.value), int(kv.mod_revision), 0)
        for kind, name in keys:
            key = self._keys.resource(kind, name)
            kv = await self._session.get(client, key)
            if kv is None:
                self._mirror.delete(key, int(self._mirror.revision) + 1)
            else:
                self._mirror.put(key, bytes(kv.value), int(kv.mod_revision), int(kv.lease))

    async def _trim_history(self, client: Any, keys: list[tuple[str, str]]) -> None:
        """Drop history beyond HISTORY_DEPTH. Best effort, after the apply: a failure leaves
        entries too many, trimmed by the next write."""
        for kind, name in keys:
            try:
                resp = await self._session.range(client, self._keys.history_of(kind, name))
                kvs = sorted(resp.kvs, key=lambda kv: int(kv.mod_revision))
                drop = [_delete(bytes(kv.key)) for kv in kvs[:-store.HISTORY_DEPTH]]
                if drop:
                    await self._session.txn(client, "trim history", [], drop, [])
            except MeshnodeError as exc:
                log.warning("history of %s %s not trimmed: %s", kind, name, exc)

    async def history(self, kind: str, name: str) -> list[HistoryEntry]:
        client = self._session.live()
        resp = await self._session.range(client, self._keys.history_of(kind, name))
        out = []
        for kv in resp.kvs:
            try:
                entry = {**json.loads(kv.value), "version": int(kv.mod_revision)}
                out.append(HistoryEntry.from_json(entry))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring history key %r: %s", bytes(kv.key), exc)
        return sorted(out, key=lambda e: e.version)[-store.HISTORY_DEPTH:]
