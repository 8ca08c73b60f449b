"""The incremental compiler against the whole-registry rules it is built from: after any
sequence of changes, the updates it emitted bring a worker to exactly what a full compile
says, and its capture state is the full one; and it touches only what changed."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.registry import EndpointRecord, patch_service
from meshnode.model import Add, DoesNotExist, Endpoint, HostPort, Remove, Reset, Update
from meshnode.policy import compiler
from meshnode.policy.store import Delete


def play(view: dict[str, compiler.Entry], updates: list[Update]) -> None:
    """Apply updates as a worker's route table does."""
    for u in updates:
        match u:
            case Reset(spec, eps):
                view[spec.name] = (spec, frozenset(eps))
            case Add(name, eps):
                spec, have = view[name]
                view[name] = (spec, have | set(eps))
            case Remove(name, eps):
                spec, have = view[name]
                view[name] = (spec, have - set(eps))
            case DoesNotExist(name):
                view.pop(name, None)


def test_incremental_runs_match_the_full_compile(tmp_path: Path) -> None:
    async def go() -> None:
        rng = random.Random(12)
        r = EmbeddedRegistry(tmp_path / "r.json")
        c = compiler.Compiler()
        view: dict[str, compiler.Entry] = {}
        last = c.capture_state(True)
        down: set[tuple[str, HostPort]] = set()

        def healthy(name: str, addr: HostPort) -> bool:
            return (name, addr) not in down

        for step in range(300):
            names = sorted(r.services())
            op = rng.random()
            dirty: set[str] = set()
            if op < 0.25 or not names:
                await patch_service(r, f"s{rng.randrange(12)}",
                                    {"port": rng.choice([80, 81]),
                                     "failMode": rng.choice(["open", "closed"])})
            elif op < 0.55:
                name = rng.choice(names)
                addr = HostPort.parse(f"127.0.{name[1:]}.{rng.randrange(1, 5)}:"
                                      f"{rng.randrange(8000, 8003)}")
                await r.add_endpoints(name, [EndpointRecord(addr, "static",
                                                            node=rng.choice(["a", "b"]),
                                                            weight=rng.randrange(1, 3))])
            elif op < 0.7:
                name = rng.choice(names)
                eps = sorted(r.services()[name].endpoints, key=lambda e: e.addr)
                if eps:
                    await r.remove_endpoints(name, [rng.choice(eps).addr])
            elif op < 0.8:
                await r.apply([], [Delete("Service", rng.choice(names))])
            else:  # a health verdict flips
                name = rng.choice(names)
                eps = sorted(r.services()[name].endpoints, key=lambda e: e.addr)
                if eps:
                    down.symmetric_difference_update({(name, rng.choice(eps).addr)})
                    dirty.add(name)
            services = r.services()
            out = c.run(services, healthy, dirty)
            play(view, out.updates)
            assert view == compiler.snapshot(services, healthy), step
            before = last
            last = c.capture_state(True)
            assert last == compiler.capture_state(services, True), step
            # the delta the state carries turns the previous state's rules into these
            hint = last.changes_since(before)
            assert hint is not None and (before.rules - hint[0]) | hint[1] == last.rules, step
            assert c.capture_state(True) is last  # nothing changed: the same object
            by_node = Counter(e.node for rec in services.values() for e in rec.endpoints)
            assert {n: k for n, k in c.endpoints_by_node.items() if k} == by_node, step
            assert c.services == len(services)
        services = r.services()
        assert c.capture_state(False) == compiler.capture_state(services, False)

    asyncio.run(go())


def test_only_changed_services_are_compiled(tmp_path: Path) -> None:
    async def go() -> None:
        r = EmbeddedRegistry(tmp_path / "r.json")
        for i in range(50):
            await patch_service(r, f"s{i}", {"port": 80})
        c = compiler.Compiler()
        assert len(c.run(r.services(), lambda *_: True).changed) == 50
        assert c.run(r.services(), lambda *_: True).updates == []  # nothing changed
        await r.add_endpoints("s7", [EndpointRecord(HostPort.parse("127.0.0.1:9"), "static")])
        out = c.run(r.services(), lambda *_: True)
        assert list(out.changed) == ["s7"]
        assert out.updates == [Add("s7", (Endpoint(HostPort.parse("127.0.0.1:9")),))]
        out = c.run(r.services(), lambda *_: False, {"s7"})  # s7's endpoint failed its check
        assert out.changed == {} and out.updates == [
            Remove("s7", (Endpoint(HostPort.parse("127.0.0.1:9")),))]

    asyncio.run(go())
