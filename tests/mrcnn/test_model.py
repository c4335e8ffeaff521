"""The static-shape model: collate, zero graph breaks, compile, parity with torchvision, AMP, bad input.

The model tests run the ops' torch path (``use_backend("torch")``): the kernels themselves are tested
in tests/kernels under the interpreter, and a whole model through the interpreter would take minutes.
One small training step does run every Triton kernel through the interpreter.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision
from torch import Tensor
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import box_iou

import kernels
import mrcnn

TINY = dict(
    num_classes=5, backbone="resnet18", min_size=64, max_size=96, max_gt_objects=4,
    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, detections_per_img=10, box_candidates_per_img=50,
)  # fmt: skip


def _scene(h: int, w: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """An image of ``n`` filled rectangles and ellipses on a noisy gradient, with its targets."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = (0.3 + 0.4 * (xx / w))[None].repeat(3, 1, 1) + 0.05 * torch.randn(3, h, w, generator=gen)
    boxes, masks, labels = [], [], []
    for _ in range(n):
        bw, bh = (
            int(torch.randint(w // 5, w // 2, (1,), generator=gen)),
            int(torch.randint(h // 5, h // 2, (1,), generator=gen)),
        )
        x0, y0 = int(torch.randint(0, w - bw, (1,), generator=gen)), int(torch.randint(0, h - bh, (1,), generator=gen))
        label = int(torch.randint(1, 3, (1,), generator=gen))
        if label == 1:
            m = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        else:
            cy, cx = y0 + bh / 2, x0 + bw / 2
            m = ((yy + 0.5 - cy) / (bh / 2)) ** 2 + ((xx + 0.5 - cx) / (bw / 2)) ** 2 <= 1
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        image[:, m] = torch.rand(3, 1, generator=gen)
        masks.append(m.to(torch.uint8))
        labels.append(label)
    target = {
        "boxes": torch.tensor(boxes).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
    }
    return image.clamp(0, 1), target


def _batch(sizes: list[tuple[int, int]], n: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    scenes = [_scene(h, w, n, gen) for h, w in sizes]
    return [s[0] for s in scenes], [s[1] for s in scenes]


@pytest.fixture(autouse=True)
def _torch_path():
    with kernels.use_backend("torch"):
        yield


# ----------------------------------------------------------------------------------------------
# collate and bad input
# ----------------------------------------------------------------------------------------------


def test_collate_shapes_and_resize() -> None:
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    images, targets = _batch([(60, 80), (50, 75)])
    x, sizes, t = mrcnn.collate(images, targets, cfg)
    assert x.shape == (2, 3, 64, 96) and x.shape[-1] % 32 == 0
    # scale = min(64 / 60, 96 / 80) = 1.0667 -> (64, 85); min(64 / 50, 96 / 75) = 1.28 -> (64, 96)
    assert sizes.tolist() == [[64, 85], [64, 96]]
    assert t.boxes.shape == (2, 4, 4) and t.masks.shape == (2, 4, 64, 96) and t.masks.dtype == torch.uint8
    assert t.valid.tolist() == [[True, True, False, False]] * 2
    torch.testing.assert_close(t.boxes[0, :2], targets[0]["boxes"] * torch.tensor([85 / 80, 64 / 60] * 2))
    assert (x[0, :, :, 85:] == 0).all()  # padding after normalisation, as torchvision
    # against torchvision's transform
    tv = torchvision.models.detection.transform.GeneralizedRCNNTransform(64, 96, cfg.image_mean, cfg.image_std).eval()
    image_list, _ = tv([im.clone() for im in images])
    torch.testing.assert_close(x, image_list.tensors)
    assert [tuple(s) for s in sizes.tolist()] == image_list.image_sizes


@pytest.mark.parametrize(
    ("images", "targets", "error", "match"),
    [
        ([torch.rand(1, 3, 10, 10)], None, ValueError, r"images\[0\] must have shape \[3, h, w\]"),
        ([torch.rand(4, 10, 10)], None, ValueError, r"images\[0\] must have shape"),
        ([torch.randint(0, 5, (3, 10, 10))], None, TypeError, r"images\[0\] must be float"),
        ([], None, ValueError, "non-empty list"),
        (
            [torch.rand(3, 20, 20)],
            [{"boxes": torch.tensor([[5.0, 5, 5, 9]]), "labels": torch.tensor([1]), "masks": torch.zeros(1, 20, 20)}],
            ValueError,
            r"targets\[0\]\['boxes'\]\[0\].*no positive width",
        ),
        (
            [torch.rand(3, 20, 20)],
            [{"boxes": torch.tensor([[1.0, 1, 5, 5]] * 5), "labels": torch.ones(5), "masks": torch.zeros(5, 20, 20)}],
            ValueError,
            "max_gt_objects",
        ),
    ],
)
def test_collate_rejects_bad_input(images, targets, error, match) -> None:
    with pytest.raises(error, match=match):
        mrcnn.collate(images, targets, mrcnn.MaskRCNNConfig(**TINY))


def _good_targets() -> tuple[list[torch.Tensor], list[dict]]:
    """Two 20x20 images with two valid objects each (labels 1 and 4 of TINY's 5 classes)."""
    masks = torch.zeros(2, 20, 20, dtype=torch.uint8)
    masks[0, 2:8, 2:8] = masks[1, 10:18, 5:15] = 1
    target = {"boxes": torch.tensor([[2.0, 2, 8, 8], [5, 10, 15, 18]]), "labels": torch.tensor([1, 4]), "masks": masks}
    return [torch.rand(3, 20, 20), torch.rand(3, 20, 20)], [target, {k: v.clone() for k, v in target.items()}]


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("boxes", torch.tensor([[2.0, 2, 8, 8], [5, 10, float("nan"), 18]]), ValueError,
         r"targets\[1\]\['boxes'\]\[1\] = .* is not finite"),
        ("boxes", torch.tensor([[2.0, 2, float("inf"), 8], [5, 10, 15, 18]]), ValueError,
         r"targets\[1\]\['boxes'\]\[0\] = .* is not finite"),
        ("boxes", torch.ones(2, 5), ValueError, r"targets\[1\]\['boxes'\] must have shape \[n, 4\]"),
        ("labels", torch.tensor([1, 5]), ValueError, r"targets\[1\]\['labels'\]\[1\] = 5 is outside \[1, 5\)"),
        ("labels", torch.tensor([0, 1]), ValueError, r"targets\[1\]\['labels'\]\[0\] = 0 is outside \[1, 5\)"),
        ("labels", torch.tensor([1.0, 2.5]), TypeError, r"targets\[1\]\['labels'\] must be integers"),
        ("labels", torch.tensor([1]), ValueError, r"targets\[1\]\['labels'\] must have shape \[2\]"),
        ("masks", torch.zeros(1, 20, 20), ValueError, r"targets\[1\]\['masks'\] must have shape \[2, 20, 20\]"),
        ("masks", torch.zeros(2, 20, 19), ValueError, r"targets\[1\]\['masks'\] must have shape \[2, 20, 20\]"),
        ("masks", torch.full((2, 20, 20), 255, dtype=torch.uint8), ValueError,
         r"targets\[1\]\['masks'\]\[0\] has values other than 0 and 1 \(max 255\).*masks > 0"),
        ("masks", None, ValueError, r"targets\[1\] has 2 boxes but no 'masks'"),
    ],
)  # fmt: skip
def test_collate_rejects_bad_targets_naming_image_and_field(field, value, error, match) -> None:
    """Bad ground truth in the second image: an error naming it and the field, never a silent zero-padding,
    a dropped label, or a NaN / negative loss later."""
    images, targets = _good_targets()
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    mrcnn.collate(images, targets, cfg)  # the unmodified batch passes
    if value is None:
        del targets[1][field]
    else:
        targets[1][field] = value
    with pytest.raises(error, match=match):
        mrcnn.collate(images, targets, cfg)


def test_collate_accepts_bool_masks_and_images_without_objects() -> None:
    images, targets = _good_targets()
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    _, _, reference = mrcnn.collate(images, targets, cfg)
    targets[0]["masks"] = targets[0]["masks"].bool()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # no 'masks'
    _, _, t = mrcnn.collate(images, targets, cfg)
    assert t.valid.sum(1).tolist() == [2, 0] and t.labels[0, :2].tolist() == [1, 4]
    assert torch.equal(t.masks[0], reference.masks[0]) and t.masks[0].any() and not t.masks[1].any()


def test_config_checks_every_field() -> None:
    """Wrong types and ranges fail on construction (and in dataclasses.replace), naming the field; lists become
    tuples and integers of float fields floats (as a checkpoint's JSON-like config holds them)."""
    cfg = mrcnn.MaskRCNNConfig(image_mean=[0, 0.5, 1], rpn_min_size=0, anchor_sizes=[8, 16, 32, 64, 128])
    assert cfg.image_mean == (0.0, 0.5, 1.0) and cfg.anchor_sizes == (8, 16, 32, 64, 128)
    assert isinstance(cfg.rpn_min_size, float)
    bad = [
        (dict(fpn_channels="wide"), TypeError, r"MaskRCNNConfig.fpn_channels must be an integer, got 'wide'"),
        (dict(min_size=0), ValueError, r"MaskRCNNConfig.min_size must be >= 1, got 0"),
        (dict(num_classes=True), TypeError, r"MaskRCNNConfig.num_classes must be an integer"),
        (dict(box_score_thresh=float("nan")), TypeError, r"box_score_thresh must be a finite number"),
        (dict(image_std=(1.0, 0.0, 1.0)), ValueError, r"MaskRCNNConfig.image_std must be > 0"),
        (dict(bbox_reg_weights=(1.0, 1.0)), TypeError, r"bbox_reg_weights must be a tuple of 4 floats"),
        (dict(backbone="vgg16"), ValueError, r"MaskRCNNConfig.backbone must be a torchvision ResNet"),
        (dict(trainable_backbone_layers=6), ValueError, r"trainable_backbone_layers must be in \[0, 5\]"),
        (dict(rpn_bg_iou_thresh=0.8), ValueError, r"rpn_bg_iou_thresh = 0.8 must be <= rpn_fg_iou_thresh = 0.7"),
        (dict(mask_size=14), ValueError, r"mask_size = 14 must be 2 \* mask_roi_size = 28"),
        (dict(channels_last=True), TypeError, r"MaskRCNNConfig.channels_last must be a string"),
        (dict(channels_last="yes"), ValueError, r"channels_last must be 'auto', 'on' or 'off', got 'yes'"),
    ]  # fmt: skip
    for fields, error, match in bad:
        with pytest.raises(error, match=match):
            mrcnn.MaskRCNNConfig(**fields)
        with pytest.raises(error, match=match):
            dataclasses.replace(cfg, **fields)


def test_forward_rejects_uncollated_images() -> None:
    model = mrcnn.MaskRCNN(mrcnn.MaskRCNNConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="mrcnn.collate"):
        model(torch.rand(3, 64, 64), torch.tensor([[64, 64]]))


def test_image_without_objects_trains_on_background_only() -> None:
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    model = mrcnn.MaskRCNN(cfg).train()
    images, targets = _batch([(60, 80)], n=0)
    losses = model(*mrcnn.collate(images, targets, cfg))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_rpn_box_reg"] == 0
    assert losses["loss_classifier"] > 0 and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# static shapes: graph breaks and compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_graph_breaks(training: bool) -> None:
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    model = mrcnn.MaskRCNN(cfg).train(training)
    images, targets = _batch([(60, 80), (50, 75)])
    x, sizes, t = mrcnn.collate(images, targets, cfg)
    args = (x, sizes, t) if training else (x, sizes)
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("channels_last", ["off", "on"])
def test_compiled_training_step_and_inference(channels_last: str) -> None:
    """``torch.compile(model, fullgraph=True)`` runs forward, backward and an optimizer step, then
    inference, and matches eager, with NCHW and channels-last backbone and FPN. CI uses the ``aot_eager``
    backend (the whole graph through dynamo and AOTAutograd, minus inductor's C++ codegen, which takes minutes
    on 2 cores); the README gives the inductor command we ran by hand."""
    cfg = mrcnn.MaskRCNNConfig(**TINY, channels_last=channels_last)
    torch.manual_seed(0)
    model = mrcnn.MaskRCNN(cfg)
    images, targets = _batch([(60, 80), (50, 75)])
    x, sizes, t = mrcnn.collate(images, targets, cfg)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    losses = compiled(x, sizes, t)
    torch.manual_seed(1)
    eager = model(x, sizes, t)
    for name in losses:
        torch.testing.assert_close(losses[name], eager[name], rtol=1e-4, atol=1e-4, msg=name)
    sum(losses.values()).backward()
    optimizer.step()
    model.eval()
    det, ref = compiled(x, sizes), model(x, sizes)
    assert det.boxes.shape == (2, cfg.detections_per_img, 4)
    torch.testing.assert_close(det.boxes, ref.boxes, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# parity with torchvision at equal weights
# ----------------------------------------------------------------------------------------------


def _perturb_heads(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial head weights: confident, varied classes and boxes instead of an init's near-uniform ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("roi_heads.box_predictor", "rpn.head.cls_logits", "roi_heads.mask_predictor")):
                p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3) * 3)


def _tv_v2_resnet18(num_classes: int, **kwargs) -> TVMaskRCNN:
    """torchvision's v2 architecture (maskrcnn_resnet50_fpn_v2's heads) on a ResNet-18 body, for speed."""
    backbone = _resnet_fpn_extractor(torchvision.models.resnet18(), 5, norm_layer=torch.nn.BatchNorm2d)
    return TVMaskRCNN(
        backbone, num_classes=num_classes,
        rpn_head=RPNHead(256, 3, conv_depth=2),
        box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=torch.nn.BatchNorm2d),
        mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=torch.nn.BatchNorm2d), **kwargs,
    )  # fmt: skip


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a[:, 0] > 0.5, b[:, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _matched(ref: dict[str, Tensor], out: dict[str, Tensor], tie: float) -> tuple[Tensor, Tensor]:
    """``(ref_index, out_index)`` of the detections both lists hold: ``out``'s detection of the same label with the
    largest box IoU for each of ``ref``'s. Every reference detection must be matched except those scoring within
    ``tie`` of the lowest kept score, which a near-tie may push out of the top-D (or reorder: pairs are matched, not
    compared by position)."""
    same_label = ref["labels"][:, None] == out["labels"][None, :]
    iou = torch.where(same_label, box_iou(ref["boxes"], out["boxes"]), 0.0)
    best_iou, best = iou.max(1)
    cut = min(float(ref["scores"].min()), float(out["scores"].min()))
    must = ref["scores"] > cut + tie
    assert (best_iou[must] > 0.98).all(), best_iou[must].min()
    keep = best_iou > 0.98
    return torch.nonzero(keep)[:, 0], best[keep]


@pytest.mark.parametrize("head, channels_last", [("v1", "off"), ("v2", "off"), ("v1", "on")])
def test_inference_parity_with_torchvision(head: str, channels_last: str) -> None:
    """Same detections as torchvision's model at equal weights, on images of several sizes; also with our
    backbone and FPN channels-last (torchvision's NCHW).

    NCHW computes what torchvision computes, so the lists agree position by position. Channels-last convolutions
    sum in another order (~1e-5 relative in the scores, seen up to 1e-4 px in the boxes), enough to reorder
    near-tied detections or swap the last ones in or out of the top 100: there detections are matched by label and
    box IoU, and only those scoring 2e-3 above the lowest kept score must be present."""
    gen = torch.Generator().manual_seed(3)
    sizes = dict(min_size=128, max_size=192, box_score_thresh=0.05)
    if head == "v1":
        torch.manual_seed(0)
        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, **sizes)
    else:
        torch.manual_seed(0)
        tv = _tv_v2_resnet18(4, **sizes)
    _perturb_heads(tv, gen)
    tv.eval()
    ours = mrcnn.from_torchvision(tv)
    ours.config.channels_last = channels_last
    assert ours.config.head == head and not ours.training
    images, _ = _batch([(120, 160), (100, 150), (140, 110)], n=3, seed=5)
    with torch.no_grad():
        ref = tv(images)
    out = ours.predict(images)
    checked = 0
    for r, o in zip(ref, out, strict=True):
        assert len(r["boxes"]) == len(o["boxes"]) and len(r["boxes"]) > 0
        if channels_last == "off":
            assert torch.equal(r["labels"], o["labels"])
            i = j = torch.arange(len(r["boxes"]))
            assert (box_iou(r["boxes"], o["boxes"]).diagonal() > 0.98).all()
        else:
            i, j = _matched(r, o, tie=2e-3)
        torch.testing.assert_close(o["scores"][j], r["scores"][i], rtol=0, atol=2e-3)
        assert o["masks"].shape == r["masks"].shape
        ious = _mask_iou(r["masks"][i], o["masks"][j])
        assert (ious > 0.95).float().mean() >= 0.95
        checked += len(ious)
    assert checked >= 10


@pytest.mark.parametrize("channels_last", ["off", "on"])
def test_training_losses_match_torchvision(channels_last: str) -> None:
    """Same five losses as torchvision for the same proposals and targets (ours NCHW or channels-last).

    Both samplers draw at random; with room for every candidate (batch sizes above the counts,
    positive fraction 1) both take all of them, so the losses are comparable exactly.
    """
    torch.manual_seed(0)
    kw = dict(
        min_size=96, max_size=128, rpn_batch_size_per_image=100_000, rpn_positive_fraction=1.0,
        box_batch_size_per_image=512, box_positive_fraction=1.0, rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
    )  # fmt: skip
    tv = _tv_v2_resnet18(4, **kw)
    _perturb_heads(tv, torch.Generator().manual_seed(1))
    tv.train()
    ours = mrcnn.from_torchvision(tv)
    ours.config.max_gt_objects = 4
    ours.config.channels_last = channels_last
    assert ours.config.box_batch_size_per_image == 512 and ours.training
    images, targets = _batch([(90, 120), (80, 110)], n=3, seed=2)
    # BatchNorm in train mode would update running stats twice; run both with frozen statistics.
    for m in (*tv.modules(), *ours.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    ref = tv([im.clone() for im in images], [{k: v.clone() for k, v in t.items()} for t in targets])
    losses = ours(*ours.collate(images, targets))
    assert set(losses) == set(ref)
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name], rtol=2e-4, atol=2e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# mixed precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step(dtype: torch.dtype) -> None:
    """An autocast step runs and its losses are within a half-precision tolerance of fp32 (7e-2 relative:
    activations rounded to 8 (bf16) or 11 (fp16) bits through ~20 layers)."""
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    torch.manual_seed(0)
    model = mrcnn.MaskRCNN(cfg)
    images, targets = _batch([(60, 80)], n=2)
    batch = mrcnn.collate(images, targets, cfg)
    torch.manual_seed(1)
    ref = model(*batch)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        losses = model(*batch)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    scaler.scale(sum(losses.values())).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler.step(optimizer)
    scaler.update()
    for name in ref:
        assert torch.isfinite(losses[name]), name
        assert math.isclose(losses[name].item(), ref[name].item(), rel_tol=7e-2, abs_tol=2e-2), name


# ----------------------------------------------------------------------------------------------
# the Triton kernels inside the model (interpreter)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", ["off", "on"])
def test_training_step_through_triton_kernels(channels_last: str) -> None:
    """One small training step with every op on its Triton kernels (the interpreter on CPU), against the torch
    path; channels-last, RoIAlign reads the FPN's NHWC features in place."""
    cfg = mrcnn.MaskRCNNConfig(**{**TINY, "box_batch_size_per_image": 8, "rpn_post_nms_top_n_train": 16,
                                   "rpn_post_nms_top_n_test": 16, "detections_per_img": 4,
                                   "channels_last": channels_last})  # fmt: skip
    torch.manual_seed(0)
    model = mrcnn.MaskRCNN(cfg)
    images, targets = _batch([(60, 80)], n=1)
    batch = mrcnn.collate(images, targets, cfg)
    torch.manual_seed(1)
    ref = model(*batch)
    with kernels.use_backend("triton"):
        torch.manual_seed(1)
        losses = model(*batch)
        sum(losses.values()).backward()
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_cuda_compiled_modes(mode: str) -> None:
    """On CUDA: ``mode="max-autotune"`` and CUDA graphs (``reduce-overhead``) run a training step and
    inference of the full-graph model with the Triton kernels, and match eager."""
    cfg = mrcnn.MaskRCNNConfig(**TINY)
    torch.manual_seed(0)
    model = mrcnn.MaskRCNN(cfg).cuda()
    images, targets = _batch([(60, 80), (50, 75)])
    with kernels.use_backend("triton"):
        x, sizes, t = model.collate(images, targets)
        compiled = torch.compile(model, fullgraph=True, mode=mode)
        for _ in range(3):  # CUDA graphs record on a later call
            losses = compiled(x, sizes, t)
            sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        model.eval()
        for _ in range(3):
            det = compiled(x, sizes)
        ref = model(x, sizes)
        torch.testing.assert_close(det.boxes, ref.boxes, rtol=1e-3, atol=1e-2)
        assert torch.equal(det.valid, ref.valid)
