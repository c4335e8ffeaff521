"""What every op accepts and refuses, shared by its Triton kernels and its torch path: the dtypes, the limits,
the constants both backends compute with, the error classes and the argument checks."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Bilinear samples per bin side: the cap of the adaptive grid (ceil(bin size)) of RoIAlign and the mask-loss
# targets, and the largest fixed sampling_ratio the ops accept. Only a box over 1024 bins of pixels per side
# reaches it; a finite but absurd box (1e9 pixels) would otherwise loop for hours.
MAX_SAMPLES_PER_SIDE = 1024
# Feature maps one multi-level RoIAlign call pools from (P2-P6).
MAX_LEVELS = 5
# paste_masks: box coordinates are clamped to this before the float -> int64 conversion, which is undefined out
# of range; box sizes (``x2 - x1 + 1``) then still fit in int64.
COORD_LIMIT = 2.0**61


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def level_range(scales: list[float]) -> tuple[int, int]:
    """``(k_min, k_max)`` of torchvision's LevelMapper for per-level scales ``2**-k_min, ..., 2**-k_max``."""
    return int(-math.log2(scales[0])), int(-math.log2(scales[-1]))


class OpValueError(ValueError, RuntimeError):
    """A bad op argument. A ``ValueError``, and a ``RuntimeError`` as torchvision's C++ argument checks
    (``TORCH_CHECK``) raise, so code written against either catches it."""


class OpTypeError(TypeError, RuntimeError):
    """An op argument of the wrong type (or dtype); a ``RuntimeError`` too, as ``OpValueError``."""


class BoxesFormatError(OpValueError, AssertionError):
    """RoI boxes that are neither ``Tensor[K, 5]`` nor ``list[Tensor[L, 4]]``: also an ``AssertionError``, which
    torchvision's box check (``torch._assert``) raises."""


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise an ``OpTypeError``/``OpValueError`` naming ``name`` unless ``t`` is a tensor of the given rank,
    dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise OpTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise OpValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise OpTypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise OpValueError(f"{name} is on {t.device} but the input is on {device}; put them on the same device")
    return t


def check_sampling_ratio(sampling_ratio: object) -> int:
    """``sampling_ratio`` as an int (Python or numpy; a float or bool is refused). A fixed ratio takes
    ``ratio**2`` samples per bin: above the adaptive grid's cap it would hang a GPU (10**6 loops 10**12 times
    per bin), so it is refused rather than silently capped."""
    try:
        if isinstance(sampling_ratio, bool):
            raise TypeError
        sampling_ratio = operator.index(sampling_ratio)
    except TypeError:
        raise OpTypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}") from None
    if sampling_ratio > MAX_SAMPLES_PER_SIDE:
        raise OpValueError(
            f"sampling_ratio must be <= {MAX_SAMPLES_PER_SIDE} samples per bin side (or <= 0: adaptive), "
            f"got {sampling_ratio}"
        )
    return sampling_ratio
