"""Single-level RoIAlign (kernels.roi_align): both backends against a hand-computed case, the float64 loop
reference (tests/reference.py) and torchvision.

Every test runs on the Triton kernels (through the interpreter on CPU) and on the vectorized torch path,
chosen by the ``backend`` fixture. Sizes stay small: the interpreter costs ~3 ms per program and the
forward grid is K * ceil(C / BLOCK_C) programs.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernels import use_backend
from kernels.roi_align import CANONICAL_LEVEL, CANONICAL_SCALE, RoIAlign, roi_align
from tests.kernels.roi_align_tiles import small_bin_steps
from tests.reference import (
    boxes_to_rois,
    roi_align_ref,
    roi_align_ref_argmax,
    roi_align_ref_backward,
)
from tests.tolerances import tol

CANONICAL = (float(CANONICAL_SCALE), float(CANONICAL_LEVEL))


def _roi_align_op(x: torch.Tensor, rois: torch.Tensor, scale: float, ph: int, pw: int, sampling_ratio: int,
                  aligned: bool, pool_mode: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(output, argmax)`` of the registered op that ``roi_align`` calls: the multi-level op with one level."""
    return torch.ops.mrcnn.multiscale_roi_align([x], rois, None, [scale], ph, pw, sampling_ratio, aligned, pool_mode,
                                                *CANONICAL)  # fmt: skip

# The interpreter emulates float ops with numpy, which warns on the inf/NaN coordinates of the invalid-RoI tests.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture(params=[*BACKENDS, "triton-small-steps"])
def backend(request: pytest.FixtureRequest):
    tiles = small_bin_steps() if request.param == "triton-small-steps" else contextlib.nullcontext()
    with use_backend(request.param.removesuffix("-small-steps")), tiles:
        yield request.param


def random_rois(
    n: int, k: int, height: int, width: int, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """K RoIs [K, 5] in image coordinates (feature coordinates / scale); many lie partly outside the map."""
    batch = torch.randint(0, n, (k, 1)).to(torch.float64)
    size = torch.tensor([width, height], dtype=torch.float64)
    xy1 = (torch.rand(k, 2, dtype=torch.float64) * 1.4 - 0.3) * size
    wh = torch.rand(k, 2, dtype=torch.float64) * 0.8 * size
    return torch.cat([batch, xy1 / scale, (xy1 + wh) / scale], dim=1).to(dtype)


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def forward_backward(fn, x: torch.Tensor, grad: torch.Tensor | None = None):
    """``fn(x)`` and the gradient of <fn(x), grad> with respect to ``x`` (a fresh leaf)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    if grad is None:
        grad = torch.randn(out.shape, dtype=torch.float64).to(out)  # out's dtype and device
    (gx,) = torch.autograd.grad(out, x, grad)
    return out.detach(), gx, grad


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed golden cases.
#
# Map (N=1, C=1, 4x4): v[i, j] = i*i + j, i.e. rows [0 1 2 3], [1 2 3 4], [4 5 6 7], [9 10 11 12].
# Bilinear interpolation is exact in j; in i it interpolates i*i linearly between rows, so
# f(0.75) = 0.75, f(1.25) = 1.75, f(1.75) = 3.25, f(2.25) = 5.25, f(2.5) = 6.5.
#
# Case A: box (0.5, 0.5, 2.5, 2.5), aligned=False, output 2x2, sampling_ratio=2. Size 2, bin 1, samples per
#   bin at start + p + {0.25, 0.75}: p=0 -> {0.75, 1.25}, p=1 -> {1.75, 2.25} on both axes.
#   out[0,0] = mean f{0.75,1.75} + mean x{0.75,1.25} = 1.25 + 1.0 = 2.25
#   out[0,1] = 1.25 + 2.0 = 3.25; out[1,0] = mean f{3.25,5.25} + 1.0 = 5.25; out[1,1] = 4.25 + 2.0 = 6.25
#   The same box shifted by +0.5 with aligned=True (offset 0.5) gives the same samples and values.
#   Gradient of out[0,0]: row weights over the 4 samples: row0 0.25, row1 0.75+0.75, row2 0.25 (same for columns),
#   so d out[0,0] / d v[i,j] = r[i] * r[j] / 4 with r = (0.25, 1.5, 0.25): centre 2.25/4 = 0.5625.
#   max mode: out[i,j] = largest sample = the (iy=1, ix=1) one -> argmax 3 everywhere:
#   out = [[1.75+1.25, 1.75+2.25], [5.25+1.25, 5.25+2.25]] = [[3.0, 4.0], [6.5, 7.5]].
#
# Case B: box (2, 2, 5, 5), aligned=False, output 1x1, adaptive sampling: size 3 -> grid 3x3, samples at
#   {2.5, 3.5, 4.5}. 4.5 > H=4 lies outside (the whole sample is 0); 3.5 clamps to the last row/column (value 9
#   in i, 3 in j). In-map samples: (f(2.5)+2.5) + (6.5+3) + (9+2.5) + (9+3) = 42 -> out = 42 / 9 = 14/3.
#   max mode: the largest is (y=3.5, x=3.5) -> v[3,3] = 12, argmax iy*3+ix = 4; its gradient: weight 1 on v[3,3].
#   With the map negated every in-map sample is negative, so the first out-of-map sample (iy=0, ix=2, value 0)
#   wins: out = 0, argmax 2, and no gradient at all.
# ---------------------------------------------------------------------------------------------------------------


def golden_map(dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(4, dtype=dtype).view(4, 1)
    j = torch.arange(4, dtype=dtype).view(1, 4)
    return (i * i + j).view(1, 1, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_avg(backend: str, dtype: torch.dtype) -> None:
    x = golden_map(dtype)
    expected_a = torch.tensor([[2.25, 3.25], [5.25, 6.25]], dtype=dtype).view(1, 1, 2, 2)
    box_a = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=dtype)
    torch.testing.assert_close(roi_align(x, box_a, 2, 1.0, 2, False), expected_a, **tol(dtype))
    box_a_aligned = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=dtype)
    torch.testing.assert_close(roi_align(x, box_a_aligned, 2, 1.0, 2, True), expected_a, **tol(dtype))
    # spatial_scale: the same box given in a 2x larger image.
    torch.testing.assert_close(roi_align(x, box_a * torch.tensor([1, 2, 2, 2, 2]), 2, 0.5, 2), expected_a, **tol(dtype))
    box_b = torch.tensor([[0, 2.0, 2.0, 5.0, 5.0]], dtype=dtype)
    expected_b = torch.full((1, 1, 1, 1), 14.0 / 3.0, dtype=dtype)
    torch.testing.assert_close(roi_align(x, box_b, 1, 1.0, -1), expected_b, **tol(dtype))


def test_golden_avg_gradient(backend: str) -> None:
    x = golden_map(torch.float64).requires_grad_(True)
    out = roi_align(x, torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64), 2, 1.0, 2)
    grad = torch.zeros_like(out)
    grad[0, 0, 0, 0] = 1.0
    (gx,) = torch.autograd.grad(out, x, grad)
    r = torch.tensor([0.25, 1.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(gx[0, 0], torch.outer(r, r) / 4, **tol(torch.float64))


def test_golden_max(backend: str) -> None:
    x = golden_map(torch.float64).requires_grad_(True)
    box_a = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64)
    out, argmax = _roi_align_op(x, box_a, 1.0, 2, 2, 2, False, "max")
    torch.testing.assert_close(out.detach(), torch.tensor([[[[3.0, 4.0], [6.5, 7.5]]]], dtype=torch.float64))
    assert argmax.dtype == torch.int32 and argmax.shape == (1, 1, 2, 2)
    assert argmax.eq(3).all()

    box_b = torch.tensor([[0, 2.0, 2.0, 5.0, 5.0]], dtype=torch.float64)
    out = roi_align(x, box_b, 1, 1.0, -1, pool_mode="max")
    assert out.item() == 12.0
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    expected[0, 0, 3, 3] = 1.0
    torch.testing.assert_close(gx, expected)
    _, argmax = _roi_align_op(x.detach(), box_b, 1.0, 1, 1, -1, False, "max")
    assert argmax.item() == 4

    neg = (-golden_map(torch.float64)).requires_grad_(True)
    out, argmax = _roi_align_op(neg, box_b, 1.0, 1, 1, -1, False, "max")
    assert out.item() == 0.0 and argmax.item() == 2
    (gx,) = torch.autograd.grad(out, neg, torch.ones_like(out))
    assert gx.eq(0).all()


def test_avg_mode_returns_empty_argmax(backend: str) -> None:
    x = golden_map(torch.float32)
    out, argmax = _roi_align_op(x, torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]]), 1.0, 2, 2, 2, False, "avg")
    assert out.shape == (1, 1, 2, 2)
    assert argmax.dtype == torch.int32 and argmax.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Against the float64 reference and torchvision.
# ---------------------------------------------------------------------------------------------------------------

# (spatial_scale, sampling_ratio, output_size): non-power-of-2 and up-sampling scales, fixed and adaptive grids
# (0 and -1 both mean adaptive), square and rectangular outputs.
CONFIGS = [
    (1.0, 2, (2, 3)),
    (0.5, -1, (3, 3)),
    (1.0 / 3.0, 1, (1, 4)),
    (0.25, 3, (2, 2)),
    (2.0, 0, (3, 2)),
]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"s{c[0]:.2f}-sr{c[1]}-{c[2][0]}x{c[2][1]}")
def test_avg_vs_reference_and_torchvision(backend: str, config, aligned: bool) -> None:
    scale, sr, (ph, pw) = config
    x = torch.randn(2, 3, 9, 11)  # odd C, H, W
    rois = random_rois(2, 5, 9, 11, scale)
    fn = lambda t: roi_align(t, rois, (ph, pw), scale, sr, aligned)
    out, gx, grad = forward_backward(fn, x)
    assert out.shape == (5, 3, ph, pw) and out.dtype == torch.float32

    tv_fn = lambda t: torchvision.ops.roi_align(t, rois, (ph, pw), scale, sr, aligned)
    tv_out, tv_gx, _ = forward_backward(tv_fn, x, grad)
    torch.testing.assert_close(out, tv_out, **tol(torch.float32))
    torch.testing.assert_close(gx, tv_gx, **tol(torch.float32))

    ref = roi_align_ref(x, rois, ph, pw, scale, sr, aligned)
    ref_gx = roi_align_ref_backward(grad, x, rois, ph, pw, scale, sr, aligned)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    torch.testing.assert_close(gx.double(), ref_gx, **tol(torch.float32))


def test_float64_matches_torchvision(backend: str) -> None:
    x = torch.randn(1, 4, 8, 7, dtype=torch.float64)
    rois = random_rois(1, 6, 8, 7, 0.5, torch.float64)
    for aligned in (False, True):
        out, gx, grad = forward_backward(lambda t, a=aligned: roi_align(t, rois, (3, 2), 0.5, -1, a), x)
        tv_out, tv_gx, _ = forward_backward(
            lambda t, a=aligned: torchvision.ops.roi_align(t, rois, (3, 2), 0.5, -1, a), x, grad
        )
        torch.testing.assert_close(out, tv_out, **tol(torch.float64))
        torch.testing.assert_close(gx, tv_gx, **tol(torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend: str, dtype: torch.dtype) -> None:
    """Every dtype against the float64 reference of the same (rounded) inputs, and against torchvision run in
    float32 on the upcast inputs (torchvision's CPU kernel lacks bfloat16 and accumulates fp16 in fp16)."""
    x = torch.randn(2, 5, 7, 9).to(dtype)
    rois = random_rois(2, 4, 7, 9, 0.5, dtype)
    for aligned in (False, True):
        fn = lambda t, a=aligned: roi_align(t, rois, (2, 3), 0.5, 2, a)
        out, gx, grad = forward_backward(fn, x)
        assert out.dtype == dtype and gx.dtype == dtype
        ref = roi_align_ref(x, rois, 2, 3, 0.5, 2, aligned)
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
        ref_gx = roi_align_ref_backward(grad, x, rois, 2, 3, 0.5, 2, aligned)
        torch.testing.assert_close(gx.double(), ref_gx, **tol(dtype))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tv = torchvision.ops.roi_align(x.to(acc), rois.to(acc), (2, 3), 0.5, 2, aligned)
        torch.testing.assert_close(out, tv.to(dtype), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("aligned", [False, True])
def test_max_mode(backend: str, dtype: torch.dtype, aligned: bool) -> None:
    x = torch.randn(2, 4, 9, 8).to(dtype)
    rois = random_rois(2, 5, 9, 8, 0.5, dtype)
    for sr in (2, -1):
        fn = lambda t, s=sr: roi_align(t, rois, (3, 2), 0.5, s, aligned, pool_mode="max")
        out, gx, grad = forward_backward(fn, x)
        ref = roi_align_ref(x, rois, 3, 2, 0.5, sr, aligned, "max")
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
        ref_gx = roi_align_ref_backward(grad, x, rois, 3, 2, 0.5, sr, aligned, "max")
        torch.testing.assert_close(gx.double(), ref_gx, **tol(dtype))


def test_max_mode_argmax_float64(backend: str) -> None:
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    rois = random_rois(1, 6, 6, 7, 1.0, torch.float64)
    for aligned in (False, True):
        out, argmax = _roi_align_op(x, rois, 1.0, 2, 3, -1, aligned, "max")
        torch.testing.assert_close(out, roi_align_ref(x, rois, 2, 3, 1.0, -1, aligned, "max"), **tol(torch.float64))
        ref_argmax = roi_align_ref_argmax(x, rois, 2, 3, 1.0, -1, aligned)
        has_sample = ref_argmax >= 0
        assert torch.equal(argmax.long()[has_sample], ref_argmax[has_sample])


def test_max_mode_ties_first_wins(backend: str) -> None:
    """A constant map makes every in-map sample tie: the first (iy=0, ix=0) wins, and all the gradient goes to
    that sample's neighbours. The samples sit at 0.75, 1.25, ..., 4.25, so the bilinear weights (multiples of 1/4)
    and every interpolated value (exactly 3) are exact in floating point."""
    x = torch.full((1, 2, 5, 5), 3.0, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.5, 4.5]], dtype=torch.float64)
    out, argmax = _roi_align_op(x, rois, 1.0, 2, 2, 4, False, "max")
    assert argmax.eq(0).all()
    assert out.detach().eq(3.0).all()
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    ref_gx = roi_align_ref_backward(torch.ones(1, 2, 2, 2), x, rois, 2, 2, 1.0, 4, False, "max")
    torch.testing.assert_close(gx, ref_gx, **tol(torch.float64))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_odd_boxes(backend: str, aligned: bool, pool_mode: str) -> None:
    """Boxes wholly outside the map, straddling every edge, tiny, zero-size and inverted (x2 < x1)."""
    h, w = 7, 9
    rows = [
        [0, w + 3.0, 1.0, w + 8.0, 5.0],  # wholly right of the map
        [1, -9.0, -9.0, -2.5, -3.0],  # wholly above-left
        [0, -3.0, -2.0, 4.0, 3.0],  # over the top-left corner
        [1, 5.0, 4.0, w + 4.0, h + 3.0],  # over the bottom-right corner
        [0, 2.3, 3.1, 2.31, 3.12],  # tiny
        [1, 4.0, 2.0, 4.0, 2.0],  # zero size
        [0, 6.0, 5.0, 3.0, 1.0],  # inverted
        [1, -0.5, -0.5, w - 0.5, h - 0.5],  # the whole map
    ]
    rois = torch.tensor(rows, dtype=torch.float64)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    for sr in (2, -1):
        fn = lambda t, s=sr: roi_align(t, rois, (2, 3), 1.0, s, aligned, pool_mode=pool_mode)
        out, gx, grad = forward_backward(fn, x)
        torch.testing.assert_close(out, roi_align_ref(x, rois, 2, 3, 1.0, sr, aligned, pool_mode), **tol(torch.float64))
        ref_gx = roi_align_ref_backward(grad, x, rois, 2, 3, 1.0, sr, aligned, pool_mode)
        torch.testing.assert_close(gx, ref_gx, **tol(torch.float64))
        assert out[:2].eq(0).all()
        if pool_mode == "avg":
            tv_out, tv_gx, _ = forward_backward(
                lambda t, s=sr: torchvision.ops.roi_align(t, rois, (2, 3), 1.0, s, aligned), x, grad
            )
            torch.testing.assert_close(out, tv_out, **tol(torch.float64))
            torch.testing.assert_close(gx, tv_gx, **tol(torch.float64))


@pytest.mark.slow  # ~10 s in the interpreter: 1024 samples in one bin
def test_adaptive_grid_cap(backend: str) -> None:
    """A box 2100 high with a 1-bin output would take a 2100-sample grid; it is capped at 1024 (documented)."""
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, -10.0, 1.5, 2090.0]], dtype=torch.float64)
    out = roi_align(x, rois, 1, 1.0, -1)
    torch.testing.assert_close(out, roi_align_ref(x, rois, 1, 1, 1.0, -1), **tol(torch.float64))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_many_channels(backend: str, pool_mode: str) -> None:
    """C = 70 spans several channel blocks (the last one partial) in every kernel, the deterministic one too."""
    x = torch.randn(1, 70, 6, 5)
    rois = random_rois(1, 2, 6, 5)
    fn = lambda t: roi_align(t, rois, 2, 1.0, 2, pool_mode=pool_mode)
    out, gx, grad = forward_backward(fn, x)
    ref = roi_align_ref(x, rois, 2, 2, 1.0, 2, False, pool_mode)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    ref_gx = roi_align_ref_backward(grad, x, rois, 2, 2, 1.0, 2, False, pool_mode)
    torch.testing.assert_close(gx.double(), ref_gx, **tol(torch.float32))
    with deterministic():
        _, gx_det, _ = forward_backward(fn, x, grad)
    torch.testing.assert_close(gx_det.double(), ref_gx, **tol(torch.float32))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_backward_with_broadcast_grad(backend: str, pool_mode: str) -> None:
    """out.sum().backward() hands the backward an expanded (stride 0) gradient."""
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = random_rois(1, 3, 6, 7, 1.0, torch.float64)
    roi_align(x, rois, (2, 3), 1.0, -1, True, pool_mode=pool_mode).sum().backward()
    ref_gx = roi_align_ref_backward(torch.ones(3, 3, 2, 3), x, rois, 2, 3, 1.0, -1, True, pool_mode)
    torch.testing.assert_close(x.grad, ref_gx, **tol(torch.float64))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_no_rois(backend: str, pool_mode: str) -> None:
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), (2, 3), 0.5, 2, pool_mode=pool_mode)
    assert out.shape == (0, 3, 2, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is None or x.grad.eq(0).all()
    assert roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], 2).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_one_roi(backend: str, pool_mode: str) -> None:
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    rois = torch.tensor([[0, 0.3, 1.1, 3.7, 4.2]], dtype=torch.float64)
    out, gx, grad = forward_backward(lambda t: roi_align(t, rois, 3, 1.0, -1, pool_mode=pool_mode), x)
    torch.testing.assert_close(out, roi_align_ref(x, rois, 3, 3, 1.0, -1, False, pool_mode), **tol(torch.float64))
    ref_gx = roi_align_ref_backward(grad, x, rois, 3, 3, 1.0, -1, False, pool_mode)
    torch.testing.assert_close(gx, ref_gx, **tol(torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Layouts, the list-of-boxes form and the module.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_layouts_match_contiguous(backend: str, pool_mode: str) -> None:
    """Channels-last, permuted and sliced inputs and strided RoIs give exactly the contiguous result."""
    base = torch.randn(2, 6, 9, 10)
    rois = random_rois(2, 4, 9, 10)
    fn = lambda t, r=rois: roi_align(t, r, (2, 3), 1.0, 2, False, pool_mode=pool_mode)
    out, gx, grad = forward_backward(fn, base)
    wide_rois = torch.cat([torch.randn(4, 2), rois, torch.randn(4, 1)], dim=1)[:, 2:7]
    assert not wide_rois.is_contiguous()
    variants = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed_hw": base.transpose(2, 3).contiguous().transpose(2, 3),
        "permuted": base.permute(1, 3, 0, 2).contiguous().permute(2, 0, 3, 1),
        "strided_w": torch.stack([base, torch.randn_like(base)], dim=-1)[..., 0],
        "channel_slice": torch.cat([base, torch.randn_like(base)], dim=1)[:, :6],
    }
    for name, xv in variants.items():
        assert torch.equal(xv, base) and not xv.is_contiguous(), name
        out_v, gx_v, _ = forward_backward(fn, xv, grad)
        assert torch.equal(out_v, out), name
        torch.testing.assert_close(gx_v, gx, **tol(torch.float32), msg=name)
    out_r, _, _ = forward_backward(lambda t: roi_align(t, wide_rois, (2, 3), 1.0, 2, pool_mode=pool_mode), base, grad)
    assert torch.equal(out_r, out)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_matches_nchw(backend: str, dtype: torch.dtype, pool_mode: str) -> None:
    """Channels-last features give the NCHW values and gradients within the dtype's tolerance; the gradient
    keeps the features' memory format."""
    base = torch.randn(2, 5, 7, 9).to(dtype)
    rois = random_rois(2, 4, 7, 9, dtype=dtype)
    fn = lambda t: roi_align(t, rois, (3, 2), 1.0, 2, False, pool_mode=pool_mode)
    out, gx, grad = forward_backward(fn, base)
    out_cl, gx_cl, _ = forward_backward(fn, base.contiguous(memory_format=torch.channels_last), grad)
    assert gx.is_contiguous()
    assert gx_cl.is_contiguous(memory_format=torch.channels_last) and not gx_cl.is_contiguous()
    assert out_cl.dtype == gx_cl.dtype == dtype
    torch.testing.assert_close(out_cl, out, **tol(dtype))
    torch.testing.assert_close(gx_cl, gx, **tol(dtype))


def test_list_of_boxes(backend: str) -> None:
    x = torch.randn(3, 2, 8, 8)
    boxes = [random_rois(1, 3, 8, 8)[:, 1:], torch.zeros(0, 4), random_rois(1, 2, 8, 8)[:, 1:]]
    out = roi_align(x, boxes, (2, 2), 1.0, 2, True)
    rois = boxes_to_rois(boxes)
    assert torch.equal(rois[:, 0], torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(out, roi_align(x, rois, (2, 2), 1.0, 2, True), **tol(torch.float32))
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, boxes, (2, 2), 1.0, 2, True), **tol(torch.float32))


@pytest.mark.parametrize("aligned", [False, True])
def test_module_matches_torchvision(backend: str, aligned: bool) -> None:
    x = torch.randn(2, 4, 10, 9)
    rois = random_rois(2, 5, 10, 9, 0.25)
    ours = RoIAlign((3, 2), 0.25, 2, aligned)
    theirs = torchvision.ops.RoIAlign((3, 2), 0.25, 2, aligned)
    out, gx, grad = forward_backward(lambda t: ours(t, rois), x)
    tv_out, tv_gx, _ = forward_backward(lambda t: theirs(t, rois), x, grad)
    torch.testing.assert_close(out, tv_out, **tol(torch.float32))
    torch.testing.assert_close(gx, tv_gx, **tol(torch.float32))
    assert not list(ours.parameters()) and not ours.state_dict()

    mx = RoIAlign(2, 0.25, -1, aligned, pool_mode="max")(x, rois)
    ref = roi_align_ref(x, rois, 2, 2, 0.25, -1, aligned, "max")
    torch.testing.assert_close(mx.double(), ref, **tol(torch.float32))


def test_public_exports() -> None:
    import kernels

    assert kernels.roi_align is roi_align and kernels.RoIAlign is RoIAlign
    assert kernels.use_backend is use_backend


# ---------------------------------------------------------------------------------------------------------------
# Invalid RoIs and bad arguments.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_invalid_rois_give_zeros_and_no_gradient(backend: str, pool_mode: str) -> None:
    n, h, w = 2, 6, 7
    nan, inf = float("nan"), float("inf")
    rows = [
        [0, 1.0, 1.0, 5.0, 4.0],  # valid
        [-1, 1.0, 1.0, 5.0, 4.0],  # batch index below 0
        [n, 1.0, 1.0, 5.0, 4.0],  # batch index N
        [-0.5, 1.0, 1.0, 5.0, 4.0],  # -0.5 < 0, although int(-0.5) == 0
        [nan, 1.0, 1.0, 5.0, 4.0],  # NaN batch index
        [1, nan, 1.0, 5.0, 4.0],  # NaN coordinates
        [1, 1.0, 1.0, 5.0, nan],
        [0, -inf, 1.0, 5.0, 4.0],  # infinite coordinates
        [1, 1.0, 1.0, inf, 4.0],
        [inf, 1.0, 1.0, 5.0, 4.0],
        [1.7, 0.5, 2.0, 6.0, 5.5],  # valid: truncated to batch 1
    ]
    rois = torch.tensor(rows, dtype=torch.float32)
    x = torch.randn(n, 3, h, w)
    out, gx, grad = forward_backward(lambda t: roi_align(t, rois, 2, 1.0, 2, pool_mode=pool_mode), x)
    assert out[1:-1].eq(0).all()
    ref = roi_align_ref(x, rois, 2, 2, 1.0, 2, False, pool_mode)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    assert torch.isfinite(gx).all()
    ref_gx = roi_align_ref_backward(grad, x, rois, 2, 2, 1.0, 2, False, pool_mode)
    torch.testing.assert_close(gx.double(), ref_gx, **tol(torch.float32))
    valid_only = rois[[0, -1]]
    _, gx_valid, _ = forward_backward(
        lambda t: roi_align(t, valid_only, 2, 1.0, 2, pool_mode=pool_mode), x, grad[[0, -1]]
    )
    torch.testing.assert_close(gx, gx_valid, **tol(torch.float32))


def test_bad_arguments_name_the_argument() -> None:
    x = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])
    cases = [
        ("input", lambda: roi_align(x[0], rois, 2)),
        ("input", lambda: roi_align(x.unsqueeze(0), rois, 2)),
        ("input", lambda: roi_align(x.long(), rois.long(), 2)),
        ("boxes|rois", lambda: roi_align(x, rois[:, 1:], 2)),
        ("boxes|rois", lambda: roi_align(x, torch.zeros(1, 6), 2)),
        ("boxes|rois", lambda: roi_align(x, rois[0], 2)),
        ("boxes|rois", lambda: roi_align(x, [torch.zeros(1, 5)], 2)),
        ("pool_mode", lambda: roi_align(x, rois, 2, pool_mode="sum")),
        ("output_size", lambda: roi_align(x, rois, 0)),
        ("output_size", lambda: roi_align(x, rois, (2, -1))),
        ("pool_mode", lambda: RoIAlign(2, 1.0, 2, pool_mode="mean")(x, rois)),
    ]
    for i, (name, call) in enumerate(cases):
        with pytest.raises((TypeError, ValueError), match=name):
            call()
            pytest.fail(f"case {i} did not raise")


def test_rois_of_another_float_dtype_are_read_in_the_accumulation_dtype(backend: str) -> None:
    """Unlike torchvision, boxes may have any float dtype (float32 boxes with bf16 features under autocast):
    coordinates are read in float32 (float64 for float64 features). Integer boxes are an error naming them."""
    x = torch.randn(1, 2, 9, 9)
    rois64 = torch.tensor([[0, 0.3, 0.7, 6.1, 7.3]], dtype=torch.float64)
    torch.testing.assert_close(roi_align(x, rois64, 2, 0.7), roi_align(x, rois64.float(), 2, 0.7), rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    ref = roi_align_ref(xb.double(), rois64.float().double(), 2, 2, 0.7, -1, False, "avg")
    torch.testing.assert_close(roi_align(xb, rois64.float(), 2, 0.7).double(), ref, **tol(torch.bfloat16))
    with pytest.raises(TypeError, match="rois"):
        roi_align(x, torch.tensor([[0, 0, 0, 2, 2]]), 2)


@pytest.mark.cuda
def test_device_mismatch_names_the_argument() -> None:
    x = torch.randn(1, 2, 5, 5, device="cuda")
    with pytest.raises((TypeError, ValueError), match="boxes|rois"):
        roi_align(x, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), 2)


# ---------------------------------------------------------------------------------------------------------------
# Autograd, determinism and torch.library.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_gradcheck(backend: str, pool_mode: str, aligned: bool) -> None:
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.7, 0.4, 5.1, 4.3], [0, -1.2, 2.2, 3.3, 7.4]], dtype=torch.float64)
    fn = lambda t: roi_align(t, rois, 2, 1.0, 2, aligned, pool_mode=pool_mode)
    # fast_mode: the full Jacobian costs ~30 s per case in the interpreter; exact gradients are compared with the
    # loop reference in the other tests.
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_gradcheck_channels_last(backend: str, pool_mode: str) -> None:
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    rois = torch.tensor([[0, 0.7, 0.4, 5.1, 4.3], [0, -1.2, 2.2, 3.3, 7.4]], dtype=torch.float64)
    fn = lambda t: roi_align(t, rois, 2, 1.0, 2, False, pool_mode=pool_mode)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize(
    "pool_mode, dtype", [("avg", torch.float32), ("max", torch.float32), ("avg", torch.bfloat16)], ids=str
)
def test_deterministic_backward(backend: str, pool_mode: str, dtype: torch.dtype) -> None:
    """Many overlapping RoIs (contended atomics on a GPU): the deterministic path agrees with the default one and
    is bitwise reproducible."""
    x = torch.randn(2, 4, 8, 9).to(dtype)
    invalid = torch.tensor([[-1, 1.0, 1.0, 6.0, 6.0], [1, float("nan"), 1.0, 6.0, 6.0]])
    repeated = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]).repeat(2, 1)
    rois = torch.cat([random_rois(2, 5, 8, 9), repeated, invalid]).to(dtype)
    fn = lambda t: roi_align(t, rois, 3, 1.0, -1, pool_mode=pool_mode)
    _, gx, grad = forward_backward(fn, x)
    with deterministic():
        _, gx1, _ = forward_backward(fn, x, grad)
        _, gx2, _ = forward_backward(fn, x, grad)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(gx1, gx, **tol(dtype))
    ref_gx = roi_align_ref_backward(grad, x, rois, 3, 3, 1.0, -1, False, pool_mode)
    torch.testing.assert_close(gx1.double(), ref_gx, **tol(dtype))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_opcheck(backend: str, pool_mode: str, aligned: bool) -> None:
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.6, 4.2, 3.9], [0, 1.5, -0.5, 3.0, 4.5]], dtype=torch.float64)
    args = ([x], rois, None, [1.0], 2, 2, 2, aligned, pool_mode, *CANONICAL)
    torch.library.opcheck(torch.ops.mrcnn.multiscale_roi_align.default, args)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_opcheck_backward_op(backend: str, pool_mode: str) -> None:
    """The registered backward op (reached through autograd) on its own, at one level: schema, fake tensor,
    dispatch."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 0.6, 4.2, 3.9], [0, 1.5, -0.5, 3.0, 4.5]], dtype=torch.float64)
    _, argmax = _roi_align_op(x, rois, 1.0, 2, 2, 2, False, pool_mode)
    grad = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    args = (grad, rois, None, argmax, [1.0], 2, 2, 2, False, pool_mode, *CANONICAL, 1, [5, 6], False)
    torch.library.opcheck(torch.ops.mrcnn.multiscale_roi_align_backward.default, args)


def test_compile_fullgraph() -> None:
    module = RoIAlign((2, 3), 0.5, -1, True, pool_mode="max")

    def fn(x: torch.Tensor, rois: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return roi_align(x, rois, 2, 0.5, 2), module(x, rois), roi_align(x, boxes, (3, 2), 0.5, 1, pool_mode="max")

    x = torch.randn(2, 3, 7, 8)
    rois = random_rois(2, 3, 7, 8, 0.5)
    boxes = [random_rois(1, 2, 7, 8, 0.5)[:, 1:], random_rois(1, 1, 7, 8, 0.5)[:, 1:]]
    explanation = torch._dynamo.explain(fn)(x, rois, boxes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    eager, got = fn(xe, rois, boxes), compiled(xc, rois, boxes)
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(b, a)
    sum(o.sum() for o in eager).backward()
    sum(o.sum() for o in got).backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    # Another number of RoIs: the fake implementations must handle a symbolic K when dynamo recompiles.
    more_rois = random_rois(2, 5, 7, 8, 0.5)
    for a, b in zip(fn(x, more_rois, boxes), compiled(x, more_rois, boxes), strict=True):
        torch.testing.assert_close(b, a)


# ---------------------------------------------------------------------------------------------------------------
# Random shapes and boxes against the reference.
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def roi_align_cases(draw: st.DrawFn):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 8))
    w = draw(st.integers(1, 8))
    k = draw(st.integers(0, 4))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1.0 / 3.0, 2.0]))
    # Coordinates on a 0.1 grid with different irrational-ish offsets for x1/x2 and y1/y2: no sample lands exactly
    # on a map edge and no box size is an exact multiple of the output size, where two correct float programs
    # may round to different sides of a threshold.
    rows = []
    for _ in range(k):
        b = draw(st.integers(0, n - 1))
        x1, x2 = (draw(st.integers(-30, 10 * w + 30)) / 10 for _ in range(2))
        y1, y2 = (draw(st.integers(-30, 10 * h + 30)) / 10 for _ in range(2))
        rows.append([b, (x1 + 0.0123) / scale, (y1 + 0.0311) / scale, (x2 + 0.0571) / scale, (y2 + 0.0747) / scale])
    return dict(
        x=torch.randn(n, c, h, w, dtype=torch.float64),
        rois=torch.tensor(rows, dtype=torch.float64).reshape(k, 5),
        ph=draw(st.integers(1, 3)),
        pw=draw(st.integers(1, 3)),
        scale=scale,
        sr=draw(st.sampled_from([-1, 0, 1, 2, 3])),
        aligned=draw(st.booleans()),
        pool_mode=draw(st.sampled_from(["avg", "max"])),
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=roi_align_cases())
# Found by the search: one bin, adaptive grids of 2x1 and 1x1 samples (max mode viewed a strided corner table).
@example(
    case=dict(
        x=torch.tensor([[[[-0.2934]]]], dtype=torch.float64),
        rois=torch.tensor([[0, 0.0123, 0.0311, 0.0571, y2] for y2 in (0.0747, 1.0747)], dtype=torch.float64),
        ph=1, pw=1, scale=1.0, sr=-1, aligned=False, pool_mode="max",
    )
)  # fmt: skip
def test_property_matches_reference(backend_name: str, case: dict) -> None:
    args = (case["ph"], case["pw"], case["scale"], case["sr"], case["aligned"], case["pool_mode"])
    with use_backend(backend_name):
        fn = lambda t: roi_align(t, case["rois"], (args[0], args[1]), *args[2:5], pool_mode=args[5])
        out, gx, grad = forward_backward(fn, case["x"])
    torch.testing.assert_close(out, roi_align_ref(case["x"], case["rois"], *args), **tol(torch.float64))
    ref_gx = roi_align_ref_backward(grad, case["x"], case["rois"], *args)
    torch.testing.assert_close(gx, ref_gx, **tol(torch.float64))
    assert math.prod(out.shape) == case["rois"].shape[0] * case["x"].shape[1] * args[0] * args[1]


# ---------------------------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU).
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_cuda_matches_reference_and_torchvision(dtype: torch.dtype, pool_mode: str) -> None:
    # Image coordinates up to ~270 put float32 sample coordinates ~1e-5 pixel off the float64 reference's; on a
    # white-noise map (neighbours differ by ~1) that alone exceeds float32's tolerance. A smoothed map keeps the
    # comparison about the kernel's arithmetic (torchvision has the same float32 coordinates).
    x = torch.nn.functional.avg_pool2d(torch.randn(2, 64, 50, 68), 5, stride=1, padding=2).to(dtype)
    # RoIs in float32 for the half types: rounded to fp16/bf16, some sample lands exactly on the map's edge
    # (y == H, where RoIAlign jumps to 0; about 0.5 per run in fp16, 4 in bf16), and any rounding of that
    # coordinate flips a whole row of bins (seen on an H200: 27 elements off by up to 0.13 in fp16).
    rois = random_rois(2, 300, 50, 68, 0.25, torch.float64 if dtype == torch.float64 else torch.float32)
    for aligned in (False, True):
        fn = lambda t, a=aligned: roi_align(t, rois.cuda(), (7, 7), 0.25, 2, a, pool_mode=pool_mode)
        out, gx, grad = forward_backward(fn, x.cuda())
        ref = roi_align_ref(x[:, :4], rois, 7, 7, 0.25, 2, aligned, pool_mode)
        torch.testing.assert_close(out[:, :4].double().cpu(), ref, **tol(dtype))
        if pool_mode == "avg":
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            tv = torchvision.ops.roi_align(x.cuda().to(acc), rois.cuda().to(acc), (7, 7), 0.25, 2, aligned)
            torch.testing.assert_close(out, tv.to(dtype), **tol(dtype))
            if dtype in (torch.float32, torch.float64):
                _, tv_gx, _ = forward_backward(
                    lambda t, a=aligned: torchvision.ops.roi_align(t, rois.cuda(), (7, 7), 0.25, 2, a), x.cuda(), grad
                )
                torch.testing.assert_close(gx, tv_gx, **tol(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_cuda_deterministic_backward_bitwise(dtype: torch.dtype, pool_mode: str) -> None:
    x = torch.randn(2, 256, 50, 68, device="cuda").to(dtype)
    rois = random_rois(2, 512, 50, 68, 0.25, dtype).cuda()
    fn = lambda t: roi_align(t, rois, 7, 0.25, 2, pool_mode=pool_mode)
    _, gx, grad = forward_backward(fn, x)
    with deterministic():
        runs = [forward_backward(fn, x, grad)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0].float(), gx.float(), **tol(dtype))


def test_autocast_leaves_the_op_in_the_inputs_dtype(backend: str) -> None:
    """Inside ``torch.autocast`` the op pools in its inputs' dtype (its inner products are not recast)."""
    x = torch.randn(2, 3, 11, 13)
    rois = random_rois(2, 5, 11, 13)
    expected = roi_align(x, rois, 3, 1.0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(x, rois, 3, 1.0, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
