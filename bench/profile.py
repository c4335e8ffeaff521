"""Where an op's time goes: host (dispatch, launch) against device (kernels), for the benchmark suites' cases.

``python -m bench.profile [--only mask_loss,roi_align] [--steps 10]``

A pytest-benchmark row on CUDA is the synchronised wall time of one call: host work plus whatever of the
kernels' time the host did not hide. This profiles the same callables (each suite's ``setup_<op>``) with
``torch.profiler`` and prints, per case, the wall time per call, the device time per call (the sum of its
kernels' self time), its heaviest kernels and, from ``cProfile``, the Python functions with the most time of
their own. Wall >> device means the call is bound by the host (Python, dispatch, launches): a faster kernel
would not show, and the Python column names what to trim (on the first H200 run our ops spent ~500 us per
call on the host against 100-170 us on the device). On a CPU-only machine the device column is empty.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

# (suite, case label, factory of the step callable) for every profiled case.
Case = tuple[str, str, Callable[[], Callable[[], object]]]


def _cases() -> Iterator[Case]:
    from bench.test_mask_loss import MODES as MASK_MODES
    from bench.test_mask_loss import PROVIDERS as MASK_PROVIDERS
    from bench.test_mask_loss import setup_mask_loss
    from bench.test_roi_align import PROVIDERS as ROI_PROVIDERS
    from bench.test_roi_align import setup_roi_align

    for mode in MASK_MODES:
        for provider in MASK_PROVIDERS:
            yield "mask_loss", f"{mode} {provider}", lambda p=provider, m=mode: setup_mask_loss(p, m)
    # The two poolers of Mask R-CNN: 7x7 for the box head, 14x14 for the mask head, 4 FPN levels.
    for output, dtype in ((7, torch.float32), (14, torch.bfloat16)):
        for mode in ("forward", "backward"):
            for provider in ROI_PROVIDERS:
                label = f"multi {output}x{output} {str(dtype).removeprefix('torch.')} {mode} {provider}"
                make = lambda p=provider, o=output, d=dtype, m=mode: setup_roi_align(p, "multi", o, d, m)[0]
                yield "roi_align", label, make


def python_hot_spots(step: Callable[[], object], steps: int) -> list[tuple[str, float]]:
    """[(``file:line(function)``, own seconds per call)] of the Python functions ``step`` spends most in."""
    prepare = getattr(step, "prepare", None) or (lambda: None)
    profiler = cProfile.Profile()
    for _ in range(steps):
        prepare()
        profiler.enable()
        step()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, ..)}
    spots = [(f"{file.rsplit('/', 1)[-1]}:{line}({name})", own / steps) for (file, line, name), (_, _, own, *_)
             in stats.items()]  # fmt: skip
    return sorted(spots, key=lambda kv: -kv[1])


def profile_step(step: Callable[[], object], steps: int) -> tuple[float, float, list[tuple[str, float]]]:
    """(wall seconds per call, device seconds per call, [(kernel, device seconds per call)] heaviest first)."""
    prepare = getattr(step, "prepare", None) or (lambda: None)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        prepare()
        step()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    wall = 0.0
    with profile(activities=activities) as prof:
        for _ in range(steps):
            prepare()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()  # the suites' callables synchronise before they return
            wall += time.perf_counter() - t0
    kernels = [
        (e.key, e.self_device_time_total / 1e6 / steps)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    kernels.sort(key=lambda kv: -kv[1])
    return wall / steps, sum(t for _, t in kernels), kernels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="suites to profile, comma-separated (mask_loss,roi_align)")
    parser.add_argument("--steps", type=int, default=10, help="profiled calls per case")
    parser.add_argument("--top", type=int, default=3, help="kernels listed per case")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print("| suite | case | wall / call | device / call | heaviest kernels (device / call) | Python (own / call) |")
    print("|---|---|--:|--:|---|---|")
    for suite, label, make in _cases():
        if only and suite not in only:
            continue
        step = make()
        wall, device, kernels = profile_step(step, args.steps)
        top = "; ".join(f"{name[:60]} {t * 1e6:.0f} us" for name, t in kernels[: args.top]) or "-"
        dev = f"{device * 1e6:.0f} us" if kernels else "-"
        host = "; ".join(f"{name[:60]} {t * 1e6:.0f} us" for name, t in python_hot_spots(step, args.steps)[: args.top])
        print(f"| {suite} | {label} | {wall * 1e6:.0f} us | {dev} | {top} | {host} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
