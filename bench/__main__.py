"""Benchmark runner: ``python -m bench [--quick] [--only roi_align,nms]``.

Runs every suite ``bench/test_<op>.py`` with pytest-benchmark (each in its own pytest process, so a
broken suite costs its rows and not the run), on CUDA at the suites' COCO shapes or on the CPU at their
reduced shapes, and measures in the same run the device copy bandwidth and a matmul rate (bf16 on
CUDA, fp32 on CPU). Writes ``<out>/<device>-<date>.json`` (the suites' raw pytest-benchmark entries,
with the 20th/80th percentiles in place of the list of rounds, plus device, library versions, git
commit and the two baselines), then the table and the chart of ``bench.report`` next to it.

``--quick`` is a smoke run for CI: CPU, one case per benchmark and provider, one round each, small
baselines. ``--time-budget`` bounds the suites' total time (each gets an equal share of what is left;
one over its share is stopped and loses its rows), ``--max-time`` each benchmark's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench import bench_device, copy_bandwidth, device_name, matmul_rate
from bench.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def suites(only: Sequence[str] = ()) -> list[Path]:
    files = sorted((ROOT / "bench").glob("test_*.py"))
    return [f for f in files if not only or f.stem.removeprefix("test_") in only]


def _versions() -> dict[str, str | None]:
    import triton

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "torchvision": tv, "cuda": torch.version.cuda}  # fmt: skip


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        except OSError:  # no git on the machine (a copied tree on the GPU box)
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _percentiles(bench: dict[str, Any]) -> dict[str, Any]:
    """Add the 20th and 80th percentiles of the rounds to ``stats`` (seconds) and drop the rounds
    themselves, which would make a GPU results file megabytes long."""
    stats = bench.get("stats") or {}
    rounds = stats.pop("data", None)
    if rounds:
        deciles = statistics.quantiles(rounds, n=10, method="inclusive") if len(rounds) > 1 else rounds * 9
        stats["p20"], stats["p80"] = deciles[1], deciles[7]
    return bench


def run_suite(
    suite: Path, device: torch.device, quick: bool, max_time: float | None, timeout: float | None = None
) -> tuple[dict[str, Any], str]:
    """Run one suite; (its pytest-benchmark JSON or ``{}``, a one-line status)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # benchmarks run compiled kernels
    env["BENCH_QUICK"] = "1" if quick else "0"
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the suites choose their shapes by device
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--benchmark-json={out}", "--benchmark-sort=fullname"]  # fmt: skip
        if quick:
            cmd += ["--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]
        else:
            # Warm-up rounds absorb autotuning and compilation (the first call of a Triton kernel).
            cmd += ["--benchmark-warmup=on", "--benchmark-warmup-iterations=5"]
            if max_time is not None:
                cmd.append(f"--benchmark-max-time={max_time}")
        if device.type == "cuda":
            cmd.append("--benchmark-timer=bench.synced_timer")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, f"{suite.name}: timed out after {timeout:.0f} s, 0 benchmarks"
        data = json.loads(out.read_text()) if out.exists() else {}
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    status = f"{suite.name}: exit {proc.returncode}, {len(data.get('benchmarks', []))} benchmarks ({tail})"
    if proc.returncode != 0:
        status += "\n" + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    return data, status


def run(out_dir: Path, quick: bool = False, only: Sequence[str] = (), extra_suites: Sequence[Path] = (),
        max_time: float | None = None, time_budget: float | None = None) -> Path:  # fmt: skip
    """Run the suites and the baselines; write the results JSON, table and chart; return the JSON path."""
    device = torch.device("cpu") if quick else bench_device()
    bandwidth = copy_bandwidth(device, nbytes=1 << 24 if quick else None, repeats=3 if quick else 10)
    tflops, mm_dtype = matmul_rate(device, n=256 if quick else None, repeats=3 if quick else 10)
    print(f"{device_name(device)}: copy {bandwidth:.1f} GB/s, {mm_dtype} matmul {tflops:.3g} TFLOP/s", flush=True)
    benchmarks, statuses, machine_info = [], {}, {}
    deadline = time.monotonic() + time_budget if time_budget is not None else None
    todo = [*suites(only), *extra_suites]
    for i, suite in enumerate(todo):
        # An equal share of what is left of the budget, so that a slow suite cannot starve the rest.
        timeout = None if deadline is None else max((deadline - time.monotonic()) / (len(todo) - i), 1.0)
        data, status = run_suite(suite, device, quick, max_time, timeout)
        print(status, flush=True)
        statuses[suite.name] = status.splitlines()[0]
        benchmarks += [_percentiles(b) for b in data.get("benchmarks", [])]
        machine_info = machine_info or data.get("machine_info", {})
    now = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "device": device_name(device),
        "device_type": device.type,
        "date": now.isoformat(timespec="seconds"),
        "quick": quick,
        "versions": _versions(),
        "git": _git_commit(),
        "copy_bandwidth_gbps": bandwidth,
        "matmul_tflops": tflops,
        "matmul_dtype": mm_dtype,
        "suites": statuses,
        "machine_info": machine_info,
        "benchmarks": benchmarks,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results['device']}-{now.date().isoformat()}.json"
    path.write_text(json.dumps(results, indent=1))
    table, chart = write_report(results, path.with_suffix(""))
    print(table.read_text())
    print(f"wrote {path}, {table}" + (f", {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: one case per benchmark, one round")
    parser.add_argument("--only", default="", help="suites to run, comma-separated (roi_align,nms,...)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--suite", type=Path, action="append", default=[], help="an extra suite file to run")
    parser.add_argument("--max-time", type=float, help="pytest-benchmark --benchmark-max-time per benchmark (s)")
    parser.add_argument("--time-budget", type=float, help="seconds for all suites; a suite over its share is stopped")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    run(args.out_dir, args.quick, only, [p.resolve() for p in args.suite], args.max_time, args.time_budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
