"""Benchmark runner: ``python -m bench [--quick] [--only roi_align,nms]``.

Runs every suite ``bench/test_<op>.py`` with pytest-benchmark (each in its own pytest process, so a
broken suite costs its rows and not the run), on CUDA at the suites' COCO shapes or on the CPU at their
reduced shapes, and measures in the same run the device copy bandwidth and a matmul rate (bf16 on
CUDA, fp32 on CPU). Writes ``<out>/<device>-<date>.json`` (the suites' raw pytest-benchmark entries,
with the 20th/80th percentiles in place of the list of rounds, plus device, library versions, git
commit and the two baselines), then the table and the chart of ``bench.report`` next to it.

``--quick`` is a smoke run (about a minute or two on a 2-core CPU): CPU, one case per benchmark and provider,
the median of three calls each (or the suite's own fixed rounds), small baselines, and the compile-heavy suites
(``QUICK_SKIPS``) left out unless named in ``--only``; its table gives times as smoke figures, without speedups,
and no chart. ``--time-budget`` bounds the suites' total time (each gets an equal share of what is left;
one over its share gets SIGINT, so that pytest-benchmark still writes the rows it finished, and SIGKILL
``GRACE`` seconds later), ``--max-time`` each benchmark's. The results file is rewritten after every
suite, so a run killed from outside keeps the suites it finished. ``--name`` sets the file's stem,
``--no-report`` skips the table and chart (``python -m bench.report <json>`` makes them later).
Exit status: 0 when every suite passed, 3 when the only trouble was suites stopped by the budget, 2 when the
suites cannot run here (pytest-benchmark is not installed: ``pip install -e ".[bench]"``; nothing is written),
else 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
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
from bench.report import no_chart_reason, write_report
from mrcnn.cli import CPU_ENV

ROOT = Path(__file__).resolve().parents[1]
EXIT_TIMED_OUT = 3  # every suite passed or was stopped by the time budget (keeping its finished rows)
GRACE = 10.0  # seconds between SIGINT and SIGKILL for a suite over its time: pytest's summary and JSON
EXIT_CANNOT_RUN = 2  # what the suites need is not installed
# Suites a --quick run leaves out (unless named in --only), and why. On a 2-core CPU the export suite took 409 s
# of a 538 s quick run: inductor and AOTInductor compile the model, and the ONNX export traces it.
QUICK_SKIPS = {"export": "compiles the model into a package and an ONNX model, minutes on a CPU"}
# What the suites import beyond this project's own dependencies, with the distribution that provides it.
REQUIREMENTS = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}


def missing_requirements() -> list[str]:
    """The distributions the suites need that are not installed (pytest-benchmark and the pytest it runs in)."""
    return [dist for module, dist in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def suites(only: Sequence[str] = (), skip: Sequence[str] = (), quick: bool = False) -> tuple[list[Path], list[str]]:
    """The suites ``bench/test_<name>.py`` to run: those named in ``only`` (all if empty), less those in ``skip``
    and, for a ``quick`` run without ``only``, those of ``QUICK_SKIPS``; and the names that ``quick`` left out."""
    files = sorted((ROOT / "bench").glob("test_*.py"))
    names = {f: f.stem.removeprefix("test_") for f in files}
    left_out = (
        [name for name in QUICK_SKIPS if name in names.values() and name not in skip] if quick and not only else []
    )
    return [f for f in files if (not only or names[f] in only) and names[f] not in (*skip, *left_out)], left_out


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
    if quick and "OMP_WAIT_POLICY" not in env:
        # mrcnn's CPU commands set these too (mrcnn.cli.CPU_ENV): on a shared CPU, OpenMP's default spinning
        # made a model call several times slower. Full runs keep the environment they are given.
        env = {**CPU_ENV, **env}
    with tempfile.TemporaryDirectory() as tmp:
        out, partial = Path(tmp) / "bench.json", Path(tmp) / "partial.jsonl"
        env["BENCH_PARTIAL"] = str(partial)  # bench/conftest.py appends every finished benchmark
        cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--benchmark-json={out}", "--benchmark-sort=fullname"]  # fmt: skip
        if quick:
            # The median of three calls, after pytest-benchmark's calibration call (the warm-up): one call on a
            # shared CPU can be one spike (a one-call quick run once gave NMS 1.7 s; it takes ~45 ms here).
            cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0", "--benchmark-warmup=off"]
        else:
            # Warm-up rounds absorb autotuning and compilation (the first call of a Triton kernel).
            cmd += ["--benchmark-warmup=on", "--benchmark-warmup-iterations=5"]
            if max_time is not None:
                cmd.append(f"--benchmark-max-time={max_time}")
        if device.type == "cuda":
            cmd.append("--benchmark-timer=bench.synced_timer")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)  # pytest stops, prints its summary, pytest-benchmark writes the JSON
            try:
                output, _ = proc.communicate(timeout=GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
        data = json.loads(out.read_text()) if out.exists() and out.stat().st_size else {}
        if not data and partial.exists():  # stopped before pytest-benchmark wrote its JSON
            data = {"benchmarks": [json.loads(line) for line in partial.read_text().splitlines()]}
    tail = (output.strip().splitlines() or [""])[-1]
    count = len(data.get("benchmarks", []))
    if timed_out:
        status = f"{suite.name}: timed out after {timeout:.0f} s, kept {count} benchmarks ({tail})"
    else:
        status = f"{suite.name}: exit {proc.returncode}, {count} benchmarks ({tail})"
    if timed_out or proc.returncode != 0:
        status += "\n" + "\n".join(output.strip().splitlines()[-20:])
    return data, status


def run(out_dir: Path, quick: bool = False, only: Sequence[str] = (), extra_suites: Sequence[Path] = (),
        max_time: float | None = None, time_budget: float | None = None, skip: Sequence[str] = (),
        name: str | None = None, report: bool = True) -> Path:  # fmt: skip
    """Run the suites and the baselines; write the results JSON (after every suite), then its table and
    chart unless ``report`` is false; return the JSON path (``<out_dir>/<name>.json``, by default
    ``<device>-<date>.json``)."""
    device = torch.device("cpu") if quick else bench_device()
    bandwidth = copy_bandwidth(device, nbytes=1 << 24 if quick else None, repeats=3 if quick else 10)
    tflops, mm_dtype = matmul_rate(device, n=256 if quick else None, repeats=3 if quick else 10)
    print(f"{device_name(device)}: copy {bandwidth:.1f} GB/s, {mm_dtype} matmul {tflops:.3g} TFLOP/s", flush=True)
    benchmarks, statuses, machine_info = [], {}, {}
    # The last suite stopped may take GRACE seconds past its share to write its rows.
    deadline = time.monotonic() + time_budget - GRACE if time_budget is not None else None
    selected, left_out = suites(only, skip, quick)
    todo = [*selected, *extra_suites]
    for suite_name in left_out:
        print(f"--quick leaves out test_{suite_name}.py ({QUICK_SKIPS[suite_name]}): python -m bench --only "
              f"{suite_name} runs it")  # fmt: skip
    if not todo:
        raise SystemExit("python -m bench: no suite selected")
    start = datetime.datetime.now(datetime.timezone.utc)
    path = out_dir / f"{name or device_name(device) + '-' + start.date().isoformat()}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, suite in enumerate(todo):
        # An equal share of what is left of the budget, so that a slow suite cannot starve the rest.
        timeout = None if deadline is None else max((deadline - time.monotonic()) / (len(todo) - i), 1.0)
        data, status = run_suite(suite, device, quick, max_time, timeout)
        print(status, flush=True)
        statuses[suite.name] = status.splitlines()[0]
        benchmarks += [_percentiles(b) for b in data.get("benchmarks", [])]
        machine_info = machine_info or data.get("machine_info", {})
        results = _results(device, start, quick, bandwidth, tflops, mm_dtype, statuses, machine_info, benchmarks)
        path.write_text(json.dumps(results, indent=1))
    if report:
        table, chart = write_report(results, path.with_suffix(""))
        print(table.read_text())
        print(f"wrote {path}, {table}" + (f", {chart}" if chart else f" ({no_chart_reason(results)})"))
    else:
        print(f"wrote {path}")
    return path


def _results(device: torch.device, start: datetime.datetime, quick: bool, bandwidth: float, tflops: float,
             mm_dtype: str, statuses: dict[str, str], machine_info: dict[str, Any],
             benchmarks: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": start.isoformat(timespec="seconds"),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run of a minute or two: one case per benchmark, three calls, no export "
                        "suite; smoke figures, no speedups")  # fmt: skip
    parser.add_argument("--only", default="", help="suites to run, comma-separated (roi_align,nms,...)")
    parser.add_argument("--skip", default="", help="suites not to run, comma-separated (model,...)")
    parser.add_argument("--name", help="stem of the results file (default: <device>-<date>)")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only, no table or chart")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--suite", type=Path, action="append", default=[], help="an extra suite file to run")
    parser.add_argument("--max-time", type=float, help="pytest-benchmark --benchmark-max-time per benchmark (s)")
    parser.add_argument("--time-budget", type=float, help="seconds for all suites; a suite over its share is stopped")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"error: python -m bench runs its suites with pytest-benchmark; not installed: {', '.join(missing)}. "
              'Install the bench extra: pip install -e ".[bench]"', file=sys.stderr)  # fmt: skip
        return EXIT_CANNOT_RUN
    only, skip = ([s.strip() for s in arg.split(",") if s.strip()] for arg in (args.only, args.skip))
    path = run(args.out_dir, args.quick, only, [p.resolve() for p in args.suite], args.max_time, args.time_budget,
               skip, args.name, not args.no_report)  # fmt: skip
    statuses = json.loads(path.read_text())["suites"].values()
    failed = [s for s in statuses if " exit 0," not in s and " timed out " not in s]
    timed_out = [s for s in statuses if " timed out " in s]
    for label, bad in (("failed", failed), ("ran out of time", timed_out)):
        if bad:
            print(f"python -m bench: suites that {label}:\n  " + "\n  ".join(bad), file=sys.stderr)
    return 1 if failed else (EXIT_TIMED_OUT if timed_out else 0)


if __name__ == "__main__":
    sys.exit(main())
