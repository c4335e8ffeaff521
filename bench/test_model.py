"""Model benchmarks: a training step (forward, backward, SGD step) and inference, ours against torchvision's
``maskrcnn_resnet50_fpn`` at the same configuration and the same weights.

Providers:
* ``torchvision``: ``maskrcnn_resnet50_fpn`` eager; ``torchvision_compile``: the same under ``torch.compile``
  (default mode; its graph breaks stay).
* ``ours``: ``mrcnn.MaskRCNN`` eager; ``ours_captured``: the same step or forward captured as one CUDA graph
  and replayed (``mrcnn.graphs.Captured``, what ``mrcnn.train`` and ``predict`` do on CUDA; each call copies
  its inputs into the graph's); ``ours_compile``: ``torch.compile(fullgraph=True)``; ``ours_cudagraphs``:
  ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (inductor's CUDA graphs).

Each in fp32 and, on CUDA, under bf16 autocast (both models alike). CUDA: batch 2 at 800 x 1333 (COCO),
ResNet-50, 91 classes. CPU: batch 2 at 128 x 192, ResNet-18, eager fp32 providers only (inductor's compile of
the model takes minutes on a small CPU; CUDA graphs need CUDA). ``extra_info["images"]`` gives images per call,
so images/s = images / time; ``extra_info["setup_s"]`` the seconds from building the model to the end of its
first call (weights, compile, autotuning, capture: the cold start after imports).

Run: ``python -m pytest bench/test_model.py`` (``--benchmark-disable`` for a smoke run).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

import mrcnn
from bench import coco_shapes
from mrcnn.graphs import Captured

CUDA = torch.cuda.is_available()
COCO = coco_shapes()  # the COCO size and ResNet-50 (BENCH_SHAPES=coco forces them on a CPU)
# Captured and compiled providers on CUDA only: inductor's compile of the model takes minutes on a small CPU.
EAGER = ("torchvision", "ours")
PROVIDERS = (*EAGER, "ours_captured", "torchvision_compile", "ours_compile", "ours_cudagraphs") if CUDA else EAGER
MODES = ("infer", "train")  # inference first: the first H200 run measured training only (time share)
AMP = ("fp32", "bf16") if CUDA else ("fp32",)


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


def setup_model(provider: str, mode: str, amp: str = "fp32") -> tuple[Callable[[], object], int, float]:
    """A callable running one training step or one inference of batch 2, the images per call, and the seconds
    from building the model to the end of its first call."""
    t0 = time.perf_counter()
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
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16")
    if provider.startswith("torchvision"):
        model = tv
        run_model = torch.compile(tv) if provider == "torchvision_compile" else tv
        train_inputs, infer_inputs = (images, targets), (images,)
    else:
        model = mrcnn.from_torchvision(tv)
        train_inputs = model.collate(images, targets)
        infer_inputs = train_inputs[:2]
        options = {"ours_compile": {}, "ours_cudagraphs": {"mode": "reduce-overhead"}}
        run_model = torch.compile(model, fullgraph=True, **options[provider]) if provider in options else model

    def train_step(inputs: tuple) -> None:
        with autocast:
            losses = run_model(*inputs)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(inputs: tuple) -> object:
        with autocast:
            return run_model(*inputs)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train(mode == "train")
    fn, inputs = (train_step, train_inputs) if mode == "train" else (infer, infer_inputs)
    if provider == "ours_captured":
        # Two eager calls, the capture, then every call a replay (the first timed round).
        fn = Captured(fn, device=torch.device(device), what=f"the {mode} benchmark", warmup=2,
                      reset=lambda: optimizer.zero_grad(set_to_none=True))  # fmt: skip
        for _ in range(3):
            fn(inputs)

    def synced():
        fn(inputs)
        if CUDA:
            torch.cuda.synchronize()

    synced()  # warm-up: compilation, autotuning, CUDA graph capture
    return synced, 2, time.perf_counter() - t0


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model(benchmark, provider: str, mode: str, amp: str) -> None:
    fn, images, setup_s = setup_model(provider, mode, amp)
    benchmark.extra_info.update(op="mask_rcnn", mode=mode, provider=provider, images=images, setup_s=setup_s,
                                shape="2x800x1333" if COCO else "2x128x192",
                                dtype="float32" if amp == "fp32" else "bf16 autocast")  # fmt: skip
    benchmark.pedantic(fn, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1 if CUDA else 0)
