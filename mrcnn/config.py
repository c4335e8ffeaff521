"""``MaskRCNNConfig``: one dataclass of explicit fields, defaults as torchvision's ``maskrcnn_resnet50_fpn``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class MaskRCNNConfig:
    """Everything that shapes the model; no registries, no nested config trees.

    Counts that torchvision applies to data-dependent sets are fixed-size slots here (padded with a
    validity mask), so that no shape inside ``forward`` depends on the data.
    """

    num_classes: int = 91
    backbone: str = "resnet50"  # any torchvision ResNet: resnet18, resnet34, resnet50, resnet101, ...
    head: str = "v1"  # "v1" = maskrcnn_resnet50_fpn, "v2" = maskrcnn_resnet50_fpn_v2
    trainable_backbone_layers: int = 3
    frozen_batchnorm: bool = True  # torchvision freezes BN when starting from pretrained weights
    # FPN width, also the width of the mask head (and the v2 box head's convs); torchvision: 256. Narrower
    # is for CPU training: the 4-conv mask head at 14x14 dominates a step's time at 256 channels.
    fpn_channels: int = 256
    # transform (collate)
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_gt_objects: int = 100  # GT slots per image in Targets
    # RPN
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    # RoI heads
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    # Candidates (proposal x class pairs) that enter the per-class NMS, best scores first. torchvision
    # takes all that pass box_score_thresh; a fixed cap keeps the NMS static (see roi_heads.py).
    box_candidates_per_img: int = 1000
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    pooler_sampling_ratio: int = 2
    box_roi_size: int = 7
    mask_roi_size: int = 14
    mask_size: int = 28
    representation_size: int = 1024
    binarize_mask_targets: bool = False  # torchvision: soft targets; detectron2/mmdet: binarised at 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def positive_box_slots(self) -> int:
        """Fixed mask-branch slots per image: the most positives the box sampler can pick."""
        return int(self.box_batch_size_per_image * self.box_positive_fraction)


__all__ = ["MaskRCNNConfig"]
