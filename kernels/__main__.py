"""``python -m kernels``: a short demo of the ops against torchvision on this machine's device.

Runs each op on random COCO-like inputs (reduced on CPU), prints the largest difference from
torchvision and one wall-clock time per provider. Timings here are a smoke check, not a
benchmark: ``python -m bench`` measures properly.
"""

from __future__ import annotations

import time

import torch
import torchvision

import kernels


def _timed(fn) -> tuple[torch.Tensor, float]:
    fn()  # warm-up: compilation and autotuning stay out of the time
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    size, rois_per_image = ((200, 336), 512) if device == "cuda" else ((50, 84), 64)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    features = {
        str(i): torch.randn(2, 256, size[0] >> i, size[1] >> i, generator=gen).to(device) for i in range(len(scales))
    }
    image_shapes = [(size[0] * 4, size[1] * 4)] * 2
    boxes = []
    for _ in range(2):
        xy = torch.rand(rois_per_image, 2, generator=gen) * torch.tensor([size[1] * 4, size[0] * 4])
        wh = torch.rand(rois_per_image, 2, generator=gen) * 300 + 8
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))

    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"{'op':<28}{'max |ours - torchvision|':>26}{'ours':>12}{'torchvision':>14}")
    ours = kernels.MultiScaleRoIAlign(list(features), 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(list(features), 7, 2)
    cases = [
        (
            "MultiScaleRoIAlign 7x7",
            lambda: ours(features, boxes, image_shapes),
            lambda: theirs(features, boxes, image_shapes),
        ),
        (
            "roi_align 14x14 (P2)",
            lambda: kernels.roi_align(features["0"], boxes, 14, 0.25, 2),
            lambda: torchvision.ops.roi_align(features["0"], boxes, 14, 0.25, 2),
        ),
    ]
    for name, fn_ours, fn_tv in cases:
        a, t_ours = _timed(fn_ours)
        b, t_tv = _timed(fn_tv)
        err = (a - b).abs().max().item()
        print(f"{name:<28}{err:>26.2e}{t_ours * 1e3:>10.2f}ms{t_tv * 1e3:>12.2f}ms")
    print(f"backend for these tensors: {kernels.backend_for(features['0'])}")


if __name__ == "__main__":
    main()
