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
``_box_coder_kernels._decode_boxes_bwd_kernel``); clamps pass the gradient where the value lies within
the bounds, ends included (``torch.clamp``'s rule). ``image_sizes`` and ``scores`` get no gradient. The
encode's gradient (w.r.t. both box sets; targets rarely need one) is its analytic formula in torch ops.

Kernels: ``_box_coder_kernels``; the CPU torch path: ``_box_coder_torch``.

Documented results for invalid values: a NaN delta or box gives NaN coordinates (the clamps keep NaN,
as ``torch.clamp``) and ``valid`` False; a reference box of width 0 encodes to inf/NaN, as in torchvision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._backend import triton_custom_op
from ._box_coder_kernels import decode_backward_triton, decode_triton, encode_triton
from ._box_coder_torch import decode_backward_torch, decode_torch, encode_torch
from ._contract import FLOAT_DTYPES, OpTypeError, OpValueError, acc_dtype, check_tensor

__all__ = ["BoxCoder", "decode_boxes", "encode_boxes"]

_SIZE_DTYPES = (torch.int32, torch.int64, *FLOAT_DTYPES)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_weights(weights: list[float]) -> list[float]:
    if len(weights) != 4:
        raise OpValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got {list(weights)}")
    return [float(w) for w in weights]


def _validate_decode(
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    clip: float,
    image_sizes: Tensor | None,
    min_size: float | None,
    scores: Tensor | None,
    score_thresh: float | None,
) -> None:
    check_tensor("deltas", deltas, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("boxes", boxes, ndim=2, dtypes=FLOAT_DTYPES, device=deltas.device)
    R = deltas.shape[0]
    if deltas.shape[1] % 4 != 0:
        raise OpValueError(f"deltas must have shape [R, K*4], got {tuple(deltas.shape)}")
    if boxes.shape != (R, 4):
        raise OpValueError(f"boxes must have shape [R, 4] = [{R}, 4], got {tuple(boxes.shape)}")
    _check_weights(weights)
    if image_sizes is not None:
        check_tensor("image_sizes", image_sizes, ndim=2, dtypes=_SIZE_DTYPES, device=deltas.device)
        if image_sizes.shape != (R, 2):
            raise OpValueError(f"image_sizes must have shape [R, 2] = [{R}, 2] (h, w), got {tuple(image_sizes.shape)}")
    if (scores is None) != (score_thresh is None):
        raise OpValueError("scores and score_thresh must be given together")
    if scores is not None:
        check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, device=deltas.device)
        if scores.shape != (R, deltas.shape[1] // 4):
            K = deltas.shape[1] // 4
            raise OpValueError(f"scores must have shape [R, K] = [{R}, {K}], got {tuple(scores.shape)}")
    if min_size is not None and not math.isfinite(min_size):
        raise OpValueError(f"min_size must be finite, got {min_size}")
    if math.isnan(clip):  # +inf is no clamp (exp may overflow to an infinite box, as in torchvision)
        raise OpValueError(f"clip must be a number (inf: no clamp), got {clip}")


def _validate_encode(reference_boxes: Tensor, proposals: Tensor, weights: list[float]) -> None:
    check_tensor("reference_boxes", reference_boxes, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("proposals", proposals, ndim=2, dtypes=FLOAT_DTYPES, device=reference_boxes.device)
    if reference_boxes.shape[1] != 4 or proposals.shape != reference_boxes.shape:
        raise OpValueError(
            f"reference_boxes and proposals must both have shape [N, 4], got {tuple(reference_boxes.shape)} "
            f"and {tuple(proposals.shape)}"
        )
    _check_weights(weights)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def _decode_outputs(deltas: Tensor, min_size: float | None, scores: Tensor | None) -> tuple[Tensor, Tensor]:
    R, K = deltas.shape[0], deltas.shape[1] // 4
    out = deltas.new_empty((R, K, 4))
    filtered = min_size is not None or scores is not None
    valid = deltas.new_empty((R, K) if filtered else (0,), dtype=torch.bool)
    return out, valid


# Half inputs keep their dtype under autocast (all three ops): the math runs in float32 and rounds once to the
# output dtype, more accurate than torchvision's decode in half, without a float32 copy.
@triton_custom_op("decode_boxes", autocast="keep", traceable=True)
def _decode_boxes_op(
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    clip: float,
    image_sizes: Tensor | None,
    min_size: float | None,
    scores: Tensor | None,
    score_thresh: float | None,
    *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(boxes [R, K, 4], valid [R, K] bool, or [0] without min_size and scores)``; see ``decode_boxes``."""
    _validate_decode(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh)
    impl = decode_triton if backend == "triton" else decode_torch
    return impl(deltas, boxes, _check_weights(weights), clip, image_sizes, min_size, scores, score_thresh)


@_decode_boxes_op.register_fake
def _(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh):
    _validate_decode(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh)
    return _decode_outputs(deltas, min_size, scores)


@triton_custom_op("decode_boxes_backward", autocast="keep")
def _decode_boxes_backward_op(
    grad: Tensor,
    deltas: Tensor,
    boxes: Tensor,
    weights: list[float],
    clip: float,
    image_sizes: Tensor | None,
    *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``decode_boxes`` w.r.t. ``(deltas [R, K*4], boxes [R, 4])``."""
    impl = decode_backward_triton if backend == "triton" else decode_backward_torch
    return impl(grad, deltas, boxes, _check_weights(weights), clip, image_sizes)


@_decode_boxes_backward_op.register_fake
def _(grad, deltas, boxes, weights, clip, image_sizes):
    return (
        torch.empty_like(deltas, memory_format=torch.contiguous_format),
        torch.empty_like(boxes, memory_format=torch.contiguous_format),
    )


def _decode_setup_context(ctx, inputs, output):
    deltas, boxes, weights, clip, image_sizes, *_ = inputs
    ctx.save_for_backward(deltas, boxes, image_sizes)
    ctx.args = (weights, clip)


def _decode_backward(ctx, grad, _grad_valid):
    deltas, boxes, image_sizes = ctx.saved_tensors
    weights, clip = ctx.args
    grad_deltas, grad_boxes = torch.ops.mrcnn.decode_boxes_backward(grad, deltas, boxes, weights, clip, image_sizes)
    return grad_deltas, grad_boxes, *[None] * 6


_decode_boxes_op.register_autograd(_decode_backward, setup_context=_decode_setup_context)


def _encode_output(reference_boxes: Tensor, proposals: Tensor) -> Tensor:
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    return reference_boxes.new_empty(reference_boxes.shape, dtype=dtype)


@triton_custom_op("encode_boxes", autocast="keep", traceable=True)
def _encode_boxes_op(reference_boxes: Tensor, proposals: Tensor, weights: list[float], *, backend: str) -> Tensor:
    """Regression targets ``[N, 4]`` of ``reference_boxes`` w.r.t. ``proposals``; see ``encode_boxes``."""
    _validate_encode(reference_boxes, proposals, weights)
    impl = encode_triton if backend == "triton" else encode_torch
    return impl(reference_boxes, proposals, _check_weights(weights))


@_encode_boxes_op.register_fake
def _(reference_boxes, proposals, weights):
    _validate_encode(reference_boxes, proposals, weights)
    return _encode_output(reference_boxes, proposals)


def _encode_setup_context(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = weights


def _encode_backward(ctx, grad):
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


_encode_boxes_op.register_autograd(_encode_backward, setup_context=_encode_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

# torchvision's bbox_xform_clip: a width/height delta is clamped so that a box grows at most 1000/16-fold.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def decode_boxes(
    deltas: Tensor,
    boxes: Tensor,
    weights: tuple[float, float, float, float],
    clip: float = BBOX_XFORM_CLIP,
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
    (up to rounding: half inputs are computed in float32). Scriptable; its methods use only ``weights`` and
    ``bbox_xform_clip``, so ``patch_torchvision`` installs them on torchvision's class as they are."""

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = BBOX_XFORM_CLIP) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        """Per-image targets: ``list[Tensor[N_i, 4]]`` ground truths and proposals -> ``list[Tensor[N_i, 4]]``."""
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return list(targets.split(boxes_per_image, 0))

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """``Tensor[N, 4]`` targets of ``reference_boxes: Tensor[N, 4]`` w.r.t. ``proposals: Tensor[N, 4]``."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """``rel_codes: Tensor[N, K*4]`` against ``list[Tensor[N_i, 4]]`` (``N = sum N_i``) -> ``Tensor[N, K, 4]``.

        As torchvision, with no boxes at all the result is ``decode_single``'s ``[0, K*4]``."""
        if not torch.jit.is_scripting() and not isinstance(boxes, (list, tuple)):
            raise OpTypeError(f"boxes must be a list or tuple of Tensor[N_i, 4], got {type(boxes).__name__}")
        concat_boxes = torch.cat(boxes, dim=0)
        box_sum = concat_boxes.shape[0]
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred = self.decode_single(rel_codes, concat_boxes)
        return pred.reshape(box_sum, -1, 4) if box_sum > 0 else pred

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``rel_codes: Tensor[N, K*4]`` against ``boxes: Tensor[N, 4]`` -> ``Tensor[N, K*4]``."""
        # decode_boxes without filters, called as the op: TorchScript needs one return type, not decode_boxes' two.
        weights = [float(w) for w in self.weights]
        out = torch.ops.mrcnn.decode_boxes(rel_codes, boxes, weights, float(self.bbox_xform_clip), None, None, None,
                                           None)[0]  # fmt: skip
        return out.flatten(1)
