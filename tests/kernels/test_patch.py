"""``patch_torchvision()``: an unmodified torchvision Mask R-CNN on our ops gives the same detections and
losses, and everything is restored afterwards. On CPU the ops run their Triton kernels (interpreter)."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import maskrcnn_resnet50_fpn, roi_heads, transform
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers

import kernels
from kernels.patch import patch_torchvision

SMALL = dict(
    num_classes=4, min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=30, box_batch_size_per_image=16, box_detections_per_img=8,
)  # fmt: skip


_CODER_METHODS = ("encode", "encode_single", "decode", "decode_single")


def _entry_points() -> dict[str, object]:
    return {
        "ops.roi_align": torchvision.ops.roi_align,
        "ops.roi_align.roi_align": sys.modules["torchvision.ops.roi_align"].roi_align,
        "poolers.roi_align": poolers.roi_align,
        "poolers._multiscale_roi_align": poolers._multiscale_roi_align,
        "ops.nms": torchvision.ops.nms,
        "ops.batched_nms": torchvision.ops.batched_nms,
        "boxes.nms": box_ops.nms,
        "boxes.batched_nms": box_ops.batched_nms,
        **{f"BoxCoder.{m}": getattr(det_utils.BoxCoder, m) for m in _CODER_METHODS},
        "roi_heads.maskrcnn_loss": roi_heads.maskrcnn_loss,
        "roi_heads.paste_masks_in_image": roi_heads.paste_masks_in_image,
        "transform.paste_masks_in_image": transform.paste_masks_in_image,
    }


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0, **SMALL)
    with torch.no_grad():  # confident, varied heads instead of an init's near-uniform ones
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.startswith(("roi_heads.box_predictor", "rpn.head.cls_logits")):
                p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3) * 3)
    return model


def _scene(seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((90, 120), (80, 100)):
        images.append(torch.rand(3, h, w, generator=gen))
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 95.0, 50.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 20:60, 15:50] = 1
        masks[1, 8:45, 35:90] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    return images, targets


def test_inference_matches_unpatched() -> None:
    model = _model().eval()
    images, _ = _scene(0)
    with torch.no_grad():
        ref = model(images)
        with patch_torchvision():
            assert kernels.backend_for(images[0]) == "triton"
            out = model(images)
    for r, o in zip(ref, out, strict=True):
        assert len(r["boxes"]) == len(o["boxes"]) > 0
        assert torch.equal(r["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["masks"], r["masks"], rtol=1e-4, atol=1e-4)


def test_training_losses_and_gradients_match_unpatched() -> None:
    images, targets = _scene(1)
    grads = []
    losses = []
    for patched in (False, True):
        model = _model().train()
        torch.manual_seed(7)  # the samplers draw the same subsets: our ops consume no random numbers
        with patch_torchvision() if patched else contextlib.nullcontext():
            out = model([i.clone() for i in images], [{k: v.clone() for k, v in t.items()} for t in targets])
            sum(out.values()).backward()
        losses.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=1e-4, atol=1e-5, msg=name)
    checked = ("roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.box_head.fc6.weight",
               "backbone.fpn.inner_blocks.0.0.weight")  # fmt: skip
    for name in checked:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)


def test_context_manager_restores_everything() -> None:
    before = _entry_points()
    with patch_torchvision() as handle:
        during = _entry_points()
        assert all(during[k] is not before[k] for k in before), [k for k in before if during[k] is before[k]]
        assert torchvision.ops.roi_align is kernels.roi_align
        assert box_ops.batched_nms is kernels.batched_nms
    assert _entry_points() == before
    handle.restore()  # idempotent
    assert _entry_points() == before


def test_plain_call_nesting_and_flags() -> None:
    before = _entry_points()
    outer = patch_torchvision(roi_align=False, multiscale=False, nms=True, box_coder=False, mask_loss=False,
                              paste_masks=False)  # fmt: skip
    try:
        now = _entry_points()
        changed = {k for k in before if now[k] is not before[k]}
        assert changed == {"ops.nms", "ops.batched_nms", "boxes.nms", "boxes.batched_nms"}
        with patch_torchvision(nms=False):
            inner = _entry_points()
            assert inner["ops.nms"] is kernels.nms and inner["roi_heads.maskrcnn_loss"] is kernels.maskrcnn_loss
        assert _entry_points() == now
    finally:
        outer.restore()
    assert _entry_points() == before


def test_handles_restored_out_of_order() -> None:
    """Restoring the first of two live handles keeps the second's patches; restoring that one then puts back
    torchvision's own entry points (not the first handle's replacements)."""
    before = _entry_points()
    first = patch_torchvision()
    patched = _entry_points()
    second = patch_torchvision(roi_align=False, multiscale=False, box_coder=False, mask_loss=False, paste_masks=False)
    try:
        first.restore()
        now = _entry_points()
        assert {k for k in before if now[k] is not before[k]} == {"ops.nms", "ops.batched_nms", "boxes.nms",
                                                                   "boxes.batched_nms"}  # fmt: skip
        assert now["ops.nms"] is patched["ops.nms"] is kernels.nms
    finally:
        second.restore()
        first.restore()
    assert _entry_points() == before


@pytest.mark.cuda
def test_cuda_inference_and_training_match_unpatched() -> None:
    model = _model().cuda().eval()
    images, targets = _scene(2)
    images = [i.cuda() for i in images]
    with torch.no_grad():
        ref = model(images)
        with patch_torchvision():
            out = model(images)
    for r, o in zip(ref, out, strict=True):
        assert torch.equal(r["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-5, atol=1e-3)
    model.train()
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    torch.manual_seed(3)
    ref = model(images, targets)
    torch.manual_seed(3)
    with patch_torchvision():
        out = model(images, targets)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
