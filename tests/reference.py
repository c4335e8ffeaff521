"""Naive float64 references for the kernel tests, written as plain loops (in the style of torchvision's
``test_ops.py`` ``expected_fn``) and independent of ``kernels/``.

RoIAlign (``roi_align_ref`` / ``roi_align_ref_backward``) follows torchvision's CPU kernel step by step for
``pool_mode="avg"``, and mmcv's kernel for ``pool_mode="max"``; ``multiscale_ref`` maps each RoI to its FPN
level with torchvision's ``LevelMapper`` formula and pools it with ``roi_align_ref``. The semantics are those
fixed in the project's RoIAlign API note:

* offset = 0.5 if aligned else 0; start = coord * scale - offset; size = end - start, at least 1 unless
  aligned; bin = size / pooled; grid = sampling_ratio if > 0 else ceil(size / pooled), at most 1024;
  count = max(grid_h * grid_w, 1); sample y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h.
* bilinear: a sample with y < -1, y > H, x < -1 or x > W (or on an empty map) contributes 0 (and no gradient);
  otherwise y is clamped to >= 0, y_low = int(y), and at the last row both neighbours are the last row.
* avg: sum of the samples / count. max: the largest sample (an out-of-map sample is 0), first one wins on
  ties (iy outer, ix inner, strict '>'), an empty bin gives 0; its gradient goes to the 4 neighbours of
  the winning sample with the bilinear weights, not divided by count.
* invalid RoIs give zeros and no gradient: non-finite batch index or coordinate, batch index outside
  [0, N) (a valid one is truncated with int()), and in the multi-level op valid[k] False or negative area.
  With a single level the multi-level op maps nothing (as torchvision's MultiScaleRoIAlign, which then calls
  roi_align directly): a negative-area RoI is pooled like roi_align pools it.

``mask_target_ref`` is the same RoIAlign (avg, spatial scale 1) of one GT mask over one box: the mask loss's
targets (``kernels/mask_loss.py``).

Everything is computed in float64 with numpy, vectorized over channels only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MAX_ADAPTIVE_GRID = 1024


def _as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """list[Tensor[L_i, 4]] -> Tensor[sum L_i, 5] with the list position as batch index (torchvision's way)."""
    rows = []
    for i, b in enumerate(boxes):
        for j in range(b.shape[0]):
            rows.append([float(i)] + [float(v) for v in b[j].tolist()])
    dtype = boxes[0].dtype if len(boxes) else torch.float32
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).to(dtype)


def roi_batch_index(roi: np.ndarray, batch_size: int) -> int | None:
    """The batch index of one RoI row, or None if the RoI is invalid (non-finite values, index outside [0, N))."""
    if not all(math.isfinite(v) for v in roi):
        return None
    if not (0.0 <= roi[0] < batch_size):
        return None
    return int(roi[0])


def bilinear_neighbours(height: int, width: int, y: float, x: float) -> list[tuple[int, int, float]]:
    """The (row, column, weight) of the 4 bilinear neighbours of a sample, [] if it lies outside the map."""
    if height == 0 or width == 0 or y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def bin_samples(
    roi: np.ndarray,
    ph: int,
    pw: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[list[list[tuple[float, float]]], int]:
    """For bin (i, j) (index i * pw + j) the list of sample points (y, x) in (iy outer, ix inner) order, and
    the divisor ``count`` of the average."""
    offset = 0.5 if aligned else 0.0
    start_w = roi[1] * spatial_scale - offset
    start_h = roi[2] * spatial_scale - offset
    end_w = roi[3] * spatial_scale - offset
    end_h = roi[4] * spatial_scale - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_h = roi_h / ph
    bin_w = roi_w / pw
    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
    else:
        grid_h = min(math.ceil(roi_h / ph), MAX_ADAPTIVE_GRID)
        grid_w = min(math.ceil(roi_w / pw), MAX_ADAPTIVE_GRID)
    count = max(grid_h * grid_w, 1)
    bins = []
    for i in range(ph):
        for j in range(pw):
            points = []
            for iy in range(grid_h):
                y = start_h + i * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_w + j * bin_w + (ix + 0.5) * bin_w / grid_w
                    points.append((y, x))
            bins.append(points)
    return bins, count


def _roi_align_loops(
    x: np.ndarray,
    rois: np.ndarray,
    ph: int,
    pw: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool_mode: str,
    grad_out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Forward (output, argmax) and, given ``grad_out``, the input gradient, all by loops."""
    n, c, height, width = x.shape
    k = rois.shape[0]
    out = np.zeros((k, c, ph, pw))
    argmax = np.full((k, c, ph, pw), -1, dtype=np.int64)
    grad_in = None if grad_out is None else np.zeros_like(x)
    for r in range(k):
        b = roi_batch_index(rois[r], n)
        if b is None:
            continue
        bins, count = bin_samples(rois[r], ph, pw, spatial_scale, sampling_ratio, aligned)
        for i in range(ph):
            for j in range(pw):
                points = bins[i * pw + j]
                neighbours = [bilinear_neighbours(height, width, y, xx) for y, xx in points]
                values = []
                for nb in neighbours:
                    v = np.zeros(c)
                    for yy, xx, w in nb:
                        v = v + w * x[b, :, yy, xx]
                    values.append(v)
                if pool_mode == "avg":
                    acc = np.zeros(c)
                    for v in values:
                        acc = acc + v
                    out[r, :, i, j] = acc / count
                    if grad_in is not None:
                        g = grad_out[r, :, i, j] / count
                        for nb in neighbours:
                            for yy, xx, w in nb:
                                grad_in[b, :, yy, xx] += w * g
                else:
                    best = np.full(c, -np.inf)
                    best_idx = np.full(c, -1, dtype=np.int64)
                    for s, v in enumerate(values):
                        better = v > best
                        best = np.where(better, v, best)
                        best_idx = np.where(better, s, best_idx)
                    out[r, :, i, j] = np.where(best_idx >= 0, best, 0.0)
                    argmax[r, :, i, j] = best_idx
                    if grad_in is not None:
                        for ch in range(c):
                            if best_idx[ch] < 0:
                                continue
                            for yy, xx, w in neighbours[best_idx[ch]]:
                                grad_in[b, ch, yy, xx] += w * grad_out[r, ch, i, j]
    return out, argmax, grad_in


def _check_mode(pool_mode: str) -> None:
    if pool_mode not in ("avg", "max"):
        raise ValueError(f"pool_mode must be 'avg' or 'max', got {pool_mode!r}")


def roi_align_ref(
    input: torch.Tensor,
    rois: torch.Tensor,
    ph: int,
    pw: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool_mode: str = "avg",
) -> torch.Tensor:
    """RoIAlign of ``input`` [N, C, H, W] over ``rois`` [K, 5] -> float64 [K, C, ph, pw]."""
    _check_mode(pool_mode)
    out, _, _ = _roi_align_loops(
        _as_f64(input), _as_f64(rois).reshape(-1, 5), ph, pw, spatial_scale, sampling_ratio, aligned, pool_mode, None
    )
    return torch.from_numpy(out)


def roi_align_ref_argmax(
    input: torch.Tensor,
    rois: torch.Tensor,
    ph: int,
    pw: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """Max mode's winning sample index iy * grid_w + ix per output element (int64 [K, C, ph, pw]); -1 for an
    empty bin or an invalid RoI."""
    _, argmax, _ = _roi_align_loops(
        _as_f64(input), _as_f64(rois).reshape(-1, 5), ph, pw, spatial_scale, sampling_ratio, aligned, "max", None
    )
    return torch.from_numpy(argmax)


def roi_align_ref_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    ph: int,
    pw: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool_mode: str = "avg",
) -> torch.Tensor:
    """Gradient of RoIAlign with respect to ``input`` for upstream ``grad_output`` [K, C, ph, pw] -> float64
    [N, C, H, W]. ``input``'s values matter only in max mode (they pick the winning samples)."""
    _check_mode(pool_mode)
    _, _, grad_in = _roi_align_loops(
        _as_f64(input),
        _as_f64(rois).reshape(-1, 5),
        ph,
        pw,
        spatial_scale,
        sampling_ratio,
        aligned,
        pool_mode,
        _as_f64(grad_output),
    )
    return torch.from_numpy(grad_in)


def mask_target_ref(
    mask: np.ndarray, box: Sequence[float], size: int, aligned: bool, sampling_ratio: int
) -> torch.Tensor:
    """RoIAlign (avg, spatial scale 1) of one mask ``[h, w]`` (h or w may be 0) over one box ``(x1, y1, x2, y2)``
    -> float64 ``[size, size]``; zeros for a non-finite box, as for any invalid RoI."""
    plane = np.asarray(mask, dtype=np.float64)[None, None]
    roi = np.array([[0.0, *box]])
    out, _, _ = _roi_align_loops(plane, roi, size, size, 1.0, sampling_ratio, aligned, "avg", None)
    return torch.from_numpy(out[0, 0])


def fpn_level(
    roi: np.ndarray, scales: Sequence[float], canonical_scale: float = 224, canonical_level: float = 4
) -> int | None:
    """Index into ``scales`` of the level that pools ``roi`` (torchvision's LevelMapper: eq. 1 of the FPN paper),
    or None for a RoI of negative area (its sqrt is NaN) or with non-finite coordinates."""
    if not all(math.isfinite(v) for v in roi[1:]):
        return None
    area = (roi[3] - roi[1]) * (roi[4] - roi[2])
    if area < 0:
        return None
    k_min = -math.log2(scales[0])
    k_max = -math.log2(scales[-1])
    s = math.sqrt(area)
    level = k_min if s == 0 else math.floor(canonical_level + math.log2(s / canonical_scale) + 1e-6)
    level = min(max(level, k_min), k_max)
    return int(level) - int(k_min)


def multiscale_ref(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    ph: int,
    pw: int,
    scales: Sequence[float],
    sampling_ratio: int = 2,
    valid: torch.Tensor | None = None,
    aligned: bool = False,
    pool_mode: str = "avg",
    canonical_scale: float = 224,
    canonical_level: float = 4,
) -> torch.Tensor:
    """Multi-level RoIAlign -> float64 [K, C, ph, pw]: each RoI pooled by ``roi_align_ref`` on its level (the only
    level when there is one)."""
    rois64 = _as_f64(rois).reshape(-1, 5)
    k = rois64.shape[0]
    c = features[0].shape[1]
    out = torch.zeros(k, c, ph, pw, dtype=torch.float64)
    for r in range(k):
        if valid is not None and not bool(valid[r]):
            continue
        level = 0 if len(scales) == 1 else fpn_level(rois64[r], scales, canonical_scale, canonical_level)
        if level is None:
            continue
        roi = torch.from_numpy(rois64[r : r + 1].copy())
        out[r] = roi_align_ref(features[level], roi, ph, pw, scales[level], sampling_ratio, aligned, pool_mode)[0]
    return out


def multiscale_ref_backward(
    grad_output: torch.Tensor,
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    ph: int,
    pw: int,
    scales: Sequence[float],
    sampling_ratio: int = 2,
    valid: torch.Tensor | None = None,
    aligned: bool = False,
    pool_mode: str = "avg",
    canonical_scale: float = 224,
    canonical_level: float = 4,
) -> list[torch.Tensor]:
    """Gradients (float64) with respect to every level of ``features`` for upstream ``grad_output``."""
    rois64 = _as_f64(rois).reshape(-1, 5)
    grads = [torch.zeros(f.shape, dtype=torch.float64) for f in features]
    for r in range(rois64.shape[0]):
        if valid is not None and not bool(valid[r]):
            continue
        level = 0 if len(scales) == 1 else fpn_level(rois64[r], scales, canonical_scale, canonical_level)
        if level is None:
            continue
        roi = torch.from_numpy(rois64[r : r + 1].copy())
        grads[level] += roi_align_ref_backward(
            grad_output[r : r + 1], features[level], roi, ph, pw, scales[level], sampling_ratio, aligned, pool_mode
        )
    return grads


def infer_scales(feature_shapes: Sequence[Sequence[int]], image_shapes: Sequence[tuple[int, int]]) -> list[float]:
    """torchvision's MultiScaleRoIAlign scale inference: 2 ** round(log2(feature height / max image height))."""
    max_h = max(s[0] for s in image_shapes)
    return [2.0 ** round(math.log2(shape[-2] / max_h)) for shape in feature_shapes]
