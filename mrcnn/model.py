"""``MaskRCNN``: static shapes end to end, torchvision's module and parameter names, on ``kernels``' ops."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import misc as misc_nn_ops

import kernels

from .backbone import build_backbone
from .config import MaskRCNNConfig
from .graphs import Captured
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .structures import Detections, Targets
from .transform import collate


class MaskRCNN(nn.Module):
    """Mask R-CNN whose ``forward`` has no data-dependent shape, so ``torch.compile(fullgraph=True)`` and
    CUDA graphs work.

    ``model(images, image_sizes, targets)`` in train mode returns torchvision's five losses;
    ``model(images, image_sizes)`` in eval mode returns ``Detections`` of fixed shape. Inputs come from
    ``mrcnn.collate`` (or ``model.collate``). ``model.predict(list_of_images)`` returns torchvision's
    ``list[dict]``. The state dict is torchvision's ``maskrcnn_resnet50_fpn`` (v1) or ``_v2`` state dict.
    """

    def __init__(self, config: MaskRCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or MaskRCNNConfig()
        self.backbone = build_backbone(self.config)
        self.rpn = RegionProposalNetwork(self.config, self.backbone.out_channels)
        self.roi_heads = RoIHeads(self.config, self.backbone.out_channels)
        self._captured_inference: Captured | None = None

    def capture_inference(self, enabled: bool = True) -> None:
        """``predict`` on CUDA replays a CUDA graph of the eval forward, one per padded input size, captured
        after one eager run of that size (``mrcnn.graphs.Captured``): the same detections as the eager forward
        of the same padded batch, without the host's launches. Call it once the model is on its device; the
        graphs read the parameters in place, so weights loaded or trained in place are seen."""
        device = next(self.parameters()).device
        self._captured_inference = (
            Captured(lambda inputs: self(*inputs), device=device, what="inference", copy_outputs=True)
            if enabled else None
        )  # fmt: skip

    def collate(self, images: list[Tensor], targets: list[dict] | None = None) -> tuple[Tensor, Tensor, Targets | None]:
        """``mrcnn.collate`` with this model's config, on this model's device."""
        device = next(self.parameters()).device
        images = [im.to(device) for im in images]
        if targets is not None:
            targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        return collate(images, targets, self.config)

    def forward(
        self, images: Tensor, image_sizes: Tensor, targets: Targets | None = None
    ) -> dict[str, Tensor] | Detections:
        """
        Args:
            images: ``Tensor[B, 3, H, W]`` normalised and padded (``H, W`` multiples of 32).
            image_sizes: ``Tensor[B, 2]`` ``(h, w)`` of each image before padding.
            targets: ``Targets`` (training only).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Tensor[B, 3, H, W], got {tuple(images.shape)}; use mrcnn.collate")
        features = list(self.backbone(images).values())
        image_shape = (images.shape[-2], images.shape[-1])
        proposals, proposal_valid, rpn_losses = self.rpn(image_shape, features, image_sizes, targets)
        # The poolers use P2-P5; their scales are powers of two of the padded size (torchvision's inference).
        pooled = features[:4]
        scales = [2.0 ** round(math.log2(f.shape[-2] / image_shape[0])) for f in pooled]
        out = self.roi_heads(pooled, scales, proposals, proposal_valid, image_sizes, targets)
        if self.training:
            return {**out, **rpn_losses}
        return out

    @torch.no_grad()
    def predict(self, images: list[Tensor], *, mask_threshold: float | None = None) -> list[dict[str, Tensor]]:
        """torchvision's output format for images of any sizes.

        Returns, per image, ``boxes: Tensor[D, 4]`` and ``masks: Tensor[D, 1, h, w]`` in the original image's
        pixels, ``labels: Tensor[D]`` int64, ``scores: Tensor[D]``; masks are probabilities (or bool when
        ``mask_threshold`` is given). Runs in eval mode and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            batch, image_sizes, _ = self.collate(images)
            captured = self._captured_inference
            det = captured((batch, image_sizes)) if captured is not None and batch.is_cuda else self(batch, image_sizes)
        finally:
            self.train(was_training)
        results = []
        for i, image in enumerate(images):
            keep = det.valid[i]
            h, w = image.shape[-2:]
            rh, rw = h / float(image_sizes[i, 0]), w / float(image_sizes[i, 1])
            boxes = det.boxes[i][keep] * torch.tensor([rw, rh, rw, rh], device=batch.device)
            masks = kernels.paste_masks_in_image(det.masks[i][keep][:, None], boxes, (h, w), threshold=mask_threshold)
            labels, scores = det.labels[i][keep], det.scores[i][keep]
            results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
        return results

    @classmethod
    def from_torchvision_checkpoint(cls, path: str | Path, config: MaskRCNNConfig | None = None) -> MaskRCNN:
        """Load a torchvision Mask R-CNN checkpoint (a state dict, or a dict with a ``"model"`` entry as
        torchvision's reference scripts write) or our trainer's checkpoint, with ``strict=True``.

        ``mrcnn.checkpoint.load_model``: the architecture fields (``num_classes``, ``backbone`` depth,
        ``head`` v1/v2, frozen BN, widths) are read from the weights; the other fields come from ``config``,
        else from the config our checkpoints carry, else torchvision's defaults. Returns the model in
        training mode, as a freshly built one; errors name the file.
        """
        from .checkpoint import load_model  # here: mrcnn.checkpoint imports this module

        return load_model(path, config)[0].train()


_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


def _resnet_name(blocks: tuple[int, ...], bottleneck: bool) -> str:
    name = _RESNETS.get((blocks, bottleneck))
    if name is None:
        raise ValueError(f"unknown ResNet layout: blocks {blocks}, bottleneck {bottleneck}")
    return name


def infer_config(state: dict[str, Tensor], base: MaskRCNNConfig | None = None) -> MaskRCNNConfig:
    """``base`` with the architecture fields read off a torchvision Mask R-CNN state dict (or ours)."""
    blocks = tuple(
        len({k.split(".")[3] for k in state if k.startswith(f"backbone.body.layer{i}.")}) for i in range(1, 5)
    )
    return replace(
        base or MaskRCNNConfig(),
        num_classes=state["roi_heads.box_predictor.cls_score.weight"].shape[0],
        backbone=_resnet_name(blocks, "backbone.body.layer1.0.conv3.weight" in state),
        head="v2" if "roi_heads.box_head.0.0.weight" in state else "v1",
        frozen_batchnorm="backbone.body.bn1.num_batches_tracked" not in state,
        fpn_channels=state["backbone.fpn.layer_blocks.0.0.weight"].shape[0],
        representation_size=state["roi_heads.box_predictor.cls_score.weight"].shape[1],
    )


def from_torchvision(tv_model: nn.Module) -> MaskRCNN:
    """Our model with the weights, configuration and trainable parameters of a torchvision Mask R-CNN
    (``maskrcnn_resnet50_fpn`` or ``_v2``, any ResNet body)."""
    body = tv_model.backbone.body
    blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    rpn, heads, transform = tv_model.rpn, tv_model.roi_heads, tv_model.transform
    config = MaskRCNNConfig(
        num_classes=heads.box_predictor.cls_score.out_features,
        backbone=_resnet_name(blocks, isinstance(body.layer1[0], resnet.Bottleneck)),
        head="v2" if isinstance(heads.box_head, FastRCNNConvFCHead) else "v1",
        frozen_batchnorm=isinstance(body.bn1, misc_nn_ops.FrozenBatchNorm2d),
        fpn_channels=tv_model.backbone.out_channels,
        representation_size=heads.box_predictor.cls_score.in_features,
        min_size=transform.min_size[-1],
        max_size=transform.max_size,
        size_divisible=transform.size_divisible,
        image_mean=tuple(transform.image_mean),
        image_std=tuple(transform.image_std),
        anchor_sizes=tuple(s[0] for s in rpn.anchor_generator.sizes),
        aspect_ratios=tuple(rpn.anchor_generator.aspect_ratios[0]),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
        rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        rpn_min_size=rpn.min_size,
        box_fg_iou_thresh=heads.proposal_matcher.high_threshold,
        box_bg_iou_thresh=heads.proposal_matcher.low_threshold,
        box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=heads.fg_bg_sampler.positive_fraction,
        box_score_thresh=heads.score_thresh,
        box_nms_thresh=heads.nms_thresh,
        detections_per_img=heads.detections_per_img,
        bbox_reg_weights=tuple(heads.box_coder.weights),
    )
    model = MaskRCNN(config)
    model.load_state_dict(tv_model.state_dict(), strict=True)
    trainable = dict(tv_model.named_parameters())
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name].requires_grad)
    return model.to(next(tv_model.parameters()).device).train(tv_model.training)
