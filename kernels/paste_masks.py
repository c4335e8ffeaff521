"""Paste per-detection masks into the image: torchvision's ``paste_masks_in_image`` in one launch.

Math (``torchvision.models.detection.roi_heads``; we reproduce it, rounding steps included):

* ``expand_masks``: mask ``d`` ``[M_h, M_w]`` is zero-padded by ``p`` on every side to ``[P_h, P_w]``
  ``= [M_h + 2p, M_w + 2p]``; the box grows about its centre by ``s = (M_w + 2p) / M_w`` (a Python
  double that torch rounds to float32 unless the boxes are float64).
* ``expand_boxes``: in the boxes' dtype, every op rounded to it: ``w_half = (x2 - x1) * 0.5 * s``,
  ``x_c = (x2 + x1) * 0.5``, ``x1' = x_c - w_half``, ``x2' = x_c + w_half`` (likewise in y), then
  truncated toward zero to integers ``X1, Y1, X2, Y2`` (``Tensor.to(torch.int64)``).
* ``paste_mask_in_image``: the padded mask is resized bilinearly (``align_corners=False``) to
  ``h x w = max(Y2 - Y1 + 1, 1) x max(X2 - X1 + 1, 1)``; its pixel ``(r - Y1, c - X1)`` lands on
  image pixel ``(r, c)`` for ``Y1 <= r <= Y2``, ``X1 <= c <= X2`` inside the image; every other pixel is 0.
* The resize per axis, as ATen's ``upsample_bilinear2d`` (float32 math for half and float32 masks,
  float64 for float64): ``scale = P / h``, ``src = max(scale * (dst + 0.5) - 0.5, 0)``,
  ``i0 = floor(src)``, ``i1 = min(i0 + 1, P - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1``, and
  ``out = l0_y (l0_x m[i0y, i0x] + l1_x m[i0y, i1x]) + l1_y (l0_x m[i1y, i0x] + l1_x m[i1y, i1x])``.

The integer box is a discontinuous function of the float math, so the box expansion must match
torch op for op: the kernel rounds every intermediate to the boxes' dtype, and its inexact products are
``mul_rn`` (never fused into an FMA, whoever compiles the kernel) because torch runs each op as its own kernel
(a fused ``x_c - w_half * s`` would round once and could move a box edge by a pixel). The resize itself is
continuous in its inputs, so it only has to agree to the dtype's precision.

Kernel and its layout: ``_paste_masks_kernels``; the CPU torch path (the same resize as two batched
matmuls ``Wy M Wx^T``): ``_paste_masks_torch``.

Where we differ from torchvision, on inputs it does not handle:

* A box entirely outside the image pastes nothing (all zeros). torchvision's slicing then raises
  a size mismatch or wraps around through negative indices.
* A box whose expanded coordinates are not finite pastes nothing. Finite coordinates are clamped to
  ``+-2**61`` before the integer conversion (far beyond any size torchvision could allocate).
* ``valid[d] == False`` pastes nothing (static-shape models pad their detections).
* ``threshold`` returns ``pasted > threshold`` as ``torch.bool``, compared as torch compares: the
  pasted value rounded to the masks' dtype against the threshold rounded to it. It is a
  compile-time constant of the kernel, so each distinct threshold compiles once.
* A NaN or inf in a mask stays, on the Triton path, at the pixels whose four source values include
  it (as torchvision); the torch path's matmuls (0 * NaN) spread it over the image rows and columns
  of that mask's window.

Gradient: the paste is linear in the masks, ``out[d] = Wy[d] M[d] Wx[d]^T`` with two weights per row of
``Wy``/``Wx``, so the backward is ``Wy^T G Wx`` as two batched matmuls (torch ops, for both backends;
torchvision uses the paste after the model, so this is for completeness). None for the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._backend import triton_custom_op
from ._contract import FLOAT_DTYPES, OpValueError, check_tensor
from ._paste_masks_kernels import forward_triton
from ._paste_masks_torch import backward_torch, forward_torch

# Pixels of padding around each mask: torchvision pads by 1. The torch path builds weights over the padded
# mask, so a padding of 1e8 would ask it for gigabytes; 1024 is far beyond any use.
MAX_PADDING = 1024


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _validate(
    masks: object,
    boxes: object,
    img_shape: object,
    padding: object,
    threshold: object,
    valid: object,
) -> None:
    masks = check_tensor("masks", masks, ndim=4, dtypes=FLOAT_DTYPES)
    if masks.shape[1] != 1 or masks.shape[2] < 1 or masks.shape[3] < 1:
        raise OpValueError(f"masks must have shape [D, 1, M_h, M_w] with M_h, M_w >= 1, got {tuple(masks.shape)}")
    boxes = check_tensor("boxes", boxes, ndim=2, dtypes=FLOAT_DTYPES, device=masks.device)
    if boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise OpValueError(
            f"boxes must have shape [D, 4] with D = masks.shape[0] = {masks.shape[0]}, got {tuple(boxes.shape)}"
        )
    if (
        not isinstance(img_shape, Sequence)
        or len(img_shape) != 2
        or not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in img_shape)
        or any(s < 0 for s in img_shape)
    ):
        raise OpValueError(f"img_shape must be (height, width), two ints >= 0, got {img_shape!r}")
    if not isinstance(padding, int) or isinstance(padding, bool) or not 0 <= padding <= MAX_PADDING:
        raise OpValueError(f"padding must be an int in [0, {MAX_PADDING}], got {padding!r}")
    if threshold is not None and (
        not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold)
    ):
        raise OpValueError(f"threshold must be None or a finite number, got {threshold!r}")
    if valid is not None:
        valid = check_tensor("valid", valid, ndim=1, dtypes=(torch.bool,), device=masks.device)
        if valid.shape[0] != masks.shape[0]:
            raise OpValueError(
                f"valid must have shape [D] with D = masks.shape[0] = {masks.shape[0]}, got {tuple(valid.shape)}"
            )


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


# Half masks keep their dtype under autocast: the resize runs in float32 and rounds once.
@triton_custom_op("paste_masks", autocast="keep", traceable=True)
def _paste_masks_op(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
    *,
    backend: str,
) -> torch.Tensor:
    # Checked here too for direct torch.ops.mrcnn.paste_masks calls: a wrong shape would read out of bounds.
    _validate(masks, boxes, (image_height, image_width), padding, threshold, valid)
    impl = forward_triton if backend == "triton" else forward_torch
    return impl(masks, boxes, image_height, image_width, padding, threshold, valid)


@_paste_masks_op.register_fake
def _(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    dtype = masks.dtype if threshold is None else torch.bool
    return masks.new_empty((masks.shape[0], 1, image_height, image_width), dtype=dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    masks, boxes, image_height, image_width, padding, _, valid = inputs
    ctx.save_for_backward(boxes, valid)
    ctx.mask_shape = masks.shape
    ctx.mask_dtype = masks.dtype
    ctx.args = (image_height, image_width, padding)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The paste is linear in the masks: ``grad_masks[d] = Wy[d]^T @ grad[d] @ Wx[d]``. Boxes get none (the
    result is piecewise constant in them), and neither does the thresholded (bool) output."""
    boxes, valid = ctx.saved_tensors
    grad_masks = backward_torch(grad, boxes, valid, ctx.mask_shape, ctx.mask_dtype, *ctx.args)
    return grad_masks, *[None] * 6


_paste_masks_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def paste_masks_in_image(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    img_shape: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste each mask into an image-sized canvas at its box; torchvision's ``paste_masks_in_image``.

    Args:
        masks: Tensor[D, 1, M, M] (float16/bfloat16/float32/float64), mask probabilities in box frame.
        boxes: Tensor[D, 4] (x1, y1, x2, y2) in image pixels, any float dtype.
        img_shape: (H, W) of the image.
        padding: zero border added to each mask (and the box grown to match) before the resize.
        threshold: if given, return ``pasted > threshold`` as torch.bool (same pass, 1 byte a pixel).
        valid: Tensor[D] bool; masks with ``valid == False`` paste as all zeros.

    Returns:
        Tensor[D, 1, H, W] in the masks' dtype, or torch.bool with ``threshold``.

    Equal to torchvision's result (to the dtype's precision, integer box edges exactly), in one
    kernel for all masks instead of one interpolate per mask. Boxes entirely outside the image or
    with non-finite coordinates paste zeros (torchvision raises or wraps around). Differentiable in
    ``masks`` (not in ``boxes``).

    Scriptable; pass ``threshold`` and ``valid`` by keyword (TorchScript has no keyword-only arguments).
    """
    if not torch.jit.is_scripting():
        _validate(masks, boxes, img_shape, padding, threshold, valid)
        threshold = None if threshold is None else float(threshold)
    image_height, image_width = img_shape
    return torch.ops.mrcnn.paste_masks(masks, boxes, image_height, image_width, padding, threshold, valid)
