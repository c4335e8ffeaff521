"""``python -m kernels``: every op of the library against torchvision, on this machine's device.

For each op (RoIAlign, multi-level RoIAlign, the mask loss, box decoding, NMS, mask pasting) it runs ours and
torchvision's on the same random COCO-like inputs (reduced on CPU), prints how far ours is from torchvision's
result and the median wall time of three calls each after a warm-up call (compilation and autotuning stay out).
The times are a smoke check, not a benchmark: ``python -m bench`` measures properly. Under a minute on a 2-core
CPU (the check against each result is what it shows there; the speed of the Triton kernels shows on a GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection import roi_heads as tv_roi_heads

import kernels

Case = tuple[str, Callable[[], Any], Callable[[], Any], Callable[[Any, Any], str]]


def _timed(fn: Callable[[], Any], device: str, repeats: int = 3) -> tuple[Any, float]:
    """(the result, median seconds of ``repeats`` calls after one warm-up call)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max |diff| {(a.float() - b.float()).abs().max().item():.1e}" if a.numel() else "both empty"


def _same_kept(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"same {len(b)} kept, same order" if torch.equal(a, b) else f"DIFFERENT: {len(a)} vs {len(b)} kept"


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def cases(device: str) -> list[Case]:
    """(name, ours, torchvision's, how to compare their results) per op, on inputs made on ``device``."""
    gen = torch.Generator().manual_seed(0)
    cuda = device == "cuda"

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device)

    # Two images; P2-P5 of an 800x1344 (CUDA) or 200x336 (CPU) input with 256 channels.
    size, rois_per_image, channels = ((200, 336), 512, 256) if cuda else ((50, 84), 64, 64)
    image_hw = (size[0] * 4, size[1] * 4)
    features = {str(i): torch.randn(2, channels, size[0] >> i, size[1] >> i, generator=gen).to(device)
                for i in range(4)}  # fmt: skip
    boxes = []
    for _ in range(2):
        xy = rand(rois_per_image, 2) * torch.tensor([image_hw[1], image_hw[0]], device=device)
        boxes.append(torch.cat([xy, xy + rand(rois_per_image, 2) * 300 + 8], 1))
    ours_pool = kernels.MultiScaleRoIAlign(list(features), 7, 2)
    tv_pool = torchvision.ops.MultiScaleRoIAlign(list(features), 7, 2)

    # Mask loss: R positive RoIs over K classes, 28x28 logits, G ground-truth masks per image.
    R, K, G = (256, 81, 20) if cuda else (64, 81, 8)
    logits = torch.randn(R, K, 28, 28, generator=gen).to(device)
    gt_masks = [(rand(G, *image_hw) > 0.5).to(torch.uint8) for _ in range(2)]
    gt_labels = [torch.randint(1, K, (G,), generator=gen).to(device) for _ in range(2)]
    matched = [torch.randint(0, G, (R // 2,), generator=gen).to(device) for _ in range(2)]
    positives = [b[: R // 2] for b in boxes]

    # Box decoding: N proposals x 91 classes of deltas.
    N = 2000 if cuda else 500
    proposals = torch.cat([boxes[0], boxes[1]])[:N].repeat(N // (2 * rois_per_image) + 1, 1)[:N]
    deltas = torch.randn(N, 91 * 4, generator=gen).to(device)
    weights = (10.0, 10.0, 5.0, 5.0)

    # NMS: the RPN's case, 4000 (CPU 1000) boxes over 5 levels at IoU 0.7, clustered around 50 objects so that
    # most are suppressed.
    M = 4000 if cuda else 1000
    objects = rand(50, 4) * torch.tensor([image_hw[1], image_hw[0], 200, 200], device=device) + 10
    which = objects[torch.randint(0, 50, (M,), generator=gen).to(device)]
    centres = which[:, :2] + torch.randn(M, 2, generator=gen).to(device) * which[:, 2:] * 0.1
    nms_boxes = torch.cat([centres - which[:, 2:] / 2, centres + which[:, 2:] / 2], 1)
    nms_scores, levels = rand(M), torch.randint(0, 5, (M,), generator=gen).to(device)

    # Pasting: D detections' 28x28 mask probabilities into the image.
    D = 100 if cuda else 50
    masks = rand(D, 1, 28, 28)
    paste_boxes = boxes[0][:D]

    return [
        ("roi_align 14x14, P2", lambda: kernels.roi_align(features["0"], boxes, 14, 0.25, 2),
         lambda: torchvision.ops.roi_align(features["0"], boxes, 14, 0.25, 2), _max_diff),
        ("MultiScaleRoIAlign 7x7, P2-P5", lambda: ours_pool(features, boxes, [image_hw] * 2),
         lambda: tv_pool(features, boxes, [image_hw] * 2), _max_diff),
        (f"maskrcnn_loss {R}x{K}x28x28", lambda: kernels.maskrcnn_loss(logits, positives, gt_masks, gt_labels, matched),
         lambda: tv_roi_heads.maskrcnn_loss(logits, positives, gt_masks, gt_labels, matched), _max_diff),
        (f"BoxCoder.decode {N}x91", lambda: kernels.BoxCoder(weights).decode(deltas, [proposals]),
         lambda: tv_det_utils.BoxCoder(weights).decode(deltas, [proposals]), _max_diff),
        (f"batched_nms {M} boxes", lambda: kernels.batched_nms(nms_boxes, nms_scores, levels, 0.7),
         lambda: torchvision.ops.batched_nms(nms_boxes, nms_scores, levels, 0.7), _same_kept),
        (f"paste_masks {D}x28x28", lambda: kernels.paste_masks_in_image(masks, paste_boxes, image_hw),
         lambda: tv_roi_heads.paste_masks_in_image(masks, paste_boxes, image_hw), _max_diff),
    ]  # fmt: skip


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
          f"ours runs {'Triton kernels' if device == 'cuda' else 'the torch path'} (kernels.backend_for)")  # fmt: skip
    print(f"{'op':<32}{'ours against torchvision':<32}{'ours':>10}{'torchvision':>13}")
    with torch.no_grad():
        for name, ours, theirs, compare in cases(device):
            a, t_ours = _timed(ours, device)
            b, t_theirs = _timed(theirs, device)
            print(f"{name:<32}{compare(a, b):<32}{_fmt(t_ours):>10}{_fmt(t_theirs):>13}", flush=True)
    print("times: median of 3 calls after a warm-up; a smoke check, python -m bench measures")


if __name__ == "__main__":
    main()
