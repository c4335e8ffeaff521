"""``collate``: torchvision's GeneralizedRCNNTransform (normalise, resize, pad) to fixed-shape inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MaskRCNNConfig
from .structures import Targets


def _check_image(i: int, image: object) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"images[{i}] must be a Tensor[3, h, w], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"images[{i}] must have shape [3, h, w], got {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255  # uint8 images are accepted as 0..255
    if not image.is_floating_point():
        raise TypeError(f"images[{i}] must be float in [0, 1] or uint8, got {image.dtype}")
    return image.float()


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, tuple[int, int]]:
    """torchvision's resize: ``scale = min(min_size / min(h, w), max_size / max(h, w))``, sizes floored."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return scale, (math.floor(h * scale), math.floor(w * scale))


def collate(
    images: list[Tensor], targets: list[dict] | None = None, config: MaskRCNNConfig | None = None
) -> tuple[Tensor, Tensor, Targets | None]:
    """The model's positional inputs from a list of images (and torchvision-format targets).

    Args:
        images: ``list[Tensor[3, h_i, w_i]]`` float in [0, 1] (or uint8 0..255), any sizes.
        targets: optional ``list[dict]`` with ``boxes: Tensor[n, 4]`` xyxy pixels, ``labels: Tensor[n]`` int,
            ``masks: Tensor[n, h_i, w_i]`` (uint8/bool); images with ``n = 0`` are allowed.
        config: sizes, normalisation and the GT slot count (``max_gt_objects``).

    Returns:
        ``(images: Tensor[B, 3, H, W], image_sizes: Tensor[B, 2] int64 (h, w) after resizing,
        targets: Targets | None)``, with ``H, W`` the largest resized size rounded up to a multiple of
        ``size_divisible``. Boxes and masks are resized like the images; boxes outside the image are kept
        as given (as torchvision does); a box with ``x2 <= x1`` or ``y2 <= y1`` raises ``ValueError``.
    """
    c = config or MaskRCNNConfig()
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of Tensor[3, h, w]")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    mean = torch.tensor(c.image_mean).view(3, 1, 1)
    std = torch.tensor(c.image_std).view(3, 1, 1)
    resized, sizes, scales = [], [], []
    for i, raw in enumerate(images):
        image = _check_image(i, raw)
        image = (image - mean.to(image.device)) / std.to(image.device)
        scale, size = resized_size(image.shape[1], image.shape[2], c.min_size, c.max_size)
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]  # fmt: skip
        resized.append(image)
        sizes.append(tuple(image.shape[1:]))
        scales.append(scale)
    d = c.size_divisible
    H = int(math.ceil(max(s[0] for s in sizes) / d) * d)
    W = int(math.ceil(max(s[1] for s in sizes) / d) * d)
    batch = resized[0].new_zeros((len(images), 3, H, W))
    for i, image in enumerate(resized):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    image_sizes = torch.tensor(sizes, dtype=torch.int64, device=batch.device)
    if targets is None:
        return batch, image_sizes, None
    return batch, image_sizes, _pad_targets(images, targets, sizes, scales, (H, W), c.max_gt_objects, batch.device)


def _pad_targets(images, targets, sizes, scales, padded, G, device) -> Targets:
    B = len(images)
    boxes = torch.zeros((B, G, 4), device=device)
    labels = torch.zeros((B, G), dtype=torch.int64, device=device)
    masks = torch.zeros((B, G, *padded), dtype=torch.uint8, device=device)
    valid = torch.zeros((B, G), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        b = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        n = b.shape[0]
        if n > G:
            raise ValueError(f"targets[{i}] has {n} objects; raise config.max_gt_objects (now {G})")
        bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {b[j].tolist()} has no positive width and height")
        h, w = images[i].shape[1:]
        rh, rw = sizes[i][0] / h, sizes[i][1] / w
        boxes[i, :n] = b * torch.tensor([rw, rh, rw, rh], device=device)
        labels[i, :n] = torch.as_tensor(t["labels"], device=device).reshape(-1)
        valid[i, :n] = True
        if n:
            m = torch.as_tensor(t["masks"], device=device)[:, None].float()
            m = F.interpolate(m, scale_factor=scales[i], recompute_scale_factor=True)[:, 0].byte()
            masks[i, :n, : m.shape[1], : m.shape[2]] = m
    return Targets(boxes, labels, masks, valid)
