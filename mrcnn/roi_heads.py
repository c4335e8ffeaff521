"""Box and mask heads with static shapes: fixed sampled slots in training, fixed detections in eval.

Same modules as torchvision's ``RoIHeads`` (``box_head``, ``box_predictor``, ``mask_head``,
``mask_predictor``, same parameter names; the poolers have no parameters) and the same algorithm:
training matches proposals + GT boxes to the GT, samples a fixed number of fg/bg slots, pools all
FPN levels in one launch and computes the losses with masks instead of selections; the mask loss
is the fused op over the fixed positive slots. Evaluation decodes, clips and filters in one launch,
keeps the ``box_candidates_per_img`` best (proposal, class) pairs, runs a fixed-size per-class NMS and
pools masks for the ``detections_per_img`` padded detections.

Deviation from torchvision, by design: torchvision sends every (proposal, class) pair above
``box_score_thresh`` into the NMS (up to P*(K-1) = 90,000 at COCO sizes); we send the best
``box_candidates_per_img`` (1000) of them, so that the NMS has a fixed size. Results differ only when
more than that many pairs pass the threshold and fewer than ``detections_per_img`` of the best
survive NMS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import kernels

from .config import MaskRCNNConfig
from .matching import BELOW_LOW_THRESHOLD, box_iou, match, sample
from .structures import Detections, Targets


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b, s]]`` for ``t: Tensor[B, N, ...]`` and ``idx: Tensor[B, S]``."""
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(*idx.shape, *t.shape[2:]))


def _rois(boxes: Tensor) -> Tensor:
    """``Tensor[B*S, 5]`` (image index, box) from ``boxes: Tensor[B, S, 4]``."""
    B, S = boxes.shape[:2]
    index = torch.arange(B, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(B, S, 1)
    return torch.cat([index, boxes], 2).reshape(B * S, 5)


class RoIHeads(nn.Module):
    def __init__(self, config: MaskRCNNConfig, in_channels: int = 256) -> None:
        super().__init__()
        self.config = config
        c, r = config, config.box_roi_size
        v2_norm = nn.BatchNorm2d if c.head == "v2" else None
        if c.head == "v2":
            self.box_head = FastRCNNConvFCHead(
                (in_channels, r, r), [c.fpn_channels] * 4, [c.representation_size], norm_layer=v2_norm
            )
        else:
            self.box_head = TwoMLPHead(in_channels * r * r, c.representation_size)
        self.box_predictor = FastRCNNPredictor(c.representation_size, c.num_classes)
        self.mask_head = MaskRCNNHeads(in_channels, [c.fpn_channels] * 4, 1, norm_layer=v2_norm)
        self.mask_predictor = MaskRCNNPredictor(c.fpn_channels, c.fpn_channels, c.num_classes)

    def _pool(self, features: list[Tensor], scales: list[float], boxes: Tensor, valid: Tensor, size: int) -> Tensor:
        return kernels.multiscale_roi_align(
            features, _rois(boxes), size, scales, self.config.pooler_sampling_ratio, valid=valid.reshape(-1)
        )

    def _masks(self, features, scales, boxes: Tensor, valid: Tensor) -> Tensor:
        """Mask logits ``[B*S, K, M, M]`` for ``boxes: Tensor[B, S, 4]``."""
        pooled = self._pool(features, scales, boxes, valid, self.config.mask_roi_size)
        return self.mask_predictor(self.mask_head(pooled))

    def forward(
        self,
        features: list[Tensor],
        scales: list[float],
        proposals: Tensor,
        proposal_valid: Tensor,
        image_sizes: Tensor,
        targets: Targets | None = None,
    ) -> dict[str, Tensor] | Detections:
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            return self._losses(features, scales, proposals, proposal_valid, image_sizes, targets)
        return self._detect(features, scales, proposals, proposal_valid, image_sizes)

    def _losses(self, features, scales, proposals, proposal_valid, image_sizes, targets: Targets) -> dict[str, Tensor]:
        c = self.config
        B = proposals.shape[0]
        boxes = torch.cat([proposals, targets.boxes.to(proposals.dtype)], 1)
        candidates = torch.cat([proposal_valid, targets.valid], 1)
        matches, matched = match(box_iou(boxes, targets.boxes), targets.valid, c.box_fg_iou_thresh,
                                 c.box_bg_iou_thresh, False)  # fmt: skip
        gt_labels = targets.labels.gather(1, matched)
        labels = torch.where(matches >= 0, gt_labels, torch.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        idx, valid, positive = sample(labels, candidates, c.box_batch_size_per_image, c.box_positive_fraction)
        rois, slot_matched = _gather(boxes, idx), matched.gather(1, idx)
        slot_labels = labels.gather(1, idx).clamp(min=0)
        count = valid.sum().clamp(min=1)

        box_features = self.box_head(self._pool(features, scales, rois, valid, c.box_roi_size))
        class_logits, box_regression = self.box_predictor(box_features)
        ce = F.cross_entropy(class_logits, slot_labels.reshape(-1), reduction="none")
        loss_classifier = (ce * valid.reshape(-1)).sum() / count
        reg = box_regression.reshape(B * idx.shape[1], -1, 4)
        reg = reg.gather(1, slot_labels.reshape(-1, 1, 1).expand(-1, 1, 4))[:, 0]
        gt_boxes = _gather(targets.boxes, slot_matched)
        reg_targets = kernels.encode_boxes(gt_boxes.reshape(-1, 4), rois.reshape(-1, 4), c.bbox_reg_weights)
        # Non-positive slots may match a padded GT box (all zeros, infinite targets): zero them first.
        reg_targets = torch.where(positive.reshape(-1, 1), reg_targets.to(reg.dtype), 0.0)
        l1 = F.smooth_l1_loss(reg, reg_targets, beta=1 / 9, reduction="none").sum(-1)
        loss_box_reg = (l1 * positive.reshape(-1)).sum() / count

        # Positives fill the first slots, so the mask branch runs on a fixed prefix of them.
        P = min(c.positive_box_slots, idx.shape[1])
        mask_logits = self._masks(features, scales, rois[:, :P], positive[:, :P])
        image_index = torch.arange(B, device=idx.device)[:, None].expand(B, P)
        loss_mask = kernels.mask_loss(
            mask_logits, rois[:, :P].reshape(-1, 4), targets.masks, image_index.reshape(-1),
            slot_matched[:, :P].reshape(-1), slot_labels[:, :P].reshape(-1), positive[:, :P].reshape(-1).float(),
            binarize=c.binarize_mask_targets, mask_sizes=image_sizes,
        )  # fmt: skip
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def _detect(self, features, scales, proposals, proposal_valid, image_sizes) -> Detections:
        c = self.config
        B, P = proposals.shape[:2]
        K = c.num_classes
        box_features = self.box_head(self._pool(features, scales, proposals, proposal_valid, c.box_roi_size))
        class_logits, box_regression = self.box_predictor(box_features)
        scores = F.softmax(class_logits.float(), -1)
        sizes = image_sizes[:, None, :].expand(B, P, 2).reshape(B * P, 2)
        boxes, ok = kernels.decode_boxes(
            box_regression.float(), proposals.reshape(B * P, 4).float(), c.bbox_reg_weights,
            kernels.BBOX_XFORM_CLIP, sizes,
            min_size=1e-2, scores=scores, score_thresh=c.box_score_thresh,
        )  # fmt: skip
        # Drop the background class and flatten (proposal, class) pairs per image, as torchvision.
        boxes = boxes.view(B, P, K, 4)[:, :, 1:].reshape(B, -1, 4)
        ok = (ok.view(B, P, K)[:, :, 1:] & proposal_valid[:, :, None]).reshape(B, -1)
        scores = scores.view(B, P, K)[:, :, 1:].reshape(B, -1)
        labels = torch.arange(1, K, device=boxes.device).repeat(P)[None].expand(B, -1)
        top, cand = torch.where(ok, scores, -1.0).topk(min(c.box_candidates_per_img, scores.shape[1]), dim=1)
        boxes, scores, labels, ok = _gather(boxes, cand), top, labels.gather(1, cand), top >= 0
        keep, keep_valid = kernels.nms_fixed(
            boxes, scores, c.box_nms_thresh, c.detections_per_img, valid=ok, idxs=labels
        )
        boxes, scores, labels = _gather(boxes, keep), scores.gather(1, keep), labels.gather(1, keep)
        mask_logits = self._masks(features, scales, boxes, keep_valid)
        D, M = keep.shape[1], mask_logits.shape[-1]
        label_logits = mask_logits.gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, M, M))
        masks = torch.sigmoid(label_logits).view(B, D, M, M)
        masks = masks * keep_valid[..., None, None]
        return Detections(boxes * keep_valid[..., None], scores * keep_valid, labels * keep_valid, masks, keep_valid)
