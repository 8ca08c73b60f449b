"""meshnode.bpf.kflow against the kernel: what clang makes of struct mn_flow_key,
mn_flow_stats and mn_klog (bpf/include/mn_maps.h, compiled with the loader's flags), and
KernelFlows reading real pinned maps: a per-CPU LRU hash (each CPU's value summed) and the
klog ring with its head. The maps are made by bcc from the header's own declarations, so no
capture program runs and nothing is attached."""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode import constants
from meshnode.bpf import kflow, syscall
from meshnode.bpf.compile import BuildConfig, cflags
from meshnode.bpf.kflow import FlowKey, FlowStats, KernelFlows, KlogRecord

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"
EP = (IPv4Address("127.0.0.2"), 8080)
VIP = (IPv4Address("127.240.0.9"), 80)
KEY = FlowKey(0x01020304, 7, EP)

# Only the three maps under test, with the header's structs (its maps need every -D flag and
# would pin a dozen more: the layout is what matters here).
PROBE = """
#include "mn_maps.h"
BPF_TABLE_PINNED("lru_percpu_hash", struct mn_flow_key, struct mn_flow_stats, kflow_t,
                 64, PIN "/mn_kflow");
BPF_TABLE_PINNED("array", __u32, struct mn_klog, klog_t, MN_KLOG_SLOTS, PIN "/mn_klog");
BPF_TABLE_PINNED("array", __u32, __u64, klog_head_t, 1, PIN "/mn_klog_head");
"""


@pytest.fixture
def pinned() -> Iterator[tuple[Path, Any]]:
    from bcc import BPF

    path = Path(constants.BPF_FS) / f"meshnode-kflow-{os.getpid()}"
    path.mkdir()
    maps_dir = path / "maps"  # the header's own maps pin here, apart from the three
    maps_dir.mkdir()
    bpf = None
    try:
        bpf = BPF(text=PROBE, cflags=[*cflags(BuildConfig(maps_dir), INCLUDE),
                                      f'-DPIN="{path}"'])
        yield path, bpf
    finally:
        if bpf is not None:
            bpf.cleanup()
        for name in os.listdir(maps_dir):
            os.unlink(maps_dir / name)
        maps_dir.rmdir()
        for name in os.listdir(path):
            os.unlink(path / name)
        path.rmdir()


def _u32_of(ip: IPv4Address) -> int:
    return int.from_bytes(ip.packed, sys.byteorder)


def _fill_key(c: Any) -> None:
    """KEY into a struct mn_flow_key (each table has its own ctypes class of it)."""
    c.cgroup, c.service = KEY.cgroup, KEY.service
    c.endpoint.ip, c.endpoint.port = _u32_of(EP[0]), socket.htons(EP[1])


def test_clang_layouts_are_the_ones_python_packs(pinned: tuple[Path, Any]) -> None:
    _, bpf = pinned
    key_t, stats_t = bpf["kflow_t"].Key, bpf["kflow_t"].sLeaf  # Leaf: one per CPU
    klog_t = bpf["klog_t"].Leaf
    assert (ctypes.sizeof(key_t), ctypes.sizeof(stats_t), ctypes.sizeof(klog_t)) == (
        kflow.FLOW_KEY_SIZE, kflow.FLOW_STATS_SIZE, kflow.KLOG_SIZE)
    k = key_t.from_buffer_copy(kflow.pack_flow_key(KEY))
    assert (k.cgroup, k.service, k.endpoint.ip, k.endpoint.port) == (
        0x01020304, 7, _u32_of(EP[0]), socket.htons(8080))
    s = stats_t(1, 2, 3, 4, 5, 6, 7, 0)
    assert kflow.unpack_flow_stats(bytes(s)) == FlowStats(1, 2, 3, 4, 5, 6, 7)
    c = klog_t()
    c.seq, c.start_ns, c.end_ns = 9, 100, 250
    _fill_key(c.key)
    c.vip.ip, c.vip.port = _u32_of(VIP[0]), socket.htons(80)
    c.bytes_sent, c.bytes_received, c.srtt_us, c.pid, c.established = 11, 22, 33, 44, 1
    assert kflow.unpack_klog(bytes(c)) == KlogRecord(9, 100, 250, KEY, VIP, 11, 22, 33, 44,
                                                     True)


def test_the_reader_sums_cpus_and_follows_the_ring(pinned: tuple[Path, Any]) -> None:
    path, bpf = pinned
    ncpus = syscall.possible_cpus()
    flows = bpf["kflow_t"]
    key = flows.Key.from_buffer_copy(kflow.pack_flow_key(KEY))
    values = flows.Leaf(*[flows.sLeaf(cpu + 1, 0, cpu, 100, 200, 1000, 10, 0)
                          for cpu in range(ncpus)])
    flows[key] = values
    n = ncpus
    with KernelFlows.open(path) as reader:
        assert reader.rows() == {KEY: FlowStats(n * (n + 1) // 2, 0, n * (n - 1) // 2, 100 * n,
                                                200 * n, 1000 * n, 10 * n)}
        ring, head = bpf["klog_t"], bpf["klog_head_t"]

        def append(seq: int) -> None:  # what mn_sockops.c's mn_klog_append does
            head[ctypes.c_uint32(0)] = ctypes.c_uint64(seq)
            e = ring.Leaf()
            e.seq, e.start_ns, e.end_ns = seq, 1, 2
            _fill_key(e.key)
            e.established = 1
            ring[ctypes.c_uint32((seq - 1) % constants.KLOG_SLOTS)] = e

        append(1)
        assert reader.new_records().records == []  # notes the head
        append(2)
        append(3)
        reader.new_records()
        batch = reader.new_records()
        assert [(r.seq, r.key, r.established) for r in batch.records] == [
            (2, KEY, True), (3, KEY, True)]
