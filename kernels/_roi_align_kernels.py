"""Triton kernels of RoIAlign (single- and multi-level), forward and backward, and their launchers.

Math (torchvision's ``roi_align`` and, for ``pool_mode="max"``, mmcv's): a RoI ``(b, x1, y1, x2, y2)`` on
level ``l`` with scale ``s`` starts at ``x1*s - o`` (``o = 0.5`` when ``aligned``) and spans
``w = (x2 - x1)*s`` (at least 1 when not aligned); bin ``(i, j)`` of ``PH x PW`` (``bh = h/PH``,
``bw = w/PW``) averages (or maxes) its ``gh x gw`` bilinear samples. The samples, their count and their
weights follow the sampling rule of ``_sampling_kernels``.

The bilinear weights are separable: ``w(y, x) = wy(y) * wx(x)``. The forward and the atomic backward
use them sample by sample; the deterministic backward uses them as matrices: a tile of the feature
gradient is ``sum_k sum_(i,j) Wy_k[i, :]^T g_k[i, j] Wx_k[j, :]``, so each program owns its tile and
needs no atomics.

Layout: one program per (RoI, block of channels) covers all ``PH*PW`` bins of that RoI as a tile of
``BLOCK_P`` bins x ``BLOCK_C`` channels (a whole tile per program is the fast shape both on GPUs and under
the interpreter, which costs ~3 ms per program). ``BINS_FAST`` (an autotune choice) orders the tile
``[BLOCK_C, BLOCK_P]`` so that a warp's lanes run along bins, i.e. along a row of one channel's map, instead
of across channels, whose planes lie ``H*W`` elements apart: on an H200 the channel-fast atomic backward ran
at 0.27x torchvision's (16.3 ms against 4.3 ms, 14x14, 1024 RoIs, C=256), whose threads run along bins.
Features are read through their strides (NCHW, channels-last or permuted need no copy; channels-last makes
the channel-fast order the coalesced one, and the autotune key does not see the layout: the first layout
tuned for a shape keeps its config); the output is a contiguous ``[K, C, PH, PW]``.

Multi-level: up to five levels are passed as separate pointers/sizes/strides and the kernel picks a
RoI's level with ``tl.where`` (no copy into one buffer, and no host-side per-level gather, so the
whole pooler is one launch whose shapes never depend on the data).
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._backend import autotune_configs, tl_acc_dtype
from ._sampling_kernels import axis, is_finite, sample_coord, samples_per_bin
from ._triton_utils import loop_bound, offset64, wrap_triton

MAX_LEVELS = 5

# Sizes that change from call to call (RoI count, feature map sizes and their strides) are not
# specialised, so that a new image size does not compile a new kernel.
_VARYING = ["K"] + [f"{p}{i}" for p in ("H", "W", "sn", "sc", "sh") for i in range(MAX_LEVELS)]


def _gather_configs() -> list[triton.Config]:
    """Configs of the forward and the atomic backward. The first is the interpreter's: the largest channel
    block means the fewest programs. Channel-fast tiles (the forward measured 2.1-2.5x torchvision's speed with
    them on an H200) hold 8+ elements per thread at ~150-255 registers, under 16 warps per SM; the bins-fast
    ones with 2-8 channels keep 1-4 elements per thread for 7x7 (4-16 for 14x14), above that floor."""
    channel_fast = [(64, 4), (16, 4), (32, 4), (32, 8), (64, 8)]
    bins_fast = [(2, 4), (4, 4), (8, 4), (4, 8), (16, 8)]
    return [
        *(triton.Config({"BLOCK_C": c, "BINS_FAST": False}, num_warps=w) for c, w in channel_fast),
        *(triton.Config({"BLOCK_C": c, "BINS_FAST": True}, num_warps=w) for c, w in bins_fast),
    ]


def _tile_configs() -> list[triton.Config]:
    return [
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"TILE_H": 16, "TILE_W": 16, "BLOCK_C": 16}, num_warps=4),
        triton.Config({"TILE_H": 16, "TILE_W": 16, "BLOCK_C": 32}, num_warps=8),
    ]


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """The value of level ``lvl`` among up to five per-level arguments (pointers or scalars)."""
    v = v0
    if NUM_LEVELS > 1:
        v = tl.where(lvl == 1, v1, v)
    if NUM_LEVELS > 2:
        v = tl.where(lvl == 2, v2, v)
    if NUM_LEVELS > 3:
        v = tl.where(lvl == 3, v3, v)
    if NUM_LEVELS > 4:
        v = tl.where(lvl == 4, v4, v)
    return v


@triton.jit
def _load_roi(
    rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N, HAS_VALID: tl.constexpr, ACC: tl.constexpr
):
    """Row ``k`` of ``rois [K, 5]`` in the accumulation dtype, and whether it is usable.

    A RoI is usable when its batch index lies in ``[0, N)``, its coordinates are finite and its
    ``valid`` flag (if any) is set. An unusable RoI's values are replaced by zeros so that no later
    arithmetic (sample counts, addresses) sees a NaN or an infinity.
    """
    row = rois_ptr + offset64(k, roi_stride_k)
    b = tl.load(row).to(ACC)
    x1 = tl.load(row + roi_stride_col).to(ACC)
    y1 = tl.load(row + offset64(2, roi_stride_col)).to(ACC)
    x2 = tl.load(row + offset64(3, roi_stride_col)).to(ACC)
    y2 = tl.load(row + offset64(4, roi_stride_col)).to(ACC)
    ok = (b >= 0) & (b < N) & is_finite(x1) & is_finite(y1) & is_finite(x2) & is_finite(y2)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + offset64(k, valid_stride)) != 0)
    n = tl.where(ok, b, 0.0).to(tl.int64)
    return n, tl.where(ok, x1, 0.0), tl.where(ok, y1, 0.0), tl.where(ok, x2, 0.0), tl.where(ok, y2, 0.0), ok


@triton.jit
def _level_of(x1, y1, x2, y2, canonical_scale, canonical_level, k_min, k_max, NUM_LEVELS: tl.constexpr):
    """torchvision's LevelMapper: ``floor(k0 + log2(sqrt(area) / s0) + 1e-6)`` clamped to the levels,
    as an index from 0. A negative area has no level (torchvision's NaN level matches none)."""
    area = (x2 - x1) * (y2 - y1)
    ok = area >= 0
    # A zero area maps to the lowest level, as log2(0) = -inf does in torchvision (without the warning).
    s = tl.maximum(tl.sqrt(tl.where(ok, area, 0.0)), 1e-30)
    lvl = tl.floor(canonical_level + tl.log2(s / canonical_scale) + 1e-6)
    lvl = tl.minimum(tl.maximum(lvl, k_min), k_max) - k_min
    return lvl.to(tl.int32), ok & (lvl < NUM_LEVELS)


@triton.jit
def _geometry(x1, y1, x2, y2, ok, scale_hi, scale_lo, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
              ALIGNED: tl.constexpr, ACC: tl.constexpr):
    """Start, bin size and samples per bin of a RoI along y and x (0 samples when not ``ok``).

    The spatial scale arrives as a float32 pair ``hi + lo``: Triton passes Python floats as
    float32, and float64 inputs (gradcheck, references) need the scale to double precision.
    """
    offset = 0.5 if ALIGNED else 0.0
    if ACC == tl.float64:  # noqa: SIM300 (a constexpr dtype comparison, not a Yoda condition)
        start_x = x1 * scale_hi + x1 * scale_lo - offset
        start_y = y1 * scale_hi + y1 * scale_lo - offset
        end_x = x2 * scale_hi + x2 * scale_lo - offset
        end_y = y2 * scale_hi + y2 * scale_lo - offset
    else:
        start_x = x1 * scale_hi - offset
        start_y = y1 * scale_hi - offset
        end_x = x2 * scale_hi - offset
        end_y = y2 * scale_hi - offset
    roi_w = end_x - start_x
    roi_h = end_y - start_y
    # Finite coordinates that overflow once scaled (3e38 * 4 in float32, or spatial_scale 1e39 passed as
    # float32's inf) sample nothing, as non-finite ones do; their geometry becomes 0 so that no later
    # arithmetic sees an infinity.
    ok = ok & is_finite(start_x) & is_finite(start_y) & is_finite(roi_w) & is_finite(roi_h)
    start_x = tl.where(ok, start_x, 0.0)
    start_y = tl.where(ok, start_y, 0.0)
    roi_w = tl.where(ok, roi_w, 0.0)
    roi_h = tl.where(ok, roi_h, 0.0)
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = roi_w / PW
    bin_h = roi_h / PH
    grid_w = samples_per_bin(bin_w, ok, sampling_ratio)
    grid_h = samples_per_bin(bin_h, ok, sampling_ratio)
    return start_x, start_y, bin_w, bin_h, grid_w, grid_h


@triton.jit
def _axis_weights(start, bin_index, bin_size, grid, size, pix, ACC: tl.constexpr):
    """Summed weights of bin ``bin_index``'s ``grid`` samples along one axis on the pixels ``pix`` ([T] int)."""
    w = tl.zeros(pix.shape, ACC)
    for s in range(0, loop_bound(grid)):
        inside, low, high, w_low, w_high = axis(sample_coord(start, bin_index, bin_size, s, grid), size)
        w += tl.where(pix == low, tl.where(inside, w_low, 0.0), 0.0)
        w += tl.where(pix == high, tl.where(inside, w_high, 0.0), 0.0)
    return w


@triton.jit
def _sample_weights(y, x, H, W):
    """Corner indices and bilinear weights of samples ``(y, x)``; weights are 0 outside the map."""
    in_y, y_lo, y_hi, hy, ly = axis(y, H)
    in_x, x_lo, x_hi, hx, lx = axis(x, W)
    inside = in_y & in_x
    w1 = tl.where(inside, hy * hx, 0.0)
    w2 = tl.where(inside, hy * lx, 0.0)
    w3 = tl.where(inside, ly * hx, 0.0)
    w4 = tl.where(inside, ly * lx, 0.0)
    return inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4


@triton.jit
def _along_bins(v, BINS_FAST: tl.constexpr):
    """A ``[BLOCK_P]`` vector as a column of the tile: ``[1, BLOCK_P]`` when bins run fastest, else ``[BLOCK_P, 1]``."""
    if BINS_FAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _along_channels(v, BINS_FAST: tl.constexpr):
    """A ``[BLOCK_C]`` vector as a row of the tile (see ``_along_bins``)."""
    if BINS_FAST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _full_tile(value: tl.constexpr, dtype: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
               BINS_FAST: tl.constexpr):  # fmt: skip
    """A tile of ``value``, shaped as ``_along_bins`` orders it."""
    if BINS_FAST:
        return tl.full((BLOCK_C, BLOCK_P), value, dtype)
    else:
        return tl.full((BLOCK_P, BLOCK_C), value, dtype)


@triton.jit
def _roi_prologue(rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N,
                  H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
                  scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4,
                  scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
                  sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
                  PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr,
                  HAS_VALID: tl.constexpr, ACC: tl.constexpr):
    """Everything a program needs to know about RoI ``k``: image, level, map size, geometry."""
    n, x1, y1, x2, y2, ok = _load_roi(
        rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N, HAS_VALID, ACC
    )
    lvl = tl.full((), 0, tl.int32)
    if NUM_LEVELS > 1:
        lvl, lvl_ok = _level_of(x1, y1, x2, y2, canonical_scale, canonical_level, k_min, k_max, NUM_LEVELS)
        ok = ok & lvl_ok
    H = _pick(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = _pick(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    scale_hi = _pick(lvl, scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, NUM_LEVELS)
    scale_lo = _pick(lvl, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4, NUM_LEVELS)
    start_x, start_y, bin_w, bin_h, grid_w, grid_h = _geometry(
        x1, y1, x2, y2, ok, scale_hi, scale_lo, sampling_ratio, PH, PW, ALIGNED, ACC
    )
    return n, lvl, ok, H, W, start_x, start_y, bin_w, bin_h, grid_w, grid_h


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=autotune_configs(_gather_configs()), key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"])
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_fwd_kernel(
    # pointers
    out_ptr, argmax_ptr, rois_ptr, valid_ptr,
    f0, f1, f2, f3, f4,
    # sizes
    K, N, C,
    H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
    # strides
    roi_stride_k, roi_stride_col, valid_stride,
    sn0, sn1, sn2, sn3, sn4, sc0, sc1, sc2, sc3, sc4, sh0, sh1, sh2, sh3, sh4, sw0, sw1, sw2, sw3, sw4,
    # parameters
    scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BINS_FAST: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):
    """RoIAlign forward; grid ``(K, cdiv(C, BLOCK_C))``; a program's tile is ``BLOCK_P`` bins x ``BLOCK_C``
    channels, ordered by ``BINS_FAST`` (module docstring).

    out_ptr:    [K, C, PH, PW] contiguous, the features' dtype.
    argmax_ptr: [K, C, PH, PW] int32 contiguous (MAX_MODE): index ``iy*grid_w + ix`` of the winning
                sample, -1 for a bin without samples. Unused otherwise.
    rois_ptr:   [K, 5] rows (batch index, x1, y1, x2, y2), strides (roi_stride_k, roi_stride_col).
    valid_ptr:  [K] bool (HAS_VALID); a False RoI gives zeros.
    f0..f4:     level feature maps [N, C, H_l, W_l] with strides (sn_l, sc_l, sh_l, sw_l).
    """
    k = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n, lvl, ok, H, W, start_x, start_y, bin_w, bin_h, grid_w, grid_h = _roi_prologue(
        rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
        sampling_ratio, canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED, HAS_VALID, ACC,
    )
    feat = _pick(lvl, f0, f1, f2, f3, f4, NUM_LEVELS)
    s_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    s_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    s_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    s_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)

    offs_p = tl.arange(0, BLOCK_P)
    bin_y = (offs_p // PW).to(ACC)
    bin_x = (offs_p % PW).to(ACC)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tile_mask = _along_bins(offs_p < PH * PW, BINS_FAST) & _along_channels(offs_c < C, BINS_FAST)
    base = feat + n * s_n + _along_channels(offset64(offs_c, s_c), BINS_FAST)

    if MAX_MODE:
        acc = _full_tile(float("-inf"), ACC, BLOCK_P, BLOCK_C, BINS_FAST)
        arg = _full_tile(-1, tl.int32, BLOCK_P, BLOCK_C, BINS_FAST)
    else:
        acc = _full_tile(0.0, ACC, BLOCK_P, BLOCK_C, BINS_FAST)
    for iy in range(0, loop_bound(grid_h)):
        y = sample_coord(start_y, bin_y, bin_h, iy, grid_h)
        for ix in range(0, loop_bound(grid_w)):
            x = sample_coord(start_x, bin_x, bin_w, ix, grid_w)
            inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
            m = tile_mask & _along_bins(inside, BINS_FAST)
            row_lo = base + _along_bins(offset64(y_lo, s_h), BINS_FAST)
            row_hi = base + _along_bins(offset64(y_hi, s_h), BINS_FAST)
            col_lo = _along_bins(offset64(x_lo, s_w), BINS_FAST)
            col_hi = _along_bins(offset64(x_hi, s_w), BINS_FAST)
            v1 = tl.load(row_lo + col_lo, mask=m, other=0.0).to(ACC)
            v2 = tl.load(row_lo + col_hi, mask=m, other=0.0).to(ACC)
            v3 = tl.load(row_hi + col_lo, mask=m, other=0.0).to(ACC)
            v4 = tl.load(row_hi + col_hi, mask=m, other=0.0).to(ACC)
            val = (_along_bins(w1, BINS_FAST) * v1 + _along_bins(w2, BINS_FAST) * v2
                   + _along_bins(w3, BINS_FAST) * v3 + _along_bins(w4, BINS_FAST) * v4)  # fmt: skip
            if MAX_MODE:
                # Strict '>' keeps the first maximum; a NaN wins once and stays (torch.max propagates NaN).
                better = (val > acc) | ((val != val) & (acc == acc))
                acc = tl.where(better, val, acc)
                arg = tl.where(better, iy * grid_w + ix, arg)
            else:
                acc += val
    if MAX_MODE:
        acc = tl.where(arg >= 0, acc, 0.0)
    else:
        acc = acc / tl.maximum(grid_h * grid_w, 1)

    out_offs = _along_channels((k * C + offs_c.to(tl.int64)) * (PH * PW), BINS_FAST) + _along_bins(offs_p, BINS_FAST)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if MAX_MODE:
        tl.store(argmax_ptr + out_offs, arg, mask=tile_mask)


@triton.autotune(
    configs=autotune_configs(_gather_configs()),
    key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"],
    reset_to_zero=["g0", "g1", "g2", "g3", "g4"],
)
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_bwd_kernel(
    # pointers
    g0, g1, g2, g3, g4, grad_ptr, argmax_ptr, rois_ptr, valid_ptr,
    # sizes
    K, N, C,
    H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
    # strides
    grad_stride_k, grad_stride_c, grad_stride_h, grad_stride_w, roi_stride_k, roi_stride_col, valid_stride,
    sn0, sn1, sn2, sn3, sn4, sc0, sc1, sc2, sc3, sc4, sh0, sh1, sh2, sh3, sh4, sw0, sw1, sw2, sw3, sw4,
    # parameters
    scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BINS_FAST: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):
    """RoIAlign backward with atomic adds; grid ``(K, cdiv(C, BLOCK_C))``; tiles as in the forward.

    g0..g4:     zero-filled level gradients [N, C, H_l, W_l] (float32 for half features), strides
                (sn_l, sc_l, sh_l, sw_l).
    grad_ptr:   [K, C, PH, PW] output gradient, any strides.
    argmax_ptr: [K, C, PH, PW] int32 contiguous from the forward (MAX_MODE).
    rois_ptr, valid_ptr: as in the forward.
    """
    k = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n, lvl, ok, H, W, start_x, start_y, bin_w, bin_h, grid_w, grid_h = _roi_prologue(
        rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
        sampling_ratio, canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED, HAS_VALID, ACC,
    )
    gin = _pick(lvl, g0, g1, g2, g3, g4, NUM_LEVELS)
    s_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    s_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    s_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    s_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)

    offs_p = tl.arange(0, BLOCK_P)
    bin_y = (offs_p // PW).to(ACC)
    bin_x = (offs_p % PW).to(ACC)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Unusable RoIs mask every channel. (A scalar comparison is never broadcast into a block: Triton's
    # interpreter (3.8) types its result as the operands' dtype and splats it as floats.)
    tile_mask = _along_bins(offs_p < PH * PW, BINS_FAST) & _along_channels(offs_c < tl.where(ok, C, 0), BINS_FAST)
    grad_offs = (
        k * grad_stride_k
        + _along_channels(offset64(offs_c, grad_stride_c), BINS_FAST)
        + _along_bins(offset64(offs_p // PW, grad_stride_h) + offset64(offs_p % PW, grad_stride_w), BINS_FAST)
    )
    g = tl.load(grad_ptr + grad_offs, mask=tile_mask, other=0.0).to(ACC)
    base = gin + n * s_n + _along_channels(offset64(offs_c, s_c), BINS_FAST)
    ty = gin.dtype.element_ty

    if MAX_MODE:
        out_offs = (_along_channels((k * C + offs_c.to(tl.int64)) * (PH * PW), BINS_FAST)
                    + _along_bins(offs_p, BINS_FAST))  # fmt: skip
        arg = tl.load(argmax_ptr + out_offs, mask=tile_mask, other=-1)
        # A bin without samples has arg -1 and is masked; max(grid, 1) keeps its arithmetic finite.
        iy = arg // tl.maximum(grid_w, 1)
        ix = arg % tl.maximum(grid_w, 1)
        y = sample_coord(start_y, _along_bins(bin_y, BINS_FAST), bin_h, iy, tl.maximum(grid_h, 1))
        x = sample_coord(start_x, _along_bins(bin_x, BINS_FAST), bin_w, ix, tl.maximum(grid_w, 1))
        inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
        m = tile_mask & inside & (arg >= 0)
        row_lo = base + offset64(y_lo, s_h)
        row_hi = base + offset64(y_hi, s_h)
        tl.atomic_add(row_lo + offset64(x_lo, s_w), (g * w1).to(ty), mask=m)
        tl.atomic_add(row_lo + offset64(x_hi, s_w), (g * w2).to(ty), mask=m)
        tl.atomic_add(row_hi + offset64(x_lo, s_w), (g * w3).to(ty), mask=m)
        tl.atomic_add(row_hi + offset64(x_hi, s_w), (g * w4).to(ty), mask=m)
    else:
        g = g / tl.maximum(grid_h * grid_w, 1)
        for iy in range(0, loop_bound(grid_h)):
            y = sample_coord(start_y, bin_y, bin_h, iy, grid_h)
            for ix in range(0, loop_bound(grid_w)):
                x = sample_coord(start_x, bin_x, bin_w, ix, grid_w)
                inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
                m = tile_mask & _along_bins(inside, BINS_FAST)
                row_lo = base + _along_bins(offset64(y_lo, s_h), BINS_FAST)
                row_hi = base + _along_bins(offset64(y_hi, s_h), BINS_FAST)
                col_lo = _along_bins(offset64(x_lo, s_w), BINS_FAST)
                col_hi = _along_bins(offset64(x_hi, s_w), BINS_FAST)
                tl.atomic_add(row_lo + col_lo, (g * _along_bins(w1, BINS_FAST)).to(ty), mask=m)
                tl.atomic_add(row_lo + col_hi, (g * _along_bins(w2, BINS_FAST)).to(ty), mask=m)
                tl.atomic_add(row_hi + col_lo, (g * _along_bins(w3, BINS_FAST)).to(ty), mask=m)
                tl.atomic_add(row_hi + col_hi, (g * _along_bins(w4, BINS_FAST)).to(ty), mask=m)


@triton.jit
def _advance_level(lvl, rem, tiles, nxt):
    """Move a flat tile index past level ``nxt - 1`` when it lies beyond that level's ``tiles``."""
    step = (lvl == nxt - 1) & (rem >= tiles)
    return tl.where(step, nxt, lvl), tl.where(step, rem - tiles, rem)


@triton.autotune(configs=autotune_configs(_tile_configs()), key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"])
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_bwd_tiles_kernel(
    # pointers
    g0, g1, g2, g3, g4, grad_ptr, argmax_ptr, rois_ptr, valid_ptr,
    # sizes
    K, N, C,
    H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
    # strides
    grad_stride_k, grad_stride_c, grad_stride_h, grad_stride_w, roi_stride_k, roi_stride_col, valid_stride,
    sn0, sn1, sn2, sn3, sn4, sc0, sc1, sc2, sc3, sc4, sh0, sh1, sh2, sh3, sh4, sw0, sw1, sw2, sw3, sw4,
    # parameters
    scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3, scale_lo4,
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):
    """Deterministic RoIAlign backward: each program owns a ``TILE_H x TILE_W x BLOCK_C`` tile of one
    level's feature gradient and sums the contributions of every RoI in a fixed order (RoI index,
    then bin), so no float atomics are needed and every run gives the same bits. Every tile is
    written, zeros included, so the gradients need no zero-fill.

    Grid ``(sum_l N*cdiv(H_l, TILE_H)*cdiv(W_l, TILE_W), cdiv(C, BLOCK_C))``. Each program reads all K
    RoI rows (20 bytes each) and skips those whose samples cannot reach its tile; a RoI that reaches
    the tile costs ``PH*PW`` outer products of ``TILE_H x TILE_W x BLOCK_C``.

    g0..g4: level gradients [N, C, H_l, W_l] in the features' dtype, strides (sn_l, sc_l, sh_l, sw_l).
    Other pointers as in ``_roi_align_bwd_kernel``.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    lvl = pid * 0
    rem = pid
    if NUM_LEVELS > 1:
        lvl, rem = _advance_level(lvl, rem, N * tl.cdiv(H0, TILE_H) * tl.cdiv(W0, TILE_W), 1)
    if NUM_LEVELS > 2:
        lvl, rem = _advance_level(lvl, rem, N * tl.cdiv(H1, TILE_H) * tl.cdiv(W1, TILE_W), 2)
    if NUM_LEVELS > 3:
        lvl, rem = _advance_level(lvl, rem, N * tl.cdiv(H2, TILE_H) * tl.cdiv(W2, TILE_W), 3)
    if NUM_LEVELS > 4:
        lvl, rem = _advance_level(lvl, rem, N * tl.cdiv(H3, TILE_H) * tl.cdiv(W3, TILE_W), 4)
    H = _pick(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = _pick(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    tiles_x = tl.cdiv(W, TILE_W)
    tiles_img = tl.cdiv(H, TILE_H) * tiles_x
    img = rem // tiles_img
    y0 = (rem % tiles_img) // tiles_x * TILE_H
    x0 = (rem % tiles_img) % tiles_x * TILE_W
    pix_y = y0 + tl.arange(0, TILE_H)
    pix_x = x0 + tl.arange(0, TILE_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    acc = tl.zeros((TILE_H, TILE_W, BLOCK_C), ACC)
    for k in range(0, loop_bound(K)):
        n, roi_lvl, ok, _, _, start_x, start_y, bin_w, bin_h, grid_w, grid_h = _roi_prologue(
            rois_ptr, roi_stride_k, roi_stride_col, valid_ptr, valid_stride, k, N,
            H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
            scale_hi0, scale_hi1, scale_hi2, scale_hi3, scale_hi4, scale_lo0, scale_lo1, scale_lo2, scale_lo3,
            scale_lo4, sampling_ratio, canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED,
            HAS_VALID, ACC,
        )
        # Pixels the RoI's samples can touch: from floor(start) to floor(end) + 1, clamped to the map
        # (an aligned box with a fixed sampling ratio may run backwards: end < start).
        end_y = start_y + bin_h * PH
        end_x = start_x + bin_w * PW
        lo_y = tl.minimum(tl.maximum(tl.floor(tl.minimum(start_y, end_y)), 0.0), H - 1)
        hi_y = tl.minimum(tl.maximum(tl.floor(tl.maximum(start_y, end_y)) + 1.0, 0.0), H - 1)
        lo_x = tl.minimum(tl.maximum(tl.floor(tl.minimum(start_x, end_x)), 0.0), W - 1)
        hi_x = tl.minimum(tl.maximum(tl.floor(tl.maximum(start_x, end_x)) + 1.0, 0.0), W - 1)
        hit = ok & (n == img) & (roi_lvl == lvl) & (grid_h > 0) & (grid_w > 0)
        hit = hit & (hi_y >= y0) & (lo_y < y0 + TILE_H) & (hi_x >= x0) & (lo_x < x0 + TILE_W)
        if hit:
            grad_k = grad_ptr + offset64(k, grad_stride_k) + offset64(offs_c, grad_stride_c)
            for i in range(0, PH):
                if not MAX_MODE:
                    wy = _axis_weights(start_y, i, bin_h, grid_h, H, pix_y, ACC)
                for j in range(0, PW):
                    g_ptr = grad_k + offset64(i, grad_stride_h) + offset64(j, grad_stride_w)
                    g = tl.load(g_ptr, mask=c_mask, other=0.0).to(ACC)
                    if MAX_MODE:
                        arg_offs = ((offset64(k, C) + offs_c) * PH + i) * PW + j
                        arg = tl.load(argmax_ptr + arg_offs, mask=c_mask, other=-1)
                        iy = arg // grid_w
                        ix = arg % grid_w
                        y = sample_coord(start_y, i, bin_h, iy, grid_h)
                        x = sample_coord(start_x, j, bin_w, ix, grid_w)
                        in_y, y_lo, y_hi, hy, ly = axis(y, H)
                        in_x, x_lo, x_hi, hx, lx = axis(x, W)
                        g = tl.where(in_y & in_x & (arg >= 0), g, 0.0)
                        wyc = tl.where(pix_y[:, None] == y_lo[None, :], hy[None, :], 0.0)
                        wyc += tl.where(pix_y[:, None] == y_hi[None, :], ly[None, :], 0.0)
                        wxc = tl.where(pix_x[:, None] == x_lo[None, :], hx[None, :], 0.0)
                        wxc += tl.where(pix_x[:, None] == x_hi[None, :], lx[None, :], 0.0)
                        acc += wyc[:, None, :] * wxc[None, :, :] * g[None, None, :]
                    else:
                        wx = _axis_weights(start_x, j, bin_w, grid_w, W, pix_x, ACC)
                        g = g / (grid_h * grid_w)
                        acc += wy[:, None, None] * wx[None, :, None] * g[None, None, :]

    gin = _pick(lvl, g0, g1, g2, g3, g4, NUM_LEVELS)
    s_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
    s_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
    s_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
    s_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)
    offs = (
        offset64(img, s_n)
        + offset64(pix_y, s_h)[:, None, None]
        + offset64(pix_x, s_w)[None, :, None]
        + offset64(offs_c, s_c)[None, None, :]
    )
    mask = (pix_y < H)[:, None, None] & (pix_x < W)[None, :, None] & c_mask[None, None, :]
    tl.store(gin + offs, acc.to(gin.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (``struct``'s C cast), without creating a tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=64)
def _split_scale(scale: float) -> tuple[float, float]:
    """``scale`` as float32 ``hi + lo`` (see ``_geometry``), computed once per scale."""
    hi = _float32(scale)
    return hi, _float32(scale - hi)


def _padded(values: list, fill: object) -> list:
    return list(values) + [fill] * (MAX_LEVELS - len(values))


def _level_args(tensors: list[torch.Tensor], scales: list[float]) -> list:
    """Per-level sizes, strides and scales, padded to ``MAX_LEVELS``, in the kernels' argument order."""
    sizes = [(t.shape[2], t.shape[3]) for t in tensors]
    strides = [t.stride() for t in tensors]
    hi_lo = [_split_scale(s) for s in scales]
    args = _padded([h for h, _ in sizes], sizes[0][0]) + _padded([w for _, w in sizes], sizes[0][1])
    stride_args = []
    for d in range(4):
        stride_args += _padded([s[d] for s in strides], strides[0][d])
    scale_args = _padded([h for h, _ in hi_lo], hi_lo[0][0]) + _padded([lo for _, lo in hi_lo], hi_lo[0][1])
    return args, stride_args, scale_args


def level_range(scales: list[float]) -> tuple[int, int]:
    """``(k_min, k_max)`` of torchvision's LevelMapper for per-level scales (finest first)."""
    return int(-math.log2(scales[0])), int(-math.log2(scales[-1]))


def forward_triton(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_mode: bool,
    canonical: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(out [K, C, PH, PW], argmax [K, C, PH, PW] int32 or [0])``."""
    f = features[0]
    N, C = f.shape[0], f.shape[1]
    K = rois.shape[0]
    PH, PW = pooled
    out = torch.empty((K, C, PH, PW), dtype=f.dtype, device=f.device)
    argmax = torch.empty((K, C, PH, PW) if max_mode else (0,), dtype=torch.int32, device=f.device)
    if out.numel() == 0:
        return out, argmax
    sizes, strides, scale_args = _level_args(features, scales)
    k_min, k_max = level_range(scales)
    ptrs = _padded(features, f)
    grid = lambda meta: (K, triton.cdiv(C, meta["BLOCK_C"]))
    wrap_triton(_roi_align_fwd_kernel)[grid](
        out, argmax, rois, valid if valid is not None else rois, *ptrs,
        K, N, C, *sizes, rois.stride(0), rois.stride(1), valid.stride(0) if valid is not None else 0,
        *strides, *scale_args, sampling_ratio, float(canonical[0]), float(canonical[1]), float(k_min), float(k_max),
        PH=PH, PW=PW, BLOCK_P=triton.next_power_of_2(PH * PW), NUM_LEVELS=len(features), ALIGNED=aligned,
        MAX_MODE=max_mode, HAS_VALID=valid is not None, ACC=tl_acc_dtype(f.dtype),
    )  # fmt: skip
    return out, argmax


def backward_triton(
    grad: torch.Tensor,
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    argmax: torch.Tensor,
    level_shapes: list[tuple[int, int]],
    batch_size: int,
    channels_last: bool,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_mode: bool,
    canonical: tuple[float, float],
    deterministic: bool,
) -> list[torch.Tensor]:
    """Launch a backward kernel; returns one gradient per level, in ``grad``'s dtype.

    ``deterministic`` picks the tile kernel (no atomics, bitwise reproducible); otherwise float
    atomics into zero-filled buffers (float32 for half dtypes, so that rounding happens once).
    """
    N, K, C = batch_size, rois.shape[0], grad.shape[1]
    PH, PW = pooled
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf_dtype = grad.dtype if deterministic or grad.dtype in (torch.float32, torch.float64) else torch.float32
    grads = [torch.empty((N, C, h, w), dtype=buf_dtype, device=grad.device, memory_format=fmt) for h, w in level_shapes]
    if not deterministic or K == 0 or C == 0 or N == 0:
        for g in grads:
            g.zero_()
    if K == 0 or C == 0 or N == 0:
        return [g.to(grad.dtype) for g in grads]
    sizes, strides, scale_args = _level_args(grads, scales)
    k_min, k_max = level_range(scales)
    args = (
        *_padded(grads, grads[0]), grad, argmax, rois, valid if valid is not None else rois,
        K, N, C, *sizes, *grad.stride(), rois.stride(0), rois.stride(1),
        valid.stride(0) if valid is not None else 0, *strides, *scale_args,
        sampling_ratio, float(canonical[0]), float(canonical[1]), float(k_min), float(k_max),
    )  # fmt: skip
    meta = dict(
        PH=PH, PW=PW, NUM_LEVELS=len(level_shapes), ALIGNED=aligned, MAX_MODE=max_mode,
        HAS_VALID=valid is not None, ACC=tl_acc_dtype(grad.dtype),
    )  # fmt: skip
    if deterministic:
        grid = lambda m: (
            sum(N * triton.cdiv(h, m["TILE_H"]) * triton.cdiv(w, m["TILE_W"]) for h, w in level_shapes),
            triton.cdiv(C, m["BLOCK_C"]),
        )
        wrap_triton(_roi_align_bwd_tiles_kernel)[grid](*args, **meta)
    else:
        grid = lambda m: (K, triton.cdiv(C, m["BLOCK_C"]))
        wrap_triton(_roi_align_bwd_kernel)[grid](*args, BLOCK_P=triton.next_power_of_2(PH * PW), **meta)
    return [g.to(grad.dtype) for g in grads]
