"""The run's results as people and programs read them: medians, ratios to `direct` and to
`haproxy-tcp`, the table, the issue #5 targets line, the JSON record and the PNG chart."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Raw = dict[str, dict[str, list[float]]]  # variant -> metric -> one value per repetition
Table = dict[str, dict[str, float | None]]  # variant -> metric -> value

DIRECT, HAPROXY, MESHNODE, EXPLICIT = "direct", "haproxy-tcp", "mn-ebpf", "mn-explicit"
TIMES = "\u00d7"  # the multiplication sign, spelled out for the linter


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


def metrics(many_clients: int, max_workers: int) -> list[Metric]:
    pp = [Metric(f"{k}_{p}", f"ping-pong {size}{pin} {p}", "µs", False)
          for k, size, pin in (("pp1", "1 B", ""), ("pp1k", "1 KiB", ""),
                               ("pp1_pin", "1 B", " pinned"), ("pp1k_pin", "1 KiB", " pinned"))
          for p in ("p50", "p99")]
    return [
        Metric("bulk_up", "bulk upload", "MB/s", True),
        Metric("bulk_down", "bulk download", "MB/s", True),
        Metric("bulk", "bulk, both ways", "MB/s", True),
        Metric("cpu_per_gb", "proxy CPU per GB relayed", "CPU-s/GB", False),
        *pp,
        Metric("conn_rate_1", "connection setup, 1 client", "conn/s", True),
        Metric("conn_rate_many", f"connection setup, {many_clients} clients", "conn/s", True),
        Metric("conn_rate_1_cpu", "proxy CPU per connection, 1 client", "µs", False),
        Metric("conn_rate_many_cpu", f"proxy CPU per connection, {many_clients} clients", "µs",
               False),
        Metric("http_rps", "HTTP/1.1 keep-alive (wrk)", "req/s", True),
        Metric("http_p50", "HTTP latency p50", "ms", False),
        Metric("http_p99", "HTTP latency p99", "ms", False),
        Metric("rss_idle", "RSS at idle (proxy + agent/master)", "MB", False),
        Metric("rss_idle_proxy", "RSS at idle, proxy processes only", "MB", False),
        Metric("rss_load", "RSS under load, peak", "MB", False),
        Metric("mem_per_conn", "proxy memory per idle connection", "KiB", False),
        *(Metric(f"scale_w{k}", f"connection setup, {many_clients} clients, {k} worker"
                 + "s" * (k > 1), "conn/s", True) for k in range(1, max_workers + 1)),
    ]


def medians(raw: Raw) -> Table:
    return {v: {m: statistics.median(vals) if vals else None for m, vals in ms.items()}
            for v, ms in raw.items()}


def ratio(table: Table, variant: str, ref: str, key: str) -> float | None:
    a = table.get(variant, {}).get(key)
    b = table.get(ref, {}).get(key)
    return a / b if a is not None and b else None


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def table_text(table: Table, variants: list[str], ms: list[Metric],
               refs: tuple[str, ...] = (DIRECT, HAPROXY),
               ratio_of: Callable[[str, str, str], float | None] | None = None) -> str:
    """The medians with a ratio row per reference; `ratio_of(variant, ref, key)` computes
    those rows (default: the ratio of the medians)."""
    if ratio_of is None:
        def ratio_of(v: str, ref: str, key: str) -> float | None:
            return ratio(table, v, ref, key)
    w = max(12, *(len(v) + 1 for v in variants))
    head = f"{'metric':<46}{'unit':>9}  " + "".join(f"{v:>{w}}" for v in variants)
    lines = [head, "-" * len(head)]
    for m in ms:
        if all(table.get(v, {}).get(m.key) is None for v in variants):
            continue
        better = "↑" if m.higher_is_better else "↓"
        lines.append(f"{m.label + ' ' + better:<46}{m.unit:>9}  "
                     + "".join(f"{_fmt(table.get(v, {}).get(m.key)):>{w}}" for v in variants))
        for ref in refs:
            cells = [ratio_of(v, ref, m.key) for v in variants]
            if any(c is not None for c in cells):
                lines.append(f"{'  ' + TIMES + ' ' + ref:<46}{'':>9}  "
                             + "".join(f"{_fmt(c):>{w}}" for c in cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    met: bool | None

    def text(self) -> str:
        verdict = "n/a" if self.met is None else "MET" if self.met else "NOT MET"
        return f"{self.name} {verdict} ({_fmt(self.value)})"


def targets(t: Table) -> list[Target]:
    """Issue #5's targets for meshnode as deployed (eBPF capture, one worker), from this run."""
    def at_least(name: str, value: float | None, bound: float) -> Target:
        return Target(name, value, None if value is None else value >= bound)

    def at_most(name: str, value: float | None, bound: float) -> Target:
        return Target(name, value, None if value is None else value <= bound)

    capture_cost = ratio(t, MESHNODE, EXPLICIT, "conn_rate_many")
    return [
        at_least(f"bulk≥0.6{TIMES}direct", ratio(t, MESHNODE, DIRECT, "bulk"), 0.6),
        at_least(f"bulk≥1.5{TIMES}haproxy", ratio(t, MESHNODE, HAPROXY, "bulk"), 1.5),
        at_least(f"conn/s≥1.0{TIMES}haproxy", ratio(t, MESHNODE, HAPROXY, "conn_rate_many"), 1.0),
        at_most("pp1B-p50-pinned≤haproxy", ratio(t, MESHNODE, HAPROXY, "pp1_pin_p50"), 1.0),
        at_most("ebpf-capture-cost≤5%", None if capture_cost is None else 1 - capture_cost,
                0.05),
        at_most("agent+worker-idle≤60MB", t.get(MESHNODE, {}).get("rss_idle"), 60.0),
        at_most("mem/idle-conn≤4KiB", t.get(MESHNODE, {}).get("mem_per_conn"), 4.0),
    ]


def targets_line(ts: list[Target]) -> str:
    return "targets: " + " · ".join(t.text() for t in ts)


def source_version(repo: Path) -> dict[str, str]:
    """The checked-out commit (and whether the tree had changes), or {} outside a git clone."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": out.strip()}


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


CHART_KEYS = ("bulk", "conn_rate_1", "conn_rate_many", "http_rps", "pp1_p50", "pp1k_p50",
              "pp1_pin_p50", "http_p50")


def chart(path: Path, table: Table, variants: list[str], ms: list[Metric], title: str) -> None:
    """Grouped bars of each variant's speed relative to direct and to HAProxy (higher is better:
    latencies are plotted as reference / variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {m.key: m for m in ms}
    keys = [k for k in CHART_KEYS if k in by_key]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 1, figsize=(13, 9), constrained_layout=True)
    for ax, ref in zip(axes, (DIRECT, HAPROXY), strict=True):
        shown = [v for v in variants if v != ref]
        width = 0.8 / max(1, len(shown))
        for i, v in enumerate(shown):
            ys = []
            for k in keys:
                r = ratio(table, v, ref, k)
                ys.append(0.0 if r is None else r if by_key[k].higher_is_better else 1 / r)
            ax.bar([x + i * width for x in range(len(keys))], ys, width, label=v,
                   color=colours(variants.index(v) % 10))  # one colour per variant throughout
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(keys))],
                      [by_key[k].label.replace(", ", "\n") for k in keys], fontsize=8)
        ax.set_ylabel(f"relative to {ref} (higher is better)")
        ax.set_title(f"speed relative to {ref}; latencies as {ref} ÷ variant", fontsize=10)
        ax.legend(fontsize=8, ncols=3)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def release(tmp: Path, keep: bool) -> None:
    """A bench's scratch folder after its run: kept (and where said) or removed."""
    if keep:
        print(f"logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
