"""RoIAlign's Triton kernels with a GPU tile under the interpreter.

The interpreter runs only the first autotune config (``kernels._triton_utils.autotune_configs``), whose ``BLOCK_P``
of 64 bins pools the tests' RoIs in one step; a GPU's autotuner may pick a config of 4 bins per step (see
``kernels._roi_align_kernels``), which walks a RoI's bins in several steps. The ``backend`` fixtures of the
RoIAlign tests run every test a third time inside ``small_bin_steps()``, so that both are tested before any GPU
runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kernels import _roi_align_kernels as _k


@contextlib.contextmanager
def small_bin_steps() -> Iterator[None]:
    """Inside the block the forward and the atomic backward run the config with the fewest bins per step and,
    among those, the largest channel block (the fewest programs under the interpreter; channel counts under it
    test the masking)."""
    fewest = min(c.kwargs["BLOCK_P"] for c in _k._gather_configs())
    config = max(
        (c for c in _k._gather_configs() if c.kwargs["BLOCK_P"] == fewest), key=lambda c: c.kwargs["BLOCK_C"]
    )
    tuned = (_k._roi_align_fwd_kernel, _k._roi_align_bwd_kernel)
    saved = [kernel.configs for kernel in tuned]
    for kernel in tuned:
        kernel.configs = [config]
    try:
        yield
    finally:
        for kernel, configs in zip(tuned, saved, strict=True):
            kernel.configs = configs
