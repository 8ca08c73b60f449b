"""meshnode.bpf.kflow: the kernel path's telemetry layouts, checked against bytes written by
hand from the C structs in bpf/include/mn_maps.h (host byte order for the __u32/__u64 fields,
network order for mn_addr4's ip and port), and the reader's logic over fake bpf(2) calls."""

from __future__ import annotations

import errno
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from meshnode import constants
from meshnode.bpf import kflow, maps
from meshnode.bpf.kflow import FlowKey, FlowStats, KernelFlows, KlogRecord
from meshnode.errors import BpfError

pytestmark = [pytest.mark.timeout(10),
              pytest.mark.skipif(sys.byteorder != "little",
                                 reason="the hand-written bytes are little-endian")]

EP = (IPv4Address("127.0.0.2"), 8080)
VIP = (IPv4Address("127.240.0.9"), 80)
KEY = FlowKey(cgroup=0x01020304, service=7, endpoint=EP)
# struct mn_flow_key: cgroup, service (__u32 each), mn_addr4 {ip, port (network), pad}
KEY_BYTES = bytes([0x04, 0x03, 0x02, 0x01,  0x07, 0, 0, 0,
                   127, 0, 0, 2,  0x1F, 0x90,  0, 0])


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def test_sizes_are_the_structs_and_the_ones_the_agent_checks() -> None:
    assert (kflow.FLOW_KEY_SIZE, kflow.FLOW_STATS_SIZE, kflow.KLOG_SIZE) == (16, 64, 80)
    assert kflow.MAP_LAYOUTS == {"mn_kflow": (16, 64), "mn_klog": (4, 80),
                                 "mn_klog_head": (4, 8)}
    for name, layout in kflow.MAP_LAYOUTS.items():  # what maps.py opens pins against
        assert maps.MAP_LAYOUTS.get(name, layout) == layout, name


def test_flow_key_bytes() -> None:
    assert kflow.pack_flow_key(KEY) == KEY_BYTES
    assert kflow.unpack_flow_key(KEY_BYTES) == KEY


def test_flow_stats_per_cpu_values_are_summed() -> None:
    # struct mn_flow_stats: connects, failed, closed, bytes_sent, bytes_received,
    # duration_us, srtt_us, pad: one CPU's value is 64 bytes (already a multiple of 8)
    cpu0 = u64(5) + u64(1) + u64(3) + u64(300) + u64(7000) + u64(9000) + u64(450) + u64(0)
    cpu1 = u64(2) + u64(0) + u64(2) + u64(200) + u64(1000) + u64(1000) + u64(50) + u64(0)
    assert kflow.unpack_flow_stats(cpu0) == FlowStats(5, 1, 3, 300, 7000, 9000, 450)
    total = kflow.sum_flow_stats(cpu0 + cpu1, 2)
    assert total == FlowStats(7, 1, 5, 500, 8000, 10000, 500)
    assert total.active == 1  # 7 connects - 1 failed - 5 closed
    assert kflow.pack_flow_stats(FlowStats(5, 1, 3, 300, 7000, 9000, 450)) == cpu0
    assert FlowStats(1, 2, 3).active == 0  # never negative while CPUs disagree


def test_klog_record_bytes() -> None:
    raw = (u64(42) + u64(1_000_000) + u64(3_500_000)  # seq, start_ns, end_ns
           + KEY_BYTES
           + bytes([127, 240, 0, 9, 0x00, 0x50, 0, 0])  # vip 127.240.0.9:80, pad
           + u64(1234) + u64(5678)  # bytes_sent, bytes_received
           + u32(250) + u32(4321) + u32(1) + u32(0))  # srtt_us, pid, established, pad
    assert len(raw) == 80
    rec = KlogRecord(42, 1_000_000, 3_500_000, KEY, VIP, 1234, 5678, 250, 4321, True)
    assert kflow.unpack_klog(raw) == rec
    assert kflow.pack_klog(rec) == raw


def test_ring_span_reads_what_the_ring_still_holds() -> None:
    assert kflow.ring_span(10, 10) == (range(11, 11), 0)
    assert kflow.ring_span(10, 15) == (range(11, 16), 0)
    # 2000 written since seq 10 in a ring of 1024: the oldest 976 are gone
    span, missed = kflow.ring_span(10, 2010, slots=1024)
    assert (span.start, span.stop, missed) == (987, 2011, 976)


class FakeMaps:
    """The three pins as bpf(2) would answer for them (2 CPUs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, present: bool = True) -> None:
        self.present = present
        self.rows: dict[bytes, bytes] = {}
        self.ring: dict[int, bytes] = {}
        self.head = 0
        self.fds = {"mn_kflow": 101, "mn_klog": 102, "mn_klog_head": 103}
        self.closed: list[int] = []
        s = kflow.syscall
        monkeypatch.setattr(s, "possible_cpus", lambda: 2)
        monkeypatch.setattr(s, "obj_get", self.obj_get)
        monkeypatch.setattr(s, "map_info", lambda fd: (None, *self.layout(fd)))
        monkeypatch.setattr(s, "map_keys", lambda fd, size: list(self.rows))
        monkeypatch.setattr(s, "map_lookup", self.lookup)
        monkeypatch.setattr(kflow.os, "close", self.closed.append)

    def obj_get(self, path: str) -> int:
        if not self.present:
            raise BpfError("bpf open: No such file or directory", "", errno=errno.ENOENT)
        return self.fds[Path(path).name]

    def layout(self, fd: int) -> tuple[int, int]:
        name = {v: k for k, v in self.fds.items()}[fd]
        return kflow.MAP_LAYOUTS[name]

    def lookup(self, fd: int, key: bytes, size: int) -> bytes | None:
        if fd == self.fds["mn_kflow"]:
            value = self.rows.get(key)
            assert value is None or len(value) == size
            return value
        if fd == self.fds["mn_klog_head"]:
            return u64(self.head)
        slot = int.from_bytes(key, "little")
        return self.ring.get(slot, bytes(80))

    def close_one(self, seq: int, sent: int = 10) -> None:
        """The program's append: head first, then the slot."""
        self.head = seq
        rec = KlogRecord(seq, seq * 1000, seq * 1000 + 500, KEY, VIP, sent, 2 * sent, 100, 77,
                         True)
        self.ring[(seq - 1) % constants.KLOG_SLOTS] = kflow.pack_klog(rec)


def test_reader_sums_rows_over_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMaps(monkeypatch)
    one = kflow.pack_flow_stats(FlowStats(3, 0, 2, 30, 60, 900, 300))
    fake.rows[KEY_BYTES] = one + one
    with KernelFlows.open(Path("/sys/fs/bpf/meshnode/x")) as reader:
        assert reader.rows() == {KEY: FlowStats(6, 0, 4, 60, 120, 1800, 600)}
    assert sorted(fake.closed) == [101, 102, 103]


def test_reader_reads_a_record_one_call_after_it_was_announced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMaps(monkeypatch)
    fake.close_one(1)  # before the agent: an earlier agent's to log
    reader = KernelFlows.open(Path("/p"))
    assert reader.new_records().records == []  # the first call only notes the head
    fake.close_one(2)
    fake.close_one(3)
    assert reader.new_records().records == []  # announced, maybe still being written
    fake.close_one(4)
    batch = reader.new_records()
    assert [r.seq for r in batch.records] == [2, 3] and batch.missed == 0
    assert batch.records[0].bytes_sent == 10 and batch.records[0].key == KEY
    assert [r.seq for r in reader.new_records().records] == [4]
    assert reader.new_records().records == []


def test_reader_counts_what_the_ring_overwrote(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMaps(monkeypatch)
    reader = KernelFlows.open(Path("/p"))
    reader.new_records()
    for seq in range(1, constants.KLOG_SLOTS + 11):
        fake.close_one(seq)
    reader.new_records()  # notes the head
    batch = reader.new_records()
    assert batch.missed == 10
    assert len(batch.records) == constants.KLOG_SLOTS
    assert batch.records[0].seq == 11


def test_open_refuses_other_layouts_and_reports_missing_pins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMaps(monkeypatch, present=False)
    with pytest.raises(BpfError) as missing:
        KernelFlows.open(Path("/p"))
    assert missing.value.errno == errno.ENOENT
    fake.present = True
    monkeypatch.setattr(kflow.syscall, "map_info", lambda fd: (None, 16, 56))
    with pytest.raises(BpfError, match="key/value sizes 16/56"):
        KernelFlows.open(Path("/p"))
    assert fake.closed == [101]  # what it opened before refusing
