"""Triton kernels of RoIAlign (single- and multi-level), forward and backward, and their launchers.

Math (torchvision's ``roi_align`` and, for ``pool_mode="max"``, mmcv's): a RoI ``(b, x1, y1, x2, y2)`` on
level ``l`` with scale ``s`` starts at ``x1*s - o`` (``o = 0.5`` when ``aligned``) and spans
``w = (x2 - x1)*s`` (at least 1 when not aligned); bin ``(i, j)`` of ``PH x PW`` (``bh = h/PH``,
``bw = w/PW``) averages (or maxes) its ``gh x gw`` bilinear samples. The geometry, the samples, their count
and their weights follow ``_sampling_kernels`` (shared with the mask loss).

Layout: the kernels read and write feature maps channels-last (NHWC), a channel stride of 1 that the compiler
knows (it is not an argument), so that a warp's lanes run along contiguous channels: every bilinear corner of
a bin is one contiguous row of channels, loaded as 16-byte vectors (``ld.global.v4``; 8-byte for bf16 where a
thread holds 4 channels), and the backward adds to it with 16-byte relaxed vector atomics
(``atom.global.gpu.relaxed.add.v4.f32``; ``sem="relaxed"``: the result is unused, and Triton's default
``acq_rel`` orders every atomic). One program per (RoI, block of ``BLOCK_C`` channels) walks the RoI's
``PH*PW`` bins ``BLOCK_P`` at a time; the output ``[K, C, PH, PW]`` (torchvision's contiguous layout) is stored
along bins, where it is contiguous (Triton converts the tile's layout through shared memory for that store).
Feature strides of batch, height and width are arguments and specialised (divisible by 16 for C = 256), which
the vector width needs; the sizes and the RoI count are not, so that a new image size compiles nothing.

NCHW inputs (what torchvision's users pass) are transposed to NHWC, one copy per level, and the gradient of
NCHW features is accumulated NHWC and transposed back in its conversion pass. Why this and not NCHW tiles
with lanes along bins (torchvision's order), by arithmetic for the COCO shapes of ``bench/test_roi_align.py``
(2 images 800x1344, P2-P5, C=256, 1024 RoIs; H200 copy bandwidth 4029 GB/s read + write, measured in
``bench/results/gpu-2026-12-04-b``):

* After the level mapping a RoI spans ~4-28 pixels of its level, so a bin is 0.6-4 pixels wide at 7x7
  (0.3-2 at 14x14). NCHW lanes along bins: a warp's 32 lanes cover ~4.6 rows of 7 bins (2.3 of 14) of one
  channel's plane, ~3-5 rows x 2-4 sectors = 10-20 sectors of 32 bytes per load or atomic instruction, for
  128 useful bytes (fp32; 64 for bf16): 20-40 % of the sectors used (10-20 % bf16), and no vector width (the
  lanes are not contiguous). NHWC lanes along channels: 32 lanes x 16 bytes = 512 contiguous bytes, 16 sectors,
  all used. Per (bin, sample, corner) and 256 channels: 2 vector instructions and 32 sectors (fp32; 1 and 16
  for bf16) against 8 scalar instructions and ~80-160 sectors; in the backward, 8 adds per 32-byte atomic at
  the L2 against ~2-3.
* The transposes' price: the features are 183 MB fp32 / 91 MB bf16 (P2 alone 138 / 69), so one read and one
  write of them take 91 / 45 us (single level 68 / 34 us): 6 % / 2.4 % of torchvision's multi-level 7x7
  forward (1.48 / 1.87 ms on that H200), 14 % / 6 % of the single-level one (0.50 / 0.53 ms). The backward
  zero-fills a float32 buffer either way (45 us) and must convert bf16's float32 sums anyway: transposing in
  that pass adds 0 bytes for bf16 and 91 us for fp32 (5 % of torchvision's 1.92 ms 7x7 backward).

So the NHWC kernels move ~4x fewer sectors in every gather and every atomic, and the transposes cost 2-14 % of
what torchvision takes: the NHWC kernels alone are kept. Not yet measured on a GPU: ``bench/test_roi_align.py``
times NCHW inputs (transposes included, provider ``ours``) and channels-last ones (``ours_channels_last``)
against torchvision's NCHW kernel, for the next GPU session.

Backward: atomic adds into zero-filled NHWC buffers, float32 for every feature dtype (float64 for float64),
then one conversion pass per level to the gradient's dtype and the features' memory format: the levels share
one buffer and one zero-fill launch. Float32 channels-last features need no conversion: their buffers, one
per level, are the gradients. In max mode each channel has its own winning
sample, so those atomics are scalar (still relaxed). Under ``torch.use_deterministic_algorithms`` a tile
kernel instead owns a tile of the gradient and sums every RoI's contribution in a fixed order: the bilinear
weights are separable, ``w(y, x) = wy(y) * wx(x)``, so a tile is ``sum_k sum_(i,j) Wy_k[i, :]^T g_k[i, j]
Wx_k[j, :]``, written once, no atomics.

Multi-level: up to five levels are passed as separate arguments (pointer, sizes, strides, scale per level;
``torch.compile`` rejects tuples as user-kernel arguments, pytorch#193257); the kernel bundles them into one
tuple per level and picks a RoI's level with ``tl.where`` (no copy into one buffer, no host-side per-level
gather: the whole pooler is one launch whose shapes never depend on the data).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from ._contract import MAX_LEVELS, acc_dtype, level_range
from ._sampling_kernels import axis, is_finite, roi_geometry, sample_coord
from ._triton_utils import autotune_configs, cast_rn, loop_bound, offset64, tl_acc_dtype, wrap_triton

# Sizes that change from call to call (RoI count, feature map sizes) are not specialised, so that a new image
# size does not compile a new kernel. The levels' strides are (their divisibility by 16 sets the vector width).
_VARYING = ["K"] + [f"{p}{i}" for p in ("H", "W") for i in range(MAX_LEVELS)]


def _gather_configs() -> list[triton.Config]:
    """Configs of the forward and the atomic backward: ``BLOCK_P`` bins x ``BLOCK_C`` channels per step.

    The first is the interpreter's: the largest tile means the fewest programs and steps (~3 ms per
    program). A thread holds ``BLOCK_P * BLOCK_C / (32 * num_warps)`` elements of a step's tile: 4 to 16, i.e.
    1-4 vectors of 4 fp32 channels (8-byte vectors of bf16 at 4 elements, 16-byte ones from 8); at the COCO
    launches on sm_90: 43-180 registers, no spills, and at least 16 resident warps per SM for every config but
    the first (8-16)."""
    return [
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_P": 8, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 4, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 8, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 4, "BLOCK_C": 256}, num_warps=8),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=8),
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
def _select_level(cond, a, b):
    """Level tuple ``a`` where ``cond``, else ``b``, field by field (see ``_levels``)."""
    return (
        tl.where(cond, a[0], b[0]), tl.where(cond, a[1], b[1]), tl.where(cond, a[2], b[2]),
        tl.where(cond, a[3], b[3]), tl.where(cond, a[4], b[4]), tl.where(cond, a[5], b[5]),
        tl.where(cond, a[6], b[6]), tl.where(cond, a[7], b[7]),
    )  # fmt: skip


@triton.jit
def _pick_level(lvl, levels, NUM_LEVELS: tl.constexpr):
    """The tuple of level ``lvl`` (a scalar in ``[0, NUM_LEVELS)``) among ``levels``."""
    picked = levels[0]
    for i in tl.static_range(1, NUM_LEVELS):
        picked = _select_level(lvl == i, levels[i], picked)
    return picked


@triton.jit
def _load_roi(rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N,
              HAS_VALID: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Row ``k`` of ``rois [K, 5]`` in the accumulation dtype, and whether it is usable.

    A RoI is usable when its batch index lies in ``[0, N)``, its coordinates are finite and its
    ``valid`` flag (if any) is set. An unusable RoI's values are replaced by zeros so that no later
    arithmetic (sample counts, addresses) sees a NaN or an infinity.
    """
    row = rois_ptr + offset64(k, rois_stride_k)
    b = tl.load(row).to(ACC)
    x1 = tl.load(row + rois_stride_col).to(ACC)
    y1 = tl.load(row + offset64(2, rois_stride_col)).to(ACC)
    x2 = tl.load(row + offset64(3, rois_stride_col)).to(ACC)
    y2 = tl.load(row + offset64(4, rois_stride_col)).to(ACC)
    ok = (b >= 0) & (b < N) & is_finite(x1) & is_finite(y1) & is_finite(x2) & is_finite(y2)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + offset64(k, valid_stride_k)) != 0)
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
def _roi(rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N, levels,
         sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
         PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr,
         HAS_VALID: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Everything a program needs to know about RoI ``k``: ``(n, lvl, ok, level, geometry)`` with its image
    ``n``, level index ``lvl``, whether it is usable, its level's tuple (``_levels``) and its geometry
    ``(start_x, start_y, bin_w, bin_h, grid_w, grid_h)`` (``roi_geometry``; 0 samples when not ``ok``)."""
    n, x1, y1, x2, y2, ok = _load_roi(
        rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N, HAS_VALID, ACC
    )
    lvl = tl.full((), 0, tl.int32)
    if NUM_LEVELS > 1:
        lvl, lvl_ok = _level_of(x1, y1, x2, y2, canonical_scale, canonical_level, k_min, k_max, NUM_LEVELS)
        ok = ok & lvl_ok
    level = _pick_level(lvl, levels, NUM_LEVELS)
    geometry = roi_geometry(x1, y1, x2, y2, ok, level[6], level[7], sampling_ratio, PH, PW, ALIGNED, ACC)
    return n, lvl, ok, level, geometry


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
def _axis_weights(start, bin_index, bin_size, grid, size, pix, ACC: tl.constexpr):
    """Summed weights of bin ``bin_index``'s ``grid`` samples along one axis on the pixels ``pix`` ([T] int)."""
    w = tl.zeros(pix.shape, ACC)
    for s in range(0, loop_bound(grid)):
        inside, low, high, w_low, w_high = axis(sample_coord(start, bin_index, bin_size, s, grid), size)
        w += tl.where(pix == low, tl.where(inside, w_low, 0.0), 0.0)
        w += tl.where(pix == high, tl.where(inside, w_high, 0.0), 0.0)
    return w


# The per-level arguments of every kernel, in this order (the launchers' ``_level_args``): the map's pointer
# (channels-last: channel stride 1), its height and width, its strides of batch, height and width (elements),
# and its spatial scale as a float32 pair hi + lo (see ``roi_geometry``). A level tuple holds them in this order.
@triton.jit
def _levels(
    map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
    map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
    map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
    map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
    map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
):  # fmt: skip
    """The five levels' arguments as one tuple of level tuples."""
    return (
        (map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo),
        (map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo),
        (map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo),
        (map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo),
        (map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo),
    )


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=autotune_configs(_gather_configs()), key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"])
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_fwd_kernel(
    # pointers
    out_ptr, argmax_ptr, rois_ptr, valid_ptr,
    # levels (see _levels)
    map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
    map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
    map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
    map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
    map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    # sizes
    K, N, C,
    # strides
    rois_stride_k, rois_stride_col, valid_stride_k,
    # parameters
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """RoIAlign forward; grid ``(K, cdiv(C, BLOCK_C))``; a program pools RoI ``k``'s bins ``BLOCK_P`` at a time
    for ``BLOCK_C`` channels.

    out_ptr:    [K, C, PH, PW] contiguous, the features' dtype.
    argmax_ptr: [K, C, PH, PW] int32 contiguous (MAX_MODE): index ``iy*grid_w + ix`` of the winning
                sample, -1 for a bin without samples. Unused otherwise.
    rois_ptr:   [K, 5] rows (batch index, x1, y1, x2, y2), strides (rois_stride_k, rois_stride_col).
    valid_ptr:  [K] bool (HAS_VALID); a False RoI gives zeros.
    map<l>_ptr: level l's features [N, C, H_l, W_l], strides (map_stride_n, 1, map_stride_h, map_stride_w).
    """
    k = tl.program_id(0).to(tl.int64)
    levels = _levels(
        map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
        map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
        map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
        map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
        map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    )  # fmt: skip
    n, lvl, ok, level, geometry = _roi(
        rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N, levels, sampling_ratio,
        canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED, HAS_VALID, ACC,
    )  # fmt: skip
    map_ptr, H, W, stride_n, stride_h, stride_w, _, _ = level
    start_x, start_y, bin_w, bin_h, grid_w, grid_h = geometry

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = map_ptr + n * stride_n + offs_c[None, :]
    out_row = (k * C + offs_c.to(tl.int64))[None, :] * (PH * PW)
    for p0 in range(0, PH * PW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        bin_y = (offs_p // PW).to(ACC)
        bin_x = (offs_p % PW).to(ACC)
        tile_mask = (offs_p < PH * PW)[:, None] & (offs_c < C)[None, :]
        if MAX_MODE:
            acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), ACC)
            arg = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
        else:
            acc = tl.zeros((BLOCK_P, BLOCK_C), ACC)
        for iy in range(0, loop_bound(grid_h)):
            y = sample_coord(start_y, bin_y, bin_h, iy, grid_h)
            for ix in range(0, loop_bound(grid_w)):
                x = sample_coord(start_x, bin_x, bin_w, ix, grid_w)
                inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
                m = tile_mask & inside[:, None]
                row_lo = base + offset64(y_lo, stride_h)[:, None]
                row_hi = base + offset64(y_hi, stride_h)[:, None]
                col_lo = offset64(x_lo, stride_w)[:, None]
                col_hi = offset64(x_hi, stride_w)[:, None]
                v1 = tl.load(row_lo + col_lo, mask=m, other=0.0).to(ACC)
                v2 = tl.load(row_lo + col_hi, mask=m, other=0.0).to(ACC)
                v3 = tl.load(row_hi + col_lo, mask=m, other=0.0).to(ACC)
                v4 = tl.load(row_hi + col_hi, mask=m, other=0.0).to(ACC)
                val = w1[:, None] * v1 + w2[:, None] * v2 + w3[:, None] * v3 + w4[:, None] * v4
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
        out_offs = out_row + offs_p[:, None]
        tl.store(out_ptr + out_offs, cast_rn(acc, out_ptr.dtype.element_ty), mask=tile_mask)
        if MAX_MODE:
            tl.store(argmax_ptr + out_offs, arg, mask=tile_mask)


@triton.autotune(
    configs=autotune_configs(_gather_configs()),
    key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"],
    reset_to_zero=[f"map{i}_ptr" for i in range(MAX_LEVELS)],
)
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_bwd_kernel(
    # pointers
    grad_ptr, argmax_ptr, rois_ptr, valid_ptr,
    # levels (see _levels): the gradient buffers
    map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
    map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
    map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
    map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
    map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    # sizes
    K, N, C,
    # strides
    grad_stride_k, grad_stride_c, grad_stride_p, rois_stride_k, rois_stride_col, valid_stride_k,
    # parameters
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """RoIAlign backward with relaxed atomic adds; grid ``(K, cdiv(C, BLOCK_C))``; tiles as in the forward.

    map<l>_ptr: zero-filled gradient buffers [N, C, H_l, W_l] in ACC (float32, float64 for float64),
                strides (map_stride_n, 1, map_stride_h, map_stride_w).
    grad_ptr:   [K, C, PH*PW] output gradient, strides (grad_stride_k, grad_stride_c, grad_stride_p).
    argmax_ptr: [K, C, PH, PW] int32 contiguous from the forward (MAX_MODE).
    rois_ptr, valid_ptr: as in the forward.
    """
    k = tl.program_id(0).to(tl.int64)
    levels = _levels(
        map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
        map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
        map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
        map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
        map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    )  # fmt: skip
    n, lvl, ok, level, geometry = _roi(
        rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N, levels, sampling_ratio,
        canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED, HAS_VALID, ACC,
    )  # fmt: skip
    map_ptr, H, W, stride_n, stride_h, stride_w, _, _ = level
    start_x, start_y, bin_w, bin_h, grid_w, grid_h = geometry

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # Unusable RoIs mask every channel. (A scalar comparison is never broadcast into a block: Triton's
    # interpreter (3.8) types its result as the operands' dtype and splats it as floats.)
    c_mask = offs_c < tl.where(ok, C, 0)
    base = map_ptr + n * stride_n + offs_c[None, :]
    grad_row = grad_ptr + k * grad_stride_k + offset64(offs_c, grad_stride_c)[None, :]
    for p0 in range(0, PH * PW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        bin_y = (offs_p // PW).to(ACC)
        bin_x = (offs_p % PW).to(ACC)
        tile_mask = (offs_p < PH * PW)[:, None] & c_mask[None, :]
        g = tl.load(grad_row + offset64(offs_p, grad_stride_p)[:, None], mask=tile_mask, other=0.0).to(ACC)
        if MAX_MODE:
            out_offs = (k * C + offs_c.to(tl.int64))[None, :] * (PH * PW) + offs_p[:, None]
            arg = tl.load(argmax_ptr + out_offs, mask=tile_mask, other=-1)
            # A bin without samples has arg -1 and is masked; max(grid, 1) keeps its arithmetic finite.
            iy = arg // tl.maximum(grid_w, 1)
            ix = arg % tl.maximum(grid_w, 1)
            y = sample_coord(start_y, bin_y[:, None], bin_h, iy, tl.maximum(grid_h, 1))
            x = sample_coord(start_x, bin_x[:, None], bin_w, ix, tl.maximum(grid_w, 1))
            inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
            # Each channel's own winning sample: addresses are not contiguous along channels, scalar atomics.
            m = tile_mask & inside & (arg >= 0)
            row_lo = base + offset64(y_lo, stride_h)
            row_hi = base + offset64(y_hi, stride_h)
            tl.atomic_add(row_lo + offset64(x_lo, stride_w), g * w1, mask=m, sem="relaxed")
            tl.atomic_add(row_lo + offset64(x_hi, stride_w), g * w2, mask=m, sem="relaxed")
            tl.atomic_add(row_hi + offset64(x_lo, stride_w), g * w3, mask=m, sem="relaxed")
            tl.atomic_add(row_hi + offset64(x_hi, stride_w), g * w4, mask=m, sem="relaxed")
        else:
            g = g / tl.maximum(grid_h * grid_w, 1)
            for iy in range(0, loop_bound(grid_h)):
                y = sample_coord(start_y, bin_y, bin_h, iy, grid_h)
                for ix in range(0, loop_bound(grid_w)):
                    x = sample_coord(start_x, bin_x, bin_w, ix, grid_w)
                    inside, y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4 = _sample_weights(y, x, H, W)
                    m = tile_mask & inside[:, None]
                    row_lo = base + offset64(y_lo, stride_h)[:, None]
                    row_hi = base + offset64(y_hi, stride_h)[:, None]
                    col_lo = offset64(x_lo, stride_w)[:, None]
                    col_hi = offset64(x_hi, stride_w)[:, None]
                    tl.atomic_add(row_lo + col_lo, g * w1[:, None], mask=m, sem="relaxed")
                    tl.atomic_add(row_lo + col_hi, g * w2[:, None], mask=m, sem="relaxed")
                    tl.atomic_add(row_hi + col_lo, g * w3[:, None], mask=m, sem="relaxed")
                    tl.atomic_add(row_hi + col_hi, g * w4[:, None], mask=m, sem="relaxed")


@triton.autotune(configs=autotune_configs(_tile_configs()), key=["C", "PH", "PW", "NUM_LEVELS", "MAX_MODE"])
@triton.jit(do_not_specialize=_VARYING)
def _roi_align_bwd_tiles_kernel(
    # pointers
    grad_ptr, argmax_ptr, rois_ptr, valid_ptr,
    # levels (see _levels): the gradient buffers
    map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
    map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
    map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
    map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
    map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    # sizes
    K, N, C,
    # strides
    grad_stride_k, grad_stride_c, grad_stride_p, rois_stride_k, rois_stride_col, valid_stride_k,
    # parameters
    sampling_ratio, canonical_scale, canonical_level, k_min, k_max,
    # meta
    PH: tl.constexpr, PW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, MAX_MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Deterministic RoIAlign backward: each program owns a ``TILE_H x TILE_W x BLOCK_C`` tile of one
    level's feature gradient and sums the contributions of every RoI in a fixed order (RoI index,
    then bin), so no float atomics are needed and every run gives the same bits. Every tile is
    written, zeros included, so the gradients need no zero-fill.

    Grid ``(sum_l N*cdiv(H_l, TILE_H)*cdiv(W_l, TILE_W), cdiv(C, BLOCK_C))``. Each program reads all K
    RoI rows (20 bytes each) and skips those whose samples cannot reach its tile; a RoI that reaches
    the tile costs ``PH*PW`` outer products of ``TILE_H x TILE_W x BLOCK_C``.

    map<l>_ptr: level gradients [N, C, H_l, W_l] in the features' dtype, strides (map_stride_n, 1,
                map_stride_h, map_stride_w). Other pointers as in ``_roi_align_bwd_kernel``.
    """
    levels = _levels(
        map0_ptr, H0, W0, map0_stride_n, map0_stride_h, map0_stride_w, scale0_hi, scale0_lo,
        map1_ptr, H1, W1, map1_stride_n, map1_stride_h, map1_stride_w, scale1_hi, scale1_lo,
        map2_ptr, H2, W2, map2_stride_n, map2_stride_h, map2_stride_w, scale2_hi, scale2_lo,
        map3_ptr, H3, W3, map3_stride_n, map3_stride_h, map3_stride_w, scale3_hi, scale3_lo,
        map4_ptr, H4, W4, map4_stride_n, map4_stride_h, map4_stride_w, scale4_hi, scale4_lo,
    )  # fmt: skip
    # The program's level and its tile in that level, from the flat program id (levels' tiles in order).
    lvl = tl.program_id(0) * 0
    rem = tl.program_id(0)
    for nxt in tl.static_range(1, NUM_LEVELS):
        tiles = N * tl.cdiv(levels[nxt - 1][1], TILE_H) * tl.cdiv(levels[nxt - 1][2], TILE_W)
        step = (lvl == nxt - 1) & (rem >= tiles)
        lvl = tl.where(step, nxt, lvl)
        rem = tl.where(step, rem - tiles, rem)
    level = _pick_level(lvl, levels, NUM_LEVELS)
    map_ptr, H, W, stride_n, stride_h, stride_w = level[0], level[1], level[2], level[3], level[4], level[5]
    tiles_x = tl.cdiv(W, TILE_W)
    tiles_img = tl.cdiv(H, TILE_H) * tiles_x
    img = rem // tiles_img
    y0 = (rem % tiles_img) // tiles_x * TILE_H
    x0 = (rem % tiles_img) % tiles_x * TILE_W
    pix_y = y0 + tl.arange(0, TILE_H)
    pix_x = x0 + tl.arange(0, TILE_W)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    acc = tl.zeros((TILE_H, TILE_W, BLOCK_C), ACC)
    for k in range(0, loop_bound(K)):
        n, roi_lvl, ok, roi_level, geometry = _roi(
            rois_ptr, rois_stride_k, rois_stride_col, valid_ptr, valid_stride_k, k, N, levels, sampling_ratio,
            canonical_scale, canonical_level, k_min, k_max, PH, PW, NUM_LEVELS, ALIGNED, HAS_VALID, ACC,
        )  # fmt: skip
        start_x, start_y, bin_w, bin_h, grid_w, grid_h = geometry
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
                    g = tl.load(grad_k + offset64(i * PW + j, grad_stride_p), mask=c_mask, other=0.0).to(ACC)
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

    offs = (
        offset64(img, stride_n)
        + offset64(pix_y, stride_h)[:, None, None]
        + offset64(pix_x, stride_w)[None, :, None]
        + offs_c[None, None, :]
    )
    mask = (pix_y < H)[:, None, None] & (pix_x < W)[None, :, None] & c_mask[None, None, :]
    tl.store(map_ptr + offs, cast_rn(acc, map_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (``struct``'s C cast), without creating a tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=64)
def _split_scale(scale: float) -> tuple[float, float]:
    """``scale`` as float32 ``hi + lo`` (see ``roi_geometry``), computed once per scale."""
    hi = _float32(scale)
    return hi, _float32(scale - hi)


def channels_fast(t: torch.Tensor) -> torch.Tensor:
    """``t [N, C, H, W]`` with channel stride 1: itself when it has it (channels-last, or a channels-last
    view; any C = 1 map), else its channels-last copy (the transpose of NCHW; module docstring)."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous(memory_format=torch.channels_last)


def _level_args(maps: list[torch.Tensor], scales: list[float]) -> list:
    """The per-level arguments of ``_levels`` for ``maps`` (channel stride 1), padded to ``MAX_LEVELS`` with
    the first level's."""
    args = []
    for t, scale in zip(maps, scales, strict=True):
        args += [t, t.shape[2], t.shape[3], t.stride(0), t.stride(2), t.stride(3), *_split_scale(scale)]
    return args + args[:8] * (MAX_LEVELS - len(maps))


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
    """Launch the forward kernel: ``(out [K, C, PH, PW], argmax [K, C, PH, PW] int32 or [0])``, both
    contiguous. Features without channel stride 1 are read from a channels-last copy."""
    f = features[0]
    N, C = f.shape[0], f.shape[1]
    K = rois.shape[0]
    PH, PW = pooled
    out = torch.empty((K, C, PH, PW), dtype=f.dtype, device=f.device)
    argmax = torch.empty((K, C, PH, PW) if max_mode else (0,), dtype=torch.int32, device=f.device)
    if out.numel() == 0:
        return out, argmax
    k_min, k_max = level_range(scales)
    grid = lambda meta: (K, triton.cdiv(C, meta["BLOCK_C"]))
    wrap_triton(_roi_align_fwd_kernel)[grid](
        out, argmax, rois, valid if valid is not None else rois,
        *_level_args([channels_fast(t) for t in features], scales),
        K, N, C, rois.stride(0), rois.stride(1), valid.stride(0) if valid is not None else 0,
        sampling_ratio, float(canonical[0]), float(canonical[1]), float(k_min), float(k_max),
        PH=PH, PW=PW, NUM_LEVELS=len(features), ALIGNED=aligned, MAX_MODE=max_mode, HAS_VALID=valid is not None,
        ACC=tl_acc_dtype(f.dtype),
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
    """Launch a backward kernel; returns one gradient ``[N, C, H_l, W_l]`` per level in ``grad``'s dtype,
    channels-last if ``channels_last`` else contiguous.

    Both kernels write NHWC buffers: the atomic one adds into zero-filled
    ``acc_dtype`` buffers (float32 for half dtypes, so that rounding happens once), the deterministic one
    (``deterministic``) writes every element once in ``grad``'s dtype. One pass per level then copies a
    buffer into the gradient's dtype and memory format (none when they already match: the buffers are then
    the gradients).
    """
    N, K, C = batch_size, rois.shape[0], grad.shape[1]
    PH, PW = pooled
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf_dtype = grad.dtype if deterministic else acc_dtype(grad.dtype)
    alloc = torch.empty if deterministic and K * C * N > 0 else torch.zeros
    converted = buf_dtype != grad.dtype or not channels_last
    if converted:
        # Copied out level by level: the levels share one buffer, zero-filled in one launch instead of one per
        # level. Each level starts 16-byte aligned (its size rounded up to 4 elements), as the vector atomics need.
        sizes = [-(-N * h * w * C // 4) * 4 for h, w in level_shapes]
        parts = alloc(sum(sizes), dtype=buf_dtype, device=grad.device).split(sizes)
        nhwc = [p[: N * h * w * C].view(N, h, w, C) for p, (h, w) in zip(parts, level_shapes, strict=True)]
    else:
        # The gradients themselves: a storage each (an op's outputs may not alias one another).
        nhwc = [alloc((N, h, w, C), dtype=buf_dtype, device=grad.device) for h, w in level_shapes]
    bufs = [b.permute(0, 3, 1, 2) for b in nhwc]  # seen as [N, C, H, W]
    if K * C * N > 0:
        grad_rows = grad.reshape(K, C, PH * PW)  # a view when its last two dims merge (contiguous, expanded)
        k_min, k_max = level_range(scales)
        args = (
            grad_rows, argmax, rois, valid if valid is not None else rois, *_level_args(bufs, scales),
            K, N, C, *grad_rows.stride(), rois.stride(0), rois.stride(1), valid.stride(0) if valid is not None else 0,
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
            wrap_triton(_roi_align_bwd_kernel)[grid](*args, **meta)
    if not converted:
        return bufs
    # Fresh tensors, not ``.to``, which returns a level's view itself when it already has the layout (C = 1).
    return [torch.empty(b.shape, dtype=grad.dtype, device=b.device, memory_format=fmt).copy_(b) for b in bufs]
