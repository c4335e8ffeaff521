"""Triton kernels of box coding (decode with the fused clip and filters, its backward, encode) and their
launchers. The math, layout and precision rules are in ``kernels/box_coder.py``'s docstring; the launchers
take inputs that it has validated and outputs that it has allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rn, ieee_div, offset64, round_to, wrap_triton

__all__ = ["decode_backward_triton", "decode_triton", "encode_triton"]

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
    dc = ieee_div(d_ctr, w_ctr)
    ds = ieee_div(d_size, w_size)
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
    d2 = tl.load(d_row + offset64(2, deltas_stride_c), mask=mask, other=0.0).to(ACC)
    d3 = tl.load(d_row + offset64(3, deltas_stride_c), mask=mask, other=0.0).to(ACC)
    # torchvision first converts the boxes to the deltas' dtype.
    b_row = boxes_ptr + r * boxes_stride_r
    bx1 = cast_rn(tl.load(b_row, mask=mask, other=0.0), OUT).to(ACC)
    by1 = cast_rn(tl.load(b_row + boxes_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    bx2 = cast_rn(tl.load(b_row + offset64(2, boxes_stride_c), mask=mask, other=0.0), OUT).to(ACC)
    by2 = cast_rn(tl.load(b_row + offset64(3, boxes_stride_c), mask=mask, other=0.0), OUT).to(ACC)

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
    x1 = cast_rn(x1, OUT)
    y1 = cast_rn(y1, OUT)
    x2 = cast_rn(x2, OUT)
    y2 = cast_rn(y2, OUT)
    o_row = out_ptr + r * out_stride_r + k * out_stride_k
    tl.store(o_row, x1, mask=mask)
    tl.store(o_row + out_stride_c, y1, mask=mask)
    tl.store(o_row + offset64(2, out_stride_c), x2, mask=mask)
    tl.store(o_row + offset64(3, out_stride_c), y2, mask=mask)

    if FILTER_SIZE or FILTER_SCORE:
        ok = mask
        if FILTER_SIZE:
            # remove_small_boxes on the stored boxes: the side in the output dtype (a correctly rounded
            # subtraction: float32 has more than twice the bits of float16/bfloat16) against min_size
            # rounded to that dtype.
            m = round_to(tl.full((), min_size, ACC), OUT)
            side_x = round_to(x2.to(ACC) - x1.to(ACC), OUT)
            side_y = round_to(y2.to(ACC) - y1.to(ACC), OUT)
            ok = ok & (side_x >= m) & (side_y >= m)
        if FILTER_SCORE:
            SCORE: tl.constexpr = scores_ptr.dtype.element_ty
            SACC: tl.constexpr = tl.float64 if scores_ptr.dtype.element_ty == tl.float64 else tl.float32
            s = tl.load(scores_ptr + r * scores_stride_r + k * scores_stride_k, mask=mask, other=0.0).to(SACC)
            ok = ok & (s > round_to(tl.full((), score_thresh, SACC), SCORE))
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
    d2 = tl.load(d_ptr + offset64(2, deltas_stride_c), mask=mask, other=0.0).to(ACC)
    d3 = tl.load(d_ptr + offset64(3, deltas_stride_c), mask=mask, other=0.0).to(ACC)
    b_row = boxes_ptr + r * boxes_stride_r
    bx1 = cast_rn(tl.load(b_row, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    by1 = cast_rn(tl.load(b_row + boxes_stride_c, mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    bx2 = cast_rn(tl.load(b_row + offset64(2, boxes_stride_c), mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    by2 = cast_rn(tl.load(b_row + offset64(3, boxes_stride_c), mask=row_ok, other=0.0), GD).to(ACC)[:, None]
    g_ptr = grad_ptr + r[:, None] * grad_stride_r + k[None, :] * grad_stride_k
    g1 = tl.load(g_ptr, mask=mask, other=0.0).to(ACC)
    h1 = tl.load(g_ptr + grad_stride_c, mask=mask, other=0.0).to(ACC)
    g2 = tl.load(g_ptr + offset64(2, grad_stride_c), mask=mask, other=0.0).to(ACC)
    h2 = tl.load(g_ptr + offset64(3, grad_stride_c), mask=mask, other=0.0).to(ACC)

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
    tl.store(gd_ptr, cast_rn(ieee_div((g1 + g2) * w, tl.full((), wx, ACC)), GD), mask=mask)
    tl.store(gd_ptr + grad_deltas_stride_c, cast_rn(ieee_div((h1 + h2) * h, tl.full((), wy, ACC)), GD), mask=mask)
    gdw = tl.where(ux, ieee_div((g2 - g1) * (0.5 * (ex * w)), tl.full((), ww, ACC)), 0.0)
    gdh = tl.where(uy, ieee_div((h2 - h1) * (0.5 * (ey * h)), tl.full((), wh, ACC)), 0.0)
    tl.store(gd_ptr + offset64(2, grad_deltas_stride_c), cast_rn(gdw, GD), mask=mask)
    tl.store(gd_ptr + offset64(3, grad_deltas_stride_c), cast_rn(gdh, GD), mask=mask)

    gw = g1 * (dx + 0.5 - 0.5 * ex) + g2 * (dx + 0.5 + 0.5 * ex)
    gh = h1 * (dy + 0.5 - 0.5 * ey) + h2 * (dy + 0.5 + 0.5 * ey)
    GB: tl.constexpr = grad_boxes_ptr.dtype.element_ty
    gb_row = grad_boxes_ptr + r * grad_boxes_stride_r
    tl.store(gb_row, cast_rn(tl.sum(g1 + g2 - gw, axis=1), GB), mask=row_ok)
    tl.store(gb_row + grad_boxes_stride_c, cast_rn(tl.sum(h1 + h2 - gh, axis=1), GB), mask=row_ok)
    tl.store(gb_row + offset64(2, grad_boxes_stride_c), cast_rn(tl.sum(gw, axis=1), GB), mask=row_ok)
    tl.store(gb_row + offset64(3, grad_boxes_stride_c), cast_rn(tl.sum(gh, axis=1), GB), mask=row_ok)


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
    gx1 = cast_rn(tl.load(g, mask=mask, other=0.0), OUT).to(ACC)
    gy1 = cast_rn(tl.load(g + ref_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    gx2 = cast_rn(tl.load(g + offset64(2, ref_stride_c), mask=mask, other=1.0), OUT).to(ACC)
    gy2 = cast_rn(tl.load(g + offset64(3, ref_stride_c), mask=mask, other=1.0), OUT).to(ACC)
    px1 = cast_rn(tl.load(p, mask=mask, other=0.0), OUT).to(ACC)
    py1 = cast_rn(tl.load(p + prop_stride_c, mask=mask, other=0.0), OUT).to(ACC)
    px2 = cast_rn(tl.load(p + offset64(2, prop_stride_c), mask=mask, other=1.0), OUT).to(ACC)
    py2 = cast_rn(tl.load(p + offset64(3, prop_stride_c), mask=mask, other=1.0), OUT).to(ACC)
    pw = px2 - px1
    ph = py2 - py1
    gw = gx2 - gx1
    gh = gy2 - gy1
    tx = ieee_div(tl.full((), wx, ACC) * ((gx1 + 0.5 * gw) - (px1 + 0.5 * pw)), pw)
    ty = ieee_div(tl.full((), wy, ACC) * ((gy1 + 0.5 * gh) - (py1 + 0.5 * ph)), ph)
    tw = tl.full((), ww, ACC) * tl.log(ieee_div(gw, pw))
    th = tl.full((), wh, ACC) * tl.log(ieee_div(gh, ph))
    o = out_ptr + r * out_stride_r
    tl.store(o, cast_rn(tx, OUT), mask=mask)
    tl.store(o + out_stride_c, cast_rn(ty, OUT), mask=mask)
    tl.store(o + offset64(2, out_stride_c), cast_rn(tw, OUT), mask=mask)
    tl.store(o + offset64(3, out_stride_c), cast_rn(th, OUT), mask=mask)

# ----------------------------------------------------------------------------------------------
# Launchers (validated inputs)
# ----------------------------------------------------------------------------------------------


def decode_triton(
    deltas: torch.Tensor,
    boxes: torch.Tensor,
    weights: list[float],
    clip: float,
    image_sizes: torch.Tensor | None,
    min_size: float | None,
    scores: torch.Tensor | None,
    score_thresh: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``deltas [R, K*4]`` against ``boxes [R, 4]``: ``(boxes [R, K, 4] in deltas' dtype, valid [R, K]
    bool, or [0] when neither ``min_size`` nor ``scores`` filters)."""
    R, K = deltas.shape[0], deltas.shape[1] // 4
    out = deltas.new_empty((R, K, 4))
    filtered = min_size is not None or scores is not None
    valid = deltas.new_empty((R, K) if filtered else (0,), dtype=torch.bool)
    n = R * K
    if n == 0:
        return out, valid
    sizes = image_sizes if image_sizes is not None else deltas
    sc = scores if scores is not None else deltas
    v = valid if valid.numel() else out
    grid = (triton.cdiv(n, _BLOCK),)
    wrap_triton(_decode_boxes_fwd_kernel)[grid](
        deltas, boxes, sizes, sc, out, v,
        n, K,
        deltas.stride(0), deltas.stride(1), boxes.stride(0), boxes.stride(1), sizes.stride(0), sizes.stride(1),
        sc.stride(0), sc.stride(1), out.stride(0), out.stride(1), out.stride(2), v.stride(0), v.stride(1),
        *weights, clip, 0.0 if min_size is None else min_size, 0.0 if score_thresh is None else score_thresh,
        CLIP_TO_IMAGE=image_sizes is not None, FILTER_SIZE=min_size is not None, FILTER_SCORE=scores is not None,
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out, valid


def decode_backward_triton(
    grad: torch.Tensor,
    deltas: torch.Tensor,
    boxes: torch.Tensor,
    weights: list[float],
    clip: float,
    image_sizes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the decode w.r.t. ``(deltas [R, K*4], boxes [R, 4])`` from ``grad [R, K, 4]``, contiguous."""
    grad_deltas = torch.empty_like(deltas, memory_format=torch.contiguous_format)
    grad_boxes = torch.empty_like(boxes, memory_format=torch.contiguous_format)
    R, K = grad.shape[0], grad.shape[1]
    if R * K == 0:
        return grad_deltas, grad_boxes.zero_()
    sizes = image_sizes if image_sizes is not None else deltas
    block_k = triton.next_power_of_2(K)
    block_r = max(1, _TILE // block_k)
    wrap_triton(_decode_boxes_bwd_kernel)[(triton.cdiv(R, block_r),)](
        grad, deltas, boxes, sizes, grad_deltas, grad_boxes,
        R, K,
        grad.stride(0), grad.stride(1), grad.stride(2), deltas.stride(0), deltas.stride(1),
        boxes.stride(0), boxes.stride(1), sizes.stride(0), sizes.stride(1),
        grad_deltas.stride(0), grad_deltas.stride(1), grad_boxes.stride(0), grad_boxes.stride(1),
        *weights, clip,
        CLIP_TO_IMAGE=image_sizes is not None, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return grad_deltas, grad_boxes


def encode_triton(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Regression targets ``[N, 4]`` of ``reference_boxes [N, 4]`` w.r.t. ``proposals [N, 4]``, in their promoted
    dtype."""
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    out = reference_boxes.new_empty(reference_boxes.shape, dtype=dtype)
    N = out.shape[0]
    if N == 0:
        return out
    wrap_triton(_encode_boxes_kernel)[(triton.cdiv(N, _BLOCK),)](
        reference_boxes, proposals, out,
        N,
        reference_boxes.stride(0), reference_boxes.stride(1), proposals.stride(0), proposals.stride(1),
        out.stride(0), out.stride(1),
        *weights,
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out
