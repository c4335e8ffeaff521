"""Predict CLI and drawing: PNGs with masks, boxes and labels over images of any size; COCO results JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn import predict, train
from mrcnn.data import ShapesDataset
from mrcnn.visualize import draw_detections, label_font_size, label_layout, palette

pytestmark = pytest.mark.usefixtures("one_thread")


def _prediction(h: int, w: int) -> dict[str, torch.Tensor]:
    """Two detections: a 0.9 one with a mask rectangle inside its box, a 0.2 one elsewhere."""
    masks = torch.zeros(2, 1, h, w)
    masks[0, 0, 10:30, 12:40] = 0.8
    masks[1, 0, 40:50, 5:15] = 0.9
    return {
        "boxes": torch.tensor([[8.0, 6.0, 44.0, 34.0], [3.0, 38.0, 17.0, 52.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.2]),
        "masks": masks,
    }


def test_draw_detections_changes_pixels_only_where_drawn() -> None:
    h, w = 60, 70
    image = torch.full((3, h, w), 0.5)
    drawn = draw_detections(image, _prediction(h, w), ["background", "circle", "square"], score_threshold=0.5)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, h, w)
    base = torch.full((3, h, w), 128, dtype=torch.uint8)
    changed = (drawn != base).any(0)
    # Inside the mask (away from the box outline and the label at its top-left corner) every pixel changed.
    assert changed[20:30, 20:38].all()
    # Below the box and right of it (under the label's row): untouched; the 0.2 detection is not drawn.
    assert not changed[36:].any() and not changed[20:, 46:].any() and not changed[:, :7].any()
    # The mask is filled with the class colour blended at alpha 0.5.
    colour = torch.tensor(palette(2)[1], dtype=torch.float32)
    expected = (0.5 * 128 + 0.5 * colour).round()
    assert torch.allclose(drawn[:, 25, 30].float(), expected, atol=1)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_label_layout_never_overlaps_and_stays_inside() -> None:
    """Twelve labels on nine near-identical boxes and three at the image's corners and edge: each inside the
    image, none over another, the first (best-scoring) one just above its box."""
    gen = torch.Generator().manual_seed(0)
    boxes = (torch.tensor([[100.0, 80.0, 300.0, 260.0]]) + torch.randn(9, 4, generator=gen) * 3).tolist()
    boxes += [[0.0, 0.0, 40.0, 30.0], [600.0, 2.0, 640.0, 40.0], [10.0, 470.0, 50.0, 480.0]]
    sizes = [(90, 18)] * len(boxes)
    layout = label_layout(boxes, sizes, 480, 640)
    assert all(rect is not None for rect in layout)
    assert layout[0] == (int(boxes[0][0]), int(boxes[0][1]) - 18, int(boxes[0][0]) + 90, int(boxes[0][1]))
    for i, a in enumerate(layout):
        assert min(a[0], a[1]) >= 0 and a[2] <= 640 and a[3] <= 480, a
        assert (a[2] - a[0], a[3] - a[1]) == (90, 18)
        assert not any(_overlap(a, b) for b in layout[i + 1 :]), (a, layout)
    # No free place (a 20 px image with room for one label): left out rather than drawn over another.
    assert label_layout([[0.0, 0.0, 10.0, 10.0]] * 2, [(30, 18)] * 2, 20, 40) == [(0, 0, 30, 18), None]
    assert label_layout([[0.0, 0.0, 10.0, 10.0]], [(50, 18)], 20, 40) == [None]  # wider than the image


def test_labels_grow_with_the_image() -> None:
    assert label_font_size(64, 64) == 11 and label_font_size(800, 1333) == 33 and label_font_size(4000, 6000) == 48
    h, w = 400, 600
    pred = {"boxes": torch.tensor([[50.0, 60.0, 250.0, 260.0]] * 2), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.8]), "masks": torch.zeros(2, 1, h, w)}  # fmt: skip
    drawn = draw_detections(torch.full((3, h, w), 0.5), pred, ["background", "circle", "square"])
    changed = (drawn != 128).any(0)
    # Two labels for one box: the first above it (rows 60 - 15 - 4 .. 60), the second inside its top.
    rows = changed[:, 60:200].any(1).nonzero().flatten()
    assert rows.min() < 50 and rows.max() >= 60 + 15
    assert not changed[:30].any() and not changed[265:].any()


def test_draw_detections_without_detections_is_the_image() -> None:
    image = torch.rand(3, 33, 47)
    pred = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 33, 47)}  # fmt: skip
    assert torch.equal(draw_detections(image, pred), (image * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match="image must be"):
        draw_detections(torch.rand(33, 47), pred)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 1-step tiny model whose every candidate is a detection (box_score_thresh 0), so there is something
    to draw."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    train.main([
        "--backend", "torch", "--image-size", "64", "--train-size", "8", "--batch-size", "2", "--iters", "1",
        "--workers", "0", "--no-progress", "--no-eval", "--set", "fpn_channels=32", "--set", "representation_size=64",
        "--set", "rpn_pre_nms_top_n_train=100", "--set", "rpn_post_nms_top_n_train=50",
        "--set", "rpn_pre_nms_top_n_test=100", "--set", "rpn_post_nms_top_n_test=50",
        "--set", "box_batch_size_per_image=32", "--set", "detections_per_img=5", "--set", "box_score_thresh=0.0",
        "--out", str(out),
    ])  # fmt: skip
    return out / "checkpoint.pt"


def test_predict_cli_draws_masks_on_images_of_any_size(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    shapes = ShapesDataset("val", 2, image_size=((50, 90), (40, 120)), seed=3)
    paths = []
    for i in range(2):
        image, _, _ = shapes.generate(i)
        pil = Image.fromarray(image)
        paths.append(tmp_path / f"in{i}.png")
        (pil.convert("L") if i == 1 else pil).save(paths[-1])  # one grayscale file
    out = tmp_path / "out"
    results = predict.main([
        "--checkpoint", str(checkpoint), *map(str, paths), "--out", str(out), "--score-threshold", "0.0",
        "--mask-threshold", "0.0", "--backend", "torch", "--batch-size", "2",
    ])  # fmt: skip
    written = json.loads((out / "results.json").read_text())
    assert written == results and results
    # The cold start, from the process's start (this one: pytest's) to the first batch's detections.
    first_s = re.search(r"; first detections (\d+\.\d) s after the process started$", capsys.readouterr().out, re.M)
    assert first_s and float(first_s[1]) > 0
    records = json.loads((out / "images.json").read_text())
    assert [r["file_name"] for r in records] == list(map(str, paths))
    for i, path in enumerate(paths):
        source = np.asarray(Image.open(path).convert("RGB"))
        drawn = np.asarray(Image.open(out / f"in{i}.png"))
        assert drawn.shape == source.shape  # the input's own size
        mine = [r for r in results if r["image_id"] == i]
        assert mine and all(r["segmentation"]["size"] == list(source.shape[:2]) for r in mine)
        # Every mask pixel is blended with a class colour: the PNG changed there, and nowhere left of the
        # boxes (labels run to the right of a box's top-left corner).
        union = np.zeros(source.shape[:2], dtype=bool)
        for r in mine:
            union |= mask_utils.decode(r["segmentation"]).astype(bool)
        assert union.any()
        changed = (drawn != source).any(-1)
        assert changed[union].mean() > 0.95
        x1 = min(r["bbox"][0] for r in mine)
        assert not changed[:, : max(0, int(x1) - 2)].any()


def test_predict_cli_score_threshold_filters_drawing(checkpoint: Path, tmp_path: Path) -> None:
    image, _, _ = ShapesDataset("val", 1, image_size=64).generate(0)
    Image.fromarray(image).save(tmp_path / "a.png")
    predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                  "--score-threshold", "1.01", "--backend", "torch"])  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "a.png")), image)
    # The results JSON holds every detection, whatever the drawing threshold.
    assert json.loads((tmp_path / "o" / "results.json").read_text())


def test_output_names_are_distinct() -> None:
    paths = ["a/x.png", "b/x.png", "x_1.png", "c/X.jpg", "y.png"]
    assert predict.output_names(paths) == ["x.png", "x_1.png", "x_1_1.png", "X_2.png", "y.png"]


def test_predict_cli_gives_same_named_inputs_their_own_pictures(checkpoint: Path, tmp_path: Path) -> None:
    """a/x.png, b/x.png and x_1.png: three pictures, each of its own input (nothing drawn at threshold 1.01)."""
    shapes = ShapesDataset("val", 3, image_size=32, seed=5)
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x_1.png"]
    for i, path in enumerate(paths):
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(shapes.generate(i)[0]).save(path)
    out = tmp_path / "out"
    predict.main(["--checkpoint", str(checkpoint), *map(str, paths), "--out", str(out), "--score-threshold", "1.01",
                  "--backend", "torch", "--batch-size", "2"])  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["x.png", "x_1.png", "x_1_1.png"]
    for path, name in zip(paths, ("x.png", "x_1.png", "x_1_1.png"), strict=True):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(path))), name
