"""The base of every resource spec struct: strict, immutable, camelCase on the wire. Its own
module so the kinds can live in several modules (resources, identity) without importing each
other."""

from __future__ import annotations

import msgspec


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel",
            omit_defaults=True):
    """Base of every spec struct: strict, immutable, camelCase on the wire."""
