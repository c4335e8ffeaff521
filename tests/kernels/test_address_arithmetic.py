"""64-bit address arithmetic: the kernels multiply every int32 index (a program id, a ``tl.arange`` lane,
an int32 load, a loop index) and every constant that meets a stride through ``kernels._triton_utils.offset64``.

Here that helper runs inside a tiny kernel on the argument types the kernels give it (an int argument below 2**31,
a stride or a size, is int32, and so are program ids, aranges and loop indices) with products past 2**31, e.g.
``nms_fixed``'s mask row of box 371,263 (a 17 GB mask, which fits an H200). The result must be the exact product.
The same kernel also computes the plain int32 product, which must wrap: so a cast removed from ``offset64`` fails
the test, on the interpreter and on a GPU alike.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET, loop_bound, offset64

DEVICE = "cpu" if INTERPRET else "cuda"


@triton.jit
def _product(index, stride, WIDE: tl.constexpr):
    if WIDE:
        return offset64(index, stride)
    else:
        return index * stride


@triton.jit
def _products_kernel(out_ptr, loaded_ptr, index, stride, KIND: tl.constexpr, WORD: tl.constexpr, WIDE: tl.constexpr):
    """out_ptr: [2] int64, ``index' * stride`` for two lanes, where ``index'`` is ``index`` (+ the lane) reached as
    ``KIND`` says; loaded_ptr: [2] int32, read for ``KIND == "int32 load"``."""
    lanes = tl.arange(0, 2)
    if KIND == "program id":
        tl.store(out_ptr + lanes, _product(tl.program_id(0) + index, stride, WIDE) + lanes * 0)
    elif KIND == "tl.arange":
        tl.store(out_ptr + lanes, _product(index + lanes, stride, WIDE))
    elif KIND == "int32 load":
        tl.store(out_ptr + lanes, _product(tl.load(loaded_ptr + lanes), stride, WIDE))
    elif KIND == "loop index":  # nms_fixed's sweep: row c * WORD + t of the mask, t = WORD - 1
        for c in range(loop_bound(index), loop_bound(index + 1)):
            tl.store(out_ptr + lanes, _product(c * WORD + (WORD - 1), stride, WIDE) + lanes * 0)
    else:  # a constant column: the y2 of a [4, N] tensor's transpose
        tl.store(out_ptr + lanes, _product(3, stride, WIDE) + lanes * 0)


# kind -> (index, stride, the exact products of the two lanes)
CASES = {
    "program id": (70_000, 40_000, [70_000 * 40_000] * 2),
    "tl.arange": (70_000, 40_000, [70_000 * 40_000, 70_001 * 40_000]),
    "int32 load": (70_000, 40_000, [70_000 * 40_000, 70_001 * 40_000]),
    # 371,264 boxes: a mask row holds ceil(371264 / 64) = 5801 words; block c = 5800, box t = 63.
    "loop index": (5800, 5801, [(5800 * 64 + 63) * 5801] * 2),
    "constant": (0, 800_000_000, [3 * 800_000_000] * 2),
}


def _run(kind: str, wide: bool) -> list[int]:
    index, stride, _ = CASES[kind]
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    loaded = torch.tensor([index, index + 1], dtype=torch.int32, device=DEVICE)
    _products_kernel[(1,)](out, loaded, index, stride, KIND=kind, WORD=64, WIDE=wide)
    return out.tolist()


@pytest.mark.parametrize("kind", CASES)
def test_offset64_is_the_exact_product_where_int32_wraps(kind: str) -> None:
    index, stride, exact = CASES[kind]
    assert index < 2**31 and stride < 2**31 and min(exact) >= 2**31  # int32 arguments, a product past 2**31
    assert _run(kind, wide=True) == exact
    wrapped = [(p + 2**31) % 2**32 - 2**31 for p in exact]
    assert _run(kind, wide=False) == wrapped  # what the kernels computed before the casts
