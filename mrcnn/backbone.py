"""Backbone: torchvision's ResNet + FeaturePyramidNetwork, reused as is (same modules, same names)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, LastLevelMaxPool
from torchvision.ops import misc as misc_nn_ops

from .config import MaskRCNNConfig


def build_backbone(config: MaskRCNNConfig) -> BackboneWithFPN:
    """ResNet-FPN exactly as ``maskrcnn_resnet50_fpn`` (v1) / ``_v2`` builds it, for any ResNet depth.

    Returns a module whose forward maps ``Tensor[B, 3, H, W]`` to ``{"0": P2, "1": P3, "2": P4, "3": P5,
    "pool": P6}``, ``config.fpn_channels`` channels each, strides 4 to 64.
    """
    # The config has checked the backbone name, the head and the trainable stages (MaskRCNNConfig.__post_init__).
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if config.frozen_batchnorm else nn.BatchNorm2d
    body = getattr(resnet, config.backbone)(weights=None, norm_layer=norm_layer)
    fpn_norm = nn.BatchNorm2d if config.head == "v2" else None
    # torchvision's _resnet_fpn_extractor with the FPN width as a parameter (it hard-codes 256).
    trainable = config.trainable_backbone_layers
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable + (trainable == 5)]
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)
    stage2 = body.inplanes // 8
    return BackboneWithFPN(
        body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [stage2 * 2 ** (k - 1) for k in range(1, 5)],
        config.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm,
    )  # fmt: skip
