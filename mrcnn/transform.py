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
        targets: optional ``list[dict]`` with ``boxes: Tensor[n, 4]`` xyxy pixels, ``labels: Tensor[n]`` int in
            ``[1, num_classes)``, ``masks: Tensor[n, h_i, w_i]`` binary (0/1 of any dtype, or bool); images with
            ``n = 0`` are allowed (``masks`` may then be left out).
        config: sizes, normalisation and the GT slot count (``max_gt_objects``).

    Returns:
        ``(images: Tensor[B, 3, H, W], image_sizes: Tensor[B, 2] int64 (h, w) after resizing,
        targets: Targets | None)``, with ``H, W`` the largest resized size rounded up to a multiple of
        ``size_divisible``. Boxes and masks are resized like the images; boxes outside the image are kept
        as given (as torchvision does).

    Raises:
        ValueError / TypeError naming the image index and the field (``targets[i]['boxes'][j]``) for: a box
        that is not finite or has ``x2 <= x1`` or ``y2 <= y1``; a label outside ``[1, num_classes)`` or not an
        integer; a count of labels or masks that differs from the boxes'; a mask not of the image's size; a
        mask value other than 0 and 1 (0/255 masks: pass ``masks > 0``); more than ``max_gt_objects`` boxes.
        The values are checked with one host sync per batch, here and never inside ``MaskRCNN.forward``.
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
    return batch, image_sizes, _pad_targets(images, targets, sizes, scales, (H, W), c, batch.device)


def _check_targets(
    images: list[Tensor], targets: list[dict], num_classes: int, G: int, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each image's ``(boxes [n, 4] float32, labels [n], masks [n, h, w])``, checked.

    Shapes are checked on the host for free; the values (finite boxes with positive sides, labels in
    ``[1, num_classes)``, binary masks) of the whole batch are reduced to one ``[B, 4]`` flag tensor and read
    with a single host sync. Errors name the image index and the field, so that bad ground truth is
    reported here rather than as a non-finite or negative loss steps later.
    """
    checked = []
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes', 'labels' and 'masks'")
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [n, 4], got {tuple(boxes.shape)}")
        n = boxes.shape[0]
        if n > G:
            raise ValueError(f"targets[{i}] has {n} objects; raise config.max_gt_objects (now {G})")
        labels = torch.as_tensor(t["labels"], device=device)
        if labels.shape != (n,):
            raise ValueError(f"targets[{i}]['labels'] must have shape [{n}] (one per box), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"targets[{i}]['labels'] must be integers, got {labels.dtype}")
        h, w = images[i].shape[1:]
        if "masks" not in t and n:
            raise ValueError(f"targets[{i}] has {n} boxes but no 'masks'")
        masks = torch.as_tensor(t.get("masks", torch.zeros(0, h, w)), device=device)
        if masks.shape != (n, h, w):
            raise ValueError(f"targets[{i}]['masks'] must have shape [{n}, {h}, {w}] (one per box, at the image's "
                             f"size), got {tuple(masks.shape)}")  # fmt: skip
        checked.append((boxes, labels, masks))
    flags = [  # per image: [4 checks, n objects] bool
        torch.stack([
            ~torch.isfinite(boxes).all(1),
            (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
            (labels < 1) | (labels >= num_classes),
            ((masks != 0) & (masks != 1)).flatten(1).any(1),
        ])
        for boxes, labels, masks in checked
    ]  # fmt: skip
    summary = torch.stack([f.any(1) for f in flags]).tolist()
    for i, (boxes, labels, masks) in enumerate(checked):
        if not any(summary[i]):
            continue
        check = summary[i].index(True)
        j = int(flags[i][check].nonzero()[0])
        if check == 0:
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is not finite")
        if check == 1:
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive width and height")
        if check == 2:
            raise ValueError(f"targets[{i}]['labels'][{j}] = {int(labels[j])} is outside [1, {num_classes}) "
                             f"(0 is the background; config.num_classes = {num_classes} counts it)")  # fmt: skip
        raise ValueError(f"targets[{i}]['masks'][{j}] has values other than 0 and 1 (max {masks[j].max().item()}): "
                         "masks must be binary; convert 0/255 masks with (masks > 0).to(torch.uint8)")  # fmt: skip
    return checked


def _pad_targets(images, targets, sizes, scales, padded, c: MaskRCNNConfig, device) -> Targets:
    B, G = len(images), c.max_gt_objects
    checked = _check_targets(images, targets, c.num_classes, G, device)
    boxes = torch.zeros((B, G, 4), device=device)
    labels = torch.zeros((B, G), dtype=torch.int64, device=device)
    masks = torch.zeros((B, G, *padded), dtype=torch.uint8, device=device)
    valid = torch.zeros((B, G), dtype=torch.bool, device=device)
    for i, (b, lab, m) in enumerate(checked):
        n = b.shape[0]
        h, w = images[i].shape[1:]
        rh, rw = sizes[i][0] / h, sizes[i][1] / w
        boxes[i, :n] = b * torch.tensor([rw, rh, rw, rh], device=device)
        labels[i, :n] = lab
        valid[i, :n] = True
        if n:
            m = F.interpolate(m[:, None].float(), scale_factor=scales[i], recompute_scale_factor=True)[:, 0].byte()
            masks[i, :n, : m.shape[1], : m.shape[2]] = m
    return Targets(boxes, labels, masks, valid)
