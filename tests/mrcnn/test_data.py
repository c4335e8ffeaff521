"""mrcnn.data: the synthetic shapes, the COCO loader, COCO export and evaluation.

References we did not write: pycocotools (``COCO.annToMask``, ``mask.encode/decode``, COCOeval) and
torchvision (``ops.masks_to_boxes``, the Mask R-CNN that must accept our items); golden masks for
hand-made polygons and RLEs.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Subset

from mrcnn.data import (
    CLASSES,
    CocoDataset,
    ShapesDataset,
    build_dataset,
    coco_evaluate,
    coco_ground_truth,
    collate_list,
    read_image,
    to_coco,
    to_coco_results,
    write_coco,
)
from mrcnn.data.coco import mask_to_polygons

SIZE_RANGE = ((64, 96), (72, 112))


def _shapes(split: str = "train", n: int = 12, **kw) -> ShapesDataset:
    kw.setdefault("image_size", SIZE_RANGE)
    kw.setdefault("object_size", (14.0, 40.0))
    kw.setdefault("min_visible_pixels", 40)
    return ShapesDataset(split, n, **kw)


def _assert_items_equal(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1]["image_id"] == b[1]["image_id"]
    for key in ("boxes", "labels", "masks", "area", "iscrowd"):
        assert a[1][key].dtype == b[1][key].dtype, key
        assert torch.equal(a[1][key], b[1][key]), key


def _gt_predictions(targets: list[dict]) -> list[dict]:
    """Ground truth in torchvision's prediction format (masks as [D, 1, h, w] probabilities)."""
    return [
        {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "scores": torch.linspace(1.0, 0.5, len(t["labels"])),
            "masks": t["masks"][:, None].float(),
        }
        for t in targets
    ]


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def test_shapes_item_format():
    ds = _shapes(n=8)
    assert len(ds) == 8
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = image.shape[-2:]
        n = len(target["labels"])
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert SIZE_RANGE[0][0] <= h <= SIZE_RANGE[0][1] and SIZE_RANGE[1][0] <= w <= SIZE_RANGE[1][1]
        assert image.min() >= 0.0 and image.max() <= 1.0
        # Quantised to 1/255 so that a PNG round trip is exact.
        torch.testing.assert_close(image * 255, (image * 255).round(), rtol=0, atol=1e-4)
        assert target["image_id"] == i
        assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64 and ((target["labels"] >= 1) & (target["labels"] <= 4)).all()
        assert target["masks"].shape == (n, h, w) and target["masks"].dtype == torch.uint8
        assert target["area"].dtype == torch.float32 and target["iscrowd"].dtype == torch.int64
        assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
        assert torch.equal(target["iscrowd"], torch.zeros(n, dtype=torch.int64))
        assert ds.min_objects <= n <= ds.max_objects
    assert ds[-1][1]["image_id"] == 7
    with pytest.raises(IndexError):
        ds[8]


def test_shapes_deterministic_and_random_access():
    ds = _shapes(n=6)
    forward = [ds[i] for i in range(6)]
    again = _shapes(n=6)
    for i in reversed(range(6)):
        _assert_items_equal(again[i], forward[i])
        _assert_items_equal(ds[i], forward[i])
    # A longer dataset with the same seed holds the same first items.
    _assert_items_equal(_shapes(n=50)[3], forward[3])


def test_shapes_seeds_and_splits_differ():
    train = [_shapes("train", 20)[i][0] for i in range(20)]
    val = [_shapes("val", 20)[i][0] for i in range(20)]
    other_seed = [_shapes("train", 20, seed=1)[i][0] for i in range(20)]
    for a in train:
        assert not any(a.shape == b.shape and torch.equal(a, b) for b in val)
        assert not any(a.shape == b.shape and torch.equal(a, b) for b in other_seed)
    # Items of one dataset differ from each other too.
    assert not any(a.shape == b.shape and torch.equal(a, b) for i, a in enumerate(train) for b in train[i + 1 :])


def test_shapes_masks_match_boxes():
    ds = _shapes(n=16)
    count = 0
    for i in range(len(ds)):
        _, t = ds[i]
        if not len(t["labels"]):
            continue
        count += len(t["labels"])
        # torchvision's masks_to_boxes gives the last row/column; ours is COCO's "last + 1".
        expected = torchvision.ops.masks_to_boxes(t["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        torch.testing.assert_close(t["boxes"], expected, rtol=0, atol=0)
        # Every instance is visible enough to be learnt.
        assert (t["area"] >= ds.min_visible_pixels).all()
    assert count > 20


def test_shapes_occlusion_visible_masks_disjoint():
    ds = _shapes(n=24, min_objects=4, max_objects=6)
    overlapping_boxes = 0
    for i in range(len(ds)):
        _, t = ds[i]
        # Visible masks never overlap: each pixel belongs to at most one instance.
        assert t["masks"].sum(0).max() <= 1
        iou = torchvision.ops.box_iou(t["boxes"], t["boxes"])
        overlapping_boxes += int((iou.triu(diagonal=1) > 0).sum())
    # Shapes do overlap (their boxes intersect) -- the masks above are the visible parts.
    assert overlapping_boxes > 5


def test_shapes_masks_cover_their_shapes_pixels():
    """Under heavy occlusion (min_visible=0: later shapes may hide most of earlier ones) each visible
    mask still covers pixels of one colour: its own shape's, shaded by at most ~0.1 and noised with
    sigma <= 0.05 -- never a part of its occluder (whose colour differs by >= 0.25) or background."""
    ds = _shapes(n=12, min_objects=6, max_objects=6, min_visible=0.0, min_visible_pixels=1)
    instances = 0
    for i in range(len(ds)):
        image, t = ds[i]
        assert t["masks"].sum(0).max() <= 1
        for m in t["masks"].bool():
            pixels = image[:, m]
            deviation = (pixels - pixels.median(1, keepdim=True).values).abs().amax(0)
            assert (deviation < 0.2).float().mean() > 0.9
            instances += 1
    assert instances > 40


def test_shapes_all_classes_appear():
    labels = torch.cat([_shapes(n=30)[i][1]["labels"] for i in range(30)])
    assert set(labels.tolist()) == {1, 2, 3, 4}
    ds2 = _shapes(n=20, num_classes=2)
    labels2 = torch.cat([ds2[i][1]["labels"] for i in range(20)])
    assert set(labels2.tolist()) == {1, 2}
    assert ds2.classes == ("background", "circle", "rectangle") == CLASSES[:3]
    assert ds2.label_to_cat == {1: 1, 2: 2}


def test_shapes_without_objects():
    ds = ShapesDataset("val", 2, image_size=(40, 50), min_objects=0, max_objects=0)
    image, t = ds[1]
    assert image.shape == (3, 40, 50)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 40, 50)
    assert t["area"].shape == (0,) and t["iscrowd"].shape == (0,)
    data = to_coco(ds)
    assert len(data["images"]) == 2 and data["annotations"] == []


def test_shapes_sizes():
    fixed = ShapesDataset("val", 3, image_size=(80, 100))
    assert all(fixed[i][0].shape == (3, 80, 100) for i in range(3))
    assert ShapesDataset("val", 1, image_size=64)[0][0].shape == (3, 64, 64)
    varied = {tuple(_shapes(n=10)[i][0].shape) for i in range(10)}
    assert len(varied) > 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "test"},
        {"num_images": -1},
        {"seed": -1},
        {"min_objects": 3, "max_objects": 2},
        {"num_classes": 5},
        {"num_classes": 0},
        {"image_size": (16, 16)},
        {"image_size": ((100, 80), (64, 64))},
        {"image_size": "big"},
        {"object_size": (30.0, 20.0)},
        {"min_visible": 1.5},
        {"min_visible_pixels": -1},
    ],
)
def test_shapes_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ShapesDataset(**kwargs)


def test_shapes_feed_torchvision_mask_rcnn():
    """Our items are torchvision's detection format: its Mask R-CNN trains on them as they are."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8
    model = MaskRCNN(
        backbone,
        num_classes=5,
        min_size=64,
        max_size=112,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
    )
    images, targets = next(iter(DataLoader(_shapes(n=2), batch_size=2, collate_fn=collate_list)))
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------
# COCO export, loader, evaluation
# ----------------------------------------------------------------------------------------------


def test_coco_export_round_trip(tmp_path):
    ds = _shapes("val", 10)
    write_coco(ds, tmp_path / "ann.json", tmp_path / "images")
    coco_ds = CocoDataset(tmp_path / "ann.json", tmp_path / "images")
    assert len(coco_ds) == len(ds)
    assert coco_ds.classes == ds.classes and coco_ds.label_to_cat == ds.label_to_cat
    for i in range(len(ds)):
        _assert_items_equal(coco_ds[i], ds[i])
    # The annotation dict: 1-based annotation ids, bbox = xywh of the target boxes, polygons of the masks.
    data = to_coco(ds)
    assert json.loads(json.dumps(data)) == data
    anns = data["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    first = [a for a in anns if a["image_id"] == 0]
    _, t0 = ds[0]
    h, w = t0["masks"].shape[-2:]
    for a, box, mask in zip(first, t0["boxes"], t0["masks"], strict=True):
        x1, y1, x2, y2 = box.tolist()
        assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1]
        assert a["iscrowd"] == 0 and all(type(v) is int for polygon in a["segmentation"] for v in polygon)
        assert np.array_equal(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))),
                              mask.numpy())  # fmt: skip
        assert a["area"] == mask.sum().item()


def _convert_coco_poly_to_mask(segmentations: list, height: int, width: int) -> torch.Tensor:
    """torchvision's ``references/detection/coco_utils.py`` ``convert_coco_poly_to_mask``, verbatim in what it
    calls (the references are scripts, not in the wheel)."""
    masks = []
    for polygons in segmentations:
        rles = mask_utils.frPyObjects(polygons, height, width)
        mask = mask_utils.decode(rles)
        if len(mask.shape) < 3:
            mask = mask[..., None]
        mask = torch.as_tensor(mask, dtype=torch.uint8)
        mask = mask.any(dim=2)
        masks.append(mask)
    if masks:
        return torch.stack(masks, dim=0)
    return torch.zeros((0, height, width), dtype=torch.uint8)


def test_coco_export_reads_through_torchvision_references(tmp_path):
    """The written file through the default data path of torchvision's detection references
    (``ConvertCocoPolysToMask``: crowds dropped, then ``convert_coco_poly_to_mask``): the dataset's masks, pixel
    for pixel, with instances of several parts and with holes among them."""
    ds = _shapes("train", 24, min_objects=4, max_objects=6)
    write_coco(ds, tmp_path / "ann.json")
    with open(tmp_path / "ann.json") as f:
        data = json.load(f)
    parts = holes = 0
    for image in data["images"]:
        anno = [a for a in data["annotations"] if a["image_id"] == image["id"] and a["iscrowd"] == 0]
        masks = _convert_coco_poly_to_mask([a["segmentation"] for a in anno], image["height"], image["width"])
        _, target = ds[image["id"]]
        assert torch.equal(masks.to(torch.uint8), target["masks"])
        parts += sum(len(a["segmentation"]) > 1 for a in anno)
        holes += sum(_has_hole(m) for m in target["masks"].numpy())
    assert parts and holes, (parts, holes)  # the cases that need more than one outline occur


def _has_hole(mask: np.ndarray) -> bool:
    """Whether some background pixel is cut off from the image border (4-connected flood from the border)."""
    outside = np.zeros(np.array(mask.shape) + 2, dtype=bool)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    free = np.pad(mask == 0, 1, constant_values=True)
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return bool((free & ~outside).any())
        outside = grown


def _winding_numbers(polygon: list[int], h: int, w: int) -> np.ndarray:
    """``[h, w]`` winding numbers of the closed polygon around the pixel centres (the nonzero rule's input)."""
    xy = np.array(polygon, dtype=np.float64).reshape(-1, 2)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    py, px = np.mgrid[:h, :w] + 0.5
    wind = np.zeros((h, w), dtype=np.int64)
    for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
        if b == d:
            continue
        x_at = a + (py - b) * (c - a) / (d - b)
        wind += ((min(b, d) < py) & (py < max(b, d)) & (px < x_at)) * (1 if d > b else -1)
    return wind


@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_mask_to_polygons_rasterise_to_the_mask(density):
    """Random masks (parts touching at corners only, holes, islands in holes, pixels on the border): pycocotools
    fills the polygons into exactly the mask (even-odd per polygon, union over them), and so does the nonzero
    winding rule."""
    rng = np.random.default_rng(int(density * 100))
    for _ in range(40):
        h, w = rng.integers(1, 24, size=2)
        mask = rng.random((h, w)) < density
        polygons = mask_to_polygons(mask)
        assert all(len(p) % 2 == 0 and len(p) >= 8 for p in polygons)
        drawn = mask_utils.decode(mask_utils.frPyObjects(polygons, h, w)).any(2) if polygons else mask & False
        assert np.array_equal(drawn, mask)
        nonzero = np.any([_winding_numbers(p, h, w) != 0 for p in polygons], axis=0) if polygons else drawn
        assert np.array_equal(nonzero, mask)


def test_mask_to_polygons_golden():
    ring = np.zeros((5, 6), dtype=np.uint8)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0  # a hole: spliced into the ring's outline at its nearest corner, (1, 1)
    ring[4, 5] = 1  # a second part, on the image's corner
    assert mask_to_polygons(ring) == [
        [1, 1, 2, 2, 2, 3, 3, 3, 3, 2, 2, 2, 1, 1, 4, 1, 4, 4, 1, 4],
        [5, 4, 6, 4, 6, 5, 5, 5],
    ]
    diagonal = np.eye(2, dtype=bool)  # pixels touching at a corner: two parts
    assert mask_to_polygons(diagonal) == [[0, 0, 1, 0, 1, 1, 0, 1], [1, 1, 2, 1, 2, 2, 1, 2]]
    assert mask_to_polygons(np.zeros((3, 3))) == []


def _rle_counts_column_major(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE by hand: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


H1, W1 = 20, 30


def _golden_masks() -> dict[str, np.ndarray]:
    poly = np.zeros((H1, W1), np.uint8)
    poly[1:4, 2:6] = 1  # polygon part [2,1]-[6,4]
    poly[10:15, 10:14] = 1  # polygon part [10,10]-[14,15]
    uncompressed = np.zeros((H1, W1), np.uint8)
    uncompressed[5:10, 20:26] = 1
    uncompressed[7, 22] = 0
    yy, xx = np.mgrid[:H1, :W1]
    disk = ((yy - 12) ** 2 + (xx - 4) ** 2 <= 9).astype(np.uint8)
    edge = np.zeros((H1, W1), np.uint8)
    edge[15:20, 25:30] = 1
    return {"poly": poly, "uncompressed": uncompressed, "disk": disk, "edge": edge}


def _write_small_coco(root) -> dict:
    """A COCO file covering every form: image 1 (RGB, 20x30) with polygons (two parts plus a
    2-point part), uncompressed and compressed RLE, a crowd, a zero-width box and a box running out
    of the image; image 2 (grayscale) without annotations; image 3 with a crowd only."""
    golden = _golden_masks()
    os.makedirs(root / "img", exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H1, W1, 3), dtype=np.uint8)).save(root / "img" / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "img" / "gray.png")  # mode "L"
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "img" / "c.jpg", quality=95)
    disk_rle = mask_utils.encode(np.asfortranarray(golden["disk"]))
    crowd = np.zeros((H1, W1), np.uint8)
    crowd[0:8, 8:18] = 1
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H1, "width": W1},
            {"id": 2, "file_name": "gray.png", "height": 16, "width": 16},
            {"id": 5, "file_name": "c.jpg", "height": 12, "width": 10},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 3,
                "bbox": [2, 1, 12, 14],
                "segmentation": [[0, 0, 1, 1], [2, 1, 6, 1, 6, 4, 2, 4], [10, 10, 14, 10, 14, 15, 10, 15]],
                "iscrowd": 0,
            },  # no "area": filled from the mask
            {
                "id": 11,
                "image_id": 1,
                "category_id": 7,
                "bbox": [20, 5, 6, 5],
                "segmentation": {"size": [H1, W1], "counts": _rle_counts_column_major(golden["uncompressed"])},
                "area": 29.0,
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "bbox": mask_utils.toBbox(disk_rle).tolist(),
                "segmentation": {"size": [H1, W1], "counts": disk_rle["counts"].decode("ascii")},
                "area": float(golden["disk"].sum()),
                "iscrowd": 0,
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 7,
                "bbox": [8, 0, 10, 8],
                "segmentation": {"size": [H1, W1], "counts": _rle_counts_column_major(crowd)},
                "area": 80.0,
                "iscrowd": 1,
            },
            {
                "id": 14,
                "image_id": 1,
                "category_id": 3,
                "bbox": [5, 5, 0, 3],
                "segmentation": [[5, 5, 5, 8, 6, 8]],
                "area": 0.0,
                "iscrowd": 0,
            },
            {
                "id": 15,
                "image_id": 1,
                "category_id": 7,
                "bbox": [25, 15, 10, 10],
                "segmentation": [[25, 15, 35, 15, 35, 25, 25, 25]],
                "area": 25.0,
                "iscrowd": 0,
            },
            {
                "id": 16,
                "image_id": 5,
                "category_id": 7,
                "bbox": [0, 0, 5, 5],
                "segmentation": {"size": [12, 10], "counts": [0, 5, 7, 5, 7, 5, 7, 5, 7, 5, 67]},
                "area": 25.0,
                "iscrowd": 1,
            },
        ],
    }
    with open(root / "ann.json", "w") as f:
        json.dump(data, f)
    return data


def test_coco_loader_all_forms(tmp_path):
    data = _write_small_coco(tmp_path)
    golden = _golden_masks()
    ds = CocoDataset(tmp_path / "ann.json", tmp_path / "img")
    assert ds.ids == [1, 2, 5]
    assert ds.cat_to_label == {3: 1, 7: 2} and ds.label_to_cat == {1: 3, 2: 7}
    assert ds.classes == ("background", "cat", "dog") and ds.num_classes == 2

    image, t = ds[0]
    assert image.shape == (3, H1, W1) and image.dtype == torch.float32
    assert t["image_id"] == 1
    # Crowd (13) and zero-width (14) left out; the box running out of the image clamped.
    expected_boxes = torch.tensor(
        [[2, 1, 14, 15], [20, 5, 26, 10], [1, 9, 8, 16], [25, 15, 30, 20]], dtype=torch.float32
    )
    torch.testing.assert_close(t["boxes"], expected_boxes, rtol=0, atol=0)
    assert t["labels"].tolist() == [1, 2, 1, 2]
    assert t["iscrowd"].tolist() == [0, 0, 0, 0]
    assert t["area"].tolist() == [32.0, 29.0, float(golden["disk"].sum()), 25.0]
    masks = t["masks"].numpy()
    assert masks.dtype == np.uint8 and masks.shape == (4, H1, W1)
    for got, name in zip(masks, ("poly", "uncompressed", "disk", "edge"), strict=True):
        assert np.array_equal(got, golden[name]), name
    # pycocotools' own decoding agrees where it reads the segmentation as we do.
    for got, ann_id in zip(masks[1:], (11, 12, 15), strict=True):
        assert np.array_equal(got, ds.coco.annToMask(ds.coco.anns[ann_id]))

    # The grayscale image without annotations: kept, three equal channels, empty targets.
    image, t = ds[1]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 16, 16) and t["labels"].shape == (0,)
    assert t["masks"].dtype == torch.uint8 and t["boxes"].dtype == torch.float32
    # The crowd-only image: empty targets, but its crowd stays in the ground truth.
    _, t = ds[2]
    assert len(t["labels"]) == 0
    assert ds.coco.anns[16]["iscrowd"] == 1 and ds.coco.anns[13]["iscrowd"] == 1
    assert len(ds.coco.anns) == len(data["annotations"])

    skipping = CocoDataset(tmp_path / "ann.json", tmp_path / "img", skip_empty=True)
    assert skipping.ids == [1]
    _assert_items_equal(skipping[0], ds[0])


def _mutated(tmp_path, mutate) -> str:
    data = _write_small_coco(tmp_path)
    data = copy.deepcopy(data)
    mutate(data)
    path = tmp_path / "broken.json"
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_coco_loader_errors(tmp_path):
    _write_small_coco(tmp_path)
    img = tmp_path / "img"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(tmp_path / "nope.json", img)

    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"malformed JSON.*bad\.json"):
        CocoDataset(tmp_path / "bad.json", img)

    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        CocoDataset(tmp_path / "list.json", img)

    def unknown_image(d):
        d["annotations"][2]["image_id"] = 99

    with pytest.raises(ValueError, match=r"annotation 12: image_id 99 has no image"):
        CocoDataset(_mutated(tmp_path, unknown_image), img)

    def unknown_category(d):
        d["annotations"][0]["category_id"] = 4

    with pytest.raises(ValueError, match=r"annotation 10: category_id 4"):
        CocoDataset(_mutated(tmp_path, unknown_category), img)

    def duplicate_image(d):
        d["images"][1]["id"] = 1

    with pytest.raises(ValueError, match="duplicate image id 1"):
        CocoDataset(_mutated(tmp_path, duplicate_image), img)

    def wrong_rle_size(d):
        d["annotations"][1]["segmentation"]["size"] = [H1 + 1, W1]

    with pytest.raises(ValueError, match=r"annotation 11 \(image 1\): RLE size"):
        CocoDataset(_mutated(tmp_path, wrong_rle_size), img)

    def bad_segmentation(d):
        d["annotations"][2]["segmentation"] = "oops"

    with pytest.raises(ValueError, match=r"annotation 12 \(image 1\): segmentation must be a list of polygons or"):
        CocoDataset(_mutated(tmp_path, bad_segmentation), img)

    def no_segmentation(d):
        del d["annotations"][0]["segmentation"]

    with pytest.raises(ValueError, match=r"annotation 10: missing \['segmentation'\]"):
        CocoDataset(_mutated(tmp_path, no_segmentation), img)

    os.remove(img / "c.jpg")
    with pytest.raises(FileNotFoundError, match=r"image id 5 at .*c\.jpg"):
        CocoDataset(tmp_path / "ann.json", img)
    # Deleted after construction: reading the item names the file.
    ds = CocoDataset(tmp_path / "ann.json", img, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"image id 5 not found: .*c\.jpg"):
        ds[2]

    def wrong_size(d):
        d["images"][1]["height"] = 18

    ds = CocoDataset(_mutated(tmp_path, wrong_size), img, check_files=False)
    with pytest.raises(
        ValueError, match=r"broken\.json: image id 2: image .*gray\.png is 16 x 16 .*not the expected 18 x 16"
    ):
        ds[1]

    (img / "gray.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot decode image .*gray\.png"):
        ds[1]


def test_images_past_pils_decompression_bomb_warning_are_refused(tmp_path, monkeypatch):
    """PIL decodes a file of more than ``Image.MAX_IMAGE_PIXELS`` pixels with a warning only, up to twice that:
    read_image refuses it before decoding, naming it, and the COCO loader refuses its record. The limit is
    lowered here so that a 20 x 30 image lies between the two."""
    _write_small_coco(tmp_path)
    path = tmp_path / "img" / "a.png"  # 20 x 30 = 600 pixels, image 1's file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not warned about
        with pytest.raises(ValueError, match=r"cannot decode image .*a\.png: Image size \(600 pixels\) exceeds limit"):
            read_image(path)
        with pytest.raises(ValueError, match=r"ann\.json: image 1: 20 x 30 = 600 pixels is more than 400"):
            CocoDataset(tmp_path / "ann.json", tmp_path / "img")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # the limit is PIL's, and users may change it
    assert read_image(path).shape == (3, 20, 30)


def test_coco_evaluate_ground_truth_scores_one():
    ds = _shapes("val", 12)
    gt = coco_ground_truth(ds)
    targets = [ds[i][1] for i in range(len(ds))]
    results = to_coco_results(_gt_predictions(targets), [t["image_id"] for t in targets], ds.label_to_cat)
    metrics = coco_evaluate(gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 1.0
        assert metrics[iou_type]["AP50"] == 1.0 and metrics[iou_type]["AP75"] == 1.0
    # Restricted to a subset of images, through a Subset's ground truth.
    subset = Subset(ds, [0, 1, 2])
    sub = coco_evaluate(
        coco_ground_truth(subset), results[: sum(len(t["labels"]) for t in targets[:3])], ("segm",), [0, 1, 2]
    )
    assert sub["segm"]["AP"] == 1.0


def test_coco_evaluate_through_loader_with_crowd(tmp_path):
    """Ground truth read back by CocoDataset, predicted as is, scores 1 against the file's COCO
    index even with crowd regions in it (crowds are ignored, not missed)."""
    ds = _shapes("val", 8)
    data = to_coco(ds, tmp_path / "img")
    data["annotations"].append(
        {
            "id": len(data["annotations"]) + 1,
            "image_id": 0,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
            "area": 100.0,
            "iscrowd": 1,
        }
    )
    (tmp_path / "ann.json").write_text(json.dumps(data))
    coco_ds = CocoDataset(tmp_path / "ann.json", tmp_path / "img")
    targets = [coco_ds[i][1] for i in range(len(coco_ds))]
    results = to_coco_results(_gt_predictions(targets), coco_ds.ids, coco_ds.label_to_cat)
    metrics = coco_evaluate(coco_ground_truth(coco_ds), results)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0


def test_coco_evaluate_degenerate_polygons(tmp_path, caplog):
    """Polygon parts of fewer than 3 points, and no polygon at all: pycocotools read a 2-point first part as a
    box (or failed with a TypeError) and an empty list with an IndexError. The ground truth COCOeval reads
    holds the masks the targets hold instead, and a warning names the annotations."""
    square = [2, 1, 12, 1, 12, 9, 2, 9]
    segmentations = {42: [square], 43: [[4, 4, 10, 6]], 44: [], 45: [[20, 10, 28, 18], square], 46: [square, [0, 0]]}
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 30}],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [{"id": i, "image_id": 7, "category_id": 3, "bbox": [2, 1, 10, 8], "segmentation": s}
                        for i, s in segmentations.items()],
    }  # fmt: skip
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "img" / "a.png")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path / "img")
    assert "ann.json: 4 annotation(s) with polygon parts of fewer than 3 points" in caplog.text
    assert "(annotation ids 43, 44, 45, 46)" in caplog.text

    _, target = ds[0]
    gt_masks = np.stack([ds.coco.annToMask(ds.coco.anns[i]) for i in segmentations])
    assert np.array_equal(target["masks"].numpy(), gt_masks)
    assert gt_masks.reshape(5, -1).sum(1).tolist() == [80, 0, 0, 80, 80]
    results = to_coco_results(_gt_predictions([target]), ds.ids, ds.label_to_cat)
    metrics = coco_evaluate(coco_ground_truth(ds), results)
    assert metrics["bbox"]["AP"] == 1.0
    # The two empty masks cannot be matched (pycocotools' IoU of empty masks is 0): 3 of 5 found, in order.
    assert metrics["segm"]["AR100"] == pytest.approx(0.6)


def test_coco_evaluate_empty_predictions(capsys):
    ds = _shapes("val", 4)
    gt = coco_ground_truth(ds)
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, *ds[i][0].shape[-2:]),
        }
        for i in range(4)
    ]
    results = to_coco_results(empty, list(range(4)), ds.label_to_cat)
    assert results == []
    metrics = coco_evaluate(gt, results)
    for iou_type in ("bbox", "segm"):
        # COCOeval: categories with ground truth and no detections give precision 0.
        assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AR100"] == 0.0
        assert all(v in (0.0, -1.0) for v in metrics[iou_type].values())
    # pycocotools' printing is captured.
    assert capsys.readouterr().out == ""


def test_coco_evaluate_wrong_predictions_score_zero():
    ds = _shapes("val", 4)
    targets = [ds[i][1] for i in range(4)]
    preds = _gt_predictions(targets)
    for p in preds:
        p["boxes"] = p["boxes"] + 500.0  # nowhere near anything
        p["masks"] = 1.0 - p["masks"]
    results = to_coco_results(preds, list(range(4)), ds.label_to_cat)
    metrics = coco_evaluate(coco_ground_truth(ds), results, ("bbox",))
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == 0.0
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(coco_ground_truth(ds), results, ("keypoints",))


def test_to_coco_results_format():
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[0, 0, 4, 0] = 0.5  # not above the threshold
    masks[1, 0, 5, 7] = 0.51
    pred = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.0, 5.0, 8.0, 6.0]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.9, 0.25]),
        "masks": masks,
    }
    results = to_coco_results([pred], [42], {1: 3, 2: 7})
    assert json.loads(json.dumps(results)) == results
    assert [r["image_id"] for r in results] == [42, 42]
    assert [r["category_id"] for r in results] == [7, 3]
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and results[1]["bbox"] == [7.0, 5.0, 1.0, 1.0]
    assert results[0]["score"] == pytest.approx(0.9) and results[1]["score"] == pytest.approx(0.25)
    decoded = [mask_utils.decode(r["segmentation"]) for r in results]
    assert np.array_equal(decoded[0], (masks[0, 0] > 0.5).numpy().astype(np.uint8))
    assert decoded[0].sum() == 6 and decoded[1].sum() == 1
    # Masks as [D, h, w] and predictions without masks.
    flat = to_coco_results([{**pred, "masks": masks[:, 0]}], [42], {1: 3, 2: 7})
    assert flat == results
    no_masks = to_coco_results([{k: v for k, v in pred.items() if k != "masks"}], [42], {1: 3, 2: 7})
    assert all("segmentation" not in r for r in no_masks)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        coco_evaluate(coco_ground_truth(_shapes("val", 1)), no_masks, ("segm",))
    with pytest.raises(ValueError, match=r"labels \[2\] have no category"):
        to_coco_results([pred], [42], {1: 3})
    with pytest.raises(ValueError, match="1 predictions but 2 image ids"):
        to_coco_results([pred], [42, 43], {1: 3, 2: 7})


# ----------------------------------------------------------------------------------------------
# collate, build_dataset
# ----------------------------------------------------------------------------------------------


def test_collate_list_with_dataloader():
    ds = _shapes(n=5)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_list))
    assert [len(images) for images, _ in batches] == [2, 2, 1]
    images, targets = batches[1]
    assert isinstance(images, list) and isinstance(targets, list)
    _assert_items_equal((images[0], targets[0]), ds[2])


def test_build_dataset(tmp_path):
    shapes = build_dataset("shapes", "val", num_images=3, image_size=64)
    assert isinstance(shapes, ShapesDataset) and shapes.split == "val" and len(shapes) == 3

    _write_small_coco(tmp_path)
    os.makedirs(tmp_path / "annotations")
    os.rename(tmp_path / "ann.json", tmp_path / "annotations" / "instances_val2017.json")
    os.rename(tmp_path / "img", tmp_path / "val2017")
    val = build_dataset("coco", "val", root=tmp_path)
    assert isinstance(val, CocoDataset) and val.ids == [1, 2, 5]
    # Training skips images without usable annotations by default, as torchvision's references do.
    os.symlink(
        tmp_path / "annotations" / "instances_val2017.json", tmp_path / "annotations" / "instances_train2017.json"
    )
    os.symlink(tmp_path / "val2017", tmp_path / "train2017")
    assert build_dataset("coco", "train", root=tmp_path).ids == [1]
    explicit = build_dataset(
        "coco", "val", ann_file=tmp_path / "annotations" / "instances_val2017.json", image_dir=tmp_path / "val2017"
    )
    assert explicit.ids == [1, 2, 5]
    with pytest.raises(ValueError, match="root="):
        build_dataset("coco", "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("voc", "val")
