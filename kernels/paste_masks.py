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
torch op for op: the kernel rounds every intermediate to the boxes' dtype, and it is compiled with
``enable_fp_fusion=False`` because torch runs each op as its own kernel (a fused ``x_c - w_half * s``
would round once and could move a box edge by a pixel). The resize itself is continuous in its
inputs, so it only has to agree to the dtype's precision.

Layout: one program per (mask, ``BLOCK_H x BLOCK_W`` tile of the whole image). Every output pixel is
written exactly once (zeros outside the box window included), so there is no separate memset, no
per-mask temporary and no stack; a tile that misses the window (most of them) only stores zeros.
The padding is never materialised: a padded index outside the mask reads as 0 through the load mask.
The CPU path (``_paste_masks_torch``) is the same resize as two batched matmuls ``Wy M Wx^T`` with
two nonzero weights per row.

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
import triton
import triton.language as tl

from ._backend import (
    FLOAT_DTYPES,
    OpValueError,
    acc_dtype,
    autotune_configs,
    backend_for,
    check_tensor,
    register_autocast,
    tl_acc_dtype,
)
from ._triton_utils import offset64, round_to

# Box coordinates are clamped to this before the float -> int64 conversion, which is undefined
# out of range; box sizes (``X2 - X1 + 1``) then still fit in int64.
_COORD_LIMIT = 2.0**61
_TL_COORD_LIMIT = tl.constexpr(_COORD_LIMIT)

# Pixels of padding around each mask: torchvision pads by 1. The torch path builds weights over the padded
# mask, so a padding of 1e8 would ask it for gigabytes; 1024 is far beyond any use.
MAX_PADDING = 1024

# Pixels per program, chosen by the launcher from the image size (the autotuner picks the warps). Under
# the interpreter (~3 ms per program) a large tile keeps the test grids small; COCO images get 32 x 128.
_TILE_PIXELS = 4096
_MAX_BLOCK_W = 128


def _paste_configs() -> list[triton.Config]:
    """Warps per tile; every config writes every output pixel, so the autotuner's repeated runs need no reset.
    The first is the launch the H200 measured (122x torchvision's paste) and the interpreter's: 8 warps, 16
    pixels per thread at 147-156 registers on sm_90, 8 resident warps per SM. 16 and 32 warps hold 8 and 4
    pixels per thread at 80-82 and 52-61 registers, no spills (16 and 32 warps per SM)."""
    return [triton.Config({}, num_warps=w) for w in (8, 16, 32)]


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expanded_box(boxes_ptr, boxes_stride_d, boxes_stride_c, d, mask_w, padding,
                  BOX_DTYPE: tl.constexpr, BOX_ACC: tl.constexpr):
    """The integer box ``(X1, Y1, X2, Y2)`` of mask ``d`` after expand_boxes, and whether it is finite."""
    row = boxes_ptr + d * boxes_stride_d
    x1 = tl.load(row).to(BOX_ACC)
    y1 = tl.load(row + boxes_stride_c).to(BOX_ACC)
    x2 = tl.load(row + offset64(2, boxes_stride_c)).to(BOX_ACC)
    y2 = tl.load(row + offset64(3, boxes_stride_c)).to(BOX_ACC)
    # Python's float(M + 2p) / M, then torch's conversion of the scalar to the op's math dtype.
    scale = ((mask_w + 2 * padding).to(tl.float64) / mask_w.to(tl.float64)).to(BOX_ACC)
    # torch stores every intermediate of expand_boxes in the boxes' dtype: each is rounded to it.
    w_half = round_to(round_to(x2 - x1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    h_half = round_to(round_to(y2 - y1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    w_half = round_to(w_half * scale, BOX_DTYPE)
    h_half = round_to(h_half * scale, BOX_DTYPE)
    x_c = round_to(round_to(x2 + x1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    y_c = round_to(round_to(y2 + y1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    ex1 = round_to(x_c - w_half, BOX_DTYPE)
    ey1 = round_to(y_c - h_half, BOX_DTYPE)
    ex2 = round_to(x_c + w_half, BOX_DTYPE)
    ey2 = round_to(y_c + h_half, BOX_DTYPE)
    # x - x == 0 is False for NaN and +-inf.
    ok = (ex1 - ex1 == 0) & (ey1 - ey1 == 0) & (ex2 - ex2 == 0) & (ey2 - ey2 == 0)
    ex1 = tl.where(ok, tl.minimum(tl.maximum(ex1, -_TL_COORD_LIMIT), _TL_COORD_LIMIT), 0.0)
    ey1 = tl.where(ok, tl.minimum(tl.maximum(ey1, -_TL_COORD_LIMIT), _TL_COORD_LIMIT), 0.0)
    ex2 = tl.where(ok, tl.minimum(tl.maximum(ex2, -_TL_COORD_LIMIT), _TL_COORD_LIMIT), 0.0)
    ey2 = tl.where(ok, tl.minimum(tl.maximum(ey2, -_TL_COORD_LIMIT), _TL_COORD_LIMIT), 0.0)
    # float -> int truncates toward zero, as Tensor.to(torch.int64).
    return ex1.to(tl.int64), ey1.to(tl.int64), ex2.to(tl.int64), ey2.to(tl.int64), ok


@triton.jit
def _axis(pix, lo, hi, image_size, mask_size, padding, ACC: tl.constexpr):
    """One axis of the paste for image pixels ``pix`` ([B] int64) and the integer box ``[lo, hi]``.

    Returns whether each pixel is inside the pasted window, the two source indices in the
    unpadded mask (clamped into it so that even an unmasked address is in bounds) with whether each
    lies inside the mask (else it is padding, i.e. 0), and the two bilinear weights.
    """
    padded = mask_size + 2 * padding
    inside = (pix >= lo) & (pix <= hi) & (pix < image_size)
    out_size = tl.maximum(hi - lo + 1, 1)
    # ATen's float(P) / h in the math dtype: the float64 quotient rounded once more is the correctly
    # rounded float32 quotient (53 >= 2 * 24 + 2), and Triton's float32 '/' is not correctly rounded.
    scale = (padded.to(tl.float64) / out_size.to(tl.float64)).to(ACC)
    src = scale * ((pix - lo).to(ACC) + 0.5) - 0.5
    # Outside the window src is meaningless (and may be huge): pin it to 0 before any int conversion.
    src = tl.where(inside, tl.maximum(src, 0.0), 0.0)
    i0 = tl.minimum(src.to(tl.int64), padded - 1)
    i1 = tl.where(i0 < padded - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    l0 = 1.0 - l1
    m0 = i0 - padding
    m1 = i1 - padding
    in0 = (m0 >= 0) & (m0 < mask_size)
    in1 = (m1 >= 0) & (m1 < mask_size)
    m0 = tl.minimum(tl.maximum(m0, 0), mask_size - 1)
    m1 = tl.minimum(tl.maximum(m1, 0), mask_size - 1)
    return inside, m0, in0, m1, in1, l0, l1


@triton.jit
def _resize_tile(mask_ptr, mask_stride_h, mask_stride_w, rows, cols, X1, Y1, X2, Y2,
                 image_h, image_w, mask_h, mask_w, padding, ACC: tl.constexpr):
    """The pasted values (in ACC) of one mask ``[mask_h, mask_w]`` at image pixels ``rows x cols``; 0
    outside the window ``[Y1, Y2] x [X1, X2]``, where every load is masked off."""
    row_in, y0, y0_in, y1, y1_in, ly0, ly1 = _axis(rows, Y1, Y2, image_h, mask_h, padding, ACC)
    col_in, x0, x0_in, x1, x1_in, lx0, lx1 = _axis(cols, X1, X2, image_w, mask_w, padding, ACC)
    window = row_in[:, None] & col_in[None, :]
    row0 = mask_ptr + (y0 * mask_stride_h)[:, None]
    row1 = mask_ptr + (y1 * mask_stride_h)[:, None]
    col0 = (x0 * mask_stride_w)[None, :]
    col1 = (x1 * mask_stride_w)[None, :]
    v00 = tl.load(row0 + col0, mask=window & y0_in[:, None] & x0_in[None, :], other=0.0).to(ACC)
    v01 = tl.load(row0 + col1, mask=window & y0_in[:, None] & x1_in[None, :], other=0.0).to(ACC)
    v10 = tl.load(row1 + col0, mask=window & y1_in[:, None] & x0_in[None, :], other=0.0).to(ACC)
    v11 = tl.load(row1 + col1, mask=window & y1_in[:, None] & x1_in[None, :], other=0.0).to(ACC)
    # ATen's order: interpolate along x within each source row, then between the two rows. Outside the
    # window all four values are 0 (masked loads; the weights there are finite), so the result is 0.
    top = lx0[None, :] * v00 + lx1[None, :] * v01
    bottom = lx0[None, :] * v10 + lx1[None, :] * v11
    return ly0[:, None] * top + ly1[:, None] * bottom


# The key is the launcher's tile (powers of two up to 32 x 128, from the image size), never the mask count.
@triton.autotune(configs=autotune_configs(_paste_configs()), key=["BLOCK_H", "BLOCK_W"])
@triton.jit(do_not_specialize=["num_tiles_per_mask", "mask_h", "mask_w", "padding"])
def _paste_masks_fwd_kernel(
    # pointers
    out_ptr, masks_ptr, boxes_ptr, valid_ptr,
    # sizes
    num_tiles_per_mask, num_tiles_w, image_h, image_w, mask_h, mask_w, padding,
    # strides
    out_stride_d, out_stride_h, out_stride_w,
    masks_stride_d, masks_stride_h, masks_stride_w,
    boxes_stride_d, boxes_stride_c, valid_stride_d,
    # meta
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, THRESHOLD: tl.constexpr,
    ACC: tl.constexpr, BOX_ACC: tl.constexpr,
):
    """Paste masks; grid ``(D * num_tiles_per_mask,)``, one program per (mask, ``BLOCK_H x BLOCK_W`` image
    tile); the launcher picks the tile, the autotuner the warps.

    out_ptr:   [D, 1, image_h, image_w], strides (out_stride_d, -, out_stride_h, out_stride_w); the
               masks' dtype, or uint8 (a view of torch.bool) when HAS_THRESHOLD.
    masks_ptr: [D, 1, mask_h, mask_w], strides (masks_stride_d, -, masks_stride_h, masks_stride_w).
    boxes_ptr: [D, 4] rows (x1, y1, x2, y2), strides (boxes_stride_d, boxes_stride_c).
    valid_ptr: [D] bool, stride valid_stride_d (HAS_VALID); a False mask pastes nothing.
    """
    pid = tl.program_id(0).to(tl.int64)
    # The number of masks D is never needed: the grid is D whole masks of tiles. Consecutive
    # programs share a mask, so its few hundred values stay in cache.
    d = pid // num_tiles_per_mask
    tile = pid - d * num_tiles_per_mask
    tile_h = tile // num_tiles_w
    tile_w = tile - tile_h * num_tiles_w

    X1, Y1, X2, Y2, ok = _expanded_box(boxes_ptr, boxes_stride_d, boxes_stride_c, d, mask_w, padding,
                                       boxes_ptr.dtype.element_ty, BOX_ACC)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + d * valid_stride_d) != 0)
    # A mask that pastes nothing gets the empty window [0, -1] on both axes, which every tile misses.
    X1 = tl.where(ok, X1, 0)
    Y1 = tl.where(ok, Y1, 0)
    X2 = tl.where(ok, X2, -1)
    Y2 = tl.where(ok, Y2, -1)

    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)
    # Most tiles miss the window (a detection covers a few % of the image): they only store zeros.
    hit = (tile_h * BLOCK_H <= Y2) & ((tile_h + 1) * BLOCK_H > Y1)
    hit = hit & (tile_w * BLOCK_W <= X2) & ((tile_w + 1) * BLOCK_W > X1)
    if hit:
        val = _resize_tile(
            masks_ptr + d * masks_stride_d, masks_stride_h, masks_stride_w, rows, cols, X1, Y1, X2, Y2,
            image_h, image_w, mask_h, mask_w, padding, ACC,
        ).to(masks_ptr.dtype.element_ty)
        if HAS_THRESHOLD:
            # THRESHOLD arrives rounded to the masks' dtype; comparing in ACC is then exact. tl.full builds
            # the constant in ACC (a bare Python float would go through float32 first).
            val = (val.to(ACC) > tl.full((), THRESHOLD, ACC)).to(tl.uint8)
    else:
        val = tl.zeros((BLOCK_H, BLOCK_W), out_ptr.dtype.element_ty)

    out_mask = (rows < image_h)[:, None] & (cols < image_w)[None, :]
    out_offs = d * out_stride_d + (rows * out_stride_h)[:, None] + (cols * out_stride_w)[None, :]
    tl.store(out_ptr + out_offs, val, mask=out_mask)


def _paste_masks_triton(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    num_masks, _, mask_h, mask_w = masks.shape
    out = torch.empty(
        (num_masks, 1, image_height, image_width),
        dtype=masks.dtype if threshold is None else torch.bool,
        device=masks.device,
    )
    if out.numel() == 0:
        return out
    block_w = min(_MAX_BLOCK_W, triton.next_power_of_2(image_width))
    block_h = min(triton.next_power_of_2(image_height), _TILE_PIXELS // block_w)
    num_tiles_w = triton.cdiv(image_width, block_w)
    num_tiles_per_mask = triton.cdiv(image_height, block_h) * num_tiles_w
    # Triton has no bool stores into torch.bool memory to rely on; the same bytes as uint8 do.
    out_k = out if threshold is None else out.view(torch.uint8)
    valid_k = boxes if valid is None else valid.view(torch.uint8)
    # torch compares a tensor with a Python scalar after rounding the scalar to the tensor's dtype.
    rounded_threshold = 0.0 if threshold is None else torch.tensor(threshold, dtype=masks.dtype, device="cpu").item()
    _paste_masks_fwd_kernel[(num_masks * num_tiles_per_mask,)](
        out_k, masks, boxes, valid_k,
        num_tiles_per_mask, num_tiles_w, image_height, image_width, mask_h, mask_w, padding,
        out_k.stride(0), out_k.stride(2), out_k.stride(3),
        masks.stride(0), masks.stride(2), masks.stride(3),
        boxes.stride(0), boxes.stride(1), 0 if valid is None else valid.stride(0),
        BLOCK_H=block_h, BLOCK_W=block_w, HAS_VALID=valid is not None,
        HAS_THRESHOLD=threshold is not None, THRESHOLD=rounded_threshold,
        ACC=tl_acc_dtype(masks.dtype), BOX_ACC=tl_acc_dtype(boxes.dtype),
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Vectorized torch implementation (CPU default)
# ----------------------------------------------------------------------------------------------


def _expand_boxes_torch(boxes: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """expand_boxes op for op in the boxes' dtype, then the int64 box ``[D, 4]`` and its finiteness ``[D]``."""
    x1, y1, x2, y2 = boxes.unbind(1)
    w_half = (x2 - x1) * 0.5 * scale
    h_half = (y2 - y1) * 0.5 * scale
    x_c = (x2 + x1) * 0.5
    y_c = (y2 + y1) * 0.5
    expanded = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    expanded = expanded.to(acc_dtype(boxes.dtype))
    ok = torch.isfinite(expanded).all(dim=1)
    expanded = torch.where(ok[:, None], expanded.clamp(-_COORD_LIMIT, _COORD_LIMIT), 0.0)
    return expanded.to(torch.int64), ok


def _axis_torch(
    lo: torch.Tensor, hi: torch.Tensor, ok: torch.Tensor, image_size: int, padded: int, dtype: torch.dtype
) -> torch.Tensor:
    """``_axis`` of the kernel for all masks at once, as resize matrices ``[D, image_size, padded]``: two
    weights per row inside the window, none outside."""
    pix = torch.arange(image_size, device=lo.device)
    lo, hi, ok = lo[:, None], hi[:, None], ok[:, None]
    inside = ok & (pix >= lo) & (pix <= hi)
    scale = (padded / (hi - lo + 1).clamp(min=1).to(torch.float64)).to(dtype)
    src = scale * ((pix - lo).to(dtype) + 0.5) - 0.5
    src = torch.where(inside, src.clamp(min=0), 0.0)
    i0 = src.to(torch.int64).clamp(max=padded - 1)
    i1 = torch.where(i0 < padded - 1, i0 + 1, i0)
    l1 = torch.where(inside, (src - i0.to(dtype)).clamp(0, 1), 0.0)
    l0 = torch.where(inside, 1 - l1, 0.0)
    weights = torch.zeros(*inside.shape, padded, dtype=dtype, device=lo.device)
    # Out of place: decomposing the op for torch.export needs a functional graph.
    return weights.scatter_add(2, i0[..., None], l0[..., None]).scatter_add(2, i1[..., None], l1[..., None])


def _resize_matrices(
    boxes: torch.Tensor,
    valid: torch.Tensor | None,
    mask_h: int,
    mask_w: int,
    image_height: int,
    image_width: int,
    padding: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paste as a linear map, ``out[d] = Wy[d] @ masks[d] @ Wx[d]^T``: ``Wy [D, H, M_h]``, ``Wx [D, W, M_w]``."""
    box, ok = _expand_boxes_torch(boxes, float(mask_w + 2 * padding) / mask_w)
    if valid is not None:
        ok = ok & valid
    wy = _axis_torch(box[:, 1], box[:, 3], ok, image_height, mask_h + 2 * padding, dtype)
    wx = _axis_torch(box[:, 0], box[:, 2], ok, image_width, mask_w + 2 * padding, dtype)
    # The padding is zeros: drop its columns instead of padding the mask.
    return wy[:, :, padding : padding + mask_h], wx[:, :, padding : padding + mask_w]


def _paste_masks_torch(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    dtype = acc_dtype(masks.dtype)
    wy, wx = _resize_matrices(boxes, valid, *masks.shape[2:], image_height, image_width, padding, dtype)
    # Two small batched matmuls: on a CPU ~20x faster than gathering four neighbours per pixel, and faster
    # than torchvision's loop. The zero weights add exact zeros, so a pixel is ATen's two-term sums up to
    # the order of additions (but a NaN or inf in a mask, times 0, spreads over the image rows and columns
    # that its mask's window touches).
    val = torch.bmm(torch.bmm(wy, masks[:, 0].to(dtype)), wx.transpose(1, 2))
    out = val.to(masks.dtype)[:, None]
    return out if threshold is None else out > threshold


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mrcnn::paste_masks", mutates_args=())
def _paste_masks_op(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    # Checked here too for direct torch.ops.mrcnn.paste_masks calls: a wrong shape would read out of bounds.
    _check_inputs(masks, boxes, (image_height, image_width), padding, threshold, valid)
    impl = _paste_masks_triton if backend_for(masks) == "triton" else _paste_masks_torch
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
    dtype = acc_dtype(ctx.mask_dtype)
    wy, wx = _resize_matrices(boxes, valid, *ctx.mask_shape[2:], *ctx.args, dtype)
    grad_masks = torch.bmm(torch.bmm(wy.transpose(1, 2), grad[:, 0].to(dtype)), wx)
    return grad_masks.to(ctx.mask_dtype)[:, None], None, None, None, None, None, None


_paste_masks_op.register_autograd(_backward, setup_context=_setup_context)
# Half masks keep their dtype under autocast: the resize runs in float32 and rounds once (see above).
register_autocast("paste_masks", upcast=False)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_inputs(
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
        _check_inputs(masks, boxes, img_shape, padding, threshold, valid)
        threshold = None if threshold is None else float(threshold)
    image_height, image_width = img_shape
    return torch.ops.mrcnn.paste_masks(masks, boxes, image_height, image_width, padding, threshold, valid)
