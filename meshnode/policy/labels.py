"""Endpoint labels (`version=v2`) and the subsets that select endpoints by them.

Owns: the label rules (Kubernetes': a key is an optional DNS-subdomain prefix and '/' and a
name of at most 63 letters, digits, '.', '_' and '-', starting and ending alphanumeric; a value
is at most 63 of the same, or empty), their one canonical form (`Labels`: pairs sorted by key,
each key once; hashable and sortable, so an `Endpoint` stays a plain frozen value), parsing
`KEY=VALUE` flags, the subset test and its text, and the apply-time check that a subset some
Route names is carried by at least one endpoint.

Pure: imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from meshnode.errors import UsageError

__all__ = [
    "LabelError",
    "Labels",
    "carries",
    "format_labels",
    "labels_from",
    "labels_json",
    "parse_label",
    "parse_labels",
    "subset_warnings",
]

# Sorted (key, value) pairs, each key once; () = no labels, or as a subset every endpoint.
Labels = tuple[tuple[str, str], ...]

_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_PREFIX = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting and ending alphanumeric"
_EXAMPLE = "e.g. version=v2 or app.example.com/track=canary"


class LabelError(UsageError, ValueError):
    """A bad label. A ValueError too, so a msgspec struct checking labels in `__post_init__`
    reports it with the field's path."""


def check_label(key: str, value: str) -> None:
    """Raise LabelError (one line naming the fix) unless `key=value` is a valid label."""
    if not isinstance(key, str) or not isinstance(value, str):
        raise LabelError(f"label {key!r}: key and value must be strings",
                         f"write labels as KEY=VALUE, {_EXAMPLE}")
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _PREFIX.fullmatch(prefix)):
        raise LabelError(f"invalid label key {key!r}: prefix {prefix!r} is not a DNS name",
                         "use lowercase DNS labels joined by '.' before the '/', "
                         "e.g. app.example.com/track")
    if not _NAME.fullmatch(name):
        raise LabelError(f"invalid label key {key!r}",
                         f"a key's name (after any 'prefix/') is {_NAME_RULE}")
    if value and not _NAME.fullmatch(value):
        raise LabelError(f"invalid value {value!r} of label {key}",
                         f"a label value is empty or {_NAME_RULE}")


def labels_from(pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Labels:
    """Validated labels in their canonical form (sorted by key); a key given twice with two
    values is an error (once with one value is kept once)."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out: dict[str, str] = {}
    for key, value in items:
        check_label(key, value)
        if out.get(key, value) != value:
            raise LabelError(f"label {key} is given twice ({out[key]!r} and {value!r})",
                             f"give {key} one value")
        out[key] = value
    return tuple(sorted(out.items()))


def parse_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (a CLI flag) as a validated pair."""
    key, eq, value = text.partition("=")
    if not eq:
        raise LabelError(f"invalid label {text!r}", f"write it as KEY=VALUE, {_EXAMPLE}")
    check_label(key, value)
    return key, value


def parse_labels(texts: Iterable[str]) -> Labels:
    """Repeated `--label KEY=VALUE` flags as labels."""
    return labels_from(parse_label(t) for t in texts)


def carries(labels: Labels, subset: Labels) -> bool:
    """Whether an endpoint with `labels` belongs to `subset` (it carries every pair)."""
    return all(pair in labels for pair in subset)


def format_labels(labels: Labels) -> str:
    """`k=v,k2=v2` ("" for none): how status, errors and reasons show labels and subsets."""
    return ",".join(f"{k}={v}" for k, v in labels)


def labels_json(labels: Labels) -> dict[str, str]:
    """The stored and shown form: an object, as in a Kubernetes manifest."""
    return dict(labels)


def subset_warnings(where: str, refs: Iterable[tuple[str, Labels]],
                    endpoint_labels: Mapping[str, Iterable[Labels]]) -> list[str]:
    """Why requests to some of `refs` (service, subset) would find no endpoint now, one line
    each (no line for a subset of () on a service with endpoints): apply's warnings about a
    Route (`where`, e.g. "Route reviews"). `endpoint_labels` gives each known service's
    endpoints' labels. A warning, not a rejection: the endpoints may enroll later."""
    out: list[str] = []
    seen: set[tuple[str, Labels]] = set()
    for service, subset in refs:
        if (service, subset) in seen:
            continue
        seen.add((service, subset))
        eps = endpoint_labels.get(service)
        if eps is None:
            why = f"no service named {service}"
        elif not (eps := list(eps)):
            why = f"{service} has no endpoints"
        elif subset and not any(carries(labels, subset) for labels in eps):
            why = f"no endpoint of {service} carries {format_labels(subset)}"
        else:
            continue
        out.append(f"{where}: {why}; its requests get 503 until one does")
    return out
