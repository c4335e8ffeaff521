"""Table and chart of a benchmark results file: ``python -m bench.report bench/results/<file>.json``.

Writes ``<file>.md`` (op, shape, dtype, mode, one column per provider with the median time and its
20th-80th percentile range, the speedup of ours over torchvision, and the % of the measured copy
bandwidth reached by ours where the suite reports the bytes the op must move) and ``<file>.png``
(speedups as bars, each value printed in a column right of the plot) next to the results file.

A smoke run's results (``python -m bench --quick``: a few calls per case) make a table of times headed as smoke
figures, with neither speedups nor bandwidth shares, and no chart: they say that a suite runs, not how fast.

A benchmark is described by its ``extra_info`` (``op``, ``shape``, ``dtype``, ``mode``, ``provider``,
``bytes``), else by its pytest parameters of those names; the op defaults to the suite's name and a
missing column shows "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FIELDS = ("op", "shape", "dtype", "mode")
PROVIDER_ORDER = ("ours", "torchvision")


def _field(bench: dict[str, Any], name: str) -> Any:
    info, params = bench.get("extra_info") or {}, bench.get("params") or {}
    value = info.get(name, params.get(name))
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return str(value).removeprefix("torch.")


def _case(bench: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(the row a benchmark belongs to, its provider)."""
    provider = _field(bench, "provider") or "time"  # a benchmark without providers gets a plain time column
    fields = {name: _field(bench, name) for name in FIELDS}
    suite, _, test = bench.get("fullname", bench.get("name", "?")).partition("::")
    fields["op"] = fields["op"] or Path(suite).stem.removeprefix("test_")
    if not any(fields[n] for n in FIELDS[1:]):
        # Nothing but the op is known: the test name and its parameters (without the provider) tell rows apart.
        case = [p for p in (bench.get("param") or "").split("-") if p != provider]
        fields["op"] += f" {test.split('[')[0]}" + (f"[{'-'.join(case)}]" if case else "")
    return tuple(fields[n] or "-" for n in FIELDS), provider


def rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(providers in column order, one row per case: fields, median/p20/p80 seconds and bytes per provider)."""
    table: dict[tuple[str, ...], dict[str, Any]] = {}
    providers: dict[str, None] = {}
    for bench in results.get("benchmarks", []):
        key, provider = _case(bench)
        stats = bench.get("stats") or {}
        if "median" not in stats:
            continue
        providers[provider] = None
        row = table.setdefault(key, {"key": key, "times": {}, "bytes": None})
        row["times"][provider] = (stats["median"], stats.get("p20", stats.get("q1")), stats.get("p80", stats.get("q3")))
        nbytes = (bench.get("extra_info") or {}).get("bytes")
        if nbytes and (provider == "ours" or row["bytes"] is None):
            row["bytes"] = float(nbytes)
    order = [p for p in PROVIDER_ORDER if p in providers] + sorted(p for p in providers if p not in PROVIDER_ORDER)
    return order, list(table.values())


def _fmt_time(t: tuple[float, float | None, float | None] | None) -> str:
    """``123 us (120-130)``: the median and the 20th-80th percentiles, in the median's unit."""
    if t is None:
        return "-"
    median, lo, hi = t
    scale, unit = next((s, u) for s, u in ((1e6, "us"), (1e3, "ms"), (1.0, "s")) if median * s < 1000 or u == "s")
    text = f"{median * scale:.3g} {unit}"
    return text + (f" ({lo * scale:.3g}-{hi * scale:.3g})" if lo is not None and hi is not None else "")


def speedup(row: dict[str, Any]) -> float | None:
    ours, theirs = row["times"].get("ours"), row["times"].get("torchvision")
    return theirs[0] / ours[0] if ours and theirs and ours[0] > 0 else None


def bandwidth_share(row: dict[str, Any], bandwidth_gbps: float | None) -> float | None:
    """Fraction of the copy bandwidth that ours reaches: bytes moved / time / bandwidth."""
    ours = row["times"].get("ours")
    if not (ours and row["bytes"] and bandwidth_gbps):
        return None
    return row["bytes"] / ours[0] / (bandwidth_gbps * 1e9)


SMOKE_NOTE = (
    "**Smoke figures, not a benchmark** (`python -m bench --quick`): a few calls per case at reduced CPU shapes, "
    "compile-heavy suites left out. They show that each suite runs; so few calls say little about speed, so no "
    "speedup is given. `python -m bench` measures."
)


def markdown(results: dict[str, Any]) -> str:
    providers, table = rows(results)
    versions = results.get("versions", {})
    git = results.get("git", {})
    bandwidth = results.get("copy_bandwidth_gbps")
    smoke = bool(results.get("quick"))
    lines = [
        f"# {'Smoke run' if smoke else 'Benchmarks'}: {results.get('device', '?')}, {results.get('date', '?')}",
        "",
        f"torch {versions.get('torch')}, triton {versions.get('triton')}, torchvision {versions.get('torchvision')}"
        f"; commit {(git.get('commit') or 'none')[:12]}{' (dirty)' if git.get('dirty') else ''}.",
    ]
    if smoke:
        lines += [SMOKE_NOTE, ""]
        derived = []
    else:
        lines += [
            f"Copy bandwidth {bandwidth:.1f} GB/s (read + write); {results.get('matmul_dtype')} matmul "
            f"{results.get('matmul_tflops', 0):.3g} TFLOP/s." if bandwidth else "Copy bandwidth not measured.",
            "Times: median (20th-80th percentile). Speedup: torchvision / ours. "
            "% of bandwidth: bytes the op must move / our median / copy bandwidth.",
            "",
        ]  # fmt: skip
        derived = ["speedup", "% of bandwidth"]
    lines += [
        "| " + " | ".join([*FIELDS, *providers, *derived]) + " |",
        "|" + "---|" * len(FIELDS) + "--:|" * (len(providers) + len(derived)),
    ]
    for row in sorted(table, key=lambda r: r["key"]):
        cells = [*row["key"], *(_fmt_time(row["times"].get(p)) for p in providers)]
        if not smoke:
            s, share = speedup(row), bandwidth_share(row, bandwidth)
            cells += [f"{s:.2f}x" if s is not None else "-", f"{share:.0%}" if share is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if not table:
        lines.append("| " + " | ".join(["-"] * (len(FIELDS) + len(derived))) + " |")
    failed = {name: status for name, status in results.get("suites", {}).items() if " exit 0," not in status}
    if failed:
        lines += ["", "Suites that did not pass: " + "; ".join(failed.values())]
    return "\n".join(lines) + "\n"


def _speedup_label(value: float) -> str:
    """``141x``, ``2.10x``, ``0.0031x``: two decimals, whole numbers from 100x, and two significant digits below
    0.1x (where ``0.00x`` would say nothing)."""
    if value >= 100:
        return f"{value:.0f}x"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def chart_figure(results: dict[str, Any]) -> Any:
    """The speedup chart as a matplotlib ``Figure``, or ``None`` (without matplotlib, or for a smoke run).

    One horizontal bar per case, growing from 1x on a log axis (right: faster than torchvision, left: slower). The
    case names are the left axis's labels and the values the right axis's, one per bar, so that no text sits
    inside the plot where a long bar could run into it, and ``tight_layout`` keeps both columns in the figure."""
    if results.get("quick"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    _, table = rows(results)
    bars = sorted((" ".join(k for k in r["key"] if k != "-"), s) for r in table if (s := speedup(r)) is not None)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.3 * max(len(bars), 1)))
    ax.set_xscale("log")  # 0.5x and 2x are the same distance from 1x
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if bars:
        labels, values = zip(*bars, strict=True)
        positions = range(len(bars))
        ax.barh(
            positions, [v - 1 for v in values], left=1, color=["tab:green" if v >= 1 else "tab:red" for v in values]
        )
        lo, hi = min(*values, 1.0), max(*values, 1.0)
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.set_ylim(len(bars) - 0.5, -0.5)  # the first case on top
        ax.set_yticks(positions, labels)
        values_axis = ax.twinx()
        values_axis.set_ylim(ax.get_ylim())
        values_axis.set_yticks(positions, [_speedup_label(v) for v in values])
        values_axis.tick_params(axis="y", labelsize=7, length=0)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no case has both ours and torchvision", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over torchvision")
    ax.set_title(f"{results.get('device', '?')} {results.get('date', '')[:10]}", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """``chart_figure`` saved to ``path``; ``None`` (nothing written) where there is no chart."""
    fig = chart_figure(results)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], stem: Path) -> tuple[Path, Path | None]:
    """Write ``<stem>.md`` and ``<stem>.png``; return their paths (the chart's ``None`` where there is none: a
    smoke run, or no matplotlib)."""
    table = stem.parent / f"{stem.name}.md"
    table.write_text(markdown(results))
    return table, chart(results, stem.parent / f"{stem.name}.png")


def no_chart_reason(results: dict[str, Any]) -> str:
    """Why ``chart`` wrote nothing for these results."""
    return "no chart for a smoke run" if results.get("quick") else "no chart: matplotlib is not installed"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON written by python -m bench")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    table, png = write_report(results, args.results.with_suffix(""))
    print(table.read_text())
    print(f"wrote {table}" + (f" and {png}" if png else f" ({no_chart_reason(results)})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
