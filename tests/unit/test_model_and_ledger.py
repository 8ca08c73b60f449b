from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshnode import constants as C
from meshnode.errors import KernelError, UsageError, from_wire
from meshnode.host.ledger import Ledger
from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec
from meshnode.wire import agent_codec, as_update, encode, update_message


@pytest.mark.parametrize("text", ["", "1.2.3.4", "1.2.3.4:", ":80", "host:80", "1.2.3.4:0",
                                  "1.2.3.4:70000", "1.2.3.4:x", "::1:80", "1.2.3:80"])
def test_bad_addresses_are_usage_errors_with_a_hint(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        HostPort.parse(text)
    assert exc.value.hint and exc.value.exit_code == 64


def test_updates_survive_the_wire() -> None:
    u = Reset(ServiceSpec.build("web", 3, HostPort.parse("127.240.0.9:1").ip, 80, True),
              (Endpoint(HostPort.parse("127.0.0.1:8001")),))
    assert as_update(agent_codec().decode(encode(update_message(u)))) == u  # type: ignore[arg-type]


def test_errors_survive_the_wire() -> None:
    err = from_wire(UsageError("bad", "fix it").to_wire())
    assert isinstance(err, UsageError) and err.hint == "fix it" and err.exit_code == 64


def test_a_kernel_error_keeps_its_errno_across_the_wire() -> None:
    # from_wire used to build errors without their constructor: errno was lost (AttributeError)
    err = from_wire(KernelError("bpf_prog_load failed", "see dmesg", errno=13).to_wire())
    assert isinstance(err, KernelError) and err.errno == 13
    assert (err.message, err.hint, err.exit_code) == ("bpf_prog_load failed", "see dmesg", 71)


def _c_sources() -> dict[str, str]:
    """Every C file the loader compiles, comments removed (they name `MN_STAT_*` patterns)."""
    root = Path(__file__).resolve().parents[2] / "bpf"
    files = [*sorted(root.glob("*.c")), *sorted((root / "include").glob("*.h"))]
    assert len(files) >= 5, files  # the four programs and mn_maps.h at least
    comment = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
    return {f.name: comment.sub(" ", f.read_text()) for f in files}


def test_bpf_defines_cover_the_c_constants() -> None:
    """Every MN_ name the C uses comes from constants.bpf_defines() (a -D flag), is the pin dir
    (also a -D flag), or is defined in the C itself (#define, enum member, include guard); and
    every constant handed to the compiler is used, so none is dead in one language only."""
    d = C.bpf_defines()
    assert d["MN_OUTBOUND_PORT"] == C.OUTBOUND_PORT and d["MN_PROXY_MARK"] == C.PROXY_MARK
    assert all(k.startswith("MN_") and isinstance(v, int) for k, v in d.items())
    sources = _c_sources()
    text = "\n".join(sources.values())
    used = set(re.findall(r"\bMN_[A-Z0-9_]+\b", text))
    defined_in_c = set(re.findall(r"#\s*(?:define|ifndef)\s+(MN_[A-Z0-9_]+)", text))
    defined_in_c |= set(re.findall(r"\b(MN_[A-Z0-9_]+)\s*=", text))  # enum members
    from_flags = set(d) | {"MN_PIN_DIR"}
    assert sorted(used - defined_in_c - from_flags) == []
    assert sorted(set(d) - used) == []
    assert not defined_in_c & set(d), "a constants.py value restated in C"


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


def test_transaction_unwinds_newest_first_when_the_install_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.json"
    led = Ledger(path)
    led.record("old", n=0)  # made before: a leftover the transaction must not touch
    undone: list[int] = []

    def stuck(e: dict[str, object]) -> None:
        raise OSError("device busy")

    undo = {"old": lambda e: undone.append(-1), "a": lambda e: undone.append(int(e["n"])),
            "stuck": stuck}
    with pytest.raises(RuntimeError, match="loader failed"), led.transaction(undo) as tx:
        tx.record("a", n=1)
        tx.record("stuck", n=2)
        tx.record("a", n=3)
        tx.record("old", n=0)  # already recorded: not this transaction's
        raise RuntimeError("loader failed")
    assert undone == [3, 1]  # newest first; the failing undo did not stop the rest
    # The failed undo is logged and kept for the next sweep; the rest is gone, on disk too.
    assert "device busy" in caplog.text
    assert Ledger(path).entries() == [{"kind": "old", "n": 0}, {"kind": "stuck", "n": 2}]


def test_transaction_keeps_its_entries_when_the_install_succeeds(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.json")
    with led.transaction({"a": lambda e: pytest.fail("nothing to unwind")}) as tx:
        tx.record("a", n=1)
    assert Ledger(tmp_path / "ledger.json").entries() == [{"kind": "a", "n": 1}]


def test_transaction_unwinds_on_interrupt_too(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.json")
    undone: list[object] = []
    with pytest.raises(KeyboardInterrupt), led.transaction({"a": undone.append}) as tx:
        tx.record("a", n=1)
        raise KeyboardInterrupt
    assert undone == [{"kind": "a", "n": 1}] and led.entries() == []


def test_undo_follows_the_given_order_and_collects_failures(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.json")
    for kind, n in (("dir", 1), ("attach", 2), ("attach", 1), ("dir", 2)):
        led.record(kind, n=n)
    order: list[tuple[str, int]] = []

    def undo_dir(e: dict[str, object]) -> None:
        if e["n"] == 2:
            raise OSError("not empty")
        order.append(("dir", int(str(e["n"]))))

    failures = led.undo(led.entries(), {"attach": lambda e: order.append(("attach", e["n"])),
                                        "dir": undo_dir},
                        key=lambda e: (e["kind"] == "dir", e["n"]))
    assert order == [("attach", 1), ("attach", 2), ("dir", 1)]
    assert len(failures) == 1 and "not empty" in failures[0]
    assert led.entries() == [{"kind": "dir", "n": 2}]
    assert led.undo(led.entries(), {}) == [f"no undo for ledger entry {led.entries()[0]}"]
