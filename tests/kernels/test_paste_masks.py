"""paste_masks_in_image (kernels.paste_masks) on both backends against torchvision, a float64 loop reference
written here, and hand-computed cases; its gradient (in the masks) against gradcheck and torchvision.

The ``backend`` fixture runs each test on the Triton kernel (through the interpreter on CPU) and on the
vectorized torch path. Images are 40 x 56 (one 64 x 64 tile per mask, so a grid of D programs) and D <= 8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image

from kernels import use_backend
from kernels.paste_masks import paste_masks_in_image
from tests.tolerances import tol

BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMAGE = (40, 56)  # (H, W): rectangular on purpose

# (x1, y1, x2, y2) in a 40 x 56 image, each a case torchvision handles.
CASE_BOXES = [
    [3.2, 4.1, 30.7, 25.3],  # inside, fractional
    [-5.5, -3.2, 20.1, 10.9],  # partly outside, top left
    [40.3, 30.6, 70.2, 50.8],  # partly outside, bottom right
    [10.1, 10.2, 10.4, 10.6],  # smaller than a pixel
    [-50.0, -40.0, 120.0, 90.0],  # much larger than the image
    [0.0, 0.0, 55.0, 39.0],  # the whole image
    [20.0, 5.0, 21.0, 38.5],  # thin
]
# Boxes torchvision cannot paste (its slicing raises or wraps around); we define them to paste zeros.
ZERO_BOXES = [
    [-30.0, 5.0, -10.0, 20.0],  # left of the image
    [60.0, 5.0, 100.0, 20.0],  # right of the image
    [10.0, 50.0, 20.0, 70.0],  # below the image
    [30.0, 20.0, 10.0, 25.0],  # x2 < x1
    [float("nan"), 1.0, 10.0, 10.0],
    [1.0, 1.0, float("inf"), 10.0],
    [-float("inf"), -float("inf"), float("inf"), float("inf")],
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    with use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------------
# Float64 loop reference.
# ---------------------------------------------------------------------------------------------------------------

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def expand_box_ref(box: list[float], scale: float, dtype: torch.dtype) -> tuple[int, int, int, int] | None:
    """torchvision's expand_boxes for one box with numpy scalars of the boxes' dtype (each op rounded to it,
    the Python scale rounded to float32 unless the boxes are float64), truncated toward zero; None if a
    coordinate is not finite."""
    t = _NUMPY_DTYPES[dtype]
    s = np.float64(scale) if dtype == torch.float64 else np.float32(scale)
    x1, y1, x2, y2 = (t(v) for v in box)
    with np.errstate(all="ignore"):
        w_half = t(t(t(x2 - x1) * t(0.5)) * s)
        h_half = t(t(t(y2 - y1) * t(0.5)) * s)
        x_c = t(t(x2 + x1) * t(0.5))
        y_c = t(t(y2 + y1) * t(0.5))
        coords = [t(x_c - w_half), t(y_c - h_half), t(x_c + w_half), t(y_c + h_half)]
    if not all(math.isfinite(float(c)) for c in coords):
        return None
    x1i, y1i, x2i, y2i = (int(float(c)) for c in coords)
    return x1i, y1i, x2i, y2i


def source_ref(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
    """upsample_bilinear2d (align_corners=False) along one axis: the two source indices and the weight of the
    second."""
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(math.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    return i0, i1, src - i0


def paste_ref(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    img_shape: tuple[int, int],
    padding: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel by pixel in float64: pad, expand the box, resize bilinearly, paste inside the image."""
    num, _, mask_h, mask_w = masks.shape
    height, width = img_shape
    scale = float(mask_w + 2 * padding) / mask_w
    values = masks.to(torch.float64).tolist()
    out = torch.zeros(num, 1, height, width, dtype=torch.float64)
    for d in range(num):
        if valid is not None and not bool(valid[d]):
            continue
        box = expand_box_ref(boxes[d].tolist(), scale, boxes.dtype)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        box_h, box_w = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)

        def padded(i: int, j: int, d: int = d) -> float:
            i, j = i - padding, j - padding
            return values[d][0][i][j] if 0 <= i < mask_h and 0 <= j < mask_w else 0.0

        for r in range(max(y1, 0), min(y2 + 1, height)):
            i0, i1, ly = source_ref(r - y1, mask_h + 2 * padding, box_h)
            for c in range(max(x1, 0), min(x2 + 1, width)):
                j0, j1, lx = source_ref(c - x1, mask_w + 2 * padding, box_w)
                top = (1 - lx) * padded(i0, j0) + lx * padded(i0, j1)
                bottom = (1 - lx) * padded(i1, j0) + lx * padded(i1, j1)
                out[d, 0, r, c] = (1 - ly) * top + ly * bottom
    return out


def torchvision_safe(boxes: torch.Tensor, mask_w: int, padding: int, img_shape: tuple[int, int]) -> torch.Tensor:
    """Which boxes torchvision pastes correctly: an expanded window that meets the image on both axes."""
    height, width = img_shape
    keep = []
    for box in boxes.tolist():
        e = expand_box_ref(box, float(mask_w + 2 * padding) / mask_w, boxes.dtype)
        keep.append(e is not None and e[0] < width and e[2] >= 0 and e[1] < height and e[3] >= 0)
    return torch.tensor(keep, dtype=torch.bool)


def random_boxes(num: int, img_shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boxes [num, 4] with centres around and sizes from under a pixel to twice the image."""
    height, width = img_shape
    size = torch.tensor([width, height], dtype=torch.float64)
    centre = (torch.rand(num, 2, dtype=torch.float64) * 1.2 - 0.1) * size
    log_wh = torch.empty(num, 2, dtype=torch.float64).uniform_(math.log(0.3), math.log(2.0 * max(img_shape)))
    wh = log_wh.exp()
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=1).to(dtype)


def case_masks(num: int, mask_size: int = 28, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(num, 1, mask_size, mask_size, dtype=torch.float64).to(dtype)


def check_against_torchvision(
    masks: torch.Tensor, boxes: torch.Tensor, img_shape: tuple[int, int], padding: int = 1
) -> None:
    out = paste_masks_in_image(masks, boxes, img_shape, padding)
    expected = tv_paste_masks_in_image(masks, boxes, img_shape, padding)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **tol(masks.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases.
# ---------------------------------------------------------------------------------------------------------------


def test_golden_no_padding(backend: str) -> None:
    # Mask m[i][j] = 2i + j on 2x2, padding 0, box (1, 1, 4, 4): scale 1 keeps the box; a 4 x 4 resize
    # with scale 2/4 samples src = 0.5 (dst + 0.5) - 0.5 = {-0.25 -> 0, 0.25, 0.75, 1.25 -> index 1, weight
    # 0.25 on a clamped neighbour}. Bilinear interpolation of a linear function is exact, so pixel (r, c) of the
    # window is 2 s[r] + s[c] with s = (0, 0.25, 0.75, 1).
    masks = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    boxes = torch.tensor([[1.0, 1.0, 4.0, 4.0]])
    s = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = torch.zeros(1, 1, 5, 6)
    expected[0, 0, 1:5, 1:5] = 2 * s[:, None] + s[None, :]
    out = paste_masks_in_image(masks, boxes, (5, 6), padding=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(tv_paste_masks_in_image(masks, boxes, (5, 6), 0), expected, rtol=0, atol=0)


def test_golden_padding_truncates_toward_zero(backend: str) -> None:
    # Same mask with padding 1: the padded mask P is 4 x 4 ([0 0 0 0], [0 0 1 0], [0 2 3 0], [0 0 0 0]) and the
    # box (1, 1, 4, 4) grows by 4/2 = 2 about its centre 2.5: (-0.5, -0.5, 5.5, 5.5), truncated toward zero to
    # (0, 0, 5, 5) (floor would give -1). A 6 x 6 resize of 4 samples src = (2/3)(dst + 0.5) - 0.5 =
    # {0 (clamped), 1/2, 7/6, 11/6, 5/2, 19/6 (last row, its neighbour clamped)}; the rows of Wy hold the weights
    # of P's rows, and the window is Wy P Wy^T.
    wy = torch.tensor(
        [
            [1, 0, 0, 0],
            [1 / 2, 1 / 2, 0, 0],
            [0, 5 / 6, 1 / 6, 0],
            [0, 1 / 6, 5 / 6, 0],
            [0, 0, 1 / 2, 1 / 2],
            [0, 0, 0, 1],
        ],
        dtype=torch.float64,
    )
    padded = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 2, 3, 0], [0, 0, 0, 0]], dtype=torch.float64)
    expected = torch.zeros(1, 1, 7, 8, dtype=torch.float64)
    expected[0, 0, 0:6, 0:6] = wy @ padded @ wy.T
    masks = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    boxes = torch.tensor([[1.0, 1.0, 4.0, 4.0]])
    out = paste_masks_in_image(masks, boxes, (7, 8), padding=1)
    torch.testing.assert_close(out, expected.float(), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Against torchvision.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_matches_torchvision(backend: str, padding: int) -> None:
    boxes = torch.cat([torch.tensor(CASE_BOXES), random_boxes(8, IMAGE)])
    boxes = boxes[torchvision_safe(boxes, 28, padding, IMAGE)][:8]
    check_against_torchvision(case_masks(len(boxes)), boxes, IMAGE, padding)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torchvision_dtypes(backend: str, dtype: torch.dtype) -> None:
    boxes = torch.tensor(CASE_BOXES)
    check_against_torchvision(case_masks(len(boxes), dtype=dtype), boxes, IMAGE)


@pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_box_dtypes(backend: str, box_dtype: torch.dtype) -> None:
    # expand_boxes runs in the boxes' dtype, every op rounded to it; the integer window must match exactly.
    boxes = torch.tensor(CASE_BOXES).to(box_dtype)
    check_against_torchvision(case_masks(len(boxes)), boxes, IMAGE)


def test_box_rounding_follows_float32_ops(backend: str) -> None:
    # Float32 edges (found by a random search) whose expanded x1 = c - w_half truncates to a different integer
    # when expand_boxes runs in float64 instead of float32 op by op (e.g. 13.0 vs 12.9999986 for the first):
    # only the latter matches torchvision. Used on x and on y.
    edges = [
        (13.420724868774414, 25.201061248779297),
        (2.211111068725586, 8.122221946716309),
        (-1.3050894737243652, 18.152389526367188),
        (28.010812759399414, 28.313594818115234),
        (20.48373031616211, 34.02821350097656),
    ]
    boxes = torch.tensor([[lo, 5.0, hi, 30.0] for lo, hi in edges] + [[5.0, lo, 30.0, hi] for lo, hi in edges[:3]])
    scale = 30 / 28
    for box in boxes.tolist():
        assert expand_box_ref(box, scale, torch.float32) != expand_box_ref(box, scale, torch.float64)
    check_against_torchvision(case_masks(len(boxes)), boxes, IMAGE)


def test_single_mask(backend: str) -> None:
    check_against_torchvision(case_masks(1), torch.tensor([CASE_BOXES[0]]), IMAGE)


def test_non_contiguous(backend: str) -> None:
    base = case_masks(6, 28)
    strided = torch.rand(6, 3, 28, 28)[:, 1:2]  # channel slice
    transposed = base.transpose(2, 3)  # spatial strides swapped
    boxes = torch.tensor(CASE_BOXES[:6]).t().contiguous().t()  # column-major [D, 4]
    assert not strided.is_contiguous() and not transposed.is_contiguous() and not boxes.is_contiguous()
    check_against_torchvision(strided, boxes, IMAGE)
    check_against_torchvision(transposed, torch.tensor(CASE_BOXES[:6]), IMAGE)
    every_other = torch.tensor(CASE_BOXES[:6]).repeat_interleave(2, dim=1)[:, ::2]
    check_against_torchvision(base, every_other, IMAGE)


def test_rectangular_masks(backend: str) -> None:
    # torchvision scales the box by the mask's width on both axes; so do we.
    masks = torch.rand(4, 1, 20, 28)
    check_against_torchvision(masks, torch.tensor(CASE_BOXES[:4]), IMAGE, padding=2)


def test_many_tiles(backend: str) -> None:
    # A 70 x 300 image is 3 x 3 tiles of 32 x 128 per mask: windows that cover some tiles and miss others.
    img_shape = (70, 300)
    boxes = torch.tensor([[5.5, 3.2, 40.1, 20.7], [100.2, 30.1, 290.8, 65.3], [-20.0, -10.0, 320.0, 80.0]])
    check_against_torchvision(case_masks(3), boxes, img_shape)
    out = paste_masks_in_image(case_masks(3), boxes, img_shape, valid=torch.tensor([False, True, False]))
    assert (out[[0, 2]] == 0).all() and (out[1] != 0).any()


def test_nan_in_mask(backend: str) -> None:
    masks = case_masks(3)
    masks[1, 0, 10, 12] = float("nan")
    boxes = torch.tensor(CASE_BOXES[:3])
    out = paste_masks_in_image(masks, boxes, IMAGE)
    expected = tv_paste_masks_in_image(masks, boxes, IMAGE)
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], **tol(torch.float32))
    if backend == "triton":  # NaN where one of the four neighbours is NaN, as torchvision
        torch.testing.assert_close(out[1], expected[1], equal_nan=True, **tol(torch.float32))
    else:  # documented: the torch path's matmuls spread it (0 * NaN) over the window's rows and columns
        assert out[1].isnan().sum() >= expected[1].isnan().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Against the float64 loop reference.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend: str, dtype: torch.dtype) -> None:
    boxes = torch.tensor(CASE_BOXES[:4] + ZERO_BOXES[:4])
    masks = case_masks(len(boxes), dtype=dtype)
    out = paste_masks_in_image(masks, boxes, IMAGE)
    torch.testing.assert_close(out.double(), paste_ref(masks, boxes, IMAGE), **tol(dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN / inf boxes in numpy
def test_boxes_torchvision_cannot_paste_give_zeros(backend: str) -> None:
    boxes = torch.tensor(ZERO_BOXES)
    out = paste_masks_in_image(case_masks(len(boxes)), boxes, IMAGE)
    assert out.shape == (len(boxes), 1, *IMAGE)
    assert (out == 0).all()


def test_huge_finite_boxes_are_safe(backend: str) -> None:
    # Far beyond anything torchvision could allocate: coordinates are clamped to +-2**61 before the integer
    # conversion, and the image then sees the middle of the resized mask (src = 14.5 of 30 padded pixels).
    # Box 1 spans rows 4..20 after expansion: src = (30/17)(r - 4 + 0.5) - 0.5 lies in the ones for rows 5..19.
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[-1e30, -1e30, 1e30, 1e30], [-1e20, 5.0, 1e20, 20.0]])
    out = paste_masks_in_image(masks, boxes, IMAGE)
    assert (out[0] == 1).all()
    assert (out[1, 0, 5:20] == 1).all() and (out[1, 0, :4] == 0).all() and (out[1, 0, 21:] == 0).all()
    assert ((out[1, 0, [4, 20]] > 0) & (out[1, 0, [4, 20]] < 1)).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num=st.integers(1, 5),
    mask_size=st.integers(1, 9),
    padding=st.integers(0, 3),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_reference(
    backend: str, num: int, mask_size: int, padding: int, height: int, width: int, seed: int
) -> None:
    torch.manual_seed(seed)
    masks = torch.randn(num, 1, mask_size, mask_size)
    boxes = random_boxes(num, (height, width))
    out = paste_masks_in_image(masks, boxes, (height, width), padding)
    torch.testing.assert_close(out.double(), paste_ref(masks, boxes, (height, width), padding), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Threshold, valid, empty.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold(backend: str, dtype: torch.dtype) -> None:
    masks = case_masks(len(CASE_BOXES), dtype=dtype)
    boxes = torch.tensor(CASE_BOXES)
    soft = paste_masks_in_image(masks, boxes, IMAGE)
    hard = paste_masks_in_image(masks, boxes, IMAGE, threshold=0.5)
    assert hard.dtype == torch.bool and hard.shape == soft.shape
    assert torch.equal(hard, soft > 0.5)
    # Against torchvision wherever its value is not within the dtype's tolerance of the threshold.
    expected = tv_paste_masks_in_image(masks, boxes, IMAGE)
    clear = (expected.double() - 0.5).abs() > tol(dtype)["atol"]
    assert torch.equal(hard[clear], (expected > 0.5)[clear])


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_rounds_like_torch(backend: str, dtype: torch.dtype) -> None:
    # torch compares with a Python scalar rounded to the tensor's dtype: a pixel equal to v is not greater
    # than v - tiny when v - tiny rounds to v. The fused threshold must agree with `soft > threshold`.
    masks = case_masks(3, dtype=dtype)
    boxes = torch.tensor(CASE_BOXES[:3])
    soft = paste_masks_in_image(masks, boxes, IMAGE)
    value = soft[0, 0, 10, 10].item()
    for threshold in (value, math.nextafter(value, -math.inf), value - 1e-12, value + 1e-12, 0.3):
        hard = paste_masks_in_image(masks, boxes, IMAGE, threshold=threshold)
        assert torch.equal(hard, soft > threshold), threshold


def test_valid(backend: str) -> None:
    masks = case_masks(5)
    boxes = torch.tensor(CASE_BOXES[:5])
    valid = torch.tensor([True, False, True, False, True])
    out = paste_masks_in_image(masks, boxes, IMAGE, valid=valid)
    full = paste_masks_in_image(masks, boxes, IMAGE)
    assert (out[~valid] == 0).all()
    torch.testing.assert_close(out[valid], full[valid], rtol=0, atol=0)
    hard = paste_masks_in_image(masks, boxes, IMAGE, threshold=0.5, valid=valid)
    assert torch.equal(hard, out > 0.5)


@pytest.mark.parametrize("num, img_shape", [(0, IMAGE), (2, (0, 56)), (2, (40, 0))])
def test_empty(backend: str, num: int, img_shape: tuple[int, int]) -> None:
    masks = case_masks(num)
    boxes = torch.tensor(CASE_BOXES[:num]).reshape(num, 4)
    for threshold, dtype in ((None, torch.float32), (0.5, torch.bool)):
        out = paste_masks_in_image(masks, boxes, img_shape, threshold=threshold)
        assert out.shape == (num, 1, *img_shape) and out.dtype == dtype
    if num == 0:  # torchvision fails on an empty image with masks in it
        assert tv_paste_masks_in_image(masks, boxes, img_shape).shape == (num, 1, *img_shape)


# ---------------------------------------------------------------------------------------------------------------
# Gradient (linear in the masks; none for the boxes).
# ---------------------------------------------------------------------------------------------------------------


def test_gradcheck(backend: str) -> None:
    masks = torch.rand(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.2, 0.5, 4.7, 5.1], [-1.0, 2.0, 3.5, 9.0], [2.0, 2.0, 2.4, 2.3]], dtype=torch.float64)
    valid = torch.tensor([True, True, False])
    assert torch.autograd.gradcheck(
        lambda m: paste_masks_in_image(m, boxes, (6, 7), valid=valid), (masks,), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_matches_torchvision(backend: str, dtype: torch.dtype) -> None:
    boxes = torch.tensor(CASE_BOXES, dtype=dtype)
    masks = case_masks(len(boxes), dtype=dtype)
    grad = torch.randn(len(boxes), 1, *IMAGE, dtype=dtype)
    grads = []
    for fn in (paste_masks_in_image, tv_paste_masks_in_image):
        m = masks.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(m, boxes, IMAGE), m, grad)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], **tol(dtype))


def test_threshold_output_has_no_gradient(backend: str) -> None:
    masks = case_masks(2).requires_grad_(True)
    hard = paste_masks_in_image(masks, torch.tensor(CASE_BOXES[:2]), IMAGE, threshold=0.5)
    assert hard.dtype == torch.bool and not hard.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Bad input, registration, compile.
# ---------------------------------------------------------------------------------------------------------------

_M = torch.rand(2, 1, 28, 28)
_B = torch.tensor(CASE_BOXES[:2])


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((_M[:, 0], _B, IMAGE), {}, ValueError, "masks must have 4 dimensions"),
        ((_M.repeat(1, 2, 1, 1), _B, IMAGE), {}, ValueError, "masks must have shape"),
        ((_M[:, :, :0], _B, IMAGE), {}, ValueError, "masks must have shape"),
        ((_M.to(torch.int32), _B, IMAGE), {}, TypeError, "masks must have dtype"),
        (([[0.0]], _B, IMAGE), {}, TypeError, "masks must be a torch.Tensor"),
        ((_M, _B[:, :3], IMAGE), {}, ValueError, "boxes must have shape"),
        ((_M, _B[:1], IMAGE), {}, ValueError, "boxes must have shape"),
        ((_M, _B.to(torch.int64), IMAGE), {}, TypeError, "boxes must have dtype"),
        ((_M, _B.to("meta"), IMAGE), {}, ValueError, "boxes is on meta"),
        ((_M, _B, (40,)), {}, ValueError, "img_shape"),
        ((_M, _B, (40.0, 56)), {}, ValueError, "img_shape"),
        ((_M, _B, (-1, 56)), {}, ValueError, "img_shape"),
        ((_M, _B, IMAGE, -1), {}, ValueError, "padding"),
        ((_M, _B, IMAGE, 1.0), {}, ValueError, "padding"),
        ((_M, _B, IMAGE), {"threshold": float("nan")}, ValueError, "threshold"),
        ((_M, _B, IMAGE), {"threshold": "0.5"}, ValueError, "threshold"),
        ((_M, _B, IMAGE), {"valid": torch.ones(2)}, TypeError, "valid must have dtype"),
        ((_M, _B, IMAGE), {"valid": torch.ones(3, dtype=torch.bool)}, ValueError, "valid must have shape"),
    ],
)
def test_bad_input(args: tuple, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        paste_masks_in_image(*args, **kwargs)


@pytest.mark.parametrize(
    "threshold, with_valid", [(None, False), (0.5, False), (None, True)], ids=["plain", "threshold", "valid"]
)
def test_opcheck(backend: str, threshold: float | None, with_valid: bool) -> None:
    masks = case_masks(3).requires_grad_(threshold is None)
    boxes = torch.tensor(CASE_BOXES[:3])
    valid = torch.tensor([True, False, True]) if with_valid else None
    torch.library.opcheck(torch.ops.mrcnn.paste_masks.default, (masks, boxes, 40, 56, 1, threshold, valid))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend: str, compile_backend: str) -> None:
    masks = case_masks(3)
    boxes = torch.tensor(CASE_BOXES[:3])
    valid = torch.tensor([True, True, False])

    def fn(masks: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = paste_masks_in_image(masks * 1.0, boxes, IMAGE, valid=valid)
        return soft, paste_masks_in_image(masks, boxes, IMAGE, 2, threshold=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)
    for got, want in zip(compiled(masks, boxes, valid), fn(masks, boxes, valid), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# GPU: COCO-sized images, every dtype, against torchvision on the device.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_coco_size(dtype: torch.dtype) -> None:
    img_shape = (800, 1333)
    boxes = random_boxes(100, img_shape).cuda()
    boxes = boxes[torchvision_safe(boxes.cpu(), 28, 1, img_shape).cuda()]
    masks = case_masks(len(boxes), dtype=dtype).cuda()
    check_against_torchvision(masks, boxes, img_shape)
    hard = paste_masks_in_image(masks, boxes, img_shape, threshold=0.5)
    assert torch.equal(hard, paste_masks_in_image(masks, boxes, img_shape) > 0.5)
