"""Region Proposal Network with static shapes: per-level top-k, fused decode + clip, fixed-size NMS.

Same head module as torchvision (``RPNHead``, same parameter names) and the same algorithm as
``torchvision.models.detection.rpn.RegionProposalNetwork``; every "keep these" is a mask or a top-k of
fixed size, so nothing here depends on the data for its shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead

import kernels

from .anchors import grid_anchors
from .config import MaskRCNNConfig
from .matching import BELOW_LOW_THRESHOLD, box_iou, match, sample
from .structures import Targets


def flatten_head_outputs(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per level ``[B, H*W*A]`` logits and ``[B, H*W*A, 4]`` deltas, in the anchors' order (location, anchor)."""
    logits, offsets = [], []
    for o, d in zip(objectness, deltas, strict=True):
        B, A, H, W = o.shape
        logits.append(o.permute(0, 2, 3, 1).reshape(B, -1))
        offsets.append(d.view(B, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, 4))
    return logits, offsets


class RegionProposalNetwork(nn.Module):
    """``forward(image_shape, features, image_sizes, targets) -> (proposals [B, P, 4], valid [B, P], losses)``."""

    def __init__(self, config: MaskRCNNConfig, in_channels: int = 256) -> None:
        super().__init__()
        self.config = config
        num_anchors = len(config.aspect_ratios)
        self.head = RPNHead(in_channels, num_anchors, conv_depth=2 if config.head == "v2" else 1)

    def _top_n(self) -> tuple[int, int]:
        c = self.config
        if self.training:
            return c.rpn_pre_nms_top_n_train, c.rpn_post_nms_top_n_train
        return c.rpn_pre_nms_top_n_test, c.rpn_post_nms_top_n_test

    def forward(
        self,
        image_shape: tuple[int, int],
        features: list[Tensor],
        image_sizes: Tensor,
        targets: Targets | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        c = self.config
        objectness, deltas = self.head(features)
        logits, offsets = flatten_head_outputs(objectness, deltas)
        anchors = grid_anchors(
            image_shape, [tuple(f.shape[-2:]) for f in features], c.anchor_sizes, c.aspect_ratios,
            torch.float32, features[0].device,
        )  # fmt: skip
        proposals, valid = self._propose(anchors, logits, offsets, image_sizes)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            losses = self._losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(offsets, 1), targets)
        return proposals, valid, losses

    def _propose(
        self, anchors: list[Tensor], logits: list[Tensor], offsets: list[Tensor], image_sizes: Tensor
    ) -> tuple[Tensor, Tensor]:
        c = self.config
        pre_nms, post_nms = self._top_n()
        B = logits[0].shape[0]
        scores, boxes, deltas, levels = [], [], [], []
        for lvl, (a, lg, off) in enumerate(zip(anchors, logits, offsets, strict=True)):
            top, idx = lg.detach().topk(min(pre_nms, lg.shape[1]), dim=1)
            scores.append(top)
            boxes.append(a[idx])
            deltas.append(off.detach().gather(1, idx[..., None].expand(-1, -1, 4)))
            levels.append(torch.full_like(idx, lvl))
        scores, boxes, deltas, levels = (torch.cat(t, 1) for t in (scores, boxes, deltas, levels))
        T = scores.shape[1]
        sizes = image_sizes[:, None, :].expand(B, T, 2).reshape(B * T, 2)
        decoded, big_enough = kernels.decode_boxes(
            deltas.reshape(B * T, 4), boxes.reshape(B * T, 4), (1.0, 1.0, 1.0, 1.0), kernels.BBOX_XFORM_CLIP, sizes,
            min_size=c.rpn_min_size,
        )  # fmt: skip
        decoded = decoded.view(B, T, 4)
        prob = torch.sigmoid(scores.float())
        valid = big_enough.view(B, T) & (prob >= c.rpn_score_thresh)  # '>=' as torchvision
        keep, keep_valid = kernels.nms_fixed(decoded, prob, c.rpn_nms_thresh, post_nms, valid=valid, idxs=levels)
        return decoded.gather(1, keep[..., None].expand(-1, -1, 4)), keep_valid

    def _losses(self, anchors: Tensor, logits: Tensor, offsets: Tensor, targets: Targets) -> dict[str, Tensor]:
        c = self.config
        iou = box_iou(anchors[None], targets.boxes)  # [B, A, G]
        matches, matched = match(iou, targets.valid, c.rpn_fg_iou_thresh, c.rpn_bg_iou_thresh, True)
        labels = torch.where(matches >= 0, 1, torch.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        idx, slot_valid, slot_pos = sample(
            labels, torch.ones_like(labels, dtype=torch.bool), c.rpn_batch_size_per_image, c.rpn_positive_fraction
        )
        count = slot_valid.sum().clamp(min=1)
        slot_logits = logits.gather(1, idx)
        slot_labels = labels.gather(1, idx).clamp(min=0).to(slot_logits.dtype)
        bce = F.binary_cross_entropy_with_logits(slot_logits, slot_labels, reduction="none")
        loss_objectness = (bce * slot_valid).sum() / count
        gt = targets.boxes.gather(1, matched.gather(1, idx)[..., None].expand(-1, -1, 4))
        reg_targets = kernels.encode_boxes(gt.reshape(-1, 4), anchors[idx].reshape(-1, 4), (1.0, 1.0, 1.0, 1.0))
        pred = offsets.gather(1, idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        # Negative slots may match a padded GT box (all zeros, infinite targets): zero them first.
        reg_targets = torch.where(slot_pos.reshape(-1, 1), reg_targets.to(pred.dtype), 0.0)
        l1 = F.smooth_l1_loss(pred, reg_targets, beta=1 / 9, reduction="none").sum(-1)
        loss_box = (l1 * slot_pos.reshape(-1)).sum() / count
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
