"""Box decoding benchmarks: torchvision's ``BoxCoder.decode_single`` + ``clip_boxes_to_image`` against our fused
``decode_boxes`` (decode and clip to each box's image in one launch).

Providers:
* ``torchvision``: ``BoxCoder(weights).decode_single`` (~20 elementwise kernels), then per image
  ``clip_boxes_to_image`` (as torchvision's RPN and box head do: a Python loop over the images).
* ``ours``: ``kernels.box_coder.decode_boxes`` with ``image_sizes`` expanded per box (no copy).

Shapes (``mode``):
* ``rpn``: the proposals after the per-level top-k, K = 1, weights (1, 1, 1, 1).
* ``head``: the box head's per-class deltas at evaluation, K = 91, weights (10, 10, 5, 5).

CUDA: 2 images of 800 x 1344; rpn 2 x 10000 boxes (5 levels x 2000), head 2 x 1000 proposals (the
target is >= 5x torchvision). CPU (the torch path; TRITON_INTERPRET is not set here): 2 x 1000 and 2 x 100.

Run: ``python -m pytest bench/test_box_coder.py`` (``--benchmark-disable`` for a quick smoke run).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import clip_boxes_to_image

from bench import coco_shapes
from kernels.box_coder import decode_boxes

PROVIDERS = ("torchvision", "ours")
MODES = ("rpn", "head")
DTYPES = (torch.float32, torch.float16)
CLIP = math.log(1000.0 / 16)
IMAGE_SIZES = ((800, 1216), (768, 1344))  # (h, w) of the 2 images before padding
WEIGHTS = {"rpn": (1.0, 1.0, 1.0, 1.0), "head": (10.0, 10.0, 5.0, 5.0)}
CLASSES = {"rpn": 1, "head": 91}
BOXES_PER_IMAGE = {"cuda": {"rpn": 10000, "head": 1000}, "cpu": {"rpn": 1000, "head": 100}}


def _shapes(device: str) -> str:
    return "cuda" if coco_shapes(device) else "cpu"


def make_inputs(device: str, mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deltas [R, K*4], boxes [R, 4])`` for 2 images, images concatenated; deltas ~ N(0, 1) regressions."""
    per_image, K = BOXES_PER_IMAGE[_shapes(device)][mode], CLASSES[mode]
    gen = torch.Generator().manual_seed(0)
    boxes = []
    for h, w in IMAGE_SIZES:
        size = torch.tensor([w, h], dtype=torch.float32)
        wh = (torch.rand(per_image, 2, generator=gen) * 0.3 + 0.01) * size
        xy = torch.rand(per_image, 2, generator=gen) * size - wh / 2
        boxes.append(torch.cat([xy, xy + wh], 1))
    deltas = torch.randn(len(IMAGE_SIZES) * per_image, K * 4, generator=gen) * 0.5
    return deltas.to(device, dtype), torch.cat(boxes).to(device, dtype)


def setup_box_coder(
    provider: str, mode: str = "head", dtype: torch.dtype = torch.float32, device: str | None = None
) -> Callable[[], torch.Tensor]:
    """A callable decoding and clipping all boxes with ``provider`` -> ``Tensor[R, K, 4]`` (synchronised on CUDA)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deltas, boxes = make_inputs(device, mode, dtype)
    per_image, K, weights = BOXES_PER_IMAGE[_shapes(device)][mode], CLASSES[mode], WEIGHTS[mode]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "torchvision":
        coder = TVBoxCoder(weights, CLIP)

        def decode() -> torch.Tensor:
            pred = coder.decode_single(deltas, boxes).reshape(-1, K, 4)
            clipped = [clip_boxes_to_image(p, size) for p, size in zip(pred.split(per_image), IMAGE_SIZES, strict=True)]
            return torch.cat(clipped)

    elif provider == "ours":
        sizes = torch.tensor(IMAGE_SIZES, device=device)
        image_sizes = sizes[:, None, :].expand(len(IMAGE_SIZES), per_image, 2).reshape(-1, 2)

        def decode() -> torch.Tensor:
            return decode_boxes(deltas, boxes, weights, CLIP, image_sizes)

    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step() -> torch.Tensor:
        out = decode()
        sync()
        return out

    return step


def box_coder_info(provider: str, mode: str, dtype: torch.dtype, device: str | None = None) -> dict:
    """The benchmark's ``extra_info``; ``bytes``: read deltas, boxes and sizes once, write the boxes once."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    R = len(IMAGE_SIZES) * BOXES_PER_IMAGE[_shapes(device)][mode]
    K = CLASSES[mode]
    return dict(
        op="decode_boxes",
        shape=f"{R}x{K}",
        dtype=str(dtype).removeprefix("torch."),
        mode=mode,
        provider=provider,
        bytes=R * (2 * K * 4 * dtype.itemsize + 4 * dtype.itemsize + 2 * 8),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_box_coder(benchmark, provider: str, mode: str, dtype: torch.dtype) -> None:
    fn = setup_box_coder(provider, mode, dtype)
    fn()  # warm-up: compiles the kernel on CUDA
    info = box_coder_info(provider, mode, dtype)
    benchmark.group = f"decode_boxes-{mode}-{info['dtype']}"
    benchmark.extra_info.update(info)
    benchmark(fn)


@pytest.mark.parametrize("mode", MODES)
def test_providers_agree(mode: str) -> None:
    """The benchmarked callables compute the same boxes (guards against timing a wrong path)."""
    ours = setup_box_coder("ours", mode)()
    expected = setup_box_coder("torchvision", mode)()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-3)
