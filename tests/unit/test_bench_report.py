"""The benchmark suite's arithmetic: medians over rounds, ratios in the table, CPU per GiB."""

from __future__ import annotations

from pathlib import Path

from bench.chart import render_chart, render_table
from bench.probes import GIB, cpu_per_gib, percentiles
from bench.suite import median_of


def test_median_of_rounds_is_taken_per_key_at_every_depth() -> None:
    rounds = [
        {"up": {"MiB/s": 100.0}, "connect s": 1.0, "note": "first"},
        {"up": {"MiB/s": 300.0}, "connect s": 3.0, "note": "second"},
        {"up": {"MiB/s": 200.0}, "connect s": 2.0},
    ]
    assert median_of(rounds) == {"up": {"MiB/s": 200.0}, "connect s": 2.0, "note": "first"}


def test_the_table_gives_ratios_to_port_forward_and_direct() -> None:
    results = {
        "direct": {"down": {"MiB/s": 1000.0}},
        "port-forward": {"down": {"MiB/s": 200.0}},
        "telepresence": {"down": {"MiB/s": 300.0}, "connect s": 0.5},
        "telepresence-direct": {"down": {"MiB/s": 800.0}, "connect s": 0.6},
        "telepresence2": {"down": {"MiB/s": 100.0}, "connect s": 4.0},
    }
    table = render_table(results)
    down = next(line for line in table.splitlines() if line.startswith("down MiB/s"))
    # tp/pf, tp/Tel2, tpD/pf, tpD/dir, Tel2/pf
    assert down.split()[-5:] == ["1.50", "3.00", "4.00", "0.80", "0.50"]
    connect = next(line for line in table.splitlines() if line.startswith("connect s"))
    assert connect.split()[-8:] == ["0.50", "0.60", "4.00", "-", "0.12", "-", "-", "-"]


def test_failed_probes_are_listed_by_path_and_round() -> None:
    gave_up = {"error": "target.bench-suite after 33 lookups: [Errno -2] Name or service not known"}
    rounds = [
        {"dns cluster ms": gave_up},
        {"dns cluster ms": {"p50": 1.0}, "failed": ["down: the server is busy"]},
    ]
    table = render_table({"telepresence2": median_of(rounds), "rounds": {"telepresence2": rounds}})
    lines = table.splitlines()
    assert f"  telepresence2 dns cluster ms: {gave_up['error']} (gave up)" in lines
    assert "  telepresence2 down: the server is busy" in lines


def test_a_round_that_failed_does_not_hide_the_others() -> None:
    rounds = [{"down": {"error": "busy"}}, {"down": {"MiB/s": 2.0}}, {"down": {"MiB/s": 4.0}}]
    assert median_of(rounds) == {"down": {"MiB/s": 3.0}}
    assert median_of([{"down": {"error": "busy"}}]) == {"down": {"error": "busy"}}


def test_cpu_is_divided_by_the_gibibytes_moved() -> None:
    assert cpu_per_gib({"daemon": 1.0, "gone": 1.0}, {"daemon": 2.0}, 2 * GIB) == {"daemon": 0.5}


def test_percentiles() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentiles(samples) == {"p50": 50.5, "p99": 99.0}


def test_the_chart_is_written(tmp_path: Path) -> None:
    results = {
        "direct": {"up": {"MiB/s": 1.0}, "latency ms": {"p50": 1.0, "p99": 2.0}},
        "telepresence": {"cpu s/GiB": {"daemon": 1.0, "manager": 0.5}},
    }
    out = tmp_path / "bench.png"
    render_chart(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
