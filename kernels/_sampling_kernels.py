"""RoIAlign's bilinear sampling rule as Triton device functions: the one copy that RoIAlign
(``_roi_align_kernels``) and the mask-loss targets (``_mask_loss_kernels``) sample with (a RoI's geometry,
``roi_geometry``, included), and whose finiteness test the paste (``_paste_masks_kernels``) uses.
``_sampling_torch`` is the same rule in torch.

Math (torchvision's ``roi_align``, step by step): a RoI whose bins measure ``bh x bw`` pixels and start at
``(y0, x0)`` takes ``gh x gw`` samples per bin, ``gh = sampling_ratio`` when positive, else ``ceil(bh)``
clamped to ``[0, MAX_ADAPTIVE_SAMPLES]`` (likewise ``gw``). Sample ``(iy, ix)`` of bin ``(i, j)`` lies at

    y = y0 + i*bh + (iy + 0.5)*bh/gh,    x = x0 + j*bw + (ix + 0.5)*bw/gw

in that operation order (the bits of torchvision's result depend on it). Along an axis of ``size`` pixels a
coordinate outside ``[-1, size]`` (or any coordinate, when ``size`` is 0) is outside the map, and a sample
outside either axis counts as 0. Inside, it is clamped at 0 to ``c``; ``low = int(c)``, ``high = low + 1``,
except at the last pixel, where both are ``size - 1`` and ``c = low``. With torchvision's names
``ly = c_y - y_low``, ``hy = 1 - ly`` (likewise x), the sample is
``hy*hx*v[y_low, x_low] + hy*lx*v[y_low, x_high] + ly*hx*v[y_high, x_low] + ly*lx*v[y_high, x_high]``.

The cap keeps an absurd finite box (1e9 pixels) from looping for hours; only a bin over 1024 pixels per side
reaches it (the value is ``kernels._contract.MAX_SAMPLES_PER_SIDE``, which also bounds a fixed ratio). A RoI
with a non-finite coordinate (``is_finite``) samples nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._contract import MAX_SAMPLES_PER_SIDE

MAX_ADAPTIVE_SAMPLES = tl.constexpr(MAX_SAMPLES_PER_SIDE)


@triton.jit
def is_finite(x):
    """Whether ``x`` is finite: ``x - x`` is NaN for NaN and for +-inf, 0 otherwise (no libdevice call, so it
    runs the same under the interpreter)."""
    return x - x == 0


@triton.jit
def samples_per_bin(bin_size, ok, sampling_ratio):
    """Samples per bin side (int32): ``sampling_ratio`` if positive, else ``ceil(bin_size)`` capped, and 0
    where not ``ok``. ``sampling_ratio`` may be a run-time scalar or a constexpr.

    The adaptive count is clamped in float before the int conversion, which is undefined out of int32's
    range; a negative size (aligned boxes with ``x2 < x1``) takes no samples, as in torchvision.
    """
    adaptive = tl.minimum(tl.maximum(tl.ceil(bin_size), 0.0), MAX_ADAPTIVE_SAMPLES).to(tl.int32)
    n = tl.where(sampling_ratio > 0, sampling_ratio, adaptive)
    return tl.where(ok, n, 0)


@triton.jit
def sample_coord(start, bin_index, bin_size, sample_index, grid):
    """Coordinate of sample ``sample_index`` of ``grid`` in bin ``bin_index``, in torchvision's operation
    order."""
    return start + bin_index * bin_size + (sample_index + 0.5) * bin_size / grid


@triton.jit
def axis(coord, size):
    """One axis of torchvision's ``bilinear_interpolate``: (inside, low, high, weight of low, weight of high).

    ``size`` is the map's extent along the axis (may be 0: nothing is inside). A coordinate outside
    ``[-1, size]`` or NaN is not inside and gets ``c = 0`` (finite weights, and no NaN or huge value meets
    the int conversion); ``low`` and ``high`` lie in ``[0, size - 1]`` whenever ``size > 0``, inside or not,
    so that even an unmasked address is in bounds.
    """
    inside = (coord >= -1.0) & (coord <= size) & (size > 0)
    c = tl.where(inside, tl.maximum(coord, 0.0), 0.0)
    low = c.to(tl.int32)
    edge = low >= size - 1
    low = tl.where(edge, size - 1, low)
    high = tl.where(edge, size - 1, low + 1)
    c = tl.where(edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    return inside, low, high, 1.0 - frac, frac


@triton.jit
def roi_geometry(x1, y1, x2, y2, ok, scale_hi, scale_lo, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
                 ALIGNED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Start, bin size and samples per bin of RoI ``(x1, y1, x2, y2)`` along y and x for ``PH x PW`` bins:
    ``(start_x, start_y, bin_w, bin_h, grid_w, grid_h)``, 0 samples where not ``ok``.

    torchvision's order: ``start = x1*s - o``, ``end = x2*s - o`` (``o = 0.5`` when ``ALIGNED``), size
    ``end - start``, at least 1 when not aligned, bin ``size / PW``. The spatial scale ``s`` arrives as a
    float32 pair ``scale_hi + scale_lo``: Triton passes Python floats as float32, and float64 inputs
    (gradcheck, references) need it to double precision (a scale of 1 is ``(1.0, 0.0)``).
    """
    offset = 0.5 if ALIGNED else 0.0
    if ACC == tl.float64:  # noqa: SIM300 (a constexpr dtype comparison, not a Yoda condition)
        start_x = x1 * scale_hi + x1 * scale_lo - offset
        start_y = y1 * scale_hi + y1 * scale_lo - offset
        end_x = x2 * scale_hi + x2 * scale_lo - offset
        end_y = y2 * scale_hi + y2 * scale_lo - offset
    else:
        start_x = x1 * scale_hi - offset
        start_y = y1 * scale_hi - offset
        end_x = x2 * scale_hi - offset
        end_y = y2 * scale_hi - offset
    roi_w = end_x - start_x
    roi_h = end_y - start_y
    # Finite coordinates that overflow once scaled (3e38 * 4 in float32, or spatial_scale 1e39 passed as
    # float32's inf) sample nothing, as non-finite ones do; their geometry becomes 0 so that no later
    # arithmetic sees an infinity.
    ok = ok & is_finite(start_x) & is_finite(start_y) & is_finite(roi_w) & is_finite(roi_h)
    start_x = tl.where(ok, start_x, 0.0)
    start_y = tl.where(ok, start_y, 0.0)
    roi_w = tl.where(ok, roi_w, 0.0)
    roi_h = tl.where(ok, roi_h, 0.0)
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = roi_w / PW
    bin_h = roi_h / PH
    grid_w = samples_per_bin(bin_w, ok, sampling_ratio)
    grid_h = samples_per_bin(bin_h, ok, sampling_ratio)
    return start_x, start_y, bin_w, bin_h, grid_w, grid_h
