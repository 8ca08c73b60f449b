"""The ledger: every kernel object an agent creates, recorded before it is created.

A crash between `record` and the creation leaves an entry whose object may not exist; undo
functions treat "not found" as done, so a sweep after any crash is complete and idempotent.
Entries are plain dicts with a `kind`; the module that creates a kind also owns its undo
(`UndoFn`), and the agent dispatches by kind when it stops or sweeps.

Also owns the two lifecycle shapes every creator of kernel objects shares: an all-or-nothing
`transaction` (an install that fails takes back what it recorded) and an ordered `undo` that
keeps going past failures and reports them. Imports nothing of meshnode's but
host.statefile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshnode.host.statefile import write_json

log = logging.getLogger(__name__)

Entry = dict[str, Any]
UndoFn = Callable[[Entry], None]


class Transaction:
    """The entries one `Ledger.transaction` has recorded so far, oldest first."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.entries: list[Entry] = []

    def record(self, kind: str, **fields: Any) -> Entry:
        """`Ledger.record`, remembered for the unwind. An entry the ledger already held was
        not made by this transaction (a leftover for the sweep), so it is not unwound here."""
        entry, new = self._ledger.record_new(kind, **fields)
        if new:
            self.entries.append(entry)
        return entry


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[Entry] = self._read()

    def _read(self) -> list[Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ledger %s unreadable (%s); starting empty", self.path, exc)
            return []
        if not isinstance(data, list):  # valid JSON of another shape: 5, null, {...}
            log.warning("ledger %s is not a list of entries; starting empty", self.path)
            return []
        # a kind that is no string (a list, say) would break the undo dispatch by kind
        return [e for e in data if isinstance(e, dict) and isinstance(e.get("kind"), str)]

    def _write(self) -> None:
        # durable before the object is created: that is the ledger's whole promise
        write_json(self.path, self._entries)

    def record(self, kind: str, **fields: Any) -> Entry:
        """Write down an object about to be created (no-op if it is already recorded)."""
        return self.record_new(kind, **fields)[0]

    def record_new(self, kind: str, **fields: Any) -> tuple[Entry, bool]:
        """`record`, also saying whether the entry is new to the ledger."""
        entry: Entry = {"kind": kind, **fields}
        if entry in self._entries:
            return entry, False
        self._entries.append(entry)
        self._write()
        return entry, True

    @contextmanager
    def transaction(self, undo: Mapping[str, UndoFn]) -> Iterator[Transaction]:
        """All or nothing: record through the yielded `Transaction`; if the block raises
        (anything, Ctrl-C included), every entry it recorded is undone newest first and
        forgotten before the exception goes on. An undo that fails is logged and its entry
        kept, so the next sweep retries it; it never hides the original exception."""
        tx = Transaction(self)
        try:
            yield tx
        except BaseException:
            for failure in self.undo(reversed(tx.entries), undo):
                log.warning("unwinding a failed install: %s (left for the next sweep)", failure)
            raise

    def forget(self, entry: Entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._write()

    def entries(self, kind: str | None = None) -> list[Entry]:
        return [dict(e) for e in self._entries if kind is None or e["kind"] == kind]

    def undo(self, entries: Iterable[Entry], undo: Mapping[str, UndoFn],
             key: Callable[[Entry], Any] | None = None) -> list[str]:
        """Undo `entries` in the given order (or sorted by `key`: the creator's removal order,
        e.g. what stops capture first), forgetting each one undone. Returns one message per
        entry that could not be undone; those stay recorded for the next sweep."""
        ordered = sorted(entries, key=key) if key is not None else list(entries)
        failures: list[str] = []
        for entry in ordered:
            fn = undo.get(entry["kind"])
            if fn is None:
                failures.append(f"no undo for ledger entry {entry}")
                continue
            try:
                fn(entry)
            except Exception as exc:  # one stuck object must not stop the rest
                failures.append(f"{entry['kind']} {entry}: {exc}")
                continue
            self.forget(entry)
        return failures

    def undo_all(self, undo: Mapping[str, UndoFn]) -> list[str]:
        """Undo every entry, newest first (see `undo`)."""
        return self.undo(reversed(list(self._entries)), undo)
