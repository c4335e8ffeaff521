"""RoIAlign's Triton kernels with the bins-fast tile order under the interpreter.

The interpreter runs only the first autotune config (``kernels._triton_utils.autotune_configs``), which orders a
program's tile channel-fast; a GPU's autotuner may pick a bins-fast one (``BINS_FAST``, see
``kernels._roi_align_kernels``). The ``backend`` fixtures of the RoIAlign tests run every test a third time
inside ``bins_fast_tiles()``, so that both orders are tested before any GPU runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kernels import _roi_align_kernels as _k


@contextlib.contextmanager
def bins_fast_tiles() -> Iterator[None]:
    """Inside the block the forward and the atomic backward run the bins-fast config with the largest channel
    block (the fewest programs under the interpreter; channel counts under it test the masking)."""
    config = max((c for c in _k._gather_configs() if c.kwargs["BINS_FAST"]), key=lambda c: c.kwargs["BLOCK_C"])
    tuned = (_k._roi_align_fwd_kernel, _k._roi_align_bwd_kernel)
    saved = [kernel.configs for kernel in tuned]
    for kernel in tuned:
        kernel.configs = [config]
    try:
        yield
    finally:
        for kernel, configs in zip(tuned, saved, strict=True):
            kernel.configs = configs
