"""Box coding (kernels.box_coder): both backends against a hand-computed case, a naive float64 loop and
torchvision's BoxCoder / clip_boxes_to_image / remove_small_boxes.

Every test runs on the Triton kernels (through the interpreter on CPU) and on the vectorized torch path,
chosen by the ``backend`` fixture. The kernels are elementwise with 1024 elements per program, so every
case here is a handful of programs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from kernels import use_backend
from kernels.box_coder import BoxCoder, decode_boxes, encode_boxes
from tests.tolerances import coordinate_atol, tol

BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
CLIP = math.log(1000.0 / 16)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    with use_backend(request.param):
        yield request.param


def random_boxes(n: int, dtype: torch.dtype = torch.float32, scale: float = 300.0) -> torch.Tensor:
    """[n, 4] boxes with positive sides, some reaching outside a (scale x scale) image."""
    xy = torch.rand(n, 2, dtype=torch.float64) * scale - 0.1 * scale
    wh = torch.rand(n, 2, dtype=torch.float64) * 0.5 * scale + 1.0
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def random_deltas(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, k*4] deltas; a few size deltas beyond the clamp (CLIP * 5 = 20.7 with the head's weights)."""
    d = torch.randn(n, k * 4, dtype=torch.float64) * 2.0
    d[::7, 2::4] = 25.0
    return d.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The naive float64 references (loops over elements), from torchvision's formulas.
# ---------------------------------------------------------------------------------------------------------------


def decode_ref(deltas, boxes, weights, clip, image_sizes=None):
    """[R, K, 4] float64: every box rounded to the deltas' dtype first, as torchvision does."""
    boxes = boxes.to(deltas.dtype).double().tolist()
    deltas = deltas.double().tolist()
    wx, wy, ww, wh = weights
    out = []
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        row = []
        for k in range(len(deltas[r]) // 4):
            d0, d1, d2, d3 = deltas[r][4 * k : 4 * k + 4]
            w, h = x2 - x1, y2 - y1
            cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
            dw, dh = min(d2 / ww, clip), min(d3 / wh, clip)
            pcx, pcy = d0 / wx * w + cx, d1 / wy * h + cy
            pw, ph = math.exp(dw) * w, math.exp(dh) * h
            box = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
            if image_sizes is not None:
                ih, iw = (float(v) for v in image_sizes[r])
                box = [min(max(box[0], 0.0), iw), min(max(box[1], 0.0), ih), min(max(box[2], 0.0), iw),
                       min(max(box[3], 0.0), ih)]  # fmt: skip
            row.append(box)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(len(boxes), -1, 4)


def encode_ref(gt, proposals, weights):
    wx, wy, ww, wh = weights
    out = []
    pairs = zip(gt.double().tolist(), proposals.double().tolist(), strict=True)
    for (gx1, gy1, gx2, gy2), (px1, py1, px2, py2) in pairs:
        pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
        out.append([
            wx * ((gx1 + 0.5 * gw) - (px1 + 0.5 * pw)) / pw,
            wy * ((gy1 + 0.5 * gh) - (py1 + 0.5 * ph)) / ph,
            ww * math.log(gw / pw),
            wh * math.log(gh / ph),
        ])  # fmt: skip
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------------------------
# Golden case. Box (0, 0, 10, 20): w 10, h 20, centre (5, 10). Deltas (0.1, -0.2, log 2, 0), weights 1:
# centre (0.1*10 + 5, -0.2*20 + 10) = (6, 6), size (2*10, 20) = (20, 20) -> (-4, -4, 16, 16).
# Clipped to an image of (h, w) = (12, 15): (0, 0, 15, 12); sides 15 and 12.
# ---------------------------------------------------------------------------------------------------------------


def test_golden(backend):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    deltas = torch.tensor([[0.1, -0.2, math.log(2.0), 0.0]], dtype=torch.float64)
    out = decode_boxes(deltas, boxes, RPN_WEIGHTS)
    torch.testing.assert_close(out, torch.tensor([[[-4.0, -4.0, 16.0, 16.0]]], dtype=torch.float64))
    sizes = torch.tensor([[12, 15]])
    out, valid = decode_boxes(deltas, boxes, RPN_WEIGHTS, image_sizes=sizes, min_size=12.0)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 15.0, 12.0]]], dtype=torch.float64))
    assert valid.tolist() == [[True]]
    _, valid = decode_boxes(deltas, boxes, RPN_WEIGHTS, image_sizes=sizes, min_size=12.5)
    assert valid.tolist() == [[False]]
    targets = encode_boxes(torch.tensor([[-4.0, -4.0, 16.0, 16.0]], dtype=torch.float64), boxes, RPN_WEIGHTS)
    torch.testing.assert_close(targets, deltas)


# ---------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_decode_matches_reference(backend, dtype, num_classes):
    R = 53
    boxes, deltas = random_boxes(R), random_deltas(R, num_classes, dtype)
    out = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP)
    assert out.shape == (R, num_classes, 4) and out.dtype == dtype
    torch.testing.assert_close(out.double(), decode_ref(deltas, boxes, HEAD_WEIGHTS, CLIP), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_matches_torchvision(backend, dtype):
    R, K = 41, 4
    boxes, deltas = random_boxes(R, dtype), random_deltas(R, K, dtype)
    tv, ours = TVBoxCoder(HEAD_WEIGHTS), BoxCoder(HEAD_WEIGHTS)
    torch.testing.assert_close(ours.decode_single(deltas, boxes), tv.decode_single(deltas, boxes), **tol(dtype))
    per_image = [boxes[:10], boxes[10:10], boxes[10:]]
    torch.testing.assert_close(ours.decode(deltas, per_image), tv.decode(deltas, per_image), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_and_filters_match_torchvision(backend, dtype):
    """clip_boxes_to_image per image, remove_small_boxes and the box head's score filter (score > thresh)."""
    B, P, K = 2, 23, 3
    sizes = torch.tensor([[180, 250], [300, 120]])
    boxes, deltas = random_boxes(B * P, dtype), random_deltas(B * P, K, dtype)
    scores = torch.rand(B * P, K, dtype=dtype)
    scores[0, 0] = 0.5  # equal to the threshold: not kept (strict >, as torchvision's box head)
    image_sizes = sizes[:, None, :].expand(B, P, 2).reshape(B * P, 2)
    out, valid = decode_boxes(
        deltas, boxes, HEAD_WEIGHTS, CLIP, image_sizes, min_size=20.0, scores=scores, score_thresh=0.5
    )
    decoded = TVBoxCoder(HEAD_WEIGHTS).decode_single(deltas, boxes).reshape(B * P, K, 4)
    for b in range(B):
        rows = slice(b * P, (b + 1) * P)
        clipped = torchvision.ops.clip_boxes_to_image(decoded[rows], tuple(sizes[b].tolist()))
        torch.testing.assert_close(out[rows], clipped, **tol(dtype))
        flat = out[rows].reshape(-1, 4)
        expected = torch.zeros(P * K, dtype=torch.bool)
        expected[torchvision.ops.remove_small_boxes(flat, 20.0)] = True
        expected &= scores[rows].reshape(-1) > 0.5
        assert torch.equal(valid[rows].reshape(-1), expected)
    assert 0 < valid.sum() < valid.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_filters_are_exact_on_the_outputs(backend, dtype):
    """``valid`` is remove_small_boxes / ``scores > t`` on our own outputs, in their dtype, bit for bit."""
    R = 64
    boxes = random_boxes(R, dtype, scale=40.0)
    deltas = random_deltas(R, 1, dtype) * 0.5
    scores = (torch.rand(R, 1) * 0.2 + 0.4).to(dtype)
    out, valid = decode_boxes(
        deltas, boxes, RPN_WEIGHTS, image_sizes=torch.tensor([[30, 40]]).expand(R, 2), min_size=5.0,
        scores=scores, score_thresh=0.5,
    )  # fmt: skip
    flat = out[:, 0]
    expected = torch.zeros(R, dtype=torch.bool)
    expected[torchvision.ops.remove_small_boxes(flat, 5.0)] = True
    assert torch.equal(valid[:, 0], expected & (scores[:, 0] > 0.5))


def test_clip_only_and_size_only(backend):
    R = 9
    boxes, deltas = random_boxes(R), random_deltas(R, 2)
    sizes = torch.full((R, 2), 100.0)
    out = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP, sizes)
    ref = decode_ref(deltas, boxes, HEAD_WEIGHTS, CLIP, sizes.tolist())
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    out2, valid = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP, min_size=1.0)
    torch.testing.assert_close(out2.double(), decode_ref(deltas, boxes, HEAD_WEIGHTS, CLIP), **tol(torch.float32))
    assert valid.shape == (R, 2) and valid.dtype == torch.bool


def test_non_contiguous_inputs(backend):
    R, K = 17, 3
    big = torch.randn(K * 4 + 3, R, dtype=torch.float64)
    deltas = big[2 : 2 + K * 4].t()  # [R, K*4], strides (1, R)
    boxes_store = torch.zeros(R, 9, dtype=torch.float64)
    boxes_store[:, 1::2] = random_boxes(R, torch.float64)
    boxes = boxes_store[:, 1::2]  # column stride 2
    scores = torch.rand(K, R, dtype=torch.float64).t()
    sizes = torch.tensor([[90, 110]]).expand(R, 2)  # row stride 0
    assert not deltas.is_contiguous() and not boxes.is_contiguous() and sizes.stride(0) == 0
    out, valid = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP, sizes, scores=scores, score_thresh=0.3)
    ref_out, ref_valid = decode_boxes(
        deltas.contiguous(), boxes.contiguous(), HEAD_WEIGHTS, CLIP, sizes.contiguous(), scores=scores.contiguous(),
        score_thresh=0.3,
    )  # fmt: skip
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(out, decode_ref(deltas, boxes, HEAD_WEIGHTS, CLIP, sizes.tolist()), **tol(torch.float64))


@pytest.mark.parametrize(
    "boxes_dtype, deltas_dtype",
    [(torch.float32, torch.float16), (torch.float64, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float64, torch.bfloat16), (torch.float16, torch.bfloat16)],
)  # fmt: skip
def test_mixed_dtypes_round_boxes_to_deltas_dtype(backend, boxes_dtype, deltas_dtype):
    """Boxes are first rounded to the deltas' dtype (torchvision's ``boxes.to(rel_codes.dtype)``); the output
    has the deltas' dtype and the gradient of the boxes the boxes' dtype."""
    boxes = (random_boxes(12, torch.float64) + 0.1234).to(boxes_dtype).requires_grad_()
    deltas = random_deltas(12, 2, deltas_dtype)
    out = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP)
    assert out.dtype == deltas_dtype
    ref = decode_ref(deltas, boxes.detach(), HEAD_WEIGHTS, CLIP)
    torch.testing.assert_close(out.double(), ref, **tol(deltas_dtype))
    out.sum().backward()
    assert boxes.grad.dtype == boxes_dtype
    targets = encode_boxes(boxes.detach(), boxes.detach().flip(0), RPN_WEIGHTS)
    assert targets.dtype == boxes_dtype


def test_empty(backend):
    for R, K in ((0, 1), (0, 91), (5, 0)):
        deltas, boxes = torch.zeros(R, K * 4), torch.zeros(R, 4)
        out, valid = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP, torch.zeros(R, 2), min_size=1.0,
                                  scores=torch.zeros(R, K), score_thresh=0.1)  # fmt: skip
        assert out.shape == (R, K, 4) and valid.shape == (R, K)
    # torchvision returns decode_single's [0, K*4] when there are no boxes at all.
    tv = TVBoxCoder(HEAD_WEIGHTS).decode(torch.zeros(0, 8), [torch.zeros(0, 4)])
    assert BoxCoder(HEAD_WEIGHTS).decode(torch.zeros(0, 8), [torch.zeros(0, 4)]).shape == tv.shape
    assert BoxCoder(HEAD_WEIGHTS).encode([torch.zeros(0, 4)], [torch.zeros(0, 4)])[0].shape == (0, 4)


def test_nan_gives_nan_and_invalid(backend):
    boxes = random_boxes(4)
    deltas = random_deltas(4, 1)
    deltas[1, 0] = float("nan")
    boxes[2, 3] = float("nan")
    out, valid = decode_boxes(deltas, boxes, RPN_WEIGHTS, image_sizes=torch.tensor([[500, 500]]).expand(4, 2),
                              min_size=0.0)  # fmt: skip
    assert out[1, 0, [0, 2]].isnan().all() and out[2, 0, [1, 3]].isnan().all()
    assert not out[[0, 3]].isnan().any()
    assert valid[:, 0].tolist() == [True, False, False, True]


def test_bad_input_names_the_argument():
    boxes, deltas = torch.zeros(3, 4), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="deltas"):
        decode_boxes(torch.zeros(3, 7), boxes, RPN_WEIGHTS)
    with pytest.raises(ValueError, match="boxes"):
        decode_boxes(deltas, torch.zeros(2, 4), RPN_WEIGHTS)
    with pytest.raises(TypeError, match="deltas"):
        decode_boxes(deltas.long(), boxes, RPN_WEIGHTS)
    with pytest.raises(ValueError, match="image_sizes"):
        decode_boxes(deltas, boxes, RPN_WEIGHTS, image_sizes=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="scores"):
        decode_boxes(deltas, boxes, RPN_WEIGHTS, scores=torch.zeros(3, 3), score_thresh=0.1)
    with pytest.raises(ValueError, match="score_thresh"):
        decode_boxes(deltas, boxes, RPN_WEIGHTS, scores=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="weights"):
        decode_boxes(deltas, boxes, (1.0, 1.0))
    with pytest.raises(ValueError, match="proposals"):
        encode_boxes(boxes, torch.zeros(2, 4), RPN_WEIGHTS)
    with pytest.raises(TypeError, match="boxes"):
        BoxCoder(RPN_WEIGHTS).decode(deltas, boxes)


# ---------------------------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_matches_reference(backend, dtype):
    gt, proposals = random_boxes(45, dtype), random_boxes(45, dtype)
    out = encode_boxes(gt, proposals, HEAD_WEIGHTS)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), encode_ref(gt, proposals, HEAD_WEIGHTS), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_matches_torchvision(backend, dtype):
    gt = [random_boxes(7, dtype), random_boxes(0, dtype), random_boxes(12, dtype)]
    proposals = [random_boxes(len(g), dtype) for g in gt]
    ours = BoxCoder((1.0, 2.0, 3.0, 4.0)).encode(gt, proposals)
    ref = TVBoxCoder((1.0, 2.0, 3.0, 4.0)).encode(gt, proposals)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, **tol(dtype))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(
        st.tuples(
            st.floats(-500, 500), st.floats(-500, 500), st.floats(0.5, 400), st.floats(0.5, 400),
            st.floats(-300, 300), st.floats(-300, 300), st.floats(-4.1, 4.1), st.floats(-4.1, 4.1),
        ),
        min_size=1, max_size=20,
    ),
    weights=st.sampled_from([RPN_WEIGHTS, HEAD_WEIGHTS, (1.5, 0.5, 2.0, 3.0)]),
)  # fmt: skip
def test_decode_inverts_encode(backend, data, weights):
    """decode(encode(g, p), p) == g whenever log(w_g / w_p), log(h_g / h_p) <= clip (detectron2's invariant).

    Each example is a proposal (x, y, w, h), the ground truth's centre offset and its log size ratios,
    within +-4.1 of the clip log(1000/16) = 4.135."""
    t = torch.tensor(data, dtype=torch.float64)
    proposals = torch.cat([t[:, 0:2], t[:, 0:2] + t[:, 2:4]], dim=1)
    gt_size = t[:, 2:4] * t[:, 6:8].exp()
    gt_xy = t[:, 0:2] + 0.5 * t[:, 2:4] + t[:, 4:6] - 0.5 * gt_size
    gt = torch.cat([gt_xy, gt_xy + gt_size], dim=1)
    targets = encode_boxes(gt, proposals, weights)
    out = decode_boxes(targets, proposals, weights, CLIP)[:, 0]
    torch.testing.assert_close(out, gt, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------


def test_gradcheck_triton():
    """float64 gradcheck through the Triton kernels (interpreted on CPU): deltas and boxes with the clip, the
    clamp of dw/dh (row 0: size deltas beyond it) and the filters' extra output; then without the clip."""
    R, K = 4, 2
    boxes = random_boxes(R, torch.float64, scale=60.0).requires_grad_()
    deltas = torch.randn(R, K * 4, dtype=torch.float64) * 0.5
    deltas[0, 2::4] = 30.0
    deltas.requires_grad_()
    sizes = torch.tensor([[50, 60]]).expand(R, 2)
    scores = torch.rand(R, K, dtype=torch.float64)
    with use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda d, b: decode_boxes(d, b, HEAD_WEIGHTS, CLIP, sizes, min_size=1.0, scores=scores,
                                      score_thresh=0.5)[0],
            (deltas, boxes),
        )  # fmt: skip
        assert torch.autograd.gradcheck(lambda d, b: decode_boxes(d, b, RPN_WEIGHTS, CLIP), (deltas, boxes),
                                        fast_mode=True)  # fmt: skip
        gt = random_boxes(5, torch.float64).requires_grad_()
        proposals = random_boxes(5, torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda g, p: encode_boxes(g, p, (1.0, 2.0, 3.0, 4.0)), (gt, proposals))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_matches_torchvision(backend, dtype):
    R, K = 19, 3
    boxes, deltas = random_boxes(R, dtype), random_deltas(R, K, dtype)
    sizes = torch.tensor([[200, 150]])
    grad = torch.randn(R, K, 4, dtype=dtype)

    def grads(fn):
        d, b = deltas.clone().requires_grad_(), boxes.clone().requires_grad_()
        (fn(d, b) * grad).sum().backward()
        return d.grad, b.grad

    ours = grads(lambda d, b: decode_boxes(d, b, HEAD_WEIGHTS, CLIP, sizes.expand(R, 2)))
    ref = grads(
        lambda d, b: torchvision.ops.clip_boxes_to_image(
            TVBoxCoder(HEAD_WEIGHTS).decode_single(d, b).reshape(R, K, 4), (200, 150)
        )
    )
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, **tol(dtype))


def test_encode_gradient_matches_torchvision(backend):
    gt, proposals = random_boxes(13, torch.float64), random_boxes(13, torch.float64)
    grad = torch.randn(13, 4, dtype=torch.float64)

    def grads(fn):
        g, p = gt.clone().requires_grad_(), proposals.clone().requires_grad_()
        (fn(g, p) * grad).sum().backward()
        return g.grad, p.grad

    ours = grads(lambda g, p: encode_boxes(g, p, HEAD_WEIGHTS))
    ref = grads(lambda g, p: TVBoxCoder(HEAD_WEIGHTS).encode_single(g, p))
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float64))


def test_half_gradient(backend):
    R, K = 8, 2
    boxes, deltas = random_boxes(R, torch.bfloat16), random_deltas(R, K, torch.bfloat16).requires_grad_()
    decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP).sum().backward()
    ref = deltas.detach().double().requires_grad_()
    TVBoxCoder(HEAD_WEIGHTS).decode_single(ref, boxes.double()).sum().backward()
    assert deltas.grad.dtype == torch.bfloat16
    torch.testing.assert_close(deltas.grad.double(), ref.grad, **tol(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck(backend):
    R, K = 7, 2
    boxes, deltas = random_boxes(R, torch.float64), random_deltas(R, K, torch.float64)
    sizes = torch.tensor([[120, 90]]).expand(R, 2)
    scores = torch.rand(R, K, dtype=torch.float64)
    w = list(HEAD_WEIGHTS)
    for args in (
        (deltas, boxes, w, CLIP, None, None, None, None),
        (deltas.requires_grad_(), boxes.requires_grad_(), w, CLIP, sizes, 2.0, scores, 0.5),
    ):
        torch.library.opcheck(torch.ops.mrcnn.decode_boxes.default, args)
    grad = torch.randn(R, K, 4, dtype=torch.float64)
    backward_args = (grad, deltas.detach(), boxes.detach(), w, CLIP, sizes)
    torch.library.opcheck(torch.ops.mrcnn.decode_boxes_backward.default, backward_args)
    gt, proposals = random_boxes(6, torch.float64), random_boxes(6, torch.float64)
    torch.library.opcheck(torch.ops.mrcnn.encode_boxes.default, (gt, proposals, w))
    torch.library.opcheck(torch.ops.mrcnn.encode_boxes.default, (gt.requires_grad_(), proposals.requires_grad_(), w))


def test_compile_fullgraph(backend):
    R, K = 11, 2
    boxes, deltas = random_boxes(R), random_deltas(R, K)
    sizes, scores = torch.tensor([[120, 90]]).expand(R, 2), torch.rand(R, K)

    def fn(d, b):
        out, valid = decode_boxes(d, b, HEAD_WEIGHTS, CLIP, sizes, min_size=1.0, scores=scores, score_thresh=0.3)
        targets = BoxCoder(HEAD_WEIGHTS).encode_single(b.flip(0), b)
        return out, valid, targets

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    d = deltas.clone().requires_grad_()
    out, valid, targets = compiled(d, boxes)
    ref = fn(deltas, boxes)
    torch.testing.assert_close(out, ref[0])
    assert torch.equal(valid, ref[1])
    torch.testing.assert_close(targets, ref[2])
    out.sum().backward()
    assert d.grad is not None and d.grad.shape == deltas.shape


def test_compile_inductor():
    R = 9
    boxes, deltas = random_boxes(R), random_deltas(R, 1)
    fn = lambda d, b: decode_boxes(d, b, RPN_WEIGHTS, CLIP).sum(dim=1) * 2.0
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(deltas, boxes), fn(deltas, boxes))


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_matches_torchvision(dtype):
    R, K = 4000, 91
    boxes, deltas = random_boxes(R, dtype).cuda(), random_deltas(R, K, dtype).cuda()
    sizes = torch.tensor([[800, 1216]], device="cuda").expand(R, 2)
    out = decode_boxes(deltas, boxes, HEAD_WEIGHTS, CLIP, sizes)
    # torchvision in float64 on the same (exactly converted) inputs is the reference.
    tv = TVBoxCoder(HEAD_WEIGHTS).decode_single(deltas.double(), boxes.double()).reshape(R, K, 4)
    # A corner near 0 is ctr - w / 2 with terms up to the image's size, computed in float32 for every dtype: an
    # absolute error of float32 ulps at that size (measured on an H200: 2.8e-5 px at a corner of 0.04 px).
    rtol, atol = tol(dtype).values()
    atol = max(atol, coordinate_atol(1216))
    torch.testing.assert_close(out.double(), torchvision.ops.clip_boxes_to_image(tv, (800, 1216)), rtol=rtol, atol=atol)
