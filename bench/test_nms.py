"""NMS benchmarks: torchvision's ``batched_nms`` (one call per image, as its RPN and box head do) against our
``nms_fixed`` (all images in one call, fixed-size output, no host synchronisation).

Providers:
* ``torchvision``: per image ``torchvision.ops.batched_nms(boxes, scores, idxs, thr)[:max_out]``. On CUDA
  each call copies its IoU mask to the host and walks it there (a synchronisation per image).
* ``ours``: ``kernels.nms.nms_fixed(boxes, scores, thr, max_out, idxs=idxs)`` on the whole batch: the IoU mask
  and the greedy walk both on the device, ``(keep, keep_valid)`` of fixed shape, zero host syncs (the
  callable only synchronises at its end for the timer, as the torchvision one does).

Shapes (``mode``), 2 images:
* ``rpn``: the RPN's proposals after the per-level top-k: 5 levels x 2000 = 10000 boxes per image, the level
  as class, IoU 0.7, the first 2000 kept (torchvision's training settings). The target is >= 1.5x.
* ``detections``: the box head's candidates at evaluation: 4000 boxes per image over 90 classes, IoU 0.5,
  the first 100 kept.

CPU (the torch path; TRITON_INTERPRET is not set here): 5 x 200 and 400 boxes per image.

Run: ``python -m pytest bench/test_nms.py`` (``--benchmark-disable`` for a quick smoke run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision

from bench import coco_shapes
from kernels.nms import nms_fixed

PROVIDERS = ("torchvision", "ours")
MODES = ("rpn", "detections")
BATCH = 2
SETTINGS = {
    # mode: (boxes per image on CUDA, on CPU, classes, IoU threshold, max_out)
    "rpn": (10000, 1000, 5, 0.7, 2000),
    "detections": (4000, 400, 90, 0.5, 100),
}


def make_inputs(device: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [B, N, 4], scores [B, N], idxs [B, N])``: boxes clustered around objects of an 800 x 1333
    image (so that NMS removes many), class ids in contiguous runs (the RPN's levels) or random (classes)."""
    n_cuda, n_cpu, classes, _, _ = SETTINGS[mode]
    N = n_cuda if coco_shapes(device) else n_cpu
    gen = torch.Generator().manual_seed(0)
    objects = torch.rand(BATCH, 60, 4, generator=gen) * torch.tensor([1333.0, 800.0, 300.0, 300.0]) + 10
    which = torch.randint(0, 60, (BATCH, N), generator=gen)
    obj = objects.gather(1, which[..., None].expand(BATCH, N, 4))
    ctr = obj[..., :2] + torch.randn(BATCH, N, 2, generator=gen) * obj[..., 2:] * 0.15
    size = obj[..., 2:] * (1 + torch.randn(BATCH, N, 2, generator=gen) * 0.15).clamp(min=0.2)
    # On a 1/8 pixel grid: torchvision's class offsets (its batched_nms trick) stay exact, so both providers
    # see the same IoUs.
    boxes = torch.round(torch.cat([ctr - size / 2, ctr + size / 2], dim=2) * 8) / 8
    scores = torch.rand(BATCH, N, generator=gen)
    if mode == "rpn":
        idxs = torch.arange(classes).repeat_interleave(N // classes)[None].expand(BATCH, N).contiguous()
    else:
        idxs = torch.randint(0, classes, (BATCH, N), generator=gen)
    return boxes.to(device), scores.to(device), idxs.to(device)


def setup_nms(provider: str, mode: str = "rpn", device: str | None = None) -> Callable[[], list[torch.Tensor]]:
    """A callable running the batch's NMS with ``provider`` -> the kept indices of each image (synchronised on
    CUDA; for ``ours`` the unpadding happens outside the timed callable)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    boxes, scores, idxs = make_inputs(device, mode)
    _, _, _, thr, max_out = SETTINGS[mode]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "torchvision":

        def run() -> tuple[torch.Tensor, ...]:
            return tuple(torchvision.ops.batched_nms(boxes[b], scores[b], idxs[b], thr)[:max_out] for b in range(BATCH))

    elif provider == "ours":

        def run() -> tuple[torch.Tensor, ...]:
            return nms_fixed(boxes, scores, thr, max_out, idxs=idxs)

    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step() -> tuple[torch.Tensor, ...]:
        out = run()
        sync()
        return out

    return step


def nms_info(provider: str, mode: str, device: str | None = None) -> dict:
    """The benchmark's ``extra_info``; ``bytes``: read boxes, scores and class ids once, write the kept slots."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n_cuda, n_cpu, classes, thr, max_out = SETTINGS[mode]
    N = n_cuda if coco_shapes(device) else n_cpu
    return dict(
        op="nms",
        shape=f"{BATCH}x{N}->{max_out}",
        dtype="float32",
        mode=mode,
        provider=provider,
        bytes=BATCH * (N * (16 + 4 + 8) + max_out * 9),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nms(benchmark, provider: str, mode: str) -> None:
    fn = setup_nms(provider, mode)
    fn()  # warm-up: compiles the kernels on CUDA
    info = nms_info(provider, mode)
    benchmark.group = f"nms-{mode}"
    benchmark.extra_info.update(info)
    benchmark(fn)


@pytest.mark.parametrize("mode", MODES)
def test_providers_agree(mode: str) -> None:
    """Ours keeps exactly torchvision's boxes in torchvision's order (guards against timing a wrong path)."""
    keep, keep_valid = setup_nms("ours", mode)()
    expected = setup_nms("torchvision", mode)()
    for b, ref in enumerate(expected):
        assert torch.equal(keep[b][keep_valid[b]], ref)
