"""The read-only service catalog for clients that balance themselves (Eureka/Ribbon, Dubbo, or
anything that speaks Consul's catalog): what `GET /v1/catalog/services` and
`GET /v1/catalog/service/<name>` on the admin port answer, with Consul-style blocking queries.

Three parts:
  `entry`        one service as the catalog shows it: its record plus health verdicts (pure);
  `parse_query`  `?index=N&wait=30s` to a `BlockingQuery`, or a UsageError naming the fix (pure);
  `Catalog`      keeps the last view and a per-agent index that grows with every change to it.
                 Each URL answers with the index of the last change to what *it* returns, so a
                 blocking query on one service is not woken by another's churn. `query` holds
                 a request on the agent's loop (stdlib asyncio) until that index passes the
                 client's or the wait ends.
The agent calls `changed()` from its registry subscription and `health_changed()` from the
health checks' flip callback. That only marks the view stale: it is read again when a request
asks or, while blocking queries wait, once per turn of the loop that saw changes. An agent
nobody asks pays nothing per change, and an answer never lags a change the agent has made.

Indexes are per agent and start again at 1 when it restarts. A client holding an index larger
than this agent ever gave gets the current state at once (Consul asks clients to reset when an
index goes backwards; this is the same contract, seen from the server).

Imports the registry records and the model; no agent, telemetry or HTTP code.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import parse_qs

from meshnode.discovery.registry import ServiceRecord
from meshnode.errors import UsageError
from meshnode.model import HostPort
from meshnode.policy.labels import Labels, labels_json

__all__ = ["DEFAULT_WAIT", "MAX_WAIT", "Answer", "BlockingQuery", "Catalog", "CatalogEndpoint",
           "CatalogService", "entry", "parse_query"]

DEFAULT_WAIT = 300.0  # seconds a blocking query waits when it names no wait (Consul's 5 min)
MAX_WAIT = 600.0  # longer waits are cut to this (Consul's cap): a proxy between gives up sooner
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}

Healthy = Callable[[str, HostPort], bool]


@dataclass(frozen=True, slots=True)
class CatalogEndpoint:
    addr: HostPort
    node: str
    zone: str
    weight: int
    healthy: bool  # endpoints of a service without health checks count as healthy (in use)
    labels: Labels = ()

    def to_json(self) -> dict[str, Any]:
        return {"address": str(self.addr.ip), "port": self.addr.port, "node": self.node,
                "zone": self.zone, "weight": self.weight,
                "health": "healthy" if self.healthy else "unhealthy",
                "labels": labels_json(self.labels)}


@dataclass(frozen=True, slots=True)
class CatalogService:
    name: str
    vip: IPv4Address
    port: int | None
    health_check: str  # tcp, http or none
    endpoints: tuple[CatalogEndpoint, ...]

    def summary(self) -> dict[str, Any]:
        """The service's line in /v1/catalog/services."""
        return {"vip": str(self.vip), "port": self.port, "endpoints": len(self.endpoints),
                "healthy": sum(e.healthy for e in self.endpoints)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "vip": str(self.vip), "port": self.port,
                "health_check": self.health_check,
                "endpoints": [e.to_json() for e in self.endpoints]}


def entry(rec: ServiceRecord, healthy: Healthy) -> CatalogService:
    """One service as the catalog shows it. Only what a client acts on: a health check's
    reason text changes on every probe, and would wake every blocking query for nothing."""
    return CatalogService(
        rec.name, rec.vip, rec.port, rec.health.kind,
        tuple(CatalogEndpoint(e.addr, e.node, e.zone, e.weight, healthy(rec.name, e.addr),
                              e.labels)
              for e in sorted(rec.endpoints, key=lambda e: e.addr)))


@dataclass(frozen=True, slots=True)
class BlockingQuery:
    """`index`: answer once the URL's index passes it (None: at once); `wait`: at most this
    many seconds."""

    index: int | None = None
    wait: float = DEFAULT_WAIT


def parse_query(query: str) -> BlockingQuery:
    """A catalog URL's query string. UsageError names the parameter and the fix."""
    params = parse_qs(query, keep_blank_values=True)
    if unknown := sorted(params.keys() - {"index", "wait"}):
        raise UsageError(f"unknown query parameter {unknown[0]!r}",
                         "the catalog takes index=N and wait=DURATION (e.g. wait=30s)")
    for key, values in params.items():
        if len(values) > 1:
            raise UsageError(f"{key} is given {len(values)} times", f"give {key} once")
    index = None
    if "index" in params:
        raw = params["index"][0]
        if not raw.isascii() or not raw.isdigit():
            raise UsageError(f"index must be a whole number, not {raw!r}",
                             "pass the X-Meshnode-Index of the previous answer")
        index = int(raw)
    wait = DEFAULT_WAIT
    if "wait" in params:
        raw = params["wait"][0]
        m = _DURATION.match(raw)
        if m is None:
            raise UsageError(f"wait must be a duration, not {raw!r}",
                             "write it as 500ms, 30s or 5m (at most 10m)")
        wait = min(float(m.group(1)) * _UNIT[m.group(2)], MAX_WAIT)
    return BlockingQuery(index, wait)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one catalog URL returns now: its index, and the body (None: no such service)."""

    index: int
    body: dict[str, Any] | None


class Catalog:
    """The last catalog view, its indexes and the blocking queries waiting on them.

    `services` is the registry's local snapshot and `healthy` the health verdicts; both are
    read on the agent's loop only, after a change, never per request. Registry records are
    immutable and kept while unchanged, so after a registry change a service whose record is
    the same object keeps its entry (one identity check per service, not a rebuild); only a
    health flip makes the catalog ask every endpoint's verdict again."""

    def __init__(self, services: Callable[[], Mapping[str, ServiceRecord]],
                 healthy: Healthy) -> None:
        self._registry = services
        self._healthy = healthy
        self.index = 0  # the agent's catalog index: 1 after the first read, then +1 a change
        self._records: dict[str, ServiceRecord] = {}  # what each entry was made from
        self._services: dict[str, CatalogService] = {}
        self._modified: dict[str, int] = {}  # a service's last change
        self._listed = 0  # the last change to /v1/catalog/services
        self._listing: tuple[int, dict[str, Any]] = (0, {})  # its body, made once per index
        self._stale = True
        self._health_stale = True
        self._scheduled = False
        self._waiting = 0  # blocking queries in `query` now
        # set and replaced on every change: the waiters of that moment wake, later ones wait
        self._changed = asyncio.Event()

    def health_changed(self) -> None:
        """A health verdict flipped (the health checks' callback: call on the loop)."""
        self._health_stale = True
        self.changed()

    def changed(self) -> None:
        """The registry changed (a registry listener: call on the loop)."""
        self._stale = True
        if self._scheduled or not self._waiting:
            return  # without waiters the next request reads the view
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop, so no waiters: the next read refreshes
        self._scheduled = True
        loop.call_soon(self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self._scheduled = False
        self.refresh()

    def refresh(self) -> None:
        """Read the view if something changed; a new index for what differs, waiters woken."""
        if not self._stale:
            return
        recheck, self._stale, self._health_stale = self._health_stale, False, False
        records = dict(self._registry())
        old = self._services
        new = {name: self._entry(rec, recheck) for name, rec in records.items()}
        self._records = records
        changed = {n for n in old.keys() | new.keys()
                   if old.get(n) is not new.get(n) and old.get(n) != new.get(n)}
        if not changed and self.index:
            return  # a change the catalog does not show (a reason text, a policy field)
        self.index += 1
        for name in changed:
            if name in new:
                self._modified[name] = self.index
            else:
                del self._modified[name]
        if not self._listed or any(
                (n in old) != (n in new) or old[n].summary() != new[n].summary()
                for n in changed):
            self._listed = self.index
        self._services = new
        self._changed.set()
        self._changed = asyncio.Event()

    def _entry(self, rec: ServiceRecord, recheck: bool) -> CatalogService:
        """`entry(rec)`, reusing the last one when nothing it shows can have changed:
        the same record, and (`recheck`: after a health flip) the same verdicts."""
        last = self._services.get(rec.name)
        if last is not None and self._records.get(rec.name) is rec and (
                not recheck
                or all(e.healthy == self._healthy(rec.name, e.addr) for e in last.endpoints)):
            return last
        return entry(rec, self._healthy)

    def index_of(self, service: str | None) -> int:
        """The index of one URL: the services list (None), or one service. An unknown
        service's is the list's: it changes when the service appears."""
        if service is not None and service in self._modified:
            return self._modified[service]
        return self._listed

    def answer(self, service: str | None) -> Answer:
        """What a URL returns now: the services list (None) or one service."""
        self.refresh()
        if service is None:
            if self._listing[0] != self._listed:
                self._listing = (self._listed, {name: s.summary()
                                                for name, s in sorted(self._services.items())})
            return Answer(*self._listing)
        found = self._services.get(service)
        return Answer(self.index_of(service), None if found is None else found.to_json())

    async def query(self, service: str | None, q: BlockingQuery) -> Answer:
        """`answer`, once the URL's index passes `q.index` or `q.wait` seconds are over.
        An index this agent never gave (it restarted since) is answered at once."""
        self.refresh()
        if q.index is None:
            return self.answer(service)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + q.wait
        self._waiting += 1
        try:
            while self.index_of(service) <= q.index <= self.index:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                event = self._changed
                try:
                    async with asyncio.timeout(remaining):
                        await event.wait()
                except TimeoutError:
                    break
                self.refresh()
        finally:
            self._waiting -= 1
        return self.answer(service)
