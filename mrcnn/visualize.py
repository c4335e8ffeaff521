"""Drawing detections over an image: masks, boxes, class names and scores (torchvision's draw utils)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections", "palette"]


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, the same for every call: one per class. Hues advance by the golden
    ratio, so that neighbouring labels get far-apart colours."""
    hues = ((i * 0.618033988749895) % 1.0 for i in range(n))
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)) for h in hues]  # type: ignore[misc]


def draw_detections(
    image: Tensor,
    prediction: dict[str, Tensor],
    classes: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
) -> Tensor:
    """The image with each detection scoring ``>= score_threshold`` drawn over it.

    Args:
        image: ``Tensor[3, h, w]`` float in [0, 1] or uint8.
        prediction: torchvision's format, ``boxes: Tensor[D, 4]``, ``labels: Tensor[D]``, ``scores: Tensor[D]``,
            ``masks: Tensor[D, 1, h, w]`` probabilities (or bool), at the image's size.
        classes: names by label (``classes[0]`` is the background); labels are printed when absent.
        mask_threshold: a pixel is in a mask when its probability is ``> mask_threshold``.
        alpha: opacity of the masks.

    Returns:
        ``Tensor[3, h, w]`` uint8 on the CPU: masks filled in their class's colour, boxes outlined, and a
        ``"name 0.97"`` label at each box's top-left corner.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be Tensor[3, h, w], got {tuple(image.shape)}")
    canvas = image.detach().cpu()
    if canvas.dtype != torch.uint8:
        canvas = (canvas.float().clamp(0, 1) * 255).round().to(torch.uint8)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    if not bool(keep.any()):
        return canvas
    boxes = prediction["boxes"].detach().cpu().float()[keep]
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu()[keep].tolist()
    colours = palette(max(labels) + 1)
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu()[keep]
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:])
        masks = masks if masks.dtype == torch.bool else masks > mask_threshold
        canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=[colours[k] for k in labels])
    names = [
        f"{classes[k] if classes is not None and k < len(classes) else k} {s:.2f}"
        for k, s in zip(labels, scores, strict=True)
    ]
    return draw_bounding_boxes(canvas, boxes, labels=names, colors=[colours[k] for k in labels], width=2)
