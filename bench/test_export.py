"""Deployment benchmark: inference of one image with R50-FPN at equal weights, ours against torchvision.

Providers: ``torchvision`` (``maskrcnn_resnet50_fpn`` eager), ``ours`` (``mrcnn.MaskRCNN`` eager),
``ours_compile`` (``torch.compile(fullgraph=True)``), ``ours_package`` (the AOTInductor package of
``mrcnn.export``, loaded with ``torch._inductor.aoti_load_package``), on CPU ``ours_onnx`` (``mrcnn.export``'s ONNX
model in ONNX Runtime's CPU provider, its default threads) and, on CUDA, ``ours_cudagraphs``
(``mode="reduce-overhead"``). Our providers time the forward on ``collate``'s tensors (resizing and
normalising are outside the package too); torchvision's its whole call, which includes them.

Shapes: CUDA one 800x1333 image (COCO); CPU one 512x683 image (the issue's CPU case). The package is
compiled at the padded size, 800x1344 or 512x704. Compiling takes minutes on a small CPU (setup, not timed).

Run: ``python -m pytest bench/test_export.py`` (``--benchmark-disable`` for a smoke run).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

import mrcnn
from bench import coco_shapes
from mrcnn.export import export_package

CUDA = torch.cuda.is_available()
SIZE = (800, 1333) if coco_shapes() else (512, 683)
PROVIDERS = ("torchvision", "ours", "ours_compile", "ours_package") + (("ours_cudagraphs",) if CUDA else ("ours_onnx",))


def setup_inference(provider: str, folder: Path) -> Callable[[], object]:
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    # box_score_thresh=0: with random weights almost no detection passes 0.05, and torchvision would skip the
    # mask head that our static model always runs on detections_per_img slots; at 0 both run it on 100.
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=SIZE[0], max_size=SIZE[1],
                               box_score_thresh=0.0).to(device).eval()  # fmt: skip
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    if provider == "torchvision":
        return lambda: tv([image])
    model = mrcnn.from_torchvision(tv).eval()
    x, sizes, _ = model.collate([image])
    if provider == "ours_onnx":
        import onnxruntime

        path = export_package(model, folder / "model.onnx", 1, tuple(x.shape[2:]))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy(), "image_sizes": sizes.numpy()}
        return lambda: session.run(None, feed)
    if provider == "ours_package":
        path = export_package(model, folder / "model.pt2", 1, tuple(x.shape[2:]), device)
        run = torch._inductor.aoti_load_package(str(path))
    elif provider in ("ours_compile", "ours_cudagraphs"):
        run = torch.compile(model, fullgraph=True, mode="reduce-overhead" if provider == "ours_cudagraphs" else None)
    else:
        run = model
    return lambda: run(x, sizes)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_inference(benchmark, provider: str) -> None:
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        fn = setup_inference(provider, Path(folder))

        def synced():
            fn()
            if CUDA:
                torch.cuda.synchronize()

        synced()  # warm-up: compilation, autotuning, CUDA graph capture
        benchmark.extra_info.update(op="mask_rcnn_export", mode="infer", provider=provider, images=1,
                                    shape=f"1x{SIZE[0]}x{SIZE[1]}", dtype="float32")  # fmt: skip
        benchmark.pedantic(synced, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
