"""The torch implementation of RoIAlign (single- and multi-level), forward and backward: the CPU path.

It runs on any device (``use_backend("torch")`` on CUDA tensors): every tensor it makes is on the inputs' device.

The same math as the Triton kernels (see ``_roi_align_kernels``), vectorized over RoIs: each RoI's
samples are padded to the largest sample grid of the call and masked, the four bilinear corners of
every sample are gathered from a ``[N, H, W, C]`` view of the features, and the backward scatters the
same weights with ``index_put_(accumulate=True)``, which is deterministic on the CPU. RoIs are
processed in chunks so that the gathered samples stay under ``_CHUNK_ELEMENTS`` values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ._backend import acc_dtype
from ._roi_align_kernels import MAX_ADAPTIVE_SAMPLES, level_range

_CHUNK_ELEMENTS = 1 << 24


@dataclass
class _Plan:
    """Per-RoI image, level and geometry, all ``[K]`` tensors in the accumulation dtype."""

    n: torch.Tensor
    level: torch.Tensor
    ok: torch.Tensor
    start_x: torch.Tensor
    start_y: torch.Tensor
    bin_w: torch.Tensor
    bin_h: torch.Tensor
    grid_w: torch.Tensor
    grid_h: torch.Tensor


def _plan(
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    batch_size: int,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    canonical: tuple[float, float],
    acc: torch.dtype,
) -> _Plan:
    r = rois.to(acc)  # coordinates in the features' accumulation dtype, whatever the rois' dtype
    b, x1, y1, x2, y2 = r.unbind(1)
    ok = torch.isfinite(r).all(1) & (b >= 0) & (b < batch_size)
    if valid is not None:
        ok &= valid
    r = torch.where(ok[:, None], r, 0)
    b, x1, y1, x2, y2 = r.unbind(1)
    level = torch.zeros_like(b, dtype=torch.long)
    if len(scales) > 1:
        k_min, k_max = level_range(scales)
        area = (x2 - x1) * (y2 - y1)
        ok &= area >= 0
        s = torch.sqrt(area.clamp(min=0))
        lvl = torch.floor(canonical[1] + torch.log2(s / canonical[0]) + 1e-6)
        level = (lvl.clamp(k_min, k_max) - k_min).long()
        ok &= level < len(scales)
        level = torch.where(ok, level, 0)
    scale = torch.tensor(scales, dtype=acc, device=r.device)[level]
    offset = 0.5 if aligned else 0.0
    start_x, start_y = x1 * scale - offset, y1 * scale - offset
    roi_w, roi_h = x2 * scale - offset - start_x, y2 * scale - offset - start_y
    # As the kernels: coordinates that overflow once scaled sample nothing, with a geometry of zeros.
    ok &= torch.isfinite(torch.stack([start_x, start_y, roi_w, roi_h])).all(0)
    start_x, start_y, roi_w, roi_h = (torch.where(ok, v, 0) for v in (start_x, start_y, roi_w, roi_h))
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / pooled[1], roi_h / pooled[0]
    if sampling_ratio > 0:
        grid_w = torch.full_like(level, sampling_ratio)
        grid_h = torch.full_like(level, sampling_ratio)
    else:
        grid_w = torch.ceil(bin_w).clamp(0, MAX_ADAPTIVE_SAMPLES.value).long()
        grid_h = torch.ceil(bin_h).clamp(0, MAX_ADAPTIVE_SAMPLES.value).long()
    grid_w, grid_h = torch.where(ok, grid_w, 0), torch.where(ok, grid_h, 0)
    return _Plan(b.long(), level, ok, start_x, start_y, bin_w, bin_h, grid_w, grid_h)


def _axis(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """One axis of torchvision's bilinear_interpolate: (inside, low, high, weight of low, weight of high)."""
    inside = (coord >= -1) & (coord <= size)
    c = coord.clamp(0, size)
    low = c.long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    c = torch.where(edge, low.to(c.dtype), c)
    frac = c - low
    return inside, low, high, 1 - frac, frac


def _bin_samples(start, bin_size, grid, bins: int, size: int) -> tuple[torch.Tensor, ...]:
    """Sample corners and weights of one axis for RoIs ``[k]``: ``[k, bins, G]`` with G the largest grid.

    Weights are 0 for padded samples (index >= the RoI's grid) and for samples outside the map.
    """
    G = max(int(grid.max()), 1)
    s = torch.arange(G, dtype=start.dtype, device=start.device)
    i = torch.arange(bins, dtype=start.dtype, device=start.device)
    g = grid.clamp(min=1).to(start.dtype)[:, None, None]
    coord = start[:, None, None] + i[None, :, None] * bin_size[:, None, None] + (s + 0.5) * bin_size[:, None, None] / g
    inside, low, high, w_low, w_high = _axis(coord, size)
    keep = inside & (torch.arange(G, device=grid.device)[None, None, :] < grid[:, None, None])
    return low, high, w_low * keep, w_high * keep


def _avg_weights(
    plan: _Plan, ch: torch.Tensor, pooled: tuple[int, int], H: int, W: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of RoIs ``ch`` as a sparse matrix over the flattened ``[N*H*W]`` pixels.

    Returns ``(cols, weights)`` of shape ``[k*PH*PW, S]``: output row ``(k, i, j)`` is the sum over its S
    (sample, corner) entries of ``weights * pixel[cols]`` (the count division included). Every row has
    the same number of entries (padded samples weigh 0), so the rows form a CSR matrix directly.
    """
    PH, PW = pooled
    y_lo, y_hi, wy_lo, wy_hi = _bin_samples(plan.start_y[ch], plan.bin_h[ch], plan.grid_h[ch], PH, H)
    x_lo, x_hi, wx_lo, wx_hi = _bin_samples(plan.start_x[ch], plan.bin_w[ch], plan.grid_w[ch], PW, W)
    count = (plan.grid_h[ch] * plan.grid_w[ch]).clamp(min=1).to(wy_lo.dtype)
    base = plan.n[ch] * (H * W)
    # [k, PH, PW, Gh, Gw, 2 (y corner), 2 (x corner)]
    ys = torch.stack([y_lo, y_hi], -1)[:, :, None, :, None, :, None]
    xs = torch.stack([x_lo, x_hi], -1)[:, None, :, None, :, None, :]
    wy = torch.stack([wy_lo, wy_hi], -1)[:, :, None, :, None, :, None]
    wx = torch.stack([wx_lo, wx_hi], -1)[:, None, :, None, :, None, :]
    cols = base[:, None, None, None, None, None, None] + ys * W + xs
    weights = wy * wx / count[:, None, None, None, None, None, None]
    rows = len(ch) * PH * PW
    return cols.reshape(rows, -1), weights.reshape(rows, -1)


def _chunks(idx: torch.Tensor, per_roi: int) -> list[torch.Tensor]:
    return list(idx.split(max(1, _CHUNK_ELEMENTS // max(per_roi, 1))))


def forward_torch(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_mode: bool,
    canonical: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [K, C, PH, PW], argmax [K, C, PH, PW] int32 or [0])``, as ``forward_triton``."""
    f0 = features[0]
    N, C = f0.shape[:2]
    K, (PH, PW) = rois.shape[0], pooled
    acc = acc_dtype(f0.dtype)
    out = f0.new_zeros((K, PH, PW, C), dtype=acc)
    argmax = f0.new_full((K, PH, PW, C), -1, dtype=torch.int32)
    if K and C:
        plan = _plan(rois, valid, N, scales, pooled, sampling_ratio, aligned, canonical, acc)
        for lvl, feat in enumerate(features):
            H, W = feat.shape[2:]
            idx = torch.nonzero(plan.ok & (plan.level == lvl)).flatten()
            if idx.numel() == 0:
                continue
            Gh, Gw = max(int(plan.grid_h[idx].max()), 1), max(int(plan.grid_w[idx].max()), 1)
            if not max_mode:
                # A sparse [k*PH*PW, N*H*W] x dense [N*H*W, C] product over a pixel-major copy of the map,
                # instead of gathering [k, PH, Gh, PW, Gw, C] corners from the NCHW view: 160 -> 96 ms at
                # bench/test_roi_align.py's CPU shapes (single level, 7x7, fp32; torchvision's C++: 8 ms).
                flat = feat.permute(0, 2, 3, 1).reshape(-1, C).to(acc)
                for ch in _chunks(idx, PH * PW * Gh * Gw * 4):
                    cols, weights = _avg_weights(plan, ch, pooled, H, W)
                    crow = torch.arange(0, cols.numel() + 1, cols.shape[1], device=cols.device)
                    shape = (cols.shape[0], flat.shape[0])
                    with warnings.catch_warnings():  # "CSR support is in beta": this use is covered by tests
                        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                        matrix = torch.sparse_csr_tensor(
                            crow, cols.flatten(), weights.flatten(), shape, device=flat.device, check_invariants=False
                        )
                    # Autocast would cast the product to a half type (bf16 on the CPU, fp16 on CUDA).
                    with torch.autocast(flat.device.type, enabled=False):
                        out[ch] = (matrix @ flat).view(len(ch), PH, PW, C)
                continue
            fhwc = feat.permute(0, 2, 3, 1)
            for ch in _chunks(idx, PH * Gh * PW * Gw * C):
                y_lo, y_hi, wy_lo, wy_hi = _bin_samples(plan.start_y[ch], plan.bin_h[ch], plan.grid_h[ch], PH, H)
                x_lo, x_hi, wx_lo, wx_hi = _bin_samples(plan.start_x[ch], plan.bin_w[ch], plan.grid_w[ch], PW, W)
                n = plan.n[ch][:, None, None, None, None]
                val = 0
                for ya, wya in ((y_lo, wy_lo), (y_hi, wy_hi)):
                    for xb, wxb in ((x_lo, wx_lo), (x_hi, wx_hi)):
                        v = fhwc[n, ya[:, :, :, None, None], xb[:, None, None, :, :]].to(acc)
                        val = val + (wya[:, :, :, None, None] * wxb[:, None, None, :, :])[..., None] * v
                # val: [k, PH, Gh, PW, Gw, C]; the max over a bin's samples, first maximum wins
                gy, gx = val.shape[2], val.shape[4]
                exists = (torch.arange(gy, device=val.device)[None, :, None] < plan.grid_h[ch][:, None, None]) & (
                    torch.arange(gx, device=val.device)[None, None, :] < plan.grid_w[ch][:, None, None]
                )
                val = val.permute(0, 1, 3, 5, 2, 4).flatten(-2)
                val = torch.where(exists.flatten(1)[:, None, None, None, :], val, float("-inf"))
                best, flat_arg = val.max(-1)
                arg = (flat_arg // gx) * plan.grid_w[ch][:, None, None, None] + flat_arg % gx
                some = (plan.grid_h[ch] * plan.grid_w[ch] > 0)[:, None, None, None]
                out[ch] = torch.where(some, best, 0)
                argmax[ch] = torch.where(some, arg, -1).to(torch.int32)
    out = out.permute(0, 3, 1, 2).contiguous().to(f0.dtype)
    argmax = argmax.permute(0, 3, 1, 2).contiguous() if max_mode else argmax.new_empty((0,))
    return out, argmax


def backward_torch(
    grad: torch.Tensor,
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    argmax: torch.Tensor,
    level_shapes: list[tuple[int, int]],
    batch_size: int,
    channels_last: bool,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_mode: bool,
    canonical: tuple[float, float],
) -> list[torch.Tensor]:
    """One gradient per level ``[N, C, H_l, W_l]`` in ``grad``'s dtype, as ``backward_triton``."""
    N, K, C = batch_size, rois.shape[0], grad.shape[1]
    PH, PW = pooled
    acc = acc_dtype(grad.dtype)
    grads = [grad.new_zeros((N, h, w, C), dtype=acc) for h, w in level_shapes]
    if K and C and N:
        plan = _plan(rois, valid, N, scales, pooled, sampling_ratio, aligned, canonical, acc)
        g_all = grad.permute(0, 2, 3, 1).to(acc)  # [K, PH, PW, C]
        for lvl, (H, W) in enumerate(level_shapes):
            idx = torch.nonzero(plan.ok & (plan.level == lvl)).flatten()
            if idx.numel() == 0:
                continue
            if max_mode:
                _scatter_argmax(grads[lvl], g_all[idx], argmax.permute(0, 2, 3, 1)[idx], plan, idx, H, W)
                continue
            Gh, Gw = max(int(plan.grid_h[idx].max()), 1), max(int(plan.grid_w[idx].max()), 1)
            flat = grads[lvl].view(-1, C)
            for ch in _chunks(idx, PH * PW * Gh * Gw * 4 * C):
                # The transpose of the forward's sparse product; index_add_ is deterministic on the CPU.
                cols, weights = _avg_weights(plan, ch, pooled, H, W)
                g = g_all[ch].reshape(-1, 1, C) * weights[..., None]
                flat.index_add_(0, cols.flatten(), g.reshape(-1, C))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [g.permute(0, 3, 1, 2).to(dtype=grad.dtype, memory_format=fmt) for g in grads]


def _scatter_argmax(
    grad_in: torch.Tensor, g: torch.Tensor, arg: torch.Tensor, plan: _Plan, idx: torch.Tensor, H: int, W: int
) -> None:
    """Max mode: add ``g [k, PH, PW, C]`` to the four neighbours of each bin's arg-max sample."""
    PH, PW = g.shape[1:3]
    acc = g.dtype
    arg = arg.long()
    gh = plan.grid_h[idx].clamp(min=1)[:, None, None, None]
    gw = plan.grid_w[idx].clamp(min=1)[:, None, None, None]
    i = torch.arange(PH, dtype=acc, device=g.device)[None, :, None, None]
    j = torch.arange(PW, dtype=acc, device=g.device)[None, None, :, None]
    bh, bw = plan.bin_h[idx][:, None, None, None], plan.bin_w[idx][:, None, None, None]
    y = plan.start_y[idx][:, None, None, None] + i * bh + ((arg // gw) + 0.5) * bh / gh
    x = plan.start_x[idx][:, None, None, None] + j * bw + ((arg % gw) + 0.5) * bw / gw
    in_y, y_lo, y_hi, hy, ly = _axis(y, H)
    in_x, x_lo, x_hi, hx, lx = _axis(x, W)
    g = g * (in_y & in_x & (arg >= 0))
    n = plan.n[idx][:, None, None, None]
    c = torch.arange(g.shape[3], device=g.device)[None, None, None, :]
    for ya, wy in ((y_lo, hy), (y_hi, ly)):
        for xb, wx in ((x_lo, hx), (x_hi, lx)):
            grad_in.index_put_((n, ya, xb, c), g * wy * wx, accumulate=True)
