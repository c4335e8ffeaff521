"""Drawing detections over an image: masks and boxes (torchvision's draw utils), and class names with scores
in labels sized to the image and laid out so that no two overlap."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections", "label_font_size", "label_layout", "palette"]

Rect = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, the ends exclusive


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, the same for every call: one per class. Hues advance by the golden
    ratio, so that neighbouring labels get far-apart colours."""
    hues = ((i * 0.618033988749895) % 1.0 for i in range(n))
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)) for h in hues]  # type: ignore[misc]


def label_font_size(height: int, width: int) -> int:
    """The labels' text height in pixels: 1/40 of the image's longer side, within 11 to 48 px (11 px text reads
    on a 128 px image; 33 px on a 1333 px one, where a fixed 11 px would be a speck)."""
    return min(48, max(11, round(max(height, width) / 40)))


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font at ``size`` px (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def label_layout(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], height: int,
                 width: int) -> list[Rect | None]:  # fmt: skip
    """Where each box's label goes: rectangles inside the ``height x width`` image, no two overlapping.

    Labels are placed in the given order (the caller passes the best-scoring first), each at its box's left
    edge (moved left if it would run off the image) and at the first free height among: just above the box,
    inside its top, then one label height further down at a time to below the box, then further up above it.
    A label with no free place (or larger than the image) gets ``None`` and is not drawn.

    Args:
        boxes: ``(x1, y1, x2, y2)`` per label, in pixels.
        sizes: ``(w, h)`` of each label's rectangle, in pixels.
    """
    placed: list[Rect] = []
    layout: list[Rect | None] = []
    for (bx1, by1, _, by2), (w, h) in zip(boxes, sizes, strict=True):
        if w > width or h > height:
            layout.append(None)
            continue
        x = min(max(int(bx1), 0), width - w)
        top, bottom = int(by1), max(int(by2), int(by1))
        spot = None
        # Above the box, inside it from its top down, just below it, then higher above it.
        for y in (top - h, *range(top, bottom, h), bottom, *range(top - 2 * h, -h, -h)):
            y = min(max(y, 0), height - h)
            rect = (x, y, x + w, y + h)
            if not any(rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in placed):
                spot = rect
                break
        if spot is not None:
            placed.append(spot)
        layout.append(spot)
    return layout


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
        ``"name 0.97"`` label per box, text of ``label_font_size`` on the class's colour, placed by
        ``label_layout`` (best score first; labels never overlap, and one with no free place is left out).
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
    height, width = canvas.shape[1:]
    canvas = draw_bounding_boxes(
        canvas, boxes, colors=[colours[k] for k in labels], width=max(2, round(max(height, width) / 400))
    )
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    font = _font(label_font_size(height, width))
    pad = 2
    order = sorted(range(len(labels)), key=lambda i: -scores[i])
    texts = [f"{classes[labels[i]] if classes is not None and labels[i] < len(classes) else labels[i]} {scores[i]:.2f}"
             for i in order]  # fmt: skip
    extents = [draw.textbbox((0, 0), text, font=font) for text in texts]
    sizes = [(r - left + 2 * pad, b - t + 2 * pad) for left, t, r, b in extents]
    layout = label_layout(boxes[order].tolist(), sizes, height, width)
    for i, text, (left, t, _, _), rect in zip(order, texts, extents, layout, strict=True):
        if rect is None:
            continue
        colour = colours[labels[i]]
        # Black text on light colours, white on dark ones (ITU-R BT.601 luma).
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=colour)
        draw.text((rect[0] + pad - left, rect[1] + pad - t), text, font=font, fill=ink)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
