"""``MaskRCNNConfig``: one dataclass of explicit fields, defaults as torchvision's ``maskrcnn_resnet50_fpn``."""

from __future__ import annotations

import functools
import math
import numbers
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

from torchvision.models import resnet


@dataclass
class MaskRCNNConfig:
    """Everything that shapes the model; no registries, no nested config trees.

    Counts that torchvision applies to data-dependent sets are fixed-size slots here (padded with a
    validity mask), so that no shape inside ``forward`` depends on the data.

    Every field is checked on construction (``check_field``; also by ``dataclasses.replace``), so that a
    wrong type or range fails here, naming the field, rather than deep inside torch.
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
    # Backbone + FPN channels-last (NHWC), so that RoIAlign reads its NHWC features in place: "auto" = on CUDA,
    # off on CPU (the shapes preset's step, torch path, 1 thread: 1.15x slower channels-last, inference 1.23x).
    channels_last: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        for low, high in (("rpn_bg_iou_thresh", "rpn_fg_iou_thresh"), ("box_bg_iou_thresh", "box_fg_iou_thresh")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo > hi:
                raise ValueError(f"MaskRCNNConfig.{low} = {lo} must be <= {high} = {hi}")
        if self.mask_size != 2 * self.mask_roi_size:
            raise ValueError(f"MaskRCNNConfig.mask_size = {self.mask_size} must be 2 * mask_roi_size = "
                             f"{2 * self.mask_roi_size} (the mask head upsamples its RoIs twice)")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def positive_box_slots(self) -> int:
        """Fixed mask-branch slots per image: the most positives the box sampler can pick."""
        return int(self.box_batch_size_per_image * self.box_positive_fraction)


def _is_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet")) and callable(getattr(resnet, name, None))


_POSITIVE = ("fpn_channels", "min_size", "max_size", "size_divisible", "max_gt_objects", "rpn_pre_nms_top_n_train",
             "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
             "rpn_batch_size_per_image", "box_batch_size_per_image", "detections_per_img", "box_candidates_per_img",
             "box_roi_size", "mask_roi_size", "mask_size", "representation_size")  # fmt: skip
_FRACTIONS = ("rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_positive_fraction",
              "rpn_score_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh", "box_positive_fraction",
              "box_score_thresh", "box_nms_thresh")  # fmt: skip
# Value rules beyond the type: field -> (predicate, what it requires). Sequences are checked item by item.
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "num_classes": (lambda v: v >= 2, ">= 2 (the background and at least one class)"),
    "backbone": (_is_resnet, "a torchvision ResNet name such as 'resnet50'"),
    "head": (lambda v: v in ("v1", "v2"), "'v1' or 'v2'"),
    "trainable_backbone_layers": (lambda v: 0 <= v <= 5, "in [0, 5]"),
    "image_std": (lambda v: v > 0, "> 0"),
    "anchor_sizes": (lambda v: v >= 1, ">= 1, one size per FPN level P2-P6"),
    "aspect_ratios": (lambda v: v > 0, "> 0"),
    "rpn_min_size": (lambda v: v >= 0, ">= 0"),
    "bbox_reg_weights": (lambda v: v > 0, "> 0"),
    "channels_last": (lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'"),
    **{name: (lambda v: v >= 1, ">= 1") for name in _POSITIVE},
    **{name: (lambda v: 0 <= v <= 1, "in [0, 1]") for name in _FRACTIONS},
}
_LENGTHS = {"anchor_sizes": 5}  # one anchor size per pyramid level; the tuple[x, ...] fields of free length


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(MaskRCNNConfig)


def _convert(name: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (lists become tuples, integers of float fields floats), or ``TypeError``."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        n = _LENGTHS.get(name) if args[-1] is Ellipsis else len(args)
        if not isinstance(value, (tuple, list)) or (n is not None and len(value) != n) or not value:
            count = n if n is not None else "one or more"
            raise TypeError(f"MaskRCNNConfig.{name} must be a tuple of {count} {args[0].__name__}s, got {value!r}")
        return tuple(_convert(name, v, args[0]) for v in value)
    ok = {
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
        float: isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
    }[tp]
    if not ok:
        what = {bool: "True or False", str: "a string", int: "an integer", float: "a finite number"}[tp]
        raise TypeError(f"MaskRCNNConfig.{name} must be {what}, got {value!r}")
    return tp(value)


def check_field(name: str, value: Any) -> Any:
    """``value`` checked and converted for ``MaskRCNNConfig.<name>``; ``TypeError`` / ``ValueError`` naming
    the field and what it requires otherwise (``KeyError`` for an unknown field)."""
    value = _convert(name, value, _field_types()[name])
    predicate, requirement = _RULES.get(name, (lambda v: True, ""))
    if not all(predicate(v) for v in (value if isinstance(value, tuple) else (value,))):
        raise ValueError(f"MaskRCNNConfig.{name} must be {requirement}, got {value!r}")
    return value


__all__ = ["MaskRCNNConfig", "check_field"]
