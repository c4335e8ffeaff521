"""Mask pasting benchmarks: torchvision's ``paste_masks_in_image`` against ours.

Providers:
* ``torchvision``: ``torchvision.models.detection.roi_heads.paste_masks_in_image`` (a Python loop: per mask one
  interpolate, one image-sized zeros and one copy, then a stack), followed by ``> 0.5`` in threshold mode.
* ``ours``: ``kernels.paste_masks.paste_masks_in_image``: one launch writes every pixel once; threshold mode
  writes torch.bool directly.

CUDA: 100 detections of 28 x 28 masks on an 800 x 1333 image (the target is >= 5x torchvision). CPU (the torch
path; TRITON_INTERPRET is not set here): 20 detections on a 200 x 333 image.

Run: ``python -m pytest bench/test_paste_masks.py`` (``--benchmark-disable`` for a quick smoke run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image

from bench import coco_shapes
from kernels.paste_masks import paste_masks_in_image

PROVIDERS = ("torchvision", "ours")
THRESHOLDS = (None, 0.5)
DTYPES = (torch.float32, torch.float16)

CUDA_SHAPES = dict(num_masks=100, image_size=(800, 1333), mask_size=28)
CPU_SHAPES = dict(num_masks=20, image_size=(200, 333), mask_size=28)


def make_inputs(
    device: str, num_masks: int, image_size: tuple[int, int], mask_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities and detection boxes of 1/25 to 1/2 of the image side, inside the image."""
    H, W = image_size
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(num_masks, 1, mask_size, mask_size, generator=gen).to(device, dtype)
    size = torch.tensor([W, H], dtype=torch.float32)
    wh = (torch.rand(num_masks, 2, generator=gen) * 0.46 + 0.04) * size
    xy = torch.rand(num_masks, 2, generator=gen) * (size - wh)
    return masks, torch.cat([xy, xy + wh], 1).to(device)


def _shapes(device: str) -> dict:
    return CUDA_SHAPES if coco_shapes(device) else CPU_SHAPES


def setup_paste_masks(
    provider: str, threshold: float | None = None, dtype: torch.dtype = torch.float32, device: str | None = None
) -> Callable[[], torch.Tensor]:
    """A callable pasting all masks with ``provider`` (synchronised on CUDA)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = _shapes(device)
    masks, boxes = make_inputs(device, **shapes, dtype=dtype)
    image_size = shapes["image_size"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "torchvision":

        def paste() -> torch.Tensor:
            out = tv_paste_masks_in_image(masks, boxes, image_size)
            return out if threshold is None else out > threshold

    elif provider == "ours":

        def paste() -> torch.Tensor:
            return paste_masks_in_image(masks, boxes, image_size, threshold=threshold)

    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step() -> torch.Tensor:
        out = paste()
        sync()
        return out

    return step


def paste_masks_info(provider: str, threshold: float | None, dtype: torch.dtype, device: str | None = None) -> dict:
    """The benchmark's ``extra_info``; ``bytes`` is the least an implementation must move: read the masks and
    boxes, write every output pixel once."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = _shapes(device)
    num_masks, mask_size, (height, width) = shapes["num_masks"], shapes["mask_size"], shapes["image_size"]
    pixel_bytes = 1 if threshold is not None else dtype.itemsize
    return dict(
        op="paste_masks",
        shape=f"{num_masks}x{mask_size}^2->{height}x{width}",
        dtype=str(dtype).removeprefix("torch."),
        mode="forward" if threshold is None else "forward-threshold",
        provider=provider,
        bytes=num_masks * (mask_size**2 * dtype.itemsize + 4 * 4 + height * width * pixel_bytes),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("threshold", THRESHOLDS, ids=["soft", "threshold"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_paste_masks(benchmark, provider: str, threshold: float | None, dtype: torch.dtype) -> None:
    fn = setup_paste_masks(provider, threshold, dtype)
    fn()  # warm-up: compiles the kernel on CUDA
    info = paste_masks_info(provider, threshold, dtype)
    benchmark.group = f"paste_masks-{info['mode']}-{info['dtype']}"
    benchmark.extra_info.update(info)
    benchmark(fn)


@pytest.mark.parametrize("threshold", THRESHOLDS, ids=["soft", "threshold"])
def test_providers_agree(threshold: float | None) -> None:
    """The benchmarked callables compute the same masks (guards against timing a wrong path)."""
    ours = setup_paste_masks("ours", threshold)()
    expected = setup_paste_masks("torchvision", threshold)()
    if threshold is None:
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    else:
        # A pixel within float32 noise of the threshold may fall either way.
        assert (ours != expected).float().mean().item() < 1e-5
