"""Conversions between torchvision's Mask R-CNN and ours: the configuration read off weights or a model, and the
one loader of checkpoints (ours and torchvision's)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import misc as misc_nn_ops

from .checkpoint import CheckpointError, config_from_dict, load_checkpoint, model_state
from .config import MaskRCNNConfig
from .model import MaskRCNN

__all__ = ["from_torchvision", "infer_config", "load_model"]


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


def load_model(
    path: str | os.PathLike, config: MaskRCNNConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[MaskRCNN, dict[str, Any]]:
    """A model in eval mode from our training checkpoint or a torchvision Mask R-CNN checkpoint (a state dict, or
    a dict with a ``"model"`` entry as torchvision's reference scripts write), loaded with ``strict=True``: the one
    loader (``mrcnn.evaluate``, ``mrcnn.predict`` and ``mrcnn.export`` use it).

    The architecture fields come from the weights (``infer_config``); the others from ``config`` when given,
    else from the config our checkpoints carry (so a 128 px model reloads at 128 px), else torchvision's
    defaults. Returns ``(model, checkpoint)``; the checkpoint's other entries (``classes``,
    ``label_to_cat``, ...) are there when we wrote it. Errors name the file.
    """
    ckpt = load_checkpoint(path)
    state = model_state(ckpt, path)
    if config is None and "config" in ckpt:
        config = config_from_dict(ckpt["config"], path)
    try:
        model = MaskRCNN(infer_config(state, config))
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the weights in {path} do not fit a Mask R-CNN: {type(e).__name__}: {e}") from e
    info = ckpt if "model" in ckpt else {"model": state}
    return model.to(device).eval(), info
