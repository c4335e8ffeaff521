"""Shapes: a built-in synthetic instance-segmentation dataset (no download).

Each image holds ``min_objects..max_objects`` filled shapes (circle, rectangle, triangle, ellipse)
of varied size, rotation and colour, drawn one after another on a textured background (a smooth
two-colour gradient, sometimes sinusoidal stripes, then pixel noise over everything). Later shapes
occlude earlier ones; an instance's mask is its *visible* part, so the masks of one image never
overlap. A placement that would leave an earlier instance (or the new one itself) with less than
``min_visible`` of its drawn area, or fewer than ``min_visible_pixels`` pixels, is rejected and
redrawn elsewhere, so every instance stays recognisable and nothing visible goes unlabelled.

Items are generated on the fly from a generator seeded by ``(seed, split, index)``: ``dataset[i]``
is random-access and reproducible, and train and val draw from disjoint seed streams.

Conventions (shared with ``mrcnn.data.coco`` and torchvision's detection models):

* ``image``: ``Tensor[3, h, w]`` float32 in ``[0, 1]``, quantised to multiples of 1/255 so that a
  PNG round trip is exact.
* ``boxes``: ``Tensor[n, 4]`` float32 xyxy, the tight bounds of the visible mask in COCO's pixel
  convention: a mask covering columns ``c0..c1`` gives ``x1 = c0``, ``x2 = c1 + 1`` (so
  ``x2 - x1`` is its width in pixels, as ``pycocotools.mask.toBbox`` computes it).
* ``labels``: ``Tensor[n]`` int64 in ``1..num_classes`` (index into ``CLASSES``); 0 is background.
* ``masks``: ``Tensor[n, h, w]`` uint8; ``area``: visible pixel count, float32; ``iscrowd``: zeros.
* ``image_id``: the item's index.

Pixel ``(r, c)`` is inside a shape when its centre ``(c + 0.5, r + 0.5)`` is.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from .coco import mask_to_polygons

CLASSES: tuple[str, ...] = ("background", "circle", "rectangle", "triangle", "ellipse")

_SPLIT_CODES = {"train": 0, "val": 1}
# Attempts to place one shape (position, size and rotation redrawn each time) before giving up.
_PLACEMENT_ATTEMPTS = 30
# Attempts to find a colour that stands out from what the shape covers and touches.
_COLOUR_ATTEMPTS = 20
# Minimum RGB distance (channels in [0, 1]) of a shape's colour from the mean background under it
# and from the colours of the instances it overlaps or touches: keeps every instance visible.
_MIN_BG_CONTRAST = 0.35
_MIN_INSTANCE_CONTRAST = 0.25

Size = tuple[int, int]


def _parse_image_size(image_size: int | Size | tuple[Size, Size]) -> tuple[Size, Size]:
    """``int``, ``(h, w)`` or ``((h_min, h_max), (w_min, w_max))`` -> inclusive height and width ranges."""
    if isinstance(image_size, int):
        ranges = ((image_size, image_size), (image_size, image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        ranges = ((image_size[0], image_size[0]), (image_size[1], image_size[1]))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(s, int) for s in r) for r in image_size)
    ):
        ranges = (tuple(image_size[0]), tuple(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int, (h, w) or ((h_min, h_max), (w_min, w_max)); got {image_size!r}")
    for lo, hi in ranges:
        if not 32 <= lo <= hi:
            raise ValueError(f"image_size ranges need 32 <= min <= max; got {image_size!r}")
    return ranges  # type: ignore[return-value]


class ShapesDataset(Dataset):
    """Synthetic shapes for instance segmentation, in torchvision's detection item format.

    Args:
        split: ``"train"`` or ``"val"`` (disjoint seed streams).
        num_images: the dataset's length.
        image_size: ``h = w = int``, ``(h, w)``, or ``((h_min, h_max), (w_min, w_max))`` for sizes
            drawn per image (inclusive).
        seed: base seed (non-negative); items depend only on ``(seed, split, index)``.
        min_objects, max_objects: instances per image, drawn uniformly. Fewer than ``min_objects``
            only if they cannot be placed without hiding each other (tiny images, many objects).
        num_classes: how many of ``CLASSES[1:]`` to use (1..4).
        object_size: range of a shape's extent (diameter / longest side) in pixels, clamped to
            60 % of the image's shorter side.
        min_visible: fraction of its drawn area an instance must keep visible.
        min_visible_pixels: visible pixels an instance must keep.

    ``dataset[i]`` returns ``(image, target)``; see the module docstring for the format.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        image_size: int | Size | tuple[Size, Size] = (160, 160),
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        num_classes: int = 4,
        object_size: tuple[float, float] = (20.0, 64.0),
        min_visible: float = 0.4,
        min_visible_pixels: int = 80,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}; got {split!r}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0; got {num_images}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0; got {seed}")
        if not 0 <= min_objects <= max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects; got {min_objects}, {max_objects}")
        if not 1 <= num_classes <= len(CLASSES) - 1:
            raise ValueError(f"num_classes must be in 1..{len(CLASSES) - 1}; got {num_classes}")
        if not 4 <= object_size[0] <= object_size[1]:
            raise ValueError(f"object_size needs 4 <= min <= max; got {object_size}")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1]; got {min_visible}")
        if min_visible_pixels < 0:
            raise ValueError(f"min_visible_pixels must be >= 0; got {min_visible_pixels}")
        self.split = split
        self.num_images = num_images
        self.size_ranges = _parse_image_size(image_size)
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.num_classes = num_classes
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.min_visible = min_visible
        self.min_visible_pixels = min_visible_pixels
        self.classes: tuple[str, ...] = CLASSES[: num_classes + 1]
        # Shapes' COCO category ids are their labels.
        self.label_to_cat: dict[int, int] = {k: k for k in range(1, num_classes + 1)}
        self.cat_to_label: dict[int, int] = dict(self.label_to_cat)

    def __len__(self) -> int:
        return self.num_images

    def file_name(self, index: int) -> str:
        """The image's file name in exported COCO data."""
        return f"{self.split}_{index:06d}.png"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        image, masks, labels = self.generate(index)
        # numpy, not torch, for the conversions: tiny torch ops pay for intra-op threads (tens of ms
        # per item on a busy machine), numpy ones do not.
        masks_u8 = masks.astype(np.uint8)
        target = {
            "boxes": _mask_boxes(masks),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks_u8),
            "image_id": index,
            "area": torch.from_numpy(
                masks_u8.reshape(len(labels), masks.shape[1] * masks.shape[2]).sum(1, dtype=np.float32)
            ),
            "iscrowd": torch.from_numpy(np.zeros(len(labels), dtype=np.int64)),
        }
        image_chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        return torch.from_numpy(image_chw), target

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw item ``index``: ``image`` uint8 ``[h, w, 3]``, ``masks`` bool ``[n, h, w]`` (visible
        parts, disjoint), ``labels`` int64 ``[n]``."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        (h_lo, h_hi), (w_lo, w_hi) = self.size_ranges
        h = int(rng.integers(h_lo, h_hi + 1))
        w = int(rng.integers(w_lo, w_hi + 1))
        ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
        image = _background(rng, ys, xs)

        # owner[r, c]: index of the instance visible at that pixel, -1 for background.
        owner = np.full((h, w), -1, dtype=np.int64)
        drawn_area: list[int] = []
        colours: list[np.ndarray] = []
        labels: list[int] = []
        size_hi = min(self.object_size[1], 0.6 * min(h, w))
        size_lo = min(self.object_size[0], size_hi)
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            label = int(rng.integers(1, self.num_classes + 1))
            for _ in range(_PLACEMENT_ATTEMPTS):
                extent = float(rng.uniform(size_lo, size_hi))
                # At most ~20 % of the extent may fall outside the image.
                cx = float(rng.uniform(0.3 * extent, w - 0.3 * extent))
                cy = float(rng.uniform(0.3 * extent, h - 0.3 * extent))
                shape = _draw_shape(CLASSES[label], rng, ys, xs, cy, cx, extent)
                area = int(shape.sum())
                if area < max(self.min_visible_pixels, 1):
                    continue
                if not self._keeps_others_visible(owner, shape, drawn_area):
                    continue
                colour = _pick_colour(rng, image, owner, shape, colours)
                if colour is None:
                    continue
                _paint(rng, image, shape, colour, ys, xs, cy, cx, extent)
                owner[shape] = len(labels)
                drawn_area.append(area)
                colours.append(colour)
                labels.append(label)
                break

        noise = rng.normal(0.0, rng.uniform(0.01, 0.05), size=image.shape).astype(np.float32)
        image = np.clip(np.rint((image + noise) * 255.0), 0, 255).astype(np.uint8)
        masks = owner[None] == np.arange(len(labels))[:, None, None]
        return image, masks, np.asarray(labels, dtype=np.int64)

    def _keeps_others_visible(self, owner: np.ndarray, shape: np.ndarray, drawn_area: list[int]) -> bool:
        """Would every earlier instance keep enough visible pixels under ``shape``?"""
        if not drawn_area:
            return True
        covered = owner[shape]
        lost = np.bincount(covered[covered >= 0], minlength=len(drawn_area))
        visible = np.bincount(owner[owner >= 0], minlength=len(drawn_area)) - lost
        need = np.maximum(self.min_visible * np.asarray(drawn_area), self.min_visible_pixels)
        return bool((visible >= need).all())


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth two-colour gradient in a random direction, sometimes with sinusoidal stripes: [h, w, 3]."""
    c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    phi = rng.uniform(0.0, 2.0 * math.pi)
    t = xs * math.cos(phi) + ys * math.sin(phi)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    if rng.uniform() < 0.5:
        psi = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 24.0)
        amplitude = rng.uniform(0.04, 0.12)
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        wave = np.sin(2.0 * math.pi * (xs * math.cos(psi) + ys * math.sin(psi)) / period + rng.uniform(0, 2 * math.pi))
        image = image + amplitude * wave[..., None] * tint
    return image.astype(np.float32)


def _draw_shape(
    name: str, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, extent: float
) -> np.ndarray:
    """Boolean ``[h, w]`` mask of one shape of the given extent (longest side / diameter)."""
    dy, dx = ys - cy, xs - cx
    theta = rng.uniform(0.0, math.pi)
    # Coordinates in the shape's rotated frame.
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    half = 0.5 * extent
    if name == "circle":
        return dx * dx + dy * dy <= half * half
    if name == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half * aspect)
    if name == "ellipse":
        # Elongated enough never to pass for a circle.
        b = half * rng.uniform(0.35, 0.6)
        return (u / half) ** 2 + (v / b) ** 2 <= 1.0
    if name == "triangle":
        angles = theta + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.35, 0.35, size=3)
        radii = half * rng.uniform(0.85, 1.0, size=3)
        px, py = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
        # Sign of the cross product against each edge; inside when all agree.
        edges = [(px[(i + 1) % 3] - px[i]) * (ys - py[i]) - (py[(i + 1) % 3] - py[i]) * (xs - px[i]) for i in range(3)]
        return ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | (
            (edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0)
        )
    raise ValueError(f"unknown shape {name!r}")


def _pick_colour(
    rng: np.random.Generator, image: np.ndarray, owner: np.ndarray, shape: np.ndarray, colours: list[np.ndarray]
) -> np.ndarray | None:
    """A colour far from the background under ``shape`` and from the instances it covers or touches."""
    background = image[shape & (owner < 0)]
    bg_mean = background.mean(0) if len(background) else None
    # Instances within a pixel of the shape: a dilation by one pixel in each direction.
    near = shape.copy()
    near[1:] |= shape[:-1]
    near[:-1] |= shape[1:]
    near[:, 1:] |= shape[:, :-1]
    near[:, :-1] |= shape[:, 1:]
    neighbours = [colours[k] for k in np.unique(owner[near]) if k >= 0]
    for _ in range(_COLOUR_ATTEMPTS):
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        if bg_mean is not None and np.linalg.norm(colour - bg_mean) < _MIN_BG_CONTRAST:
            continue
        if any(np.linalg.norm(colour - c) < _MIN_INSTANCE_CONTRAST for c in neighbours):
            continue
        return colour
    return None


def _paint(
    rng: np.random.Generator,
    image: np.ndarray,
    shape: np.ndarray,
    colour: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    cy: float,
    cx: float,
    extent: float,
) -> None:
    """Fill ``shape`` with ``colour`` under a mild linear shading (x0.85..x1.15 across the shape)."""
    r, c = np.nonzero(shape)
    gy, gx = rng.uniform(-0.15, 0.15, size=2)
    shade = 1.0 + (gy * (ys[r, 0] - cy) + gx * (xs[0, c] - cx)) / extent
    image[r, c] = np.clip(colour[None, :] * shade[:, None], 0.0, 1.0)


def _mask_boxes(masks: np.ndarray) -> torch.Tensor:
    """Tight xyxy boxes of boolean ``[n, h, w]`` masks (COCO convention: ``x2`` = last column + 1)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        rows = np.flatnonzero(m.any(1))
        cols = np.flatnonzero(m.any(0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return torch.from_numpy(boxes)


def to_coco(dataset: ShapesDataset, image_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The dataset as a COCO instances dict: images, annotations (``segmentation``, ``bbox`` xywh,
    ``area`` in pixels, ``iscrowd`` 0), categories. Image ids are the item indices, annotation ids count
    from 1 (COCOeval treats annotation id 0 as "no match"). With ``image_dir``, also writes the images
    there as PNG (named by ``dataset.file_name``; lossless, so ``CocoDataset`` reads back the same pixels).

    Segmentations are polygons, COCO's form for ``iscrowd: 0`` (``coco.mask_to_polygons``: one per part of
    the visible mask, holes cut in), so that every COCO reader takes them, torchvision's detection
    references included (``pycocotools.mask.frPyObjects(polygons, h, w)``, which fails on an RLE). Each
    annotation's polygons are rasterised here through pycocotools and must give its mask pixel for pixel
    (a ``RuntimeError`` otherwise)."""
    if image_dir is not None:
        from PIL import Image

        os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(len(dataset)):
        image, masks, labels = dataset.generate(index)
        h, w = masks.shape[-2:]
        images.append({"id": index, "file_name": dataset.file_name(index), "height": h, "width": w})
        if image_dir is not None:
            Image.fromarray(image).save(os.path.join(image_dir, dataset.file_name(index)))
        if not len(labels):
            continue
        for mask, box, label in zip(masks, _mask_boxes(masks).tolist(), labels.tolist(), strict=True):
            polygons = mask_to_polygons(mask)
            drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
            if not np.array_equal(drawn, mask):
                raise RuntimeError(
                    f"image {index}: pycocotools rasterises the polygons of instance {len(annotations) + 1} into "
                    f"{int(drawn.sum())} pixels, not its mask's {int(mask.sum())}"
                )
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": dataset.label_to_cat[label],
                    "segmentation": polygons,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": dataset.label_to_cat[k], "name": dataset.classes[k], "supercategory": "shape"}
        for k in range(1, dataset.num_classes + 1)
    ]
    return {
        "info": {"description": f"mrcnn synthetic shapes, split={dataset.split}, seed={dataset.seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(dataset: ShapesDataset, path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> None:
    """Write ``to_coco(dataset, image_dir)`` as JSON to ``path`` (and the images as PNG into
    ``image_dir`` if given)."""
    data = to_coco(dataset, image_dir)
    with open(path, "w") as f:
        json.dump(data, f)
