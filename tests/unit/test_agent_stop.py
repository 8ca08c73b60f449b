"""A stop is bounded whatever a collaborator does (the Vagrant CI's scenario e: a reload sat
for two minutes in the identity client's stop until systemd's watchdog killed the agent).

Unit tier, no root: a HostAgent that never started, given collaborators that hang the way
the real ones did (a task that ignores its cancellation, a call that never answers); the
etcd session's task likewise; systemd heard on a datagram socket of the test's own. Every
wait has a deadline, and every hanging fake is released before its test ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from meshnode.agent import host_agent, identity, systemd
from meshnode.agent.host_agent import HostAgent
from meshnode.agent.identity import IdentityClient
from meshnode.config import AgentConfig
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.etcd_session import EtcdSession
from meshnode.errors import TemporaryError

STEP = 0.2  # s: the step deadline these tests run with (the agent's is 5 s)


class Hung:
    """A stop (or detach) that waits on something that never answers and ignores being
    cancelled, as IdentityClient.stop did once its loop's asyncio.wait_for swallowed the
    cancellation. `release` lets it end."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def _hang(self) -> None:
        self.entered += 1
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()

    async def stop(self) -> None:
        await self._hang()

    async def detach(self) -> None:
        await self._hang()


class Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def stop(self) -> None:
        raise self.exc

    async def detach(self) -> None:
        raise self.exc


class Report:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentConfig:
    monkeypatch.setenv("MESHNODE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(host_agent, "STEP_DEADLINE", STEP)
    monkeypatch.setattr(host_agent, "REGISTRY_DEADLINE", STEP)
    monkeypatch.setattr(host_agent, "STRAGGLERS_DEADLINE", 0.5)
    return AgentConfig(instance="tstop", state_dir=tmp_path / "state", node="n1")


def run(coro: Coroutine[Any, Any, None]) -> None:
    """On a fresh loop, as the main task (end_stragglers cancels every other task); each
    wait inside has its own deadline, and pytest-timeout bounds the whole."""
    asyncio.run(coro)


async def finished_within(seconds: float, work: Awaitable[None]) -> float:
    """Run `work`; fail unless it finishes within `seconds` (it is left running then, for the
    caller to release). Returns how long it took."""
    task = asyncio.ensure_future(work)
    t0 = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert done, f"still running after {seconds} s"
    task.result()
    return time.monotonic() - t0


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "meshnode.agent.host_agent" and r.levelno == logging.WARNING]


def test_a_restart_goes_on_past_steps_that_never_finish(
        cfg: AgentConfig, caplog: pytest.LogCaptureFixture) -> None:
    """The identity client and the registry both hang: the detach takes a step deadline for
    each, names each in one warning, runs the steps after them and frees the lock, so the
    next agent (the re-executed one) starts."""
    async def scenario() -> None:
        agent = HostAgent(cfg)
        agent._take_lock()
        stuck_identity, stuck_registry, report = Hung(), Hung(), Report()
        agent.identity, agent.registry = cast(Any, stuck_identity), cast(Any, stuck_registry)
        agent.report = cast(Any, report)
        try:
            took = await finished_within(10 * STEP, agent.stop(remove=False))
            assert 2 * STEP <= took < 2 * STEP + 0.5, took
            said = warnings(caplog)
            assert len(said) == 2, said
            assert said[0].startswith(f"stopping: the identity client did not finish within "
                                      f"{STEP:g} s (waiting in test_agent_stop.py:")
            assert said[1].startswith("stopping: detaching from the registry did not finish")
            assert report.stopped and stuck_registry.entered == 1
            HostAgent(cfg)._take_lock()  # no ConflictError: the next agent can start

            # what still ignores cancellation is named, within the stragglers' bound
            t0 = time.monotonic()
            left = await agent.end_stragglers()
            assert time.monotonic() - t0 < 1.0
            assert len(left) == 2 and all("test_agent_stop.py" in s for s in left), left
        finally:
            stuck_identity.release.set()
            stuck_registry.release.set()
        assert await agent.end_stragglers() == []

    run(scenario())


def test_a_failing_step_is_logged_and_the_stop_goes_on(
        cfg: AgentConfig, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        agent = HostAgent(cfg)
        agent._take_lock()
        report = Report()
        agent.identity = cast(Any, Failing(RuntimeError("a bug")))
        agent.report = cast(Any, report)
        agent.registry = cast(Any, Failing(TemporaryError("etcd is unreachable")))
        await finished_within(STEP, agent.stop(remove=False))
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "stopping: the identity client failed",
            "stopping: detaching from the registry: etcd is unreachable"]
        assert errors[0].exc_info is not None  # a bug gets its traceback
        assert report.stopped
        HostAgent(cfg)._take_lock()

    run(scenario())


def test_a_stop_is_not_turned_into_a_reload_and_sigterm_wins(cfg: AgentConfig) -> None:
    """SIGTERM during a reload's detach: exit, not re-execute (`systemctl stop` must not be
    lost); SIGHUP during a stop: ignored."""
    agent = HostAgent(cfg)
    agent._reload()
    agent._terminate()
    assert agent._stop.is_set() and not agent.reload
    agent = HostAgent(cfg)
    agent._terminate()
    agent._reload()
    assert not agent.reload


def test_the_identity_client_stops_when_a_registry_change_races_the_stop(
        cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root cause: a registry change (which wakes the identity client) in the same loop
    turn as stop()."""
    monkeypatch.setattr(identity, "TICK", 60.0)  # only the wake-up ends its wait

    async def scenario() -> None:
        registry = EmbeddedRegistry(cfg.state_path / "registry.json")
        client = IdentityClient(cfg, "n1", registry, lambda: (), lambda: None)
        client.load()
        passed = asyncio.Event()
        first_step = client.step

        async def step() -> None:
            await first_step()
            passed.set()  # from here the loop goes straight into its wait for a wake-up

        client.step = step  # type: ignore[method-assign]
        client.start()
        await asyncio.wait_for(passed.wait(), 5.0)
        client.changed()
        stopping = asyncio.ensure_future(client.stop())
        try:
            await finished_within(1.0, stopping)
        finally:
            while not stopping.done():  # (the task ignored one cancellation, not every)
                assert client._task is not None
                client._task.cancel()
                await asyncio.wait({stopping}, timeout=0.1)

    run(scenario())


def test_the_etcd_session_stops_even_if_its_task_ignores_a_cancellation() -> None:
    """aetcd waits with asyncio.wait_for (connecting, creating the watch): the session task
    can miss its first cancellation; abandon() cancels again instead of waiting forever."""
    async def scenario() -> None:
        session = EtcdSession([("127.0.0.1", 1)], owner=cast(Any, None), prefix=b"/t/",
                              name="t", request_timeout=3.0)
        ignored = 0

        async def run_session() -> None:
            nonlocal ignored
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if ignored:
                        raise
                    ignored += 1

        session._task = asyncio.ensure_future(run_session())
        await asyncio.sleep(0)
        took = await finished_within(2.0, session.abandon())
        assert ignored == 1 and took < 1.0, took

    run(scenario())


class Heard:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: what arrived, and when."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.got: list[tuple[float, list[str]]] = []

    def listen(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode().splitlines()))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def test_systemd_hears_a_heartbeat_while_stopping_up_to_its_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While stopping: WATCHDOG=1 at once and then every interval (the serving heartbeat
    has ended), each extending systemd's timeout, never past the bound; then silence."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def scenario() -> None:
        heard = Heard(tmp_path / "notify.sock")
        heard.listen()
        try:
            t0 = time.monotonic()
            took = await finished_within(2.0, systemd.while_stopping(0.55))
            assert 0.5 < took < 1.0, took
            await asyncio.sleep(0.3)
            got = heard.got
            assert got and got[0][0] - t0 < 0.1, got  # the first at once
            assert 4 <= len(got) <= 7, got  # every 0.1 s
            assert got[-1][0] - t0 < took + 0.1, got  # then silence: systemd's timeouts apply
            for _, fields in got:
                assert fields[0] == "WATCHDOG=1"
                extend = int(fields[1].removeprefix("EXTEND_TIMEOUT_USEC="))
                assert 0 < extend <= 550_000
        finally:
            heard.close()

    run(scenario())


def test_outside_systemd_the_stop_heartbeat_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def scenario() -> None:
        await finished_within(0.1, systemd.while_stopping(60.0))

    run(scenario())
