"""Half-precision results of the kernels round to nearest even under Triton's interpreter, as compiled GPU code does.

Triton's interpreter converts float32 -> bfloat16 by truncation; every half-precision store and cast in the kernels
therefore goes through ``kernels._triton_utils.cast_rn``, which rounds on the bits when interpreted and is a plain
``.to()`` (``cvt.rn``) when compiled. Checked here: ``cast_rn`` against ``Tensor.to`` on every kind of value, its
compiled PTX against a plain ``.to()``'s, and each op's bfloat16 / float16 output against its float64 reference
rounded to the output dtype and against the torch path's output.

How many elements may differ, and why: the kernels and the torch path compute in float32, a few float32 units of
roundoff (``2**-24`` relative) away from float64. Their half results can then differ from the correctly rounded one,
and from each other, only where the float64 value lies within that error of a midpoint between two neighbouring half
values (a near-tie), and then by one step. ``assert_equal_but_near_ties`` requires exactly that of every differing
element, with each op's bound on its float32 error, and that they are at most 1 % of the elements (each test's
docstring gives the counts measured). A truncating conversion is off in about half of all elements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import decode_boxes, encode_boxes, mask_loss, nms, paste_masks_in_image, roi_align, use_backend
from kernels._triton_utils import cast_rn
from tests.kernels.test_box_coder import CLIP, HEAD_WEIGHTS, decode_ref, encode_ref, random_deltas
from tests.kernels.test_box_coder import random_boxes as random_box_coder_boxes
from tests.kernels.test_mask_loss import random_case, ref_mask_loss
from tests.kernels.test_nms import clustered_boxes
from tests.kernels.test_paste_masks import case_masks, paste_ref
from tests.kernels.test_paste_masks import random_boxes as random_paste_boxes
from tests.reference import roi_align_ref, roi_align_ref_backward
from tests.tolerances import coordinate_atol

ROOT = Path(__file__).resolve().parents[2]
HALF = (torch.bfloat16, torch.float16)
U32 = 2.0**-24  # float32's unit roundoff


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------


def _order(t: Tensor) -> Tensor:
    """Integers in the order of the half values ``t``: neighbouring values differ by 1 (-0 and +0 are both 0)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_rounded(out: Tensor, ref: Tensor, eps: float | Tensor) -> int:
    """Each element of ``out`` (a half dtype) is the rounding of a value within ``eps`` of the float64 ``ref``: the
    rounding of ``ref`` itself but where ``ref +- eps`` round differently (near a midpoint between two half values,
    or, for a result that cancels terms much larger than itself, over a few steps). At most 1 % of the elements
    may differ from the rounding of ``ref``. Returns how many do."""
    out, ref = out.cpu(), ref.double()
    assert out.dtype in HALF and out.shape == ref.shape
    lo, hi = _order((ref - eps).to(out.dtype)), _order((ref + eps).to(out.dtype))
    inside = (lo <= _order(out)) & (_order(out) <= hi)
    assert inside.all(), f"{int((~inside).sum())} off by more than eps: {out[~inside][:5]} for {ref[~inside][:5]}"
    count = int((out != ref.to(out.dtype)).sum())
    assert count <= 0.01 * out.numel(), f"{count} of {out.numel()} elements are not the rounded float64 value"
    return count


def check(out: Tensor, torch_out: Tensor, ref: Tensor, eps: float | Tensor) -> None:
    """The kernels' ``out`` and the torch path's ``torch_out`` are both the rounded float64 ``ref`` (but where a value
    within ``eps`` of it rounds otherwise), so they differ in at most 1 % of the elements."""
    assert out.dtype == torch_out.dtype
    assert_rounded(out, ref, eps)
    assert_rounded(torch_out, ref, eps)
    assert (out != torch_out).sum() <= 0.01 * out.numel()


def both_paths(fn, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``fn``'s result on the Triton kernels (interpreted) and on the torch path."""
    with use_backend("triton"):
        out = fn(*args, **kwargs)
    with use_backend("torch"):
        return out, fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# cast_rn itself
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _convert_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, CAST_RN: tl.constexpr, VIA_FLOAT32: tl.constexpr):
    """``y = cast_rn(x)`` (CAST_RN) or ``y = x.to()``, through float32 if VIA_FLOAT32."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if CAST_RN:
        y = cast_rn(x, y_ptr.dtype.element_ty)
    else:
        if VIA_FLOAT32:
            x = x.to(tl.float32)
        y = x.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)


def _cast_inputs(dtype: torch.dtype) -> Tensor:
    """Random bit patterns of ``dtype`` (every exponent, subnormals, NaN payloads) and hand-picked values: ties and
    near-ties of both half dtypes, float32 ties of float64 values (c10 rounds float64 -> half through float32),
    overflow, signed zeros and infinities."""
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.float64:
        random = torch.randint(-(2**62), 2**62, (2048,), generator=gen).view(torch.float64)
    else:
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
        info = torch.iinfo(bits)
        random = torch.randint(info.min, info.max, (2048,), generator=gen, dtype=bits).view(dtype)
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.5, 65504.0, 65520.0, 7e4, 3.4e38, 1e-40]
    for m in (8, 11):  # bfloat16 and float16 keep 8 and 11 significant bits
        special += [1 + 2.0**-m, 1 + 3 * 2.0**-m, -(1 + 2.0**-m), 1 + 2.0**-m + 2.0**-40, 1 + 2.0**-m - 2.0**-40,
                    2.0**-20 * (1 + 2.0**-m), 2.0**-130 * (1 + 2.0**-m)]  # fmt: skip
    return torch.cat([random, torch.tensor(special, dtype=torch.float64).to(dtype)])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's float16 overflow
@pytest.mark.parametrize("src", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dst", HALF, ids=str)
def test_cast_rn_is_tensor_to(src: torch.dtype, dst: torch.dtype) -> None:
    """Interpreted, ``cast_rn`` gives ``Tensor.to``'s bits for every value (NaN: a NaN)."""
    x = _cast_inputs(src)
    y = torch.empty(x.shape, dtype=dst)
    _convert_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()), CAST_RN=True, VIA_FLOAT32=False)
    expected = x.to(dst)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


_PTX_CASES = [("fp32", "bf16"), ("fp32", "fp16"), ("fp64", "bf16"), ("fp64", "fp16"), ("bf16", "fp16")]


def compiled_bodies(capability: int = 90) -> dict[str, list[str]]:
    """Per case ``src->dst``: the PTX instructions (debug lines and comments removed) of ``_convert_kernel`` with
    ``cast_rn`` and with ``.to()`` (float64 through float32, as c10), compiled for ``sm_<capability>``. Must run
    without ``TRITON_INTERPRET``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def body(src: str, dst: str, cast_rn: bool) -> str:
        constexprs = {"BLOCK": 1024, "CAST_RN": cast_rn, "VIA_FLOAT32": src == "fp64"}
        signature = {"x_ptr": f"*{src}", "y_ptr": f"*{dst}", "n": "i32", **{k: "constexpr" for k in constexprs}}
        index = {name: (i,) for i, name in enumerate(signature)}
        source = ASTSource(
            fn=_convert_kernel, signature=signature, constexprs={index[k]: v for k, v in constexprs.items()}
        )
        ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4}).asm["ptx"]
        ptx = ptx.split(".section")[0]
        skip = re.compile(r"\s*($|\.loc|\.file|//|\$L__tmp)")
        return "\n".join(line for line in ptx.splitlines() if not skip.match(line))

    return {f"{src}->{dst}": [body(src, dst, True), body(src, dst, False)] for src, dst in _PTX_CASES}


def test_cast_rn_compiles_to_a_plain_conversion() -> None:
    """Compiled for sm_90 (no GPU needed), ``cast_rn`` is exactly ``.to()``: the same PTX, whose float32 -> half
    conversions are ``cvt.rn`` (round to nearest even); float64 goes through float32, as ``Tensor.to``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, tests.kernels.test_half_rounding as t; print(json.dumps(t.compiled_bodies()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bodies = json.loads(proc.stdout.splitlines()[-1])
    for case, (ours, plain) in bodies.items():
        assert ours == plain, case
        dst = {"bf16": "bf16", "fp16": "f16"}[case.split("->")[1]]  # PTX's names
        assert re.search(rf"cvt\.rn\.{dst}(x2)?\.f32", ours), case
        assert not re.search(rf"cvt\.rn\.{dst}(x2)?\.f64", ours), case


# ---------------------------------------------------------------------------------------------------------------
# The ops: interpreted on CPU, compiled on a GPU (tests marked cuda, run with TRITON_INTERPRET=0 by bench/gpu.sh)
# ---------------------------------------------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _rois(n: int, k: int, h: int, w: int, scale: float) -> Tensor:
    """[k, 5] RoIs at fractional coordinates, some partly outside an ``h x w`` map at ``scale``."""
    size = torch.tensor([w, h]) / scale
    xy = torch.rand(k, 2) * size * 1.2 - 1
    wh = torch.rand(k, 2) * size * 0.8 + 0.3
    return torch.cat([torch.randint(0, n, (k, 1)).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_forward(device: str, dtype: torch.dtype, aligned: bool, sampling_ratio: int) -> None:
    """Features in [0, 1), coordinates below 16: float32 is within 16 units of roundoff (measured: 8). Measured
    (CPU): 0 of 7680 elements off in bfloat16 (2,380-2,471 with the truncating store), 0-1 in float16."""
    x = torch.rand(2, 48, 11, 13, dtype=torch.float64).to(dtype)
    rois = _rois(2, 8, 11, 13, 0.5)
    out, torch_out = both_paths(roi_align, x.to(device), rois.to(device), (5, 4), 0.5, sampling_ratio, aligned)
    check(out, torch_out, roi_align_ref(x, rois, 5, 4, 0.5, sampling_ratio, aligned), 16 * U32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_backward(device: str, dtype: torch.dtype, deterministic: bool) -> None:
    """The feature gradient: the deterministic kernel stores it in the half dtype, the atomic one converts a float32
    buffer once. Upstream gradients in [0, 1): float32 is within 64 units of roundoff of the largest sum. Measured
    (CPU): 0 of 2880 elements off in bfloat16, 1 in float16."""
    x = torch.rand(2, 16, 9, 10, dtype=torch.float64).to(dtype)
    rois = _rois(2, 6, 9, 10, 1.0)
    grad = torch.rand(6, 16, 3, 3, dtype=torch.float64).to(dtype)
    x_dev = x.to(device).requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, torch_out = both_paths(
            lambda: torch.autograd.grad(roi_align(x_dev, rois.to(device), 3, 1.0, 2, True), x_dev, grad.to(device))[0]
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    ref = roi_align_ref_backward(grad, x, rois, 3, 3, 1.0, 2, True)
    check(out, torch_out, ref, 64 * U32 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_mask_loss_gradient(device: str, dtype: torch.dtype) -> None:
    """d loss / d logits ``= w / (M^2 sum w) * (sigmoid(x) - t)`` in the logits' dtype: float32 is within 32 units
    of roundoff of the largest ``w / (M^2 sum w)``. Measured (CPU): 0 of 882 elements off in bfloat16, 1 in
    float16."""
    case = random_case(R=6, K=3, M=7, dtype=dtype)
    args = [case[k].to(device) for k in ("boxes", "gt_masks", "image_idx", "matched_idx", "labels", "weights")]

    def grad() -> Tensor:
        logits = case["logits"].to(device).requires_grad_(True)
        return torch.autograd.grad(mask_loss(logits, *args), logits)[0]

    out, torch_out = both_paths(grad)
    _, ref = ref_mask_loss(case)
    scale = (case["weights"].max() / (7 * 7 * case["weights"].sum())).item()
    check(out, torch_out, ref, 32 * U32 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_paste_masks(device: str, dtype: torch.dtype) -> None:
    """Masks in [0, 1) resized bilinearly into a 40 x 56 image: float32 is within 64 units of roundoff. Measured
    (CPU): 1 of 13440 elements off in bfloat16, 3 in float16."""
    masks = case_masks(6, dtype=dtype)
    boxes = random_paste_boxes(6, (40, 56))
    out, torch_out = both_paths(paste_masks_in_image, masks.to(device), boxes.to(device), (40, 56))
    check(out, torch_out, paste_ref(masks, boxes, (40, 56)), 64 * U32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_decode_boxes(device: str, dtype: torch.dtype) -> None:
    """Boxes of a 300-pixel image grown up to 62.5-fold: float32's errors are absolute, a few units at the
    coordinates' magnitude (``coordinate_atol`` at the largest). Measured (CPU): 0 of 2400 elements off in
    bfloat16, 1 in float16."""
    boxes, deltas = random_box_coder_boxes(200), random_deltas(200, 3, dtype)
    out, torch_out = both_paths(decode_boxes, deltas.to(device), boxes.to(device), HEAD_WEIGHTS, CLIP)
    ref = decode_ref(deltas, boxes, HEAD_WEIGHTS, CLIP)
    check(out, torch_out, ref, coordinate_atol(ref.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_encode_boxes(device: str, dtype: torch.dtype) -> None:
    """Regression targets ``w * (centre difference) / size`` and ``w * log(size ratio)``: float32 is within 16 units
    of roundoff of their terms (the coordinates over the size; 1 + the logarithm). Measured (CPU): 0 of 1200
    elements off."""
    gt, proposals = random_box_coder_boxes(300, dtype), random_box_coder_boxes(300, dtype)
    out, torch_out = both_paths(encode_boxes, gt.to(device), proposals.to(device), HEAD_WEIGHTS)
    ref = encode_ref(gt, proposals, HEAD_WEIGHTS)
    g, p = gt.double(), proposals.double()
    coords = g.abs().amax(1, keepdim=True) + p.abs().amax(1, keepdim=True)
    sizes = p[:, 2:] - p[:, :2]
    terms = torch.cat([HEAD_WEIGHTS[0] * coords / sizes, HEAD_WEIGHTS[2] * (1 + ref[:, 2:].abs())], 1)
    check(out, torch_out, ref, 16 * U32 * terms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms(device: str, dtype: torch.dtype, iou: float) -> None:
    """NMS rounds each box side to the boxes' dtype (as torchvision's CUDA kernel): clustered boxes, many IoUs near
    the threshold, the same boxes kept on both paths."""
    boxes, scores = clustered_boxes(150, dtype).to(device), torch.rand(150, device=device)
    out, torch_out = both_paths(nms, boxes, scores, iou)
    assert torch.equal(out, torch_out)
