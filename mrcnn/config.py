"""``MaskRCNNConfig``: one dataclass of explicit fields, defaults as torchvision's ``maskrcnn_resnet50_fpn``."""

from __future__ import annotations

import functools
import math
import numbers
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torchvision.models import resnet

Rule = tuple[typing.Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v >= 1, ">= 1")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")


def _is_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet")) and callable(getattr(resnet, name, None))


def _field(default: Any, rule: Rule | None = None, *, length: int | None = None) -> Any:
    """A field with its value rule beside it: ``rule = (predicate, what it requires)``, checked on every item of a
    tuple; ``length``, the item count of a ``tuple[x, ...]`` field of fixed length."""
    return field(default=default, metadata={"rule": rule, "length": length})


@dataclass
class MaskRCNNConfig:
    """Everything that shapes the model; no registries, no nested config trees.

    Counts that torchvision applies to data-dependent sets are fixed-size slots here (padded with a
    validity mask), so that no shape inside ``forward`` depends on the data.

    Every field is checked on construction against its type and the rule beside it (``check_field``; also by
    ``dataclasses.replace``), so that a wrong type or range fails here, naming the field, rather than deep
    inside torch.
    """

    num_classes: int = _field(91, (lambda v: v >= 2, ">= 2 (the background and at least one class)"))
    # any torchvision ResNet: resnet18, resnet34, resnet50, resnet101, ...
    backbone: str = _field("resnet50", (_is_resnet, "a torchvision ResNet name such as 'resnet50'"))
    # "v1" = maskrcnn_resnet50_fpn, "v2" = maskrcnn_resnet50_fpn_v2
    head: str = _field("v1", (lambda v: v in ("v1", "v2"), "'v1' or 'v2'"))
    trainable_backbone_layers: int = _field(3, (lambda v: 0 <= v <= 5, "in [0, 5]"))
    frozen_batchnorm: bool = True  # torchvision freezes BN when starting from pretrained weights
    # FPN width, also the width of the mask head (and the v2 box head's convs); torchvision: 256. Narrower
    # is for CPU training: the 4-conv mask head at 14x14 dominates a step's time at 256 channels.
    fpn_channels: int = _field(256, POSITIVE)
    # transform (collate)
    min_size: int = _field(800, POSITIVE)
    max_size: int = _field(1333, POSITIVE)
    size_divisible: int = _field(32, POSITIVE)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = _field((0.229, 0.224, 0.225), (lambda v: v > 0, "> 0"))
    max_gt_objects: int = _field(100, POSITIVE)  # GT slots per image in Targets
    # RPN
    anchor_sizes: tuple[int, ...] = _field(
        (32, 64, 128, 256, 512), (lambda v: v >= 1, ">= 1, one size per FPN level P2-P6"), length=5
    )
    aspect_ratios: tuple[float, ...] = _field((0.5, 1.0, 2.0), (lambda v: v > 0, "> 0"))
    rpn_pre_nms_top_n_train: int = _field(2000, POSITIVE)
    rpn_pre_nms_top_n_test: int = _field(1000, POSITIVE)
    rpn_post_nms_top_n_train: int = _field(2000, POSITIVE)
    rpn_post_nms_top_n_test: int = _field(1000, POSITIVE)
    rpn_nms_thresh: float = _field(0.7, FRACTION)
    rpn_fg_iou_thresh: float = _field(0.7, FRACTION)
    rpn_bg_iou_thresh: float = _field(0.3, FRACTION)
    rpn_batch_size_per_image: int = _field(256, POSITIVE)
    rpn_positive_fraction: float = _field(0.5, FRACTION)
    rpn_score_thresh: float = _field(0.0, FRACTION)
    rpn_min_size: float = _field(1e-3, (lambda v: v >= 0, ">= 0"))
    # RoI heads
    box_fg_iou_thresh: float = _field(0.5, FRACTION)
    box_bg_iou_thresh: float = _field(0.5, FRACTION)
    box_batch_size_per_image: int = _field(512, POSITIVE)
    box_positive_fraction: float = _field(0.25, FRACTION)
    box_score_thresh: float = _field(0.05, FRACTION)
    box_nms_thresh: float = _field(0.5, FRACTION)
    detections_per_img: int = _field(100, POSITIVE)
    # Candidates (proposal x class pairs) that enter the per-class NMS, best scores first. torchvision
    # takes all that pass box_score_thresh; a fixed cap keeps the NMS static (see roi_heads.py).
    box_candidates_per_img: int = _field(1000, POSITIVE)
    bbox_reg_weights: tuple[float, float, float, float] = _field((10.0, 10.0, 5.0, 5.0), (lambda v: v > 0, "> 0"))
    pooler_sampling_ratio: int = 2
    box_roi_size: int = _field(7, POSITIVE)
    mask_roi_size: int = _field(14, POSITIVE)
    mask_size: int = _field(28, POSITIVE)
    representation_size: int = _field(1024, POSITIVE)
    binarize_mask_targets: bool = False  # torchvision: soft targets; detectron2/mmdet: binarised at 0.5
    # Backbone + FPN channels-last (NHWC), so that RoIAlign reads its NHWC features in place: "auto" = on CUDA,
    # off on CPU (the shapes preset's step, torch path, 1 thread: 1.15x slower channels-last, inference 1.23x).
    channels_last: str = _field("auto", (lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'"))

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


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(MaskRCNNConfig)


def _convert(name: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (lists become tuples, integers of float fields floats), or ``TypeError``."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        n = MaskRCNNConfig.__dataclass_fields__[name].metadata.get("length") if args[-1] is Ellipsis else len(args)
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
    rule = MaskRCNNConfig.__dataclass_fields__[name].metadata.get("rule")
    if rule is None:
        return value
    predicate, requirement = rule
    if not all(predicate(v) for v in (value if isinstance(value, tuple) else (value,))):
        raise ValueError(f"MaskRCNNConfig.{name} must be {requirement}, got {value!r}")
    return value


__all__ = ["MaskRCNNConfig", "check_field"]
