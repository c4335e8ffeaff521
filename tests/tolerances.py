"""The one tolerance table of the test suite, justified by each dtype's precision.

Values are (rtol, atol) for ``torch.testing.assert_close`` of a result against a float64 reference
computed from the same (already rounded) inputs. Our kernels accumulate in float32 for the half
types, so the error is the final rounding of the output (fp16: 2**-11 ≈ 4.9e-4 relative, bf16:
2**-8 ≈ 3.9e-3) plus float32 accumulation noise; float32 is float32 accumulation noise (~1e-6
relative for sums of a few hundred terms); float64 is exact up to summation order.
"""

import math

import torch

TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def coordinate_atol(extent: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error of a value computed from pixel coordinates of magnitude up to ``extent`` in ``dtype``:
    two units in the last place at that magnitude (e.g. float32 at 1216 px: 2 * 2**-23 * 1024 = 2.4e-4 px).

    Such errors do not scale with the result: a box corner ``ctr - w / 2`` near 0 cancels terms of the image's
    size, and a mask target sampled at a coordinate off by that much moves by up to as much (slope <= 1 per
    pixel for a binary mask), so a relative tolerance alone cannot hold on a GPU, whose FMA contractions round
    those terms differently from the float64 or CPU reference.
    """
    return 2 * torch.finfo(dtype).eps * 2 ** math.floor(math.log2(extent))


def subnormal_atol(dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s subnormals (fp16: 2**-25 = 3.0e-8): a result below the smallest normal
    number is stored with this absolute rounding error, whatever its relative error becomes."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2
