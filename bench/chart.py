"""The suite's results as a table with ratios, and as a chart for the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATHS = ("direct", "port-forward", "telepresence", "telepresence-direct", "telepresence2")
#: Column headings: the paths' names are too wide for five columns.
SHORT = {
    "direct": "direct",
    "port-forward": "kubectl pf",
    "telepresence": "tp",
    "telepresence-direct": "tpD",
    "telepresence2": "Tel2",
}
#: The ratio columns: (heading, path, baseline path).
RATIOS = (
    ("tp/pf", "telepresence", "port-forward"),
    ("tp/Tel2", "telepresence", "telepresence2"),
    ("tpD/pf", "telepresence-direct", "port-forward"),
    ("tpD/dir", "telepresence-direct", "direct"),
    ("Tel2/pf", "telepresence2", "port-forward"),
)


def _get(result: dict[str, Any], *keys: str) -> float | None:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


#: (label, keys into one path's result, higher is better)
ROWS: list[tuple[str, tuple[str, ...], bool]] = [
    ("up MiB/s", ("up", "MiB/s"), True),
    ("down MiB/s", ("down", "MiB/s"), True),
    ("down x4 MiB/s", ("down x4", "MiB/s"), True),
    ("latency p50 ms", ("latency ms", "p50"), False),
    ("latency p99 ms", ("latency ms", "p99"), False),
    ("loaded p50 ms", ("latency loaded ms", "p50"), False),
    ("loaded p99 ms", ("latency loaded ms", "p99"), False),
    ("connections/s", ("connections", "per s"), True),
    ("UDP loss % @100M", ("udp", "loss %"), False),
    ("DNS cluster p50 ms", ("dns cluster ms", "p50"), False),
    ("DNS cluster p99 ms", ("dns cluster ms", "p99"), False),
    ("DNS laptop p50 ms", ("dns laptop ms", "p50"), False),
    ("DNS laptop p99 ms", ("dns laptop ms", "p99"), False),
    ("connect s", ("connect s",), False),
    ("quit s", ("quit s",), False),
]


def render_table(results: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}" if value is not None and base else "-"

    header = (
        f"{'':<20}"
        + "".join(f"{SHORT[p]:>11}" for p in PATHS)
        + "".join(f"{h:>9}" for h, _, _ in RATIOS)
    )
    lines = [header]
    for label, keys, _ in ROWS:
        values = {p: _get(results.get(p, {}), *keys) for p in PATHS}
        lines.append(
            f"{label:<20}"
            + "".join(f"{cell(values[p]):>11}" for p in PATHS)
            + "".join(f"{ratio(values[a], values[b]):>9}" for _, a, b in RATIOS)
        )
    lines.append("")
    lines.append("CPU seconds per GiB moved (down):")
    for path in PATHS:
        cpu = results.get(path, {}).get("cpu s/GiB") or {}
        if cpu:
            parts = ", ".join(f"{name} {value:.2f}" for name, value in sorted(cpu.items()))
            lines.append(f"  {path:<20}{parts}  (total {sum(cpu.values()):.2f})")
    failed = [
        f"  {path} {line}"
        for path in PATHS
        for round_ in results.get("rounds", {}).get(path, [])
        for line in [
            *round_.get("failed", []),
            *(
                f"{probe}: {value['error']} (gave up)"
                for probe, value in round_.items()
                if isinstance(value, dict) and "error" in value
            ),
        ]
    ]
    if failed:
        lines += ["", "Probe failures (one try each; retried unless it says it gave up):", *failed]
    lines.append("")
    lines.append("laptop DNS: before connecting in port-forward's column, connected in ours")
    lines.append(
        "tp: telepresence over port-forward; tpD: over the direct transport;"
        " Tel2: Telepresence 2 (bench/telepresence2.py)"
    )
    return "\n".join(lines)


def render_ab(results: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """Each pair side by side (a changed path against the same path without the change),
    with the ratio of the first to the second."""
    lines = []
    for a, b in pairs:
        lines.append(f"\n{a} vs {b}")
        for label, keys, _ in ROWS:
            x, y = _get(results.get(a, {}), *keys), _get(results.get(b, {}), *keys)
            ratio = f"{x / y:.2f}" if x is not None and y else "-"
            cells = "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in (x, y))
            lines.append(f"  {label:<20}{cells}{ratio:>8}")
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bulk, latency, cpu) = plt.subplots(1, 3, figsize=(14, 4.2))
    groups = [("up", "up"), ("down", "down"), ("down x4", "down x4")]
    width = 0.8 / len(PATHS)

    def offset(i: int) -> float:
        return (i - (len(PATHS) - 1) / 2) * width

    for i, name in enumerate(PATHS):
        values = [_get(results.get(name, {}), key, "MiB/s") or 0 for _, key in groups]
        bulk.bar([g + offset(i) for g in range(len(groups))], values, width, label=name)
    bulk.set_xticks(range(len(groups)), [label for label, _ in groups])
    bulk.set_ylabel("MiB/s (iperf3)")
    bulk.set_title("Bulk throughput")
    # Headroom above the tallest bar, so the legend covers none.
    bulk.set_ylim(top=bulk.get_ylim()[1] * 1.35)
    bulk.legend(fontsize=7, ncol=2, loc="upper left")
    quantiles = [("latency ms", "p50"), ("latency ms", "p99"), ("latency loaded ms", "p50")]
    for i, name in enumerate(PATHS):
        values = [_get(results.get(name, {}), *keys) or 0 for keys in quantiles]
        latency.bar([g + offset(i) for g in range(len(quantiles))], values, width, label=name)
    latency.set_xticks(range(len(quantiles)), ["p50", "p99", "p50 beside\na download"])
    # Log scale: a shared connection's delay beside a download can be 100 times the rest.
    latency.set_yscale("log")
    latency.set_ylabel("ms, fresh connection per request")
    latency.set_title("HTTP request latency")
    names = sorted({k for p in PATHS for k in (results.get(p, {}).get("cpu s/GiB") or {})})
    bottoms = [0.0] * len(PATHS)
    for process in names:
        values = [(results.get(p, {}).get("cpu s/GiB") or {}).get(process, 0.0) for p in PATHS]
        cpu.bar([SHORT[p] for p in PATHS], values, bottom=bottoms, label=process)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    cpu.set_ylabel("CPU seconds per GiB")
    cpu.set_title("CPU per GiB downloaded")
    cpu.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
