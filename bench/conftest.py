"""Shared set-up of the benchmark suites ``bench/test_<op>.py``.

* Fixtures: ``bench_device`` (the GPU if there is one, else the CPU) and ``copy_bandwidth`` (GB/s of a
  device-to-device copy, measured once per session) for suites that want them.
* ``BENCH_QUICK=1`` (set by ``python -m bench --quick``) keeps, of every parametrized benchmark, only
  the first case for each provider: a smoke run of every suite in seconds.
* The machine info of ``--benchmark-json`` gets the torch / triton / torchvision versions and the GPU.
* ``BENCH_PARTIAL=<file>`` (set by ``python -m bench``) appends each finished benchmark to that file as one
  JSON line, in ``--benchmark-json``'s form: a suite stopped by its time budget, or one whose
  pytest-benchmark fails at the interrupt (it does when SIGINT lands inside a round), keeps its rows.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from bench import bench_device as _bench_device
from bench import copy_bandwidth as _copy_bandwidth

QUICK = os.environ.get("BENCH_QUICK", "0") == "1"
PARTIAL = os.environ.get("BENCH_PARTIAL")
_written = 0  # benchmarks of this session already appended to PARTIAL


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return _bench_device()


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device: torch.device) -> float:
    """Device copy bandwidth in GB/s (bytes read + written per second / 1e9)."""
    return _copy_bandwidth(bench_device)


def _provider(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("provider") if callspec else None


def _interleave_providers(items: list[pytest.Item]) -> None:
    """Reorder (stable) so that a case's providers run one after another, eager providers before compiled
    ones: a suite stopped by its time budget then keeps pairs to compare (on the first H200 run, the RoIAlign
    suite's 13 s share measured 3 torchvision rows and none of ours, as pytest runs the first parameter's
    values last), and the minutes that inductor spends compiling the model come after every eager row."""
    cases: dict[tuple[str, str], int] = {}

    def key(item: pytest.Item) -> tuple[bool, int]:
        callspec = getattr(item, "callspec", None)
        params = {k: v for k, v in callspec.params.items() if k != "provider"} if callspec else {}
        case = cases.setdefault((item.nodeid.split("[")[0], repr(params)), len(cases))
        provider = _provider(item) or ""
        return "compile" in provider or "cudagraphs" in provider, case

    items.sort(key=key)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _interleave_providers(items)
    if not QUICK:
        return
    keep, drop, seen = [], [], set()
    for item in items:
        key = (item.nodeid.split("[")[0], _provider(item))
        (drop if getattr(item, "callspec", None) is not None and key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    try:
        import torchvision

        machine_info["torchvision"] = torchvision.__version__
    except ImportError:
        machine_info["torchvision"] = None
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    global _written
    session = getattr(_config, "_benchmarksession", None) if PARTIAL else None
    if session is None or len(session.benchmarks) == _written:
        return
    new = session.benchmarks[_written:]
    _written = len(session.benchmarks)
    # pytest-benchmark's own serialization, so that a row reads the same as in its --benchmark-json.
    rows = _config.hook.pytest_benchmark_generate_json(
        config=_config, benchmarks=new, include_data=True, machine_info={}, commit_info={}
    )["benchmarks"]
    from pytest_benchmark.utils import safe_dumps  # its JSON encoder (dtypes and other params as text)

    with open(PARTIAL, "a") as f:
        f.writelines(safe_dumps(row) + "\n" for row in rows)


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
