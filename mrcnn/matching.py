"""Static-shape matching and sampling: torchvision's Matcher and BalancedPositiveNegativeSampler
without ``nonzero``, boolean indexing or host syncs. Every set is a fixed number of slots plus a mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``Tensor[B, N, M]`` of ``boxes1: Tensor[B, N, 4]`` and ``boxes2: Tensor[B, M, 4]``, torchvision's formula."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union


def match(
    iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool
) -> tuple[Tensor, Tensor]:
    """torchvision's ``Matcher`` on a padded quality matrix.

    Args:
        iou: ``Tensor[B, N, G]`` IoU of N predictions with G (padded) ground-truth boxes.
        gt_valid: ``Tensor[B, G]`` bool; padded ground truth never matches.

    Returns:
        ``(matches: Tensor[B, N] int64, matched: Tensor[B, N] int64)``: ``matches`` holds a GT index,
        ``BELOW_LOW_THRESHOLD`` or ``BETWEEN_THRESHOLDS``; ``matched`` is the GT index clamped to >= 0
        (for gathering targets). An image without ground truth matches nothing (all background).
    """
    iou = torch.where(gt_valid[:, None, :], iou, -1.0)
    vals, idx = iou.max(dim=2)
    matches = torch.where(vals < low, BELOW_LOW_THRESHOLD, torch.where(vals < high, BETWEEN_THRESHOLDS, idx))
    if allow_low_quality_matches:
        # Every prediction that ties for a GT's best quality keeps its own best match.
        best_per_gt = iou.max(dim=1).values
        is_best = ((iou == best_per_gt[:, None, :]) & gt_valid[:, None, :]).any(dim=2)
        matches = torch.where(is_best, idx, matches)
    return matches, idx


def sample(
    labels: Tensor, candidates: Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` as fixed slots.

    Picks ``min(#positives, int(S * positive_fraction))`` random positives and then
    ``min(#negatives, S - #picked positives)`` random negatives, ``S = batch_size_per_image``.

    Args:
        labels: ``Tensor[B, N]``: ``>= 1`` positive, ``0`` negative, ``< 0`` ignored.
        candidates: ``Tensor[B, N]`` bool; only these may be picked.

    Returns:
        ``(index: Tensor[B, S] int64, valid: Tensor[B, S] bool, positive: Tensor[B, S] bool)``; the picked
        positives fill the first slots, then the negatives, then padding (index 0, valid False).
    """
    B, N = labels.shape
    S = batch_size_per_image
    cap = min(int(S * positive_fraction), N)
    pos = (labels >= 1) & candidates
    neg = (labels == 0) & candidates
    # Random keys in [0, 1) for members, -1 otherwise: a top-k is a uniform random subset of the members.
    noise = torch.rand(labels.shape, device=labels.device)
    pos_key, pos_idx = torch.where(pos, noise, -1.0).topk(cap, dim=1)
    neg_key, neg_idx = torch.where(neg, noise, -1.0).topk(min(S, N), dim=1)
    num_pos = (pos_key >= 0).sum(1, keepdim=True)
    pos_ok = pos_key >= 0
    neg_slot = torch.arange(neg_idx.shape[1], device=labels.device)[None, :]
    neg_ok = (neg_key >= 0) & (neg_slot < S - num_pos)
    # Compact into S slots: positive j goes to j, negative j to num_pos + j; the rest to a dump slot S.
    dest_pos = torch.where(pos_ok, torch.arange(cap, device=labels.device)[None, :], S)
    dest_neg = torch.where(neg_ok, num_pos + neg_slot, S)
    index = torch.zeros((B, S + 1), dtype=torch.long, device=labels.device)
    index.scatter_(1, torch.cat([dest_pos, dest_neg], 1), torch.cat([pos_idx, neg_idx], 1))
    slot = torch.arange(S, device=labels.device)[None, :]
    total = num_pos + neg_ok.sum(1, keepdim=True)
    return index[:, :S], slot < total, slot < num_pos
