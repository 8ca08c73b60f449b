from __future__ import annotations

from pathlib import Path

import pytest

from meshnode import constants as C
from meshnode.errors import UsageError, from_wire
from meshnode.host.ledger import Ledger
from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec, update_from_wire, update_to_wire


@pytest.mark.parametrize("text", ["", "1.2.3.4", "1.2.3.4:", ":80", "host:80", "1.2.3.4:0",
                                  "1.2.3.4:70000", "1.2.3.4:x", "::1:80", "1.2.3:80"])
def test_bad_addresses_are_usage_errors_with_a_hint(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        HostPort.parse(text)
    assert exc.value.hint and exc.value.exit_code == 64


def test_updates_survive_the_wire() -> None:
    u = Reset(ServiceSpec("web", 3, HostPort.parse("127.240.0.9:1").ip, 80, True),
              (Endpoint(HostPort.parse("127.0.0.1:8001")),))
    assert update_from_wire(update_to_wire(u)) == u


def test_errors_survive_the_wire() -> None:
    err = from_wire(UsageError("bad", "fix it").to_wire())
    assert isinstance(err, UsageError) and err.hint == "fix it" and err.exit_code == 64


def test_bpf_defines_cover_the_c_constants() -> None:
    d = C.bpf_defines()
    assert d["MN_OUTBOUND_PORT"] == C.OUTBOUND_PORT and d["MN_PROXY_MARK"] == C.PROXY_MARK
    assert all(k.startswith("MN_") and isinstance(v, int) for k, v in d.items())


def test_ledger_undoes_newest_first_and_keeps_failures(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = Ledger(path)
    led.record("a", n=1)
    led.record("b", n=2)
    led.record("a", n=1)  # recorded once
    led.record("c", n=3)
    order: list[str] = []

    def fail(e: dict[str, object]) -> None:
        raise OSError("busy")

    failures = Ledger(path).undo_all({"a": lambda e: order.append("a"),
                                      "b": lambda e: order.append("b"), "c": fail})
    assert order == ["b", "a"]
    assert len(failures) == 1 and "busy" in failures[0]
    assert Ledger(path).entries() == [{"kind": "c", "n": 3}]  # kept for the next sweep
