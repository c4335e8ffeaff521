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
  box), so an annotation made only of those, or with no polygon at all, has an empty mask. The
  segmentation in ``dataset.coco``, the ground truth COCOeval reads, is rewritten to match (those parts
  left out; an empty mask as an RLE), with a warning naming the annotations;
* category ids map to contiguous labels ``1..K`` in increasing id order (``cat_to_label``,
  ``label_to_cat``); 0 is background.

Broken data fails loudly at construction, naming the file and the offending image, category or
annotation id (an annotation's image id too): a missing annotation file or image file
(``FileNotFoundError``); otherwise ``ValueError``, for malformed JSON, ``images`` / ``categories`` /
``annotations`` that are not lists, an id that is not an integer or repeats, an annotation whose image or
category does not exist, and any field pycocotools would misread, crash or run out of memory on -- all
checked before pycocotools sees them:

* image ``height`` and ``width``: positive integers whose product is at most what ``image.read_image``
  opens (``PIL.Image.MAX_IMAGE_PIXELS``) and below 2**31 (pycocotools indexes pixels with 32-bit integers);
  ``file_name`` a string;
* ``bbox``: four finite numbers; ``iscrowd``: 0 or 1; ``area``: a finite number >= 0;
* polygon coordinates: numbers in ``x, y`` pairs (an odd count is an error, not truncated), finite and
  within one image size of the image (``-w <= x <= 2w``, ``-h <= y <= 2h``; pycocotools rasterises
  beyond the image and clips), with an outline (the sum of each edge's longer side) at most
  ``POLYGON_OUTLINE_LIMIT x (h + w)``, as pycocotools' memory grows with it;
* RLE: ``size`` ``[h, w]`` of the image; ``counts`` non-negative integers (or a compressed string,
  decoded here) whose runs add up to exactly ``h x w`` pixels.

An image file whose size differs from its record, that PIL cannot decode, or past PIL's
decompression-bomb limit fails when it is read (``image.read_image``), naming the annotation file,
the image id and the image file.

Evaluation: ``to_coco_results`` turns torchvision-format predictions into COCO results and
``coco_evaluate`` runs COCOeval for boxes and masks, with pycocotools' printing captured.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

from .image import read_image

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


# A polygon's outline may be at most this many times (height + width): pycocotools rasterises a polygon
# by upsampling its outline 5x into int arrays, so its memory grows with the outline, not the image. A
# polygon tracing the image border has 2x; real ones stay far below 50x.
POLYGON_OUTLINE_LIMIT = 50


# JSON numbers as json.load gives them (bool is an int in Python, but not a number in JSON).
_NUMBER_TYPES = frozenset({int, float})


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES


def _all_numbers(values: list[Any]) -> bool:
    """Whether every value is a JSON number; builtins only, as it runs on every polygon of a file."""
    return set(map(type, values)) <= _NUMBER_TYPES


def _max_pixels() -> int:
    """The most pixels an image record may have: what ``read_image`` opens (PIL's decompression-bomb limit, read
    now, as users may change it) and below 2**31, as pycocotools' polygon rasterisation indexes pixels with
    32-bit integers."""
    limit = 2**31 - 1
    return limit if Image.MAX_IMAGE_PIXELS is None else min(limit, Image.MAX_IMAGE_PIXELS)


def _check_polygon(part: Any, index: int, h: int, w: int) -> None:
    """Raise ValueError unless ``part``, the segmentation's polygon ``index``, is one pycocotools rasterises
    safely (module docstring). Every polygon of a file passes here, so the checks are builtins over whole
    lists (several times faster than a Python loop over points, or numpy for COCO's ~20 points a polygon);
    only a failure looks at single points, for the message."""
    if not isinstance(part, list):
        raise ValueError(f"polygon {index} must be a list of coordinates; got {part!r:.200}")
    if len(part) % 2:
        raise ValueError(f"polygon {index} has an odd number of values ({len(part)}); coordinates come in x, y pairs")
    if not part:
        return
    xs, ys = part[0::2], part[1::2]
    # A sum is NaN or infinite when a term is, or when terms are far out of range.
    if not (
        _all_numbers(part)
        and -math.inf < sum(part) < math.inf
        and -w <= min(xs) <= max(xs) <= 2 * w
        and -h <= min(ys) <= max(ys) <= 2 * h
    ):
        bad = next(i for i, (x, y) in enumerate(zip(xs, ys, strict=True)) if not _point_ok(x, y, h, w))
        raise ValueError(
            f"polygon {index}, point {bad} ({xs[bad]!r}, {ys[bad]!r}): not a pair of finite numbers within one "
            f"image size of the {h} x {w} image (x in [{-w}, {2 * w}], y in [{-h}, {2 * h}])"
        )
    # pycocotools walks each edge (the closing one too) in max(|dx|, |dy|) steps.
    dxs = map(abs, map(operator.sub, xs, xs[-1:] + xs[:-1]))
    outline = sum(map(max, dxs, map(abs, map(operator.sub, ys, ys[-1:] + ys[:-1]))))
    limit = POLYGON_OUTLINE_LIMIT * (h + w)
    if outline > limit:
        raise ValueError(
            f"polygon {index}: its outline of {outline:.0f} px is longer than {POLYGON_OUTLINE_LIMIT} x "
            f"(height + width) = {limit} px"
        )


def _point_ok(x: Any, y: Any, h: int, w: int) -> bool:
    """The per-point form of ``_check_polygon``'s test (comparisons with NaN are False)."""
    return _is_number(x) and _is_number(y) and -w <= x <= 2 * w and -h <= y <= 2 * h


def _rle_string_counts(s: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string, parsed as pycocotools' ``rleFrString`` does.

    pycocotools parses such strings unchecked (it reads past the end of a string that stops inside a
    value, and overflows on a value of more than 6 characters); those are errors here, so that every
    string accepted here means to pycocotools what it means here. Each value is 5-bit chunks, lowest
    first, each written as ``chr(48 + chunk)``, plus 32 when another chunk follows; bit 4 of the last
    chunk is the sign. From the fourth value on, a value is stored as its difference to the value two
    before (pycocotools' ``m > 2``).
    """
    counts: list[int] = []
    value = chunks = 0
    for position, char in enumerate(s):
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise ValueError(f"compressed RLE counts: character {char!r} at {position} is outside '0'..'o'")
        value |= (c & 0x1F) << (5 * chunks)
        chunks += 1
        if c & 0x20:
            if chunks == 6:
                raise ValueError(f"compressed RLE counts: a value longer than 6 characters ends at {position}")
            continue
        if c & 0x10:
            value -= 1 << (5 * chunks)  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = chunks = 0
    if chunks:
        raise ValueError("compressed RLE counts: the string ends inside a value")
    return counts


def _check_rle(segm: dict[str, Any], h: int, w: int) -> None:
    """Raise ValueError unless ``segm`` is an RLE of exactly the ``h x w`` image's pixels: pycocotools
    decodes a short one into uninitialised memory and may write past the end of a long one."""
    size = segm["size"]
    if not (isinstance(size, list) and all(type(v) is int for v in size) and size == [h, w]):
        raise ValueError(f"RLE size {size!r} differs from the image's [height, width] [{h}, {w}]")
    counts = segm["counts"]
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    elif not isinstance(counts, list):
        raise ValueError(f"RLE counts must be a list of run lengths or a compressed RLE string; got {counts!r}")
    if not all(type(c) is int and c >= 0 for c in counts):
        i, c = next((i, c) for i, c in enumerate(counts) if not (type(c) is int and c >= 0))
        raise ValueError(f"RLE counts must be non-negative integers; run {i} is {c!r}")
    if sum(counts) != h * w:
        raise ValueError(f"RLE runs add up to {sum(counts)} pixels, not the image's {h} x {w} = {h * w}")


def _check_segmentation(segm: Any, h: int, w: int) -> None:
    """Raise ValueError unless ``segm`` is a form pycocotools reads safely, for an ``h x w`` image
    (nothing is decoded, so that checking all of COCO's annotations stays fast)."""
    if isinstance(segm, list):
        for index, part in enumerate(segm):
            _check_polygon(part, index, h, w)
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        _check_rle(segm, h, w)
    else:
        raise ValueError("segmentation must be a list of polygons or an RLE dict with 'counts' and 'size'")


def _usable_segmentation(segm: Any, h: int, w: int) -> Any:
    """A checked segmentation (``_check_segmentation``) of an ``h x w`` image as the training targets and
    COCOeval both read it: polygon parts of fewer than 3 points left out, and a polygon list left empty (or
    given empty) the RLE of the empty mask; ``segm`` itself when nothing changes.

    As given, pycocotools reads a segmentation whose first part has 2 points as a box ``[x, y, w, h]`` (or
    fails with a TypeError), fails with an IndexError on an empty list, and rasterises a 2-point part that
    is not the first: COCOeval either crashed naming nothing or scored against other masks than the targets.
    """
    if not isinstance(segm, list) or (segm and all(len(part) >= 6 for part in segm)):
        return segm
    parts = [part for part in segm if len(part) >= 6]
    return parts if parts else {"size": [h, w], "counts": [h * w]}


def _segmentation_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """A usable segmentation (``_usable_segmentation``) as one compressed RLE of an ``h x w`` image."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def _list_field(data: dict[str, Any], key: str, path: str) -> list[Any]:
    """``data[key]`` (set to ``[]`` when absent), which must be a list."""
    value = data.setdefault(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{path}: {key!r} must be a list; got {value!r:.80}")
    return value


def _check_id(record: Any, kind: str, path: str, seen: dict[int, dict[str, Any]]) -> int:
    """The ``id`` of an image / category / annotation record, which must be an integer (ids of mixed
    types would neither match nor sort) not in ``seen``; the record is added to ``seen``."""
    if not isinstance(record, dict) or "id" not in record:
        raise ValueError(f"{path}: {kind} record without an 'id': {record!r:.200}")
    record_id = record["id"]
    if type(record_id) is not int:
        raise ValueError(f"{path}: {kind} id {record_id!r} is not an integer")
    if record_id in seen:
        raise ValueError(f"{path}: duplicate {kind} id {record_id}")
    seen[record_id] = record
    return record_id


def _check_and_complete(data: dict[str, Any], path: str) -> None:
    """Validate references, types and forms (module docstring); fill ``iscrowd`` (0) and ``area`` (mask
    area) where absent."""
    images: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        image_id = _check_id(img, "image", path, images)
        where = f"{path}: image {image_id}"
        missing = [k for k in ("file_name", "height", "width") if k not in img]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        h, w = img["height"], img["width"]
        if not (type(h) is int and type(w) is int and h > 0 and w > 0):
            raise ValueError(f"{where}: height and width must be positive integers; got {h!r} and {w!r}")
        if h * w > _max_pixels():
            raise ValueError(
                f"{where}: {h} x {w} = {h * w} pixels is more than {_max_pixels()}, the most an image may have "
                "(PIL.Image.MAX_IMAGE_PIXELS, and below 2**31)"
            )
        if not isinstance(img["file_name"], str) or not img["file_name"] or "\0" in img["file_name"]:
            raise ValueError(f"{where}: file_name must be a non-empty string; got {img['file_name']!r}")
    cat_ids: dict[int, dict[str, Any]] = {}
    for cat in _list_field(data, "categories", path):
        cat_id = _check_id(cat, "category", path, cat_ids)
        if not isinstance(cat.get("name"), str):
            raise ValueError(f"{path}: category {cat_id}: 'name' must be a string; got {cat.get('name')!r}")
    ann_ids: dict[int, dict[str, Any]] = {}
    rewritten: list[int] = []
    for ann in _list_field(data, "annotations", path):
        where = f"{path}: annotation {_check_id(ann, 'annotation', path, ann_ids)}"
        missing = [k for k in ("image_id", "category_id", "bbox", "segmentation") if k not in ann]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        img = images.get(ann["image_id"]) if type(ann["image_id"]) is int else None
        if img is None:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} has no image record")
        if type(ann["category_id"]) is not int or ann["category_id"] not in cat_ids:
            raise ValueError(f"{where}: category_id {ann['category_id']!r} has no category record")
        where = f"{where} (image {ann['image_id']})"
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and _all_numbers(bbox) and all(map(math.isfinite, bbox))):
            raise ValueError(f"{where}: bbox must be [x, y, w, h], four finite numbers; got {bbox!r:.200}")
        if ann.setdefault("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: iscrowd must be 0 or 1; got {ann['iscrowd']!r}")
        if "area" in ann and not (_is_number(ann["area"]) and 0 <= ann["area"] < math.inf):
            raise ValueError(f"{where}: area must be a finite number >= 0; got {ann['area']!r}")
        try:
            _check_segmentation(ann["segmentation"], img["height"], img["width"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        usable = _usable_segmentation(ann["segmentation"], img["height"], img["width"])
        if usable is not ann["segmentation"]:
            ann["segmentation"] = usable
            rewritten.append(ann["id"])
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(_segmentation_rle(ann["segmentation"], img["height"], img["width"])))
    if rewritten:
        logger.warning(
            "%s: %d annotation(s) with polygon parts of fewer than 3 points, or no polygon: those parts are left "
            "out, and an annotation left without any has an empty mask (annotation ids %s)",
            path, len(rewritten), ", ".join(map(str, rewritten[:10])) + (", ..." if len(rewritten) > 10 else ""),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Masks as COCO polygons
# ----------------------------------------------------------------------------------------------

# Unit steps of the outline directions: +x, +y, -x, -y (image coordinates, y down).
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _outlines(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The closed outlines of a boolean ``[h, w]`` mask along pixel edges, as their corner points ``(x, y)``
    (pixel ``(r, c)`` is the square ``[c, c + 1] x [r, r + 1]``), walked with the mask on the right (y down):
    clockwise on screen around a part, counter-clockwise around a hole. Where two pixels touch only at a corner
    the walk turns towards the mask, so each 4-connected part has its own outline.
    """
    h, w = mask.shape
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    # out[v]: bit d set when an edge in direction d starts at vertex v = y * (w + 1) + x.
    out = np.zeros((h + 1, w + 1), dtype=np.uint8)
    out[:-1, :-1] |= (inner & ~padded[:-2, 1:-1]) * np.uint8(1)  # top edges, from (c, r) towards +x
    out[:-1, 1:] |= (inner & ~padded[1:-1, 2:]) * np.uint8(2)  # right edges, from (c + 1, r) towards +y
    out[1:, 1:] |= (inner & ~padded[2:, 1:-1]) * np.uint8(4)  # bottom edges, from (c + 1, r + 1) towards -x
    out[1:, :-1] |= (inner & ~padded[1:-1, :-2]) * np.uint8(8)  # left edges, from (c, r + 1) towards -y
    starts = np.flatnonzero(out).tolist()
    edges = bytearray(out.tobytes())
    moves = [dx + dy * (w + 1) for dx, dy in _STEPS]
    outlines = []
    # A loop's first vertex in raster order is its top-left corner, where it starts towards +x (a part) or +y (a
    # hole), so every loop starts at a corner.
    for v0 in starts:
        while edges[v0]:
            d = d0 = (edges[v0] & -edges[v0]).bit_length() - 1
            edges[v0] ^= 1 << d
            corners = [(v0 % (w + 1), v0 // (w + 1))]
            v = v0 + moves[d]
            while True:
                free = edges[v] | (1 << d0 if v == v0 else 0)
                turn = next(t for t in ((d + 1) % 4, d, (d + 3) % 4) if free >> t & 1)
                if v == v0 and turn == d0:
                    break
                edges[v] ^= 1 << turn
                if turn != d:
                    corners.append((v % (w + 1), v // (w + 1)))
                d = turn
                v += moves[d]
            outlines.append(corners)
    return outlines


def _signed_area(points: list[tuple[int, int]]) -> int:
    """Twice the shoelace area: positive for a part's outline, negative for a hole's (``_outlines``)."""
    xy = np.asarray(points)
    x, y = xy[:, 0], xy[:, 1]
    return int(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _inside(point: tuple[float, float], points: list[tuple[int, int]]) -> bool:
    """Whether ``point`` (never on an edge) is inside the closed outline ``points`` (even-odd rule)."""
    xy = np.asarray(points, dtype=np.float64)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    px, py = point
    crosses = ((y0 > py) != (y1 > py)) & (px < x0 + (py - y0) * (x1 - x0) / np.where(y1 == y0, 1, y1 - y0))
    return bool(np.count_nonzero(crosses) % 2)


def mask_to_polygons(mask: np.ndarray) -> list[list[int]]:
    """A binary mask as COCO polygons that rasterise back to exactly the mask.

    Args:
        mask: ``[h, w]`` array, nonzero inside.

    Returns:
        One polygon ``[x0, y0, x1, y1, ...]`` (integer pixel corners) per 4-connected part of the mask: the
        part's outline along pixel edges, with the outline of each of its holes spliced in through a cut (a
        segment walked there and back) from the nearest corner. pycocotools' ``frPyObjects`` (what COCOeval,
        ``CocoDataset`` and torchvision's detection references read polygons with) fills a polygon by the
        even-odd rule, along pixel centres, and the parts' polygons by union: the result is the mask, pixel
        for pixel (``to_coco`` checks it). A part's outline runs clockwise on screen and its holes the other
        way, so the nonzero winding rule leaves the holes out too. An empty mask gives ``[]``.
    """
    outlines = _outlines(np.asarray(mask) != 0)
    areas = [_signed_area(o) for o in outlines]
    parts = [i for i, a in enumerate(areas) if a > 0]
    spliced = {i: list(outlines[i]) for i in parts}
    for i, hole in enumerate(outlines):
        if areas[i] > 0:
            continue
        # The pixel on the mask side of the hole's first edge (towards +y from its top-left corner: the pixel to
        # its left) belongs to the part around the hole: the smallest outline containing its centre.
        x, y = hole[0]
        centre = (x - 0.5, y + 0.5)
        part = min((p for p in parts if _inside(centre, outlines[p])), key=lambda p: areas[p])
        points = spliced[part]
        near = int(np.argmin([(px - x) ** 2 + (py - y) ** 2 for px, py in points]))
        spliced[part] = points[: near + 1] + hole + [hole[0]] + points[near:]
    return [[c for point in spliced[i] for c in point] for i in parts]


class CocoDataset(Dataset):
    """COCO-format instance segmentation data, in torchvision's detection item format.

    Args:
        ann_file: COCO instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder the images' ``file_name`` are relative to.
        skip_empty: leave out images with no usable training annotation (none that is not crowd
            and has a box of positive size). torchvision's references drop empty images for
            training too (theirs keep crowd-only images); keep them (the default) for evaluation.
        check_files: check at construction that every image file exists (one ``stat`` per image).

    Attributes: ``ann_file``, ``image_dir``, ``coco`` (pycocotools index of the whole file, crowd
    annotations included: the evaluation ground truth), ``ids`` (image ids in item order, increasing),
    ``cat_to_label``, ``label_to_cat``, ``classes`` (names by label, ``classes[0] == "background"``),
    ``num_classes``.

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
        self.ann_file = ann_file = os.fspath(ann_file)
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
        try:
            image = read_image(path, size=(h, w))
        except ValueError as e:
            raise ValueError(f"{self.ann_file}: image id {image_id}: {e}") from e
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
