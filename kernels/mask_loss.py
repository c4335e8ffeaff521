"""Fused Mask R-CNN mask loss: mask targets sampled from the GT masks + sigmoid BCE, forward and backward.

Two entry points:

* ``maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)``: a drop-in for
  ``torchvision.models.detection.roi_heads.maskrcnn_loss`` (lists per image, same result).
* ``mask_loss(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, ...)``: the static-shape
  op the model uses (padded masks, a fixed number of RoI slots with weights).

Kernels and their layout: ``_mask_loss_kernels``; the CPU torch path: ``_mask_loss_torch``.

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

from ._backend import triton_custom_op
from ._contract import FLOAT_DTYPES, OpValueError, acc_dtype, check_sampling_ratio, check_tensor
from ._mask_loss_kernels import backward_triton, forward_triton
from ._mask_loss_torch import backward_torch, forward_torch

__all__ = ["mask_loss", "maskrcnn_loss"]

EPS = 1e-12
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.uint8, torch.bool, *FLOAT_DTYPES)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _validate(
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
# Registration
# ----------------------------------------------------------------------------------------------


# Under autocast the loss is computed from float32 logits and is a float32 scalar, as torchvision's (its
# binary_cross_entropy_with_logits runs in float32 under autocast): a bfloat16 loss would keep 3 digits.
@triton_custom_op("mask_loss", autocast="float32")
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
    *,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [] logits' dtype, dlogits [R, M, M] acc, weight_sum [] acc)``; see the module docstring.

    ``dlogits[r] = a_r w_r / M^2 (sigmoid(x_r) - t_r)``: the gradient of the label channel is
    ``dlogits * grad_loss / max(weight_sum, eps)``.
    """
    _validate(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes)
    check_sampling_ratio(sampling_ratio)
    acc = acc_dtype(logits.dtype)
    impl = forward_triton if backend == "triton" else forward_torch
    loss_rows, weight_rows, dlogits = impl(
        logits, boxes, gt_masks, mask_sizes, image_idx, matched_idx, labels, weights,
        binarize, aligned, sampling_ratio, acc,
    )  # fmt: skip
    weight_sum = weight_rows.sum()
    loss = (loss_rows.sum() / weight_sum.clamp_min(EPS)).to(logits.dtype)
    return loss, dlogits, weight_sum


@_mask_loss_op.register_fake
def _(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes, binarize, aligned, sampling_ratio):
    _validate(logits, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes)
    check_sampling_ratio(sampling_ratio)
    acc = acc_dtype(logits.dtype)
    R, M = logits.shape[0], logits.shape[-1]
    return logits.new_empty(()), logits.new_empty((R, M, M), dtype=acc), logits.new_empty((), dtype=acc)


@triton_custom_op("mask_loss_backward", autocast="keep")
def _mask_loss_backward_op(
    grad_loss: Tensor,
    dlogits: Tensor,
    weight_sum: Tensor,
    labels: Tensor,
    num_classes: int,
    dtype: torch.dtype,
    *,
    backend: str,
) -> Tensor:
    """Gradient ``[R, num_classes, M, M]`` of ``mask_loss`` w.r.t. the logits, in ``dtype``."""
    impl = backward_triton if backend == "triton" else backward_torch
    return impl(grad_loss, dlogits, weight_sum, labels, num_classes, dtype, EPS)


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
    return grad, *[None] * 10


_mask_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
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
