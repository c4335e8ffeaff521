"""Triton kernel of ``paste_masks_in_image`` and its launcher. The math (torchvision's, rounding steps included)
and the results on inputs torchvision does not handle are in ``kernels/paste_masks.py``'s docstring; the launcher
takes inputs that it has validated.

Layout: one program per (mask, ``BLOCK_H x BLOCK_W`` tile of the whole image). Every output pixel is
written exactly once (zeros outside the box window included), so there is no separate memset, no
per-mask temporary and no stack; a tile that misses the window (most of them) only stores zeros.
The padding is never materialised: a padded index outside the mask reads as 0 through the load mask.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._contract import COORD_LIMIT
from ._sampling_kernels import is_finite
from ._triton_utils import autotune_configs, cast_rn, mul_rn, offset64, round_to, tl_acc_dtype, wrap_triton

_TL_COORD_LIMIT = tl.constexpr(COORD_LIMIT)

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
    w_half = round_to(mul_rn(w_half, scale), BOX_DTYPE)
    h_half = round_to(mul_rn(h_half, scale), BOX_DTYPE)
    x_c = round_to(round_to(x2 + x1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    y_c = round_to(round_to(y2 + y1, BOX_DTYPE) * 0.5, BOX_DTYPE)
    ex1 = round_to(x_c - w_half, BOX_DTYPE)
    ey1 = round_to(y_c - h_half, BOX_DTYPE)
    ex2 = round_to(x_c + w_half, BOX_DTYPE)
    ey2 = round_to(y_c + h_half, BOX_DTYPE)
    ok = is_finite(ex1) & is_finite(ey1) & is_finite(ex2) & is_finite(ey2)
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
    src = mul_rn(scale, (pix - lo).to(ACC) + 0.5) - 0.5
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
    # window all four values are 0 (masked loads; the weights there are finite), so the result is 0. No FMA:
    # the threshold's compiled variant then rounds as the soft one does, bit for bit.
    top = mul_rn(lx0[None, :], v00) + mul_rn(lx1[None, :], v01)
    bottom = mul_rn(lx0[None, :], v10) + mul_rn(lx1[None, :], v11)
    return mul_rn(ly0[:, None], top) + mul_rn(ly1[:, None], bottom)


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
        )
        val = cast_rn(val, masks_ptr.dtype.element_ty)
        if HAS_THRESHOLD:
            # THRESHOLD arrives rounded to the masks' dtype; comparing in ACC is then exact. tl.full builds
            # the constant in ACC (a bare Python float would go through float32 first).
            val = (val.to(ACC) > tl.full((), THRESHOLD, ACC)).to(tl.uint8)
    else:
        val = tl.zeros((BLOCK_H, BLOCK_W), out_ptr.dtype.element_ty)

    out_mask = (rows < image_h)[:, None] & (cols < image_w)[None, :]
    out_offs = d * out_stride_d + (rows * out_stride_h)[:, None] + (cols * out_stride_w)[None, :]
    tl.store(out_ptr + out_offs, val, mask=out_mask)


@functools.lru_cache(maxsize=64)
def _rounded(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype``, as torch rounds a Python scalar it compares with a tensor; computed
    once per pair rather than with a tensor per call."""
    return torch.tensor(threshold, dtype=dtype).item()


def forward_triton(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """The pasted masks ``[D, 1, H, W]`` (bool with ``threshold``): one launch over every (mask, tile)."""
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
    rounded_threshold = 0.0 if threshold is None else _rounded(threshold, masks.dtype)
    wrap_triton(_paste_masks_fwd_kernel)[(num_masks * num_tiles_per_mask,)](
        out_k, masks, boxes, valid_k,
        num_tiles_per_mask, num_tiles_w, image_height, image_width, mask_h, mask_w, padding,
        out_k.stride(0), out_k.stride(2), out_k.stride(3),
        masks.stride(0), masks.stride(2), masks.stride(3),
        boxes.stride(0), boxes.stride(1), 0 if valid is None else valid.stride(0),
        BLOCK_H=block_h, BLOCK_W=block_w, HAS_VALID=valid is not None,
        HAS_THRESHOLD=threshold is not None, THRESHOLD=rounded_threshold,
        ACC=tl_acc_dtype(masks.dtype), BOX_ACC=tl_acc_dtype(boxes.dtype),
    )  # fmt: skip
    return out
