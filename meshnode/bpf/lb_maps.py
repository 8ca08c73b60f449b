"""The kernel path's pinned tables (mn_lb_table, mn_lb_slot; layouts in bpf/include/mn_maps.h):
packing, and the sync that makes them hold a CaptureState's `lb`.

CaptureMaps (maps.py) owns the descriptors and calls `LbMaps.sync` inside its own sync, so the
tables go in before the service flags that send connects to them and leave after the flags
stop. Like maps.py: raw bpf(2) through meshnode.bpf.syscall, no bcc.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping

from meshnode.bpf import syscall
from meshnode.model import CaptureState, HostPort, LbKey, LbTable

__all__ = ["LAYOUTS", "LbMaps", "pack_lb_key", "pack_lb_slot_key", "pack_lb_table",
           "unpack_lb_table"]

# struct mn_lb_key { __u32 service; __u16 port; __u16 pad; }: port in network order.
_LB_KEY = struct.Struct("=I2sxx")
# struct mn_lb_table { __u32 slots; __u32 pick; __u64 cursor; }
_LB_TABLE = struct.Struct("=IIQ")
# struct mn_lb_slot_key { __u32 service; __u16 port; __u16 slot; }: port network order, slot
# host order.
_LB_SLOT_KEY = struct.Struct("=I2sH")
# the slot value, struct mn_addr4 { __u32 ip; __u16 port; __u16 pad; }, network order
_ADDR4 = struct.Struct("!4sHxx")

LAYOUTS: dict[str, tuple[int, int]] = {
    "mn_lb_table": (_LB_KEY.size, _LB_TABLE.size),
    "mn_lb_slot": (_LB_SLOT_KEY.size, _ADDR4.size),
}

Counts = tuple[int, int, int]  # a table as read back from the kernel: (slots, pick, cursor)
Changed = dict[LbKey, tuple[LbTable | None, LbTable | None]]


def pack_lb_key(service_id: int, port: int) -> bytes:
    return _LB_KEY.pack(service_id, port.to_bytes(2, "big"))


def pack_lb_table(slots: int, pick: int) -> bytes:
    """A table's value; the rotation cursor starts over at 0."""
    return _LB_TABLE.pack(slots, pick, 0)


def unpack_lb_table(raw: bytes) -> Counts:
    """(slots, pick, cursor)."""
    slots, pick, cursor = _LB_TABLE.unpack(raw[:_LB_TABLE.size])
    return int(slots), int(pick), int(cursor)


def pack_lb_slot_key(service_id: int, port: int, slot: int) -> bytes:
    return _LB_SLOT_KEY.pack(service_id, port.to_bytes(2, "big"), slot)


def _pack_addr(addr: HostPort) -> bytes:
    return _ADDR4.pack(addr.ip.packed, addr.port)


def _count(table: LbTable | Counts | None) -> int:
    if table is None:
        return 0
    return len(table.slots) if isinstance(table, LbTable) else table[0]


class LbMaps:
    """The two tables' descriptors (owned by CaptureMaps) and what they hold since the last
    sync: `changed` says which tables the last sync changed, old and new (None: absent), for
    closing connections to endpoints that left."""

    def __init__(self, table_fd: int, slot_fd: int) -> None:
        self._table_fd, self._slot_fd = table_fd, slot_fd
        self._held: Mapping[LbKey, LbTable] | None = None  # None: not known, read them back
        self.changed: Changed = {}

    def forget(self) -> None:
        """What the maps hold is no longer known: the next sync reads them back."""
        self._held = None

    def tables(self) -> dict[LbKey, Counts]:
        """What mn_lb_table holds: (service id, port) -> (slots, pick, cursor)."""
        out: dict[LbKey, Counts] = {}
        for key in syscall.map_keys(self._table_fd, _LB_KEY.size):
            raw = syscall.map_lookup(self._table_fd, key, _LB_TABLE.size)
            if raw is not None:
                sid, port = _LB_KEY.unpack(key)
                out[(int(sid), int.from_bytes(port, "big"))] = unpack_lb_table(raw)
        return out

    def sync(self, state: CaptureState) -> Callable[[], int]:
        """Write the tables that differ from the last sync (all of them, against what the
        kernel holds, after opening or `forget`). Slots go in before the count that covers
        them and leave after it, so the hook never indexes a missing slot. Returns the step
        that deletes the tables no longer wanted (to run once no flag sends connects to them),
        which returns the number of map writes made."""
        want = state.lb
        have: Mapping[LbKey, LbTable | Counts]
        keys: Iterable[LbKey]
        if self._held is None:
            have = self.tables()  # counts only: rewrite every wanted table
            keys = {*want, *have}
        elif self._held is want:
            self.changed = {}
            return lambda: 0
        else:
            have = self._held
            # the planner's hint: only these differ from the tables synced last
            keys = state.lb_changed if state.lb_since is have else {*want, *have}
        self._held = None  # unknown until the writes complete
        writes = 0
        changed: Changed = {}
        gone: list[tuple[LbKey, LbTable | Counts]] = []
        for key in keys:
            table, old = want.get(key), have.get(key)
            if table is None:
                if old is not None:
                    gone.append((key, old))
                continue
            if old is table or old == table:
                continue
            writes += self._write(key, table, old)
            changed[key] = (old if isinstance(old, LbTable) else None, table)
        for key, old in gone:
            changed[key] = (old if isinstance(old, LbTable) else None, None)
        self.changed = changed

        def retire() -> int:
            n = writes
            for (sid, port), old in gone:
                syscall.map_delete(self._table_fd, pack_lb_key(sid, port))
                for i in range(_count(old)):
                    syscall.map_delete(self._slot_fd, pack_lb_slot_key(sid, port, i))
                n += 1 + _count(old)
            self._held = want
            return n

        return retire

    def _write(self, key: LbKey, table: LbTable, old: LbTable | Counts | None) -> int:
        """One table: its changed slots, its count, then the slots past the new count."""
        sid, port = key
        old_count, writes = _count(old), 0
        for i, addr in enumerate(table.slots):
            if isinstance(old, LbTable) and i < old_count and old.slots[i] == addr:
                continue
            syscall.map_update(self._slot_fd, pack_lb_slot_key(sid, port, i), _pack_addr(addr))
            writes += 1
        syscall.map_update(self._table_fd, pack_lb_key(sid, port),
                           pack_lb_table(len(table.slots), table.pick))
        for i in range(len(table.slots), old_count):
            syscall.map_delete(self._slot_fd, pack_lb_slot_key(sid, port, i))
        return writes + 1 + max(0, old_count - len(table.slots))
