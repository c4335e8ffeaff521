"""Drop-ins whose signatures name torchvision's own types. Imported by ``patch_torchvision`` only, so that
``kernels`` itself does not need torchvision; TorchScript resolves ``LevelMapper`` from this module's globals."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops.poolers import LevelMapper

from .roi_align import _boxes_to_rois, multiscale_roi_align


def multiscale_roi_align_levels(
    x_filtered: list[Tensor],
    boxes: list[Tensor],
    output_size: list[int],
    sampling_ratio: int,
    scales: list[float] | None,
    mapper: LevelMapper | None,
) -> Tensor:
    """Drop-in for ``torchvision.ops.poolers._multiscale_roi_align``: one launch for all levels. Scriptable,
    with torchvision's signature (what ``MultiScaleRoIAlign.forward`` calls, scripted or not)."""
    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    rois = _boxes_to_rois(boxes, x_filtered[0])
    return multiscale_roi_align(
        x_filtered, rois, output_size, scales, sampling_ratio,
        canonical_scale=float(mapper.s0), canonical_level=float(mapper.lvl0),
    )  # fmt: skip
