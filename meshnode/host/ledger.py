"""The ledger: every kernel object an agent creates, recorded before it is created.

A crash between `record` and the creation leaves an entry whose object may not exist; undo
functions treat "not found" as done, so a sweep after any crash is complete and idempotent.
Entries are plain dicts with a `kind`; the module that creates a kind also owns its undo
(`UndoFn`), and the agent dispatches by kind when it stops or sweeps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Entry = dict[str, Any]
UndoFn = Callable[[Entry], None]


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[Entry] = self._read()

    def _read(self) -> list[Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ledger %s unreadable (%s); starting empty", self.path, exc)
            return []
        return [e for e in data if isinstance(e, dict) and "kind" in e]

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._entries, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def record(self, kind: str, **fields: Any) -> Entry:
        """Write down an object about to be created (no-op if it is already recorded)."""
        entry: Entry = {"kind": kind, **fields}
        if entry not in self._entries:
            self._entries.append(entry)
            self._write()
        return entry

    def forget(self, entry: Entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._write()

    def entries(self, kind: str | None = None) -> list[Entry]:
        return [dict(e) for e in self._entries if kind is None or e["kind"] == kind]

    def undo_all(self, undo: Mapping[str, UndoFn]) -> list[str]:
        """Undo every entry, newest first; returns one message per entry that could not be
        undone (those stay recorded for the next sweep)."""
        failures: list[str] = []
        for entry in reversed(list(self._entries)):
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
