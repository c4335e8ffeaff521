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
has no FMA contraction (its products are ``mul_rn``, whoever compiles it); nvcc may contract torchvision's
``area_i + area_j`` into an FMA, so on CUDA an IoU within an ulp of the threshold may be decided
differently. On CPU the results are bit-identical. Half inputs follow torchvision's CUDA kernel (its CPU
kernel has none); bfloat16 (neither has one) follows the same rule.

Two kernels, as torchvision's CUDA NMS but with the greedy walk on the device (``_nms_kernels``): a
bit matrix of "sorted box i suppresses sorted box j" and a sweep of it. On CPU, the greedy walk in torch
(``_nms_torch``): class by class, in blocks of sorted boxes, suppressed boxes dropped after each block, IoU
tiles of bounded size (never the N x N matrix).

Order: ``torch.sort(scores, descending=True, stable=True)``, torchvision's own sort (stable since 0.12,
on CPU and CUDA), so equal scores are taken by increasing index and ``nms`` returns exactly torchvision's
indices in torchvision's order, ties included, on every device; ``nms_fixed`` sorts each row the same way.
The output size of ``nms`` / ``batched_nms`` depends on the data, so their op (``mrcnn::nms``) reads the
kept count on the host once (torchvision copies its whole mask to the host instead) and its fake uses
``new_dynamic_size()``: under ``torch.compile`` it is an opaque node with a data-dependent size.
``nms_fixed`` is the op without that read.

``batched_nms`` suppresses only within a class (no coordinate offsets). That is torchvision's
``_batched_nms_coordinate_trick`` (its path below a size threshold: 4000 coordinates on CPU, 100000 on
CUDA in 0.26-0.29), ties included, whenever adding the class offsets to the coordinates is exact in the boxes'
dtype (e.g. coordinates on a 1/8 pixel grid); otherwise the offsets perturb torchvision's IoUs by
rounding, and an IoU within that rounding of the threshold can be decided differently. Above the
threshold (and not under ``torch.jit.trace``) torchvision runs ``nms`` per class (``_batched_nms_vanilla``):
the same kept boxes, which it then re-sorts by score with torch's unstable sort, so that equal scores leave
index order. ``batched_nms`` makes the same calls on the same values there (``keep.sort()``, then
``scores[keep].sort(descending=True)``): its order is torchvision's, ties included, with the torch that
torchvision runs on. ``nms_fixed`` keeps ``nms``'s stable order at every size.

Invalid values (documented and tested): a box with a NaN coordinate has a NaN area, so it neither
suppresses nor is suppressed, and is kept in its score's place; NaN scores sort first (``torch.sort``)
and are kept first, as in torchvision. In ``nms_fixed``, a box whose ``valid`` flag is False is never
kept and never suppresses another; padded slots of ``keep`` hold 0 with ``keep_valid`` False.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._backend import LINEAR_KERNEL_ANALYSIS, triton_custom_op
from ._contract import FLOAT_DTYPES, OpValueError, acc_dtype, check_tensor
from ._nms_kernels import forward_triton
from ._nms_torch import forward_torch, forward_traced

__all__ = ["nms", "batched_nms", "nms_fixed"]

_IDX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# Validation
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
# Registration
# ----------------------------------------------------------------------------------------------


def _nms_sorted(boxes, order, idxs, valid, iou_threshold, max_out, backend):
    """Greedy NMS of rows already sorted by ``order [B, N]``: ``(keep [B, max_out], keep_valid, count [B])``."""
    B, N = order.shape
    if N == 0 or max_out == 0:
        keep = torch.zeros((B, max_out), dtype=torch.int64, device=boxes.device)
        return keep, keep.bool(), torch.zeros((B,), dtype=torch.int64, device=boxes.device)
    threshold = _effective_threshold(iou_threshold, boxes.dtype, boxes.device)
    if backend == "torch" and is_fake(boxes):
        return forward_traced(boxes, order, idxs, valid, threshold, max_out)
    impl = forward_triton if backend == "triton" else forward_torch
    return impl(boxes, order, idxs, valid, threshold, max_out)


# torchvision's autocast rule: half boxes are suppressed as their float32 values are (bfloat16 IoUs would decide
# boxes near the threshold differently). Inlined into CUDA graphs only where inductor's kernel analysis terminates
# for the NMS kernels (LINEAR_KERNEL_ANALYSIS); elsewhere a compiled CUDA graph calls the opaque op.
@triton_custom_op("nms_fixed", autocast="float32", traceable=True, inline_on_cuda=LINEAR_KERNEL_ANALYSIS)
def _nms_fixed_op(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_out: int,
    valid: Tensor | None,
    idxs: Tensor | None,
    *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(keep [B, max_out] int64, keep_valid [B, max_out] bool)``; see ``nms_fixed``."""
    _validate_fixed(boxes, scores, max_out, valid, idxs)
    order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
    keep, keep_valid, _ = _nms_sorted(boxes, order, idxs, valid, iou_threshold, max_out, backend)
    return keep, keep_valid


@_nms_fixed_op.register_fake
def _(boxes, scores, iou_threshold, max_out, valid, idxs):
    B, _ = _validate_fixed(boxes, scores, max_out, valid, idxs)
    return boxes.new_empty((B, max_out), dtype=torch.int64), boxes.new_empty((B, max_out), dtype=torch.bool)


# Opaque on CUDA too: its output size is the data's, so no graph can trace into it.
@triton_custom_op("nms", autocast="float32", inline_on_cuda=False)
def _nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, *, backend: str) -> Tensor:
    """Kept indices ``[M]`` int64 in decreasing score order; per class when ``idxs`` is given."""
    _validate_flat(boxes, scores, idxs)
    N = boxes.shape[0]
    if N == 0:
        return boxes.new_empty((0,), dtype=torch.int64)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]  # torchvision's sort
    keep, _, count = _nms_sorted(boxes[None], order[None], None if idxs is None else idxs[None], None,
                                 iou_threshold, N, backend)  # fmt: skip
    # The one host read of nms/batched_nms (torchvision copies its whole mask to the host instead).
    return keep[0, : int(count[0])]


@_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    _validate_flat(boxes, scores, idxs)
    # No max=N: under dynamic shapes N is symbolic, and the bound must be a plain int.
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)



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
    empty ``boxes`` give an empty result before the other arguments are looked at, and equal scores come in
    its order: by increasing index up to its size threshold (4000 coordinates on CPU, 100000 elsewhere), as
    its unstable re-sort leaves them above it (module docstring).
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep = torch.ops.mrcnn.nms(boxes, scores, idxs, float(iou_threshold))
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000) and not torch.jit.is_tracing():
        # torchvision's batched_nms above this size (its _batched_nms_vanilla; the thresholds of 0.26 and 0.29): nms
        # per class, then the kept indices, increasing, re-sorted by score with torch's unstable sort. The same
        # calls on the same values give its order of equal scores.
        keep = keep.sort()[0]
        keep = keep[scores[keep].sort(descending=True)[1]]
    return keep


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
    with ``idxs[b]``) would keep, as indices into ``boxes[b]``, by decreasing score, padded; equal scores by
    increasing index (``nms``'s order; ``batched_nms`` above its size threshold orders them as torchvision).

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
