"""Benchmarks of the ``kernels`` ops: pytest-benchmark suites (``bench/test_<op>.py``), the runner
(``python -m bench``), the report builder (``python -m bench.report``) and the ahead-of-time
register/occupancy report (``python -m bench.kernels``).

This module holds the measurements every part shares: which device to use, a timer that waits for
the GPU, and the two machine baselines a result is judged against (device copy bandwidth and a
matmul rate), both measured in the same run as the suites.

Conventions a suite may follow (the runner copes with any of them missing): each benchmark sets
``benchmark.extra_info`` keys ``op``, ``shape``, ``dtype``, ``mode``, ``provider`` (``"ours"`` or
``"torchvision"``) and ``bytes`` (the bytes the op must read plus write, for the % of bandwidth).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable

import torch


def bench_device() -> torch.device:
    """The device the suites measure on: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


SHAPES_ENV = "BENCH_SHAPES"  # "coco" or "cpu": the suites' shapes whatever the device (unset: by device)


def coco_shapes(device: str | torch.device | None = None) -> bool:
    """Whether the suites use their COCO shapes (else their reduced CPU shapes): by default on CUDA only.

    ``BENCH_SHAPES=coco`` forces the COCO shapes on any device (``python -m bench.kernels`` records the
    launches of the COCO-shape runs on a machine without a GPU), ``BENCH_SHAPES=cpu`` the CPU shapes."""
    forced = os.environ.get(SHAPES_ENV, "")
    if forced not in ("", "coco", "cpu"):
        raise ValueError(f"{SHAPES_ENV} must be 'coco' or 'cpu', got {forced!r}")
    if forced:
        return forced == "coco"
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-x86_64``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"cpu-{platform.machine() or 'unknown'}"
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def synced_timer() -> float:
    """``time.perf_counter`` after the GPU has finished its queued work.

    Passed to pytest-benchmark as ``--benchmark-timer=bench.synced_timer`` on CUDA, so a round times
    the kernels and not just their launch, whether or not a suite's callable synchronizes itself.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, cuBLAS handles, kernel loads
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s (1e9 bytes/s): a large device-to-device copy, counting the bytes
    read plus the bytes written. This is the ceiling a memory-bound op can reach on this device."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def matmul_rate(device: torch.device, n: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """(TFLOP/s, dtype name) of an ``n x n x n`` matmul: bf16 on CUDA (the tensor-core rate), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e12, str(dtype).removeprefix("torch.")
