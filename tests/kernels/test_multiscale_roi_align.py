"""Multi-level RoIAlign (kernels.roi_align.multiscale_roi_align / MultiScaleRoIAlign): both backends against a
hand-checkable level assignment, the float64 loop reference (tests/reference.py) and torchvision's
MultiScaleRoIAlign.

Every test runs on the Triton kernels (through the interpreter on CPU) and on the vectorized torch path, chosen
by the ``backend`` fixture.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import use_backend
from kernels._roi_align_kernels import backward_triton
from kernels.roi_align import MultiScaleRoIAlign, RoIAlign, multiscale_roi_align, roi_align
from tests.calls import CountedOps
from tests.kernels.roi_align_tiles import small_bin_steps
from tests.reference import (
    boxes_to_rois,
    fpn_level,
    infer_scales,
    multiscale_ref,
    multiscale_ref_backward,
)
from tests.tolerances import tol

# The interpreter emulates float ops with numpy, which warns on log2(0) (the level of a zero-area or masked RoI,
# clamped afterwards) and on the inf/NaN coordinates of the invalid-RoI tests.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAMES = ["p2", "p3", "p4", "p5"]


@pytest.fixture(params=[*BACKENDS, "triton-small-steps"])
def backend(request: pytest.FixtureRequest):
    tiles = small_bin_steps() if request.param == "triton-small-steps" else contextlib.nullcontext()
    with use_backend(request.param.removesuffix("-small-steps")), tiles:
        yield request.param


def pyramid(n: int, c: int, height: int, width: int, levels: int = 4, dtype: torch.dtype = torch.float32):
    """FPN-like features of an image of ``height x width``: level l (from 2) has stride 2**l."""
    return [torch.randn(n, c, height >> lvl, width >> lvl).to(dtype) for lvl in range(2, 2 + levels)]


def random_boxes(k: int, height: int, width: int, min_size: float, max_size: float) -> torch.Tensor:
    """K boxes [K, 4] in image coordinates with sides log-uniform in [min_size, max_size]; some stick out of the
    image a little."""
    log_lo, log_hi = torch.tensor([min_size, max_size], dtype=torch.float64).log()
    wh = (log_lo + torch.rand(k, 2, dtype=torch.float64) * (log_hi - log_lo)).exp()
    xy = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([width, height]) * 1.1 - wh / 2
    return torch.cat([xy, xy + wh], dim=1).float()


def boxes_with_sizes(sizes: list[float], height: int, width: int) -> torch.Tensor:
    """Boxes [len(sizes), 4] with sqrt(area) = size (random aspect ratio in [0.7, 1.4]) at random positions."""
    s = torch.tensor(sizes, dtype=torch.float64)
    aspect = 0.7 + 0.7 * torch.rand(len(sizes), dtype=torch.float64)
    wh = torch.stack([s * aspect.sqrt(), s / aspect.sqrt()], dim=1)
    xy = torch.rand(len(sizes), 2, dtype=torch.float64) * torch.tensor([width, height]) - wh / 4
    return torch.cat([xy, xy + wh], dim=1).float()


def random_rois(n: int, k: int, height: int, width: int, min_size: float, max_size: float) -> torch.Tensor:
    batch = torch.randint(0, n, (k, 1)).float()
    return torch.cat([batch, random_boxes(k, height, width, min_size, max_size)], dim=1)


def grads(fn, tensors: list[torch.Tensor], grad: torch.Tensor | None = None):
    """``fn(leaves)`` and the gradients of <fn(leaves), grad> with respect to fresh leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(leaves)
    if grad is None:
        grad = torch.randn(out.shape, dtype=torch.float64).to(out)  # out's dtype and device
    return out.detach(), list(torch.autograd.grad(out, leaves, grad, allow_unused=True)), grad


def zeros_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


# ---------------------------------------------------------------------------------------------------------------
# Golden: level assignment. Level l's map is the constant l, and each box lies inside a 1024x1024 image, so every
# bilinear sample reads exactly l (weights sum to 1) and the output names the level that pooled the RoI.
# Eq. 1 of FPN with canonical 224 / level 4, k_min 2, k_max 5: level = floor(4 + log2(sqrt(w*h) / 224) + 1e-6):
#   20x20 -> floor(0.51) = 0 -> clamped to 2;    111x111 -> floor(2.987) = 2;    112x112 -> 3;
#   223x224 -> sqrt = 223.5 -> floor(3.997) = 3;  224x224 -> 4;   448x448 -> 5;   1000x500 -> floor(5.66) -> 5;
#   zero area (4x0) -> log2(0) = -inf -> 2;       inverted (x2 < x1) -> negative area -> zeros.
# ---------------------------------------------------------------------------------------------------------------

GOLDEN_BOXES = [
    ([10.0, 10.0, 30.0, 30.0], 2),
    ([100.0, 50.0, 211.0, 161.0], 2),
    ([100.0, 50.0, 212.0, 162.0], 3),
    ([300.0, 300.0, 523.0, 524.0], 3),
    ([300.0, 300.0, 524.0, 524.0], 4),
    ([500.0, 400.0, 948.0, 848.0], 5),
    ([10.0, 10.0, 1010.0, 510.0], 5),
    ([40.0, 40.0, 44.0, 40.0], 2),
    ([80.0, 40.0, 60.0, 90.0], None),
]


def test_golden_levels_reference() -> None:
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    for box, level in GOLDEN_BOXES:
        got = fpn_level(torch.tensor([0.0, *box], dtype=torch.float64).numpy(), scales)
        assert got == (None if level is None else level - 2), box


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_golden_levels(backend: str, pool_mode: str) -> None:
    features = [torch.full((1, 2, 1024 >> lvl, 1024 >> lvl), float(lvl)) for lvl in range(2, 6)]
    rois = torch.tensor([[0.0, *box] for box, _ in GOLDEN_BOXES])
    out = multiscale_roi_align(features, rois, (2, 3), [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2, pool_mode=pool_mode)
    expected = torch.tensor([0.0 if level is None else float(level) for _, level in GOLDEN_BOXES])
    torch.testing.assert_close(out, expected.view(-1, 1, 1, 1).expand(-1, 2, 2, 3), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Against torchvision's MultiScaleRoIAlign and the float64 reference.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, canonical_scale, sampling_ratio",
    [((512, 512), 224, 2), ((61, 93), 16, -1)],
    ids=["coco-like", "odd-image"],
)
def test_module_matches_torchvision(backend: str, image, canonical_scale: int, sampling_ratio: int) -> None:
    """Scales inferred from the image shapes (odd shapes round to powers of 2), an unused feature map, several
    images; forward and the gradient of every level."""
    height, width = image
    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    features = pyramid(2, 3, pad_h, pad_w)
    image_shapes = [(height, width), (height - 3, width - 5)]
    # sqrt(area) / canonical_scale: level 2 below 1/2, 3 below 1, 4 below 2, 5 above.
    boxes = [
        boxes_with_sizes([canonical_scale * f for f in (0.3, 0.7, 1.3, 2.6, 0.45)], height, width),
        boxes_with_sizes([canonical_scale * f for f in (0.8, 1.7, 0.2, 3.1)], height, width),
    ]

    kwargs = dict(canonical_scale=canonical_scale, canonical_level=4)
    ours = MultiScaleRoIAlign(NAMES, (3, 2), sampling_ratio, **kwargs)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, (3, 2), sampling_ratio, **kwargs)
    extra = torch.randn(2, 3, 5, 5)

    def run(module):
        return lambda fs: module({"p2": fs[0], "p3": fs[1], "pool": extra, "p4": fs[2], "p5": fs[3]}, boxes,
                                 image_shapes)

    out, gs, grad = grads(run(ours), features)
    tv_out, tv_gs, _ = grads(run(theirs), features, grad)
    assert out.shape == (9, 3, 3, 2)
    torch.testing.assert_close(out, tv_out, **tol(torch.float32))
    for g, tv_g, f in zip(gs, tv_gs, features, strict=True):
        torch.testing.assert_close(zeros_if_none(g, f), zeros_if_none(tv_g, f), **tol(torch.float32))

    scales = infer_scales([f.shape for f in features], image_shapes)
    assert scales == theirs.scales
    rois = boxes_to_rois(boxes)
    levels = {fpn_level(r, scales, canonical_scale, 4) for r in rois.double().numpy()}
    assert levels == {0, 1, 2, 3}, "the boxes should reach every level"
    for g in gs:
        assert g is not None and g.abs().sum() > 0
    ref = multiscale_ref(features, rois, 3, 2, scales, sampling_ratio, canonical_scale=canonical_scale)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))


def test_module_single_level_matches_torchvision(backend: str) -> None:
    features = torch.randn(2, 4, 12, 10)
    boxes = [random_boxes(3, 48, 40, 4, 30), random_boxes(2, 48, 40, 4, 30)]
    ours = MultiScaleRoIAlign(["feat"], 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["feat"], 2, 2)
    out, (g,), grad = grads(lambda fs: ours({"feat": fs[0]}, boxes, [(48, 40)]), [features])
    tv_out, (tv_g,), _ = grads(lambda fs: theirs({"feat": fs[0]}, boxes, [(48, 40)]), [features], grad)
    torch.testing.assert_close(out, tv_out, **tol(torch.float32))
    torch.testing.assert_close(g, tv_g, **tol(torch.float32))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_module_aligned_vs_reference(backend: str, pool_mode: str) -> None:
    """Our module's extras (aligned, max pooling) against the reference, with the scales it infers."""
    features = pyramid(1, 2, 64, 96, dtype=torch.float64)
    boxes = [boxes_with_sizes([3.0, 7.0, 11.0, 19.0, 40.0], 61, 93).double()]
    module = MultiScaleRoIAlign(NAMES, (2, 3), -1, canonical_scale=16, aligned=True, pool_mode=pool_mode)
    out, gs, grad = grads(lambda fs: module(dict(zip(NAMES, fs, strict=True)), boxes, [(61, 93)]), features)
    scales = infer_scales([f.shape for f in features], [(61, 93)])
    rois = boxes_to_rois(boxes)
    ref = multiscale_ref(features, rois, 2, 3, scales, -1, None, True, pool_mode, 16)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    ref_gs = multiscale_ref_backward(grad, features, rois, 2, 3, scales, -1, None, True, pool_mode, 16)
    for g, ref_g, f in zip(gs, ref_gs, features, strict=True):
        torch.testing.assert_close(zeros_if_none(g, f), ref_g, **tol(torch.float64))


def padded_rois(n: int, k_valid: int, k_pad: int, height: int, width: int, min_size: float, max_size: float):
    """RoIs [k_valid + k_pad, 5] with a valid mask; padded slots (interleaved) hold garbage, NaN included."""
    real = random_rois(n, k_valid, height, width, min_size, max_size)
    garbage = random_rois(n, k_pad, height, width, min_size, max_size)
    garbage[::2, 1] = float("nan")
    rois = torch.cat([real, garbage])
    valid = torch.cat([torch.ones(k_valid, dtype=torch.bool), torch.zeros(k_pad, dtype=torch.bool)])
    perm = torch.randperm(k_valid + k_pad)
    return rois[perm], valid[perm]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_functional_vs_reference_with_padding(backend: str, pool_mode: str, aligned: bool) -> None:
    features = pyramid(2, 3, 64, 96, dtype=torch.float64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 6, 3, 64, 96, 4, 64)
    rois = rois.double()
    args = ((2, 3), scales, -1)
    kwargs = dict(aligned=aligned, pool_mode=pool_mode, canonical_scale=16, canonical_level=4)
    out, gs, grad = grads(lambda fs: multiscale_roi_align(fs, rois, *args, valid=valid, **kwargs), features)
    ref = multiscale_ref(features, rois, 2, 3, scales, -1, valid, aligned, pool_mode, 16, 4)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    assert out[~valid].eq(0).all()
    ref_gs = multiscale_ref_backward(grad, features, rois, 2, 3, scales, -1, valid, aligned, pool_mode, 16, 4)
    for g, ref_g, f in zip(gs, ref_gs, features, strict=True):
        g = zeros_if_none(g, f)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ref_g, **tol(torch.float64))

    # Without the padded slots the gradients are the same: padding neither pools nor receives gradient.
    _, gs_real, _ = grads(lambda fs: multiscale_roi_align(fs, rois[valid], *args, **kwargs), features, grad[valid])
    for g, g_real, f in zip(gs, gs_real, features, strict=True):
        torch.testing.assert_close(zeros_if_none(g, f), zeros_if_none(g_real, f), **tol(torch.float64))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_invalid_rois_give_zeros_and_no_gradient(backend: str, pool_mode: str) -> None:
    features = pyramid(2, 2, 64, 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    nan, inf = float("nan"), float("inf")
    rows = [
        [0, 4.0, 6.0, 40.0, 30.0],  # valid
        [1, 40.0, 6.0, 4.0, 30.0],  # negative area (x2 < x1)
        [1, 4.0, 30.0, 40.0, 6.0],  # negative area (y2 < y1)
        [-1, 4.0, 6.0, 40.0, 30.0],  # batch index -1
        [2, 4.0, 6.0, 40.0, 30.0],  # batch index N
        [nan, 4.0, 6.0, 40.0, 30.0],
        [0, nan, 6.0, 40.0, 30.0],
        [1, 4.0, 6.0, inf, 30.0],
        [0, 4.0, -inf, 40.0, 30.0],
        [1, 10.0, 12.0, 20.0, 28.0],  # valid, but masked by valid=False
        [1, 30.0, 20.0, 50.0, 62.0],  # valid
    ]
    rois = torch.tensor(rows)
    valid = torch.ones(len(rows), dtype=torch.bool)
    valid[-2] = False
    fn = lambda fs: multiscale_roi_align(fs, rois, 3, scales, 2, valid=valid, pool_mode=pool_mode, canonical_scale=16)
    out, gs, grad = grads(fn, features)
    assert out[1:-1].eq(0).all()
    ref = multiscale_ref(features, rois, 3, 3, scales, 2, valid, False, pool_mode, 16)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    ref_gs = multiscale_ref_backward(grad, features, rois, 3, 3, scales, 2, valid, False, pool_mode, 16)
    for g, ref_g, f in zip(gs, ref_gs, features, strict=True):
        g = zeros_if_none(g, f)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), ref_g, **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend: str, dtype: torch.dtype) -> None:
    features = pyramid(2, 3, 64, 64, dtype=dtype)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 6, 2, 64, 64, 4, 64)
    rois = rois.to(dtype)
    for aligned in (False, True):
        fn = lambda fs, a=aligned: multiscale_roi_align(fs, rois, 2, scales, 2, valid=valid, aligned=a,
                                                        canonical_scale=16)
        out, gs, grad = grads(fn, features)
        assert out.dtype == dtype
        ref = multiscale_ref(features, rois, 2, 2, scales, 2, valid, aligned, "avg", 16)
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
        ref_gs = multiscale_ref_backward(grad, features, rois, 2, 2, scales, 2, valid, aligned, "avg", 16)
        for g, ref_g, f in zip(gs, ref_gs, features, strict=True):
            g = zeros_if_none(g, f)
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), ref_g, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_matches_nchw(backend: str, dtype: torch.dtype) -> None:
    """Channels-last features give the NCHW values and gradients within the dtype's tolerance; every level's
    gradient keeps the features' memory format."""
    features = pyramid(2, 3, 64, 64, dtype=dtype)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 6, 2, 64, 64, 4, 64)
    fn = lambda fs: multiscale_roi_align(fs, rois.to(dtype), 2, scales, 2, valid=valid, canonical_scale=16)
    out, gs, grad = grads(fn, features)
    out_cl, gs_cl, _ = grads(fn, [f.contiguous(memory_format=torch.channels_last) for f in features], grad)
    torch.testing.assert_close(out_cl, out, **tol(dtype))
    for g, g_cl in zip(gs, gs_cl, strict=True):
        assert g.is_contiguous()
        assert g_cl.is_contiguous(memory_format=torch.channels_last) and not g_cl.is_contiguous()
        torch.testing.assert_close(g_cl, g, **tol(dtype))


def test_five_levels(backend: str) -> None:
    """P2-P6: the deepest level has stride 64."""
    features = pyramid(1, 2, 128, 128, levels=5, dtype=torch.float64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
    rois = random_rois(1, 8, 128, 128, 3, 120).double()
    out, gs, grad = grads(lambda fs: multiscale_roi_align(fs, rois, 2, scales, 2, canonical_scale=8), features)
    torch.testing.assert_close(out, multiscale_ref(features, rois, 2, 2, scales, 2, canonical_scale=8))
    ref_gs = multiscale_ref_backward(grad, features, rois, 2, 2, scales, 2, canonical_scale=8)
    for g, ref_g, f in zip(gs, ref_gs, features, strict=True):
        torch.testing.assert_close(zeros_if_none(g, f), ref_g, **tol(torch.float64))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_no_rois_and_one_roi(backend: str, pool_mode: str) -> None:
    features = pyramid(1, 3, 32, 32, levels=2)
    scales = [1 / 4, 1 / 8]
    out, gs, _ = grads(lambda fs: multiscale_roi_align(fs, torch.zeros(0, 5), (2, 3), scales, pool_mode=pool_mode),
                       features)
    assert out.shape == (0, 3, 2, 3)
    assert all(g is None or g.eq(0).all() for g in gs)
    one = torch.tensor([[0, 3.0, 5.0, 25.0, 19.0]])
    valid = torch.ones(1, dtype=torch.bool)
    out = multiscale_roi_align(features, one, (2, 3), scales, pool_mode=pool_mode, valid=valid)
    ref = multiscale_ref(features, one, 2, 3, scales, 2, pool_mode=pool_mode)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))


def test_matches_single_level_op_on_the_assigned_level(backend: str) -> None:
    """Each RoI pools exactly as the single-level op does on its level with that level's scale."""
    features = pyramid(2, 3, 64, 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois = random_rois(2, 8, 64, 64, 4, 64)
    out = multiscale_roi_align(features, rois, 2, scales, -1, aligned=True, canonical_scale=16)
    for r in range(rois.shape[0]):
        level = fpn_level(rois[r].double().numpy(), scales, 16, 4)
        single = roi_align(features[level], rois[r : r + 1], 2, scales[level], -1, True)
        torch.testing.assert_close(out[r : r + 1], single, **tol(torch.float32))


def test_layouts_match_contiguous(backend: str) -> None:
    features = pyramid(2, 4, 64, 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 5, 2, 64, 64, 4, 64)
    fn = lambda r, v: (lambda fs: multiscale_roi_align(fs, r, 2, scales, 2, valid=v, canonical_scale=16))
    out, gs, grad = grads(fn(rois, valid), features)
    variants = [
        [f.contiguous(memory_format=torch.channels_last) for f in features],
        [f.transpose(2, 3).contiguous().transpose(2, 3) for f in features],
        [torch.cat([f, torch.randn_like(f)], dim=1)[:, :4] for f in features],
        # a different layout per level
        [f.contiguous(memory_format=torch.channels_last) if i % 2 else f.transpose(2, 3).contiguous().transpose(2, 3)
         for i, f in enumerate(features)],
    ]
    for fs in variants:
        out_v, gs_v, _ = grads(fn(rois, valid), fs, grad)
        assert torch.equal(out_v, out)
        for g_v, g, f in zip(gs_v, gs, features, strict=True):
            torch.testing.assert_close(zeros_if_none(g_v, f), zeros_if_none(g, f), **tol(torch.float32))


def test_strided_rois_and_valid(backend: str) -> None:
    """Non-contiguous rois and valid mask (views into wider tensors) give exactly the contiguous result."""
    features = pyramid(2, 2, 64, 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 5, 2, 64, 64, 4, 64)
    fn = lambda r, v: (lambda fs: multiscale_roi_align(fs, r, 2, scales, 2, valid=v, canonical_scale=16))
    out, gs, grad = grads(fn(rois, valid), features)
    wide_rois = torch.cat([rois, torch.randn(7, 3)], dim=1)[:, :5]
    wide_valid = torch.stack([valid, ~valid], dim=1)[:, 0]  # stride 2: the neighbour of each flag is its negation
    assert not wide_rois.is_contiguous() and not wide_valid.is_contiguous()
    for r, v in [(wide_rois, valid), (rois, wide_valid)]:
        out_v, gs_v, _ = grads(fn(r, v), features, grad)
        assert torch.equal(out_v, out)
        for g_v, g, f in zip(gs_v, gs, features, strict=True):
            torch.testing.assert_close(zeros_if_none(g_v, f), zeros_if_none(g, f), **tol(torch.float32))


def test_bad_arguments_name_the_argument() -> None:
    features = pyramid(1, 2, 32, 32, levels=2)
    scales = [1 / 4, 1 / 8]
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0]])
    valid = torch.ones(1, dtype=torch.bool)
    cases = [
        ("features", lambda: multiscale_roi_align([], rois, 2, [])),
        ("features", lambda: multiscale_roi_align([features[0], features[1][:, :1]], rois, 2, scales)),
        ("features", lambda: multiscale_roi_align([features[0], features[1].double()], rois, 2, scales)),
        ("features", lambda: multiscale_roi_align([features[0], features[1][0]], rois, 2, scales)),
        ("scales", lambda: multiscale_roi_align(features, rois, 2, scales[:1])),
        ("rois", lambda: multiscale_roi_align(features, rois[:, 1:], 2, scales)),
        ("features", lambda: multiscale_roi_align(features * 3, rois, 2, [2.0**-i for i in range(6)])),
        ("valid", lambda: multiscale_roi_align(features, rois, 2, scales, valid=torch.ones(2, dtype=torch.bool))),
        ("valid", lambda: multiscale_roi_align(features, rois, 2, scales, valid=valid.float())),
        ("pool_mode", lambda: multiscale_roi_align(features, rois, 2, scales, pool_mode="sum")),
        ("output_size", lambda: multiscale_roi_align(features, rois, (0, 2), scales)),
        ("pool_mode", lambda: MultiScaleRoIAlign(["a"], 2, 2, pool_mode="sum")({"a": features[0]}, [rois[:, 1:]],
                                                                              [(128, 128)])),
    ]
    for i, (name, call) in enumerate(cases):
        with pytest.raises((TypeError, ValueError), match=name):
            call()
            pytest.fail(f"case {i} did not raise")


def test_rois_of_another_float_dtype_are_accepted(backend: str) -> None:
    """RoIs may have any float dtype (read in float32 for float32 features); integer RoIs are an error."""
    features = pyramid(1, 2, 32, 32, levels=2)
    rois64 = torch.tensor([[0, 1.3, 1.1, 20.7, 20.2]], dtype=torch.float64)
    out = multiscale_roi_align(features, rois64, 2, [0.25, 0.125])
    torch.testing.assert_close(out, multiscale_roi_align(features, rois64.float(), 2, [0.25, 0.125]), rtol=0, atol=0)
    with pytest.raises(TypeError, match="rois"):
        multiscale_roi_align(features, torch.tensor([[0, 1, 1, 20, 20]]), 2, [0.25, 0.125])


# ---------------------------------------------------------------------------------------------------------------
# Autograd, determinism, torch.library and torch.compile.
# ---------------------------------------------------------------------------------------------------------------


GRADCHECK_ROIS = torch.tensor([[0, 1.3, 0.8, 9.1, 10.3], [0, 2.2, -1.4, 40.0, 30.6]], dtype=torch.float64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_gradcheck(backend: str, pool_mode: str, aligned: bool) -> None:
    f0 = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    f1 = torch.rand(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    # canonical 16 / level 1 with scales 1/2, 1/4 (levels 1, 2): sqrt(area) < 32 -> level 1, else level 2.
    rois = GRADCHECK_ROIS
    valid = torch.tensor([True, True])
    fn = lambda a, b: multiscale_roi_align([a, b], rois, 2, [0.5, 0.25], 2, valid=valid, aligned=aligned,
                                           pool_mode=pool_mode, canonical_scale=16, canonical_level=1)
    assert [fpn_level(r, [0.5, 0.25], 16, 1) for r in rois.numpy()] == [0, 1]
    # fast_mode: the full Jacobian costs ~80 s per case in the interpreter; exact gradients are compared with the
    # loop reference in the other tests.
    assert torch.autograd.gradcheck(fn, (f0, f1), fast_mode=True)


def test_gradcheck_channels_last(backend: str) -> None:
    f0, f1 = (torch.rand(1, 3, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
              for h, w in ((6, 7), (4, 5)))  # fmt: skip
    fn = lambda a, b: multiscale_roi_align([a, b], GRADCHECK_ROIS, 2, [0.5, 0.25], 2, canonical_scale=16,
                                           canonical_level=1)  # fmt: skip
    assert torch.autograd.gradcheck(fn, (f0, f1), fast_mode=True)


@contextlib.contextmanager
def deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_deterministic_backward(backend: str, pool_mode: str) -> None:
    features = pyramid(2, 4, 64, 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 8, 2, 64, 64, 4, 64)
    fn = lambda fs: multiscale_roi_align(fs, rois, 3, scales, 2, valid=valid, pool_mode=pool_mode, canonical_scale=16)
    _, gs, grad = grads(fn, features)
    with deterministic():
        _, gs1, _ = grads(fn, features, grad)
        _, gs2, _ = grads(fn, features, grad)
    for g, g1, g2, f in zip(gs, gs1, gs2, features, strict=True):
        assert torch.equal(zeros_if_none(g1, f), zeros_if_none(g2, f))
        torch.testing.assert_close(zeros_if_none(g1, f), zeros_if_none(g, f), **tol(torch.float32))


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_opcheck(backend: str, pool_mode: str, with_valid: bool) -> None:
    features = [
        torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True),
    ]
    valid = torch.tensor([True, False]) if with_valid else None
    args = (features, GRADCHECK_ROIS, valid, [0.5, 0.25], 2, 2, 2, False, pool_mode, 16.0, 1.0)
    torch.library.opcheck(torch.ops.mrcnn.multiscale_roi_align.default, args)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_opcheck_backward_op(backend: str, pool_mode: str) -> None:
    """The registered backward op (reached through autograd) on its own: schema, fake tensor, dispatch."""
    features = [torch.randn(1, 2, 6, 5, dtype=torch.float64), torch.randn(1, 2, 4, 5, dtype=torch.float64)]
    valid = torch.tensor([True, True])
    fwd_args = (GRADCHECK_ROIS, valid, [0.5, 0.25], 2, 2, 2, False, pool_mode, 16.0, 1.0)
    _, argmax = torch.ops.mrcnn.multiscale_roi_align(features, *fwd_args)
    grad = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    args = (grad, GRADCHECK_ROIS, valid, argmax, *fwd_args[2:], 1, [6, 5, 4, 5], False)
    torch.library.opcheck(torch.ops.mrcnn.multiscale_roi_align_backward.default, args)


def test_compile_fullgraph() -> None:
    """roi_align, RoIAlign, MultiScaleRoIAlign and multiscale_roi_align in one function: no graph break, the same
    forward and backward as eager."""
    image_shapes = [(61, 93), (58, 90)]
    single = RoIAlign((2, 3), 0.25, 2, True)

    def make_fn(pooler: MultiScaleRoIAlign):
        def fn(features: list[torch.Tensor], rois: torch.Tensor, valid: torch.Tensor, boxes: list[torch.Tensor]):
            named = dict(zip(NAMES, features, strict=True))
            return (
                roi_align(features[0], rois, 2, 0.25, -1, pool_mode="max"),
                single(features[0], rois),
                pooler(named, boxes, image_shapes),
                multiscale_roi_align(features, rois, 2, [1 / 4, 1 / 8, 1 / 16, 1 / 32], valid=valid,
                                     canonical_scale=16),
            )

        return fn

    features = pyramid(2, 3, 64, 96)
    rois, valid = padded_rois(2, 3, 1, 64, 96, 4, 64)
    boxes = [random_boxes(2, 61, 93, 4, 64), random_boxes(1, 58, 90, 4, 64)]
    pooler_kwargs = dict(canonical_scale=16)
    explanation = torch._dynamo.explain(make_fn(MultiScaleRoIAlign(NAMES, 2, 2, **pooler_kwargs)))(
        features, rois, valid, boxes
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    eager_fn = make_fn(MultiScaleRoIAlign(NAMES, 2, 2, **pooler_kwargs))
    compiled = torch.compile(make_fn(MultiScaleRoIAlign(NAMES, 2, 2, **pooler_kwargs)), fullgraph=True,
                             backend="aot_eager")
    fe = [f.clone().requires_grad_(True) for f in features]
    fc = [f.clone().requires_grad_(True) for f in features]
    eager, got = eager_fn(fe, rois, valid, boxes), compiled(fc, rois, valid, boxes)
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(b, a)
    sum(o.sum() for o in eager).backward()
    sum(o.sum() for o in got).backward()
    for a, b in zip(fe, fc, strict=True):
        torch.testing.assert_close(zeros_if_none(b.grad, b), zeros_if_none(a.grad, a))


# ---------------------------------------------------------------------------------------------------------------
# Random pyramids and RoIs against the reference.
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def multiscale_cases(draw: st.DrawFn):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    levels = draw(st.integers(1, 4))
    height = draw(st.integers(4, 40))
    width = draw(st.integers(4, 40))
    k = draw(st.integers(0, 5))
    canonical_scale = draw(st.sampled_from([8.0, 16.0, 224.0]))
    features = [
        torch.randn(n, c, max(height >> lvl, 1), max(width >> lvl, 1), dtype=torch.float64) for lvl in range(levels)
    ]
    # 0.1-grid coordinates with distinct small offsets: no sample exactly on a map edge, no box size an exact
    # multiple of the output size, no area exactly on a level boundary.
    rows = []
    for _ in range(k):
        b = draw(st.integers(0, n - 1))
        x1, x2 = (draw(st.integers(-30, 10 * width + 30)) / 10 for _ in range(2))
        y1, y2 = (draw(st.integers(-30, 10 * height + 30)) / 10 for _ in range(2))
        rows.append([b, x1 + 0.0123, y1 + 0.0311, x2 + 0.0571, y2 + 0.0747])
    return dict(
        features=features,
        rois=torch.tensor(rows, dtype=torch.float64).reshape(k, 5),
        valid=torch.tensor(draw(st.lists(st.booleans(), min_size=k, max_size=k)), dtype=torch.bool),
        scales=[2.0**-lvl for lvl in range(levels)],
        ph=draw(st.integers(1, 3)),
        pw=draw(st.integers(1, 3)),
        sr=draw(st.sampled_from([-1, 1, 2])),
        aligned=draw(st.booleans()),
        pool_mode=draw(st.sampled_from(["avg", "max"])),
        canonical_scale=canonical_scale,
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=multiscale_cases())
def test_property_matches_reference(backend_name: str, case: dict) -> None:
    c = case
    ref_args = (c["ph"], c["pw"], c["scales"], c["sr"], c["valid"], c["aligned"], c["pool_mode"], c["canonical_scale"])
    with use_backend(backend_name):
        fn = lambda fs: multiscale_roi_align(fs, c["rois"], (c["ph"], c["pw"]), c["scales"], c["sr"], valid=c["valid"],
                                             aligned=c["aligned"], pool_mode=c["pool_mode"],
                                             canonical_scale=c["canonical_scale"])
        out, gs, grad = grads(fn, c["features"])
    torch.testing.assert_close(out, multiscale_ref(c["features"], c["rois"], *ref_args), **tol(torch.float64))
    ref_gs = multiscale_ref_backward(grad, c["features"], c["rois"], *ref_args)
    for g, ref_g, f in zip(gs, ref_gs, c["features"], strict=True):
        torch.testing.assert_close(zeros_if_none(g, f), ref_g, **tol(torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU): COCO-like shapes.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_module_matches_torchvision(dtype: torch.dtype) -> None:
    features = [f.cuda() for f in pyramid(2, 256, 800, 1344, dtype=dtype)]
    boxes = [random_boxes(512, 800, 1344, 8, 600).cuda().to(dtype) for _ in range(2)]
    image_shapes = [(800, 1344), (768, 1300)]
    ours = MultiScaleRoIAlign(NAMES, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)
    run = lambda m: (lambda fs: m(dict(zip(NAMES, fs, strict=True)), boxes, image_shapes))
    out, gs, grad = grads(run(ours), features)
    # torchvision accumulates half types in half: compare with it in float32 on the upcast inputs.
    up = [f.float() for f in features]
    tv_out, tv_gs, _ = grads(lambda fs: theirs(dict(zip(NAMES, fs, strict=True)), [b.float() for b in boxes],
                                               image_shapes), up, grad.float())
    torch.testing.assert_close(out, tv_out.to(dtype), **tol(dtype))
    # Feature coordinates up to 336 px carry float32 errors of ~3e-5 px, which move bilinear weights by as much,
    # and a gradient sums many of them (measured on an H200: 1.1e-4 against torchvision's float32 gradient). So
    # the gradients may differ by twice torchvision's own float32 error on this input, against float64.
    _, exact_gs, _ = grads(lambda fs: theirs(dict(zip(NAMES, fs, strict=True)), [b.double() for b in boxes],
                                             image_shapes), [f.double() for f in features], grad.double())  # fmt: skip
    rtol, atol = tol(dtype).values()
    for g, tv_g, exact in zip(gs, tv_gs, exact_gs, strict=True):
        tv_error = (tv_g.double() - exact).abs().max().item()
        torch.testing.assert_close(g, tv_g.to(dtype), rtol=rtol, atol=atol + 2 * tv_error)


@pytest.mark.cuda
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_cuda_deterministic_backward_bitwise(pool_mode: str) -> None:
    features = [f.cuda() for f in pyramid(2, 256, 800, 1344)]
    rois = random_rois(2, 1024, 800, 1344, 8, 600).cuda()
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    fn = lambda fs: multiscale_roi_align(fs, rois, 7, scales, 2, pool_mode=pool_mode)
    _, gs, grad = grads(fn, features)
    with deterministic():
        runs = [grads(fn, features, grad)[1] for _ in range(3)]
    for level in range(4):
        assert all(torch.equal(runs[0][level], r[level]) for r in runs[1:])
        torch.testing.assert_close(runs[0][level], gs[level], **tol(torch.float32))


# The ops that zero-fill a tensor (each one launch on a GPU).
FILLS = ("zeros", "zero_", "fill_", "new_zeros", "zeros_like")


@pytest.mark.parametrize(
    ("dtype", "channels_last", "deterministic_", "fills"),
    [(torch.bfloat16, True, False, 1), (torch.float32, False, False, 1), (torch.float32, True, False, 4),
     (torch.float32, False, True, 0)],
)  # fmt: skip
def test_backward_zero_fills_once_for_all_levels(dtype: torch.dtype, channels_last: bool, deterministic_: bool,
                                                 fills: int) -> None:  # fmt: skip
    """The atomic backward zero-fills one buffer for every level when it copies the levels out of it (half
    dtypes, NCHW features), else a buffer per level (they are the gradients); the deterministic one none. The
    gradients never share storage (an op's outputs may not alias)."""
    shapes, scales = [(16, 16), (8, 8), (4, 4), (2, 2)], [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois, valid = padded_rois(2, 6, 2, 64, 64, 4, 64)
    grad = torch.randn(rois.shape[0], 3, 2, 2).to(dtype)
    no_argmax = torch.empty(0, dtype=torch.int32)
    with CountedOps(lambda op: op._schema.name.split("::")[-1] in FILLS) as calls:
        gs = backward_triton(grad, rois, valid, no_argmax, shapes, 2, channels_last, scales, (2, 2), 2, False, False,
                             (16.0, 4.0), deterministic_)  # fmt: skip
    assert calls.count == fills
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert all(g.dtype == dtype and g.is_contiguous(memory_format=fmt) for g in gs)
    assert len({g.untyped_storage().data_ptr() for g in gs}) == len(shapes)
    features = [torch.zeros(2, 3, h, w) for h, w in shapes]
    expected = multiscale_ref_backward(grad.double(), features, rois, 2, 2, scales, 2, valid=valid, canonical_scale=16)
    for g, e in zip(gs, expected, strict=True):
        torch.testing.assert_close(g.double(), e, **tol(dtype))
