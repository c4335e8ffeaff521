"""Mask loss benchmarks: torchvision's ``maskrcnn_loss`` against ours, forward / backward / full.

Providers:
* ``torchvision``: ``torchvision.models.detection.roi_heads.maskrcnn_loss`` (float copy of every GT mask,
  roi_align, index, BCE; the backward goes through index and roi_align's graph).
* ``ours``: the drop-in ``kernels.maskrcnn_loss`` on the same per-image lists (includes the uint8 padding
  copy of the masks).
* ``ours_fused``: ``kernels.mask_loss`` on masks already padded to ``[B, G, H, W]``, as the model calls it.

CUDA: COCO shapes from DESIGN.md, 2 images at 800 x 1344, 256 positives x 80 classes x 28 x 28. CPU (the
torch path; TRITON_INTERPRET is not set here): 2 images at 200 x 336, 32 positives x 8 classes x 14 x 14.

Run: ``python -m pytest bench/test_mask_loss.py`` (``--benchmark-disable`` for a quick smoke run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

from bench import coco_shapes
from kernels.mask_loss import mask_loss, maskrcnn_loss

PROVIDERS = ("torchvision", "ours", "ours_fused")
MODES = ("forward", "backward", "full")

CUDA_SHAPES = dict(image_size=(800, 1344), num_gt=15, num_rois=256, num_classes=80, mask_size=28)
CPU_SHAPES = dict(image_size=(200, 336), num_gt=6, num_rois=32, num_classes=8, mask_size=14)


def make_inputs(device: str, image_size, num_gt: int, num_rois: int, num_classes: int, mask_size: int) -> dict:
    """Two images of blocky random masks (structure at 1/16 of the image) and positive proposals of 1/25 to
    1/2 of the image side, half of the RoIs each."""
    H, W = image_size
    gen = torch.Generator().manual_seed(0)
    proposals, gt_masks, gt_labels, idxs = [], [], [], []
    per_image = num_rois // 2
    for _ in range(2):
        blocks = torch.rand(num_gt, H // 16, W // 16, generator=gen) > 0.5
        gt_masks.append(blocks.repeat_interleave(16, 1).repeat_interleave(16, 2).to(torch.uint8).to(device))
        wh = (torch.rand(per_image, 2, generator=gen) * 0.46 + 0.04) * torch.tensor([W, H])
        xy = torch.rand(per_image, 2, generator=gen) * (torch.tensor([W, H]) - wh)
        proposals.append(torch.cat([xy, xy + wh], 1).to(device))
        gt_labels.append(torch.randint(1, num_classes, (num_gt,), generator=gen).to(device))
        idxs.append(torch.randint(0, num_gt, (per_image,), generator=gen).to(device))
    logits = torch.randn(num_rois, num_classes, mask_size, mask_size, generator=gen).to(device)
    return dict(logits=logits, proposals=proposals, gt_masks=gt_masks, gt_labels=gt_labels, idxs=idxs)


def _fused(inputs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``kernels.mask_loss`` on pre-batched inputs (what the model holds: padded masks, flat RoI slots)."""
    masks = torch.stack(inputs["gt_masks"])
    boxes = torch.cat(inputs["proposals"])
    matched = torch.cat(inputs["idxs"])
    image_idx = torch.cat([torch.full_like(idx, i) for i, idx in enumerate(inputs["idxs"])])
    labels = torch.cat([gl[idx] for gl, idx in zip(inputs["gt_labels"], inputs["idxs"], strict=True)])
    weights = torch.ones(boxes.shape[0], device=boxes.device)
    return lambda x: mask_loss(x, boxes, masks, image_idx, matched, labels, weights)


def setup_mask_loss(provider: str, mode: str = "full", device: str | None = None) -> Callable[[], object]:
    """A callable running one ``mode`` step of ``provider`` (synchronised on CUDA)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = make_inputs(device, **(CUDA_SHAPES if coco_shapes(device) else CPU_SHAPES))
    lists = (inputs["proposals"], inputs["gt_masks"], inputs["gt_labels"], inputs["idxs"])
    if provider == "torchvision":
        loss_fn = lambda x: tv_maskrcnn_loss(x, *lists)
    elif provider == "ours":
        loss_fn = lambda x: maskrcnn_loss(x, *lists)
    elif provider == "ours_fused":
        loss_fn = _fused(inputs)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    logits = inputs["logits"].requires_grad_(mode != "forward")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if mode == "forward":

        def step() -> object:
            with torch.no_grad():
                out = loss_fn(logits)
            sync()
            return out

    elif mode == "backward":
        loss = loss_fn(logits)

        def step() -> object:
            (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
            sync()
            return grad

    elif mode == "full":

        def step() -> object:
            (grad,) = torch.autograd.grad(loss_fn(logits), logits)
            sync()
            return grad

    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mask_loss(benchmark, provider: str, mode: str) -> None:
    shapes = CUDA_SHAPES if coco_shapes() else CPU_SHAPES
    R, K, M = shapes["num_rois"], shapes["num_classes"], shapes["mask_size"]
    # The floor: the label channel of the logits read (forward), the whole gradient written (backward).
    moved = {"forward": R * M * M * 4, "backward": R * K * M * M * 4}
    moved["full"] = moved["forward"] + moved["backward"]
    # Set before the run: a suite stopped by its time budget keeps the rows it finished, labelled.
    benchmark.group = f"mask_loss-{mode}"
    benchmark.extra_info.update(op="mask_loss", shape=f"{R}x{K}x{M}x{M}", dtype="float32", mode=mode,
                                provider=provider, bytes=moved[mode])  # fmt: skip
    fn = setup_mask_loss(provider, mode)
    fn()  # warm-up: compiles and autotunes the kernels on CUDA
    benchmark(fn)


def test_providers_agree() -> None:
    """The benchmarked callables compute the same gradient (guards against timing a wrong path)."""
    grads = [setup_mask_loss(p, "full")() for p in PROVIDERS]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)
