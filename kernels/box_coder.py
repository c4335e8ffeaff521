"""Box coding of Faster/Mask R-CNN: boxes to regression targets (encode) and back (decode), with the
clip to the image and the small-box / score filters of the RPN and the box head fused into the decode.

Math (torchvision's ``BoxCoder``, weights ``(wx, wy, ww, wh)``): a box ``(x1, y1, x2, y2)`` has
``w = x2 - x1``, ``h = y2 - y1``, centre ``cx = x1 + w/2``, ``cy = y1 + h/2``.

* ``encode(g, p) = (wx (cx_g - cx_p) / w_p, wy (cy_g - cy_p) / h_p, ww log(w_g / w_p), wh log(h_g / h_p))``
* ``decode(d, p)``: ``dx = d0/wx``, ``dy = d1/wy``, ``dw = min(d2/ww, clip)``, ``dh = min(d3/wh, clip)``;
  centre ``(dx w_p + cx_p, dy h_p + cy_p)``, size ``(exp(dw) w_p, exp(dh) h_p)``, returned as corners.
* Invariant (detectron2 states it): ``decode(encode(g, p), p) == g`` up to rounding whenever
  ``log(w_g / w_p) <= clip`` and ``log(h_g / h_p) <= clip`` (the clamp is the only lossy step).
* Fused decode (``decode_boxes``): then x clamped to ``[0, W]`` and y to ``[0, H]`` of each box's image
  (``clip_boxes_to_image``), and optionally ``valid = (x2 - x1 >= min_size) & (y2 - y1 >= min_size)``
  (``remove_small_boxes`` on the clipped boxes) ``& (score > score_thresh)`` (the box head's filter).

Layout: ``deltas [R, K*4]`` holds K per-class groups ``(dx, dy, dw, dh)`` (K = 1 for the RPN), ``boxes
[R, 4]`` one reference box per row, output ``[R, K, 4]``. The forward is one program per ``BLOCK``
(row, class) pairs; the backward one program per ``BLOCK_R`` rows with all classes, so that the
gradient of a reference box is summed over its classes without atomics. Inputs are read through their
strides (an ``image_sizes`` expanded from ``[B, 2]`` to ``[R, 2]`` with stride 0 needs no copy).

Precision: math in float32 for float16/bfloat16/float32 and in float64 for float64, rounded once to the
deltas' dtype. torchvision computes half inputs in half, so our half results are the more accurate.
Like torchvision we first round ``boxes`` to the deltas' dtype, and the filters compare in the
output's (scores') dtype with the threshold rounded to that dtype, as torch does for a tensor compared
with a Python number, so ``valid`` equals ``remove_small_boxes`` / ``scores > t`` on our outputs exactly.

Gradients: the decode is differentiable w.r.t. ``deltas`` and ``boxes`` (analytic formulas in
``_decode_boxes_bwd_kernel``); clamps pass the gradient where the value lies within the bounds, ends
included (``torch.clamp``'s rule). ``image_sizes`` and ``scores`` get no gradient. The encode's gradient
(w.r.t. both box sets; targets rarely need one) is its analytic formula in torch ops.

Documented results for invalid values: a NaN delta or box gives NaN coordinates (the clamps keep NaN,
as ``torch.clamp``) and ``valid`` False; a reference box of width 0 encodes to inf/NaN, as in torchvision.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._backend import FLOAT_DTYPES, acc_dtype, backend_for, check_tensor

__all__ = ["BoxCoder", "decode_boxes", "encode_boxes"]

_SIZE_DTYPES = (torch.int32, torch.int64, *FLOAT_DTYPES)
# Elements per program. Every element is a handful of flops on 16-32 bytes, so the kernels are
# memory bound and a fixed block is as good as a tuned one; under the interpreter a big block means
# few programs (each costs ~3 ms). 8 warps: 4 elements per thread; with 4 warps (8 per thread) ptxas
# gave the forward 168 registers (19% occupancy on sm_90).
_BLOCK = 1024
_TILE = 1024  # BLOCK_R * BLOCK_K of the backward
_NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ieee_div(x, y):
    """``x / y`` rounded to nearest. Triton's ``/`` is ``div.full.f32`` (2 ulp) for float32."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """``x`` converted to ``DTYPE`` with round-to-nearest-even, as ``Tensor.to`` (float64 -> bfloat16 goes
    through float32, as in c10).

    Triton's interpreter truncates float32 -> bfloat16 (GPUs round), so bfloat16 is rounded on the bits;
    and it computes bfloat16 arithmetic and casts other than to/from float32 on the raw bits, so a
    bfloat16 input goes through float32 first, and kernels never compute in bfloat16.
    """
    if tl.bfloat16 == DTYPE:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), float("nan"))
    elif x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(DTYPE)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """``x`` (float32/float64) rounded to ``DTYPE``'s precision, kept in ``x``'s dtype (torch's intermediate
    roundings)."""
    return _cast(x, DTYPE).to(x.dtype)


@triton.jit
def _clamp(x, lo, hi):
    """``torch.clamp(x, lo, hi)``: NaN stays NaN (``tl.minimum`` may drop it on GPUs)."""
    x = tl.where(x < lo, lo, x)
    return tl.where(x > hi, hi, x)


@triton.jit
def _decode_axis(d_ctr, d_size, lo, hi, w_ctr, w_size, clip):
    """One axis of the decode: ``(low, high, size of the reference box, delta of the centre, exp of the
    clamped size delta, whether the size delta passed the clamp)``, all in the accumulation dtype."""
    size = hi - lo
    ctr = lo + 0.5 * size
    dc = _ieee_div(d_ctr, w_ctr)
    ds = _ieee_div(d_size, w_size)
    unclamped = ds <= clip
    e = tl.exp(tl.where(ds > clip, clip, ds))
    pred_ctr = dc * size + ctr
    half = 0.5 * (e * size)
    return pred_ctr - half, pred_ctr + half, size, dc, e, unclamped


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_elements"])
def _decode_boxes_fwd_kernel(
    # pointers
    deltas_ptr, boxes_ptr, sizes_ptr, scores_ptr, out_ptr, valid_ptr,
    # sizes
    num_elements, num_classes,
    # strides
    deltas_stride_r, deltas_stride_c, boxes_stride_r, boxes_stride_c, sizes_stride_r, sizes_stride_c,
    scores_stride_r, scores_stride_k, out_stride_r, out_stride_k, out_stride_c, valid_stride_r, valid_stride_k,
    # scalars (float64 so that float64 inputs see them unrounded)
    wx: tl.float64, wy: tl.float64, ww: tl.float64, wh: tl.float64, clip: tl.float64, min_size: tl.float64,
    score_thresh: tl.float64,
    # meta
    CLIP_TO_IMAGE: tl.constexpr, FILTER_SIZE: tl.constexpr, FILTER_SCORE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Decode (and clip, and filter) ``BLOCK`` (row, class) pairs.

    deltas_ptr: [R, K*4]; boxes_ptr: [R, 4]; sizes_ptr: [R, 2] (h, w), read when CLIP_TO_IMAGE;
    scores_ptr: [R, K], read when FILTER_SCORE; out_ptr: [R, K, 4] (deltas' dtype);
    valid_ptr: [R, K] bool, written when FILTER_SIZE or FILTER_SCORE. num_elements = R*K.
    """
    pid = tl.program_id(0).to(tl.int64)
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < num_elements
    r = e // num_classes
    k = e - r * num_classes

    d_row = deltas_ptr + r * deltas_stride_r + 4 * k * deltas_stride_c
    d0 = tl.load(d_row, mask=mask, other=0.0).to(ACC)
    d1 = tl.load(d_row + deltas_stride_c, mask=mask, other=0.0).to(ACC)
    d2 = tl.load(d_row + 2 * deltas_stride_c, mask=mask, other=0.0).to(ACC)
    d3 = tl.load(d_row + 3 * deltas_stride_c, mask=mask, other=0.0).to(ACC)
    # torchvision first converts the boxes to the deltas' dtype.
    b_row = boxes_ptr + r * boxes_stride_r
    bx1 = _cast(tl.load(b_row, mask=mask, other=0.0), OUT).to(ACC)
    by1 = _cast(tl.load(b_row + boxes_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    bx2 = _cast(tl.load(b_row + 2 * boxes_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    by2 = _cast(tl.load(b_row + 3 * boxes_stride_c, mask=mask, other=0.0), OUT).to(ACC)

    c = tl.full((), clip, ACC)
    x1, x2, _w, _dx, _ex, _ux = _decode_axis(d0, d2, bx1, bx2, tl.full((), wx, ACC), tl.full((), ww, ACC), c)
    y1, y2, _h, _dy, _ey, _uy = _decode_axis(d1, d3, by1, by2, tl.full((), wy, ACC), tl.full((), wh, ACC), c)
    if CLIP_TO_IMAGE:
        s_row = sizes_ptr + r * sizes_stride_r
        img_h = tl.load(s_row, mask=mask, other=0).to(ACC)
        img_w = tl.load(s_row + sizes_stride_c, mask=mask, other=0).to(ACC)
        x1 = _clamp(x1, 0.0, img_w)
        x2 = _clamp(x2, 0.0, img_w)
        y1 = _clamp(y1, 0.0, img_h)
        y2 = _clamp(y2, 0.0, img_h)
    x1 = _cast(x1, OUT)
    y1 = _cast(y1, OUT)
    x2 = _cast(x2, OUT)
    y2 = _cast(y2, OUT)
    o_row = out_ptr + r * out_stride_r + k * out_stride_k
    tl.store(o_row, x1, mask=mask)
    tl.store(o_row + out_stride_c, y1, mask=mask)
    tl.store(o_row + 2 * out_stride_c, x2, mask=mask)
    tl.store(o_row + 3 * out_stride_c, y2, mask=mask)

    if FILTER_SIZE or FILTER_SCORE:
        ok = mask
        if FILTER_SIZE:
            # remove_small_boxes on the stored boxes: the side in the output dtype (a correctly rounded
            # subtraction: float32 has more than twice the bits of float16/bfloat16) against min_size
            # rounded to that dtype.
            m = _round_to(tl.full((), min_size, ACC), OUT)
            side_x = _round_to(x2.to(ACC) - x1.to(ACC), OUT)
            side_y = _round_to(y2.to(ACC) - y1.to(ACC), OUT)
            ok = ok & (side_x >= m) & (side_y >= m)
        if FILTER_SCORE:
            SCORE: tl.constexpr = scores_ptr.dtype.element_ty
            SACC: tl.constexpr = tl.float64 if scores_ptr.dtype.element_ty == tl.float64 else tl.float32
            s = tl.load(scores_ptr + r * scores_stride_r + k * scores_stride_k, mask=mask, other=0.0).to(SACC)
            ok = ok & (s > _round_to(tl.full((), score_thresh, SACC), SCORE))
        tl.store(valid_ptr + r * valid_stride_r + k * valid_stride_k, ok, mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _decode_boxes_bwd_kernel(
    # pointers
    grad_ptr, deltas_ptr, boxes_ptr, sizes_ptr, grad_deltas_ptr, grad_boxes_ptr,
    # sizes
    num_rows, num_classes,
    # strides
    grad_stride_r, grad_stride_k, grad_stride_c, deltas_stride_r, deltas_stride_c, boxes_stride_r, boxes_stride_c,
    sizes_stride_r, sizes_stride_c, grad_deltas_stride_r, grad_deltas_stride_c, grad_boxes_stride_r,
    grad_boxes_stride_c,
    # scalars
    wx: tl.float64, wy: tl.float64, ww: tl.float64, wh: tl.float64, clip: tl.float64,
    # meta
    CLIP_TO_IMAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Gradients of the (clipped) decode for ``BLOCK_R`` rows and all their classes.

    grad_ptr: [R, K, 4] gradient of the output; deltas_ptr: [R, K*4]; boxes_ptr: [R, 4];
    sizes_ptr: [R, 2] (h, w), read when CLIP_TO_IMAGE; grad_deltas_ptr: [R, K*4] (deltas' dtype);
    grad_boxes_ptr: [R, 4] (boxes' dtype).

    With ``x1 = dx w + b1 + w/2 - e w/2``, ``x2 = dx w + b1 + w/2 + e w/2``, ``w = b2 - b1``,
    ``e = exp(min(dw, clip))``: ``d/d(d0) = (g1 + g2) w / wx``, ``d/d(d2) = (g2 - g1) e w / (2 ww)``
    (0 when clamped), ``d/dw = g1 (dx + 1/2 - e/2) + g2 (dx + 1/2 + e/2)``, ``d/d(b1) = g1 + g2 - d/dw``,
    ``d/d(b2) = d/dw``, summed over the classes; likewise in y.
    """
    pid = tl.program_id(0).to(tl.int64)
    GD: tl.constexpr = grad_deltas_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if grad_deltas_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = r < num_rows
    mask = row_ok[:, None] & (k < num_classes)[None, :]

    d_ptr = deltas_ptr + r[:, None] * deltas_stride_r + 4 * k[None, :] * deltas_stride_c
    d0 = tl.load(d_ptr, mask=mask, other=0.0).to(ACC)
    d1 = tl.load(d_ptr + deltas_stride_c, mask=mask, other=0.0).to(ACC)
    d2 = tl.load(d_ptr + 2 * deltas_stride_c, mask=mask, other=0.0).to(ACC)
    d3 = tl.load(d_ptr + 3 * deltas_stride_c, mask=mask, other=0.0).to(ACC)
    b_row = boxes_ptr + r * boxes_stride_r
    bx1 = _cast(tl.load(b_row, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    by1 = _cast(tl.load(b_row + boxes_stride_c, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    bx2 = _cast(tl.load(b_row + 2 * boxes_stride_c, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    by2 = _cast(tl.load(b_row + 3 * boxes_stride_c, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    g_ptr = grad_ptr + r[:, None] * grad_stride_r + k[None, :] * grad_stride_k
    g1 = tl.load(g_ptr, mask=mask, other=0.0).to(ACC)
    h1 = tl.load(g_ptr + grad_stride_c, mask=mask, other=0.0).to(ACC)
    g2 = tl.load(g_ptr + 2 * grad_stride_c, mask=mask, other=0.0).to(ACC)
    h2 = tl.load(g_ptr + 3 * grad_stride_c, mask=mask, other=0.0).to(ACC)

    c = tl.full((), clip, ACC)
    x1, x2, w, dx, ex, ux = _decode_axis(d0, d2, bx1, bx2, tl.full((), wx, ACC), tl.full((), ww, ACC), c)
    y1, y2, h, dy, ey, uy = _decode_axis(d1, d3, by1, by2, tl.full((), wy, ACC), tl.full((), wh, ACC), c)
    if CLIP_TO_IMAGE:
        s_row = sizes_ptr + r * sizes_stride_r
        img_h = tl.load(s_row, mask=row_ok, other=0).to(ACC)[:, None]
        img_w = tl.load(s_row + sizes_stride_c, mask=row_ok, other=0).to(ACC)[:, None]
        g1 = tl.where((x1 >= 0.0) & (x1 <= img_w), g1, 0.0)
        g2 = tl.where((x2 >= 0.0) & (x2 <= img_w), g2, 0.0)
        h1 = tl.where((y1 >= 0.0) & (y1 <= img_h), h1, 0.0)
        h2 = tl.where((y2 >= 0.0) & (y2 <= img_h), h2, 0.0)

    gd_ptr = grad_deltas_ptr + r[:, None] * grad_deltas_stride_r + 4 * k[None, :] * grad_deltas_stride_c
    tl.store(gd_ptr, _cast(_ieee_div((g1 + g2) * w, tl.full((), wx, ACC)), GD), mask=mask)
    tl.store(gd_ptr + grad_deltas_stride_c, _cast(_ieee_div((h1 + h2) * h, tl.full((), wy, ACC)), GD), mask=mask)
    gdw = tl.where(ux, _ieee_div((g2 - g1) * (0.5 * (ex * w)), tl.full((), ww, ACC)), 0.0)
    gdh = tl.where(uy, _ieee_div((h2 - h1) * (0.5 * (ey * h)), tl.full((), wh, ACC)), 0.0)
    tl.store(gd_ptr + 2 * grad_deltas_stride_c, _cast(gdw, GD), mask=mask)
    tl.store(gd_ptr + 3 * grad_deltas_stride_c, _cast(gdh, GD), mask=mask)

    gw = g1 * (dx + 0.5 - 0.5 * ex) + g2 * (dx + 0.5 + 0.5 * ex)
    gh = h1 * (dy + 0.5 - 0.5 * ey) + h2 * (dy + 0.5 + 0.5 * ey)
    GB: tl.constexpr = grad_boxes_ptr.dtype.element_ty
    gb_row = grad_boxes_ptr + r * grad_boxes_stride_r
    tl.store(gb_row, _cast(tl.sum(g1 + g2 - gw, axis=1), GB), mask=row_ok)
    tl.store(gb_row + grad_boxes_stride_c, _cast(tl.sum(h1 + h2 - gh, axis=1), GB), mask=row_ok)
    tl.store(gb_row + 2 * grad_boxes_stride_c, _cast(tl.sum(gw, axis=1), GB), mask=row_ok)
    tl.store(gb_row + 3 * grad_boxes_stride_c, _cast(tl.sum(gh, axis=1), GB), mask=row_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _encode_boxes_kernel(
    # pointers
    ref_ptr, prop_ptr, out_ptr,
    # sizes
    num_rows,
    # strides
    ref_stride_r, ref_stride_c, prop_stride_r, prop_stride_c, out_stride_r, out_stride_c,
    # scalars
    wx: tl.float64, wy: tl.float64, ww: tl.float64, wh: tl.float64,
    # meta
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Regression targets of ``BLOCK`` rows. ref_ptr: [N, 4] (ground truth); prop_ptr: [N, 4];
    out_ptr: [N, 4] in the promoted dtype of the two."""
    pid = tl.program_id(0).to(tl.int64)
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = pid * BLOCK + tl.arange(0, BLOCK)
    mask = r < num_rows
    g = ref_ptr + r * ref_stride_r
    p = prop_ptr + r * prop_stride_r
    # Rounded to the output dtype first (torch's type promotion); masked lanes read unit boxes, not a 0/0
    # (which the interpreter reports).
    gx1 = _cast(tl.load(g, mask=mask, other=0.0), OUT).to(ACC)
    gy1 = _cast(tl.load(g + ref_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    gx2 = _cast(tl.load(g + 2 * ref_stride_c, mask=mask, other=1.0), OUT).to(ACC)
    gy2 = _cast(tl.load(g + 3 * ref_stride_c, mask=mask, other=1.0), OUT).to(ACC)
    px1 = _cast(tl.load(p, mask=mask, other=0.0), OUT).to(ACC)
    py1 = _cast(tl.load(p + prop_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    px2 = _cast(tl.load(p + 2 * prop_stride_c, mask=mask, other=1.0), OUT).to(ACC)
    py2 = _cast(tl.load(p + 3 * prop_stride_c, mask=mask, other=1.0), OUT).to(ACC)
    pw = px2 - px1
    ph = py2 - py1
    gw = gx2 - gx1
    gh = gy2 - gy1
    tx = _ieee_div(tl.full((), wx, ACC) * ((gx1 + 0.5 * gw) - (px1 + 0.5 * pw)), pw)
    ty = _ieee_div(tl.full((), wy, ACC) * ((gy1 + 0.5 * gh) - (py1 + 0.5 * ph)), ph)
    tw = tl.full((), ww, ACC) * tl.log(_ieee_div(gw, pw))
    th = tl.full((), wh, ACC) * tl.log(_ieee_div(gh, ph))
    o = out_ptr + r * out_stride_r
    tl.store(o, _cast(tx, OUT), mask=mask)
    tl.store(o + out_stride_c, _cast(ty, OUT), mask=mask)
    tl.store(o + 2 * out_stride_c, _cast(tw, OUT), mask=mask)
    tl.store(o + 3 * out_stride_c, _cast(th, OUT), mask=mask)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_weights(weights: list[float]) -> list[float]:
    if len(weights) != 4:
        raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got {list(weights)}")
    return [float(w) for w in weights]


def _validate_decode(
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    image_sizes: Tensor | None,
    min_size: float | None,
    scores: Tensor | None,
    score_thresh: float | None,
) -> None:
    check_tensor("deltas", deltas, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("boxes", boxes, ndim=2, dtypes=FLOAT_DTYPES, device=deltas.device)
    R = deltas.shape[0]
    if deltas.shape[1] % 4 != 0:
        raise ValueError(f"deltas must have shape [R, K*4], got {tuple(deltas.shape)}")
    if boxes.shape != (R, 4):
        raise ValueError(f"boxes must have shape [R, 4] = [{R}, 4], got {tuple(boxes.shape)}")
    _check_weights(weights)
    if image_sizes is not None:
        check_tensor("image_sizes", image_sizes, ndim=2, dtypes=_SIZE_DTYPES, device=deltas.device)
        if image_sizes.shape != (R, 2):
            raise ValueError(f"image_sizes must have shape [R, 2] = [{R}, 2] (h, w), got {tuple(image_sizes.shape)}")
    if (scores is None) != (score_thresh is None):
        raise ValueError("scores and score_thresh must be given together")
    if scores is not None:
        check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, device=deltas.device)
        if scores.shape != (R, deltas.shape[1] // 4):
            K = deltas.shape[1] // 4
            raise ValueError(f"scores must have shape [R, K] = [{R}, {K}], got {tuple(scores.shape)}")
    if min_size is not None and not math.isfinite(min_size):
        raise ValueError(f"min_size must be finite, got {min_size}")


def _validate_encode(reference_boxes: Tensor, proposals: Tensor, weights: list[float]) -> None:
    check_tensor("reference_boxes", reference_boxes, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("proposals", proposals, ndim=2, dtypes=FLOAT_DTYPES, device=reference_boxes.device)
    if reference_boxes.shape[1] != 4 or proposals.shape != reference_boxes.shape:
        raise ValueError(
            f"reference_boxes and proposals must both have shape [N, 4], got {tuple(reference_boxes.shape)} "
            f"and {tuple(proposals.shape)}"
        )
    _check_weights(weights)


# ----------------------------------------------------------------------------------------------
# Launchers (validated inputs)
# ----------------------------------------------------------------------------------------------


def _decode_triton(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh, out, valid):
    R, K = out.shape[0], out.shape[1]
    n = R * K
    if n == 0:
        return
    sizes = image_sizes if image_sizes is not None else deltas
    sc = scores if scores is not None else deltas
    v = valid if valid.numel() else out
    grid = (triton.cdiv(n, _BLOCK),)
    _decode_boxes_fwd_kernel[grid](
        deltas, boxes, sizes, sc, out, v,
        n, K,
        deltas.stride(0), deltas.stride(1), boxes.stride(0), boxes.stride(1), sizes.stride(0), sizes.stride(1),
        sc.stride(0), sc.stride(1), out.stride(0), out.stride(1), out.stride(2), v.stride(0), v.stride(1),
        *weights, clip, 0.0 if min_size is None else min_size, 0.0 if score_thresh is None else score_thresh,
        CLIP_TO_IMAGE=image_sizes is not None, FILTER_SIZE=min_size is not None, FILTER_SCORE=scores is not None,
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _decode_backward_triton(grad, deltas, boxes, weights, clip, image_sizes, grad_deltas, grad_boxes):
    R, K = grad.shape[0], grad.shape[1]
    if R * K == 0:
        grad_boxes.zero_()
        return
    sizes = image_sizes if image_sizes is not None else deltas
    block_k = triton.next_power_of_2(K)
    block_r = max(1, _TILE // block_k)
    _decode_boxes_bwd_kernel[(triton.cdiv(R, block_r),)](
        grad, deltas, boxes, sizes, grad_deltas, grad_boxes,
        R, K,
        grad.stride(0), grad.stride(1), grad.stride(2), deltas.stride(0), deltas.stride(1),
        boxes.stride(0), boxes.stride(1), sizes.stride(0), sizes.stride(1),
        grad_deltas.stride(0), grad_deltas.stride(1), grad_boxes.stride(0), grad_boxes.stride(1),
        *weights, clip,
        CLIP_TO_IMAGE=image_sizes is not None, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _encode_triton(reference_boxes, proposals, weights, out):
    N = out.shape[0]
    if N == 0:
        return
    _encode_boxes_kernel[(triton.cdiv(N, _BLOCK),)](
        reference_boxes, proposals, out,
        N,
        reference_boxes.stride(0), reference_boxes.stride(1), proposals.stride(0), proposals.stride(1),
        out.stride(0), out.stride(1),
        *weights,
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The torch path (CPU): the same math, vectorized
# ----------------------------------------------------------------------------------------------


def _decode_axis_torch(d_ctr, d_size, lo, hi, w_ctr, w_size, clip):
    size = hi - lo
    ctr = lo + 0.5 * size
    dc = d_ctr / w_ctr
    ds = d_size / w_size
    e = torch.exp(torch.where(ds > clip, torch.full_like(ds, clip), ds))
    pred_ctr = dc * size + ctr
    half = 0.5 * (e * size)
    return pred_ctr - half, pred_ctr + half, size, dc, e, ds <= clip


def _decode_parts_torch(deltas, boxes, weights, clip):
    """Per-axis decode of ``deltas [R, K*4]`` in the accumulation dtype, as ``[R, K]`` tensors."""
    R = deltas.shape[0]
    acc = acc_dtype(deltas.dtype)
    d = deltas.to(acc).reshape(R, deltas.shape[1] // 4, 4)
    b = boxes.to(deltas.dtype).to(acc)[:, None, :]
    wx, wy, ww, wh = weights
    xs = _decode_axis_torch(d[..., 0], d[..., 2], b[..., 0], b[..., 2], wx, ww, clip)
    ys = _decode_axis_torch(d[..., 1], d[..., 3], b[..., 1], b[..., 3], wy, wh, clip)
    return xs, ys


def _clamp_torch(x: Tensor, hi: Tensor) -> Tensor:
    return torch.minimum(torch.clamp(x, min=0.0), hi)


def _decode_torch(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh, out, valid):
    (x1, x2, *_), (y1, y2, *_) = _decode_parts_torch(deltas, boxes, weights, clip)
    if image_sizes is not None:
        size = image_sizes.to(x1.dtype)
        img_h, img_w = size[:, 0:1], size[:, 1:2]
        # torch.minimum propagates NaN, like torch.clamp.
        x1, x2 = _clamp_torch(x1, img_w), _clamp_torch(x2, img_w)
        y1, y2 = _clamp_torch(y1, img_h), _clamp_torch(y2, img_h)
    out.copy_(torch.stack((x1, y1, x2, y2), dim=2))
    if valid.numel():
        ok = torch.ones_like(valid)
        if min_size is not None:
            # In the output dtype, comparing with a Python number: exactly remove_small_boxes.
            ok &= (out[..., 2] - out[..., 0] >= min_size) & (out[..., 3] - out[..., 1] >= min_size)
        if scores is not None:
            ok &= scores > score_thresh
        valid.copy_(ok)


def _decode_backward_torch(grad, deltas, boxes, weights, clip, image_sizes, grad_deltas, grad_boxes):
    (x1, x2, w, dx, ex, ux), (y1, y2, h, dy, ey, uy) = _decode_parts_torch(deltas, boxes, weights, clip)
    g = grad.to(x1.dtype)
    g1, h1, g2, h2 = g.unbind(2)
    if image_sizes is not None:
        size = image_sizes.to(x1.dtype)
        img_h, img_w = size[:, 0:1], size[:, 1:2]
        g1 = torch.where((x1 >= 0) & (x1 <= img_w), g1, 0.0)
        g2 = torch.where((x2 >= 0) & (x2 <= img_w), g2, 0.0)
        h1 = torch.where((y1 >= 0) & (y1 <= img_h), h1, 0.0)
        h2 = torch.where((y2 >= 0) & (y2 <= img_h), h2, 0.0)
    wx, wy, ww, wh = weights
    gdw = torch.where(ux, (g2 - g1) * (0.5 * (ex * w)) / ww, 0.0)
    gdh = torch.where(uy, (h2 - h1) * (0.5 * (ey * h)) / wh, 0.0)
    gd = torch.stack(((g1 + g2) * w / wx, (h1 + h2) * h / wy, gdw, gdh), dim=2)
    grad_deltas.copy_(gd.reshape(grad_deltas.shape))
    gw = g1 * (dx + 0.5 - 0.5 * ex) + g2 * (dx + 0.5 + 0.5 * ex)
    gh = h1 * (dy + 0.5 - 0.5 * ey) + h2 * (dy + 0.5 + 0.5 * ey)
    grad_boxes.copy_(torch.stack(((g1 + g2 - gw).sum(1), (h1 + h2 - gh).sum(1), gw.sum(1), gh.sum(1)), dim=1))


def _encode_torch(reference_boxes, proposals, weights, out):
    acc = acc_dtype(out.dtype)
    g = reference_boxes.to(out.dtype).to(acc)
    p = proposals.to(out.dtype).to(acc)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    wx, wy, ww, wh = weights
    tx = wx * ((g[:, 0] + 0.5 * gw) - (p[:, 0] + 0.5 * pw)) / pw
    ty = wy * ((g[:, 1] + 0.5 * gh) - (p[:, 1] + 0.5 * ph)) / ph
    out.copy_(torch.stack((tx, ty, ww * torch.log(gw / pw), wh * torch.log(gh / ph)), dim=1))


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def _decode_outputs(deltas: Tensor, min_size: float | None, scores: Tensor | None) -> tuple[Tensor, Tensor]:
    R, K = deltas.shape[0], deltas.shape[1] // 4
    out = deltas.new_empty((R, K, 4))
    filtered = min_size is not None or scores is not None
    valid = deltas.new_empty((R, K) if filtered else (0,), dtype=torch.bool)
    return out, valid


@torch.library.custom_op("mrcnn::decode_boxes", mutates_args=())
def _decode_boxes_op(
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    clip: float,
    image_sizes: Tensor | None,
    min_size: float | None,
    scores: Tensor | None,
    score_thresh: float | None,
) -> tuple[Tensor, Tensor]:
    """``(boxes [R, K, 4], valid [R, K] bool, or [0] without min_size and scores)``; see ``decode_boxes``."""
    _validate_decode(deltas, boxes, weights, image_sizes, min_size, scores, score_thresh)
    out, valid = _decode_outputs(deltas, min_size, scores)
    impl = _decode_triton if backend_for(deltas) == "triton" else _decode_torch
    impl(deltas, boxes, _check_weights(weights), clip, image_sizes, min_size, scores, score_thresh, out, valid)
    return out, valid


@_decode_boxes_op.register_fake
def _(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh):
    _validate_decode(deltas, boxes, weights, image_sizes, min_size, scores, score_thresh)
    return _decode_outputs(deltas, min_size, scores)


@torch.library.custom_op("mrcnn::decode_boxes_backward", mutates_args=())
def _decode_boxes_backward_op(
    grad: Tensor,
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    clip: float,
    image_sizes: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``decode_boxes`` w.r.t. ``(deltas [R, K*4], boxes [R, 4])``."""
    grad_deltas = torch.empty_like(deltas, memory_format=torch.contiguous_format)
    grad_boxes = torch.empty_like(boxes, memory_format=torch.contiguous_format)
    impl = _decode_backward_triton if backend_for(deltas) == "triton" else _decode_backward_torch
    impl(grad, deltas, boxes, _check_weights(weights), clip, image_sizes, grad_deltas, grad_boxes)
    return grad_deltas, grad_boxes


@_decode_boxes_backward_op.register_fake
def _(grad, deltas, boxes, weights, clip, image_sizes):
    return (
        torch.empty_like(deltas, memory_format=torch.contiguous_format),
        torch.empty_like(boxes, memory_format=torch.contiguous_format),
    )


def _decode_setup(ctx, inputs, output):
    deltas, boxes, weights, clip, image_sizes, *_ = inputs
    ctx.save_for_backward(deltas, boxes, image_sizes)
    ctx.args = (weights, clip)


def _decode_grad(ctx, grad, _grad_valid):
    deltas, boxes, image_sizes = ctx.saved_tensors
    weights, clip = ctx.args
    grad_deltas, grad_boxes = torch.ops.mrcnn.decode_boxes_backward(grad, deltas, boxes, weights, clip, image_sizes)
    return grad_deltas, grad_boxes, None, None, None, None, None, None


_decode_boxes_op.register_autograd(_decode_grad, setup_context=_decode_setup)


def _encode_output(reference_boxes: Tensor, proposals: Tensor) -> Tensor:
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    return reference_boxes.new_empty(reference_boxes.shape, dtype=dtype)


@torch.library.custom_op("mrcnn::encode_boxes", mutates_args=())
def _encode_boxes_op(reference_boxes: Tensor, proposals: Tensor, weights: list[float]) -> Tensor:
    """Regression targets ``[N, 4]`` of ``reference_boxes`` w.r.t. ``proposals``; see ``encode_boxes``."""
    _validate_encode(reference_boxes, proposals, weights)
    out = _encode_output(reference_boxes, proposals)
    impl = _encode_triton if backend_for(reference_boxes) == "triton" else _encode_torch
    impl(reference_boxes, proposals, _check_weights(weights), out)
    return out


@_encode_boxes_op.register_fake
def _(reference_boxes, proposals, weights):
    _validate_encode(reference_boxes, proposals, weights)
    return _encode_output(reference_boxes, proposals)


def _encode_setup(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = weights


def _encode_grad(ctx, grad):
    """The analytic gradient in plain torch ops (traceable by ``torch.compile``; targets rarely need it).

    With ``t_x = wx (c_g - c_p) / w_p`` and ``t_w = ww log(w_g / w_p)``: ``dt_x/dg1 = dt_x/dg2 = wx / (2 w_p)``,
    ``dt_x/dp1 = -wx / (2 w_p) + t_x / w_p``, ``dt_x/dp2 = -wx / (2 w_p) - t_x / w_p``, ``dt_w/dg1 = -ww / w_g``,
    ``dt_w/dg2 = ww / w_g``, ``dt_w/dp1 = ww / w_p``, ``dt_w/dp2 = -ww / w_p``; likewise in y.
    """
    reference_boxes, proposals = ctx.saved_tensors
    acc = acc_dtype(grad.dtype)
    g = reference_boxes.to(grad.dtype).to(acc)
    p = proposals.to(grad.dtype).to(acc)
    go = grad.to(acc)
    grads_g, grads_p = [], []
    for axis, (w_ctr, w_size) in enumerate(((ctx.weights[0], ctx.weights[2]), (ctx.weights[1], ctx.weights[3]))):
        lo, hi = axis, axis + 2
        size_p, size_g = p[:, hi] - p[:, lo], g[:, hi] - g[:, lo]
        t = w_ctr * ((g[:, lo] + 0.5 * size_g) - (p[:, lo] + 0.5 * size_p)) / size_p
        g_ctr, g_size = go[:, axis], go[:, axis + 2]
        half = g_ctr * (0.5 * w_ctr / size_p)
        grads_g.append((half - g_size * w_size / size_g, half + g_size * w_size / size_g))
        shift = g_ctr * t / size_p + g_size * w_size / size_p
        grads_p.append((-half + shift, -half - shift))
    (gx1, gx2), (gy1, gy2) = grads_g
    (px1, px2), (py1, py2) = grads_p
    grad_ref = torch.stack((gx1, gy1, gx2, gy2), dim=1).to(reference_boxes.dtype)
    grad_prop = torch.stack((px1, py1, px2, py2), dim=1).to(proposals.dtype)
    return grad_ref, grad_prop, None


_encode_boxes_op.register_autograd(_encode_grad, setup_context=_encode_setup)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

_DEFAULT_CLIP = math.log(1000.0 / 16)


def decode_boxes(
    deltas: Tensor,
    boxes: Tensor,
    weights: tuple[float, float, float, float],
    clip: float = _DEFAULT_CLIP,
    image_sizes: Tensor | None = None,
    *,
    min_size: float | None = None,
    scores: Tensor | None = None,
    score_thresh: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode per-class deltas against reference boxes, clip to each box's image and filter, in one launch.

    Equals ``BoxCoder(weights, clip).decode_single(deltas, boxes).reshape(R, K, 4)`` followed by
    ``clip_boxes_to_image`` per box's image, ``remove_small_boxes(min_size)`` and ``scores > score_thresh``.

    Args:
        deltas: ``Tensor[R, K*4]`` float16/bfloat16/float32/float64; K per-class ``(dx, dy, dw, dh)``.
        boxes: ``Tensor[R, 4]`` reference boxes ``(x1, y1, x2, y2)`` (anchors or proposals), any float dtype.
        weights: ``(wx, wy, ww, wh)``, e.g. ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for the box head.
        clip: upper bound of ``dw`` and ``dh`` before the exponential.
        image_sizes: optional ``Tensor[R, 2]`` ``(h, w)`` of each box's image (an ``expand`` of a
            ``Tensor[B, 2]`` costs no copy); x is clamped to ``[0, w]``, y to ``[0, h]``.
        min_size: optional; ``valid`` requires both sides of the clipped box ``>= min_size``.
        scores: optional ``Tensor[R, K]``, with ``score_thresh``; ``valid`` requires ``score > score_thresh``.

    Returns:
        ``Tensor[R, K, 4]`` in ``deltas``' dtype, or ``(boxes, valid: Tensor[R, K] bool)`` when ``min_size``
        or ``scores`` is given. Differentiable w.r.t. ``deltas`` and ``boxes``.
    """
    out, valid = torch.ops.mrcnn.decode_boxes(
        deltas, boxes, [float(w) for w in weights], float(clip), image_sizes,
        None if min_size is None else float(min_size), scores,
        None if score_thresh is None else float(score_thresh),
    )  # fmt: skip
    if min_size is None and scores is None:
        return out
    return out, valid


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets of ``reference_boxes: Tensor[N, 4]`` w.r.t. ``proposals: Tensor[N, 4]`` (torchvision's
    ``encode_boxes`` with a weights tuple): ``Tensor[N, 4]`` in the promoted dtype. Differentiable w.r.t. both."""
    return torch.ops.mrcnn.encode_boxes(reference_boxes, proposals, [float(w) for w in weights])


class BoxCoder:
    """``torchvision.models.detection._utils.BoxCoder`` on our kernels: same constructor, methods and results
    (up to rounding: half inputs are computed in float32)."""

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = _DEFAULT_CLIP) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        """Per-image targets: ``list[Tensor[N_i, 4]]`` ground truths and proposals -> ``tuple[Tensor[N_i, 4]]``."""
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """``Tensor[N, 4]`` targets of ``reference_boxes: Tensor[N, 4]`` w.r.t. ``proposals: Tensor[N, 4]``."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """``rel_codes: Tensor[N, K*4]`` against ``list[Tensor[N_i, 4]]`` (``N = sum N_i``) -> ``Tensor[N, K, 4]``.

        As torchvision, with no boxes at all the result is ``decode_single``'s ``[0, K*4]``."""
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"boxes must be a list or tuple of Tensor[N_i, 4], got {type(boxes).__name__}")
        concat_boxes = torch.cat(list(boxes), dim=0)
        box_sum = concat_boxes.shape[0]
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred = self.decode_single(rel_codes, concat_boxes)
        return pred.reshape(box_sum, -1, 4) if box_sum > 0 else pred

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``rel_codes: Tensor[N, K*4]`` against ``boxes: Tensor[N, 4]`` -> ``Tensor[N, K*4]``."""
        return decode_boxes(rel_codes, boxes, self.weights, self.bbox_xform_clip).flatten(1)
