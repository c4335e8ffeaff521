"""Data for Mask R-CNN: the built-in synthetic shapes and COCO-format data, in torchvision's
detection item format, plus COCO evaluation.

Every dataset item is ``(image, target)``: ``image`` ``Tensor[3, h, w]`` float32 in [0, 1];
``target`` a dict with ``boxes`` ``Tensor[n, 4]`` float32 xyxy pixels, ``labels`` ``Tensor[n]``
int64 in ``1..num_classes``, ``masks`` ``Tensor[n, h, w]`` uint8, ``image_id`` int, ``area``
``Tensor[n]`` float32, ``iscrowd`` ``Tensor[n]`` int64. Both datasets expose ``num_classes``,
``classes`` (names by label), ``label_to_cat`` / ``cat_to_label`` (label <-> COCO category id), and
``coco_ground_truth(dataset)`` gives the pycocotools index that ``coco_evaluate`` scores against.
``read_image`` reads an image file as training and ``mrcnn.predict`` do.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from .coco import CocoDataset, coco_evaluate, coco_from_dict, to_coco_results
from .image import read_image
from .shapes import CLASSES, ShapesDataset, to_coco, write_coco

__all__ = [
    "CLASSES",
    "CocoDataset",
    "ShapesDataset",
    "build_dataset",
    "coco_evaluate",
    "coco_from_dict",
    "coco_ground_truth",
    "collate_list",
    "read_image",
    "to_coco",
    "to_coco_results",
    "write_coco",
]


def collate_list(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``DataLoader`` collate for detection items of different sizes: ``(images, targets)`` as lists."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def build_dataset(name: str, split: str, **kwargs: Any) -> ShapesDataset | CocoDataset:
    """A dataset by name.

    * ``"shapes"``: ``ShapesDataset(split=split, **kwargs)``.
    * ``"coco"``: ``CocoDataset``; either ``ann_file=`` and ``image_dir=`` explicitly, or ``root=``
      holding the standard layout ``annotations/instances_{split}{year}.json`` and
      ``{split}{year}/`` (``year="2017"`` by default). ``skip_empty`` defaults to ``split == "train"``
      (torchvision's references drop images without annotations for training only).
    """
    if name == "shapes":
        return ShapesDataset(split=split, **kwargs)
    if name == "coco":
        root = kwargs.pop("root", None)
        year = kwargs.pop("year", "2017")
        if root is not None:
            kwargs.setdefault("ann_file", os.path.join(root, "annotations", f"instances_{split}{year}.json"))
            kwargs.setdefault("image_dir", os.path.join(root, f"{split}{year}"))
        if "ann_file" not in kwargs or "image_dir" not in kwargs:
            raise ValueError("build_dataset('coco', ...) needs root= or both ann_file= and image_dir=")
        kwargs.setdefault("skip_empty", split == "train")
        return CocoDataset(kwargs.pop("ann_file"), kwargs.pop("image_dir"), **kwargs)
    raise ValueError(f"unknown dataset {name!r}: expected 'shapes' or 'coco'")


def coco_ground_truth(dataset: Dataset) -> COCO:
    """The COCO ground truth to evaluate ``dataset``'s predictions against (a ``Subset`` gives its
    base dataset's; restrict ``coco_evaluate`` with ``image_ids`` to score a subset)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, CocoDataset):
        return dataset.coco
    if isinstance(dataset, ShapesDataset):
        return coco_from_dict(to_coco(dataset))
    raise TypeError(f"no COCO ground truth for {type(dataset).__name__}")
