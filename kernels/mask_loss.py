"""Fused Mask R-CNN mask loss: mask targets sampled from the GT masks + sigmoid BCE, forward and backward.

Two entry points:

* ``maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)``: a drop-in for
  ``torchvision.models.detection.roi_heads.maskrcnn_loss`` (lists per image, same result).
* ``mask_loss(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, ...)``: the static-shape
  op the model uses (padded masks, a fixed number of RoI slots with weights).

Definition (``mask_loss``). With ``logits [R, K, M, M]``, RoI ``r`` is *active* when
``0 <= image_idx[r] < B``, ``0 <= matched_idx[r] < G``, ``0 <= labels[r] < K`` and ``weights[r] != 0``;
let ``a_r = 1`` if active else 0. Its target ``t_r [M, M]`` is RoIAlign (avg mode, torchvision's
math: ``spatial_scale = 1``, the given ``sampling_ratio`` and ``aligned``) of the single-channel map
``gt_masks[image_idx[r], matched_idx[r]]`` (values as numbers: uint8 0/1, bool, or float) over
``boxes[r] = (x1, y1, x2, y2)`` in mask pixels, restricted to the top-left ``mask_sizes[b]`` corner of
the padded masks when ``mask_sizes`` is given (the mask's true extent: torchvision samples each
image's own, unpadded masks). With ``binarize=True`` the target is ``t >= 0.5`` (detectron2/mmdet;
the Triton kernel and the torch path sum the samples in different orders, so a soft target within
float rounding of 0.5 may binarise differently between them).
Then, with ``x = logits[r, labels[r]]`` and ``bce(x, t) = max(x, 0) - x*t + log1p(exp(-|x|))``::

    loss = sum_r a_r * w_r * mean_ij bce(x_rij, t_rij) / max(sum_r a_r * w_r, eps),   eps = 1e-12

computed in float32 (float64 for float64 logits) and returned in the logits' dtype. With every
weight 1 this is torchvision's mean over all ``R*M*M`` pixels. An inactive RoI (padded slot, or an
index out of range) contributes nothing to either sum and gets an exactly zero gradient; its box, mask
and logits are never used (NaN there is harmless; the Triton kernel does not even load them) and no
address is formed from an out-of-range index. A box with a non-finite coordinate samples nothing
(target 0, as ``kernels.roi_align`` gives 0 for it); the RoI still counts. No RoI at all (or all
inactive) gives 0 with a zero gradient (torchvision: ``mask_logits.sum() * 0``).
Weights are expected to be >= 0 (not checked: that would need a host sync).

Gradient: w.r.t. ``logits`` only (``a_r w_r / (M^2 max(sum a w, eps)) * (sigmoid(x) - t)`` on channel
``labels[r]``, zeros elsewhere). The forward stores the label channel's ``a_r w_r / M^2 (sigmoid - t)``
(``[R, M, M]`` in the accumulation dtype: 0.8 MB at 256 x 28 x 28) so the backward is one
bandwidth-bound launch that writes the whole gradient once (see ``_mask_loss_kernels``).

Determinism: per-RoI partial sums go to a buffer and are summed by torch in a fixed order; there are
no float atomics, so the loss and gradient are bitwise reproducible.

Registered ops (namespace ``mrcnn``, for ``torch.library.opcheck``):

* ``mask_loss(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes, binarize,
  aligned, sampling_ratio) -> (loss [], dlogits [R, M, M], weight_sum [])``
* ``mask_loss_backward(grad_loss, dlogits, weight_sum, labels, num_classes, dtype) -> grad [R, K, M, M]``
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _mask_loss_kernels as _k
from ._backend import (
    FLOAT_DTYPES,
    OpValueError,
    acc_dtype,
    backend_for,
    check_sampling_ratio,
    check_tensor,
    register_autocast,
)

__all__ = ["mask_loss", "maskrcnn_loss"]

EPS = 1e-12
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.uint8, torch.bool, *FLOAT_DTYPES)
# The torch path gathers mask crops in chunks of at most this many elements (64 MB in float32).
_CROP_CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_inputs(
    logits: Tensor,
    boxes: Tensor,
    gt_masks: Tensor,
    image_idx: Tensor,
    matched_idx: Tensor,
    labels: Tensor,
    weights: Tensor,
    mask_sizes: Tensor | None,
) -> None:
    check_tensor("logits", logits, ndim=4, dtypes=FLOAT_DTYPES)
    dev = logits.device
    R, _, M, M2 = logits.shape
    if M != M2 or M == 0:
        raise OpValueError(f"logits must be [R, K, M, M] with M > 0, got shape {tuple(logits.shape)}")
    check_tensor("boxes", boxes, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if boxes.shape[0] != R or boxes.shape[1] != 4:
        raise OpValueError(f"boxes must be [R, 4] with R = {R} (logits' first dimension), got {tuple(boxes.shape)}")
    check_tensor("gt_masks", gt_masks, ndim=4, dtypes=MASK_DTYPES, device=dev)
    for name, t in (("image_idx", image_idx), ("matched_idx", matched_idx), ("labels", labels)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        if t.shape[0] != R:
            raise OpValueError(f"{name} must have R = {R} entries (logits' first dimension), got {t.shape[0]}")
    check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
    if weights.shape[0] != R:
        raise OpValueError(f"weights must have R = {R} entries (logits' first dimension), got {weights.shape[0]}")
    if mask_sizes is not None:
        check_tensor("mask_sizes", mask_sizes, ndim=2, dtypes=INDEX_DTYPES, device=dev)
        if mask_sizes.shape[0] != gt_masks.shape[0] or mask_sizes.shape[1] != 2:
            raise OpValueError(f"mask_sizes must be [B, 2] with B = {gt_masks.shape[0]}, got {tuple(mask_sizes.shape)}")


# ----------------------------------------------------------------------------------------------
# Torch implementation (CPU default): the same math, vectorised
# ----------------------------------------------------------------------------------------------


def _axis_weights(
    lo: Tensor, hi: Tensor, size: Tensor, ok: Tensor, M: int, aligned: bool, sampling_ratio: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear sampling along one axis as a matrix on a crop of the mask.

    The RoIAlign average of a bin is separable: ``t[i, j] = sum_(p,q) Wy[i, p] mask[p, q] Wx[j, q] /
    count``, where ``Wy[i, p]`` sums the y-weights of bin row ``i``'s samples on mask row ``p``. Returns
    ``(weights [R, M, C], origin [R], grid [R])``: weights on mask rows ``origin .. origin + C - 1`` (C is
    the longest crop of the batch), and the samples per bin side.
    """
    R, dt = lo.shape[0], lo.dtype
    offset = 0.5 if aligned else 0.0
    start = lo - offset
    length = (hi - offset) - start  # torchvision's operation order
    if not aligned:
        length = length.clamp_min(1.0)
    bin_size = length / M
    if sampling_ratio > 0:
        grid = torch.full_like(lo, sampling_ratio, dtype=torch.int64)
    else:
        grid = torch.ceil(bin_size).clamp(0, _k.MAX_ADAPTIVE_SAMPLES.value).to(torch.int64)
    grid = torch.where(ok, grid, 0)
    n = max(int(grid.max()), 1)
    s = torch.arange(n, dtype=dt, device=lo.device)
    pos = (
        start[:, None, None]
        + torch.arange(M, dtype=dt, device=lo.device)[None, :, None] * bin_size[:, None, None]
        + (s + 0.5)[None, None, :] * bin_size[:, None, None] / grid.clamp_min(1)[:, None, None]
    )
    size = size[:, None, None]
    inside = (s[None, None, :] < grid[:, None, None]) & (pos >= -1) & (pos <= size) & (size > 0)
    c = torch.where(inside, pos.clamp_min(0.0), 0.0)
    low = c.to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    frac = torch.where(edge, low.to(dt), c) - low
    big = torch.iinfo(torch.int64).max
    origin = torch.where(inside, low, big).amin(dim=(1, 2))
    origin = torch.where(origin == big, 0, origin)
    last = torch.where(inside, high, -1).amax(dim=(1, 2))
    C = int((last - origin).max().clamp_min(0)) + 1
    weights = torch.zeros((R, M, C), dtype=dt, device=lo.device)
    weights.scatter_add_(2, (low - origin[:, None, None]).clamp(0, C - 1), torch.where(inside, 1.0 - frac, 0.0))
    weights.scatter_add_(2, (high - origin[:, None, None]).clamp(0, C - 1), torch.where(inside, frac, 0.0))
    return weights, origin, grid


def _targets_torch(
    boxes: Tensor,
    gt_masks: Tensor,
    mask_sizes: Tensor | None,
    b: Tensor,
    g: Tensor,
    active: Tensor,
    M: int,
    aligned: bool,
    sampling_ratio: int,
) -> Tensor:
    """Soft targets ``[R, M, M]`` of the RoIs (zeros for inactive ones), ``boxes`` in the acc dtype."""
    R, dt = boxes.shape[0], boxes.dtype
    B, G, H, W = gt_masks.shape
    if gt_masks.numel() == 0:
        return boxes.new_zeros((R, M, M))
    ok = active & torch.isfinite(boxes).all(dim=1)
    boxes = torch.where(ok[:, None], boxes, 0.0)
    if mask_sizes is None:
        h = torch.full_like(b, H)
        w = torch.full_like(b, W)
    else:
        sizes = mask_sizes[b].to(torch.int64)
        h, w = sizes[:, 0].clamp(0, H), sizes[:, 1].clamp(0, W)
    wy, y0, gy = _axis_weights(boxes[:, 1], boxes[:, 3], h, ok, M, aligned, sampling_ratio)
    wx, x0, gx = _axis_weights(boxes[:, 0], boxes[:, 2], w, ok, M, aligned, sampling_ratio)
    # Crops are gathered with one flat (row-major, logical) index: ~2x faster than four broadcast indices.
    rows = (y0[:, None] + torch.arange(wy.shape[2], device=b.device)).clamp(0, H - 1)
    cols = (x0[:, None] + torch.arange(wx.shape[2], device=b.device)).clamp(0, W - 1)
    row_index = ((b * G + g)[:, None] * H + rows) * W
    out = boxes.new_empty((R, M, M))
    chunk = max(1, _CROP_CHUNK // (wy.shape[2] * wx.shape[2]))
    for i in range(0, R, chunk):
        sl = slice(i, i + chunk)
        crop = torch.take(gt_masks, row_index[sl, :, None] + cols[sl, None, :]).to(dt)
        out[sl] = torch.bmm(torch.bmm(wy[sl], crop), wx[sl].transpose(1, 2))
    return out / (gy * gx).clamp_min(1)[:, None, None]


def _forward_torch(
    logits: Tensor,
    boxes: Tensor,
    gt_masks: Tensor,
    mask_sizes: Tensor | None,
    image_idx: Tensor,
    matched_idx: Tensor,
    labels: Tensor,
    weights: Tensor,
    binarize: bool,
    aligned: bool,
    sampling_ratio: int,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss_rows [R, M], weight_rows [R], dlogits [R, M, M])`` as the forward kernel writes them."""
    R, K, M = logits.shape[0], logits.shape[1], logits.shape[-1]
    B, G = gt_masks.shape[:2]
    w = weights.to(acc)
    active = (image_idx >= 0) & (image_idx < B) & (matched_idx >= 0) & (matched_idx < G)
    active &= (labels >= 0) & (labels < K) & (w != 0)
    if R == 0 or K == 0:  # K == 0: no label is valid, nothing is active
        return logits.new_zeros((R, M), dtype=acc), w.new_zeros((R,)), logits.new_zeros((R, M, M), dtype=acc)
    b = torch.where(active, image_idx, 0).to(torch.int64)
    g = torch.where(active, matched_idx, 0).to(torch.int64)
    label = torch.where(active, labels, 0).to(torch.int64)
    t = _targets_torch(boxes.to(acc), gt_masks, mask_sizes, b, g, active, M, aligned, sampling_ratio)
    if binarize:
        t = (t >= 0.5).to(acc)
    live = active[:, None, None]
    x = torch.where(live, logits[torch.arange(R, device=logits.device), label].to(acc), 0.0)
    e = torch.exp(-x.abs())
    bce = x.clamp_min(0.0) - x * t + torch.log1p(e)
    sigmoid = torch.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    scale = torch.where(active, w, 0.0) / (M * M)
    loss_rows = torch.where(live, bce, 0.0).sum(dim=2) * scale[:, None]
    dlogits = torch.where(live, (sigmoid - t) * scale[:, None, None], 0.0)
    return loss_rows, torch.where(active, w, 0.0), dlogits


def _backward_torch(
    grad_loss: Tensor, dlogits: Tensor, weight_sum: Tensor, labels: Tensor, num_classes: int, dtype: torch.dtype
) -> Tensor:
    R, M = dlogits.shape[0], dlogits.shape[-1]
    grad = dlogits.new_zeros((R, num_classes, M, M), dtype=dtype)
    if grad.numel() == 0:
        return grad
    scale = grad_loss.to(dlogits.dtype) / weight_sum.clamp_min(EPS)
    hit = (labels >= 0) & (labels < num_classes)
    # A label out of range matches no channel: write its (zero) row to channel 0, which is zero anyway.
    vals = torch.where(hit[:, None, None], dlogits * scale, 0.0)
    grad[torch.arange(R, device=grad.device), torch.where(hit, labels, 0)] = vals.to(dtype)
    return grad


# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mrcnn::mask_loss", mutates_args=())
def _mask_loss_op(
    logits: Tensor,
    boxes: Tensor,
    gt_masks: Tensor,
    image_idx: Tensor,
    matched_idx: Tensor,
    labels: Tensor,
    weights: Tensor,
    mask_sizes: Tensor | None,
    binarize: bool,
    aligned: bool,
    sampling_ratio: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [] logits' dtype, dlogits [R, M, M] acc, weight_sum [] acc)``; see the module docstring.

    ``dlogits[r] = a_r w_r / M^2 (sigmoid(x_r) - t_r)``: the gradient of the label channel is
    ``dlogits * grad_loss / max(weight_sum, eps)``.
    """
    _check_inputs(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes)
    check_sampling_ratio(sampling_ratio)
    acc = acc_dtype(logits.dtype)
    impl = _k.forward_triton if backend_for(logits) == "triton" else _forward_torch
    loss_rows, weight_rows, dlogits = impl(
        logits, boxes, gt_masks, mask_sizes, image_idx, matched_idx, labels, weights,
        binarize, aligned, sampling_ratio, acc,
    )  # fmt: skip
    weight_sum = weight_rows.sum()
    loss = (loss_rows.sum() / weight_sum.clamp_min(EPS)).to(logits.dtype)
    return loss, dlogits, weight_sum


@_mask_loss_op.register_fake
def _(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes, binarize, aligned, sampling_ratio):
    _check_inputs(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes)
    check_sampling_ratio(sampling_ratio)
    acc = acc_dtype(logits.dtype)
    R, M = logits.shape[0], logits.shape[-1]
    return logits.new_empty(()), logits.new_empty((R, M, M), dtype=acc), logits.new_empty((), dtype=acc)


@torch.library.custom_op("mrcnn::mask_loss_backward", mutates_args=())
def _mask_loss_backward_op(
    grad_loss: Tensor, dlogits: Tensor, weight_sum: Tensor, labels: Tensor, num_classes: int, dtype: torch.dtype
) -> Tensor:
    """Gradient ``[R, num_classes, M, M]`` of ``mask_loss`` w.r.t. the logits, in ``dtype``."""
    impl = _backward_triton if backend_for(dlogits) == "triton" else _backward_torch
    return impl(grad_loss, dlogits, weight_sum, labels, num_classes, dtype)


def _backward_triton(
    grad_loss: Tensor, dlogits: Tensor, weight_sum: Tensor, labels: Tensor, num_classes: int, dtype: torch.dtype
) -> Tensor:
    return _k.backward_triton(grad_loss, dlogits, weight_sum, labels, num_classes, dtype, EPS)


@_mask_loss_backward_op.register_fake
def _(grad_loss, dlogits, weight_sum, labels, num_classes, dtype):
    return dlogits.new_empty((dlogits.shape[0], num_classes, dlogits.shape[1], dlogits.shape[2]), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels = inputs[0], inputs[5]
    _, dlogits, weight_sum = output
    ctx.save_for_backward(dlogits, weight_sum, labels)
    ctx.num_classes = logits.shape[1]
    ctx.dtype = logits.dtype
    ctx.mark_non_differentiable(dlogits, weight_sum)


def _backward(ctx, grad_loss, _grad_dlogits, _grad_weight_sum):
    dlogits, weight_sum, labels = ctx.saved_tensors
    grad = torch.ops.mrcnn.mask_loss_backward(grad_loss, dlogits, weight_sum, labels, ctx.num_classes, ctx.dtype)
    return grad, None, None, None, None, None, None, None, None, None, None


_mask_loss_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the loss is computed from float32 logits and is a float32 scalar, as torchvision's (its
# binary_cross_entropy_with_logits runs in float32 under autocast): a bfloat16 loss would keep 3 digits.
register_autocast("mask_loss", upcast=True)
register_autocast("mask_loss_backward", upcast=False)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def mask_loss(
    logits: Tensor,
    boxes: Tensor,
    gt_masks: Tensor,
    image_idx: Tensor,
    matched_idx: Tensor,
    labels: Tensor,
    weights: Tensor,
    binarize: bool = False,
    aligned: bool = False,
    sampling_ratio: int = -1,
    mask_sizes: Tensor | None = None,
) -> Tensor:
    """Fused mask loss over a fixed number of RoI slots (definition in the module docstring).

    Args:
        logits: Tensor[R, K, M, M] float16/bfloat16/float32/float64, any strides; only channel
            ``labels[r]`` of RoI ``r`` is read.
        boxes: Tensor[R, 4] float ``(x1, y1, x2, y2)`` in mask (image) pixels.
        gt_masks: Tensor[B, G, H, W] uint8 (0/1), bool or float; padded GT masks per image.
        image_idx: Tensor[R] int32/int64, the image of each RoI.
        matched_idx: Tensor[R] int32/int64, the GT (index into ``G``) each RoI is matched to.
        labels: Tensor[R] int32/int64, the class whose logit channel is trained.
        weights: Tensor[R] float, >= 0; 0 marks a padded slot.
        binarize: targets ``>= 0.5`` (detectron2/mmdet) instead of torchvision's soft targets.
        aligned: RoIAlign's half-pixel offset (torchvision's mask targets use False).
        sampling_ratio: samples per bin side; ``<= 0``: adaptive ``ceil(box size / M)``.
        mask_sizes: Tensor[B, 2] int (height, width) of each image's unpadded masks, or None (full).

    Returns:
        Tensor[] scalar in the logits' dtype, differentiable w.r.t. ``logits``.

    Scriptable; pass the arguments after ``weights`` by keyword (TorchScript has no keyword-only ones).
    """
    if not torch.jit.is_scripting():
        sampling_ratio = check_sampling_ratio(sampling_ratio)
    return torch.ops.mrcnn.mask_loss(
        logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes, binarize, aligned, sampling_ratio
    )[0]


def _batch_masks(gt_masks: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Per-image masks ``[G_i, H_i, W_i]`` as one padded ``[B, G, H, W]`` tensor (a view for one image)
    and, when the images' mask sizes differ, their true sizes ``[B, 2]``. (Loops, not generators: scriptable.)"""
    if len(gt_masks) == 1:
        return gt_masks[0][None], None
    G, H, W = 0, 0, 0
    for m in gt_masks:
        G, H, W = max(G, m.shape[0]), max(H, m.shape[1]), max(W, m.shape[2])
    masks = gt_masks[0].new_zeros((len(gt_masks), G, H, W))
    sizes: list[list[int]] = []
    same_size = True
    for i, m in enumerate(gt_masks):
        masks[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
        sizes.append([m.shape[1], m.shape[2]])
        same_size = same_size and m.shape[1] == H and m.shape[2] == W
    if same_size:
        return masks, None
    return masks, torch.tensor(sizes, dtype=torch.int64, device=masks.device)


def maskrcnn_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
) -> Tensor:
    """torchvision's ``maskrcnn_loss``: soft RoIAlign targets (M x M, adaptive sampling, not aligned) and
    the mean sigmoid BCE of each RoI's label channel, fused; gradient w.r.t. ``mask_logits``.

    Args:
        mask_logits: Tensor[R, K, M, M] with ``R = sum_i P_i``.
        proposals: list of Tensor[P_i, 4] per image (x1, y1, x2, y2).
        gt_masks: list of Tensor[G_i, H_i, W_i] per image (uint8, bool or float).
        gt_labels: list of Tensor[G_i] int per image.
        mask_matched_idxs: list of Tensor[P_i] int per image, indices into that image's GT.

    Returns:
        Tensor[] scalar (``mask_logits.sum() * 0`` when there is no RoI, as torchvision).

    The per-image masks are copied once into a padded uint8 batch (none for a single image) instead of
    torchvision's float copy of every mask.
    """
    if not torch.jit.is_scripting() and len(gt_labels) != len(mask_matched_idxs):
        raise OpValueError(f"gt_labels and mask_matched_idxs must have one entry per image, got "
                           f"{len(gt_labels)} and {len(mask_matched_idxs)}")  # fmt: skip
    labels = torch.cat([gt_labels[i][idx] for i, idx in enumerate(mask_matched_idxs)])
    boxes = torch.cat(proposals)
    matched = torch.cat(mask_matched_idxs)
    image_idx = torch.cat([torch.full_like(idx, i) for i, idx in enumerate(mask_matched_idxs)])
    masks, sizes = _batch_masks(gt_masks)
    weights = torch.ones(boxes.shape[0], dtype=boxes.dtype, device=boxes.device)
    return mask_loss(mask_logits, boxes, masks, image_idx, matched, labels, weights, mask_sizes=sizes)
