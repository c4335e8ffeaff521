"""Model benchmarks: a training step (forward, backward, SGD step) and inference, ours against torchvision's
``maskrcnn_resnet50_fpn`` at the same configuration and the same weights.

Providers:
* ``torchvision``: ``maskrcnn_resnet50_fpn`` eager; ``torchvision_compile``: the same under ``torch.compile``
  (default mode; its graph breaks stay).
* ``ours``: ``mrcnn.MaskRCNN`` eager; ``ours_compile``: ``torch.compile(fullgraph=True)``;
  ``ours_cudagraphs``: ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (CUDA graphs).

CUDA: batch 2 at 800 x 1333 (COCO), ResNet-50, 91 classes. CPU: batch 2 at 128 x 192, ResNet-18, eager
providers only (inductor's compile of the model takes minutes on a small CPU).
``extra_info["images"]`` gives images per call, so images/s = images / time.

Run: ``python -m pytest bench/test_model.py`` (``--benchmark-disable`` for a smoke run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

import mrcnn
from bench import coco_shapes

CUDA = torch.cuda.is_available()
COCO = coco_shapes()  # the COCO size and ResNet-50 (BENCH_SHAPES=coco forces them on a CPU)
# Compiled providers on CUDA only: inductor's compile of the model takes minutes on a small CPU.
EAGER = ("torchvision", "ours")
PROVIDERS = (*EAGER, "torchvision_compile", "ours_compile", "ours_cudagraphs") if CUDA else EAGER
MODES = ("infer", "train")  # inference first: the first H200 run measured training only (time share)


def _images(device: str, size: tuple[int, int], gen: torch.Generator) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = [], []
    H, W = size
    for _ in range(2):
        images.append(torch.rand(3, H, W, generator=gen).to(device))
        n = 8
        wh = (torch.rand(n, 2, generator=gen) * 0.4 + 0.05) * torch.tensor([W, H])
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([W, H]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, H, W, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append(
            {"boxes": boxes.to(device), "labels": torch.randint(1, 91, (n,), generator=gen).to(device),
             "masks": masks.to(device)}
        )  # fmt: skip
    return images, targets


def setup_model(provider: str, mode: str) -> tuple[Callable[[], object], int]:
    """A callable running one training step or one inference of batch 2, and the images per call."""
    device = "cuda" if CUDA else "cpu"
    size = (800, 1333) if COCO else (128, 192)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # box_score_thresh=0: with random weights almost no detection passes 0.05, and torchvision would skip
    # the mask head that our static model always runs on detections_per_img slots; at 0 both run it on 100.
    kw = dict(min_size=size[0], max_size=size[1], box_score_thresh=0.0)
    if COCO:
        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
    else:
        # A ResNet-18 body on CPU: the same model code at a size a small CPU runs in seconds.
        tv = MaskRCNN(_resnet_fpn_extractor(resnet18(), 3), num_classes=91, **kw)
    tv = tv.to(device)
    images, targets = _images(device, size, gen)
    if provider.startswith("torchvision"):
        model = tv
        run_model = torch.compile(tv) if provider == "torchvision_compile" else tv

        def train_step():
            losses = run_model(images, targets)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad():
                return run_model(images)
    else:
        model = mrcnn.from_torchvision(tv)
        batch_train = model.collate(images, targets)
        batch_infer = batch_train[:2]
        options = {"ours_compile": {}, "ours_cudagraphs": {"mode": "reduce-overhead"}}
        run_model = torch.compile(model, fullgraph=True, **options[provider]) if provider in options else model

        def train_step():
            losses = run_model(*batch_train)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad():
                return run_model(*batch_infer)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train(mode == "train")
    fn = train_step if mode == "train" else infer

    def synced():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    synced()  # warm-up: compilation, autotuning, CUDA graph capture
    return synced, 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model(benchmark, provider: str, mode: str) -> None:
    fn, images = setup_model(provider, mode)
    benchmark.extra_info.update(op="mask_rcnn", mode=mode, provider=provider, images=images,
                                shape="2x800x1333" if COCO else "2x128x192", dtype="float32")  # fmt: skip
    benchmark.pedantic(fn, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1 if CUDA else 0)
