"""Anchors: torchvision's AnchorGenerator grid, computed from static sizes only."""

from __future__ import annotations

import torch
from torch import Tensor


def cell_anchors(size: int, aspect_ratios: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``Tensor[A, 4]`` zero-centred anchors of one level, rounded as torchvision's ``generate_anchors``.

    Built on ``device`` from fills: a tensor made from a Python list would be copied from the host, a copy that
    a CUDA graph cannot capture and that fake CUDA tensors cannot trace without a GPU
    (``tests/kernels/fake_cuda_graphs.py``). Square root, reciprocal, products and rounding are correctly
    rounded on the CPU and on CUDA alike, so every device gets the same values.
    """
    ratios = torch.stack([torch.full((), r, dtype=dtype, device=device) for r in aspect_ratios])
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws, hs = w_ratios * size, h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def grid_anchors(
    image_size: tuple[int, int],
    feature_sizes: list[tuple[int, int]],
    anchor_sizes: tuple[int, ...],
    aspect_ratios: tuple[float, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Per level ``Tensor[H_l * W_l * A, 4]``, location-major then anchor (torchvision's order).

    Strides are ``image_size // feature_size`` of the padded batch, as in torchvision.
    """
    out = []
    for (fh, fw), size in zip(feature_sizes, anchor_sizes, strict=True):
        stride_h, stride_w = image_size[0] // fh, image_size[1] // fw
        base = cell_anchors(size, aspect_ratios, dtype, device)
        shifts_x = torch.arange(0, fw, dtype=torch.int32, device=device) * stride_w
        shifts_y = torch.arange(0, fh, dtype=torch.int32, device=device) * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return out
