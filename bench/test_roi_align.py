"""RoIAlign benchmarks: torchvision against ours, single-level and multi-level, forward / backward / full.

Providers:
* ``torchvision``: ``torchvision.ops.roi_align`` (single level) and ``torchvision.ops.MultiScaleRoIAlign``
  (one roi_align + ``where`` per level). torchvision has no bf16 kernel: for bf16 it runs on float32 copies
  and casts back, which is what its autocast registration does.
* ``ours``: ``kernels.roi_align`` and ``kernels.MultiScaleRoIAlign`` (one launch for all levels) on the same NCHW
  features (their transposes to channels-last, and the gradient's back, are in the time).
* ``ours_channels_last``: the same on channels-last features (what our model passes; the gradient stays
  channels-last). torchvision has no channels-last kernel: its column is NCHW in every row.

CUDA (COCO shapes of DESIGN.md): 2 images at 800 x 1344, FPN P2-P5 with C=256, 512 RoIs per image, 7x7 and
14x14 outputs, float32 and bfloat16; single level pools P2 (scale 1/4). CPU (our torch path against
torchvision's CPU kernel; TRITON_INTERPRET is not set here): 2 images at 200 x 336, C=64, 64 RoIs per image.

``bytes`` is the memory floor: the output (and in backward the output gradient and the written feature
gradient) plus every feature element some RoI's samples touch, read once.

Run: ``python -m pytest bench/test_roi_align.py`` (``--benchmark-disable`` for a smoke run).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torchvision

import kernels
from bench import coco_shapes

CUDA = torch.cuda.is_available()
PROVIDERS = ("torchvision", "ours", "ours_channels_last")
MODES = ("forward", "backward", "full")
LEVELS = ("multi", "single")  # multi first: what Mask R-CNN runs, measured first when time is short
OUTPUTS = (7, 14)
DTYPES = (torch.float32, torch.bfloat16)
SHAPES = (
    dict(image=(800, 1344), channels=256, rois_per_image=512)
    if coco_shapes()
    else dict(image=(200, 336), channels=64, rois_per_image=64)
)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def make_inputs(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """FPN features P2-P5 of 2 images and RoIs of 16 px to half the image side (every level is used)."""
    device = "cuda" if CUDA else "cpu"
    H, W = SHAPES["image"]
    gen = torch.Generator().manual_seed(0)
    # Features drawn on the device: 46M normals per case take ~0.5 s on the CPU, and the suite has 48 cases.
    feature_gen = torch.Generator(device).manual_seed(0)
    features = {
        str(i): torch.randn(2, SHAPES["channels"], int(H * s), int(W * s), generator=feature_gen, device=device)
        .to(dtype)
        for i, s in enumerate(SCALES)
    }
    boxes = []
    for _ in range(2):
        n = SHAPES["rois_per_image"]
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(H / 2), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([W, H]) - side)
        boxes.append(torch.cat([xy, xy + side], 1).to(device))
    return features, boxes, [(H, W), (H, W)]


def _touched_elements(features: dict[str, torch.Tensor], boxes: list[torch.Tensor], levels: list[int]) -> int:
    """Feature elements some RoI's bilinear samples can read, per pixel footprint of each RoI on its level."""
    total = 0
    for lvl, f in enumerate(features.values()):
        if lvl not in levels:
            continue
        scale = SCALES[lvl]
        covered = torch.zeros(f.shape[0], f.shape[2], f.shape[3], dtype=torch.bool)
        for n, b in enumerate(boxes):
            own = _level_of(b) if len(levels) > 1 else torch.full((len(b),), lvl)
            for x1, y1, x2, y2 in (b[own.to(b.device) == lvl].cpu() * scale).tolist():
                covered[n, max(int(y1), 0) : int(y2) + 2, max(int(x1), 0) : int(x2) + 2] = True
        total += int(covered.sum()) * f.shape[1]
    return total


def _level_of(boxes: torch.Tensor) -> torch.Tensor:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (torch.floor(4 + torch.log2(area.sqrt() / 224) + 1e-6).clamp(2, 5) - 2).long()


def setup_roi_align(provider: str, levels: str, output: int, dtype: torch.dtype, mode: str) -> tuple[Callable, dict]:
    """A callable running ``mode`` with ``provider`` (synchronised on CUDA), and its ``extra_info``."""
    features, boxes, image_shapes = make_inputs(dtype)
    if provider == "ours_channels_last":
        features = {k: f.contiguous(memory_format=torch.channels_last) for k, f in features.items()}
    cast = provider == "torchvision" and dtype == torch.bfloat16  # torchvision has no bf16 kernel
    ours = provider != "torchvision"
    if levels == "single":
        feature = features["0"].requires_grad_(mode != "forward")
        if ours:
            pool = lambda: kernels.roi_align(feature, boxes, output, SCALES[0], 2)
        else:
            pool = lambda: torchvision.ops.roi_align(
                feature.float() if cast else feature, boxes, output, SCALES[0], 2
            ).to(dtype)
        inputs, used = [feature], [0]
    else:
        for f in features.values():
            f.requires_grad_(mode != "forward")
        module = (kernels.MultiScaleRoIAlign if ours else torchvision.ops.MultiScaleRoIAlign)(
            list(features), output, 2
        )
        if cast:
            pool = lambda: module({k: v.float() for k, v in features.items()}, boxes, image_shapes).to(dtype)
        else:
            pool = lambda: module(features, boxes, image_shapes)
        inputs, used = list(features.values()), list(range(4))
    grad = torch.randn_like(pool().detach()) if mode != "forward" else None
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    if mode == "forward":

        def step():
            with torch.no_grad():
                pool()
            sync()

    elif mode == "backward":
        state = {}

        def prepare():
            state["out"] = pool()

        def step():
            torch.autograd.grad(state["out"], inputs, grad, allow_unused=True)
            sync()

        step.prepare = prepare  # type: ignore[attr-defined]
    else:

        def step():
            torch.autograd.grad(pool(), inputs, grad, allow_unused=True)
            sync()

    K = sum(len(b) for b in boxes)
    C = SHAPES["channels"]
    out_bytes = K * C * output * output * dtype.itemsize
    feature_bytes = _touched_elements(features, boxes, used) * dtype.itemsize
    moved = {"forward": out_bytes + feature_bytes, "backward": out_bytes + feature_bytes}
    moved["full"] = moved["forward"] + moved["backward"]
    info = dict(
        op=f"roi_align-{levels}", mode=mode, provider=provider, dtype=str(dtype).removeprefix("torch."),
        shape=f"2x{C}x{SHAPES['image'][0]}x{SHAPES['image'][1]}/{len(used)}lvl K={K} {output}x{output}",
        bytes=moved[mode],
    )  # fmt: skip
    return step, info


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_roi_align(benchmark, provider: str, levels: str, output: int, dtype: torch.dtype, mode: str) -> None:
    step, info = setup_roi_align(provider, levels, output, dtype, mode)
    # Set before the run: a suite stopped by its time budget keeps the rows it finished, labelled.
    benchmark.group = f"roi_align-{levels}-{output}-{info['dtype']}-{mode}"
    benchmark.extra_info.update(info)
    prepare = getattr(step, "prepare", None)
    if prepare is not None:  # backward alone: a fresh forward graph before every round, outside the timing
        prepare()
        step()  # warm-up (compile, autotune)
        benchmark.pedantic(step, setup=prepare, rounds=20 if CUDA else 3, iterations=1)
    else:
        step()
        benchmark(step)


@pytest.mark.parametrize("levels", LEVELS)
def test_providers_agree(levels: str) -> None:
    """The benchmarked callables compute the same pooling, from NCHW and channels-last features (guards against
    timing a wrong path)."""
    features, boxes, image_shapes = make_inputs(torch.float32)
    nhwc = {k: f.contiguous(memory_format=torch.channels_last) for k, f in features.items()}
    if levels == "single":
        ours = [kernels.roi_align(fs["0"], boxes, 7, SCALES[0], 2) for fs in (features, nhwc)]
        theirs = torchvision.ops.roi_align(features["0"], boxes, 7, SCALES[0], 2)
    else:
        ours = [kernels.MultiScaleRoIAlign(list(fs), 7, 2)(fs, boxes, image_shapes) for fs in (features, nhwc)]
        theirs = torchvision.ops.MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, image_shapes)
    for out in ours:
        torch.testing.assert_close(out, theirs, rtol=1e-4, atol=1e-4)
