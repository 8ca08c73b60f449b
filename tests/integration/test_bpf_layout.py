"""The layout check (Cilium's alignchecker idea, on bcc): what clang makes of the structs in
bpf/include/mn_maps.h against what the Python side packs and parses.

Two levels. Sizes: the real loader (`python -m meshnode.bpf.loader`) reports bcc's Key and
Leaf sizes for every map it pins, which must equal meshnode.bpf.maps.MAP_LAYOUTS (the agent
also refuses pinned maps of other sizes when it opens them). Fields: every struct that crosses
into user space, compiled with the loader's own flags, is filled from bytes the Python side
packed (or packs bytes the Python side parses), so a swapped field, a byte-order slip or new
padding fails here instead of as a wrong destination at run time.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode import constants
from meshnode.bpf import maps
from meshnode.bpf.compile import BuildConfig, cflags
from meshnode.errors import BpfError
from meshnode.model import OrigDstAddr
from meshnode.proxy import origdst

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"
IP = IPv4Address("127.240.3.4")


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path(constants.BPF_FS) / f"meshnode-layout-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(path / name)
        path.rmdir()


def test_every_pinned_map_has_the_sizes_python_packs(pin_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "meshnode.bpf.loader", "--pin-dir",
                           str(pin_dir)], capture_output=True, text=True, timeout=100,
                          check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], result
    assert {name: tuple(sizes) for name, sizes in result["maps"].items()} == maps.MAP_LAYOUTS


# One array per struct that crosses the boundary: bcc hands back its C layout as ctypes.
PROBE = """
#include "mn_maps.h"
BPF_ARRAY(layout_addr4, struct mn_addr4, 1);
BPF_ARRAY(layout_orig, struct mn_orig, 1);
BPF_ARRAY(layout_dns_cfg, struct mn_dns_cfg, 1);
BPF_ARRAY(layout_sockaddr_in, struct mn_sockaddr_in, 1);
"""


@pytest.fixture
def c_types(pin_dir: Path) -> Iterator[dict[str, Any]]:
    from bcc import BPF

    bpf = BPF(text=PROBE, cflags=cflags(BuildConfig(pin_dir), INCLUDE))
    try:
        yield {name: bpf.get_table(f"layout_{name}".encode()).Leaf
               for name in ("addr4", "orig", "dns_cfg", "sockaddr_in")}
    finally:
        bpf.cleanup()


def _u32_of(ip: IPv4Address) -> int:
    """A network-order address as a C __u32 field holds it on this machine."""
    return int.from_bytes(ip.packed, sys.byteorder)


def test_addr4_fields_are_where_python_packs_them(c_types: dict[str, Any]) -> None:
    addr4 = c_types["addr4"]
    assert ctypes.sizeof(addr4) == maps.ADDR4_SIZE
    c = addr4.from_buffer_copy(maps.pack_addr4(IP, 8080))
    assert (c.ip, c.port, c.pad) == (_u32_of(IP), socket.htons(8080), 0)


def test_the_original_destination_value_reads_back_in_python(c_types: dict[str, Any]) -> None:
    orig = c_types["orig"]
    assert ctypes.sizeof(orig) == maps.ORIG_SIZE
    c = orig()
    c.dst.ip, c.dst.port, c.cgroup, c.pid = _u32_of(IP), socket.htons(443), 77, 99
    assert maps.unpack_addr4(bytes(c)) == (IP, 443)


def test_dns_switch_fields_are_where_python_packs_them(c_types: dict[str, Any]) -> None:
    cfg = c_types["dns_cfg"].from_buffer_copy(maps.pack_dns_cfg(True, 15053))
    assert (cfg.flags, cfg.port) == (constants.DNS_ENABLED, 15053)
    assert ctypes.sizeof(c_types["dns_cfg"]) == maps.MAP_LAYOUTS["mn_dns_cfg"][1]


def test_the_getsockopt_answer_parses_in_the_proxy(c_types: dict[str, Any]) -> None:
    """mn_getsockopt.c writes a struct mn_sockaddr_in; the worker reads it with origdst."""
    sin = c_types["sockaddr_in"]
    c = sin()
    c.family, c.port, c.addr, c.cgroup, c.pid = (socket.AF_INET, socket.htons(8080),
                                                 _u32_of(IP), 0x1234, 4321)

    class Answered:
        def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
            assert (level, optname) == (socket.SOL_IP, constants.SO_ORIGINAL_DST)
            assert buflen >= ctypes.sizeof(sin)  # the proxy asks for the whole answer
            return bytes(c)[:buflen]

        def getpeername(self) -> tuple[str, int]:
            raise AssertionError("not asked")

    assert origdst.SockoptOrigDst().lookup(Answered()) == origdst.Origin(
        OrigDstAddr(IP, 8080), 0x1234, 4321)


def test_the_agent_refuses_pinned_maps_of_another_layout(pin_dir: Path) -> None:
    """Pins adopted after a restart may come from another meshnode version: opening them is
    refused with the fix, never written with the wrong layout."""
    from bcc import BPF

    bpf = BPF(text=f'BPF_TABLE_PINNED("hash", __u32, __u32, mn_dest, 16, "{pin_dir}/mn_dest");')
    try:
        with pytest.raises(BpfError, match=r"key/value sizes 4/4, this meshnode packs 8/4") as err:
            maps.CaptureMaps.open(pin_dir)
        assert str(pin_dir) in err.value.hint
    finally:
        bpf.cleanup()
