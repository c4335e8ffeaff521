"""Non-maximum suppression: torchvision's ``nms`` / ``batched_nms``, and ``nms_fixed``, a fixed-size batched
variant that runs entirely on the device with no host synchronisation (CUDA graphs, ``fullgraph=True``).

Algorithm (greedy NMS, as torchvision): sort the boxes by score, descending; walk them in that order,
keep a box unless a kept box suppresses it, where ``i`` suppresses ``j`` when ``IoU(i, j) > iou_threshold``
(and, for ``batched_nms`` / ``idxs``, both have the same class).

IoU arithmetic, identical to torchvision's kernels: intersection sides ``max(min(x2) - max(x1), 0)`` in the
boxes' dtype, ``inter = w * h`` and areas in float32 (float64 for float64), ``IoU = inter / (area_i +
area_j - inter)`` divided with IEEE rounding. The threshold is compared as torchvision does on the same
device: its CPU kernel compares the float32 IoU with the float64 threshold (we compare with the largest
float32 not above it, which decides the same), its CUDA kernel with ``float(threshold)``. Our mask kernel
is compiled without FMA contraction (``enable_fp_fusion=False``); nvcc may contract torchvision's
``area_i + area_j`` into an FMA, so on CUDA an IoU within an ulp of the threshold may be decided
differently. On CPU the results are bit-identical. Half inputs follow torchvision's CUDA kernel (its CPU
kernel has none); bfloat16 (neither has one) follows the same rule.

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

Order: ``torch.sort(scores, descending=True, stable=True)``, torchvision's own sort (stable since 0.12,
on CPU and CUDA), so equal scores are taken by increasing index and ``nms`` returns exactly torchvision's
indices in torchvision's order, ties included, on every device; ``nms_fixed`` sorts each row the same way.
The output size of ``nms`` / ``batched_nms`` depends on the data, so their op (``mrcnn::nms``) reads the
kept count on the host once (torchvision copies its whole mask to the host instead) and its fake uses
``new_dynamic_size()``: under ``torch.compile`` it is an opaque node with a data-dependent size.
``nms_fixed`` is the op without that read.

``batched_nms`` suppresses only within a class (no coordinate offsets). That is torchvision's
``_batched_nms_coordinate_trick`` (its path below a size threshold: 4000 coordinates on CPU, 100000 on
CUDA in 0.29), ties included, whenever adding the class offsets to the coordinates is exact in the boxes'
dtype (e.g. coordinates on a 1/8 pixel grid); otherwise the offsets perturb torchvision's IoUs by
rounding, and an IoU within that rounding of the threshold can be decided differently. Above the
threshold torchvision runs ``nms`` per class (``_batched_nms_vanilla``): the same kept boxes, which it then
re-sorts with an unstable sort, so the order equals ours unless kept boxes have equal scores.

Invalid values (documented and tested): a box with a NaN coordinate has a NaN area, so it neither
suppresses nor is suppressed, and is kept in its score's place; NaN scores sort first (``torch.sort``)
and are kept first, as in torchvision. In ``nms_fixed``, a box whose ``valid`` flag is False is never
kept and never suppresses another; padded slots of ``keep`` hold 0 with ``keep_valid`` False.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._higher_order_ops.while_loop import while_loop
from torch._subclasses.fake_tensor import is_fake

from ._backend import (
    FLOAT_DTYPES,
    OpValueError,
    acc_dtype,
    autotune_configs,
    backend_for,
    check_tensor,
    register_autocast,
)
from ._triton_utils import ieee_div, loop_bound, offset64, round_to

__all__ = ["nms", "batched_nms", "nms_fixed"]

_WORD = 64  # bits per mask word (int64) = boxes per block of the sweep
_IDX_DTYPES = (torch.int32, torch.int64)
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
        inter = tl.maximum(iw, 0.0) * tl.maximum(ih, 0.0)
        area_a = (ax2 - ax1) * round_to(ay2 - ay1, BOX)
        area_c = (cx2 - cx1) * round_to(cy2 - cy1, BOX)
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


# ----------------------------------------------------------------------------------------------
# Threshold and validation
# ----------------------------------------------------------------------------------------------


def _effective_threshold(iou_threshold: float, dtype: torch.dtype, device: torch.device) -> float:
    """The threshold that, compared with ``>`` in our accumulation dtype, decides as torchvision on ``device``.

    torchvision's CUDA kernel compares with ``float(threshold)``; its CPU kernel compares the IoU (float32
    for float32 boxes) with the float64 threshold, and ``iou > t`` equals ``iou > largest float32 <= t``.
    """
    t = float(iou_threshold)
    # numpy, not torch scalars: no device round trip, and nothing for torch.export to trace.
    with np.errstate(over="ignore"):
        t32 = np.float32(t)
    if device.type == "cuda":
        return float(t32)
    if acc_dtype(dtype) == torch.float64 or math.isnan(t):
        return t
    if float(t32) > t:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _validate_fixed(
    boxes: Tensor, scores: Tensor, max_out: int, valid: Tensor | None, idxs: Tensor | None
) -> tuple[int, int]:
    check_tensor("boxes", boxes, ndim=3, dtypes=FLOAT_DTYPES)
    B, N = boxes.shape[0], boxes.shape[1]
    if boxes.shape[2] != 4:
        raise OpValueError(f"boxes must have shape [B, N, 4], got {tuple(boxes.shape)}")
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, device=boxes.device)
    if scores.shape != (B, N):
        raise OpValueError(f"scores must have shape [B, N] = [{B}, {N}], got {tuple(scores.shape)}")
    if valid is not None:
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), device=boxes.device)
        if valid.shape != (B, N):
            raise OpValueError(f"valid must have shape [B, N] = [{B}, {N}], got {tuple(valid.shape)}")
    if idxs is not None:
        check_tensor("idxs", idxs, ndim=2, dtypes=_IDX_DTYPES, device=boxes.device)
        if idxs.shape != (B, N):
            raise OpValueError(f"idxs must have shape [B, N] = [{B}, {N}], got {tuple(idxs.shape)}")
    if max_out < 0:
        raise OpValueError(f"max_out must be >= 0, got {max_out}")
    return B, N


def _validate_flat(boxes: Tensor, scores: Tensor, idxs: Tensor | None) -> None:
    check_tensor("boxes", boxes, ndim=2, dtypes=FLOAT_DTYPES)
    if boxes.shape[1] != 4:
        raise OpValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES, device=boxes.device)
    if scores.shape[0] != boxes.shape[0]:
        raise OpValueError(f"scores must have shape [N] = [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if idxs is not None:
        check_tensor("idxs", idxs, ndim=1, dtypes=_IDX_DTYPES, device=boxes.device)
        if idxs.shape[0] != boxes.shape[0]:
            raise OpValueError(f"idxs must have shape [N] = [{boxes.shape[0]}], got {tuple(idxs.shape)}")


# ----------------------------------------------------------------------------------------------
# Greedy NMS of sorted rows: the Triton launcher and the torch path
# ----------------------------------------------------------------------------------------------


def _nms_sorted_triton(boxes, order, idxs, valid, threshold, max_out, keep, keep_valid, count):
    B, N = order.shape
    num_words = triton.cdiv(N, _WORD)
    mask = torch.empty((B, N, num_words), dtype=torch.int64, device=boxes.device)
    ix = idxs if idxs is not None else order
    grid = lambda meta: (num_words, triton.cdiv(N, meta["BLOCK_ROWS"]), B)
    _nms_mask_kernel[grid](
        boxes, order, ix, mask,
        N,
        boxes.stride(0), boxes.stride(1), boxes.stride(2), order.stride(0), order.stride(1),
        ix.stride(0), ix.stride(1), mask.stride(0), mask.stride(1), mask.stride(2),
        threshold,
        HAS_IDXS=idxs is not None, WORD=_WORD,
        enable_fp_fusion=False,  # no FMA: IoUs rounded operation by operation
    )  # fmt: skip
    words_pad = max(16, triton.next_power_of_2(num_words))
    v = valid if valid is not None else keep_valid
    _nms_sweep_kernel[(B,)](
        mask, order, v, keep, keep_valid, count,
        N, max_out,
        mask.stride(0), mask.stride(1), mask.stride(2), order.stride(0), order.stride(1),
        v.stride(0), v.stride(1), keep.stride(0), keep.stride(1), keep_valid.stride(0), keep_valid.stride(1),
        HAS_VALID=valid is not None, NUM_WORDS_PAD=words_pad, WORD=_WORD, OUT_BLOCK=_OUT_BLOCK,
    )  # fmt: skip


def _suppression_torch(a: Tensor, c: Tensor, threshold: float) -> Tensor:
    """``[..., m, n]`` bool: box ``a[..., i, :]`` suppresses box ``c[..., j, :]`` (the kernel's arithmetic,
    vectorized)."""
    acc = acc_dtype(a.dtype)
    iw = torch.minimum(a[..., :, None, 2], c[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], c[..., None, :, 0])
    ih = torch.minimum(a[..., :, None, 3], c[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], c[..., None, :, 1])
    inter = iw.clamp(min=0).to(acc) * ih.clamp(min=0).to(acc)
    area_a = (a[..., 2].to(acc) - a[..., 0].to(acc)) * (a[..., 3] - a[..., 1]).to(acc)
    area_c = (c[..., 2].to(acc) - c[..., 0].to(acc)) * (c[..., 3] - c[..., 1]).to(acc)
    return inter / (area_a[..., :, None] + area_c[..., None, :] - inter) > threshold


def _nms_sorted_torch(boxes, order, idxs, valid, threshold, max_out, keep, keep_valid, count):
    """The same block walk as the sweep kernel: per block of 64 sorted boxes, resolve the block with Python
    integer bitmasks, then let its kept boxes suppress the later boxes (one vectorized IoU per block)."""
    B, N = order.shape
    keep.zero_()
    lanes = torch.arange(_WORD, device=boxes.device)
    for b in range(B):
        sorted_boxes = boxes[b].index_select(0, order[b])
        cls = idxs[b].index_select(0, order[b]) if idxs is not None else None
        removed = torch.zeros(N, dtype=torch.bool, device=boxes.device)
        if valid is not None:
            removed |= ~valid[b].index_select(0, order[b])
        kept: list[int] = []
        for start in range(0, N, _WORD):
            if len(kept) >= max_out:
                break
            end = min(start + _WORD, N)
            blk = sorted_boxes[start:end]
            n = end - start
            sup = _suppression_torch(blk, blk, threshold) & (lanes[None, :n] > lanes[:n, None])
            if cls is not None:
                sup &= cls[start:end, None] == cls[None, start:end]
            # Words of the diagonal block (bit 63 is the sign bit: the sum of distinct powers never overflows).
            diag = [d & (2**64 - 1) for d in (sup.long() << lanes[:n]).sum(1).tolist()]
            w = sum(1 << t for t, r in enumerate(removed[start:end].tolist()) if r)
            new = []
            for t in range(n):
                if not (w >> t) & 1:
                    new.append(t)
                    w |= diag[t]
            kept += [start + t for t in new]
            if new and end < N:
                rows = blk[new]
                later = _suppression_torch(rows, sorted_boxes[end:], threshold)
                if cls is not None:
                    later &= cls[start:end][new][:, None] == cls[None, end:]
                removed[end:] |= later.any(0)
        kept = kept[:max_out]
        keep[b, : len(kept)] = order[b, kept]
        count[b] = len(kept)
    keep_valid.copy_(torch.arange(max_out, device=boxes.device)[None, :] < count[:, None])


def _nms_sorted_traced(boxes, order, idxs, valid, threshold, max_out):
    """Greedy NMS as a graph of static shapes, for fake tensors (``torch.export`` decomposing the op into aten
    ops for a CPU package): the whole ``[B, N, N]`` suppression matrix of the sorted boxes, then one
    ``while_loop`` step per sorted box (``alive &= ~(alive[i] & suppresses[i])``), exactly the greedy walk.
    Eager runs take the block walk of ``_nms_sorted_torch`` instead: a Python loop of N tensor steps costs
    1.6 s at N = 1000 eagerly, 29 ms once AOTInductor has compiled it (2 cores)."""
    B, N = order.shape
    sorted_boxes = torch.gather(boxes, 1, order[..., None].expand(B, N, 4))
    later = torch.ones((N, N), dtype=torch.bool, device=boxes.device).triu(1)
    sup = _suppression_torch(sorted_boxes, sorted_boxes, threshold) & later
    if idxs is not None:
        cls = torch.gather(idxs, 1, order)
        sup = sup & (cls[:, :, None] == cls[:, None, :])
    alive = torch.gather(valid, 1, order) if valid is not None else torch.ones_like(order, dtype=torch.bool)

    def step(i: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        row = sup.index_select(1, i.reshape(1))[:, 0]
        return i + 1, alive & ~(row & alive.index_select(1, i.reshape(1)))

    # The bound as a tensor: a Python int captured by the condition can reach inductor's while_loop lowering as an
    # int input, which it refuses (torch 2.14: "'int' object has no attribute 'meta'").
    n = torch.full((), N, dtype=torch.int64, device=boxes.device)
    _, alive = while_loop(lambda i, _: i < n, step, (torch.zeros((), dtype=torch.int64, device=boxes.device), alive))
    # The first max_out kept boxes, by rank; the others go to a spare column that is cut off.
    rank = alive.cumsum(1) - 1
    slot = torch.where(alive & (rank < max_out), rank, max_out)
    keep = torch.zeros((B, max_out + 1), dtype=torch.int64, device=boxes.device).scatter(1, slot, order)[:, :max_out]
    count = alive.sum(1).clamp(max=max_out)
    return keep, torch.arange(max_out, device=boxes.device)[None, :] < count[:, None], count


def _nms_sorted(boxes, order, idxs, valid, iou_threshold, max_out):
    """Greedy NMS of rows already sorted by ``order [B, N]``: ``(keep [B, max_out], keep_valid, count [B])``."""
    B, N = order.shape
    if N == 0 or max_out == 0:
        keep = torch.zeros((B, max_out), dtype=torch.int64, device=boxes.device)
        return keep, keep.bool(), torch.zeros((B,), dtype=torch.int64, device=boxes.device)
    threshold = _effective_threshold(iou_threshold, boxes.dtype, boxes.device)
    if backend_for(boxes) == "torch" and is_fake(boxes):
        return _nms_sorted_traced(boxes, order, idxs, valid, threshold, max_out)
    keep = torch.empty((B, max_out), dtype=torch.int64, device=boxes.device)
    keep_valid = torch.empty((B, max_out), dtype=torch.bool, device=boxes.device)
    count = torch.empty((B,), dtype=torch.int64, device=boxes.device)
    impl = _nms_sorted_triton if backend_for(boxes) == "triton" else _nms_sorted_torch
    impl(boxes, order, idxs, valid, threshold, max_out, keep, keep_valid, count)
    return keep, keep_valid, count


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mrcnn::nms_fixed", mutates_args=())
def _nms_fixed_op(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_out: int,
    valid: Tensor | None,
    idxs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(keep [B, max_out] int64, keep_valid [B, max_out] bool)``; see ``nms_fixed``."""
    _validate_fixed(boxes, scores, max_out, valid, idxs)
    order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
    keep, keep_valid, _ = _nms_sorted(boxes, order, idxs, valid, iou_threshold, max_out)
    return keep, keep_valid


@_nms_fixed_op.register_fake
def _(boxes, scores, iou_threshold, max_out, valid, idxs):
    B, _ = _validate_fixed(boxes, scores, max_out, valid, idxs)
    return boxes.new_empty((B, max_out), dtype=torch.int64), boxes.new_empty((B, max_out), dtype=torch.bool)


@torch.library.custom_op("mrcnn::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    """Kept indices ``[M]`` int64 in decreasing score order; per class when ``idxs`` is given."""
    _validate_flat(boxes, scores, idxs)
    N = boxes.shape[0]
    if N == 0:
        return boxes.new_empty((0,), dtype=torch.int64)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]  # torchvision's sort
    keep, _, count = _nms_sorted(boxes[None], order[None], None if idxs is None else idxs[None], None,
                                 iou_threshold, N)  # fmt: skip
    # The one host read of nms/batched_nms (torchvision copies its whole mask to the host instead).
    return keep[0, : int(count[0])]


@_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    _validate_flat(boxes, scores, idxs)
    # No max=N: under dynamic shapes N is symbolic, and the bound must be a plain int.
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


# torchvision's autocast rule: half boxes are suppressed as their float32 values are (bfloat16 IoUs would decide
# boxes near the threshold differently).
register_autocast("nms", upcast=True)
register_autocast("nms_fixed", upcast=True)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms``: greedy NMS, the same kept indices in the same order.

    Args:
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64.
        scores: ``Tensor[N]`` float.
        iou_threshold: a box is discarded when its IoU with a kept higher-scoring box is ``> iou_threshold``.

    Returns:
        ``Tensor[M]`` int64 indices of the kept boxes, by decreasing score.

    Scriptable. Quantized boxes and scores (CPU, as torchvision) are suppressed as their dequantized values are:
    torchvision's quantized NMS, which works on the integer values, decides the same up to float rounding.
    """
    if not torch.jit.is_scripting() and boxes.is_quantized:
        boxes, scores = boxes.dequantize(), scores.dequantize()
    return torch.ops.mrcnn.nms(boxes, scores, None, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms``: NMS within each category ``idxs: Tensor[N]`` (int32/int64).

    Args and result as ``nms``; boxes of different categories never suppress each other. As torchvision,
    empty ``boxes`` give an empty result before the other arguments are looked at.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return torch.ops.mrcnn.nms(boxes, scores, idxs, float(iou_threshold))


def nms_fixed(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_out: int,
    *,
    valid: Tensor | None = None,
    idxs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched greedy NMS with a fixed-size result and no host synchronisation (CUDA graphs, ``fullgraph``).

    On a GPU the first call with new flags, dtypes or ``ceil(N/64)`` power-of-two bucket autotunes the kernels,
    which synchronises the host once: capture a CUDA graph after such a call (warm-up), not during it.

    Per row ``b``: the first ``max_out`` indices that ``nms(boxes[b][valid[b]], ...)`` (or ``batched_nms``
    with ``idxs[b]``) would keep, as indices into ``boxes[b]``, by decreasing score, padded.

    Args:
        boxes: ``Tensor[B, N, 4]`` ``(x1, y1, x2, y2)``.
        scores: ``Tensor[B, N]``.
        iou_threshold: as in ``nms``.
        max_out: the number of slots per row.
        valid: optional ``Tensor[B, N]`` bool; a False box is never kept and never suppresses another.
        idxs: optional ``Tensor[B, N]`` int class ids; suppression only within a class.

    Returns:
        ``(keep: Tensor[B, max_out] int64, keep_valid: Tensor[B, max_out] bool)``; a padded slot holds 0
        with ``keep_valid`` False, and the kept slots come first.
    """
    return torch.ops.mrcnn.nms_fixed(boxes, scores, float(iou_threshold), int(max_out), valid, idxs)
