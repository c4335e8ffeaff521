"""Triton kernels of non-maximum suppression and their launcher. The IoU arithmetic, the order and the
results on invalid values are in ``kernels/nms.py``'s docstring, which validates the launcher's inputs and
allocates its outputs.

Two kernels, as torchvision's CUDA NMS, but with the greedy walk on the device:

1. ``_nms_mask_kernel``: the suppression matrix of the sorted boxes as bits, ``mask[b, i, w]`` bit ``t`` =
   "sorted box ``i`` suppresses sorted box ``64 w + t``", only for ``64 w + t > i``. Grid ``(ceil(N/64),
   ceil(N/BLOCK_ROWS), B)`` (BLOCK_ROWS autotuned, 16-64); programs below the diagonal exit at once.
   Cost: ``B N^2 / 2`` IoUs and ``B N ceil(N/64) 8`` bytes of mask (12.5 MB per row at N = 10k; the
   memory is quadratic in N, as in torchvision — select a top-k before a very large NMS).
2. ``_nms_sweep_kernel``: one program per batch row walks the sorted boxes in blocks of 64, with
   ``removed`` (one bit per box, ``ceil(N/64)`` words) in registers. Per block, 64 unrolled steps:
   box ``t`` is kept iff its bit of the block's word (``removed`` plus the invalid and out-of-range
   boxes) is clear; a kept box ORs its diagonal word into the block's word and its words of the later
   blocks into ``removed`` (a load predicated on "kept": a suppressed box's row is never read). Cost per
   row: ``ceil(N/64)`` blocks of 64 short dependent integer steps (the loads feed no later step, so
   they overlap the chain), ``kept * ceil(N/64) / 2`` words read on average, and the walk
   stops once ``max_out`` boxes are kept. No ``.item()``, ``nonzero`` or copy to the host, unlike
   torchvision's CUDA NMS, which copies the whole mask to the host and walks it there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import autotune_configs, ieee_div, loop_bound, mul_rn, offset64, round_to, wrap_triton

_WORD = 64  # bits per mask word (int64) = boxes per block of the sweep
_OUT_BLOCK = 1024
# Both kernels are autotuned. Every config overwrites all it writes (mask words; keep, keep_valid, count),
# so the autotuner's repeated runs need no reset. The first launch of a key benchmarks the configs, which
# synchronises the host: a CUDA graph capture of nms_fixed must follow a call with the same flags, dtypes
# and NUM_WORDS_PAD, as torch.compile's CUDA graphs (they run before they record) and the CUDA graph test
# do. The keys never hold N: NUM_WORDS_PAD is its power-of-two bucket, which compiles a kernel of its own.


def _mask_configs() -> list[triton.Config]:
    """The first is the launch the H200 measured (with the sweep's first, nms ran 3.7-7x faster than
    torchvision's), and the interpreter's (the fewest programs): a 64 x 64 tile on 8 warps, 16 pairs per
    thread at 177 registers on sm_90, 8 resident warps per SM. The others hold 8 pairs per thread and no
    spills (ptxas, sm_90): 64 rows on 16 warps at 90 registers (16 warps per SM), 32 rows on 8 warps and 16
    rows on 4 warps at 80 (24 warps per SM)."""
    return [
        triton.Config({"BLOCK_ROWS": 64}, num_warps=8),
        triton.Config({"BLOCK_ROWS": 64}, num_warps=16),
        triton.Config({"BLOCK_ROWS": 32}, num_warps=8),
        triton.Config({"BLOCK_ROWS": 16}, num_warps=4),
    ]


def _sweep_configs() -> list[triton.Config]:
    """The first is the launch the H200 measured: 8 warps, at 255 registers on sm_90 (8 resident warps per
    SM; the sweep runs B programs, so the latency of its chain of steps matters more than occupancy).
    16 warps cap a thread at 128 registers: ptxas then uses 64-128 with no spills up to NUM_WORDS_PAD =
    1024 (16-32 warps per SM)."""
    return [triton.Config({}, num_warps=8), triton.Config({}, num_warps=16)]


@triton.autotune(configs=autotune_configs(_mask_configs()), key=["HAS_IDXS"])
@triton.jit(do_not_specialize=["num_boxes"])
def _nms_mask_kernel(
    # pointers
    boxes_ptr, order_ptr, idxs_ptr, mask_ptr,
    # sizes
    num_boxes,
    # strides
    boxes_stride_b, boxes_stride_n, boxes_stride_c, order_stride_b, order_stride_n, idxs_stride_b, idxs_stride_n,
    mask_stride_b, mask_stride_n, mask_stride_w,
    # scalars
    iou_threshold: tl.float64,
    # meta
    HAS_IDXS: tl.constexpr, BLOCK_ROWS: tl.constexpr, WORD: tl.constexpr,
):  # fmt: skip
    """Word ``program_id(0)`` of the suppression bits of ``BLOCK_ROWS`` sorted boxes of row ``program_id(2)``;
    grid ``(ceil(N/WORD), ceil(N/BLOCK_ROWS), B)``. BLOCK_ROWS (autotuned) divides WORD, so a block of rows
    shares its diagonal word.

    boxes_ptr: [B, N, 4] (unsorted); order_ptr: [B, N] int64, sorted position -> box index;
    idxs_ptr: [B, N] int class ids, read when HAS_IDXS; mask_ptr: [B, N, ceil(N/64)] int64, written
    for the words at or right of each row's diagonal word only.
    """
    word = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    # Only tiles holding a pair (i, j) with j > i have bits.
    if word * WORD + WORD - 1 > row_block * BLOCK_ROWS:
        lanes = tl.arange(0, WORD).to(tl.int64)
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        cols = word * WORD + lanes
        row_ok = rows < num_boxes
        col_ok = cols < num_boxes
        order_row = order_ptr + b * order_stride_b
        ri = tl.load(order_row + rows * order_stride_n, mask=row_ok, other=0)
        ci = tl.load(order_row + cols * order_stride_n, mask=col_ok, other=0)
        ri = tl.minimum(tl.maximum(ri, 0), num_boxes - 1)
        ci = tl.minimum(tl.maximum(ci, 0), num_boxes - 1)
        a = boxes_ptr + b * boxes_stride_b + ri * boxes_stride_n
        c = boxes_ptr + b * boxes_stride_b + ci * boxes_stride_n
        BOX: tl.constexpr = boxes_ptr.dtype.element_ty
        ACC: tl.constexpr = tl.float64 if boxes_ptr.dtype.element_ty == tl.float64 else tl.float32
        # Masked lanes read a unit box (no 0/0, which the interpreter reports); their bits are masked off.
        ax1 = tl.load(a, mask=row_ok, other=0.0).to(ACC)
        ay1 = tl.load(a + boxes_stride_c, mask=row_ok, other=0.0).to(ACC)
        ax2 = tl.load(a + offset64(2, boxes_stride_c), mask=row_ok, other=1.0).to(ACC)
        ay2 = tl.load(a + offset64(3, boxes_stride_c), mask=row_ok, other=1.0).to(ACC)
        cx1 = tl.load(c, mask=col_ok, other=0.0).to(ACC)
        cy1 = tl.load(c + boxes_stride_c, mask=col_ok, other=0.0).to(ACC)
        cx2 = tl.load(c + offset64(2, boxes_stride_c), mask=col_ok, other=1.0).to(ACC)
        cy2 = tl.load(c + offset64(3, boxes_stride_c), mask=col_ok, other=1.0).to(ACC)
        # torchvision's CUDA devIoU, operation for operation: the intersection's sides are differences
        # in the boxes' dtype (exact min/max, then a subtraction rounded to that dtype), products in
        # ACC, and the area is (float(x2) - x1) * float(y2 - y1), whose y side is rounded to the boxes'
        # dtype. All roundings are no-ops for float32/float64.
        iw = round_to(tl.minimum(ax2[:, None], cx2[None, :]) - tl.maximum(ax1[:, None], cx1[None, :]), BOX)
        ih = round_to(tl.minimum(ay2[:, None], cy2[None, :]) - tl.maximum(ay1[:, None], cy1[None, :]), BOX)
        inter = mul_rn(tl.maximum(iw, 0.0), tl.maximum(ih, 0.0))
        area_a = mul_rn(ax2 - ax1, round_to(ay2 - ay1, BOX))
        area_c = mul_rn(cx2 - cx1, round_to(cy2 - cy1, BOX))
        iou = ieee_div(inter, area_a[:, None] + area_c[None, :] - inter)
        bits = (iou > tl.full((), iou_threshold, ACC)) & (cols[None, :] > rows[:, None]) & col_ok[None, :]
        if HAS_IDXS:
            idxs_row = idxs_ptr + b * idxs_stride_b
            ra = tl.load(idxs_row + ri * idxs_stride_n, mask=row_ok, other=0)
            ca = tl.load(idxs_row + ci * idxs_stride_n, mask=col_ok, other=0)
            bits = bits & (ra[:, None] == ca[None, :])
        # Distinct powers of two: their sum is their OR, and cannot overflow (bit 63 is the sign bit).
        one = tl.full((), 1, tl.int64)
        words = tl.sum(tl.where(bits, one << lanes[None, :], 0), axis=1)
        tl.store(mask_ptr + b * mask_stride_b + rows * mask_stride_n + word * mask_stride_w, words, mask=row_ok)


@triton.autotune(configs=autotune_configs(_sweep_configs()), key=["HAS_VALID", "NUM_WORDS_PAD"])
@triton.jit(do_not_specialize=["num_boxes", "max_out"])
def _nms_sweep_kernel(
    # pointers
    mask_ptr, order_ptr, valid_ptr, keep_ptr, keep_valid_ptr, count_ptr,
    # sizes
    num_boxes, max_out,
    # strides
    mask_stride_b, mask_stride_n, mask_stride_w, order_stride_b, order_stride_n, valid_stride_b, valid_stride_n,
    keep_stride_b, keep_stride_k, keep_valid_stride_b, keep_valid_stride_k,
    # meta
    HAS_VALID: tl.constexpr, NUM_WORDS_PAD: tl.constexpr, WORD: tl.constexpr, OUT_BLOCK: tl.constexpr,
):  # fmt: skip
    """The greedy walk of row ``program_id(0)``: the first ``max_out`` kept boxes, in score order.

    mask_ptr: [B, N, ceil(N/64)] int64 from ``_nms_mask_kernel``; order_ptr: [B, N] int64;
    valid_ptr: [B, N] bool, read when HAS_VALID; keep_ptr: [B, max_out] int64 box indices (0 when
    padded); keep_valid_ptr: [B, max_out] bool; count_ptr: [B] int64 number kept.
    """
    b = tl.program_id(0).to(tl.int64)
    num_words = tl.cdiv(num_boxes, WORD)
    words = tl.arange(0, NUM_WORDS_PAD)
    lanes = tl.arange(0, WORD).to(tl.int64)
    one = tl.full((), 1, tl.int64)
    mask_row = mask_ptr + b * mask_stride_b
    order_row = order_ptr + b * order_stride_b
    removed = tl.zeros([NUM_WORDS_PAD], dtype=tl.int64)
    count = tl.zeros((), dtype=tl.int32)
    for c in range(0, loop_bound(num_words)):
        if count < max_out:
            pos = c * WORD + lanes
            in_range = pos < num_boxes
            idx = tl.load(order_row + pos * order_stride_n, mask=in_range, other=0)
            skip = ~in_range
            if HAS_VALID:
                safe = tl.minimum(tl.maximum(idx, 0), num_boxes - 1)
                ok = tl.load(valid_ptr + b * valid_stride_b + safe * valid_stride_n, mask=in_range, other=0)
                skip = skip | (ok == 0)
            w = tl.sum(tl.where(words == c, removed, 0)) | tl.sum(tl.where(skip, one << lanes, 0))
            # Resolve the block: box t is kept iff its bit is clear once the kept boxes before it in the
            # block have ORed in their diagonal words (bits of later boxes only); a kept box's words of
            # the later blocks are ORed into `removed` (a suppressed box's row is never read).
            later = (words > c) & (words < num_words)
            kept = tl.zeros((), dtype=tl.int64)
            for t in tl.static_range(WORD):
                # 64-bit: the row offset N * ceil(N/64) passes 2**31 at ~370k boxes, whose 17 GB mask fits an H200.
                # A word index (< ceil(N/64)) times the unit stride of a row needs no cast, nor does a slot (<
                # max_out) of keep / keep_valid: the launcher allocates all three contiguous.
                row = mask_row + offset64(c * WORD + t, mask_stride_n)
                diag = tl.load(row + c * mask_stride_w, mask=c * WORD + t < num_boxes, other=0)
                bit = one << t
                alive = (w & bit) == 0
                w = tl.where(alive, w | diag, w)
                kept = tl.where(alive, kept | bit, kept)
                removed = removed | tl.load(row + words * mask_stride_w, mask=later & alive, other=0)
            kept_lane = ((kept >> lanes) & 1).to(tl.int32)
            slot = count + tl.cumsum(kept_lane, 0) - kept_lane
            tl.store(keep_ptr + b * keep_stride_b + slot * keep_stride_k, idx, mask=(kept_lane != 0) & (slot < max_out))
            count += tl.sum(kept_lane)
    count = tl.minimum(count, max_out)
    tl.store(count_ptr + b, count.to(tl.int64))
    for s0 in range(0, loop_bound(max_out), OUT_BLOCK):
        s = s0 + tl.arange(0, OUT_BLOCK)
        in_out = s < max_out
        pad = tl.zeros([OUT_BLOCK], dtype=tl.int64)
        tl.store(keep_ptr + b * keep_stride_b + s * keep_stride_k, pad, mask=in_out & (s >= count))
        tl.store(keep_valid_ptr + b * keep_valid_stride_b + s * keep_valid_stride_k, s < count, mask=in_out)


def forward_triton(
    boxes: torch.Tensor,
    order: torch.Tensor,
    idxs: torch.Tensor | None,
    valid: torch.Tensor | None,
    threshold: float,
    max_out: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy NMS of the rows sorted by ``order [B, N]`` (``N >= 1``): ``(keep [B, max_out] int64, keep_valid
    [B, max_out] bool, count [B] int64)``, by the bit matrix, then its sweep."""
    B, N = order.shape
    keep = torch.empty((B, max_out), dtype=torch.int64, device=boxes.device)
    keep_valid = torch.empty((B, max_out), dtype=torch.bool, device=boxes.device)
    count = torch.empty((B,), dtype=torch.int64, device=boxes.device)
    num_words = triton.cdiv(N, _WORD)
    mask = torch.empty((B, N, num_words), dtype=torch.int64, device=boxes.device)
    ix = idxs if idxs is not None else order
    grid = lambda meta: (num_words, triton.cdiv(N, meta["BLOCK_ROWS"]), B)
    wrap_triton(_nms_mask_kernel)[grid](
        boxes, order, ix, mask,
        N,
        boxes.stride(0), boxes.stride(1), boxes.stride(2), order.stride(0), order.stride(1),
        ix.stride(0), ix.stride(1), mask.stride(0), mask.stride(1), mask.stride(2),
        threshold,
        HAS_IDXS=idxs is not None, WORD=_WORD,
    )  # fmt: skip
    words_pad = max(16, triton.next_power_of_2(num_words))
    v = valid if valid is not None else keep_valid
    wrap_triton(_nms_sweep_kernel)[(B,)](
        mask, order, v, keep, keep_valid, count,
        N, max_out,
        mask.stride(0), mask.stride(1), mask.stride(2), order.stride(0), order.stride(1),
        v.stride(0), v.stride(1), keep.stride(0), keep.stride(1), keep_valid.stride(0), keep_valid.stride(1),
        HAS_VALID=valid is not None, NUM_WORDS_PAD=words_pad, WORD=_WORD, OUT_BLOCK=_OUT_BLOCK,
    )  # fmt: skip
    return keep, keep_valid, count
