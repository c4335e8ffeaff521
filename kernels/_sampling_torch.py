"""RoIAlign's bilinear sampling rule in torch: the math of ``_sampling_kernels`` (see its docstring), for the
torch paths of RoIAlign (``_roi_align_torch``) and of the mask-loss targets (``_mask_loss_torch``).

Every function is elementwise over broadcastable tensors, reads no value on the host and writes nothing in
place, so that ``torch.export`` can trace the callers under fake tensors and ``run_decompositions`` (which
refuses in-place nodes) can decompose them. Finiteness is ``torch.isfinite``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._contract import MAX_SAMPLES_PER_SIDE


def samples_per_bin(bin_size: Tensor, ok: Tensor, sampling_ratio: int) -> Tensor:
    """Samples per bin side (int64, ``bin_size``'s shape): ``sampling_ratio`` if positive, else ``ceil(bin_size)``
    clamped to ``[0, MAX_SAMPLES_PER_SIDE]``; 0 where not ``ok``."""
    if sampling_ratio > 0:
        n = torch.full_like(bin_size, sampling_ratio, dtype=torch.int64)
    else:
        n = torch.ceil(bin_size).clamp(0, MAX_SAMPLES_PER_SIDE).to(torch.int64)
    return torch.where(ok, n, 0)


def sample_coord(start: Tensor, bin_index: Tensor, bin_size: Tensor, sample_index: Tensor, grid: Tensor) -> Tensor:
    """Coordinate of sample ``sample_index`` of ``grid`` (at least 1) in bin ``bin_index``, in torchvision's
    operation order."""
    return start + bin_index * bin_size + (sample_index + 0.5) * bin_size / grid


def axis(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One axis of torchvision's ``bilinear_interpolate``: (inside, low, high, weight of low, weight of high).

    ``size`` (an integer tensor, the dtype of ``low``/``high``) broadcasts against ``coord`` and may be 0. A
    coordinate outside ``[-1, size]`` or NaN is not inside: its weights are 0 and ``c = 0`` keeps NaN out of the
    int conversion. ``low``/``high`` lie in ``[0, size - 1]`` whenever ``size > 0``.
    """
    inside = (coord >= -1) & (coord <= size) & (size > 0)
    c = torch.where(inside, coord.clamp(min=0), 0.0)
    low = c.to(size.dtype)
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    frac = torch.where(edge, low.to(c.dtype), c) - low
    return inside, low, high, torch.where(inside, 1 - frac, 0.0), torch.where(inside, frac, 0.0)
