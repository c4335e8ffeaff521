"""RoIAlign, single- and multi-level, as ``torch.library`` ops with torchvision's public signatures.

* ``roi_align`` / ``RoIAlign``: ``torchvision.ops.roi_align`` plus ``pool_mode="max"`` (the Mask R-CNN
  paper's and mmcv's max over a bin's bilinear samples) and a bf16 kernel.
* ``multiscale_roi_align``: all FPN levels pooled in one launch (the level of each RoI is computed in the
  kernel with torchvision's LevelMapper), RoIs as a fixed-size ``Tensor[K, 5]`` with an optional
  ``valid`` mask, so that a static-shape model needs no ``nonzero`` or boolean indexing.
* ``MultiScaleRoIAlign``: torchvision's module (same constructor, forward and results) on top of it.

Kernels and their math: ``_roi_align_kernels``; the CPU torch path: ``_roi_align_torch``.

Registration (``kernels._backend.TritonCustomOp``, as every op): one op, ``torch.ops.mrcnn.multiscale_roi_align``
(and its ``_backward``), serves ``roi_align`` too, as one level. It is a ``triton_op``, which a compiled CUDA graph
traces into, launching the Triton kernels from inductor's generated code (an AOTInductor package then holds
them); CPU calls and the interpreter go through the opaque ``mrcnn::multiscale_roi_align_opaque``. A CPU export
decomposes the op through ``kernels.cpu_decompositions()``.

Results for inputs torchvision leaves undefined (documented and tested):
* a RoI whose batch index is not in ``[0, N)``, whose coordinates are not finite, whose ``valid`` flag
  is False or (multi-level) whose area is negative gives zeros and receives no gradient;
* ``pool_mode="max"``: a bin with no samples (only aligned boxes of non-positive size) gives 0;
* adaptive sampling takes at most 1024 samples per bin side (see ``_sampling_kernels``);
* ``rois`` may have any floating dtype (e.g. float32 boxes with bfloat16 features under autocast):
  coordinates are read in float32 (float64 for float64 features).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from ._backend import triton_custom_op
from ._contract import (
    FLOAT_DTYPES,
    MAX_LEVELS,
    BoxesFormatError,
    OpTypeError,
    OpValueError,
    check_sampling_ratio,
    check_tensor,
)
from ._roi_align_kernels import backward_triton, forward_triton
from ._roi_align_torch import backward_torch, forward_torch

__all__ = ["roi_align", "RoIAlign", "multiscale_roi_align", "MultiScaleRoIAlign", "infer_scales"]

_POOL_MODES = ("avg", "max")
# torchvision's LevelMapper defaults (canonical_scale, canonical_level); with a single level they pick nothing.
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _pair(output_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        size: tuple = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)):
        size = tuple(output_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise OpValueError(f"output_size must be a positive int or a pair of positive ints, got {output_size!r}")
    return size


def _validate(
    features: list[Tensor],
    rois: Tensor,
    valid: Tensor | None,
    scales: list[float],
    pooled: tuple[int, int],
    pool_mode: str,
    sampling_ratio: int,
    canonical: tuple[float, float],
) -> None:
    if not 1 <= len(features) <= MAX_LEVELS:
        raise OpValueError(f"features must hold 1 to {MAX_LEVELS} feature maps, got {len(features)}")
    f0 = check_tensor("input", features[0], ndim=4, dtypes=FLOAT_DTYPES)
    for i, f in enumerate(features):
        name = f"features[{i}]"
        check_tensor(name, f, ndim=4, dtypes=(f0.dtype,), device=f0.device)
        if f.shape[:2] != f0.shape[:2]:
            raise OpValueError(f"{name} has batch and channels {tuple(f.shape[:2])}, expected {tuple(f0.shape[:2])}")
        if f.shape[2] == 0 or f.shape[3] == 0:
            raise OpValueError(f"{name} has an empty spatial size {tuple(f.shape[2:])}")
    check_tensor("rois", rois, dtypes=FLOAT_DTYPES, device=f0.device)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise BoxesFormatError(f"rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if valid is not None:
        check_tensor("valid", valid, ndim=1, dtypes=(torch.bool,), device=f0.device)
        if valid.shape[0] != rois.shape[0]:
            raise OpValueError(f"valid must have shape [K] = [{rois.shape[0]}], got {tuple(valid.shape)}")
    # The Triton kernels take the scales as float32 (and a float64 one as a float32 pair), so a scale must be a
    # normal float32 number for both backends to pool the same: 1e39 would be inf there, finite here.
    f32 = torch.finfo(torch.float32)
    if len(scales) != len(features) or not all(f32.tiny <= s <= f32.max for s in scales):
        raise OpValueError(
            f"scales (spatial_scale) must hold one positive scale per feature map within float32's normal range "
            f"[{f32.tiny:.3g}, {f32.max:.3g}], got {scales}"
        )
    if len(scales) > 1:
        # As detectron2's ROIPooler: the level mapping needs the pyramid 2**-k_min, ..., 2**-k_max, finest
        # first; other scales would pool every RoI from a wrong level.
        k = [-math.log2(s) for s in scales]
        if not all(math.isclose(ki, round(ki)) for ki in k) or [round(ki) for ki in k] != list(
            range(round(k[0]), round(k[0]) + len(k))
        ):
            raise OpValueError(f"scales must be consecutive powers of two, finest first (1/4 ... 1/32), got {scales}")
        if not (math.isfinite(canonical[0]) and canonical[0] > 0 and math.isfinite(canonical[1])):
            raise OpValueError(
                f"canonical_scale must be finite and positive and canonical_level finite, got {canonical}"
            )
    check_sampling_ratio(sampling_ratio)
    if pooled[0] <= 0 or pooled[1] <= 0:
        raise OpValueError(f"output_size must be positive, got {pooled}")
    if pool_mode not in _POOL_MODES:
        raise OpValueError(f"pool_mode must be 'avg' or 'max', got {pool_mode!r}")


def _channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Registration: one op for one or several levels (roi_align is one level of it)
# ----------------------------------------------------------------------------------------------


# Under autocast the features keep their dtype (torchvision casts them to float32 and the result back): our
# half kernels accumulate in float32 and round once, as that round trip does, without a float32 copy of the maps.
@triton_custom_op("multiscale_roi_align", autocast="keep", traceable=True)
def _multiscale_op(
    features: list[Tensor],
    rois: Tensor,
    valid: Tensor | None,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    pool_mode: str,
    canonical_scale: float,
    canonical_level: float,
    *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(output [K, C, PH, PW], argmax [K, C, PH, PW] int32 in max mode, else [0])``, each RoI pooled from its
    level (see ``multiscale_roi_align``)."""
    pooled, canonical = (pooled_height, pooled_width), (canonical_scale, canonical_level)
    _validate(features, rois, valid, scales, pooled, pool_mode, sampling_ratio, canonical)
    impl = forward_triton if backend == "triton" else forward_torch
    return impl(features, rois, valid, scales, pooled, sampling_ratio, aligned, pool_mode == "max", canonical)


@_multiscale_op.register_fake
def _(features, rois, valid, scales, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode,
      canonical_scale, canonical_level):  # fmt: skip
    pooled = (pooled_height, pooled_width)
    _validate(features, rois, valid, scales, pooled, pool_mode, sampling_ratio, (canonical_scale, canonical_level))
    K, C = rois.shape[0], features[0].shape[1]
    out = features[0].new_empty((K, C, *pooled))
    argmax = rois.new_empty((K, C, *pooled) if pool_mode == "max" else (0,), dtype=torch.int32)
    return out, argmax


@triton_custom_op("multiscale_roi_align_backward", autocast="keep")
def _multiscale_backward_op(
    grad: Tensor,
    rois: Tensor,
    valid: Tensor | None,
    argmax: Tensor,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    pool_mode: str,
    canonical_scale: float,
    canonical_level: float,
    batch_size: int,
    level_sizes: list[int],
    channels_last: bool,
    *,
    backend: str,
) -> list[Tensor]:
    """Gradients w.r.t. every level ``[batch_size, C, H_l, W_l]``; ``level_sizes`` is ``[H_0, W_0, H_1, ...]``."""
    shapes = list(zip(level_sizes[0::2], level_sizes[1::2], strict=True))
    args = (grad, rois, valid, argmax, shapes, batch_size, channels_last, scales, (pooled_height, pooled_width),
            sampling_ratio, aligned, pool_mode == "max", (canonical_scale, canonical_level))  # fmt: skip
    if backend == "triton":
        return backward_triton(*args, deterministic=torch.are_deterministic_algorithms_enabled())
    return backward_torch(*args)


@_multiscale_backward_op.register_fake
def _(grad, rois, valid, argmax, scales, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode,
      canonical_scale, canonical_level, batch_size, level_sizes, channels_last):  # fmt: skip
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = grad.shape[1]
    return [
        grad.new_empty((batch_size, C, h, w)).contiguous(memory_format=fmt)
        for h, w in zip(level_sizes[0::2], level_sizes[1::2], strict=True)
    ]


def _multiscale_setup_context(ctx, inputs, output):
    features, rois, valid, *args = inputs
    ctx.save_for_backward(rois, valid, output[1])
    ctx.args = args
    ctx.shape = (
        features[0].shape[0],
        [s for f in features for s in f.shape[2:]],
        _channels_last(features[0]),
    )


def _multiscale_backward(ctx, grad, _grad_argmax):
    rois, valid, argmax = ctx.saved_tensors
    grads = torch.ops.mrcnn.multiscale_roi_align_backward(grad, rois, valid, argmax, *ctx.args, *ctx.shape)
    return grads, *[None] * 10


_multiscale_op.register_autograd(_multiscale_backward, setup_context=_multiscale_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_boxes(boxes: object, like: Tensor) -> None:
    """Eager check of torchvision's two box forms, naming the bad element (a ``Tensor[K, 5]``'s shape is the op's
    to check). A ``BoxesFormatError`` is also the ``AssertionError`` torchvision raises."""
    if isinstance(boxes, Tensor):
        return
    if not isinstance(boxes, (list, tuple)):
        raise BoxesFormatError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        check_tensor(f"boxes[{i}]", b, dtypes=FLOAT_DTYPES, device=like.device)
        if b.dim() != 2 or b.shape[1] != 4:
            raise BoxesFormatError(f"boxes[{i}] must have shape [L, 4], got {tuple(b.shape)}")


def _boxes_to_rois(boxes: Tensor | list[Tensor], like: Tensor) -> Tensor:
    """``Tensor[K, 5]`` from torchvision's two box forms (``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]``)."""
    if not torch.jit.is_scripting():
        _check_boxes(boxes, like)
    if isinstance(boxes, Tensor):
        return boxes
    if len(boxes) == 0:
        return like.new_zeros((0, 5))
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)


def _dequantize_boxes(boxes: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    if isinstance(boxes, Tensor):
        return boxes.dequantize() if boxes.is_quantized else boxes
    return [b.dequantize() if b.is_quantized else b for b in boxes]


# FX: ``symbolic_trace`` records a call of these functions as one node instead of tracing into them (a Proxy is
# neither a Tensor nor a list), as torchvision wraps its ``roi_align``; our modules' forwards call them.
@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool_mode: str = "avg",
) -> Tensor:
    """RoIAlign (Mask R-CNN), ``torchvision.ops.roi_align`` plus ``pool_mode``.

    Args:
        input: ``Tensor[N, C, H, W]`` float16, bfloat16, float32 or float64, any strides (NCHW,
            channels-last, permuted).
        boxes: ``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)``, or ``list[Tensor[L_i, 4]]``, one per
            image, in input coordinates before ``spatial_scale``.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box coordinates to the feature map (e.g. 1/16).
        sampling_ratio: samples per bin side; ``<= 0`` takes ``ceil(bin size)`` (adaptive).
        aligned: shift box coordinates by -0.5 pixel (the corrected RoIAlign of detectron2).
        pool_mode: ``"avg"`` (torchvision) or ``"max"`` (the max over a bin's bilinear samples).

    Returns:
        ``Tensor[K, C, PH, PW]`` in ``input``'s dtype.

    Scriptable (``torch.jit.script``). A quantized ``input`` (``quint8``, ``qint8``, ``qint32``, per tensor; CPU, as
    torchvision) is pooled in float32 from its dequantized values and boxes, and the result quantized with the
    input's scale and zero point: torchvision's quantized RoIAlign, which also computes in float.
    """
    if not torch.jit.is_scripting():
        if input.is_quantized:
            out = roi_align(input.dequantize(), _dequantize_boxes(boxes), output_size, spatial_scale,
                            sampling_ratio, aligned, pool_mode)  # fmt: skip
            return torch.quantize_per_tensor(out, input.q_scale(), input.q_zero_point(), input.dtype)
        # Friendly errors for what TorchScript's types rule out (an output_size of 2.5, a numpy sampling ratio).
        output_size = _pair(output_size)
        sampling_ratio = check_sampling_ratio(sampling_ratio)
    rois = _boxes_to_rois(boxes, input)
    # One level of the multi-level op: with one level it maps no RoI to a level (as torchvision's
    # MultiScaleRoIAlign, which then calls roi_align), so it is exactly roi_align; one registration serves both.
    # The level mapper's (canonical_scale, canonical_level) are unused with one level: any valid pair.
    return torch.ops.mrcnn.multiscale_roi_align(
        [input], rois, None, [float(spatial_scale)], output_size[0], output_size[1], sampling_ratio, bool(aligned),
        pool_mode, 1.0, 0.0,
    )[0]


class RoIAlign(nn.Module):
    """``torchvision.ops.RoIAlign`` on our kernels; see ``roi_align``."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        *,
        pool_mode: str = "avg",
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pool_mode = pool_mode

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, float(self.spatial_scale), self.sampling_ratio, self.aligned,
                         self.pool_mode)  # fmt: skip

    def extra_repr(self) -> str:
        # torchvision's repr, plus pool_mode where it is not torchvision's average.
        mode = "" if self.pool_mode == "avg" else f", pool_mode={self.pool_mode!r}"
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}{mode}"
        )


@torch.fx.wrap
def multiscale_roi_align(
    features: list[Tensor],
    rois: Tensor,
    output_size: BroadcastingList2[int],
    scales: list[float],
    sampling_ratio: int = 2,
    valid: Tensor | None = None,
    aligned: bool = False,
    pool_mode: str = "avg",
    canonical_scale: float = float(CANONICAL_SCALE),
    canonical_level: float = float(CANONICAL_LEVEL),
) -> Tensor:
    """Pool every RoI from its FPN level, all levels in one launch.

    The level of a RoI is torchvision's ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``
    clamped to ``[k_min, k_max]`` with ``k = -log2(scale)`` of the first and last level; the RoI is then
    pooled as ``roi_align`` does on that level with that level's scale. With one level, no mapping.

    Args:
        features: up to 5 ``Tensor[N, C, H_l, W_l]``, finest first, same dtype and device.
        rois: ``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in image coordinates.
        output_size: ``(PH, PW)`` or an int for both.
        scales: ``scales[l]`` maps image to level-``l`` coordinates (powers of two, e.g. 1/4 ... 1/32).
        sampling_ratio: as in ``roi_align`` (torchvision's poolers use 2).
        valid: optional ``Tensor[K]`` bool; a False RoI (a padded slot) gives zeros and no gradient.
        aligned, pool_mode: as in ``roi_align``.
        canonical_scale, canonical_level: the LevelMapper's ``s0`` and ``k0``.

    Returns:
        ``Tensor[K, C, PH, PW]``; the shape never depends on the data.

    Scriptable; pass the arguments after ``sampling_ratio`` by keyword (TorchScript has no keyword-only ones).
    """
    if not torch.jit.is_scripting():
        if not isinstance(features, (list, tuple)):
            raise OpTypeError(f"features must be a list of Tensor[N, C, H, W], got {type(features).__name__}")
        features = list(features)
        scales = [float(s) for s in scales]
        output_size = _pair(output_size)
        sampling_ratio = check_sampling_ratio(sampling_ratio)
    return torch.ops.mrcnn.multiscale_roi_align(
        features, rois, valid, scales, output_size[0], output_size[1], sampling_ratio, bool(aligned), pool_mode,
        float(canonical_scale), float(canonical_level),
    )[0]  # fmt: skip


def infer_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """torchvision's scale inference: ``2 ** round(log2(feature height / largest image height))`` per feature map
    (``image_shapes``: ``(h, w)`` of each image, or of the padded batch)."""
    if len(image_shapes) == 0:
        raise ValueError("image_shapes should not be empty")
    max_h = max([s[0] for s in image_shapes])
    # math.log(r, 2) rather than math.log2, which TorchScript lacks: log2 of a ratio of ints is never within rounding
    # of k + 0.5, so both, and Python's, TorchScript's and torchvision's (torch.round) rounding, agree.
    return [2.0 ** round(math.log(float(f.shape[-2]) / float(max_h), 2.0)) for f in features]


class MultiScaleRoIAlign(nn.Module):
    """``torchvision.ops.MultiScaleRoIAlign`` on one multi-level launch; same constructor, forward and results.

    ``aligned`` and ``pool_mode`` are ours (torchvision pools with ``aligned=False``, average).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int,
        *,
        canonical_scale: int = CANONICAL_SCALE,
        canonical_level: int = CANONICAL_LEVEL,
        aligned: bool = False,
        pool_mode: str = "avg",
    ) -> None:
        super().__init__()
        self.featmap_names = featmap_names
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.pool_mode = pool_mode

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """
        Args:
            x: feature maps by name; those in ``featmap_names`` are used, in ``x``'s order.
            boxes: ``list[Tensor[L_i, 4]]`` per image, in image coordinates.
            image_shapes: ``(h, w)`` of each image before padding, to infer the scales.

        Returns:
            ``Tensor[sum L_i, C, PH, PW]``.
        """
        return _pool_levels(
            x, boxes, image_shapes, self.featmap_names, self.output_size, self.sampling_ratio, self.aligned,
            self.pool_mode, float(self.canonical_scale), float(self.canonical_level),
        )  # fmt: skip

    def extra_repr(self) -> str:
        # torchvision's repr, plus our arguments where they are not torchvision's behaviour.
        ours = ", aligned=True" if self.aligned else ""
        ours += "" if self.pool_mode == "avg" else f", pool_mode={self.pool_mode!r}"
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}{ours}"
        )


# One FX node for the whole forward (torchvision makes its MultiScaleRoIAlign a leaf module, which
# torchvision.models.feature_extraction relies on; ours is not in torchvision.ops, so its forward is one call).
@torch.fx.wrap
def _pool_levels(
    x: dict[str, Tensor],
    boxes: list[Tensor],
    image_shapes: list[tuple[int, int]],
    featmap_names: list[str],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    pool_mode: str,
    canonical_scale: float,
    canonical_level: float,
) -> Tensor:
    """``MultiScaleRoIAlign.forward``."""
    features: list[Tensor] = []
    for name, feature in x.items():
        if name in featmap_names:
            features.append(feature)
    if len(features) == 0:
        raise ValueError(f"none of featmap_names {featmap_names} is in x (keys {list(x.keys())})")
    rois = _boxes_to_rois(boxes, features[0])
    return multiscale_roi_align(
        features, rois, output_size, infer_scales(features, image_shapes), sampling_ratio, aligned=aligned,
        pool_mode=pool_mode, canonical_scale=canonical_scale, canonical_level=canonical_level,
    )  # fmt: skip
