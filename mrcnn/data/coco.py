"""COCO-format instance segmentation data through pycocotools, and COCO evaluation helpers.

``CocoDataset`` yields the same item format as ``mrcnn.data.shapes.ShapesDataset`` (torchvision's
detection format), built as torchvision's detection references build it
(``references/detection/coco_utils.py``):

* crowd annotations (``iscrowd=1``) are left out of the training targets; they stay in
  ``dataset.coco``, the ground truth COCOeval reads, where they mark regions to ignore;
* boxes go from xywh to xyxy, are clamped to the image, and those with ``x2 <= x1`` or
  ``y2 <= y1`` are dropped together with their masks;
* segmentations -- polygons (one or more parts, merged), uncompressed RLE (``counts`` a list) or
  compressed RLE (``counts`` a string) -- are decoded to ``uint8`` masks of the image's size;
  polygon parts with fewer than 3 points are ignored (pycocotools would read a 2-point part as a
  box), so an annotation made only of those has an empty mask;
* category ids map to contiguous labels ``1..K`` in increasing id order (``cat_to_label``,
  ``label_to_cat``); 0 is background.

Broken data fails loudly at construction, naming the file and the offending id: a missing
annotation file or image file (``FileNotFoundError``), malformed JSON, an annotation whose image or
category does not exist, a duplicate id, or a segmentation of the wrong form or size
(``ValueError``). An image whose size differs from its record fails when it is read.

Evaluation: ``to_coco_results`` turns torchvision-format predictions into COCO results and
``coco_evaluate`` runs COCOeval for boxes and masks, with pycocotools' printing captured.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# Names of COCOeval.stats, in its order.
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def _captured_stdout() -> Iterator[io.StringIO]:
    """pycocotools reports through print(); keep it out of the caller's output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory COCO dict (not copied), built quietly."""
    coco = COCO()
    coco.dataset = data
    with _captured_stdout():
        coco.createIndex()
    return coco


def _load_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON in COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO annotation file: expected an object with an 'images' list")
    return data


def _check_segmentation(segm: Any, h: int, w: int) -> None:
    """Raise ValueError unless ``segm`` is a form pycocotools reads, for an ``h x w`` image (cheap:
    nothing is decoded, so that checking all of COCO's annotations stays fast)."""
    if isinstance(segm, list):
        if not all(isinstance(p, list) for p in segm):
            raise ValueError("polygon segmentation must be a list of coordinate lists")
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            raise ValueError(f"RLE size {segm['size']} differs from the image's [height, width] [{h}, {w}]")
    else:
        raise ValueError("segmentation must be a list of polygons or an RLE dict with 'counts' and 'size'")


def _segmentation_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """A checked segmentation (``_check_segmentation``) as one compressed RLE of an ``h x w`` image."""
    if isinstance(segm, list):
        parts = [p for p in segm if len(p) >= 6]
        if not parts:
            return mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def _check_and_complete(data: dict[str, Any], path: str) -> None:
    """Validate references and forms; fill ``iscrowd`` (0) and ``area`` (mask area) where absent."""
    images: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "height", "width")):
            raise ValueError(f"{path}: image record {img!r} needs 'id', 'file_name', 'height' and 'width'")
        if img["id"] in images:
            raise ValueError(f"{path}: duplicate image id {img['id']}")
        images[img["id"]] = img
    categories = data.setdefault("categories", [])
    cat_ids = set()
    for cat in categories:
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ValueError(f"{path}: category record {cat!r} needs 'id' and 'name'")
        if cat["id"] in cat_ids:
            raise ValueError(f"{path}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    ann_ids = set()
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{path}: annotation record without an 'id': {ann!r}")
        where = f"{path}: annotation {ann['id']}"
        if ann["id"] in ann_ids:
            raise ValueError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        missing = [k for k in ("image_id", "category_id", "bbox", "segmentation") if k not in ann]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(f"{where}: image_id {ann['image_id']} has no image record")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{where}: category_id {ann['category_id']} has no category record")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h]; got {bbox!r}")
        try:
            _check_segmentation(ann["segmentation"], img["height"], img["width"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(_segmentation_rle(ann["segmentation"], img["height"], img["width"])))


def _read_image(path: str) -> torch.Tensor:
    """``Tensor[3, h, w]`` float32 in [0, 1]; grayscale, palette and RGBA files are converted to RGB.

    PIL rather than ``torchvision.io``, whose image decoding is deprecated from torchvision 0.29."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


class CocoDataset(Dataset):
    """COCO-format instance segmentation data, in torchvision's detection item format.

    Args:
        ann_file: COCO instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder the images' ``file_name`` are relative to.
        skip_empty: leave out images with no usable training annotation (none that is not crowd
            and has a box of positive size). torchvision's references drop empty images for
            training too (theirs keep crowd-only images); keep them (the default) for evaluation.
        check_files: check at construction that every image file exists (one ``stat`` per image).

    Attributes: ``coco`` (pycocotools index of the whole file, crowd annotations included: the
    evaluation ground truth), ``ids`` (image ids in item order, increasing), ``cat_to_label``,
    ``label_to_cat``, ``classes`` (names by label, ``classes[0] == "background"``), ``num_classes``.

    ``dataset[i]`` returns ``(image, target)``: ``image`` ``Tensor[3, h, w]`` float32 in [0, 1];
    ``target`` with ``boxes`` ``Tensor[n, 4]`` float32 xyxy, ``labels`` ``Tensor[n]`` int64,
    ``masks`` ``Tensor[n, h, w]`` uint8, ``image_id`` int, ``area`` ``Tensor[n]`` float32 (as
    annotated), ``iscrowd`` ``Tensor[n]`` int64 (zeros: crowds are left out).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        skip_empty: bool = False,
        check_files: bool = True,
    ) -> None:
        ann_file = os.fspath(ann_file)
        self.image_dir = os.fspath(image_dir)
        data = _load_json(ann_file)
        _check_and_complete(data, ann_file)
        self.coco = coco_from_dict(data)
        cat_ids = sorted(self.coco.cats)
        self.cat_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat: dict[int, int] = {i: c for c, i in self.cat_to_label.items()}
        self.classes: tuple[str, ...] = ("background", *(self.coco.cats[c]["name"] for c in cat_ids))
        self.num_classes = len(cat_ids)
        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if self._training_annotations(i)[0]]
        self.ids: list[int] = ids
        if check_files:
            missing = [i for i in ids if not os.path.isfile(self._path(i))]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) listed in {ann_file} not found, the first: image id "
                    f"{missing[0]} at {self._path(missing[0])}"
                )

    def _training_annotations(self, image_id: int) -> tuple[list[dict[str, Any]], list[list[float]]]:
        """The image's annotations that make training targets, and their xyxy boxes: crowds left out,
        boxes clamped to the image, those with ``x2 <= x1`` or ``y2 <= y1`` dropped. Plain Python:
        ``skip_empty`` runs it over every image of the file at construction."""
        info = self.coco.imgs[image_id]
        w, h = info["width"], info["height"]
        kept, boxes = [], []
        for ann in self.coco.imgToAnns[image_id]:
            if ann["iscrowd"]:
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1 = min(max(x, 0), w), min(max(y, 0), h)
            x2, y2 = min(max(x + bw, 0), w), min(max(y + bh, 0), h)
            if x2 > x1 and y2 > y1:
                kept.append(ann)
                boxes.append([x1, y1, x2, y2])
        return kept, boxes

    def _path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        path = self._path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file of image id {image_id} not found: {path}")
        image = _read_image(path)
        if tuple(image.shape[-2:]) != (h, w):
            raise ValueError(
                f"image {path} (id {image_id}) is {tuple(image.shape[-2:])} but its record says ({h}, {w})"
            )
        anns, boxes = self._training_annotations(image_id)
        if anns:
            rles = [_segmentation_rle(a["segmentation"], h, w) for a in anns]
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        else:
            masks = np.zeros((0, h, w), dtype=np.uint8)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        return image, target


def to_coco_results(
    predictions: Sequence[dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat: dict[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision-format predictions -> COCO results (JSON-serialisable).

    Args:
        predictions: per image, ``boxes`` ``Tensor[D, 4]`` xyxy, ``labels`` ``Tensor[D]``,
            ``scores`` ``Tensor[D]``, and optionally ``masks`` ``Tensor[D, 1, h, w]`` (or
            ``[D, h, w]``) of probabilities.
        image_ids: the COCO image id of each prediction.
        label_to_cat: contiguous label -> COCO category id (the dataset's ``label_to_cat``).
        mask_threshold: a pixel belongs to the mask when its probability is ``> mask_threshold``.

    Returns one dict per detection: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
    ``score``, and ``segmentation`` (compressed RLE, ``counts`` a str) when masks are given.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = pred["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
        scores = pred["scores"].detach().cpu().double().numpy().tolist()
        labels = pred["labels"].detach().cpu().numpy().tolist()
        unknown = sorted(set(labels) - set(label_to_cat))
        if unknown:
            raise ValueError(f"image {image_id}: labels {unknown} have no category in label_to_cat")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        rles: list[dict[str, Any]] | None = None
        if "masks" in pred:
            masks = pred["masks"].detach().cpu()
            masks = masks.reshape(len(labels), *masks.shape[-2:])
            binary = (masks > mask_threshold).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(labels) else []
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for d in range(len(labels)):
            result = {
                "image_id": int(image_id),
                "category_id": label_to_cat[labels[d]],
                "bbox": xywh[d],
                "score": scores[d],
            }
            if rles is not None:
                result["segmentation"] = rles[d]
            results.append(result)
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    image_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Run COCOeval per IoU type; returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}}`` as COCOeval computes them (-1 where it has nothing
    to average, e.g. no ground truth in an area range).

    Box evaluation reads each result's ``bbox``, mask evaluation its ``segmentation`` (each alone, as
    torchvision's and detectron2's evaluators do, so a mask's area is its own, not its box's). No
    results at all is valid: every image then counts as having no detections. ``image_ids``
    restricts evaluation to those images (default: all of ``coco_gt``). pycocotools' printing is
    captured and logged at INFO level.
    """
    key = {"bbox": "bbox", "segm": "segmentation"}
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in key:
            raise ValueError(f"iou_type must be 'bbox' or 'segm'; got {iou_type!r}")
        missing = sum(key[iou_type] not in r for r in results)
        if missing:
            raise ValueError(f"{missing} results have no {key[iou_type]!r}, needed for {iou_type!r} evaluation")
        typed = [
            {
                "image_id": r["image_id"],
                "category_id": r["category_id"],
                "score": r["score"],
                key[iou_type]: r[key[iou_type]],
            }
            for r in results
        ]
        with _captured_stdout() as log:
            if typed:
                coco_dt = coco_gt.loadRes(typed)
            else:
                # loadRes cannot take an empty list; an index with the ground truth's images and no
                # annotations is what it would build.
                coco_dt = coco_from_dict(
                    {
                        "images": coco_gt.dataset["images"],
                        "categories": coco_gt.dataset.get("categories", []),
                        "annotations": [],
                    }
                )
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.info("COCOeval %s:\n%s", iou_type, log.getvalue())
        metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
    return metrics
