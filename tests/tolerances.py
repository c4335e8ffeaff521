"""The one tolerance table of the test suite, justified by each dtype's precision.

Values are (rtol, atol) for ``torch.testing.assert_close`` of a result against a float64 reference
computed from the same (already rounded) inputs. Our kernels accumulate in float32 for the half
types, so the error is the final rounding of the output (fp16: 2**-11 ≈ 4.9e-4 relative, bf16:
2**-8 ≈ 3.9e-3) plus float32 accumulation noise; float32 is float32 accumulation noise (~1e-6
relative for sums of a few hundred terms); float64 is exact up to summation order.
"""

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
